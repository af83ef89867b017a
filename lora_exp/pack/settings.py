"""The `pack` config group: how `lora-exp sweep pack=K` trains K trials at once on one frozen
base (lora_exp.pack), checked before any model loads like the rest of lora_exp.config."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from lora_exp.errors import check

#: how a pack's training step is compiled (lora_exp.pack.compile)
PACK_COMPILE = ("auto", "off", "parts", "layers", "full", "graphs")
PACK_LORA = ("kernels", "bmm")
PACK_ATTENTION = ("rows", "model")
#: each pack kernel module's constants that the benches time other values of and
#: `pack.kernel_constants` sets for a sweep (lora_exp.pack.kernels: each module's TUNABLE)
KERNEL_TUNABLES = {
    "lora": ("BK", "BN", "NUM_WARPS", "MIN_SPLIT", "MAX_M", "BM", "PROGRAMS_PER_SM", "SWIGLU", "GEMM"),
    "swiglu": ("BM", "BK", "NUM_WARPS"),
    "head": ("BLOCK", "NUM_WARPS"),
    "lora_gemm": ("BM", "BN", "BK", "NUM_WARPS", "NUM_STAGES", "GROUP_M", "MIN_WIDTH"),
}
#: environment variables that override a pack setting (documented in docs/packed-trials.md)
PACK_ENV = {"LORA_EXP_PACK_COMPILE": "compile", "LORA_EXP_PACK_LORA": "lora", "LORA_EXP_PACK_ATTENTION": "attention",
            "LORA_EXP_PACK_TRACKERS": "trackers", "LORA_EXP_PACK_KERNEL_CONSTANTS": "kernel_constants"}


def parse_kernel_constants(text: str) -> list[tuple[str, str, int]]:
    """(module, name, value) for each item of `NAME=VALUE,...`: NAME one of kernels.lora's tunable
    constants, or `swiglu.NAME` / `head.NAME` / `lora_gemm.NAME` for those kernels' own
    (KERNEL_TUNABLES); ValueError naming a wrong item."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(?:(\w+)\.)?(\w+)=(-?\d+)", item)
        module, name = (match.group(1) or "lora", match.group(2)) if match else ("", "")
        if name not in KERNEL_TUNABLES.get(module, ()):
            others = ", ".join(m for m in KERNEL_TUNABLES if m != "lora")
            raise ValueError(f"{item!r}: not NAME=INTEGER with NAME one of {', '.join(KERNEL_TUNABLES['lora'])} "
                             f"(kernels.lora), or MODULE.NAME for {others}")
        out.append((module, name, int(match.group(3))))
    return out


@dataclass(frozen=True)
class PackConfig:
    """Packed trials (`lora-exp sweep pack=K`): K trials trained at once on one frozen base."""

    #: trials per pack (`pack=K` on the sweep command line); 1 trains one trial at a time; auto:
    #: as many as the GPU's memory holds (lora_exp.pack.sizing), one at a time on a CPU.
    slots: Any = 1
    #: auto (on CUDA: layers or parts, from the steps ahead; off elsewhere), off (eager), parts
    #: (Triton optimizer, compiled masks and loss chunks), layers (also one compiled graph every
    #: decoder layer shares), full (the whole step one compiled graph), graphs (layers, and the whole
    #: step recorded as one CUDA graph and replayed).
    compile: str = "auto"
    #: how a compiled CUDA step computes the LoRA deltas: kernels (each slot's own rank and modules
    #: only) or bmm (every slot padded to the pack's rank).
    lora: str = "kernels"
    #: rows (the pack's own causal attention, no mask) or model (the model's own implementation).
    attention: str = "rows"
    #: tracking processes (MLflow and Optuna writes); null = one per four cores, up to four.
    trackers: Optional[int] = None
    #: a packed trial keeps its state with its run at an eval once it has this many seconds of work
    #: unsaved (a killed sweep's retried trial resumes there; checkpoints take at most 5% of the
    #: pack's time); 0 = at every eval, null = never.
    checkpoint_seconds: Optional[float] = 60.0
    #: other values of the CUDA kernels' tunable constants, `NAME=VALUE,...` (parse_kernel_constants:
    #: kernels.lora's, or swiglu.NAME / head.NAME / lora_gemm.NAME), for timing and checking them; "" = their own
    kernel_constants: str = ""

    @property
    def packs(self) -> bool:
        """Trials share a pack (several slots, or `auto`)."""
        return self.slots == "auto" or self.slots > 1

    def __post_init__(self) -> None:
        check(self.slots == "auto" or (isinstance(self.slots, int) and not isinstance(self.slots, bool)
                                        and self.slots >= 1),
              "pack.slots", f"must be auto or a whole number >= 1 (trials trained at once), got {self.slots!r}")
        check(self.compile in PACK_COMPILE, "pack.compile",
              f"must be one of {', '.join(PACK_COMPILE)}, got {self.compile!r}")
        check(self.lora in PACK_LORA, "pack.lora", f"must be one of {', '.join(PACK_LORA)}, got {self.lora!r}")
        check(self.attention in PACK_ATTENTION, "pack.attention",
              f"must be one of {', '.join(PACK_ATTENTION)}, got {self.attention!r}")
        if self.trackers is not None:
            check(self.trackers >= 1, "pack.trackers", f"must be >= 1 or null, got {self.trackers}")
        if self.checkpoint_seconds is not None:
            check(self.checkpoint_seconds >= 0, "pack.checkpoint_seconds",
                  f"must be >= 0 (0 = at every eval) or null (never), got {self.checkpoint_seconds}")
        if self.kernel_constants:
            try:
                parse_kernel_constants(str(self.kernel_constants))
            except ValueError as exc:
                check(False, "pack.kernel_constants", str(exc))
