"""Causal attention over a pack's short rows on CUDA: one program per row and head, the whole row
in registers.

A pack's batch is K rows of a few dozen positions (the seed's texts: 19-26 tokens) times the
model's heads: 12,288 problems of 26 x 26 for GPT-2 at K=1024. Eager attention runs them through
batched GEMM kernels tiled for larger problems, with transposes, a softmax and a dropout pass
between them (~310 us a layer forward and ~370 backward, at K=1024 on the H200); sdpa's fused
kernels (cuDNN's flash attention) take a 128-row tile per problem and are slower still (~400 us
forward). Here one program loads its row's q, k and v where they are (strided views of the
projection's output: no transposes), computes the scores, the causal softmax and the dropout mask
(a counter hash of (seed, row, head, query, key), so the backward recomputes it instead of
reading it) in registers, and writes its output in the [B, T, H, D] layout the model reshapes.
The backward recomputes the probabilities and writes dq, dk and dv; for grouped-query attention a
program takes one key/value head and sums over the query heads that share it.

`causal_attention(q, k, v, seed, p, scale)` is a torch custom op with its own backward, so the
pack's compiled step calls the kernels inside its graph. Rows must be padded on the right, as the
pack's TokenTable pads them: the causal mask alone is then each real position's mask.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lora_exp.pack.kernels.hash import mix32

#: the longest row (positions) and widest head the kernels take; longer rows use sdpa
MAX_T, MAX_D = 64, 128
NUM_WARPS = 4


@triton.jit
def _probs(q, k, bh, T, scale, thr, kscale, seed_ptr, DROPOUT: tl.constexpr, BT: tl.constexpr,
           PREC: tl.constexpr):
    """Row-softmax of the causal scores [BT, BT] (fp32), and the multipliers dropout applies to
    them (0 where dropped, 1/(1-p) where kept; 1 without dropout)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    i = tl.arange(0, BT)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] < T)  # padded query rows still see key 0
    s = tl.where(allowed, s, float("-inf"))
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    if DROPOUT:
        seed = tl.load(seed_ptr).to(tl.uint32)
        counter = ((bh * T + i[:, None]) * T + i[None, :]).to(tl.uint32)
        keep = mix32(seed * 0x9E3779B1 + counter).to(tl.int64) >= thr
        mult = tl.where(keep, kscale, 0.0)
    else:
        mult = tl.full((BT, BT), 1.0, tl.float32)
    return p, mult


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, seed_ptr, T, H, G, q_s0, q_s1, q_s2, k_s0, k_s1, k_s2, v_s0, v_s1,
                v_s2, scale, thr, kscale, DROPOUT: tl.constexpr, BT: tl.constexpr, D: tl.constexpr,
                PREC: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // G
    t = tl.arange(0, BT)
    d = tl.arange(0, D)
    rows = (t < T)[:, None]
    q = tl.load(q_ptr + b * q_s0 + h * q_s1 + t[:, None] * q_s2 + d[None, :], mask=rows, other=0.0)
    k = tl.load(k_ptr + b * k_s0 + hk * k_s1 + t[:, None] * k_s2 + d[None, :], mask=rows, other=0.0)
    v = tl.load(v_ptr + b * v_s0 + hk * v_s1 + t[:, None] * v_s2 + d[None, :], mask=rows, other=0.0)
    p, mult = _probs(q, k, bh, T, scale, thr, kscale, seed_ptr, DROPOUT, BT, PREC)
    o = tl.dot((p * mult).to(v.dtype), v, input_precision=PREC)
    tl.store(o_ptr + ((b * T + t[:, None]) * H + h) * D + d[None, :], o.to(o_ptr.dtype.element_ty), mask=rows)


@triton.jit
def _bwd_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, seed_ptr, T, H, G, q_s0, q_s1, q_s2, k_s0,
                k_s1, k_s2, v_s0, v_s1, v_s2, do_s0, do_s1, do_s2, scale, thr, kscale, DROPOUT: tl.constexpr,
                BT: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    """One key/value head of one row: dk and dv summed over its G query heads, and their dq."""
    bk = tl.program_id(0).to(tl.int64)
    HK = H // G
    b, hk = bk // HK, bk % HK
    t = tl.arange(0, BT)
    d = tl.arange(0, D)
    rows = (t < T)[:, None]
    v = tl.load(v_ptr + b * v_s0 + hk * v_s1 + t[:, None] * v_s2 + d[None, :], mask=rows, other=0.0)
    dtype = v.dtype
    k = tl.load(k_ptr + b * k_s0 + hk * k_s1 + t[:, None] * k_s2 + d[None, :], mask=rows, other=0.0).to(dtype)
    dk = tl.zeros((BT, D), dtype=tl.float32)
    dv = tl.zeros((BT, D), dtype=tl.float32)
    for g in range(G):
        h = hk * G + g
        bh = b * H + h
        q = tl.load(q_ptr + b * q_s0 + h * q_s1 + t[:, None] * q_s2 + d[None, :], mask=rows, other=0.0).to(dtype)
        # the output's gradient can come back in another dtype than the inputs (fp32 under autocast)
        do = tl.load(do_ptr + b * do_s0 + h * do_s1 + t[:, None] * do_s2 + d[None, :], mask=rows,
                     other=0.0).to(dtype)
        p, mult = _probs(q, k, bh, T, scale, thr, kscale, seed_ptr, DROPOUT, BT, PREC)
        dv += tl.dot(tl.trans((p * mult).to(dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC) * mult  # d loss / d p (before dropout)
        ds = (p * (dp - tl.sum(p * dp, axis=1)[:, None]) * scale).to(dtype)
        dq = tl.dot(ds, k, input_precision=PREC)
        tl.store(dq_ptr + ((b * T + t[:, None]) * H + h) * D + d[None, :], dq.to(dtype), mask=rows)
        dk += tl.dot(tl.trans(ds), q, input_precision=PREC)
    out = ((b * T + t[:, None]) * HK + hk) * D + d[None, :]
    tl.store(dk_ptr + out, dk.to(dtype), mask=rows)
    tl.store(dv_ptr + out, dv.to(dtype), mask=rows)


# --- the custom op --------------------------------------------------------------------------------


def fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernels take these (q [B, H, T, D], k [B, HK, T, D]) on this device."""
    t, d = q.shape[2], q.shape[3]
    on_device = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter runs them on the CPU
    return (on_device and t <= MAX_T and 16 <= d <= MAX_D and d & (d - 1) == 0 and q.shape[1] % k.shape[1] == 0
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _rows_dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch_args(p: float, dtype: torch.dtype, t: int) -> dict:
    return {"DROPOUT": p > 0, "BT": max(16, triton.next_power_of_2(t)),
            "PREC": "ieee" if dtype == torch.float32 else "tf32", "num_warps": NUM_WARPS}


def _dropout_consts(p: float) -> tuple[int, float]:
    """Keep an element when its 32-bit hash >= thr (probability 1 - p); kept ones scale by 1/(1-p)."""
    return int(p * 2.0 ** 32), (1.0 / (1.0 - p) if p < 1 else 0.0)


@torch.library.custom_op("lora_exp::causal_attention", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor? seed, float p, float scale) -> Tensor")
def _attention(q, k, v, seed, p, scale):
    q, k, v = _rows_dense(q), _rows_dense(k.to(q.dtype)), _rows_dense(v.to(q.dtype))  # one dtype
    b, h, t, d = q.shape
    o = torch.empty(b, t, h, d, device=q.device, dtype=q.dtype)
    thr, kscale = _dropout_consts(p)
    _fwd_kernel[(b * h,)](q, k, v, o, seed if seed is not None else q, t, h, h // k.shape[1], *q.stride()[:3],
                          *k.stride()[:3], *v.stride()[:3], scale, thr, kscale, D=d,
                          **_launch_args(p if seed is not None else 0.0, q.dtype, t))
    return o


@_attention.register_fake
def _attention_fake(q, k, v, seed, p, scale):
    b, h, t, d = q.shape
    return q.new_empty(b, t, h, d)


@torch.library.custom_op("lora_exp::causal_attention_backward", mutates_args=(),
                         schema="(Tensor do, Tensor q, Tensor k, Tensor v, Tensor? seed, float p, float scale) "
                                "-> (Tensor, Tensor, Tensor)")
def _attention_backward(do, q, k, v, seed, p, scale):
    q, k, v = _rows_dense(q), _rows_dense(k.to(q.dtype)), _rows_dense(v.to(q.dtype))
    do = _rows_dense(do.transpose(1, 2))  # the output's gradient, [B, T, H, D] -> [B, H, T, D] view
    b, h, t, d = q.shape
    hk = k.shape[1]
    dq = torch.empty(b, t, h, d, device=q.device, dtype=q.dtype)
    dk = torch.empty(b, t, hk, d, device=q.device, dtype=q.dtype)
    dv = torch.empty(b, t, hk, d, device=q.device, dtype=q.dtype)
    thr, kscale = _dropout_consts(p)
    _bwd_kernel[(b * hk,)](q, k, v, do, dq, dk, dv, seed if seed is not None else q, t, h, h // hk,
                           *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], scale, thr, kscale,
                           D=d, **_launch_args(p if seed is not None else 0.0, q.dtype, t))
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)  # in q's dtype: autograd casts to k's, v's


@_attention_backward.register_fake
def _attention_backward_fake(do, q, k, v, seed, p, scale):
    b, h, t, d = q.shape
    hk = k.shape[1]
    return (q.new_empty(b, t, h, d).transpose(1, 2), q.new_empty(b, t, hk, d).transpose(1, 2),
            q.new_empty(b, t, hk, d).transpose(1, 2))


def _setup_context(ctx, inputs, output):
    q, k, v, seed, p, scale = inputs
    ctx.save_for_backward(q, k, v, seed)
    ctx.p, ctx.scale = p, scale


def _backward(ctx, do):
    q, k, v, seed = ctx.saved_tensors
    dq, dk, dv = _attention_backward(do, q, k, v, seed, ctx.p, ctx.scale)
    return dq, dk, dv, None, None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float = 0.0,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, causal) with dropout p on the probabilities, times v: [B, T, H, D]
    for q [B, H, T, D] and k, v [B, HK, T, D] (HK dividing H; any strides with dense rows).
    A fresh seed per call draws the dropout mask (torch's generator, so torch.manual_seed
    repeats it)."""
    seed = torch.randint(0, 2 ** 31 - 1, (1,), device=q.device) if p > 0 else None
    return _attention(q, k, v, seed, float(p), float(scale if scale is not None else q.shape[-1] ** -0.5))
