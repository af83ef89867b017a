"""The pack's Triton kernels, each a torch custom op (or launcher) with a torch reference it is
tested against: `adamw` (the optimizer over every slot's live blocks), `lora` (each slot's LoRA
delta, its own rank and modules only; `lora_tiled`: its backward for long row groups), `head`
(the next-token loss and the logits' gradient), `attention` (causal attention over short rows),
and `hash` (the counter hash of `core.randomness`, bit for bit, and the dropout masks on it)."""
from __future__ import annotations

import importlib
import os

#: where a process takes other values of the kernels' tunable constants from (benches and the GPU
#: correctness matrix): `NAME=VALUE,...`, NAME one of kernels.lora's TUNABLE, or `swiglu.NAME` /
#: `head.NAME` for those kernels' own; read when the kernels are first imported
CONSTANTS_ENV = "LORA_EXP_KERNEL_CONSTANTS"


def set_constants(text: str) -> dict[tuple[str, str], int]:
    """Set the kernels' tunable constants from `NAME=VALUE,...` (see CONSTANTS_ENV); returns the
    values they had, keyed by (module, name), to put back."""
    values = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        module_name, _, name = name.rpartition(".")
        module_name = module_name or "lora"
        module = importlib.import_module(f"{__name__}.{module_name}") if module_name in ("lora", "swiglu", "head") \
            else None
        if not sep or module is None or name not in module.TUNABLE or not value.lstrip("-").isdigit():
            raise ValueError(f"{item!r}: not NAME=INTEGER with NAME one of kernels.lora's tunable constants "
                             f"(or swiglu.NAME, head.NAME)")
        values.append((module, module_name, name, int(value)))
    before: dict[tuple[str, str], int] = {}
    for module, module_name, name, value in values:
        before.setdefault((module_name, name), getattr(module, name))
        setattr(module, name, value)
    return before


def restore_constants(before: dict[tuple[str, str], int]) -> None:
    for (module_name, name), value in before.items():
        setattr(importlib.import_module(f"{__name__}.{module_name}"), name, value)


if os.environ.get(CONSTANTS_ENV):
    set_constants(os.environ[CONSTANTS_ENV])
