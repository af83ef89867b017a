"""The counter hash of `lora_exp.core.randomness` (lowbias32) in Triton, bit for bit, so the
kernels draw the same dropout masks as a trial trained alone."""
from __future__ import annotations

import triton
import triton.language as tl  # noqa: F401 - Triton looks it up in a jit function's module


@triton.jit
def mix32(h):
    """lowbias32 on uint32 values (wrapping products, logical shifts)."""
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)
