"""A random base model of a given architecture is built on the GPU it trains on: seeded, the same
twice, and leaving the caller's CUDA generator as it was. Device-only: skipped without CUDA."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lora_exp.config import ModelConfig
from lora_exp.core.models import build_random_model, byte_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ARCH = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 257}


def test_a_random_model_is_built_on_the_gpu_seeded_and_the_callers_generator_kept():
    cfg = ModelConfig(name="tiny", source="random", architecture=ARCH)
    tok, cuda = byte_tokenizer(), torch.device("cuda")
    state = torch.cuda.get_rng_state()
    first, again = build_random_model(cfg, tok, cuda), build_random_model(cfg, tok, cuda)
    other = build_random_model(dataclasses.replace(cfg, init_seed=1), tok, cuda)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    params = dict(first.named_parameters())
    assert all(p.device.type == "cuda" for p in params.values())
    assert all(torch.equal(p, dict(again.named_parameters())[n]) for n, p in params.items())
    assert not torch.equal(params["model.layers.0.mlp.up_proj.weight"],
                           dict(other.named_parameters())["model.layers.0.mlp.up_proj.weight"])
    # the rotary frequencies are the architecture's, not left uninitialised
    inv = first.model.rotary_emb.inv_freq
    assert inv.device.type == "cuda" and torch.allclose(inv.cpu(), 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16))
