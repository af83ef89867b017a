"""LoRA variants a sweep can search: DoRA and peft's inits. A trial of any of them trains on the
shared base and gives it back untouched; its saved adapter loads with plain peft on the original
base and reproduces the trained model (PiSSA / OLoRA converted to plain LoRA against it)."""
from __future__ import annotations

import json

import pytest
import torch

from lora_exp.compose import compose
from lora_exp.core.adapters import attach_adapter, detach_adapter, original_base, save_adapter
from lora_exp.core.loss import causal_lm_loss
from lora_exp.core.models import load_base
from lora_exp.errors import ConfigError


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


VARIANTS = [("tiny_gpt2", ["lora.use_dora=true"]), ("tiny_gpt2", ["lora.init_lora_weights=pissa"]),
            ("tiny_gpt2", ["lora.init_lora_weights=orthogonal", "lora.use_dora=true"]),
            ("tiny_llama", ["lora.use_dora=true"]), ("tiny_llama", ["lora.init_lora_weights=pissa_niter_2"]),
            ("tiny_llama", ["lora.init_lora_weights=olora"]), ("tiny_llama", ["lora.init_lora_weights=gaussian"])]


@pytest.mark.parametrize("model,variant", VARIANTS, ids=[f"{m}-{'-'.join(v)}" for m, v in VARIANTS])
def test_a_variant_trains_restores_the_base_and_saves_an_adapter_peft_loads_on_the_original_base(
        tmp_path, model, variant):
    from peft import PeftModel

    cfg = compose([f"model={model}", "lora.r=4", "lora.lora_dropout=0.0", "tracking=none",
                   "trainer.generation_metrics=[exact_match]", *variant])
    base = load_base(cfg.model, torch.device("cpu"))
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    batch = _batch(base.model.config.vocab_size)
    with torch.no_grad():
        base_logits = base.model(input_ids=batch["input_ids"]).logits

    peft_model = attach_adapter(base, cfg)
    with torch.no_grad(), peft_model.disable_adapter(), original_base(peft_model):  # the base, as eval sees it
        torch.testing.assert_close(peft_model(input_ids=batch["input_ids"]).logits, base_logits)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(5):
        causal_lm_loss(peft_model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(trained, base_logits, atol=1e-3), "the adapter trained"
    save_adapter(peft_model, str(tmp_path / "adapter"))
    detach_adapter(peft_model)

    after = base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the shared base is given back untouched"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # an init that moves base weights is saved converted: loading it must not run that init again
    assert not str(config["init_lora_weights"]).startswith(("pissa", "olora"))
    loaded = PeftModel.from_pretrained(base.model, str(tmp_path / "adapter"))
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch["input_ids"]).logits, trained, rtol=1e-4, atol=1e-4)
    loaded.unload()


def test_variant_values_are_checked():
    plain = ["trainer.generation_metrics=[exact_match]"]  # no optional package needed
    with pytest.raises(ConfigError, match="lora.init_lora_weights: must be one of default, gaussian"):
        compose([*plain, "lora.init_lora_weights=loftq"])
    with pytest.raises(ConfigError, match="orthogonal needs an even lora.r"):
        compose([*plain, "lora.init_lora_weights=orthogonal", "lora.r=3"])
    assert compose([*plain, "lora.init_lora_weights=pissa_niter_4"]).lora.init_lora_weights == "pissa_niter_4"
    with pytest.raises(ConfigError, match="olora: peft's OLoRA init does not handle model tiny_gpt2"):
        compose([*plain, "model=tiny_gpt2", "lora.init_lora_weights=olora"])
