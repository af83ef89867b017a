"""A SwiGLU MLP's activation fused with its packed down projection's LoRA (Llama, Qwen, Mistral:
`down(silu(gate(x)) * up(x))`), for a pack's training step on CUDA.

The down projection's input h = silu(g) * u is as wide as the MLP (4864 in Qwen2.5-0.5B): through
`kernels.lora` its LoRA delta reads h once more in the forward (drop(h) A^T), A's gradient reads it
again in the backward and the input gradient reads and writes the MLP-wide gradient of h in place.
Here those passes ride on the activation's own:

    forward    one pass over g, u: h (for the base product), and z = drop(h) A^T per slot [M, r];
               out = h W^T (cuBLAS), plus (z B) * scale in place (kernels.lora's forward, given z)
    backward   dh = g_out W (cuBLAS); dz and B's gradient, and dh += (dz A) * mask in place
               (kernels.lora_tiled); then one pass over g, u, dh per block of the MLP's width: h
               again, A's gradient dz^T drop(h), and g's and u's (the SiLU's and the product's)

h is not kept for the backward (g and u are, as the activation keeps them anyway). The roundings
are those of torch's eager ops under autocast: silu(g) and the product rounded to the compute
dtype, the delta's input gradient added to the base layer's as `kernels.lora` adds it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_exp.pack.kernels import lora, lora_gemm, lora_tiled
from lora_exp.pack.kernels.hash import masked
from lora_exp.pack.settings import KERNEL_TUNABLES

#: positions x MLP columns a program's tile covers, and its warps (16 x 128, 4 warps: the fastest of
#: 8 settings timed at Qwen2.5-0.5B's shapes, `bench/lora_kernel_times.py --swiglu`)
BM, BK, NUM_WARPS = 16, 128, 4
#: the constants here, which the benches set to time other values
TUNABLE = KERNEL_TUNABLES["swiglu"]


@triton.jit
def _silu_mul(g, u, dtype: tl.constexpr):
    """(silu(g) rounded, silu(g) * u rounded, sigmoid(g)), from fp32 g and u: torch's two ops
    under autocast."""
    sig = 1.0 / (1.0 + tl.exp(-g))
    sg = (g * sig).to(dtype)
    return sg, (sg.to(tl.float32) * u).to(dtype), sig


@triton.jit
def _activation(g_ptr, u_ptr, h_ptr, row, kk, m_ok, WIDTH, dtype: tl.constexpr):
    """h = silu(g) * u on a tile (rows `row`, columns kk), stored and returned."""
    ok = m_ok[:, None] & (kk < WIDTH)[None, :]
    g = tl.load(g_ptr + row + kk[None, :], mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row + kk[None, :], mask=ok, other=0.0).to(tl.float32)
    _, h, _ = _silu_mul(g, u, dtype)
    tl.store(h_ptr + row + kk[None, :], h, mask=ok)
    return h


@triton.jit
def _fwd(g_ptr, u_ptr, h_ptr, a_ptr, z_ptr, rank_ptr, keys_ptr, thr_ptr, kscale_ptr, M, T, WIDTH, ROWS, a_s0, a_s1,
         R, DROPOUT: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """h = silu(g) * u on this program's BM positions, and z = drop(h) A^T where the slot targets
    the module."""
    slot = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    m_ok = m < M
    rk = tl.arange(0, BR)
    r = tl.load(rank_ptr + slot)
    dtype = h_ptr.dtype.element_ty
    row = slot * M * WIDTH + m[:, None] * WIDTH
    if r > 0:
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, WIDTH, BK):
            kk = k0 + tl.arange(0, BK)
            h = _activation(g_ptr, u_ptr, h_ptr, row, kk, m_ok, WIDTH, dtype)
            x = h
            if DROPOUT:
                x = masked(h, slot, m, kk, M, T, WIDTH, ROWS, keys_ptr, thr_ptr, kscale_ptr).to(dtype)
            a = tl.load(a_ptr + slot * a_s0 + rk[None, :] * a_s1 + kk[:, None],
                        mask=(rk < r)[None, :] & (kk < WIDTH)[:, None], other=0.0)
            acc += tl.dot(x, a, input_precision=PREC)
        tl.store(z_ptr + slot * M * R + m[:, None] * R + rk[None, :], acc.to(dtype),
                 mask=m_ok[:, None] & (rk < R)[None, :])
    else:
        for k0 in range(0, WIDTH, BK):
            _activation(g_ptr, u_ptr, h_ptr, row, k0 + tl.arange(0, BK), m_ok, WIDTH, dtype)


@triton.jit
def _grads(g, u, sg, sig, dh, dg_ptr, du_ptr, at, ok, dtype: tl.constexpr):
    """g's and u's gradients from h's (torch's: the product's, then the SiLU's), stored."""
    dsg = (dh.to(tl.float32) * u).to(dtype)
    tl.store(du_ptr + at, (dh.to(tl.float32) * sg.to(tl.float32)).to(dtype), mask=ok)
    tl.store(dg_ptr + at, (dsg.to(tl.float32) * (sig * (1.0 + g * (1.0 - sig)))).to(dtype), mask=ok)


@triton.jit
def _bwd(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, dz_ptr, ga_ptr, part_ptr, rank_ptr, keys_ptr, thr_ptr, kscale_ptr,
         M, T, WIDTH, ROWS, R, PARTS: tl.constexpr, DROPOUT: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
         BK: tl.constexpr, PREC: tl.constexpr):
    """This program's BK columns of the MLP over the group's positions (every PARTS-th tile from
    its part): g's and u's gradients from h's (`dh`, the delta's input gradient already added),
    and where the slot trains, A's gradient dz^T drop(h) (an fp32 partial sum with PARTS > 1)."""
    slot = tl.program_id(0).to(tl.int64)
    kk = tl.program_id(1) * BK + tl.arange(0, BK)
    part = tl.program_id(2)
    k_ok = kk < WIDTH
    rk = tl.arange(0, BR)
    r = tl.load(rank_ptr + slot)
    dtype = dg_ptr.dtype.element_ty
    if r > 0:
        ga = tl.zeros((BR, BK), dtype=tl.float32)
        for m0 in range(part * BM, M, PARTS * BM):
            m = m0 + tl.arange(0, BM)
            m_ok = m < M
            ok = m_ok[:, None] & k_ok[None, :]
            at = slot * M * WIDTH + m[:, None] * WIDTH + kk[None, :]
            g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + at, mask=ok, other=0.0).to(tl.float32)
            sg, h, sig = _silu_mul(g, u, dtype)
            dz = tl.load(dz_ptr + slot * M * BR + m[:, None] * BR + rk[None, :], mask=m_ok[:, None],
                         other=0.0).to(dtype)
            x = h
            if DROPOUT:
                x = masked(h, slot, m, kk, M, T, WIDTH, ROWS, keys_ptr, thr_ptr, kscale_ptr).to(dtype)
            ga += tl.dot(tl.trans(dz), x, input_precision=PREC)
            _grads(g, u, sg, sig, tl.load(dh_ptr + at, mask=ok, other=0.0), dg_ptr, du_ptr, at, ok, dtype)
        if PARTS == 1:
            tl.store(ga_ptr + slot * R * WIDTH + rk[:, None] * WIDTH + kk[None, :], ga.to(dtype),
                     mask=(rk < r)[:, None] & k_ok[None, :])
        else:
            tl.store(part_ptr + ((slot * PARTS + part) * BR + rk[:, None]) * WIDTH + kk[None, :], ga,
                     mask=(rk < r)[:, None] & k_ok[None, :])
    else:
        for m0 in range(part * BM, M, PARTS * BM):
            m = m0 + tl.arange(0, BM)
            ok = (m < M)[:, None] & k_ok[None, :]
            at = slot * M * WIDTH + m[:, None] * WIDTH + kk[None, :]
            g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + at, mask=ok, other=0.0).to(tl.float32)
            sg, _, sig = _silu_mul(g, u, dtype)
            _grads(g, u, sg, sig, tl.load(dh_ptr + at, mask=ok, other=0.0), dg_ptr, du_ptr, at, ok, dtype)


# --- the custom op --------------------------------------------------------------------------------


def _args(x: torch.Tensor, keys, thr, kscale) -> tuple:
    dropout = keys is not None
    return (keys, thr, kscale) if dropout else (x, x, x)


@torch.library.custom_op("lora_exp::swiglu_lora_linear", mutates_args=(),
                         schema="(Tensor g, Tensor u, Tensor w, Tensor? bias, Tensor a, Tensor b, Tensor scale, "
                                "Tensor rank, Tensor? keys, Tensor? thr, Tensor? kscale, int rows, int split) "
                                "-> (Tensor, Tensor)")
def _swiglu_linear(g, u, w, bias, a, b, scale, rank, keys, thr, kscale, rows, split):
    g, u = g.contiguous(), u.contiguous()
    k, m, width = g.shape
    fout, rmax = b.shape[2], a.shape[1]
    assert a.stride(2) == 1 and b.stride(2) == 1, "A and B: dense rows"
    h = torch.empty_like(g)
    z = torch.empty(k, m, rmax, device=g.device, dtype=g.dtype)  # read back only where a slot trains
    br, prec = lora.block_r(rmax), lora.precision(g.dtype)
    _fwd[(k, triton.cdiv(m, BM))](g, u, h, a, z, rank, *_args(g, keys, thr, kscale), m, m // rows, width, rows,
                                  a.stride(0), a.stride(1), rmax, DROPOUT=keys is not None, BM=BM, BR=br, BK=BK,
                                  PREC=prec, num_warps=NUM_WARPS)
    if lora.in_gemm(h, w, a):  # the product with (z B) * scale in its epilogue (kernels.lora_gemm)
        out = lora_gemm.gemm_lora(h.view(k * m, width), w, False, bias, z.view(k * m, rmax), b, scale, rank, m)
        return out.view(k, m, fout), z
    out = lora.base_linear(h.view(k * m, width), w, bias, False).view(k, m, fout)
    del h
    lora.delta_forward(g, a, b, scale, rank, None, None, None, rows, split, out, True, h=z)  # + (z B) * scale
    return out, z


@_swiglu_linear.register_fake
def _swiglu_linear_fake(g, u, w, bias, a, b, scale, rank, keys, thr, kscale, rows, split):
    k, m, _ = g.shape
    return g.new_empty(k, m, b.shape[2]), g.new_empty(k, m, a.shape[1])


@torch.library.custom_op("lora_exp::swiglu_lora_linear_backward", mutates_args=(),
                         schema="(Tensor dout, Tensor g, Tensor u, Tensor w, Tensor a, Tensor b, Tensor z, "
                                "Tensor scale, Tensor rank, Tensor? keys, Tensor? thr, Tensor? kscale, int rows, "
                                "int split) -> (Tensor, Tensor, Tensor, Tensor)")
def _swiglu_linear_backward(dout, g, u, w, a, b, z, scale, rank, keys, thr, kscale, rows, split):
    """(g's gradient, u's, A's, B's)."""
    g, u = g.contiguous(), u.contiguous()
    dout = dout.to(g.dtype).contiguous()
    k, m, width = g.shape
    fout, rmax = b.shape[2], a.shape[1]
    split = max(split, lora.MIN_SPLIT)
    br, prec = lora.block_r(rmax), lora.precision(g.dtype)
    programs = lora.PROGRAMS_PER_SM * lora.sm_count(g.device)
    bm = min(lora.BM, lora.block_m(m))
    dz, gb = lora_tiled.backward_b(dout, b, z, scale, rank, split, bm=bm, bn=lora.BN, br=br, prec=prec,
                                   programs=programs, launch=lora.launch_options())
    if lora.in_gemm(dout, w, a):  # dout W + (dz A) * mask in one kernel (kernels.lora_gemm)
        dropout = (keys, thr, kscale) if keys is not None else None
        dh = lora_gemm.gemm_lora(dout.view(k * m, fout), w, True, None, dz.view(k * m, br), a, None, rank, m,
                                 dropout, rows).view(k, m, width)
    else:
        dh = torch.mm(dout.view(k * m, fout), w).view(k, m, width)  # the base layer's input gradient
        # the delta's input gradient added to it in place (kernels.lora's kernel: a product in the
        # pass below as well made it twice as slow, H200)
        lora_tiled.input_grad(a, dz.view(k, 1, m, br), 1, dh, rank, keys, thr, kscale, rows, True, bm=bm, br=br,
                              bk=lora.BK, prec=prec, launch=lora.launch_options())
    du = torch.empty_like(g)
    tiles = triton.cdiv(m, BM)
    blocks, parts = lora_tiled.parts_for(k, width, BK, tiles, split, programs)
    ga, partial = lora_tiled.grad_buffers(k, rmax, width, parts, br, a)
    # g's gradient overwrites h's (each program reads its tile before it writes it)
    _bwd[(k, blocks, parts)](g, u, dh, dh, du, dz, ga, partial, rank, *_args(g, keys, thr, kscale), m, m // rows,
                             width, rows, rmax, PARTS=parts, DROPOUT=keys is not None, BM=BM, BR=br, BK=BK,
                             PREC=prec, num_warps=NUM_WARPS)
    lora_tiled.sum_parts(ga, partial, parts, rank)
    return dh, du, ga, gb


@_swiglu_linear_backward.register_fake
def _swiglu_linear_backward_fake(dout, g, u, w, a, b, z, scale, rank, keys, thr, kscale, rows, split):
    k, m, width = g.shape
    return (g.new_empty(k, m, width), g.new_empty(k, m, width), a.new_empty(k, a.shape[1], width),
            b.new_empty(k, b.shape[1], b.shape[2]))


def _setup(ctx, inputs, output):
    g, u, w, bias, a, b, scale, rank, keys, thr, kscale, rows, split = inputs
    ctx.save_for_backward(g, u, w, a, b, output[1], scale, rank, keys, thr, kscale)
    ctx.rows, ctx.split = rows, split
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, _dz):
    g, u, w, a, b, z, scale, rank, keys, thr, kscale = ctx.saved_tensors
    dg, du, ga, gb = _swiglu_linear_backward(dout, g, u, w, a, b, z, scale, rank, keys, thr, kscale, ctx.rows,
                                             ctx.split)
    return (dg, du, None, None, ga, gb) + (None,) * 7  # the frozen base gets no gradient


_swiglu_linear.register_autograd(_backward, setup_context=_setup)


def swiglu_lora_linear(g: torch.Tensor, u: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                       b: torch.Tensor, scale: torch.Tensor, rank: torch.Tensor,
                       dropout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, rows: int,
                       split: int) -> torch.Tensor:
    """down(silu(g) * u) for g, u [K, M, width] (the gate's and up projection's outputs) in the
    compute dtype, where down is the frozen linear layer (`w` [out, width], `bias`) plus each
    slot's LoRA delta (A [K, R, width], B [K, R, out], `scale`, `rank`, `dropout` as
    `kernels.lora.lora_linear` takes them)."""
    keys, thr, kscale = dropout if dropout is not None else (None, None, None)
    return _swiglu_linear(g, u, w, bias, a, b, scale, rank, keys, thr, kscale, rows, split)[0]
