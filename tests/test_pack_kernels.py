"""The packed optimizer's Triton kernels (lora_exp/pack_kernels.py) against torch's AdamW
formula (packed.adamw_), and the packed LoRA delta's (lora_exp/pack_lora.py) against the bmm's
PackedLoraLayer computes otherwise, forward and backward, on random data, run by Triton's
interpreter on the CPU
(TRITON_INTERPRET=1, set before triton is imported). Skipped where triton is not installed:
CPU builds of torch do not bring it; `pip install triton` runs it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")  # installed by `make setup` on x86-64 Linux (pyproject test extra)

SCRIPT = textwrap.dedent('''
    import os
    import torch
    from lora_exp import pack_kernels
    from lora_exp.packed import adamw_

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

    # one launch over every tensor and one per tensor; dense gradients and strided ones; one
    # layout for all (its device table follows the gradients' addresses)
    layout = pack_kernels.Layout(cols, params.device)
    pack_kernels.MAX_BLOCKS = 3                  # launches cut at the grid limit (here: 3 blocks)
    for grouped, grads in [(True, dense), (True, strided), (False, strided), (False, dense)]:
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
        p_ = params.clone()                                   # no compute copy: the masters alone
        pack_kernels.adamw(layout, p_, m.clone(), v.clone(), None, grads, live, coef, decay, step_size, bc2,
                           0.9, 0.999, 1e-8)
        assert torch.allclose(p_, expected[0], rtol=1e-5, atol=1e-7)
    print("kernels ok")
''')

LORA_SCRIPT = textwrap.dedent('''
    import os
    import torch
    from lora_exp import pack_lora
    from lora_exp.packed import dropout_mask, module_keys, row_keys

    torch.manual_seed(0)
    torch.set_default_device(os.environ["KERNELS_DEVICE"])
    k, rows, t, fin, fout, R = 5, 2, 7, 70, 90, 8     # widths not multiples of a block
    m = rows * t
    ranks = torch.tensor([8, 0, 3, 5, 1], dtype=torch.int32)   # slot 1 does not target the module
    scale = torch.tensor([0.5, 0.0, 2.0, 1.5, 4.0])
    for dtype in [getattr(torch, d) for d in os.environ["KERNELS_DTYPES"].split(",")]:
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
        for split in (1, 3):
            for drop in (True, False):
                xr, xk = [x.detach().clone().requires_grad_() for _ in range(2)]
                xs = xr
                if drop:
                    xs = (xr.reshape(k * rows, -1) * dropout_mask(x.reshape(k * rows, -1), keys, p)).view_as(xr)
                ref = torch.bmm(torch.bmm(xs, a_ref.transpose(1, 2)), b_ref) * scale.to(dtype).view(-1, 1, 1)
                args = pack_lora.dropout_args(keys, p, dtype) if drop else (None,) * 3
                out, _ = torch.ops.lora_exp.lora_delta(xk, a_k, b_k, scale, ranks, *args, rows, split)
                what = (str(dtype), split, drop)
                assert out.dtype == dtype and torch.allclose(out.float(), ref.float(), **tol), (what, (out - ref).abs().max())
                want = torch.autograd.grad(ref, [xr, a_ref, b_ref], g)
                got = torch.autograd.grad(out, [xk, a_k, b_k], g)
                assert torch.allclose(got[0].float(), want[0].float(), **tol), (what, (got[0] - want[0]).abs().max())
                for i, (gw, ww) in enumerate(zip(got[1:], want[1:])):   # where each slot trains
                    for s in range(k):
                        r = int(ranks[s])
                        assert torch.allclose(gw[s, :r].float(), ww[s, :r].float(), **tol), (what, i, s)
    print("lora kernels ok")
''')


def _run(script: str, **env: str) -> None:
    env = {**os.environ, **env}
    if env.get("KERNELS_DEVICE") == "cuda":
        env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kernels ok" in out.stdout


def _cuda() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")


def test_triton_adamw_and_norms_match_torch_on_each_slots_live_prefix_whatever_the_gradients_layout():
    _run(SCRIPT, TRITON_INTERPRET="1", KERNELS_DEVICE="cpu")


def test_the_same_on_the_gpu_compiled():
    """The kernels as they run in a pack: compiled by Triton for the GPU (where there is one)."""
    _cuda()
    _run(SCRIPT, KERNELS_DEVICE="cuda")


def test_lora_delta_kernels_match_the_bmms_forward_and_backward_skipping_what_a_slot_does_not_train():
    """fp32 only: the interpreter's dot does not take bf16 (the GPU test below runs both)."""
    _run(LORA_SCRIPT, TRITON_INTERPRET="1", KERNELS_DEVICE="cpu", KERNELS_DTYPES="float32")


def test_lora_delta_kernels_the_same_on_the_gpu_in_fp32_and_bf16():
    _cuda()
    _run(LORA_SCRIPT, KERNELS_DEVICE="cuda", KERNELS_DTYPES="float32,bfloat16")
