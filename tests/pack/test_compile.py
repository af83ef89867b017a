"""Compiled layers (`pack.compile=layers`) are compiled once per base model: a later pack on the
same base runs the graphs the first one compiled. CPU, a tiny Llama, Dynamo's own tracing (the
guards decide whether a graph is reused, whichever backend compiles it)."""
from __future__ import annotations

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from lora_exp.compose import compose
from lora_exp.core.data import load_rows, tokenize
from lora_exp.core.models import load_base
from lora_exp.core.recording import NullTracker
from lora_exp.pack import compile as pack_compile
from lora_exp.pack.trainer import PackTrainer

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_a_second_pack_on_the_same_base_reuses_the_first_ones_compiled_layers(monkeypatch):
    monkeypatch.setattr(pack_compile, "compiled",
                        lambda fn, mode=None: torch.compile(fn, dynamic=False, backend="eager"))
    cfg = compose(["model=tiny_llama", "data=seed", "lora=seed", "trainer=seed", "trainer.max_steps=30",
                   "tracking=none", "lora.preset=all_linear", "trainer.batch_size=2"])
    base = load_base(cfg.model, torch.device("cpu"))
    data = tokenize(load_rows(cfg.data), cfg.data, base.tokenizer)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    try:
        for _ in range(3):
            trainer = PackTrainer(base, data, cfg, 2, 8, MODULES, compile="layers")
            try:
                assert trainer.stepper.layers is not None  # the step does run compiled layers
                for slot in range(2):
                    trainer.start(slot, cfg, NullTracker())
                for _ in range(2):
                    trainer.train_step()
            finally:
                trainer.close()
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        torch._dynamo.reset()
    assert graphs[0] > 0
    assert graphs[1] == graphs[2] == graphs[0], graphs
