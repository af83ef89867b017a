"""What a sweep prints: one line per finished trial, written whole (several processes print)."""
from __future__ import annotations

import sys
from typing import Any

from lora_exp.core.status import TrialStatus


def write_line(text: str) -> None:
    """One line to stdout in one write: several processes print trial lines at once, and with
    PYTHONUNBUFFERED (common in containers) `print` writes the text and its newline separately,
    so two processes' lines could interleave."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def trial_line(metrics: list[str], n_trials: int, done: str, number: int, status: TrialStatus, value: Any,
               overrides: list[str], wall: str, at_step: int | None = None) -> str:
    """The one line a sweep prints per finished trial (packed or not)."""
    if isinstance(value, list):
        shown = " ".join(f"{m}={v:.4g}" for m, v in zip(metrics, value))
    else:
        shown = f"{metrics[0]}={value:.4f}" if value is not None else metrics[0] + "=-"
    if at_step is not None:
        shown += f"@{at_step}"
    return f"[{done}/{n_trials}] trial {number:>3} {status.value:<8} {shown}  {' '.join(overrides)}  ({wall})"
