"""pack=auto on a GPU: one slot's memory is measured and K follows from it (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from lora_exp.compose import compose
from lora_exp.core.data import load_rows, tokenize
from lora_exp.core.models import load_base
from lora_exp.pack.sizing import HEADROOM, choose_slots, measure_slot_memory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_pack_auto_sizes_the_pack_from_one_slots_measured_memory():
    cfg = compose(["model=tiny_llama", "data=seed", "trainer.precision=bf16", "trainer.batch_size=4",
                   "trainer.generation_metrics=[exact_match]"])
    base = load_base(cfg.model, torch.device("cuda"))
    data = tokenize(load_rows(cfg.data), cfg.data, base.tokenizer)
    modules = cfg.model.target_presets["all_linear"]
    memory = measure_slot_memory(base, data, cfg, 16, modules)
    assert 0 < memory.per_slot < 2**30 and memory.free > 0
    k, why = choose_slots(base, data, cfg, 16, modules, trials=12)
    assert k == 12 and why.startswith("pack=auto: 12 slots (limited by the trials to run)"), why
    # K from the memory (or the cap) when the trials do not limit it
    k, why = choose_slots(base, data, cfg, 16, modules, trials=10**9)
    assert 12 < k <= 1024 and ("limited by GPU memory" in why or "limited by the 1024-slot cap" in why), why
    assert memory.holds() <= memory.free * HEADROOM / memory.per_slot
