"""The pack's Triton kernels, each a torch custom op (or launcher) with a torch reference it is
tested against: `adamw` (the optimizer over every slot's live blocks), `lora` (each slot's LoRA
delta, its own rank and modules only; `lora_tiled`: its backward for long row groups;
`lora_gemm`: the base product with the delta in its epilogue, off by default), `swiglu` (a SwiGLU
MLP's activation with its down projection's LoRA), `head` (the next-token loss and the logits'
gradient), `attention` (causal attention over short rows), and `hash` (the counter hash of
`core.randomness`, bit for bit, and the dropout masks on it)."""
from __future__ import annotations

import importlib
import re

#: each kernel module's constants that the benches time other values of and `pack.kernel_constants`
#: sets for a sweep (each module's TUNABLE); here so a config is checked without importing triton
TUNABLES = {
    "lora": ("BK", "BN", "NUM_WARPS", "MIN_SPLIT", "MAX_M", "BM", "PROGRAMS_PER_SM", "SWIGLU", "GEMM"),
    "swiglu": ("BM", "BK", "NUM_WARPS"),
    "head": ("BLOCK", "NUM_WARPS"),
    "lora_gemm": ("BM", "BN", "BK", "NUM_WARPS", "NUM_STAGES", "GROUP_M", "MIN_WIDTH"),
}


def parse_constants(text: str) -> list[tuple[str, str, int]]:
    """(module, name, value) for each item of `NAME=VALUE,...`: NAME one of kernels.lora's TUNABLE,
    or `swiglu.NAME` / `head.NAME` / `lora_gemm.NAME` for those kernels' own; ValueError naming a
    wrong item."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(?:(\w+)\.)?(\w+)=(-?\d+)", item)
        module, name = (match.group(1) or "lora", match.group(2)) if match else ("", "")
        if name not in TUNABLES.get(module, ()):
            raise ValueError(f"{item!r}: not NAME=INTEGER with NAME one of {', '.join(TUNABLES['lora'])} "
                             f"(kernels.lora), or MODULE.NAME for {', '.join(m for m in TUNABLES if m != 'lora')}")
        out.append((module, name, int(match.group(3))))
    return out


def set_constants(text: str) -> dict[tuple[str, str], int]:
    """Set the kernels' tunable constants from `NAME=VALUE,...` (`parse_constants`: every item is
    checked before any is set); returns the values they had, keyed by (module, name), for
    `restore_constants`."""
    before: dict[tuple[str, str], int] = {}
    for module_name, name, value in parse_constants(text):
        module = importlib.import_module(f"{__name__}.{module_name}")
        before.setdefault((module_name, name), getattr(module, name))
        setattr(module, name, value)
    return before


def restore_constants(before: dict[tuple[str, str], int]) -> None:
    for (module_name, name), value in before.items():
        setattr(importlib.import_module(f"{__name__}.{module_name}"), name, value)
