"""The offline default: pretrained SmolLM2-135M-Instruct from the cache `make setup` prepared."""
from __future__ import annotations

import pytest
import torch

from lora_exp.compose import compose
from lora_exp.core.data import load_rows, tokenize
from lora_exp.core.models import load_base
from lora_exp.core.recording import NullTracker
from lora_exp.core.training import run_trial

pytestmark = pytest.mark.slow


def test_default_model_loads_offline_and_a_few_steps_reduce_loss():
    cfg = compose(["data=seed", "trainer.max_steps=8", "trainer.batch_size=5", "trainer.eval_steps=8",
                   "trainer.max_new_tokens=12", "data.n_generate=1"])
    base = load_base(cfg.model, torch.device("cpu"))
    assert base.load_seconds < 10, "the converted cache loads fast (the GGUF parse is never repeated)"
    assert sum(p.numel() for p in base.model.parameters()) == 134_515_008
    assert type(base.model).__name__ == "LlamaForCausalLM"
    assert base.tokenizer.eos_token_id == base.tokenizer.pad_token_id == 2
    result = run_trial(cfg, base, tokenize(load_rows(cfg.data), cfg.data, base.tokenizer), NullTracker())
    assert result.metrics["final_eval_loss"] < 0.7 * result.metrics["base_eval_loss"]
