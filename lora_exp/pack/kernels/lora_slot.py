"""The LoRA kernels' programs of one slot (`kernels.lora` launches them): the delta's forward,
one program per slot's group of positions (short rows) or per BM of them (long rows), and the
backward of short groups, B's gradient with dh's parts, then A's gradient from dh's parts summed
in a fixed order. What they compute and how they round is `kernels.lora`'s docstring."""
from __future__ import annotations

import triton
import triton.language as tl

from lora_exp.pack.kernels.hash import masked


@triton.jit
def delta_kernel(x_ptr, a_ptr, b_ptr, out_ptr, h_ptr, scale_ptr, rank_ptr, keys_ptr, thr_ptr, kscale_ptr,
                M, T, IN, OUT, ROWS, x_s0, a_s0, a_s1, b_s0, b_s1, R,
                SPLIT: tl.constexpr, DROPOUT: tl.constexpr, ADD: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
                BK: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, GIVEN_H: tl.constexpr = False):
    """The delta of this program's positions (and its share of the outputs); with ADD, added in
    place to the base layer's output in `out` (rounded as torch rounds y + delta), which is left
    as it is where the slot does not target the module. With GIVEN_H, h = drop(x) A^T is read
    from `h` (made by another kernel: kernels.swiglu) and x and A are not read."""
    slot = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    r = tl.load(rank_ptr + slot)
    m = tl.program_id(2) * BM + tl.arange(0, BM)  # this program's positions (all of them, short rows)
    rk = tl.arange(0, BR)
    n = tl.arange(0, BN)
    m_ok = m < M
    dtype = out_ptr.dtype.element_ty
    if r > 0:
        if GIVEN_H:
            h = tl.load(h_ptr + slot * M * R + m[:, None] * R + rk[None, :],
                        mask=m_ok[:, None] & (rk < r)[None, :], other=0.0)
        else:
            acc = tl.zeros((BM, BR), dtype=tl.float32)
            for k0 in range(0, IN, BK):
                kk = k0 + tl.arange(0, BK)
                k_ok = kk < IN
                x = tl.load(x_ptr + slot * x_s0 + m[:, None] * IN + kk[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                if DROPOUT:
                    x = masked(x, slot, m, kk, M, T, IN, ROWS, keys_ptr, thr_ptr, kscale_ptr)
                a = tl.load(a_ptr + slot * a_s0 + rk[None, :] * a_s1 + kk[:, None],
                            mask=(rk < r)[None, :] & k_ok[:, None], other=0.0)
                acc += tl.dot(x.to(dtype), a, input_precision=PREC)
            h = acc.to(dtype)
            if part == 0:
                tl.store(h_ptr + slot * M * R + m[:, None] * R + rk[None, :], h,
                         mask=m_ok[:, None] & (rk < R)[None, :])
        s = tl.load(scale_ptr + slot).to(dtype)
        for j in range(part * BN, OUT, SPLIT * BN):
            nn = j + n
            b = tl.load(b_ptr + slot * b_s0 + rk[:, None] * b_s1 + nn[None, :],
                        mask=(rk < r)[:, None] & (nn < OUT)[None, :], other=0.0)
            d = (tl.dot(h, b, input_precision=PREC).to(dtype) * s).to(dtype)
            at = slot * M * OUT + m[:, None] * OUT + nn[None, :]
            ok = m_ok[:, None] & (nn < OUT)[None, :]
            if ADD:
                d = (tl.load(out_ptr + at, mask=ok, other=0.0).to(tl.float32) + d.to(tl.float32)).to(dtype)
            tl.store(out_ptr + at, d, mask=ok)
    elif not ADD:  # the slot does not target this module: its delta is zero
        zero = tl.zeros((BM, BN), dtype=dtype)
        for j in range(part * BN, OUT, SPLIT * BN):
            nn = j + n
            tl.store(out_ptr + slot * M * OUT + m[:, None] * OUT + nn[None, :], zero,
                     mask=m_ok[:, None] & (nn < OUT)[None, :])


@triton.jit
def grad_b_kernel(g_ptr, b_ptr, h_ptr, gb_ptr, dh_ptr, scale_ptr, rank_ptr, M, OUT, b_s0, b_s1, R,
                  SPLIT: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """B's gradient (h^T g_s) over this program's share of the outputs, and its part of dh."""
    slot = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    r = tl.load(rank_ptr + slot)
    if r > 0:
        m = tl.arange(0, BM)
        rk = tl.arange(0, BR)
        n = tl.arange(0, BN)
        m_ok = m < M
        dtype = gb_ptr.dtype.element_ty
        h = tl.load(h_ptr + slot * M * R + m[:, None] * R + rk[None, :], mask=m_ok[:, None] & (rk < R)[None, :],
                    other=0.0)
        s = tl.load(scale_ptr + slot).to(dtype)
        dh = tl.zeros((BM, BR), dtype=tl.float32)
        for j in range(part * BN, OUT, SPLIT * BN):
            nn = j + n
            n_ok = nn < OUT
            g = tl.load(g_ptr + slot * M * OUT + m[:, None] * OUT + nn[None, :], mask=m_ok[:, None] & n_ok[None, :],
                        other=0.0)
            gs = (g.to(dtype) * s).to(dtype)
            b = tl.load(b_ptr + slot * b_s0 + rk[:, None] * b_s1 + nn[None, :],
                        mask=(rk < r)[:, None] & n_ok[None, :], other=0.0)
            dh += tl.dot(gs, tl.trans(b), input_precision=PREC)
            gb = tl.dot(tl.trans(h), gs, input_precision=PREC)
            tl.store(gb_ptr + slot * R * OUT + rk[:, None] * OUT + nn[None, :], gb.to(dtype),
                     mask=(rk < r)[:, None] & n_ok[None, :])
        tl.store(dh_ptr + (slot * SPLIT + part) * BM * BR + m[:, None] * BR + rk[None, :], dh)


@triton.jit
def grad_a_kernel(x_ptr, dh_ptr, ga_ptr, rank_ptr, keys_ptr, thr_ptr, kscale_ptr, M, T, IN, ROWS, x_s0, R,
                  SPLIT: tl.constexpr, DROPOUT: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                  PREC: tl.constexpr):
    """A's gradient (dh^T drop(x)) over this program's share of the inputs; dh is the sum of the
    other kernel's parts, in a fixed order."""
    slot = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    r = tl.load(rank_ptr + slot)
    if r > 0:
        m = tl.arange(0, BM)
        rk = tl.arange(0, BR)
        m_ok = m < M
        dtype = ga_ptr.dtype.element_ty
        dh = tl.zeros((BM, BR), dtype=tl.float32)
        for p in range(SPLIT):
            dh += tl.load(dh_ptr + (slot * SPLIT + p) * BM * BR + m[:, None] * BR + rk[None, :])
        dh = dh.to(dtype)
        for k0 in range(part * BK, IN, SPLIT * BK):
            kk = k0 + tl.arange(0, BK)
            k_ok = kk < IN
            x = tl.load(x_ptr + slot * x_s0 + m[:, None] * IN + kk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if DROPOUT:
                x = masked(x, slot, m, kk, M, T, IN, ROWS, keys_ptr, thr_ptr, kscale_ptr)
            ga = tl.dot(tl.trans(dh), x.to(dtype), input_precision=PREC)
            tl.store(ga_ptr + slot * R * IN + rk[:, None] * IN + kk[None, :], ga.to(dtype),
                     mask=(rk < r)[:, None] & k_ok[None, :])


# --- the custom op --------------------------------------------------------------------------------
