"""What a pack cannot train, said before any model loads: the base config's variant or bias
(`check_packable`, for a sweep's base config), and a trial's variant (`unpackable_variant`: such
trials run alone after the pack)."""
from __future__ import annotations

from lora_exp.config import PACKED_INITS, LoraSettings, RunConfig
from lora_exp.errors import ConfigError


def check_packable(cfg: RunConfig) -> None:
    """What rules packing out for a sweep's base config (one line, before any model loads)."""
    if cfg.pack.packs and cfg.lora.bias != "none":
        raise ConfigError(f"pack: lora.bias={cfg.lora.bias} trains the base model's biases, which the trials of a "
                          f"pack share; use lora.bias=none or pack=1")
    why = unpackable_variant(cfg.lora)
    if cfg.pack.packs and why:
        raise ConfigError(f"pack: {why} for every trial (the base config): use pack=1, or search it in the sweep's "
                          f"space (those trials run alone after the pack)")


def unpackable_variant(lora: LoraSettings) -> str | None:
    """Why a pack cannot train this adapter variant (None if it can): the pack trains plain LoRA
    with peft's default or gaussian init."""
    if lora.use_dora:
        return "lora.use_dora=true (DoRA) is not trained in a pack"
    if lora.init_lora_weights not in PACKED_INITS:
        return f"lora.init_lora_weights={lora.init_lora_weights} is not trained in a pack"
    return None
