"""The unpacked trial's dropout masks (32-bit lanes, in place) equal the reference the pack's
compiled step and kernels compute, bit for bit; the hash on plain ints is the hash on tensors."""
from __future__ import annotations

import pytest
import torch

from lora_exp.core.lowbias32 import mix_int
from lora_exp.core.randomness import M32, dropout_mask, dropout_mask_int32, mix32, module_keys, row_keys


@pytest.mark.parametrize("shape", [(8, 80, 576), (3, 7, 1536), (1, 1, 5), (2, 4096)])
@pytest.mark.parametrize("p", [0.0, 1e-6, 0.05, 0.5, 0.999, float(torch.tensor(1 - 2 ** -24))])
def test_the_int32_masks_are_the_reference_masks(shape, p):
    g = torch.Generator().manual_seed(hash((shape, p)) & 0xFFFF)
    rows = shape[0]
    seeds = torch.randint(0, 2 ** 32, (rows,), generator=g)
    keys = module_keys(row_keys(seeds, torch.randint(0, 10_000, (rows,), generator=g), torch.arange(rows)),
                       int(torch.randint(0, 2 ** 32, (1,), generator=g)))
    x = torch.randn(*shape, generator=g)
    ps = torch.full((rows,), p)
    want = dropout_mask(x, keys, ps)
    got = dropout_mask_int32(x, keys, ps)
    assert got.dtype == want.dtype and torch.equal(got, want)
    if 0.05 <= p < 0.9 and x.numel() >= 1000:  # the masks do drop
        assert 0 < int((got == 0).sum()) < got.numel()


def test_per_row_rates_and_half_precision():
    keys = module_keys(row_keys(torch.tensor([1, 2, 3]), torch.tensor([5, 5, 5]), torch.arange(3)), 77)
    x = torch.randn(3, 64, 32).to(torch.bfloat16)
    ps = torch.tensor([0.0, 0.1, 0.9])
    assert torch.equal(dropout_mask_int32(x, keys, ps), dropout_mask(x, keys, ps))


def test_the_hash_on_plain_ints_is_the_hash_on_tensors():
    """`mix_int` (what seeds LoRA A per module and reseeds the sampler per trial, in processes
    that do not import torch) is `mix32` bit for bit, on the low 32 bits of any int."""
    g = torch.Generator().manual_seed(3)
    xs = [0, 1, M32, 1 << 31, (1 << 31) - 1, 1 << 32, (1 << 40) + 5, -1, -12345]
    xs += [int(v) for v in torch.randint(-(2 ** 62), 2 ** 62, (4000,), generator=g)]
    want = mix32(torch.tensor([x & M32 for x in xs], dtype=torch.int64)).tolist()
    assert [mix_int(x) for x in xs] == want
