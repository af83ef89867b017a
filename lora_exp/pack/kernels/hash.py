"""The counter hash of `lora_exp.core.randomness` (lowbias32) in Triton, bit for bit, so the
kernels draw the same dropout masks as a trial trained alone, and the LoRA kernels' masks built
on it."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mix32(h):
    """lowbias32 on uint32 values (wrapping products, logical shifts)."""
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


@triton.jit
def dropout_keep(slot, m, kk, M, T, IN, ROWS, keys_ptr, thr_ptr, kscale_ptr):
    """core.randomness.dropout_mask for a block of a slot's row group (positions m, columns kk),
    its rows slot * ROWS + m // T of the batch: element (t, i) of batch row n is kept when
    hash(key[n], t * IN + i) >= thr[n]; (kept [BM, BK], the rows' scales [BM]). Positions past
    the group's M (the block's padding) are dropped."""
    m_ok = m < M
    row = slot * ROWS + m // T
    key = tl.load(keys_ptr + row, mask=m_ok, other=0).to(tl.uint32)
    thr = tl.load(thr_ptr + row, mask=m_ok, other=0).to(tl.uint32)  # p < 1: below 2**32
    kscale = tl.load(kscale_ptr + row, mask=m_ok, other=0.0)
    idx = ((m % T) * IN)[:, None] + kk[None, :]
    h = mix32(key[:, None] * 0x9E3779B1 + idx.to(tl.uint32))
    return (h >= thr[:, None]) & m_ok[:, None], kscale  # an unsigned 32-bit comparison


@triton.jit
def apply_keep(x, keep, kscale):
    """x times the mask's multipliers (fp32)."""
    return tl.where(keep, x.to(tl.float32) * kscale[:, None], 0.0)


@triton.jit
def masked(x, slot, m, kk, M, T, IN, ROWS, keys_ptr, thr_ptr, kscale_ptr):
    """x times core.randomness.dropout_mask's multipliers on the block (`dropout_keep`), fp32."""
    keep, kscale = dropout_keep(slot, m, kk, M, T, IN, ROWS, keys_ptr, thr_ptr, kscale_ptr)
    return apply_keep(x, keep, kscale)
