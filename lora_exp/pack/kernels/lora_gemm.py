"""The frozen base layer's product with each slot's LoRA delta added in its epilogue, one Triton
kernel (`kernels.lora.lora_linear`'s long row groups in bf16/fp16 on CUDA, with `lora.GEMM`):

    forward         y  = x W^T (+ bias) + round(round(h B) * scale)   h = drop(x) A^T, made first
    input gradient  dx = g W + round(dh A) * mask                     dh = g_s B^T, made first

so the output is written once, where cuBLAS's product and then the LoRA kernel (which reads it
back, adds the delta and writes it again) cost a pass over it more. The additions are rounded as
the LoRA kernels round them (the delta in the compute dtype, added in fp32 to the rounded
product). A persistent grid of programs takes the output tiles in turn, grouped `GROUP_M` row
tiles at a time; inputs through tensor descriptors (TMA on Hopper). A row tile lies within one
slot (a slot's positions a multiple of `BM`), so its epilogue reads one slot's h and B.
`bench/lora_gemm.py` times it against the two-kernel way at Qwen2.5-0.5B's shapes.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from lora_exp.pack.kernels.hash import masked
from lora_exp.pack.settings import KERNEL_TUNABLES

#: output tiles, the product's step, warps and pipelining stages (the best of bench/lora_gemm.py's
#: on an H100 at Qwen2.5-0.5B's shapes), and the row tiles grouped for L2 reuse
BM, BN, BK, NUM_WARPS, NUM_STAGES, GROUP_M = 128, 256, 64, 8, 3, 8
#: the narrowest weight it takes: past it, cuBLAS then the LoRA kernel's in-place add
MIN_WIDTH = 256
#: set by `pack.kernel_constants=lora_gemm.NAME=VALUE` and the benches (read at each launch)
TUNABLE = KERNEL_TUNABLES["lora_gemm"]


@triton.jit
def _gemm_lora(x_desc, w_desc, y_desc, bias_ptr, h_ptr, b_ptr, scale_ptr, rank_ptr, keys_ptr, thr_ptr, kscale_ptr,
               M, N, K, SLOT_M, T, ROWS, H_S, b_s0, b_s1,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
               PROGRAMS: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, W_T: tl.constexpr,
               DROPOUT: tl.constexpr):
    """y = x W^T (+ bias) (W_T: x W, W [K, N]) plus each slot's round(h B) (SCALE: times the
    slot's scale, rounded; DROPOUT: times the input gradient's dropout multipliers) added in
    fp32 and rounded, over the tiles this program takes in turn. h [M, >=BR] (H_S apart) is
    read in the compute dtype (the backward's fp32 dh is rounded to it, as lora_tiled rounds it)."""
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    dtype = y_desc.dtype
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, PROGRAMS):
        first_m = (tile // per_group) * GROUP_M
        size_m = min(tiles_m - first_m, GROUP_M)
        om = (first_m + (tile % per_group) % size_m) * BM
        on = ((tile % per_group) // size_m) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            if W_T:
                acc = tl.dot(x_desc.load([om, k0]), w_desc.load([k0, on]), acc)
            else:
                acc = tl.dot(x_desc.load([om, k0]), w_desc.load([on, k0]).T, acc)
        n = on + tl.arange(0, BN)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)
        y = acc.to(dtype)
        slot = (om // SLOT_M).to(tl.int64)
        r = tl.load(rank_ptr + slot)
        if r > 0:
            m = om + tl.arange(0, BM)
            rk = tl.arange(0, BR)
            h = tl.load(h_ptr + m[:, None].to(tl.int64) * H_S + rk[None, :],
                        mask=(m < M)[:, None] & (rk < r)[None, :], other=0.0).to(dtype)
            b = tl.load(b_ptr + slot * b_s0 + rk[:, None] * b_s1 + n[None, :],
                        mask=(rk < r)[:, None] & (n < N)[None, :], other=0.0)
            d = tl.dot(h, b).to(dtype)
            if SCALE:
                d = (d * tl.load(scale_ptr + slot).to(dtype)).to(dtype)
            if DROPOUT:
                d = masked(d, slot, m - slot * SLOT_M, n, SLOT_M, T, N, ROWS, keys_ptr, thr_ptr,
                           kscale_ptr).to(dtype)
            y = (y.to(tl.float32) + d.to(tl.float32)).to(dtype)
        y_desc.store([om, on], y)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def fits(x: torch.Tensor, w: torch.Tensor, slot_m: int) -> bool:
    """Whether this kernel runs the product: CUDA (or Triton's interpreter), bf16/fp16, a slot's
    positions a multiple of BM, rows the tensor descriptors can address (16-byte aligned), and
    both of W's sides at least MIN_WIDTH (k's and v's 128-wide forward ran ~40% slower fused)."""
    return ((x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype and slot_m % BM == 0
            and all(s % 8 == 0 for s in (*x.shape[-1:], *w.shape)) and min(w.shape) >= MIN_WIDTH)


def gemm_lora(x: torch.Tensor, w: torch.Tensor, w_t: bool, bias: torch.Tensor | None, h: torch.Tensor,
              b: torch.Tensor, scale: torch.Tensor | None, rank: torch.Tensor, slot_m: int,
              dropout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, rows: int = 1) -> torch.Tensor:
    """x [M, K] W^T (w [N, K]; `w_t`: x w, w [K, N]) (+ bias) + each slot's h [M, R'] b[slot]
    [R, N] (times `scale`, or the input gradient's `dropout` multipliers), slots of `slot_m`
    rows, `rank` [slots] each slot's r (0: no delta)."""
    m, k = x.shape
    n = w.shape[1] if w_t else w.shape[0]
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    bn = min(BN, max(16, triton.next_power_of_2(n)))
    programs = min(_sm_count(x.device), triton.cdiv(m, BM) * triton.cdiv(n, bn))
    xd = TensorDescriptor.from_tensor(x, [BM, BK])
    wd = TensorDescriptor.from_tensor(w, [BK, bn] if w_t else [bn, BK])
    yd = TensorDescriptor.from_tensor(y, [BM, bn])
    keys, thr, kscale = dropout if dropout is not None else (x, x, x)
    _gemm_lora[(programs,)](xd, wd, yd, bias if bias is not None else x, h, b, scale if scale is not None else x,
                            rank, keys, thr, kscale, m, n, k, slot_m, slot_m // rows, rows, h.stride(0),
                            b.stride(0), b.stride(1), BM=BM, BN=bn, BK=BK,
                            BR=max(16, triton.next_power_of_2(b.shape[1])),
                            GROUP_M=GROUP_M, PROGRAMS=programs, HAS_BIAS=bias is not None, SCALE=scale is not None,
                            W_T=w_t, DROPOUT=dropout is not None, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return y
