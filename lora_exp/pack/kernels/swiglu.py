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

from lora_exp.pack.kernels import lora, lora_tiled
from lora_exp.pack.kernels.hash import masked

#: positions x MLP columns a program's tile covers, and its warps (16 x 128, 4 warps: the fastest of
#: 8 settings timed at Qwen2.5-0.5B's shapes, `bench/lora_kernel_times.py --swiglu`)
BM, BK, NUM_WARPS = 16, 128, 4
#: the constants here, which the benches set to time other values
TUNABLE = ("BM", "BK", "NUM_WARPS")


@triton.jit
def _silu_mul(g, u, dtype: tl.constexpr):
    """(silu(g) rounded, silu(g) * u rounded, sigmoid(g)), from fp32 g and u: torch's two ops
    under autocast."""
    sig = 1.0 / (1.0 + tl.exp(-g))
    sg = (g * sig).to(dtype)
    return sg, (sg.to(tl.float32) * u).to(dtype), sig


@triton.jit
def _plus_delta(y, z, b, s, dtype: tl.constexpr, PREC: tl.constexpr):
    """A base output's tile y (fp32, from the compute dtype) plus its LoRA delta (z B) * s, z
    [BM, BR] and B's tile [BR, BK] masked to the slot's rank: rounded as kernels.lora's forward
    rounds the delta and its in-place add."""
    d = (tl.dot(z, b, input_precision=PREC).to(dtype) * s).to(dtype)
    return (y + d.to(tl.float32)).to(dtype).to(tl.float32)


@triton.jit
def _z_tile(z_ptr, slot, m, m_ok, rk, r, M, R):
    """A slot's h = drop(x) A^T [BM, BR] on positions m (kernels.lora.project's), zero past its rank."""
    return tl.load(z_ptr + slot * M * R + m[:, None] * R + rk[None, :], mask=m_ok[:, None] & (rk < r)[None, :],
                   other=0.0)


@triton.jit
def _b_tile(b_ptr, slot, b_s0, b_s1, rk, r, kk, WIDTH):
    return tl.load(b_ptr + slot * b_s0 + rk[:, None] * b_s1 + kk[None, :],
                   mask=(rk < r)[:, None] & (kk < WIDTH)[None, :], other=0.0)


@triton.jit
def _gate_up(g_ptr, u_ptr, at, ok, zg, zu, bg_ptr, bu_ptr, sg, su, rg, ru, slot, b_s0, b_s1, rk, kk, WIDTH,
             GATE_UP: tl.constexpr, dtype: tl.constexpr, PREC: tl.constexpr):
    """The gate's and up projection's outputs on a tile (fp32), with their LoRA deltas where
    GATE_UP (g and u are then the base layers' outputs alone)."""
    g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + at, mask=ok, other=0.0).to(tl.float32)
    if GATE_UP:
        g = _plus_delta(g, zg, _b_tile(bg_ptr, slot, b_s0, b_s1, rk, rg, kk, WIDTH), sg, dtype, PREC)
        u = _plus_delta(u, zu, _b_tile(bu_ptr, slot, b_s0, b_s1, rk, ru, kk, WIDTH), su, dtype, PREC)
    return g, u


@triton.jit
def _fwd(g_ptr, u_ptr, h_ptr, a_ptr, z_ptr, rank_ptr, keys_ptr, thr_ptr, kscale_ptr, zg_ptr, bg_ptr, sg_ptr, rg_ptr,
         zu_ptr, bu_ptr, su_ptr, ru_ptr, b_s0, b_s1, M, T, WIDTH, ROWS, a_s0, a_s1, R, GATE_UP: tl.constexpr,
         DROPOUT: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """h = silu(g) * u on this program's BM positions (with GATE_UP, g and u plus their LoRA
    deltas from zg, zu and B), and z = drop(h) A^T where the slot targets the module."""
    slot = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1) * BM + tl.arange(0, BM)
    m_ok = m < M
    rk = tl.arange(0, BR)
    r = tl.load(rank_ptr + slot)
    dtype = h_ptr.dtype.element_ty
    row = slot * M * WIDTH + m[:, None] * WIDTH
    zg, zu, sg, su, rg, ru = 0, 0, 0, 0, 0, 0
    if GATE_UP:
        rg, ru = tl.load(rg_ptr + slot), tl.load(ru_ptr + slot)
        sg, su = tl.load(sg_ptr + slot).to(dtype), tl.load(su_ptr + slot).to(dtype)
        zg, zu = _z_tile(zg_ptr, slot, m, m_ok, rk, rg, M, R), _z_tile(zu_ptr, slot, m, m_ok, rk, ru, M, R)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, WIDTH, BK):
        kk = k0 + tl.arange(0, BK)
        ok = m_ok[:, None] & (kk < WIDTH)[None, :]
        g, u = _gate_up(g_ptr, u_ptr, row + kk[None, :], ok, zg, zu, bg_ptr, bu_ptr, sg, su, rg, ru, slot, b_s0,
                        b_s1, rk, kk, WIDTH, GATE_UP, dtype, PREC)
        _, h, _ = _silu_mul(g, u, dtype)
        tl.store(h_ptr + row + kk[None, :], h, mask=ok)
        if r > 0:
            x = h
            if DROPOUT:
                x = masked(h, slot, m, kk, M, T, WIDTH, ROWS, keys_ptr, thr_ptr, kscale_ptr).to(dtype)
            a = tl.load(a_ptr + slot * a_s0 + rk[None, :] * a_s1 + kk[:, None],
                        mask=(rk < r)[None, :] & (kk < WIDTH)[:, None], other=0.0)
            acc += tl.dot(x, a, input_precision=PREC)
    if r > 0:
        tl.store(z_ptr + slot * M * R + m[:, None] * R + rk[None, :], acc.to(dtype),
                 mask=m_ok[:, None] & (rk < R)[None, :])


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
def _store_grad(grad, grad_ptr, part_ptr, slot, part, r, rk, kk, k_ok, R, WIDTH, PARTS: tl.constexpr,
                BR: tl.constexpr, dtype: tl.constexpr):
    """A weight gradient's [BR, BK] block over this program's positions: the gradient itself, or
    with PARTS > 1 its fp32 partial sum (lora_tiled.sum_parts adds them)."""
    if PARTS == 1:
        tl.store(grad_ptr + slot * R * WIDTH + rk[:, None] * WIDTH + kk[None, :], grad.to(dtype),
                 mask=(rk < r)[:, None] & k_ok[None, :])
    else:
        tl.store(part_ptr + ((slot * PARTS + part) * BR + rk[:, None]) * WIDTH + kk[None, :], grad,
                 mask=(rk < r)[:, None] & k_ok[None, :])


@triton.jit
def _bwd(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, dz_ptr, ga_ptr, part_ptr, rank_ptr, keys_ptr, thr_ptr, kscale_ptr,
         zg_ptr, bg_ptr, sg_ptr, rg_ptr, gbg_ptr, pg_ptr, zu_ptr, bu_ptr, su_ptr, ru_ptr, gbu_ptr, pu_ptr, b_s0, b_s1,
         M, T, WIDTH, ROWS, R, GATE_UP: tl.constexpr, PARTS: tl.constexpr, DROPOUT: tl.constexpr, BM: tl.constexpr,
         BR: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """This program's BK columns of the MLP over the group's positions (every PARTS-th tile from
    its part): g's and u's gradients from h's (`dh`, the delta's input gradient already added);
    where the slot trains the down projection, A's gradient dz^T drop(h); with GATE_UP, where it
    trains the gate or up projection, B's gradient there, zg^T (dg * scale) (fp32 partial sums
    with PARTS > 1)."""
    slot = tl.program_id(0).to(tl.int64)
    kk = tl.program_id(1) * BK + tl.arange(0, BK)
    part = tl.program_id(2)
    k_ok = kk < WIDTH
    rk = tl.arange(0, BR)
    r = tl.load(rank_ptr + slot)
    dtype = dg_ptr.dtype.element_ty
    bg, bu, sg, su, rg, ru = 0, 0, 0, 0, 0, 0
    if GATE_UP:
        rg, ru = tl.load(rg_ptr + slot), tl.load(ru_ptr + slot)
        sg, su = tl.load(sg_ptr + slot).to(dtype), tl.load(su_ptr + slot).to(dtype)
        bg = _b_tile(bg_ptr, slot, b_s0, b_s1, rk, rg, kk, WIDTH)
        bu = _b_tile(bu_ptr, slot, b_s0, b_s1, rk, ru, kk, WIDTH)
    ga = tl.zeros((BR, BK), dtype=tl.float32)
    gbg = tl.zeros((BR, BK), dtype=tl.float32)
    gbu = tl.zeros((BR, BK), dtype=tl.float32)
    for m0 in range(part * BM, M, PARTS * BM):
        m = m0 + tl.arange(0, BM)
        m_ok = m < M
        ok = m_ok[:, None] & k_ok[None, :]
        at = slot * M * WIDTH + m[:, None] * WIDTH + kk[None, :]
        g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + at, mask=ok, other=0.0).to(tl.float32)
        zg, zu = 0, 0
        if GATE_UP:
            zg, zu = _z_tile(zg_ptr, slot, m, m_ok, rk, rg, M, R), _z_tile(zu_ptr, slot, m, m_ok, rk, ru, M, R)
            g, u = _plus_delta(g, zg, bg, sg, dtype, PREC), _plus_delta(u, zu, bu, su, dtype, PREC)
        sgl, h, sig = _silu_mul(g, u, dtype)
        if r > 0:
            dz = tl.load(dz_ptr + slot * M * BR + m[:, None] * BR + rk[None, :], mask=m_ok[:, None],
                         other=0.0).to(dtype)
            x = h
            if DROPOUT:
                x = masked(h, slot, m, kk, M, T, WIDTH, ROWS, keys_ptr, thr_ptr, kscale_ptr).to(dtype)
            ga += tl.dot(tl.trans(dz), x, input_precision=PREC)
        dg, du = _grads(g, u, sgl, sig, tl.load(dh_ptr + at, mask=ok, other=0.0), dg_ptr, du_ptr, at, ok, dtype)
        if GATE_UP:
            gbg += tl.dot(tl.trans(zg), (dg * sg).to(dtype), input_precision=PREC)
            gbu += tl.dot(tl.trans(zu), (du * su).to(dtype), input_precision=PREC)
    if r > 0:
        _store_grad(ga, ga_ptr, part_ptr, slot, part, r, rk, kk, k_ok, R, WIDTH, PARTS, BR, dtype)
    if GATE_UP:
        if rg > 0:
            _store_grad(gbg, gbg_ptr, pg_ptr, slot, part, rg, rk, kk, k_ok, R, WIDTH, PARTS, BR, dtype)
        if ru > 0:
            _store_grad(gbu, gbu_ptr, pu_ptr, slot, part, ru, rk, kk, k_ok, R, WIDTH, PARTS, BR, dtype)


# --- the custom op --------------------------------------------------------------------------------


def _args(x: torch.Tensor, keys, thr, kscale) -> tuple:
    dropout = keys is not None
    return (keys, thr, kscale) if dropout else (x, x, x)


def _gate_up_args(g: torch.Tensor, b: torch.Tensor, gate_up: tuple | None) -> tuple:
    """The gate's and up projection's LoRA arguments of the kernels (zg, B_g, scale_g, rank_g,
    then up's, then B's strides), or placeholders without them."""
    if gate_up is None:
        return (g,) * 8 + (0, 0)
    zg, bg, sg, rg, zu, bu, su, ru = gate_up
    assert bg.stride() == bu.stride() and bg.stride(2) == 1, "B of gate and up: one dense layout"
    return zg, bg, sg, rg, zu, bu, su, ru, bg.stride(0), bg.stride(1)


def _down_forward(g, u, w, bias, a, b, scale, rank, keys, thr, kscale, rows, split, gate_up=None):
    """(down(silu(g) * u) with down's LoRA delta, z = drop(h) A^T); with `gate_up`, g and u
    are the base layers' outputs and their LoRA deltas are added in the same pass."""
    g, u = g.contiguous(), u.contiguous()
    k, m, width = g.shape
    fout, rmax = b.shape[2], a.shape[1]
    assert a.stride(2) == 1 and b.stride(2) == 1, "A and B: dense rows"
    h = torch.empty_like(g)
    z = torch.empty(k, m, rmax, device=g.device, dtype=g.dtype)  # read back only where a slot trains
    br, prec = lora.block_r(rmax), lora.precision(g.dtype)
    _fwd[(k, triton.cdiv(m, BM))](g, u, h, a, z, rank, *_args(g, keys, thr, kscale), *_gate_up_args(g, b, gate_up),
                                  m, m // rows, width, rows, a.stride(0), a.stride(1), rmax,
                                  GATE_UP=gate_up is not None, DROPOUT=keys is not None, BM=BM, BR=br, BK=BK,
                                  PREC=prec, num_warps=NUM_WARPS)
    out = lora.base_linear(h.view(k * m, width), w, bias, False).view(k, m, fout)
    del h
    lora.delta_forward(g, a, b, scale, rank, None, None, None, rows, split, out, True, h=z)  # + (z B) * scale
    return out, z


def _down_backward(dout, g, u, w, a, b, z, scale, rank, keys, thr, kscale, rows, split, gate_up=None):
    """(g's gradient, u's, A's, B's) of `_down_forward`, and with `gate_up` B's gradients of the
    gate and up projections too (else None)."""
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
    dh = torch.mm(dout.view(k * m, fout), w).view(k, m, width)  # the base layer's input gradient
    # the delta's input gradient added to it in place (kernels.lora's kernel: a product in the
    # pass below as well made it twice as slow, H200)
    lora_tiled.input_grad(a, dz.view(k, 1, m, br), 1, dh, rank, keys, thr, kscale, rows, True, bm=bm, br=br,
                          bk=lora.BK, prec=prec, launch=lora.launch_options())
    du = torch.empty_like(g)
    tiles = triton.cdiv(m, BM)
    blocks, parts = lora_tiled.parts_for(k, width, BK, tiles, split, programs)
    ga, partial = lora_tiled.grad_buffers(k, rmax, width, parts, br, a)
    gbg = gbu = None
    grads = (g, g, g, g)
    if gate_up is not None:
        gbg, pg = lora_tiled.grad_buffers(k, rmax, width, parts, br, gate_up[1])
        gbu, pu = lora_tiled.grad_buffers(k, rmax, width, parts, br, gate_up[5])
        grads = (gbg, pg, gbu, pu)
    zg, bg, sg, rg, zu, bu, su, ru, b_s0, b_s1 = _gate_up_args(g, b, gate_up)
    # g's gradient overwrites h's (each program reads its tile before it writes it)
    _bwd[(k, blocks, parts)](g, u, dh, dh, du, dz, ga, partial, rank, *_args(g, keys, thr, kscale),
                             zg, bg, sg, rg, grads[0], grads[1], zu, bu, su, ru, grads[2], grads[3], b_s0, b_s1,
                             m, m // rows, width, rows, rmax, GATE_UP=gate_up is not None, PARTS=parts,
                             DROPOUT=keys is not None, BM=BM, BR=br, BK=BK, PREC=prec, num_warps=NUM_WARPS)
    lora_tiled.sum_parts(ga, partial, parts)
    if gate_up is not None:
        lora_tiled.sum_parts(gbg, grads[1], parts)
        lora_tiled.sum_parts(gbu, grads[3], parts)
    return dh, du, ga, gb, gbg, gbu


@torch.library.custom_op("lora_exp::swiglu_lora_linear", mutates_args=(),
                         schema="(Tensor g, Tensor u, Tensor w, Tensor? bias, Tensor a, Tensor b, Tensor scale, "
                                "Tensor rank, Tensor? keys, Tensor? thr, Tensor? kscale, int rows, int split) "
                                "-> (Tensor, Tensor)")
def _swiglu_linear(g, u, w, bias, a, b, scale, rank, keys, thr, kscale, rows, split):
    return _down_forward(g, u, w, bias, a, b, scale, rank, keys, thr, kscale, rows, split)


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
    return _down_backward(dout, g, u, w, a, b, z, scale, rank, keys, thr, kscale, rows, split)[:4]


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


# --- the whole MLP: the gate's and up projection's LoRA deltas in the activation's pass too ------


@torch.library.custom_op(
    "lora_exp::swiglu_mlp_lora", mutates_args=(),
    schema="(Tensor x, Tensor wg, Tensor? bias_g, Tensor wu, Tensor? bias_u, Tensor wd, Tensor? bias_d, Tensor ag, "
           "Tensor bg, Tensor scale_g, Tensor rank_g, Tensor? keys_g, Tensor au, Tensor bu, Tensor scale_u, "
           "Tensor rank_u, Tensor? keys_u, Tensor ad, Tensor bd, Tensor scale_d, Tensor rank_d, Tensor? keys_d, "
           "Tensor? thr, Tensor? kscale, int rows, int split) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _mlp(x, wg, bias_g, wu, bias_u, wd, bias_d, ag, bg, scale_g, rank_g, keys_g, au, bu, scale_u, rank_u, keys_u,
         ad, bd, scale_d, rank_d, keys_d, thr, kscale, rows, split):
    """(out, g0, u0, zg, zu, zd): g0 and u0 the gate's and up projection's base outputs, z* each
    module's drop(input) A^T, kept for the backward."""
    x = x.contiguous()
    k, m, fin = x.shape
    flat = x.view(k * m, fin)
    g0 = lora.base_linear(flat, wg, bias_g, False).view(k, m, -1)
    u0 = lora.base_linear(flat, wu, bias_u, False).view(k, m, -1)
    zg = lora.project(x, ag, rank_g, keys_g, thr, kscale, rows)
    zu = lora.project(x, au, rank_u, keys_u, thr, kscale, rows)
    out, zd = _down_forward(g0, u0, wd, bias_d, ad, bd, scale_d, rank_d, keys_d, thr, kscale, rows, split,
                            gate_up=(zg, bg, scale_g, rank_g, zu, bu, scale_u, rank_u))
    return out, g0, u0, zg, zu, zd


@_mlp.register_fake
def _mlp_fake(x, wg, bias_g, wu, bias_u, wd, bias_d, ag, bg, scale_g, rank_g, keys_g, au, bu, scale_u, rank_u, keys_u,
              ad, bd, scale_d, rank_d, keys_d, thr, kscale, rows, split):
    k, m, _ = x.shape
    width, rmax = wg.shape[0], ag.shape[1]
    return (x.new_empty(k, m, wd.shape[0]), x.new_empty(k, m, width), x.new_empty(k, m, width),
            x.new_empty(k, m, rmax), x.new_empty(k, m, rmax), x.new_empty(k, m, rmax))


@torch.library.custom_op(
    "lora_exp::swiglu_mlp_lora_backward", mutates_args=(),
    schema="(Tensor dout, Tensor x, Tensor g0, Tensor u0, Tensor wg, Tensor wu, Tensor wd, Tensor ag, Tensor bg, "
           "Tensor scale_g, Tensor rank_g, Tensor? keys_g, Tensor au, Tensor bu, Tensor scale_u, Tensor rank_u, "
           "Tensor? keys_u, Tensor ad, Tensor bd, Tensor scale_d, Tensor rank_d, Tensor? keys_d, Tensor zg, "
           "Tensor zu, Tensor zd, Tensor? thr, Tensor? kscale, int rows, int split) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def _mlp_backward(dout, x, g0, u0, wg, wu, wd, ag, bg, scale_g, rank_g, keys_g, au, bu, scale_u, rank_u, keys_u,
                  ad, bd, scale_d, rank_d, keys_d, zg, zu, zd, thr, kscale, rows, split):
    """(x's gradient, A's and B's of the gate, of the up projection, of the down projection).
    x's is the gate's (its base layer's input gradient, its delta's added in place) plus the up
    projection's, as autograd sums the two modules' in the unfused MLP."""
    x = x.contiguous()
    k, m, fin = x.shape
    width = g0.shape[2]
    dg, du, ga_d, gb_d, gb_g, gb_u = _down_backward(dout, g0, u0, wd, ad, bd, zd, scale_d, rank_d, keys_d, thr,
                                                    kscale, rows, split,
                                                    gate_up=(zg, bg, scale_g, rank_g, zu, bu, scale_u, rank_u))
    rmax = ag.shape[1]
    tiled = dict(bm=min(lora.BM, lora.block_m(m)), bk=lora.BK, bn=lora.BN, br=lora.block_r(rmax),
                 prec=lora.precision(x.dtype), programs=lora.PROGRAMS_PER_SM * lora.sm_count(x.device),
                 launch=lora.launch_options())
    split = max(split, lora.MIN_SPLIT)
    grads = []
    dxs = []
    for d, w, a, b, z, scale, rank, keys, gb in ((dg, wg, ag, bg, zg, scale_g, rank_g, keys_g, gb_g),
                                                   (du, wu, au, bu, zu, scale_u, rank_u, keys_u, gb_u)):
        dx = torch.mm(d.view(k * m, width), w).view(k, m, fin)  # the base layer's input gradient
        ga, _ = lora_tiled.backward(d, x, a, b, z, scale, rank, keys, thr, kscale, rows, split, dx, True, gb=gb,
                                    **tiled)
        grads += [ga, gb]
        dxs.append(dx)
    return (dxs[0].add_(dxs[1]), *grads, ga_d, gb_d)


@_mlp_backward.register_fake
def _mlp_backward_fake(dout, x, g0, u0, wg, wu, wd, ag, bg, scale_g, rank_g, keys_g, au, bu, scale_u, rank_u,
                       keys_u, ad, bd, scale_d, rank_d, keys_d, zg, zu, zd, thr, kscale, rows, split):
    return (torch.empty_like(x), torch.empty_like(ag), torch.empty_like(bg), torch.empty_like(au),
            torch.empty_like(bu), torch.empty_like(ad), torch.empty_like(bd))


def _setup_mlp(ctx, inputs, output):
    (x, wg, bias_g, wu, bias_u, wd, bias_d, ag, bg, scale_g, rank_g, keys_g, au, bu, scale_u, rank_u, keys_u,
     ad, bd, scale_d, rank_d, keys_d, thr, kscale, rows, split) = inputs
    _, g0, u0, zg, zu, zd = output
    ctx.save_for_backward(x, g0, u0, wg, wu, wd, ag, bg, scale_g, rank_g, keys_g, au, bu, scale_u, rank_u, keys_u,
                          ad, bd, scale_d, rank_d, keys_d, zg, zu, zd, thr, kscale)
    ctx.rows, ctx.split = rows, split
    ctx.mark_non_differentiable(*output[1:])


def _backward_mlp(ctx, dout, *_aux):
    (x, g0, u0, wg, wu, wd, ag, bg, scale_g, rank_g, keys_g, au, bu, scale_u, rank_u, keys_u, ad, bd, scale_d,
     rank_d, keys_d, zg, zu, zd, thr, kscale) = ctx.saved_tensors
    dx, ga_g, gb_g, ga_u, gb_u, ga_d, gb_d = _mlp_backward(
        dout, x, g0, u0, wg, wu, wd, ag, bg, scale_g, rank_g, keys_g, au, bu, scale_u, rank_u, keys_u, ad, bd,
        scale_d, rank_d, keys_d, zg, zu, zd, thr, kscale, ctx.rows, ctx.split)
    # the frozen base layers, scales, ranks and dropout keys get no gradient
    return ((dx if ctx.needs_input_grad[0] else None,) + (None,) * 6 + (ga_g, gb_g, None, None, None, ga_u, gb_u)
            + (None,) * 3 + (ga_d, gb_d) + (None,) * 7)


_mlp.register_autograd(_backward_mlp, setup_context=_setup_mlp)


def swiglu_mlp_lora(x: torch.Tensor, layers: tuple, dropout: tuple | None, rows: int, split: int) -> torch.Tensor:
    """A SwiGLU MLP, down(silu(gate(x)) * up(x)), for x [K, M, in] in the compute dtype, where each
    of the three is a frozen linear layer plus each slot's LoRA delta: `layers` is (gate, up,
    down), each (w, bias, A, B, scale, rank) as `kernels.lora.lora_linear` takes them; `dropout`
    is (gate's keys, up's, down's, thresholds, scales) or None. The gate's and up projection's
    deltas are added in the activation's pass (not in place to their outputs), and B's gradients
    of both are summed there."""
    (wg, bias_g, ag, bg, sg, rg), (wu, bias_u, au, bu, su, ru), (wd, bias_d, ad, bd, sd, rd) = layers
    keys_g, keys_u, keys_d, thr, kscale = dropout if dropout is not None else (None,) * 5
    return _mlp(x, wg, bias_g, wu, bias_u, wd, bias_d, ag, bg, sg, rg, keys_g, au, bu, su, ru, keys_u, ad, bd, sd, rd,
                keys_d, thr, kscale, rows, split)[0]
