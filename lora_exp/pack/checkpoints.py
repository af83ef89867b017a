"""A packed trial's checkpoint: its slot's state at an eval, kept with its MLflow run
(`checkpoint/state.pt`, where an unpacked trial keeps its own), so that the retry of a trial whose
worker was killed resumes there, in a pack, with the loss curve it would have had.

A slot's state is what it trains of the pack's flat buffers (its rank prefix of each module it
targets: weights and AdamW's two moments), its step and what it logged. Everything else follows
from the step: the data order (its seed's schedule), the dropout masks (a hash of seed, step and
position) and the learning rate. A trial keeps a checkpoint once it has `pack.checkpoint_seconds`
of work unsaved, and the pack's checkpoints take at most SAVE_SHARE of its host time (`Saver`).
Nothing waits for the GPU: at the eval the slot's state is gathered on the device and copied to
pinned host memory behind the step in flight (`capture`; the slot moves on at once), and the file
is written a few per step once the copy has landed (`Saver.write`). Saving with a host copy at the
eval itself held the GPU idle while the files were written (4-5 s a window of a thousand-trial
pack). An unpacked trial's checkpoint and a packed one do not resume each other (`format`).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_exp.pack.model import PackedModel
from lora_exp.pack.slots import SlotRun
from lora_exp.sweep.checkpoints import FILE, FOLDER, download_checkpoint, drop_checkpoint

log = logging.getLogger("lora_exp")

FORMAT = "pack-slot-1"
#: the share of a pack's host time its checkpoints may take (`Saver`)
SAVE_SHARE = 0.05
#: bytes of captured states waiting for their files at most (more trials wait for a later eval)
PENDING_BYTES = 2 << 30


@dataclass
class Capture:
    """A trial's state at an eval, on its way to the host (`ready`: the CUDA event after which
    `state` holds it; None: it does already)."""

    run: SlotRun
    step: int
    meta: dict[str, Any]
    state: torch.Tensor  # [3, columns]: parameters, AdamW's first and second moments
    ready: Any = None


def capture(pm: PackedModel, run: SlotRun, step: int) -> Capture:
    """The trial's state after `step` (its slot holds still for the eval), gathered on the device
    and queued to pinned host memory: nothing waits for the GPU, and the slot may move on at once
    (the copy runs before the next step in stream order)."""
    cols = pm.columns(run.slot)
    spec = run.spec
    rows = torch.stack([buf[run.slot].index_select(0, cols) for buf in (pm.params, pm.exp_avg, pm.exp_avg_sq)])
    meta = {"format": FORMAT, "step": step, "r": spec.r, "targets": list(spec.targets), "columns": int(cols.numel()),
            "tokens": run.tokens, "loss_curve": list(run.result.loss_curve),
            "eval_curve": list(run.result.eval_curve)}
    if pm.device.type != "cuda":
        return Capture(run, step, meta, rows)
    host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    host.copy_(rows, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return Capture(run, step, meta, host, ready)


def state_of(c: Capture) -> dict[str, Any]:
    if c.ready is not None:
        c.ready.synchronize()
    params, exp_avg, exp_avg_sq = c.state.unbind(0)
    return {**c.meta, "params": params, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def write_state(c: Capture) -> None:
    """Keep a captured state with its trial's run."""
    run = c.run
    tmp = tempfile.mkdtemp(prefix="lora-exp-checkpoint-")
    torch.save(state_of(c), Path(tmp) / FILE)
    run.tracker.log_dir(tmp, FOLDER)
    cleanup = getattr(run.tracker, "remove_after", None)  # a queued upload: remove once it ran
    (cleanup or (lambda path: shutil.rmtree(path, ignore_errors=True)))(tmp)


class Saver:
    """Which trials keep a checkpoint at an eval: those with `every` seconds of work unsaved (since
    their last checkpoint, or their start: a trial shorter than that is simply run again), the most
    unsaved first, within `share` of the pack's time (host time to capture and write: a file of 28
    MB for GPT-2 at rank 16 on every module, and a thousand trials evaluate together in a full pack)
    and PENDING_BYTES of captured states not yet written; the others wait for a later eval.
    Captured states are written by `write`, a few per step, oldest first."""

    def __init__(self, every: float | None, share: float = SAVE_SHARE):
        self.every, self.share = every, share
        self.start = time.perf_counter()
        self.spent = 0.0
        self.pending: deque[Capture] = deque()
        self.pending_bytes = 0

    def save_due(self, pm: PackedModel, due: list[tuple[SlotRun, int]]) -> int:
        """Capture what is due of `due` (trials and the step of their eval); returns how many."""
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
            if self.spent > self.share * (t0 - self.start) or self.pending_bytes >= PENDING_BYTES:
                break
            self.discard(run)  # an older state not written yet: this one replaces it
            c = capture(pm, run, step)
            self.pending.append(c)
            self.pending_bytes += c.state.numel() * c.state.element_size()
            run.checkpoint_at = time.perf_counter()
            self.spent += run.checkpoint_at - t0
            saved += 1
        return saved

    def write(self, budget: float | None) -> int:
        """Write captured states whose copies have landed, for up to `budget` seconds (at least
        one; all, waiting for their copies, if None); returns how many."""
        t0, written = time.perf_counter(), 0
        while self.pending and (budget is None or not written or time.perf_counter() - t0 < budget):
            c = self.pending[0]
            if budget is not None and c.ready is not None and not c.ready.query():
                break
            self.pending.popleft()
            self.pending_bytes -= c.state.numel() * c.state.element_size()
            write_state(c)
            written += 1
        self.spent += time.perf_counter() - t0
        return written

    def discard(self, run: SlotRun) -> None:
        """Forget `run`'s captured state not yet written (the trial ended, or a newer one replaces it)."""
        for c in [c for c in self.pending if c.run is run]:
            self.pending.remove(c)
            self.pending_bytes -= c.state.numel() * c.state.element_size()


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
    cols = pm.columns(run.slot)
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
