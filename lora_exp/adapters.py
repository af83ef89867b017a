"""RunConfig -> peft.LoraConfig, and attaching / detaching an adapter on a shared frozen base."""
from __future__ import annotations

from typing import Any

import torch

from lora_exp.config import RunConfig
from lora_exp.errors import ConfigError
from lora_exp.models import BaseModel


def build_lora_config(cfg: RunConfig) -> Any:
    """One pure function from our typed config to peft's (names mirror peft's own)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.lora_alpha,
        lora_dropout=cfg.lora.lora_dropout,
        bias=cfg.lora.bias,
        target_modules=cfg.target_modules,
        fan_in_fan_out=cfg.model.fan_in_fan_out,
        use_rslora=cfg.lora.use_rslora,
        task_type="CAUSAL_LM",
    )


def attach_adapter(base: BaseModel, cfg: RunConfig) -> Any:
    """Wrap the shared base with a fresh adapter, initialised from trainer.seed.

    The base is modified in place (LoRA layers injected); `detach_adapter` restores it exactly,
    so the next trial in the same process starts from the same frozen weights.
    """
    from peft import get_peft_model

    missing = [m for m in cfg.target_modules if m not in base.module_names]
    if missing:
        raise ConfigError(f"lora.target_modules: model {cfg.model.name} has no module {', '.join(missing)} "
                          f"(it has: {', '.join(base.module_names)})")
    torch.manual_seed(cfg.trainer.seed)
    model = get_peft_model(base.model, build_lora_config(cfg))
    return model.to(base.device)


def detach_adapter(model: Any) -> Any:
    """Remove the LoRA layers, giving back the untouched base model."""
    return model.unload()


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total), as peft's print_trainable_parameters counts them."""
    return model.get_nb_trainable_parameters()


def trainable_line(model: Any) -> str:
    trainable, total = count_parameters(model)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}")
