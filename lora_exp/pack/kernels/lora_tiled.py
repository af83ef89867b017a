"""The LoRA kernels' backward for long row groups (`kernels.lora`: more than MAX_M positions a
slot, rows up to 1024 tokens, batch > 1): dh one program per BM positions, then B's gradient per
block of outputs and A's per block of inputs, each walking the group's tiles in order, and the
input's gradient one program per tile (`input_grad`, which the short kernels use too). Where
slots x blocks are too few programs for the GPU, a block's tiles are split in parts whose fp32
partial sums are added in a fixed order (no atomics: the same result run to run). The roundings
are those of the short kernels' backward."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_exp.pack.kernels.hash import masked


@triton.jit
def _bwd_dh_tiled(g_ptr, b_ptr, dh_ptr, scale_ptr, rank_ptr, M, OUT, b_s0, b_s1, R,
                  BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Long rows: dh = g_s B^T for this program's BM positions (fp32, summed over every output)."""
    slot = tl.program_id(0).to(tl.int64)
    r = tl.load(rank_ptr + slot)
    if r > 0:
        m = tl.program_id(1) * BM + tl.arange(0, BM)
        rk = tl.arange(0, BR)
        n = tl.arange(0, BN)
        m_ok = m < M
        dtype = b_ptr.dtype.element_ty
        s = tl.load(scale_ptr + slot).to(dtype)
        dh = tl.zeros((BM, BR), dtype=tl.float32)
        for j in range(0, OUT, BN):
            nn = j + n
            n_ok = nn < OUT
            g = tl.load(g_ptr + slot * M * OUT + m[:, None] * OUT + nn[None, :], mask=m_ok[:, None] & n_ok[None, :],
                        other=0.0)
            gs = (g.to(dtype) * s).to(dtype)
            b = tl.load(b_ptr + slot * b_s0 + rk[:, None] * b_s1 + nn[None, :],
                        mask=(rk < r)[:, None] & n_ok[None, :], other=0.0)
            dh += tl.dot(gs, tl.trans(b), input_precision=PREC)
        tl.store(dh_ptr + slot * M * BR + m[:, None] * BR + rk[None, :], dh, mask=m_ok[:, None])


@triton.jit
def _bwd_b_tiled(g_ptr, h_ptr, gb_ptr, part_ptr, scale_ptr, rank_ptr, M, OUT, R,
                 PARTS: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Long rows: B's gradient h^T g_s for this program's BN outputs, over the group's positions
    (with PARTS > 1, over every PARTS-th tile from this program's part: an fp32 partial sum)."""
    slot = tl.program_id(0).to(tl.int64)
    part = tl.program_id(2)
    r = tl.load(rank_ptr + slot)
    if r > 0:
        nn = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = nn < OUT
        rk = tl.arange(0, BR)
        dtype = gb_ptr.dtype.element_ty
        s = tl.load(scale_ptr + slot).to(dtype)
        gb = tl.zeros((BR, BN), dtype=tl.float32)
        for m0 in range(part * BM, M, PARTS * BM):
            m = m0 + tl.arange(0, BM)
            m_ok = m < M
            h = tl.load(h_ptr + slot * M * R + m[:, None] * R + rk[None, :], mask=m_ok[:, None] & (rk < R)[None, :],
                        other=0.0)
            g = tl.load(g_ptr + slot * M * OUT + m[:, None] * OUT + nn[None, :], mask=m_ok[:, None] & n_ok[None, :],
                        other=0.0)
            gs = (g.to(dtype) * s).to(dtype)
            gb += tl.dot(tl.trans(h), gs, input_precision=PREC)
        if PARTS == 1:
            tl.store(gb_ptr + slot * R * OUT + rk[:, None] * OUT + nn[None, :], gb.to(dtype),
                     mask=(rk < r)[:, None] & n_ok[None, :])
        else:
            tl.store(part_ptr + ((slot * PARTS + part) * BR + rk[:, None]) * OUT + nn[None, :], gb,
                     mask=(rk < r)[:, None] & n_ok[None, :])


@triton.jit
def _bwd_a_tiled(x_ptr, dh_ptr, ga_ptr, part_ptr, rank_ptr, keys_ptr, thr_ptr, kscale_ptr, M, T, IN, ROWS, x_s0, R,
                 PARTS: tl.constexpr, DROPOUT: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                 PREC: tl.constexpr):
    """Long rows: A's gradient dh^T drop(x) for this program's BK inputs over the group's
    positions (a partial sum over every PARTS-th tile, as for B)."""
    slot = tl.program_id(0).to(tl.int64)
    part = tl.program_id(2)
    r = tl.load(rank_ptr + slot)
    if r > 0:
        kk = tl.program_id(1) * BK + tl.arange(0, BK)
        k_ok = kk < IN
        rk = tl.arange(0, BR)
        dtype = ga_ptr.dtype.element_ty
        ga = tl.zeros((BR, BK), dtype=tl.float32)
        for m0 in range(part * BM, M, PARTS * BM):
            m = m0 + tl.arange(0, BM)
            m_ok = m < M
            dh = tl.load(dh_ptr + slot * M * BR + m[:, None] * BR + rk[None, :], mask=m_ok[:, None],
                         other=0.0).to(dtype)
            x = tl.load(x_ptr + slot * x_s0 + m[:, None] * IN + kk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if DROPOUT:
                x = masked(x, slot, m, kk, M, T, IN, ROWS, keys_ptr, thr_ptr, kscale_ptr)
            ga += tl.dot(tl.trans(dh), x.to(dtype), input_precision=PREC)
        if PARTS == 1:
            tl.store(ga_ptr + slot * R * IN + rk[:, None] * IN + kk[None, :], ga.to(dtype),
                     mask=(rk < r)[:, None] & k_ok[None, :])
        else:
            tl.store(part_ptr + ((slot * PARTS + part) * BR + rk[:, None]) * IN + kk[None, :], ga,
                     mask=(rk < r)[:, None] & k_ok[None, :])


@triton.jit
def _bwd_dx(a_ptr, dh_ptr, dx_ptr, rank_ptr, keys_ptr, thr_ptr, kscale_ptr, M, T, IN, ROWS, a_s0, a_s1, dh_s0, dh_sp,
            DH_PARTS: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
            BK: tl.constexpr, PREC: tl.constexpr):
    """The input's gradient (dh A, masked) on this program's BM positions x BK inputs, with ACC
    added in place to the base layer's (left as it is where the slot does not target the
    module). dh is the sum of DH_PARTS fp32 parts (dh_sp apart), in a fixed order. A kernel of its
    own, not a second product in A's: there the mask's hash is computed in two layouts and the
    pair ran ~25% slower (H200, Qwen2.5-0.5B's shapes)."""
    slot = tl.program_id(0).to(tl.int64)
    r = tl.load(rank_ptr + slot)
    kk = tl.program_id(1) * BK + tl.arange(0, BK)
    m = tl.program_id(2) * BM + tl.arange(0, BM)
    k_ok = kk < IN
    m_ok = m < M
    rk = tl.arange(0, BR)
    at = slot * M * IN + m[:, None] * IN + kk[None, :]
    ok = m_ok[:, None] & k_ok[None, :]
    dtype = a_ptr.dtype.element_ty
    if r > 0:
        a = tl.load(a_ptr + slot * a_s0 + rk[:, None] * a_s1 + kk[None, :], mask=(rk < r)[:, None] & k_ok[None, :],
                    other=0.0)
        dh = tl.zeros((BM, BR), dtype=tl.float32)
        for p in range(DH_PARTS):
            dh += tl.load(dh_ptr + slot * dh_s0 + p * dh_sp + m[:, None] * BR + rk[None, :], mask=m_ok[:, None],
                          other=0.0)
        dx = tl.dot(dh.to(dtype), a, input_precision=PREC).to(dtype)
        if DROPOUT:
            dx = masked(dx, slot, m, kk, M, T, IN, ROWS, keys_ptr, thr_ptr, kscale_ptr)
        else:  # keeps Triton from folding the add below into the product's accumulator (in fp32
            # another rounding than torch's base + delta)
            dx = tl.where(ok, dx, 0.0)
        if ACC:
            dx = tl.load(dx_ptr + at, mask=ok, other=0.0).to(tl.float32) + dx.to(dtype).to(tl.float32)
        tl.store(dx_ptr + at, dx.to(dtype), mask=ok)
    elif not ACC:  # no delta, no input gradient from this module
        tl.store(dx_ptr + at, tl.zeros((BM, BK), dtype=dx_ptr.dtype.element_ty), mask=ok)


def input_grad(a, dh, dh_parts, dx, rank, keys, thr, kscale, rows, acc, *, bm, br, bk, prec, launch):
    """The delta's input gradient into `dx` [K, M, in] (added in place with `acc`), from dh
    [K, dh_parts, >=M, br] (fp32 parts) and A, a program per `bm` positions x `bk` inputs."""
    k, m, fin = dx.shape
    dropout = keys is not None
    _bwd_dx[(k, triton.cdiv(fin, bk), triton.cdiv(m, bm))](
        a, dh, dx, rank, keys if dropout else dx, thr if dropout else dx, kscale if dropout else dx, m, m // rows, fin,
        rows, a.stride(0), a.stride(1), dh.stride(0), dh.stride(1), DH_PARTS=dh_parts, DROPOUT=dropout, ACC=acc,
        BM=bm, BR=br, BK=bk, PREC=prec, **launch)


def parts_for(k: int, width: int, block: int, tiles: int, split: int, programs: int) -> tuple[int, int]:
    """(blocks, parts) of a weight gradient over `width` columns: parts > 1 where slots x blocks are
    too few programs for the GPU."""
    blocks = triton.cdiv(width, block)
    return blocks, max(1, min(split, tiles, triton.cdiv(programs, k * blocks)))


def grad_buffers(k: int, rmax: int, width: int, parts: int, br: int, like: torch.Tensor):
    grad = torch.empty(k, rmax, width, device=like.device, dtype=like.dtype)
    partial = torch.empty(k, parts, br, width, device=like.device, dtype=torch.float32) if parts > 1 else grad
    return grad, partial


@triton.jit
def _sum_parts(part_ptr, grad_ptr, rank_ptr, WIDTH, R, PARTS: tl.constexpr, BR: tl.constexpr, BLOCK: tl.constexpr):
    """A slot's weight gradient, its first r rows, from its PARTS fp32 parts added in order."""
    slot = tl.program_id(0).to(tl.int64)
    r = tl.load(rank_ptr + slot)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < r * WIDTH
    if r > 0:
        total = tl.load(part_ptr + slot * PARTS * BR * WIDTH + idx, mask=ok, other=0.0)
        for p in range(1, PARTS):
            total += tl.load(part_ptr + (slot * PARTS + p) * BR * WIDTH + idx, mask=ok, other=0.0)
        tl.store(grad_ptr + slot * R * WIDTH + idx, total.to(grad_ptr.dtype.element_ty), mask=ok)


#: elements a program of `_sum_parts` adds
SUM_BLOCK = 1024


def sum_parts(grad: torch.Tensor, partial: torch.Tensor, parts: int, rank: torch.Tensor) -> None:
    """A weight gradient [K, R, width] from its fp32 parts [K, parts, BR, width], added in a fixed
    order (deterministic), one kernel: a slot's rows past its rank are not written (never read).
    (torch's clone, adds and cast here were ~5 ms of a Qwen2.5-0.5B step's eager kernels, H100.)"""
    if parts > 1:
        k, rmax, width = grad.shape
        _sum_parts[(k, triton.cdiv(rmax * width, SUM_BLOCK))](partial, grad, rank, width, rmax, PARTS=parts,
                                                             BR=partial.shape[2], BLOCK=SUM_BLOCK)


def backward_b(g, b, h, scale, rank, split, *, bm, bn, br, prec, programs, launch):
    """The delta's B side of a long row group's backward: (dh = g_s B^T [K, M, br] fp32 per
    position tile, B's gradient h^T g_s per output block over the group's positions)."""
    k, m, fout = g.shape
    rmax = b.shape[1]
    tiles = triton.cdiv(m, bm)
    dh = torch.empty(k, m, br, device=g.device, dtype=torch.float32)
    _bwd_dh_tiled[(k, tiles)](g, b, dh, scale, rank, m, fout, b.stride(0), b.stride(1), rmax,
                              BM=bm, BR=br, BN=bn, PREC=prec, **launch)
    blocks, parts = parts_for(k, fout, bn, tiles, split, programs)
    gb, partial = grad_buffers(k, rmax, fout, parts, br, b)
    _bwd_b_tiled[(k, blocks, parts)](g, h, gb, partial, scale, rank, m, fout, rmax, PARTS=parts, BM=bm, BR=br,
                                     BN=bn, PREC=prec, **launch)
    sum_parts(gb, partial, parts, rank)
    return dh, gb


def backward(g, x, a, b, h, scale, rank, keys, thr, kscale, rows, split, dx, acc, *, bm, bk, bn, br, prec, programs,
             launch):
    """The backward of a long row group: dh per position tile, then B's gradient per output
    block and A's per input block, each over the group's positions, and the input's gradient.
    Where slots x blocks are too few programs for the GPU, each block's positions are split in
    up to `split` parts whose fp32 partial sums are added in a fixed order (deterministic).
    `dx` is the input gradient's buffer (None: not made here), added to in place with `acc`
    (`input_grad`). Returns A's and B's gradients and dh [K, M, br] (fp32)."""
    k, m, fin = x.shape
    rmax = a.shape[1]
    tiles = triton.cdiv(m, bm)
    dropout = keys is not None
    dh, gb = backward_b(g, b, h, scale, rank, split, bm=bm, bn=bn, br=br, prec=prec, programs=programs,
                        launch=launch)
    blocks, parts = parts_for(k, fin, bk, tiles, split, programs)
    ga, partial = grad_buffers(k, rmax, fin, parts, br, a)
    _bwd_a_tiled[(k, blocks, parts)](x, dh, ga, partial, rank, keys if dropout else x, thr if dropout else x,
                                     kscale if dropout else x, m, m // rows, fin, rows, x.stride(0), rmax,
                                     PARTS=parts, DROPOUT=dropout, BM=bm, BR=br, BK=bk, PREC=prec, **launch)
    if dx is not None:
        input_grad(a, dh.view(k, 1, m, br), 1, dx, rank, keys, thr, kscale, rows, acc, bm=bm, br=br, bk=bk,
                   prec=prec, launch=launch)
    sum_parts(ga, partial, parts, rank)
    return ga, gb, dh
