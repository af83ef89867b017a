"""Results of a pack's steps on their way to the host, without stopping the GPU.

Losses accumulate on the device (`sums`); a snapshot is taken at each trial's logging steps and
the snapshots go to the host in one copy per few dozen steps (or with an eval's values), queued
behind the steps in flight. `collect` reads back the copies the GPU has finished: each logged
slot's mean loss since its last log point, then each evaluated slot's eval loss and callbacks."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lora_exp.core.status import TrialStatus
from lora_exp.pack import checkpoints
from lora_exp.pack.runtime import PackRuntime
from lora_exp.pack.slots import SlotRun, SlotTable, lr_at


@dataclass
class HostCopy:
    """Logged losses (and evals) on their way to the host; `ready` is recorded after the copy."""

    records: list[tuple[int, SlotRun, int, int]]
    evals: list[tuple[int, SlotRun | None]]
    sums: torch.Tensor | None = None
    values: torch.Tensor | None = None
    ready: Any = None
    launch_s: float = 0.0


def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """A pinned host copy of `t`, queued (read it once the stream has passed this point)."""
    if t is None:
        return None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class HostDrain:
    """The pack's losses and evals, from the device to each trial's record."""

    def __init__(self, rt: PackRuntime, table: SlotTable):
        self.rt, self.table = rt, table
        self.sums = torch.zeros(rt.k, dtype=torch.float64, device=rt.device)
        self.snapshots: list[torch.Tensor] = []
        self.records: list[tuple[int, SlotRun, int, int]] = []  # (snapshot, run, step, steps since its last log)
        self.pending: list[HostCopy] = []  # copies to the host in flight, oldest first
        #: called once before the callbacks of each batch of evals (a sweep reads its study once)
        self.eval_batch_hook: Any = None
        self.saver = checkpoints.Saver(rt.checkpoint_seconds)

    def snapshot(self, logs: np.ndarray) -> None:
        """The running sums now, for the slots at a logging step (`logs`, a mask)."""
        self.snapshots.append(self.sums.clone())
        for slot in np.flatnonzero(logs):
            run = self.table.runs[slot]
            assert run is not None
            step = int(self.table.host_step[slot])
            self.records.append((len(self.snapshots) - 1, run, step, step - run.last_log))
            run.last_log = step

    def launch(self, eval_slots: list[int]) -> None:
        """Queue the copy of the logged losses to the host (and the evals of `eval_slots`, whose
        trials hold still meanwhile), without waiting: `collect` reads it when the GPU is there."""
        sums = torch.stack(self.snapshots) if self.snapshots else None
        records, self.snapshots, self.records = self.records, [], []
        values, t0 = None, time.perf_counter()
        if eval_slots:
            values = self.rt.slot_eval(eval_slots)
        copy = HostCopy(records, [(s, self.table.runs[s]) for s in eval_slots])
        if self.rt.device.type == "cuda":
            copy.sums = to_host(sums)
            copy.values = to_host(values)
            copy.ready = torch.cuda.Event()
            copy.ready.record()
        else:
            copy.sums, copy.values = sums, values
        copy.launch_s = time.perf_counter() - t0
        self.rt.host_s["eval"] += copy.launch_s
        self.pending.append(copy)

    def collect(self, steps_run: int, wait: bool = False) -> list[SlotRun]:
        """Read back, in order, the host copies the GPU has finished (all of them if `wait`):
        log each slot's losses, then its eval (callbacks may stop it); evaluated trials go on,
        or wait for their generations if they reached their last step. Returns the trials that
        ended (failed, or stopped by a callback)."""
        ended: list[SlotRun] = []
        while self.pending:
            copy = self.pending[0]
            if copy.ready is not None and not copy.ready.query():
                if not wait:
                    break
                t0 = time.perf_counter()
                copy.ready.synchronize()
                self.rt.host_s["wait"] += time.perf_counter() - t0
            self.pending.pop(0)
            ended += self._log_losses(copy)
            if copy.evals:
                ended += self._read_evals(copy, steps_run)
        return ended

    def _log_losses(self, copy: HostCopy) -> list[SlotRun]:
        """Each logged slot's mean train loss since its last log point; a non-finite one fails the trial."""
        if copy.sums is None:
            return []
        sums = copy.sums.numpy()
        failed: list[SlotRun] = []
        for snap, run, step, count in copy.records:
            if run.error is not None:
                continue
            total = float(sums[snap, run.slot])
            value = (total - run.prev_sum) / max(1, count)
            run.prev_sum = total
            if not math.isfinite(value):
                run.fail(f"train loss became {value} at step {step}: trial stopped")
                run.tracker.set_tags({"failure_reason": f"non-finite train loss ({value}) at step {step}"})
                failed.append(run)
                continue
            run.result.loss_curve.append((step, value))
            run.result.steps = step
            run.tracker.log_metrics({"train_loss": value, "learning_rate": lr_at(run.spec, step)}, step)
        return failed

    def _read_evals(self, copy: HostCopy, steps_run: int) -> list[SlotRun]:
        """Eval loss of each slot (as eval_loss computes it alone), its callbacks, and what follows."""
        assert copy.values is not None
        t_read = time.perf_counter()
        values = copy.values.tolist()
        if self.eval_batch_hook is not None:
            self.eval_batch_hook()
        # the host's time on these evals (launch and read back; the steps run in between are others')
        seconds = copy.launch_s + time.perf_counter() - t_read
        stopped, resumed, due = [], [], []
        table = self.table
        for (slot, run), value in zip(copy.evals, values):
            if run is None or table.runs[slot] is not run or run.error is not None:
                continue
            run.eval_seconds += seconds / len(copy.evals)
            step = int(table.host_step[slot])
            run.result.eval_curve.append((step, value))
            run.tracker.log_metrics({"eval_loss": value}, step)
            stop = [cb.on_eval(step, {"eval_loss": value}) for cb in run.callbacks]
            if any(stop) and step < run.spec.steps:
                run.result.status = TrialStatus.PRUNED
                run.result.steps = step
                stopped.append(run)
            elif step >= run.spec.steps:
                run.result.steps = step
                table.finishing[slot] = steps_run
            else:
                resumed.append(slot)
                due.append((run, step))
        t_save = time.perf_counter()
        self.rt.host_s["eval"] += t_save - t_read
        self.saver.save_due(self.rt.pm, due)  # before the slots move on
        self.rt.pm.resume(resumed)
        self.rt.host_s["checkpoints"] += time.perf_counter() - t_save
        return stopped
