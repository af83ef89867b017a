"""A packed trial's checkpoint: its slot's state at an eval, kept with its MLflow run
(`checkpoint/state.pt`, where an unpacked trial keeps its own), so that the retry of a trial whose
worker was killed resumes there, in a pack, with the loss curve it would have had.

A slot's state is what it trains of the pack's flat buffers (its rank prefix of each module it
targets: weights and AdamW's two moments), its step and what it logged. Everything else follows
from the step: the data order (its seed's schedule), the dropout masks (a hash of seed, step and
position) and the learning rate. Saving copies the slot's parameters to the host (a wait for the
GPU) and writes a file, so a trial saves once it has `pack.checkpoint_seconds` of work unsaved,
and the pack's checkpoints take at most SAVE_SHARE of its time (`Saver`); an unpacked trial's
checkpoint and a packed one do not resume each other (`format`).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lora_exp.pack.model import PackedModel
from lora_exp.pack.slots import SlotRun
from lora_exp.sweep.checkpoints import FILE, FOLDER, download_checkpoint, drop_checkpoint

log = logging.getLogger("lora_exp")

FORMAT = "pack-slot-1"
#: the share of a pack's time its checkpoints may take (`Saver`)
SAVE_SHARE = 0.05


def slot_columns(pm: PackedModel, slot: int) -> torch.Tensor:
    """The columns of the flat buffers the trial in `slot` trains (each tensor's live prefix)."""
    parts = [torch.arange(cols.start, cols.start + int(live))
             for (cols, _), live in zip(pm.tensors, pm.slot_host[:, slot])]
    return torch.cat(parts).to(pm.device)


def slot_state(pm: PackedModel, run: SlotRun, step: int) -> dict[str, Any]:
    """The trial's state after `step` (its slot holds still for the eval: nothing moves meanwhile)."""
    cols = slot_columns(pm, run.slot)
    spec = run.spec
    return {"format": FORMAT, "step": step, "r": spec.r, "targets": list(spec.targets), "columns": int(cols.numel()),
            "params": pm.params[run.slot, cols].cpu(), "exp_avg": pm.exp_avg[run.slot, cols].cpu(),
            "exp_avg_sq": pm.exp_avg_sq[run.slot, cols].cpu(), "tokens": run.tokens,
            "loss_curve": list(run.result.loss_curve), "eval_curve": list(run.result.eval_curve)}


def save(pm: PackedModel, run: SlotRun, step: int) -> None:
    """Keep the trial's state after `step` with its run."""
    tmp = tempfile.mkdtemp(prefix="lora-exp-checkpoint-")
    torch.save(slot_state(pm, run, step), Path(tmp) / FILE)
    run.tracker.log_dir(tmp, FOLDER)
    cleanup = getattr(run.tracker, "remove_after", None)  # a queued upload: remove once it ran
    (cleanup or (lambda path: shutil.rmtree(path, ignore_errors=True)))(tmp)
    run.checkpoint_at = time.perf_counter()


class Saver:
    """Which trials keep a checkpoint at an eval: those with `every` seconds of work unsaved (since
    their last checkpoint, or their start: a trial shorter than that is simply run again), within
    `share` of the pack's time (a checkpoint copies the slot to the host and writes a file: 28 MB,
    ~70 ms, for GPT-2 at rank 16 on every module; a thousand trials evaluate together in a full
    pack), the trials with the most unsaved work first; the others wait for a later eval."""

    def __init__(self, every: float | None, share: float = SAVE_SHARE):
        self.every, self.share = every, share
        self.start = time.perf_counter()
        self.spent = 0.0

    def save_due(self, pm: PackedModel, due: list[tuple[SlotRun, int]]) -> int:
        """Save what is due of `due` (trials and the step of their eval); returns how many."""
        if self.every is None:
            return 0
        now = time.perf_counter()

        def unsaved(run: SlotRun) -> float:
            return now - (run.checkpoint_at if run.checkpoint_at is not None else run.started)

        due = [(run, step) for run, step in due
               if (run.tracker.run_id is not None or getattr(run.tracker, "records_artifacts", False))
               and unsaved(run) >= self.every]
        saved = 0
        for run, step in sorted(due, key=lambda d: unsaved(d[0]), reverse=True):
            t0 = time.perf_counter()
            if self.spent > self.share * (t0 - self.start):
                break
            save(pm, run, step)
            self.spent += time.perf_counter() - t0
            saved += 1
        return saved


def drop(run: SlotRun) -> None:
    """The trial ended (not failed): its checkpoint is no longer needed."""
    if run.checkpoint_at is not None and run.error is None:
        drop_checkpoint(run.tracker)


def load(client: Any, run_id: str) -> dict[str, Any] | None:
    """A packed trial's checkpoint kept with run `run_id`, or None (none saved, or an unpacked one)."""
    state = download_checkpoint(client, run_id)
    if state is None:
        return None
    if state.get("format") != FORMAT:
        log.info("run %s's checkpoint is an unpacked trial's: the retry starts from step 0", run_id)
        return None
    return state


def restore(pm: PackedModel, run: SlotRun, state: dict[str, Any]) -> bool:
    """Put the state back into the trial's fresh slot and what it logged into its record; False
    (start from step 0) where it is not this trial's (another rank or targets)."""
    cols = slot_columns(pm, run.slot)
    if (state["r"], list(state["targets"]), state["columns"]) != (run.spec.r, list(run.spec.targets), cols.numel()) \
            or not 0 < int(state["step"]) < run.spec.steps:
        log.info("a checkpoint that does not fit this trial: it starts from step 0")
        return False
    slot, step = run.slot, int(state["step"])
    for buf, key in ((pm.params, "params"), (pm.exp_avg, "exp_avg"), (pm.exp_avg_sq, "exp_avg_sq")):
        buf[slot, cols] = state[key].to(pm.device, buf.dtype)
    if pm.low is not None:
        pm.low[slot].copy_(pm.params[slot])
    pm.step[slot] = step
    run.result.loss_curve[:] = [(int(s), float(v)) for s, v in state["loss_curve"]]
    run.result.eval_curve[:] = [(int(s), float(v)) for s, v in state["eval_curve"]]
    run.result.steps = step
    run.last_log = step
    return True
