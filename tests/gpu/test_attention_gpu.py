"""The pack's attention for windowed and soft-capped scores on CUDA against the eager formula in
fp32: FlexAttention compiled on its own (steps that are not compiled), and the formula compiled
into a graph (compiled steps). Device-only: skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from lora_exp.pack import attention
from lora_exp.pack.attention import FLEX_FROM, masked_rows_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True])
def test_windowed_and_capped_attention_gives_the_eager_formulas_outputs_and_gradients(dtype, compiled, monkeypatch):
    torch.manual_seed(0)
    calls = []
    flex = attention._compiled_flex()
    monkeypatch.setattr(attention, "_compiled_flex", lambda: (calls.append(1), flex)[1])
    rows, heads, kv, d = 3, 4, 2, 64
    fn = torch.compile(masked_rows_attention, fullgraph=True) if compiled else masked_rows_attention
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for n, window, softcap in ((FLEX_FROM, 40, None), (FLEX_FROM + 72, None, 5.0), (FLEX_FROM + 72, 100, 5.0)):
        q = torch.randn(rows, heads, n, d, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(rows, kv, n, d, device="cuda", dtype=dtype, requires_grad=True) for _ in "kv")
        out = fn(q, k, v, 0.0, 0.125, window, softcap)
        g = torch.randn_like(out)
        got = [out, *torch.autograd.grad(out, [q, k, v], g)]
        assert bool(calls) != compiled  # FlexAttention outside compiled steps only
        calls.clear()
        # the eager formula in fp32 (what the CPU and short rows run, and what the probe checks)
        monkeypatch.setattr(attention, "_probing", True)
        ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
        ref = masked_rows_attention(*ref_in, 0.0, 0.125, window, softcap)
        # the cap and the window are really applied: without them the output differs
        plain = masked_rows_attention(*ref_in, 0.0, 0.125, n, None)
        assert not torch.allclose(plain, ref, atol=10 * tol)
        monkeypatch.setattr(attention, "_probing", False)
        want = [ref, *torch.autograd.grad(ref, ref_in, g.float())]
        for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
            assert x.dtype == dtype and x.shape == y.shape, name
            err = ((x.float() - y).abs().max() / y.abs().max()).item()
            assert err < tol, (n, window, softcap, name, err)
