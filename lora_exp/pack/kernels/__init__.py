"""The pack's Triton kernels, each a torch custom op (or launcher) with a torch reference it is
tested against: `adamw` (the optimizer over every slot's live blocks), `lora` (each slot's LoRA
delta, its own rank and modules only; `lora_slot`: its programs; `lora_tiled`: the backward of
long row groups; `lora_gemm`: the base product with the delta in its epilogue, off by default),
`swiglu` (a SwiGLU MLP's activation with its down projection's LoRA), `head` (the next-token
loss and the logits' gradient), `attention` (causal attention over short rows), and `hash` (the
counter hash of `core.randomness`, bit for bit, and the dropout masks on it)."""
from __future__ import annotations

import importlib

from lora_exp.pack.settings import parse_kernel_constants


def set_constants(text: str) -> dict[tuple[str, str], int]:
    """Set the kernels' tunable constants from `NAME=VALUE,...` (`settings.parse_kernel_constants`:
    every item is checked before any is set); returns the values they had, keyed by (module, name), for
    `restore_constants`."""
    before: dict[tuple[str, str], int] = {}
    for module_name, name, value in parse_kernel_constants(text):
        module = importlib.import_module(f"{__name__}.{module_name}")
        before.setdefault((module_name, name), getattr(module, name))
        setattr(module, name, value)
    return before


def restore_constants(before: dict[tuple[str, str], int]) -> None:
    for (module_name, name), value in before.items():
        setattr(importlib.import_module(f"{__name__}.{module_name}"), name, value)
