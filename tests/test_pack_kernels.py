"""The packed optimizer's Triton kernels (lora_exp/pack_kernels.py) against torch's AdamW
formula (packed.adamw_) on random data, run by Triton's interpreter on the CPU
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
    grads = [grads_flat[:, c].contiguous().view(k, rank, -1) for c in cols]
    # A's gradient comes out of the backward transposed ([K, in, R] in memory): read in place
    grads = [g.transpose(1, 2).contiguous().transpose(1, 2) if i % 2 else g for i, g in enumerate(grads)]
    assert not grads[1].is_contiguous() and grads[0].is_contiguous()
    coef, decay = torch.rand(k) + 0.5, 1 - torch.rand(k) * 1e-2
    step_size, bc2 = torch.rand(k) * 1e-2, torch.rand(k) + 0.1

    norms = pack_kernels.sq_norms(grads, live, k)
    ref = grads_flat.float().pow(2).sum(dim=1)
    assert torch.allclose(norms, ref, rtol=1e-5), (norms, ref)

    expected = [t.clone() for t in (params, m, v)]
    adamw_(*expected[:1], grads_flat.float(), *expected[1:], coef.view(-1, 1), decay.view(-1, 1),
           step_size.view(-1, 1), bc2.view(-1, 1), 0.9, 0.999, 1e-8)
    low = torch.full((k, offset), 7.0, dtype=torch.bfloat16)   # poisoned: live parts must be written
    views = lambda t: [t[:, c] for c in cols]
    pack_kernels.adamw(views(params), views(m), views(v), views(low), grads, live, coef, decay, step_size, bc2,
                       0.9, 0.999, 1e-8)
    for got, want in zip((params, m, v), expected):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (got - want).abs().max()
    # the compute copy is the master in bf16 on every live element, untouched elsewhere (the
    # interpreter rounds fp32 -> bf16 toward zero where the GPU rounds to nearest: one bf16 step)
    for i, c in enumerate(cols):
        for s in range(k):
            n = int(live[i, s])
            master = params[s, c][:n]
            assert bool(((low[s, c][:n].float() - master).abs() <= master.abs() * 2.0 ** -7).all()), (i, s)
            assert bool((low[s, c][n:] == 7.0).all())
    print("kernels ok")
''')


def test_triton_adamw_and_norms_match_torch_on_each_slots_live_prefix_whatever_the_gradients_layout():
    env = {**os.environ, "TRITON_INTERPRET": "1", "KERNELS_DEVICE": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kernels ok" in out.stdout


def test_the_same_on_the_gpu_compiled():
    """The kernels as they run in a pack: compiled by Triton for the GPU (where there is one)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    env = {**os.environ, "KERNELS_DEVICE": "cuda"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kernels ok" in out.stdout
