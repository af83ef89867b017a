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

from lora_exp.config import KERNEL_TUNABLES
from lora_exp.pack.kernels import lora, lora_gemm, lora_tiled
from lora_exp.pack.kernels.hash import masked

#: positions x MLP columns a program's tile covers, and its warps (16 x 128, 4 warps: the fastest of
#: 8 settings timed at Qwen2.5-0.5B's shapes, `bench/lora_kernel_times.py --swiglu`)
BM, BK, NUM_WARPS = 16, 128, 4
#: with the gate's and up's deltas (`lora.SWIGLU` 2): 1, their B gradients summed in the
#: activation's backward pass; 0, by kernels.lora_tiled from the gradients it writes
GRAD_B = 1
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
def _delta_add(x, z, b, s, dtype: tl.constexpr, PREC: tl.constexpr):
    """x + (z B) * s on a tile, rounded as kernels.lora adds a delta to its base layer's output
    in place (x fp32 of a compute-dtype value; z, B zero past the slot's rank: x comes back)."""
    d = (tl.dot(z, b, input_precision=PREC).to(dtype) * s).to(dtype)
    return (x + d.to(tl.float32)).to(dtype).to(tl.float32)


@triton.jit
def _zs(z_ptr, slot, m, m_ok, r, M, R, BR: tl.constexpr):
    """A slot's h = drop(x) A^T of a gate or up projection on positions m [BM, BR], zero past its rank."""
    rk = tl.arange(0, BR)
    return tl.load(z_ptr + slot * M * R + m[:, None] * R + rk[None, :], mask=m_ok[:, None] & (rk < r)[None, :],
                   other=0.0)


@triton.jit
def _bs(b_ptr, slot, kk, r, WIDTH, b_s0, b_s1, BR: tl.constexpr):
    """A slot's B of a gate or up projection on columns kk [BR, BK], zero past its rank."""
    rk = tl.arange(0, BR)
    return tl.load(b_ptr + slot * b_s0 + rk[:, None] * b_s1 + kk[None, :],
                   mask=(rk < r)[:, None] & (kk < WIDTH)[None, :], other=0.0)


@triton.jit
def _activation(g_ptr, u_ptr, h_ptr, row, kk, m_ok, WIDTH, dtype: tl.constexpr, slot, zg, zu, gb_ptr, ub_ptr, gr, ur,
                gs, us, gb_s0, gb_s1, ub_s0, ub_s1, DELTAS: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr):
    """h = silu(g) * u on a tile (rows `row`, columns kk), stored and returned; with DELTAS, g and
    u are the gate's and up projection's base outputs, their deltas (zg B_g) * gs and (zu B_u) * us
    added here."""
    ok = m_ok[:, None] & (kk < WIDTH)[None, :]
    g = tl.load(g_ptr + row + kk[None, :], mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row + kk[None, :], mask=ok, other=0.0).to(tl.float32)
    if DELTAS:
        g = _delta_add(g, zg, _bs(gb_ptr, slot, kk, gr, WIDTH, gb_s0, gb_s1, BR), gs, dtype, PREC)
        u = _delta_add(u, zu, _bs(ub_ptr, slot, kk, ur, WIDTH, ub_s0, ub_s1, BR), us, dtype, PREC)
    _, h, _ = _silu_mul(g, u, dtype)
    tl.store(h_ptr + row + kk[None, :], h, mask=ok)
    return h


@triton.jit
def _fwd(g_ptr, u_ptr, h_ptr, a_ptr, z_ptr, rank_ptr, keys_ptr, thr_ptr, kscale_ptr, M, T, WIDTH, ROWS, a_s0, a_s1,
         R, gz_ptr, gb_ptr, gs_ptr, gr_ptr, uz_ptr, ub_ptr, us_ptr, ur_ptr, GR, UR, gb_s0, gb_s1, ub_s0, ub_s1,
         DELTAS: tl.constexpr, DROPOUT: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
         PREC: tl.constexpr):
    """h = silu(g) * u on this program's BM positions (with DELTAS, g and u plus their slot's
    deltas), and z = drop(h) A^T where the slot targets the module."""
    slot = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    m_ok = m < M
    rk = tl.arange(0, BR)
    r = tl.load(rank_ptr + slot)
    dtype = h_ptr.dtype.element_ty
    row = slot * M * WIDTH + m[:, None] * WIDTH
    gr, ur, zg, zu, gs, us = 0, 0, 0, 0, 0, 0  # (unread without DELTAS)
    if DELTAS:  # the gate's and up's h on these positions, read once
        gr, ur = tl.load(gr_ptr + slot), tl.load(ur_ptr + slot)
        zg, zu = _zs(gz_ptr, slot, m, m_ok, gr, M, GR, BR), _zs(uz_ptr, slot, m, m_ok, ur, M, UR, BR)
        gs, us = tl.load(gs_ptr + slot).to(dtype), tl.load(us_ptr + slot).to(dtype)
    if r > 0:
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, WIDTH, BK):
            kk = k0 + tl.arange(0, BK)
            h = _activation(g_ptr, u_ptr, h_ptr, row, kk, m_ok, WIDTH, dtype, slot, zg, zu, gb_ptr, ub_ptr, gr, ur,
                            gs, us, gb_s0, gb_s1, ub_s0, ub_s1, DELTAS, BR, PREC)
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
            _activation(g_ptr, u_ptr, h_ptr, row, k0 + tl.arange(0, BK), m_ok, WIDTH, dtype, slot, zg, zu, gb_ptr,
                        ub_ptr, gr, ur, gs, us, gb_s0, gb_s1, ub_s0, ub_s1, DELTAS, BR, PREC)


@triton.jit
def _grads(g, u, sg, sig, dh, dg_ptr, du_ptr, at, ok, dtype: tl.constexpr):
    """g's and u's gradients from h's (torch's: the product's, then the SiLU's), stored and returned."""
    dsg = (dh.to(tl.float32) * u).to(dtype)
    du = (dh.to(tl.float32) * sg.to(tl.float32)).to(dtype)
    dg = (dsg.to(tl.float32) * (sig * (1.0 + g * (1.0 - sig)))).to(dtype)
    tl.store(du_ptr + at, du, mask=ok)
    tl.store(dg_ptr + at, dg, mask=ok)
    return dg, du


@triton.jit
def _store_grad(grad, grad_ptr, part_ptr, slot, part, kk, k_ok, r, WIDTH, R, PARTS: tl.constexpr, BR: tl.constexpr):
    """A weight gradient's [BR, BK] block: its first r rows, or with PARTS > 1 an fp32 partial sum."""
    rk = tl.arange(0, BR)
    if PARTS == 1:
        tl.store(grad_ptr + slot * R * WIDTH + rk[:, None] * WIDTH + kk[None, :], grad.to(grad_ptr.dtype.element_ty),
                 mask=(rk < r)[:, None] & k_ok[None, :])
    else:
        tl.store(part_ptr + ((slot * PARTS + part) * BR + rk[:, None]) * WIDTH + kk[None, :], grad,
                 mask=(rk < r)[:, None] & k_ok[None, :])


@triton.jit
def _bwd(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, dz_ptr, ga_ptr, part_ptr, rank_ptr, keys_ptr, thr_ptr, kscale_ptr,
         M, T, WIDTH, ROWS, R, gz_ptr, gb_ptr, gs_ptr, gr_ptr, uz_ptr, ub_ptr, us_ptr, ur_ptr, ggb_ptr, gpart_ptr,
         ugb_ptr, upart_ptr, GR, UR, gb_s0, gb_s1, ub_s0, ub_s1, DELTAS: tl.constexpr, GRAD_B: tl.constexpr,
         PARTS: tl.constexpr,
         DROPOUT: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """This program's BK columns of the MLP over the group's positions (every PARTS-th tile from
    its part): g's and u's gradients from h's (`dh`, the delta's input gradient already added);
    where the slot trains, A's gradient dz^T drop(h) (an fp32 partial sum with PARTS > 1); with
    DELTAS g and u are the gate's and up's base outputs (their deltas added again here), and with
    GRAD_B their B gradients zg^T (dg * gs) and zu^T (du * us) are summed the same way."""
    slot = tl.program_id(0).to(tl.int64)
    kk = tl.program_id(1) * BK + tl.arange(0, BK)
    part = tl.program_id(2)
    k_ok = kk < WIDTH
    rk = tl.arange(0, BR)
    r = tl.load(rank_ptr + slot)
    dtype = dg_ptr.dtype.element_ty
    ga = tl.zeros((BR, BK), dtype=tl.float32)
    ggb = tl.zeros((BR, BK), dtype=tl.float32)
    ugb = tl.zeros((BR, BK), dtype=tl.float32)
    gr, ur, bg, bu, gs, us = 0, 0, 0, 0, 0, 0  # (unread without DELTAS)
    if DELTAS:  # the gate's and up's B on these columns, read once
        gr, ur = tl.load(gr_ptr + slot), tl.load(ur_ptr + slot)
        bg, bu = _bs(gb_ptr, slot, kk, gr, WIDTH, gb_s0, gb_s1, BR), _bs(ub_ptr, slot, kk, ur, WIDTH, ub_s0, ub_s1, BR)
        gs, us = tl.load(gs_ptr + slot).to(dtype), tl.load(us_ptr + slot).to(dtype)
    for m0 in range(part * BM, M, PARTS * BM):
        m = m0 + tl.arange(0, BM)
        m_ok = m < M
        ok = m_ok[:, None] & k_ok[None, :]
        at = slot * M * WIDTH + m[:, None] * WIDTH + kk[None, :]
        g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + at, mask=ok, other=0.0).to(tl.float32)
        if DELTAS:
            zg, zu = _zs(gz_ptr, slot, m, m_ok, gr, M, GR, BR), _zs(uz_ptr, slot, m, m_ok, ur, M, UR, BR)
            g = _delta_add(g, zg, bg, gs, dtype, PREC)
            u = _delta_add(u, zu, bu, us, dtype, PREC)
        sg, h, sig = _silu_mul(g, u, dtype)
        if r > 0:
            dz = tl.load(dz_ptr + slot * M * BR + m[:, None] * BR + rk[None, :], mask=m_ok[:, None],
                         other=0.0).to(dtype)
            x = h
            if DROPOUT:
                x = masked(h, slot, m, kk, M, T, WIDTH, ROWS, keys_ptr, thr_ptr, kscale_ptr).to(dtype)
            ga += tl.dot(tl.trans(dz), x, input_precision=PREC)
        dg, du = _grads(g, u, sg, sig, tl.load(dh_ptr + at, mask=ok, other=0.0), dg_ptr, du_ptr, at, ok, dtype)
        if GRAD_B:  # as kernels.lora_tiled's B gradient: the output's gradient times the scale, rounded
            ggb += tl.dot(tl.trans(zg), (dg * gs).to(dtype), input_precision=PREC)
            ugb += tl.dot(tl.trans(zu), (du * us).to(dtype), input_precision=PREC)
    if r > 0:
        _store_grad(ga, ga_ptr, part_ptr, slot, part, kk, k_ok, r, WIDTH, R, PARTS, BR)
    if GRAD_B:
        _store_grad(ggb, ggb_ptr, gpart_ptr, slot, part, kk, k_ok, gr, WIDTH, GR, PARTS, BR)
        _store_grad(ugb, ugb_ptr, upart_ptr, slot, part, kk, k_ok, ur, WIDTH, UR, PARTS, BR)


# --- the custom op --------------------------------------------------------------------------------


def _args(x: torch.Tensor, keys, thr, kscale) -> tuple:
    dropout = keys is not None
    return (keys, thr, kscale) if dropout else (x, x, x)


def _delta_args(g: torch.Tensor, gz, gb, gs, gr, uz, ub, us, ur) -> tuple:
    """The kernels' arguments for the gate's and up's deltas (`g` in their place without them)."""
    if gz is None:
        return (g,) * 8 + (0,) * 6
    assert gb.stride(2) == 1 and ub.stride(2) == 1, "B: dense rows"
    return (gz, gb, gs, gr, uz, ub, us, ur, gz.shape[2], uz.shape[2], gb.stride(0), gb.stride(1), ub.stride(0),
            ub.stride(1))


def _block_r(a: torch.Tensor, gz: torch.Tensor | None, uz: torch.Tensor | None) -> int:
    """The rank block every product of the op shares (h's gradient's rows are that wide)."""
    return lora.block_r(max([a.shape[1]] + [z.shape[2] for z in (gz, uz) if z is not None]))


_DELTAS = ("Tensor? gz=None, Tensor? gb=None, Tensor? gscale=None, Tensor? grank=None, Tensor? uz=None, "
           "Tensor? ub=None, Tensor? uscale=None, Tensor? urank=None")


@torch.library.custom_op("lora_exp::swiglu_lora_linear", mutates_args=(),
                         schema="(Tensor g, Tensor u, Tensor w, Tensor? bias, Tensor a, Tensor b, Tensor scale, "
                                "Tensor rank, Tensor? keys, Tensor? thr, Tensor? kscale, int rows, int split, "
                                + _DELTAS + ") -> (Tensor, Tensor)")
def _swiglu_linear(g, u, w, bias, a, b, scale, rank, keys, thr, kscale, rows, split, gz=None, gb=None, gscale=None,
                   grank=None, uz=None, ub=None, uscale=None, urank=None):
    g, u = g.contiguous(), u.contiguous()
    k, m, width = g.shape
    fout, rmax = b.shape[2], a.shape[1]
    assert a.stride(2) == 1 and b.stride(2) == 1, "A and B: dense rows"
    h = torch.empty_like(g)
    z = torch.empty(k, m, rmax, device=g.device, dtype=g.dtype)  # read back only where a slot trains
    br, prec = _block_r(a, gz, uz), lora.precision(g.dtype)
    _fwd[(k, triton.cdiv(m, BM))](g, u, h, a, z, rank, *_args(g, keys, thr, kscale), m, m // rows, width, rows,
                                  a.stride(0), a.stride(1), rmax, *_delta_args(g, gz, gb, gscale, grank, uz, ub, uscale,
                                                                               urank),
                                  DELTAS=gz is not None, DROPOUT=keys is not None, BM=BM, BR=br, BK=BK, PREC=prec,
                                  num_warps=NUM_WARPS)
    if lora.in_gemm(h, w, a):  # the product with (z B) * scale in its epilogue (kernels.lora_gemm)
        out = lora_gemm.gemm_lora(h.view(k * m, width), w, False, bias, z.view(k * m, rmax), b, scale, rank, m)
        return out.view(k, m, fout), z
    out = lora.base_linear(h.view(k * m, width), w, bias, False).view(k, m, fout)
    del h
    lora.delta_forward(g, a, b, scale, rank, None, None, None, rows, split, out, True, h=z)  # + (z B) * scale
    return out, z


@_swiglu_linear.register_fake
def _swiglu_linear_fake(g, u, w, bias, a, b, scale, rank, keys, thr, kscale, rows, split, gz=None, gb=None,
                        gscale=None, grank=None, uz=None, ub=None, uscale=None, urank=None):
    k, m, _ = g.shape
    return g.new_empty(k, m, b.shape[2]), g.new_empty(k, m, a.shape[1])


@torch.library.custom_op("lora_exp::swiglu_lora_linear_backward", mutates_args=(),
                         schema="(Tensor dout, Tensor g, Tensor u, Tensor w, Tensor a, Tensor b, Tensor z, "
                                "Tensor scale, Tensor rank, Tensor? keys, Tensor? thr, Tensor? kscale, int rows, "
                                "int split, " + _DELTAS + ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
                                "Tensor, Tensor)")
def _swiglu_linear_backward(dout, g, u, w, a, b, z, scale, rank, keys, thr, kscale, rows, split, gz=None, gb=None,
                            gscale=None, grank=None, uz=None, ub=None, uscale=None, urank=None):
    """(g's gradient, u's, A's, B's; with the gate's and up's deltas, their h's gradients and
    their B's; empty without)."""
    g, u = g.contiguous(), u.contiguous()
    dout = dout.to(g.dtype).contiguous()
    k, m, width = g.shape
    fout, rmax = b.shape[2], a.shape[1]
    split = max(split, lora.MIN_SPLIT)
    br, prec = _block_r(a, gz, uz), lora.precision(g.dtype)
    programs = lora.PROGRAMS_PER_SM * lora.sm_count(g.device)
    bm = min(lora.BM, lora.block_m(m))
    dz, gb_down = lora_tiled.backward_b(dout, b, z, scale, rank, split, bm=bm, bn=lora.BN, br=br, prec=prec,
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
    deltas = gz is not None
    grad_b = deltas and bool(GRAD_B)
    ggb = gpart = ugb = upart = g
    if grad_b:
        ggb, gpart = lora_tiled.grad_buffers(k, gb.shape[1], width, parts, br, gb)
        ugb, upart = lora_tiled.grad_buffers(k, ub.shape[1], width, parts, br, ub)
    # g's gradient overwrites h's (each program reads its tile before it writes it)
    _bwd[(k, blocks, parts)](g, u, dh, dh, du, dz, ga, partial, rank, *_args(g, keys, thr, kscale), m, m // rows,
                             width, rows, rmax, *_delta_args(g, gz, gb, gscale, grank, uz, ub, uscale, urank)[:8],
                             ggb, gpart, ugb, upart, *_delta_args(g, gz, gb, gscale, grank, uz, ub, uscale, urank)[8:],
                             DELTAS=deltas, GRAD_B=grad_b, PARTS=parts, DROPOUT=keys is not None, BM=BM, BR=br, BK=BK,
                             PREC=prec, num_warps=NUM_WARPS)
    lora_tiled.sum_parts(ga, partial, parts, rank)
    if not deltas:  # (outputs of their own: a custom op's may not alias one another)
        return dh, du, ga, gb_down, *(g.new_empty(0) for _ in range(4))
    launch = lora.launch_options()
    if grad_b:
        lora_tiled.sum_parts(ggb, gpart, parts, grank)
        lora_tiled.sum_parts(ugb, upart, parts, urank)
        # the gate's and up's h gradients (dg * scale) B^T, from the gradients just written
        dzg, dzu = [lora_tiled.backward_dh(d, bb, s, r, bm=bm, bn=lora.BN, br=br, prec=prec, launch=launch)
                    for d, bb, s, r in ((dh, gb, gscale, grank), (du, ub, uscale, urank))]
    else:  # both from kernels.lora_tiled, as the gate's and up's own backward makes them
        (dzg, ggb), (dzu, ugb) = [lora_tiled.backward_b(d, bb, zz, s, r, split, bm=bm, bn=lora.BN, br=br, prec=prec,
                                                        programs=programs, launch=launch)
                                  for d, bb, zz, s, r in ((dh, gb, gz, gscale, grank), (du, ub, uz, uscale, urank))]
    return dh, du, ga, gb_down, dzg[:, :, :gz.shape[2]].to(g.dtype), ggb, dzu[:, :, :uz.shape[2]].to(g.dtype), ugb


@_swiglu_linear_backward.register_fake
def _swiglu_linear_backward_fake(dout, g, u, w, a, b, z, scale, rank, keys, thr, kscale, rows, split, gz=None,
                                 gb=None, gscale=None, grank=None, uz=None, ub=None, uscale=None, urank=None):
    k, m, width = g.shape
    deltas = ([g.new_empty(0) for _ in range(4)] if gz is None
              else [t.new_empty(t.shape) for t in (gz, gb, uz, ub)])
    return (g.new_empty(k, m, width), g.new_empty(k, m, width), a.new_empty(k, a.shape[1], width),
            b.new_empty(k, b.shape[1], b.shape[2]), *deltas)


def _setup(ctx, inputs, output):
    g, u, w, bias, a, b, scale, rank, keys, thr, kscale, rows, split, *deltas = inputs
    ctx.save_for_backward(g, u, w, a, b, output[1], scale, rank, keys, thr, kscale, *deltas)
    ctx.rows, ctx.split = rows, split
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, _dz):
    g, u, w, a, b, z, scale, rank, keys, thr, kscale, *deltas = ctx.saved_tensors
    dg, du, ga, gb, dzg, ggb, dzu, ugb = _swiglu_linear_backward(dout, g, u, w, a, b, z, scale, rank, keys, thr,
                                                                 kscale, ctx.rows, ctx.split, *deltas)
    if deltas[0] is None:
        return (dg, du, None, None, ga, gb) + (None,) * 15  # the frozen base gets no gradient
    return (dg, du, None, None, ga, gb) + (None,) * 7 + (dzg, ggb, None, None, dzu, ugb, None, None)


_swiglu_linear.register_autograd(_backward, setup_context=_setup)


def swiglu_lora_linear(g: torch.Tensor, u: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                       b: torch.Tensor, scale: torch.Tensor, rank: torch.Tensor,
                       dropout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, rows: int,
                       split: int, deltas: tuple[tuple, tuple] | None = None) -> torch.Tensor:
    """down(silu(g) * u) for g, u [K, M, width] (the gate's and up projection's outputs) in the
    compute dtype, where down is the frozen linear layer (`w` [out, width], `bias`) plus each
    slot's LoRA delta (A [K, R, width], B [K, R, out], `scale`, `rank`, `dropout` as
    `kernels.lora.lora_linear` takes them). With `deltas`, g and u are the gate's and up's base
    layers' outputs and `deltas` their LoRA's B sides, ((h, B, scale, rank) of the gate, of up),
    h from `kernels.lora.lora_linear_a`: each slot's (h B) * scale is added to g and u here, where
    the activation reads them, and not written back (the backward adds it again)."""
    keys, thr, kscale = dropout if dropout is not None else (None, None, None)
    flat = [t for part in deltas for t in part] if deltas is not None else []
    return _swiglu_linear(g, u, w, bias, a, b, scale, rank, keys, thr, kscale, rows, split, *flat)[0]
