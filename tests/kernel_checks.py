"""Scripts that check the pack's Triton kernels against torch, run in a subprocess (the interpreter
must be chosen before triton is imported): on the CPU under TRITON_INTERPRET=1, or on a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import os
    import torch
    from lora_exp.pack.kernels import adamw as pack_kernels
    from lora_exp.pack.optimizer import adamw_

    torch.manual_seed(0)
    torch.set_default_device(os.environ["KERNELS_DEVICE"])
    k, rank = 5, 4
    widths = [7, 3, 4097, 11]                  # one tensor wider than a block
    live = torch.tensor([[r * w for r in (4, 0, 2, 1, 3)] for w in widths], dtype=torch.int32)
    cols, offset = [], 0
    for w in widths:
        cols.append(slice(offset, offset + rank * w))
        offset += rank * w
    def padded(t):                              # zero outside each slot's live prefix
        for i, c in enumerate(cols):
            for s in range(k):
                t[s, c][int(live[i, s]):] = 0
        return t
    params = padded(torch.randn(k, offset))
    m, v = padded(torch.randn(k, offset)), padded(torch.rand(k, offset))
    grads_flat = padded(torch.randn(k, offset)).to(torch.bfloat16)
    dense = [grads_flat[:, c].contiguous().view(k, rank, -1) for c in cols]
    # A's gradient comes out of the bmm's backward transposed ([K, in, R] in memory): read in place
    strided = [g.transpose(1, 2).contiguous().transpose(1, 2) if i % 2 else g for i, g in enumerate(dense)]
    assert not strided[1].is_contiguous() and strided[0].is_contiguous()
    coef, decay = torch.rand(k) + 0.5, 1 - torch.rand(k) * 1e-2
    step_size, bc2 = torch.rand(k) * 1e-2, torch.rand(k) + 0.1
    expected = [t.clone() for t in (params, m, v)]
    adamw_(*expected[:1], grads_flat.float(), *expected[1:], coef.view(-1, 1), decay.view(-1, 1),
           step_size.view(-1, 1), bc2.view(-1, 1), 0.9, 0.999, 1e-8)
    ref = grads_flat.float().pow(2).sum(dim=1)

    # one launch over the live blocks, over every tensor's blocks, and one per tensor; dense
    # gradients and strided ones; one layout for all (its device table follows the gradients' addresses)
    layout = pack_kernels.Layout(cols, params.device)
    pack_kernels.MAX_BLOCKS = 3                  # launches cut at the grid limit (here: 3 blocks)
    pack_kernels.MAX_LIST = 3
    for grouped, grads in [(2, dense), (2, strided), (1, dense), (1, strided), (0, strided), (0, dense)]:
        pack_kernels.GROUPED = grouped
        norms = pack_kernels.sq_norms(layout, grads, live, k)
        assert torch.allclose(norms, ref, rtol=1e-5), (grouped, norms, ref)

        p_, m_, v_ = params.clone(), m.clone(), v.clone()
        low = torch.full((k, offset), 7.0, dtype=torch.bfloat16)   # poisoned: live parts must be written
        pack_kernels.adamw(layout, p_, m_, v_, low, grads, live, coef, decay, step_size, bc2, 0.9, 0.999, 1e-8)
        for got, want in zip((p_, m_, v_), expected):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (grouped, (got - want).abs().max())
        # the compute copy is the master in bf16 on every live element, untouched elsewhere (the
        # interpreter rounds fp32 -> bf16 toward zero where the GPU rounds to nearest: one bf16 step)
        for i, c in enumerate(cols):
            for s in range(k):
                n = int(live[i, s])
                master = p_[s, c][:n]
                assert bool(((low[s, c][:n].float() - master).abs() <= master.abs() * 2.0 ** -7).all()), (i, s)
                assert bool((low[s, c][n:] == 7.0).all())
                assert bool((p_[s, c][n:] == 0).all())      # the padding stays zero
        if grouped == 2:  # the list of live blocks follows `live` as its version changes
            host = live.cpu().numpy()
            assert torch.allclose(pack_kernels.sq_norms(layout, grads, live, k, host, 1), ref, rtol=1e-5)
            held = live.clone()
            held[:, 2] = 0                            # slot 2 holds still (e.g. waits for an eval)
            norms = pack_kernels.sq_norms(layout, grads, held, k, held.cpu().numpy(), 2)
            assert float(norms[2]) == 0 and torch.allclose(norms[[0, 1, 3, 4]], ref[[0, 1, 3, 4]], rtol=1e-5)
            assert torch.allclose(pack_kernels.sq_norms(layout, grads, live, k, host, 3), ref, rtol=1e-5)
            # not listed (a step recorded as a CUDA graph): every padded block, the held slot's exiting
            norms = pack_kernels.sq_norms(layout, grads, held, k, held.cpu().numpy(), 4, listed=False)
            assert float(norms[2]) == 0 and torch.allclose(norms[[0, 1, 3, 4]], ref[[0, 1, 3, 4]], rtol=1e-5)
            p_ = params.clone()
            pack_kernels.adamw(layout, p_, m.clone(), v.clone(), None, grads, live, coef, decay, step_size, bc2,
                               0.9, 0.999, 1e-8, listed=False)
            assert torch.allclose(p_, expected[0], rtol=1e-5, atol=1e-7)
        p_ = params.clone()                                   # no compute copy: the masters alone
        pack_kernels.adamw(layout, p_, m.clone(), v.clone(), None, grads, live, coef, decay, step_size, bc2,
                           0.9, 0.999, 1e-8)
        assert torch.allclose(p_, expected[0], rtol=1e-5, atol=1e-7)
    print("kernels ok")
''')


LORA_SCRIPT = textwrap.dedent('''
    import os
    import torch
    from lora_exp.pack.kernels import lora as pack_lora
    from lora_exp.core.randomness import dropout_mask, module_keys, row_keys

    torch.manual_seed(0)
    torch.set_default_device(os.environ["KERNELS_DEVICE"])
    k, rows, fin, fout, R = 5, 2, 70, 90, 8     # widths not multiples of a block
    ranks = torch.tensor([8, 0, 3, 5, 1], dtype=torch.int32)   # slot 1 does not target the module
    scale = torch.tensor([0.5, 0.0, 2.0, 1.5, 4.0])
    # a short row group (one program holds it) and a long one (tiled: more than MAX_M positions, not
    # a multiple of the tile; its weight gradients in one part or summed from 3)
    groups = [(7, (1, 3), R), (pack_lora.MAX_M // 2 + 9, (1, 3), R)]
    if os.environ["KERNELS_DEVICE"] == "cuda":  # groups whose short kernels' tiles would not fit in shared
        # memory are tiled: 138 positions at rank 32 (both dtypes), 54 at rank 64 (fp32; short in bf16)
        groups[1:1] = [(pack_lora.MAX_M // 4 + 5, (1,), 32), (27, (1,), 64)]
    def near(got, want, size, ulps):   # within `ulps` roundings of `size` (the sum of the magnitudes behind `want`)
        eps = torch.finfo(got.dtype).eps
        return bool(((got.float() - want.float()).abs() <= ulps * eps * size.float() + 1e-30).all())
    def close(got, want, tol):   # a weight gradient sums over the group: its error scales with its largest entry
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
        return torch.allclose(got.float(), want.float(), rtol=tol["rtol"], atol=tol["atol"] * scale)
    for dtype, (t, splits, R) in [(getattr(torch, d), g) for d in os.environ["KERNELS_DTYPES"].split(",")
                                  for g in groups]:
        m = rows * t
        flat = torch.randn(k, R * (fin + fout) + 13, dtype=dtype) * 0.3     # A, B: views of one buffer
        a, b = flat[:, :R * fin].view(k, R, fin), flat[:, R * fin:R * (fin + fout)].view(k, R, fout)
        live = torch.arange(R).view(1, R) < ranks.view(k, 1)
        # the reference (PackedLoraLayer's bmm's) sees the pack's zero padding; the kernels get
        # random values there and must not read them
        a_ref, b_ref = [(w * live[:, :, None]).detach().clone().requires_grad_() for w in (a, b)]
        a_k, b_k = [w.detach().clone().requires_grad_() for w in (a, b)]
        x = torch.randn(k, m, fin, dtype=dtype)
        keys = module_keys(row_keys(torch.arange(k * rows) * 7 + 3, torch.full((k * rows,), 11),
                                    torch.arange(rows).repeat(k)), 12345)
        p = torch.tensor([0.1, 0.0, 0.3, 0.05, 0.2]).repeat_interleave(rows)
        g = torch.randn(k, m, fout, dtype=dtype)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
        for split in splits:
            for drop in (True, False):
                xr, xk = [x.detach().clone().requires_grad_() for _ in range(2)]
                xs = xr
                if drop:
                    xs = (xr.reshape(k * rows, -1) * dropout_mask(x.reshape(k * rows, -1), keys, p)).view_as(xr)
                ref = torch.bmm(torch.bmm(xs, a_ref.transpose(1, 2)), b_ref) * scale.to(dtype).view(-1, 1, 1)
                args = pack_lora.dropout_args(keys, p, dtype) if drop else (None,) * 3
                out, _ = torch.ops.lora_exp.lora_delta(xk, a_k, b_k, scale, ranks, *args, rows, split)
                what = (str(dtype), m, split, drop)
                assert out.dtype == dtype and torch.allclose(out.float(), ref.float(), **tol), \
                    (what, (out - ref).abs().max())
                want = torch.autograd.grad(ref, [xr, a_ref, b_ref], g)
                got = torch.autograd.grad(out, [xk, a_k, b_k], g)
                assert torch.allclose(got[0].float(), want[0].float(), **tol), (what, (got[0] - want[0]).abs().max())
                for i, (gw, ww) in enumerate(zip(got[1:], want[1:])):   # where each slot trains
                    for s in range(k):
                        r = int(ranks[s])
                        assert close(gw[s, :r], ww[s, :r], tol), (what, i, s)
                # with the frozen base layer in the same op (nn.Linear's layout for one split,
                # Conv1D's with the bias for the other): y + delta, rounded as torch rounds it, and
                # the input gradient the base layer's plus the delta's (the base layer's alone
                # where a slot does not train)
                w = torch.randn(fout, fin, dtype=dtype) * 0.2
                bias = torch.randn(fout, dtype=dtype)
                conv = split != splits[0]
                wb = (w.t().contiguous(), bias) if conv else (w, None)
                y = torch.nn.functional.linear(xk.detach(), w, wb[1])
                summed, _ = torch.ops.lora_exp.lora_linear(xk, *wb, a_k, b_k, scale, ranks, *args, rows, split, conv)
                assert summed.dtype == dtype
                # the base product's roundings depend on the CPU's kernels (a transposed weight, another
                # order of sums): against F.linear within a few roundings of its terms' magnitudes;
                # against the same product as the op's, within the one rounding of the in-place add
                size = xk.detach().abs() @ w.abs().t() + wb[1].abs() if conv else xk.detach().abs() @ w.abs().t()
                size = size + out.detach().abs()
                assert near(summed, y.float() + out.float(), size, 4), (what, conv)
                same = pack_lora.base_linear(xk.detach().reshape(-1, fin), *wb, conv).view(k, m, fout)
                assert near(summed, same.float() + out.float(), same.abs() + out.detach().abs(), 1), (what, conv)
                got_y = torch.autograd.grad(summed, [xk, a_k, b_k], g)
                size = g.abs() @ w.abs() + got[0].abs()
                assert near(got_y[0], (g @ w).float() + got[0].float(), size, 4), (what, conv)
                same = torch.mm(g.reshape(-1, fout), wb[0].t() if conv else wb[0]).view(k, m, fin)
                assert near(got_y[0], same.float() + got[0].float(), same.abs() + got[0].abs(), 1), (what, conv)
                for s in range(k):                              # A's and B's where the slot trains
                    r = int(ranks[s])
                    assert torch.equal(got_y[1][s, :r], got[1][s, :r]) and torch.equal(got_y[2][s, :r], got[2][s, :r])
                if dtype != torch.float32:  # the output's gradient in fp32 beside low-precision inputs
                    _, h = torch.ops.lora_exp.lora_delta(xk, a_k, b_k, scale, ranks, *args, rows, split)
                    dx, ga, gb = torch.ops.lora_exp.lora_delta_backward(g.float(), xk, a_k, b_k, h, scale, ranks, *args,
                                                                        rows, split, True)
                    assert dx.dtype == ga.dtype == gb.dtype == dtype
                    assert torch.allclose(dx.float(), want[0].float(), **tol), (what, "fp32 gradient")
                    for s in range(k):
                        r = int(ranks[s])
                        assert close(gb[s, :r], want[2][s, :r], tol), (what, s)
    print("lora kernels ok")
''')


GEMM_SCRIPT = textwrap.dedent('''
    # The base layer's product with each slot's delta in its epilogue (kernels.lora_gemm, lora.GEMM)
    # against the same op with cuBLAS's product and the delta added in place (GEMM=0): long row
    # groups (a multiple of its row tile), nn.Linear's and Conv1D's layouts, dropout on and off, a
    # slot that does not target the module; the output within one rounding of the product plus
    # the delta, the input gradient within one of g W plus the delta's, A's and B's gradients equal.
    import os
    import torch
    from lora_exp.pack.kernels import lora as pack_lora, lora_gemm, swiglu
    from lora_exp.core.randomness import module_keys, row_keys

    torch.manual_seed(0)
    torch.set_default_device(os.environ["KERNELS_DEVICE"])
    dtype = getattr(torch, os.environ["KERNELS_DTYPES"])
    k, rows, R = 3, 2, 16
    fin, fout = lora_gemm.MIN_WIDTH + 8, lora_gemm.MIN_WIDTH + 24   # past MIN_WIDTH, not multiples of the tiles
    t = lora_gemm.BM * 3 // 2                       # a slot's 3 row tiles; past MAX_M: the tiled kernels
    m = rows * t
    ranks = torch.tensor([8, 0, 13], dtype=torch.int32)
    scale = torch.tensor([0.5, 0.0, 2.0])
    keys = module_keys(row_keys(torch.arange(k * rows) * 7 + 3, torch.full((k * rows,), 11),
                                torch.arange(rows).repeat(k)), 12345)
    p = torch.tensor([0.1, 0.0, 0.3]).repeat_interleave(rows)
    eps = torch.finfo(dtype).eps
    def near(got, want, size, ulps):
        return bool(((got.float() - want.float()).abs() <= ulps * eps * size.float() + 1e-30).all())
    for conv in (False, True):
        for drop in (True, False):
            a = torch.randn(k, R, fin, dtype=dtype) * 0.3
            b = torch.randn(k, R, fout, dtype=dtype) * 0.3
            w = torch.randn(fout, fin, dtype=dtype) * 0.2
            bias = torch.randn(fout, dtype=dtype) if conv else None
            wb = (w.t().contiguous(), bias) if conv else (w, None)
            x = torch.randn(k, m, fin, dtype=dtype)
            g = torch.randn(k, m, fout, dtype=dtype)
            args = pack_lora.dropout_args(keys, p, dtype) if drop else (None,) * 3
            assert lora_gemm.fits(x, wb[0], m) and not pack_lora._short(m, R, x)
            outs = {}
            for gemm in (0, 1):
                pack_lora.GEMM = gemm
                xk, ak, bk = [v.clone().requires_grad_() for v in (x, a, b)]
                y, _ = torch.ops.lora_exp.lora_linear(xk, *wb, ak, bk, scale, ranks, *args, rows, 1, conv)
                outs[gemm] = (y.detach(), *torch.autograd.grad(y, [xk, ak, bk], g))
            (y0, dx0, ga0, gb0), (y1, dx1, ga1, gb1) = outs[0], outs[1]
            what = (conv, drop)
            assert y1.dtype == dx1.dtype == dtype
            # the products' sums in another order: within a rounding of the terms' magnitudes, and
            # the delta's rounding as the in-place add's (a missed rounding is off by more)
            size = (x.abs() @ w.abs().t() + (bias.abs() if conv else 0)) * 2 + y0.abs()
            assert near(y1, y0, size, 1), (what, (y1 - y0).abs().max())
            size = (g.abs() @ w.abs()) * 2 + dx0.abs()
            assert near(dx1, dx0, size, 1), (what, (dx1 - dx0).abs().max())
            assert (y1 != y0).float().mean() < 0.05 and (dx1 != dx0).float().mean() < 0.05, what
            for s in range(k):                          # A's and B's where the slot trains: the same kernels
                r = int(ranks[s])
                assert torch.equal(ga1[s, :r], ga0[s, :r]) and torch.equal(gb1[s, :r], gb0[s, :r]), (what, s)
            # a slot without the module: the base layer's product and gradient alone
            base = pack_lora.base_linear(x[1], *wb, conv)
            assert near(y1[1], base, x[1].abs() @ w.abs().t() * 2, 1), what
    # a SwiGLU MLP's down projection (kernels.swiglu): its product and its input gradient (the
    # gradient of h = silu(g) * u, before g's and u's) the same way, with dropout (the epilogue
    # without it is the one checked above)
    for drop in (True,):
        width = fin
        a = torch.randn(k, R, width, dtype=dtype) * 0.3
        b = torch.randn(k, R, fout, dtype=dtype) * 0.3
        w, bias = torch.randn(fout, width, dtype=dtype) * 0.1, torch.randn(fout, dtype=dtype)
        g0, u0 = torch.randn(k, m, width, dtype=dtype), torch.randn(k, m, width, dtype=dtype)
        go = torch.randn(k, m, fout, dtype=dtype)
        args = pack_lora.dropout_args(keys, p, dtype) if drop else None
        outs = {}
        for gemm in (0, 1):
            pack_lora.GEMM = gemm
            gk, uk, ak, bk = [v.clone().requires_grad_() for v in (g0, u0, a, b)]
            out = swiglu.swiglu_lora_linear(gk, uk, w, bias, ak, bk, scale, ranks, args, 2, 1)
            outs[gemm] = (out.detach(), *torch.autograd.grad(out, [gk, uk, ak, bk], go))
        (o0, dg0, du0, ga0, gb0), (o1, dg1, du1, ga1, gb1) = outs[0], outs[1]
        hmag = (torch.nn.functional.silu(g0.float()) * u0.float()).abs()
        assert near(o1, o0, (hmag @ w.abs().t().float() + bias.abs()) * 2 + o0.abs(), 1), (drop, (o1 - o0).abs().max())
        # g's and u's gradients go through h's (one rounding apart at most) and then the activation's
        size = (go.abs().float() @ w.abs().float()) * 2 * (g0.abs() + u0.abs() + 1).float() + dg0.abs() + du0.abs()
        assert near(dg1, dg0, size, 2) and near(du1, du0, size, 2), drop
        assert (dg1 != dg0).float().mean() < 0.05 and (du1 != du0).float().mean() < 0.05, drop
        for s in range(k):
            r = int(ranks[s])
            assert torch.equal(ga1[s, :r], ga0[s, :r]) and torch.equal(gb1[s, :r], gb0[s, :r]), (drop, s)
    print("gemm kernels ok")
''')


SWIGLU_SCRIPT = textwrap.dedent("""
    # A SwiGLU MLP's activation and its packed down projection (frozen linear + each slot's LoRA,
    # dropout on or off) as one op (kernels.swiglu), against torch's silu, product, linear and
    # bmm's: the output, g's and u's gradients, A's and B's where each slot trains; short and long
    # row groups (A's gradient over the MLP's width in one part or summed from 3).
    import os
    import torch
    from lora_exp.pack.kernels import lora as pack_lora, swiglu
    from lora_exp.core.randomness import dropout_mask, module_keys, row_keys

    torch.manual_seed(0)
    torch.set_default_device(os.environ["KERNELS_DEVICE"])
    k, rows, width, fout, R = 5, 2, 150, 40, 8           # an MLP width past a block, not a multiple
    ranks = torch.tensor([8, 0, 3, 5, 1], dtype=torch.int32)   # slot 1 does not target down_proj
    scale = torch.tensor([0.5, 0.0, 2.0, 1.5, 4.0])
    live = torch.arange(R).view(1, R) < ranks.view(k, 1)
    keys = module_keys(row_keys(torch.arange(k * rows) * 7 + 3, torch.full((k * rows,), 11),
                                torch.arange(rows).repeat(k)), 12345)
    p = torch.tensor([0.1, 0.0, 0.3, 0.05, 0.2]).repeat_interleave(rows)
    short, long = 7, pack_lora.MAX_M // 2 + 9
    dtypes = [getattr(torch, d) for d in os.environ["KERNELS_DTYPES"].split(",")]
    # (A's gradient summed from parts: long groups with split 3)
    cases = [(dtypes[0], short, 1, True), (dtypes[0], long, 3, False)] + [(d, long, 3, True) for d in dtypes[1:]]
    for dtype, t, split, drop in cases:
        m = rows * t
        a, b = torch.randn(k, R, width, dtype=dtype) * 0.3, torch.randn(k, R, fout, dtype=dtype) * 0.3
        # the reference sees the pack's zero padding; the op gets random values there and must not read them
        a_ref, b_ref = [(x * live[:, :, None]).detach().clone().requires_grad_() for x in (a, b)]
        a_k, b_k = [x.detach().clone().requires_grad_() for x in (a, b)]
        g0, u0 = torch.randn(k, m, width, dtype=dtype), torch.randn(k, m, width, dtype=dtype)
        gr, ur, gk, uk = [x.clone().requires_grad_() for x in (g0, u0, g0, u0)]
        w, bias = torch.randn(fout, width, dtype=dtype) * 0.1, torch.randn(fout, dtype=dtype)
        h = torch.nn.functional.silu(gr) * ur
        hs = h
        if drop:
            hs = (h.reshape(k * rows, -1) * dropout_mask(h.detach().reshape(k * rows, -1), keys, p)).view_as(h)
        delta = torch.bmm(torch.bmm(hs, a_ref.transpose(1, 2)), b_ref) * scale.to(dtype).view(-1, 1, 1)
        ref = torch.nn.functional.linear(h, w, bias) + delta
        args = pack_lora.dropout_args(keys, p, dtype) if drop else None
        out = swiglu.swiglu_lora_linear(gk, uk, w, bias, a_k, b_k, scale, ranks, args, rows, split)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
        what = (str(dtype), m, split, drop)
        assert out.dtype == dtype and torch.allclose(out.float(), ref.float(), **tol), \\
            (what, (out.float() - ref.float()).abs().max())
        go = torch.randn(k, m, fout, dtype=dtype)
        want = torch.autograd.grad(ref, [gr, ur, a_ref, b_ref], go)
        got = torch.autograd.grad(out, [gk, uk, a_k, b_k], go)
        for name, x, y in zip("gu", got, want):
            assert x.dtype == dtype and torch.allclose(x.float(), y.float(), **tol), \\
                (what, name, (x.float() - y.float()).abs().max())
        for name, x, y in zip("AB", got[2:], want[2:]):      # where each slot trains
            assert x.dtype == dtype, (what, name, x.dtype)
            for s in range(k):
                r = int(ranks[s])
                size = max(1.0, float(y[s, :r].abs().max())) if r else 1.0
                assert torch.allclose(x[s, :r].float(), y[s, :r].float(), rtol=tol["rtol"], atol=tol["atol"] * size), \\
                    (what, name, s)
        if dtype != torch.float32:  # the output's gradient in fp32 beside low-precision inputs
            _, z = torch.ops.lora_exp.swiglu_lora_linear(gk, uk, w, bias, a_k, b_k, scale, ranks,
                                                         *(args or (None,) * 3), rows, split)
            grads = torch.ops.lora_exp.swiglu_lora_linear_backward(go.float(), gk, uk, w, a_k, b_k, z, scale, ranks,
                                                                  *(args or (None,) * 3), rows, split)
            assert all(x.dtype == dtype for x in grads), [x.dtype for x in grads]
            assert torch.allclose(grads[0].float(), want[0].float(), **tol), (what, "fp32 gradient")
    print("swiglu kernels ok")
""")

ATTENTION_SCRIPT = textwrap.dedent('''
    import os
    import torch
    from lora_exp.pack.kernels import attention as pack_attention  # registers torch.ops.lora_exp.causal_attention
    from lora_exp.core.randomness import M32, mix32

    torch.manual_seed(0)
    torch.set_default_device(os.environ["KERNELS_DEVICE"])
    b, t, d = 3, 7, 16
    for dtype in [getattr(torch, n) for n in os.environ["KERNELS_DTYPES"].split(",")]:
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for h, hk in ((4, 4), (4, 2)):                       # grouped-query attention too
            for p in (0.0, 0.3):
                # q, k, v as the model hands them over: strided views of one projection's output
                qkv = torch.randn(b, t, (h + 2 * hk) * d, dtype=dtype)
                q, k, v = qkv.split([h * d, hk * d, hk * d], dim=2)
                q, k, v = [x.view(b, t, -1, d).transpose(1, 2).detach().requires_grad_() for x in (q, k, v)]
                seed = torch.tensor([123456789], dtype=torch.int64)
                scale = 0.3
                out = torch.ops.lora_exp.causal_attention(q, k, v, seed if p else None, p, scale)
                # reference: the scores' causal softmax, the same hash's dropout mask, times v
                qr, kr, vr = [x.detach().float().requires_grad_() for x in (q, k, v)]
                kx, vx = kr.repeat_interleave(h // hk, dim=1), vr.repeat_interleave(h // hk, dim=1)
                s = (qr @ kx.transpose(-1, -2)) * scale
                i = torch.arange(t)
                s = s.masked_fill(i[None, :] > i[:, None], float("-inf")).softmax(dim=-1)
                if p:
                    bh = torch.arange(b * h).view(b, h, 1, 1)
                    counter = ((bh * t + i.view(1, 1, t, 1)) * t + i.view(1, 1, 1, t)) & M32
                    keep = mix32((int(seed) * 0x9E3779B1 + counter) & M32) >= int(p * 2 ** 32)
                    assert 0.5 < keep.float().mean() < 0.9
                    s = s * keep / (1 - p)
                ref = (s @ vx).transpose(1, 2)               # [B, T, H, D]
                what = (str(dtype), h, hk, p)
                assert out.shape == (b, t, h, d) and torch.allclose(out.float(), ref, **tol), \
                    (what, (out.float() - ref).abs().max())
                g = torch.randn(b, t, h, d, dtype=dtype)
                got = torch.autograd.grad(out, [q, k, v], g)
                want = torch.autograd.grad(ref, [qr, kr, vr], g.float())
                for name, x, y in zip("qkv", got, want):
                    assert x.shape == y.shape and torch.allclose(x.float(), y, **tol), \
                        (what, name, (x.float() - y).abs().max())

    # The dtype mixes a model under autocast hands over: Llama's rotary embedding gives fp32 q and k
    # beside a low-precision v, and a gradient can come back in fp32. SmolLM2's heads: 9 query
    # heads on 3 key/value heads of 64. (The interpreter computes fp16 dots exactly and bf16 ones
    # wrongly: on the CPU fp16 stands for bf16, and bf16 is only run; the GPU checks bf16.)
    from lora_exp.pack.attention import attention_inputs

    device = os.environ["KERNELS_DEVICE"]
    low = getattr(torch, os.environ.get("KERNELS_LOW", "float16"))
    b, t, h, hk, d, scale = 2, 11, 9, 3, 64, 0.125
    q32, k32 = torch.randn(b, h, t, d), torch.randn(b, hk, t, d)
    v = torch.randn(b, hk, t, d, dtype=low)
    with torch.autocast(device, dtype=low):
        q, k, v_ = attention_inputs(q32, k32, v)
    assert q.dtype == k.dtype == v_.dtype == low, (q.dtype, k.dtype, v_.dtype)
    assert attention_inputs(q32, k32, v)[2].dtype == torch.float32  # no autocast: the widest
    out = torch.ops.lora_exp.causal_attention(q, k, v_, None, 0.0, scale)
    qr, kr, vr = [x.detach().float().requires_grad_() for x in (q, k, v_)]
    kx, vx = kr.repeat_interleave(h // hk, dim=1), vr.repeat_interleave(h // hk, dim=1)
    i = torch.arange(t)
    s = ((qr @ kx.transpose(-1, -2)) * scale).masked_fill(i[None, :] > i[:, None], float("-inf")).softmax(-1)
    ref = (s @ vx).transpose(1, 2)
    tol = dict(rtol=3e-2, atol=3e-2)
    assert out.dtype == low and torch.allclose(out.float(), ref, **tol), (out.float() - ref).abs().max()
    g = torch.randn(b, t, h, d)                        # the output's gradient in fp32, the inputs in `low`
    got = torch.ops.lora_exp.causal_attention_backward(g, q, k, v_, None, 0.0, scale)
    want = torch.autograd.grad(ref, [qr, kr, vr], g)
    for name, x, y in zip("qkv", got, want):
        assert x.dtype == low and torch.allclose(x.float(), y, **tol), (name, (x.float() - y).abs().max())
    # the reverse: fp32 inputs (no autocast) with a low-precision gradient
    q2, k2, v2 = attention_inputs(q32, k32, v.float())
    got = torch.ops.lora_exp.causal_attention_backward(g.to(low), q2, k2, v2, None, 0.0, scale)
    assert all(x.dtype == torch.float32 for x in got)
    if device == "cpu":                                # bf16 through both kernels: no dtype error
        with torch.autocast(device, dtype=torch.bfloat16):
            q, k, v_ = attention_inputs(q32, k32, v.to(torch.bfloat16))
        out = torch.ops.lora_exp.causal_attention(q, k, v_, None, 0.0, scale)
        got = torch.ops.lora_exp.causal_attention_backward(g, q, k, v_, None, 0.0, scale)
        assert out.dtype == torch.bfloat16 and all(x.dtype == torch.bfloat16 for x in got)
    print("attention kernels ok")
''')


HEAD_SCRIPT = textwrap.dedent('''
    import os
    import torch
    from lora_exp.pack import rows as pack_rows
    from lora_exp.pack.kernels import head

    torch.manual_seed(0)
    device = os.environ["KERNELS_DEVICE"]
    torch.set_default_device(device)
    n, width, vocab = 37, 24, 5000                       # a vocabulary wider than a block, not a multiple
    head.BLOCK = 1024
    target = torch.randint(0, vocab, (n,))
    target[[0, 5, 36]] = -100                            # positions without a label
    for dtype in [getattr(torch, d) for d in os.environ["KERNELS_DTYPES"].split(",")]:
        hidden = torch.randn(n, width, dtype=dtype)
        weight = torch.randn(vocab + 120, width, dtype=dtype) * 0.5   # padded vocabulary: -inf bias
        bias = torch.zeros(vocab + 120, dtype=dtype)
        bias[vocab:] = float("-inf")
        want_loss, want_grad = pack_rows.chunk_loss_and_grad(hidden, weight, bias, target)
        got_loss, got_grad = pack_rows.kernel_chunk_loss(hidden, weight, bias, target, need_grad=True)
        # (each side makes its own logits: on the CPU two fp32 GEMMs of the same inputs can differ in
        # the last bits; the kernel alone is checked on shared logits below)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        assert got_loss.dtype == torch.float32 and torch.allclose(got_loss, want_loss, **tol), \
            (dtype, (got_loss - want_loss).abs().max())
        assert bool((got_loss[[0, 5, 36]] == 0).all()) and bool((got_loss[1:5] > 0).all())
        assert got_grad.dtype == dtype and torch.allclose(got_grad.float(), want_grad.float(), **tol), \
            (dtype, (got_grad.float() - want_grad.float()).abs().max())
        loss_only = pack_rows.kernel_chunk_loss(hidden, weight, bias, target, need_grad=False)
        assert torch.equal(loss_only, got_loss)
        # the logits' gradient itself: softmax minus one-hot, zero on unlabelled rows
        logits = torch.nn.functional.linear(hidden, weight, bias)
        loss, g = head.head_loss(logits, target, True)
        valid = target != -100
        lse = torch.logsumexp(logits.float(), dim=1)
        want = torch.where(valid, lse - logits.float().gather(1, target.clamp(min=0)[:, None])[:, 0], 0.0)
        assert torch.allclose(loss, want, rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=1e-6), \
            (dtype, (loss - want).abs().max())
        p = (logits.float() - lse[:, None]).exp()
        p[torch.arange(n)[valid], target[valid]] -= 1
        p = (p * valid[:, None]).to(dtype)
        assert torch.allclose(g.float(), p.float(), rtol=1e-5, atol=1e-7 if dtype == torch.float32 else 1e-3), \
            (dtype, (g.float() - p.float()).abs().max())
        assert bool((g[[0, 5, 36]] == 0).all()) and bool((g[:, vocab:] == 0).all())
        assert torch.allclose(g.float().sum(dim=1)[1:5], torch.zeros(4), atol=1e-2)
    print("head kernels ok")
''')


PACK_SCRIPT = textwrap.dedent('''
    import torch
    from lora_exp.pack import model as packed
    from lora_exp.compose import compose
    from lora_exp.core.data import load_rows, tokenize
    from lora_exp.core.models import load_base
    from lora_exp.pack.trainer import train_packed

    init = packed.PackedModel.__init__
    def with_kernels(self, *args, **kwargs):           # the CUDA optimizer, here under the interpreter
        init(self, *args, **kwargs)
        self.kernels = KERNELS
    packed.PackedModel.__init__ = with_kernels
    common = ["model=tiny_gpt2", "data=seed", "lora=seed", "trainer=seed", "trainer.max_steps=12",
              "trainer.eval_steps=4", "trainer.logging_steps=2", "trainer.generation_metrics=[exact_match]",
              "trainer.max_new_tokens=4", "tracking=none", "trainer.batch_size=2", "trainer.base_dropout=false"]
    mixed = [["lora.r=4", "lora.lora_alpha=8", "trainer.lr=1e-2"],
             ["lora.r=8", "lora.preset=all", "trainer.lr=3e-3", "trainer.max_grad_norm=0.05", "trainer.max_steps=6"],
             ["lora.r=2", "lora.preset=attn_proj", "trainer.lr=5e-3", "trainer.seed=7", "trainer.weight_decay=0.1"],
             ["lora.r=8", "trainer.lr=2e-2", "trainer.seed=3", "trainer.max_steps=7"],
             ["lora.r=4", "lora.preset=all", "trainer.lr=1e-2", "trainer.seed=5"]]
    cfgs = [compose(common + m) for m in mixed]
    base = load_base(cfgs[0].model, torch.device("cpu"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    curves = {}
    for KERNELS in (False, True):
        results = train_packed(cfgs, base, data, slots=2)   # 5 trials through 2 slots, out of step: held for evals
        curves[KERNELS] = [(r.loss_curve, r.eval_curve) for r in results]
    for (a, ea), (b, eb) in zip(curves[False], curves[True]):
        for x, y in ((a, b), (ea, eb)):
            assert [s for s, _ in x] == [s for s, _ in y] and len(x) >= 2
            assert all(abs(u - v) <= 1e-5 * abs(u) for (_, u), (_, v) in zip(x, y)), (x, y)
    # and step by step: slots start, hold, resume, leave and restart between optimizer steps
    from lora_exp.pack.model import PackedModel, SlotSpec
    from lora_exp.pack.optimizer import optimizer_step
    every, attn = tuple(cfgs[1].target_modules), tuple(cfgs[0].target_modules)
    spec = lambda r, targets, lr, seed: SlotSpec(r=r, alpha=2.0 * r, dropout=0.0, targets=targets, use_rslora=False,
                                                 lr=lr, weight_decay=0.01, max_grad_norm=0.5, seed=seed, steps=50,
                                                 warmup=0, scheduler="linear")
    script = ["", "pause 1", "", "", "resume 1", "", "release 2", "assign 2", "", "pause 0 2", "", "resume 0 2", ""]
    states = []
    for KERNELS in (False, True):
        pm = PackedModel(base, 3, 8, every, compile="off")
        pm.kernels = KERNELS
        for slot, s in enumerate([spec(4, attn, 1e-2, 1), spec(8, every, 5e-3, 2), spec(2, every, 2e-2, 3)]):
            pm.assign(slot, s)
        gen = torch.Generator().manual_seed(0)
        for line in script:
            verb, *slots = line.split() or [""]
            slots = [int(x) for x in slots]
            if verb == "pause":
                pm.pause(slots)
            elif verb == "resume":
                pm.resume(slots)
            elif verb == "release":
                pm.release(slots[0])
            elif verb == "assign":
                pm.assign(slots[0], spec(8, attn, 3e-3, 4))
            grads = []
            for i, w in enumerate(pm.weights):   # zero outside each slot's prefix, as the backward's are
                g = torch.randn(w.shape, generator=gen)
                for slot in range(3):
                    g[slot].view(-1)[int(pm.slot_host[i, slot]):] = 0
                grads.append(g)
            optimizer_step(pm, grads)
        states.append([t.clone() for t in (pm.params, pm.exp_avg, pm.exp_avg_sq, pm.step)])
        pm.close()
    for name, x, y in zip(("params", "exp_avg", "exp_avg_sq", "step"), *states):
        assert torch.allclose(x.double(), y.double(), rtol=1e-5, atol=1e-7), (name, (x - y).abs().max())
    print("pack kernels ok")
''')


PACK_LORA_SCRIPT = textwrap.dedent('''
    # Packed trials whose LoRA deltas go through the kernels (with the base layer, as one op) train
    # as through the bmm's: fp32, dropout on, tiny Llama (GQA), a slot at rank 4 on
    # attention beside one at rank 8 on every linear module; row groups one program holds (the
    # seed's rows are up to ~98 positions: 2 rows at a MAX_M of 256, 1 at 128) and a row more
    # (past MAX_M: the tiled kernels, weight gradients in parts).
    import torch
    from lora_exp.pack import model as packed
    from lora_exp.compose import compose
    from lora_exp.core.data import load_rows, tokenize
    from lora_exp.core.models import load_base
    from lora_exp.pack.trainer import train_packed

    init = packed.PackedModel.__init__
    def with_lora_kernels(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.kernels = LORA                       # with the optimizer's kernels, as on CUDA
        self.groups.kernels, self.groups.split = LORA, 3
    packed.PackedModel.__init__ = with_lora_kernels
    calls = []
    from lora_exp.pack.kernels import lora as pack_lora
    real = pack_lora.lora_linear
    def counted(x, *args, **kwargs):
        calls.append(x.shape[1])
        return real(x, *args, **kwargs)
    pack_lora.lora_linear = counted
    short = max(1, pack_lora.MAX_M // 100)     # rows a group of at most MAX_M positions holds
    for batch in (short, short + 1):
        common = ["model=tiny_llama", "data=seed", "lora=seed", "trainer.max_steps=2", "trainer.eval_steps=2",
                  "trainer.logging_steps=1", "trainer.generation_metrics=[exact_match]", "trainer.max_new_tokens=2",
                  "tracking=none", f"trainer.batch_size={batch}", "trainer.base_dropout=false", "lora.lora_dropout=0.2"]
        slots = (["lora.r=4", "trainer.lr=1e-2"],
                 ["lora.r=8", "lora.preset=all_linear", "trainer.lr=5e-3", "trainer.seed=3"])
        cfgs = [compose(common + m) for m in slots]
        base = load_base(cfgs[0].model, torch.device("cpu"))
        data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
        curves = {}
        for LORA in (False, True):
            calls.clear()
            curves[LORA] = [(r.loss_curve, r.eval_curve) for r in train_packed(cfgs, base, data)]
            if LORA:
                longest = max(calls)
                assert calls and (longest > pack_lora.MAX_M) == (batch > short), (batch, longest)
        for (a, ea), (b, eb) in zip(curves[False], curves[True]):
            for x, y in ((a, b), (ea, eb)):
                assert [s for s, _ in x] == [s for s, _ in y] and len(x) >= 1
                assert all(abs(u - v) <= 1e-5 * abs(u) for (_, u), (_, v) in zip(x, y)), (batch, x, y)
    print("pack lora kernels ok")
''')


LLAMA_AUTOCAST_SCRIPT = textwrap.dedent('''
    # A pack of tiny Llama trials (grouped-query attention) stepping under bf16 autocast through
    # every kernel (optimizer, LoRA deltas with the base layers, the MLP's activation with
    # down_proj's, attention), as a bf16 pack does on a GPU: the dtypes
    # autocast hands over (fp32 rotary q and k, bf16 v, bf16 LoRA copies) must meet in each one.
    import torch
    from lora_exp.compose import compose
    from lora_exp.core.data import load_rows, tokenize
    from lora_exp.core.models import load_base
    from lora_exp.pack.attention import CAUSAL_ROWS, causal_rows_attention
    from lora_exp.pack.model import PackedModel
    from lora_exp.pack.optimizer import gradients, optimizer_step
    from lora_exp.pack.rows import TokenTable, slot_losses
    from lora_exp.pack.slots import slot_spec

    common = ["model=tiny_llama", "data=seed", "tracking=none", "trainer.max_steps=4", "trainer.batch_size=2",
              "lora.lora_dropout=0.1"]
    cfgs = [compose(common + o) for o in (["lora.r=4"], ["lora.r=8", "lora.preset=all_linear", "trainer.seed=3"])]
    base = load_base(cfgs[0].model, torch.device("cpu"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    table = TokenTable.build(data.train, base.tokenizer.pad_token_id, torch.device("cpu"))
    assert causal_rows_attention(base.model) is not None and base.model.config._attn_implementation == CAUSAL_ROWS
    from lora_exp.pack.kernels import lora as pack_lora, swiglu
    calls = []
    for module, name in ((pack_lora, "lora_linear"), (swiglu, "swiglu_lora_linear")):
        def counted(*args, _real=getattr(module, name), _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)
        setattr(module, name, counted)
    from lora_exp.pack.runtime import FrozenWeights
    pm = PackedModel(base, 2, 8, sorted({m for c in cfgs for m in c.target_modules}), compile="off",
                     low_precision=True)
    frozen = FrozenWeights(base.model)  # the base's matmul weights in bf16, as a bf16 pack's runtime makes them
    pm.kernels = True                   # the optimizer's kernels
    pm.groups.kernels, pm.groups.split, pm.groups.rows = True, 1, 2   # the LoRA deltas' kernels, 2 rows a slot
    for slot, cfg in enumerate(cfgs):
        pm.assign(slot, slot_spec(cfg, len(data.train)))
    for step in range(3):
        idx = torch.tensor([(2 * step + r) % len(data.train) for r in range(4)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = slot_losses(base.model, table.ids[idx], table.mask[idx], table.labels[idx], 2, 2)
        assert losses.dtype == torch.float32 and bool(torch.isfinite(losses).all()), losses
        optimizer_step(pm, gradients(pm, losses.sum()))
        assert pm.low.dtype == torch.bfloat16 and bool(torch.isfinite(pm.params).all())
    # the linear layers with their deltas as one op, and the MLPs' activation with down_proj's
    assert calls.count("swiglu_lora_linear") == 3 * 2 and calls.count("lora_linear") == 3 * 2 * 6, calls
    frozen.use_fp32()
    pm.close()
    print("llama autocast kernels ok")
''')


def run_checks(script: str, **env: str) -> None:
    """Run a check script; it prints "kernels ok" when every comparison held. KERNELS_CONSTANTS
    (`pack.kernel_constants`' syntax) sets kernel constants first: the interpreter's runs take
    smaller tiles and thresholds where the script's shapes follow them (the same cases, less of
    the interpreter's time); the GPU's runs keep the kernels' own."""
    if env.get("KERNELS_CONSTANTS"):
        script = ("import os\nfrom lora_exp.pack.kernels import set_constants\n"
                  "set_constants(os.environ['KERNELS_CONSTANTS'])\n" + script)
    env = {**os.environ, **env}
    if env.get("KERNELS_DEVICE") == "cuda":
        env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kernels ok" in out.stdout


def cuda_or_skip() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
