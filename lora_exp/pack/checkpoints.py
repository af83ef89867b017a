"""A packed trial's checkpoint: its slot's state at an eval, kept with its MLflow run
(`checkpoint/state.pt`, where an unpacked trial keeps its own), so that the retry of a trial whose
worker was killed resumes there, in a pack, with the loss curve it would have had.

A slot's state is what it trains of the pack's flat buffers (its rank prefix of each module it
targets: weights and AdamW's two moments), its step and what it logged. Everything else follows
from the step: the data order (its seed's schedule), the dropout masks (a hash of seed, step and
position) and the learning rate. Saving copies the slot's parameters to the host (a wait for the
GPU), so a trial saves at most once per `pack.checkpoint_seconds`; an unpacked trial's
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


def maybe_save(pm: PackedModel, run: SlotRun, step: int, every: float | None) -> None:
    """Keep the trial's state with its run if its last save is `every` seconds old (or it has none)."""
    if every is None or not (run.tracker.run_id is not None or getattr(run.tracker, "records_artifacts", False)):
        return
    now = time.perf_counter()
    if run.checkpoint_at is not None and now - run.checkpoint_at < every:
        return
    tmp = tempfile.mkdtemp(prefix="lora-exp-checkpoint-")
    torch.save(slot_state(pm, run, step), Path(tmp) / FILE)
    run.tracker.log_dir(tmp, FOLDER)
    cleanup = getattr(run.tracker, "remove_after", None)  # a queued upload: remove once it ran
    (cleanup or (lambda path: shutil.rmtree(path, ignore_errors=True)))(tmp)
    run.checkpoint_at = now


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
