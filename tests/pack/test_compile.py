"""Compiled layers (`pack.compile=layers`) are one graph for all of a model's blocks, compiled
once per base model: every block runs it, and a later pack on the same base too. CPU, tiny
models of four or six blocks, Dynamo's own tracing: its guards decide whether a graph is reused,
whichever backend compiles it."""
from __future__ import annotations

import collections

import pytest
import torch
import torch._dynamo

from lora_exp.compose import compose
from lora_exp.core.data import load_rows, tokenize
from lora_exp.core.models import load_base
from lora_exp.core.recording import NullTracker
from lora_exp.pack import compile as pack_compile
from lora_exp.pack.trainer import PackTrainer

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = ("hidden_size: 64, intermediate_size: 128, num_attention_heads: 4, vocab_size: 49152, "
         "max_position_embeddings: 2048, tie_word_embeddings: true")
#: (architecture, the graphs its blocks need): Gemma 3's sliding-window blocks and its global ones
#: differ in what their attention reads, so two
FAMILIES = {
    "llama": (f"{{model_type: llama, num_hidden_layers: 4, num_key_value_heads: 2, {SIZES}}}", 1),
    "qwen2": (f"{{model_type: qwen2, num_hidden_layers: 4, num_key_value_heads: 2, use_sliding_window: false, "
              f"{SIZES}}}", 1),
    "gemma3": (f"{{model_type: gemma3_text, num_hidden_layers: 6, num_key_value_heads: 1, head_dim: 16, "
               f"query_pre_attn_scalar: 16, sliding_window: 8, {SIZES}}}", 2),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_block_of_every_pack_on_a_base_runs_one_compiled_graph(monkeypatch, family):
    arch, expected = FAMILIES[family]
    graphs: collections.Counter[str] = collections.Counter()
    backends = {}  # one per function, as inductor is one backend (a new one is a recompile)

    def counting(fn, mode=None):
        def backend(gm, inputs):
            graphs[fn.__qualname__] += 1
            return gm.forward
        return torch.compile(fn, dynamic=False, backend=backends.setdefault(fn, backend))

    monkeypatch.setattr(pack_compile, "compiled", counting)
    cfg = compose(["model=tiny_llama", f"model.architecture={arch}", "data=seed", "lora=seed", "trainer=seed",
                   "trainer.max_steps=30", "tracking=none", "lora.preset=all_linear", "trainer.batch_size=2"])
    base = load_base(cfg.model, torch.device("cpu"))
    data = tokenize(load_rows(cfg.data), cfg.data, base.tokenizer)
    block, mlp = type(base.model.model.layers[0]), type(base.model.model.layers[0].mlp)
    assert len(base.model.model.layers) >= 4
    torch._dynamo.reset()
    try:
        for _ in range(3):
            trainer = PackTrainer(base, data, cfg, 2, 8, MODULES, compile="layers")
            try:
                assert trainer.stepper.layers is not None
                for slot in range(2):
                    trainer.start(slot, cfg, NullTracker())
                for _ in range(2):
                    trainer.train_step()
            finally:
                trainer.close()
            assert {type(layer.mlp) for layer in base.model.model.layers} == {mlp}  # the model's own again
    finally:
        torch._dynamo.reset()
    compiled_blocks = {name: n for name, n in graphs.items() if name.startswith(block.__name__)}
    assert compiled_blocks == {f"{block.__name__}.forward": expected}, graphs
