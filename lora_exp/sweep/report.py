"""What a sweep prints: one line per finished trial, written whole (several processes print),
with the sweep's progress: trials done of the study's budget, elapsed time, ETA, trials/hour."""
from __future__ import annotations

import sys
import time
from typing import Any

from lora_exp.core.status import TrialStatus


def write_line(text: str) -> None:
    """One line to stdout in one write: several processes print trial lines at once, and with
    PYTHONUNBUFFERED (common in containers) `print` writes the text and its newline separately,
    so two processes' lines could interleave."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def study_counts(study: Any) -> tuple[int, int]:
    """(trials that count toward the budget: COMPLETE and PRUNED, FAIL): a failed trial is
    replaced, so it is not one of the study's n_trials."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    failed = sum(t.state == TrialState.FAIL for t in trials)
    return len(trials) - failed, failed


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def progress_text(done: int, done_at_start: int, n_trials: int, started: float, failed: int = 0,
                  eta_s: float | None = None) -> str:
    """Elapsed time since this command started, the ETA of the study's last trial, and this
    command's rate so far in trials an hour. The ETA is `eta_s` where the caller has a better
    one (a pack, whose trials end in waves, from its trial-steps left), else the trials left at
    that rate."""
    elapsed = max(1e-6, time.time() - started)
    finished = done - done_at_start
    parts = [f"elapsed {duration(elapsed)}"]
    if finished > 0:
        rate = finished / elapsed
        eta = eta_s if eta_s is not None else max(0, n_trials - done) / rate
        parts += [f"ETA {duration(eta)}", f"{3600 * rate:.1f} trials/h"]
    if failed:
        parts.append(f"{failed} failed")
    return ", ".join(parts)


def shown_overrides(overrides: list[str]) -> str:
    """A trial's overrides as its line shows them: a fractional number to 4 significant digits
    (`lora.lora_dropout=0.04874`, `trainer.lr=0.0001879`); the run's tag and config and `lora-exp
    best`'s command keep every digit."""
    shown = []
    for item in overrides:
        key, _, text = item.partition("=")
        try:
            value = float(text)
        except ValueError:
            value = 0.0
        shown.append(item if value.is_integer() else f"{key}={value:.4g}")
    return " ".join(shown)


def trial_line(metrics: list[str], n_trials: int, done: str, number: int, status: TrialStatus, value: Any,
               overrides: list[str], wall: str, at_step: int | None = None, progress: str = "") -> str:
    """The one line a sweep prints per finished trial (packed or not)."""
    if isinstance(value, list):
        shown = " ".join(f"{m}={v:.4g}" for m, v in zip(metrics, value))
    else:
        shown = f"{metrics[0]}={value:.4f}" if value is not None else metrics[0] + "=-"
    if at_step is not None:
        shown += f"@{at_step}"
    tail = f"  [{progress}]" if progress else ""
    trial = f"trial {number:>3} {status.value:<8} {shown}  {shown_overrides(overrides)}"
    return f"[{done}/{n_trials}] {trial}  ({wall}){tail}"
