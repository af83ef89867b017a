"""The 32-bit integer hash every draw of a trial's randomness is keyed by (lowbias32, Chris
Wellons'), on plain Python ints: what `randomness.mix32` computes on tensors, for the places that
hash one number and should not import torch for it (the sampling and tracking processes reseed
Optuna's sampler per trial with it)."""
from __future__ import annotations

M32 = 0xFFFFFFFF
#: the golden-ratio multiplier that spreads a key over the counter space
GOLDEN = 0x9E3779B1


def mix_int(x: int) -> int:
    """lowbias32 of the low 32 bits of `x`."""
    h = x & M32
    h ^= h >> 16
    h = (h * 0x7FEB352D) & M32
    h ^= h >> 15
    h = (h * 0x846CA68B) & M32
    return h ^ (h >> 16)
