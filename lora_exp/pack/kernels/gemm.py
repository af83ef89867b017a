"""The frozen base layer's product with the LoRA delta in its epilogue (bf16/fp16 only).

`kernels.lora`'s `lora_linear` runs the base layer's product through cuBLAS and then adds the
delta in place: a second pass that reads and writes the whole output. Here the delta is one more
small product in the base product's epilogue, on the tile the accumulator already holds:

    forward   y = x W^T (+ bias) ;  y += (h B_slot) * scale     h = drop(x) A^T, made beforehand
    backward  dx = g W ;  dx += mask * (dh A_slot)              dh = g_s B^T, made beforehand

A tile of BM positions lies within one slot (BM divides a slot's positions), so its B (or A) is
that slot's; a slot that does not target the module adds nothing. The roundings are
`kernels.lora`'s: the base product rounded to the compute dtype, the delta rounded, their sum in
fp32 rounded once.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lora_exp.pack.kernels.hash import masked

#: tile sizes, warps and pipelining stages of the product
BM, BN, BK, NUM_WARPS, NUM_STAGES, GROUP_M = 128, 128, 64, 8, 3, 8


@triton.jit
def _tile(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row tiles share the weight's column tiles while in L2."""
    group = pid // (GROUP_M * n_n)
    first = group * GROUP_M
    size = min(n_m - first, GROUP_M)
    return first + (pid % size), (pid % (GROUP_M * n_n)) // size


@triton.jit
def _fwd(x_ptr, w_ptr, bias_ptr, out_ptr, h_ptr, b_ptr, scale_ptr, rank_ptr, MT, N, K, M, R, b_s0, b_s1,
         HAS_BIAS: tl.constexpr, LORA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
         BR: tl.constexpr, GROUP_M: tl.constexpr):
    """out [MT, N] = x [MT, K] W[N, K]^T (+ bias), plus the slot's delta (h [MT, R], B [slots, R, N])."""
    pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(MT, BM), tl.cdiv(N, BN), GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < MT
    n_ok = rn < N
    dtype = out_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :],
                    other=0.0)
        w = tl.load(w_ptr + rn.to(tl.int64)[None, :] * K + kk[:, None], mask=n_ok[None, :] & (kk < K)[:, None],
                    other=0.0)
        acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    y = acc.to(dtype)
    if LORA:
        slot = (pid_m * BM) // M
        r = tl.load(rank_ptr + slot)
        if r > 0:
            rr = tl.arange(0, BR)
            h = tl.load(h_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], mask=m_ok[:, None] & (rr < r)[None, :],
                        other=0.0)
            b = tl.load(b_ptr + slot.to(tl.int64) * b_s0 + rr[:, None] * b_s1 + rn[None, :],
                        mask=(rr < r)[:, None] & n_ok[None, :], other=0.0)
            s = tl.load(scale_ptr + slot).to(dtype)
            d = (tl.dot(h, b).to(dtype) * s).to(dtype)
            y = (y.to(tl.float32) + d.to(tl.float32)).to(dtype)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dx(g_ptr, w_ptr, dx_ptr, dh_ptr, a_ptr, rank_ptr, keys_ptr, thr_ptr, kscale_ptr, MT, N, K, M, T, ROWS,
        a_s0, a_s1, dh_s0, LORA: tl.constexpr, DROPOUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr):
    """dx [MT, N] = g [MT, K] W [K, N] (the base layer's input gradient: N its inputs, K its
    outputs), plus the slot's delta input gradient (dh A), masked by the slot's dropout."""
    pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(MT, BM), tl.cdiv(N, BN), GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < MT
    n_ok = rn < N
    dtype = dx_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        g = tl.load(g_ptr + rm.to(tl.int64)[:, None] * K + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :],
                    other=0.0)
        w = tl.load(w_ptr + kk.to(tl.int64)[:, None] * N + rn[None, :], mask=(kk < K)[:, None] & n_ok[None, :],
                    other=0.0)
        acc += tl.dot(g, w)
    y = acc.to(dtype)
    if LORA:
        slot = (pid_m * BM) // M
        r = tl.load(rank_ptr + slot)
        if r > 0:
            m = rm - slot * M  # positions within the slot's group
            rr = tl.arange(0, BR)
            dh = tl.load(dh_ptr + slot.to(tl.int64) * dh_s0 + m[:, None] * BR + rr[None, :], mask=m_ok[:, None],
                         other=0.0)
            a = tl.load(a_ptr + slot.to(tl.int64) * a_s0 + rr[:, None] * a_s1 + rn[None, :],
                        mask=(rr < r)[:, None] & n_ok[None, :], other=0.0)
            d = tl.dot(dh.to(dtype), a).to(dtype)
            if DROPOUT:
                d = masked(d, slot, m, rn, M, T, N, ROWS, keys_ptr, thr_ptr, kscale_ptr)
            y = (y.to(tl.float32) + d.to(dtype).to(tl.float32)).to(dtype)
    tl.store(dx_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


def _launch(options: dict | None) -> dict:
    o = {"BM": BM, "BN": BN, "BK": BK, "num_warps": NUM_WARPS, "num_stages": NUM_STAGES, "GROUP_M": GROUP_M}
    o.update(options or {})
    return o


def forward(x, w, bias, h, b, scale, rank, m, out, options=None):
    """out [MT, N] = x [MT, K] w [N, K]^T (+ bias) plus each slot's delta (h [MT, R] of the slots'
    groups of m positions; h None: the base layer alone)."""
    o = _launch(options)
    mt, k = x.shape
    n = w.shape[0]
    lora = h is not None
    assert not lora or m % o["BM"] == 0, "a tile must lie within one slot"
    grid = (triton.cdiv(mt, o["BM"]) * triton.cdiv(n, o["BN"]),)
    _fwd[grid](x, w, bias if bias is not None else x, out, h if lora else x, b if lora else x, scale if lora else x,
               rank if lora else x, mt, n, k, m, h.shape[-1] if lora else 1, b.stride(0) if lora else 0,
               b.stride(1) if lora else 0, HAS_BIAS=bias is not None, LORA=lora, BR=max(16, h.shape[-1]) if lora else 16,
               **o)
    return out


def input_grad(g, w, dh, a, rank, dropout, m, rows, dx, options=None):
    """dx [MT, N] = g [MT, K] w [K, N] plus each slot's masked dh A (dh [slots, m, BR] fp32; None:
    the base layer alone); `dropout` = (keys, thr, kscale) or None."""
    o = _launch(options)
    mt, k = g.shape
    n = w.shape[1]
    lora = dh is not None
    assert not lora or m % o["BM"] == 0, "a tile must lie within one slot"
    keys, thr, kscale = dropout if dropout is not None else (g, g, g)
    grid = (triton.cdiv(mt, o["BM"]) * triton.cdiv(n, o["BN"]),)
    _dx[grid](g, w, dx, dh if lora else g, a if lora else g, rank if lora else g, keys, thr, kscale, mt, n, k, m,
              m // rows, rows, a.stride(0) if lora else 0, a.stride(1) if lora else 0, dh.stride(0) if lora else 0,
              LORA=lora, DROPOUT=dropout is not None, BR=dh.shape[-1] if lora else 16, **o)
    return dx


# --- TMA (Hopper): tiles loaded by the tensor memory accelerator, one program per multiprocessor ---


@triton.jit
def _fwd_tma(x_desc, w_desc, out_desc, bias_ptr, h_ptr, b_ptr, scale_ptr, rank_ptr, MT, N, K, M, R, b_s0, b_s1,
             HAS_BIAS: tl.constexpr, LORA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             BR: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr):
    n_m, n_n = tl.cdiv(MT, BM), tl.cdiv(N, BN)
    dtype = out_desc.dtype
    for tile in tl.range(tl.program_id(0), n_m * n_n, PROGRAMS, flatten=True):
        pid_m, pid_n = _tile(tile, n_m, n_n, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            x = x_desc.load([pid_m * BM, k0])
            w = w_desc.load([pid_n * BN, k0])
            acc = tl.dot(x, w.T, acc)
        rn = pid_n * BN + tl.arange(0, BN)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        y = acc.to(dtype)
        if LORA:
            slot = (pid_m * BM) // M
            r = tl.load(rank_ptr + slot)
            if r > 0:
                rm = pid_m * BM + tl.arange(0, BM)
                rr = tl.arange(0, BR)
                h = tl.load(h_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], mask=(rr < r)[None, :], other=0.0)
                b = tl.load(b_ptr + slot.to(tl.int64) * b_s0 + rr[:, None] * b_s1 + rn[None, :],
                            mask=(rr < r)[:, None] & (rn < N)[None, :], other=0.0)
                s = tl.load(scale_ptr + slot).to(dtype)
                d = (tl.dot(h, b).to(dtype) * s).to(dtype)
                y = (y.to(tl.float32) + d.to(tl.float32)).to(dtype)
        out_desc.store([pid_m * BM, pid_n * BN], y)


@triton.jit
def _dx_tma(g_desc, w_desc, dx_desc, dh_ptr, a_ptr, rank_ptr, keys_ptr, thr_ptr, kscale_ptr, MT, N, K, M, T, ROWS,
            a_s0, a_s1, dh_s0, LORA: tl.constexpr, DROPOUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr):
    n_m, n_n = tl.cdiv(MT, BM), tl.cdiv(N, BN)
    dtype = dx_desc.dtype
    for tile in tl.range(tl.program_id(0), n_m * n_n, PROGRAMS, flatten=True):
        pid_m, pid_n = _tile(tile, n_m, n_n, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            g = g_desc.load([pid_m * BM, k0])
            w = w_desc.load([k0, pid_n * BN])
            acc = tl.dot(g, w, acc)
        y = acc.to(dtype)
        if LORA:
            slot = (pid_m * BM) // M
            r = tl.load(rank_ptr + slot)
            if r > 0:
                rn = pid_n * BN + tl.arange(0, BN)
                m = pid_m * BM - slot * M + tl.arange(0, BM)
                rr = tl.arange(0, BR)
                dh = tl.load(dh_ptr + slot.to(tl.int64) * dh_s0 + m[:, None] * BR + rr[None, :])
                a = tl.load(a_ptr + slot.to(tl.int64) * a_s0 + rr[:, None] * a_s1 + rn[None, :],
                            mask=(rr < r)[:, None] & (rn < N)[None, :], other=0.0)
                d = tl.dot(dh.to(dtype), a).to(dtype)
                if DROPOUT:
                    d = masked(d, slot, m, rn, M, T, N, ROWS, keys_ptr, thr_ptr, kscale_ptr)
                y = (y.to(tl.float32) + d.to(dtype).to(tl.float32)).to(dtype)
        dx_desc.store([pid_m * BM, pid_n * BN], y)


def _programs(device) -> int:
    from lora_exp.pack.kernels.lora import sm_count

    return sm_count(device)


def forward_tma(x, w, bias, h, b, scale, rank, m, out, options=None):
    """`forward` through TMA descriptors, persistent (Hopper and later)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    o = _launch(options)
    bm, bn, bk = o.pop("BM"), o.pop("BN"), o.pop("BK")
    mt, k = x.shape
    n = w.shape[0]
    lora = h is not None
    assert not lora or m % bm == 0, "a tile must lie within one slot"
    programs = min(_programs(x.device), triton.cdiv(mt, bm) * triton.cdiv(n, bn))
    _fwd_tma[(programs,)](TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
                          TensorDescriptor.from_tensor(out, [bm, bn]), bias if bias is not None else x,
                          h if lora else x, b if lora else x, scale if lora else x, rank if lora else x, mt, n, k, m,
                          h.shape[-1] if lora else 1, b.stride(0) if lora else 0, b.stride(1) if lora else 0,
                          HAS_BIAS=bias is not None, LORA=lora, BM=bm, BN=bn, BK=bk,
                          BR=max(16, h.shape[-1]) if lora else 16, PROGRAMS=programs, **o)
    return out


def input_grad_tma(g, w, dh, a, rank, dropout, m, rows, dx, options=None):
    """`input_grad` through TMA descriptors, persistent (Hopper and later)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    o = _launch(options)
    bm, bn, bk = o.pop("BM"), o.pop("BN"), o.pop("BK")
    mt, k = g.shape
    n = w.shape[1]
    lora = dh is not None
    assert not lora or m % bm == 0, "a tile must lie within one slot"
    keys, thr, kscale = dropout if dropout is not None else (g, g, g)
    programs = min(_programs(g.device), triton.cdiv(mt, bm) * triton.cdiv(n, bn))
    _dx_tma[(programs,)](TensorDescriptor.from_tensor(g, [bm, bk]), TensorDescriptor.from_tensor(w, [bk, bn]),
                         TensorDescriptor.from_tensor(dx, [bm, bn]), dh if lora else g, a if lora else g,
                         rank if lora else g, keys, thr, kscale, mt, n, k, m, m // rows, rows,
                         a.stride(0) if lora else 0, a.stride(1) if lora else 0, dh.stride(0) if lora else 0,
                         LORA=lora, DROPOUT=dropout is not None, BM=bm, BN=bn, BK=bk,
                         BR=dh.shape[-1] if lora else 16, PROGRAMS=programs, **o)
    return dx
