"""The packed optimizer step on CUDA: two Triton kernels per LoRA tensor that touch only what
each slot trains.

A pack stores every slot padded to the largest rank and to every module any trial may target;
in the seed's search about a third of that is live. The padding is exactly zero and stays zero
(its gradients are zero: a zero row of A gives zero B gradients and vice versa, and scale 0 gives
zero gradients to an untargeted module), so an optimizer that skips it computes the same update.
A is stored rank-major ([K, R, in]) and B as [K, R, out], so a slot's live part of each tensor is
one prefix: r * in (or r * out) elements, 0 where the slot does not target the module.

`sq_norms` gives each slot's gradient norm (clip_grad_norm_ over the slot's parameters) and
`adamw` applies torch.optim.AdamW's update (its formula and order of operations) to the fp32
master weights and moments, and writes the bf16 compute copy the forward reads when the pack
trains in bf16. No gradient is copied: autograd's fresh gradient tensors are read in place,
whatever their layout (A's comes out of the backward as a transposed view, [K, in, R] in memory).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: elements a program updates, and its warps (the bench's `engine --kernel-configs` times others)
BLOCK = 4096
NUM_WARPS = 4


@triton.jit
def _grad_at(slot, offs, g_s0, g_s1, g_s2, width, DENSE: tl.constexpr):
    """Where element `offs` of a slot's [R, width] gradient is (rank-major order, as the
    parameters are stored): the slot's row itself when dense, else through the strides."""
    if DENSE:
        return slot * g_s0 + offs
    return slot * g_s0 + (offs // width) * g_s1 + (offs % width) * g_s2


@triton.jit
def _sq_norm_kernel(g_ptr, live_ptr, out_ptr, g_s0, g_s1, g_s2, width, out_stride, out_offset,
                    DENSE: tl.constexpr, BLOCK: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)  # slot * stride passes 2^31 in a large pack
    blk = tl.program_id(1)
    live = tl.load(live_ptr + slot)
    start = blk * BLOCK
    if start < live:
        offs = start + tl.arange(0, BLOCK)
        at = _grad_at(slot, offs, g_s0, g_s1, g_s2, width, DENSE)
        g = tl.load(g_ptr + at, mask=offs < live, other=0.0).to(tl.float32)
        tl.store(out_ptr + slot * out_stride + out_offset + blk, tl.sum(g * g, axis=0))


@triton.jit
def _adamw_kernel(p_ptr, m_ptr, v_ptr, low_ptr, g_ptr, live_ptr, coef_ptr, decay_ptr, step_size_ptr, bc2_ptr,
                  p_stride, low_stride, g_s0, g_s1, g_s2, width, b1, b2, eps, HAS_LOW: tl.constexpr,
                  DENSE: tl.constexpr, BLOCK: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)  # slot * stride passes 2^31 in a large pack (K=1024: 2.4e9)
    blk = tl.program_id(1)
    live = tl.load(live_ptr + slot)
    start = blk * BLOCK
    if start < live:
        offs = start + tl.arange(0, BLOCK)
        mask = offs < live
        at = slot * p_stride + offs
        g = tl.load(g_ptr + _grad_at(slot, offs, g_s0, g_s1, g_s2, width, DENSE), mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + at, mask=mask, other=0.0)
        m = tl.load(m_ptr + at, mask=mask, other=0.0)
        v = tl.load(v_ptr + at, mask=mask, other=0.0)
        g = g * tl.load(coef_ptr + slot)
        p = p * tl.load(decay_ptr + slot)
        m = m + (1.0 - b1) * (g - m)  # lerp_(g, 1 - b1), weight < 0.5
        v = v * b2 + (1.0 - b2) * g * g
        denom = tl.sqrt(v) / tl.load(bc2_ptr + slot) + eps
        p = p - (m * tl.load(step_size_ptr + slot)) / denom
        tl.store(p_ptr + at, p, mask=mask)
        tl.store(m_ptr + at, m, mask=mask)
        tl.store(v_ptr + at, v, mask=mask)
        if HAS_LOW:
            tl.store(low_ptr + slot * low_stride + offs, p.to(tl.bfloat16), mask=mask)


def _blocks(width: int) -> int:
    return triton.cdiv(width, BLOCK)


def _grad_layout(g: torch.Tensor) -> tuple[int, int, int, int, bool]:
    """A [K, R, width] gradient's strides, width, and whether each slot's part is one dense row."""
    s0, s1, s2 = g.stride()
    width = g.shape[2]
    return s0, s1, s2, width, s2 == 1 and (s1 == width or g.shape[1] == 1)


def sq_norms(grads: list[torch.Tensor], live: torch.Tensor, k: int) -> torch.Tensor:
    """Each slot's squared gradient norm [K] over `grads` (one [K, R, width] tensor per LoRA
    tensor, any strides; `live[i, slot]` = elements of slot's prefix in tensor i that it trains)."""
    widths = [g[0].numel() for g in grads]
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + _blocks(w))
    partial = torch.zeros(k, offsets[-1], device=live.device, dtype=torch.float32)
    for i, (g, w) in enumerate(zip(grads, widths)):
        s0, s1, s2, width, dense = _grad_layout(g)
        _sq_norm_kernel[(k, _blocks(w))](g, live[i], partial, s0, s1, s2, width, partial.stride(0), offsets[i],
                                         DENSE=dense, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return partial.sum(dim=1)


def adamw(masters: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
          lows: list[torch.Tensor] | None, grads: list[torch.Tensor], live: torch.Tensor, coef: torch.Tensor,
          decay: torch.Tensor, step_size: torch.Tensor, bc2_sqrt: torch.Tensor, b1: float, b2: float, eps: float) -> None:
    """AdamW on each slot's live prefix of each tensor; per-slot [K] coef, decay, step size and
    bias correction as `packed.adamw_` takes them."""
    for i, (p, g) in enumerate(zip(masters, grads)):
        low = lows[i] if lows is not None else p
        s0, s1, s2, width, dense = _grad_layout(g)
        _adamw_kernel[(p.shape[0], _blocks(p[0].numel()))](
            p, exp_avgs[i], exp_avg_sqs[i], low, g, live[i], coef, decay, step_size, bc2_sqrt,
            p.stride(0), low.stride(0), s0, s1, s2, width, b1, b2, eps, HAS_LOW=lows is not None, DENSE=dense,
            BLOCK=BLOCK, num_warps=NUM_WARPS)
