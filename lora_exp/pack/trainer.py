"""The packed training loop: what core.training does for one trial, for K trials at once.

Each slot of a `PackTrainer` holds one trial with its own tracker and callbacks; `step()` trains
every slot that is not held one optimizer step and returns the trials that ended (completed,
stopped by a callback, or failed). Per trial the result is what `run_trial` gives: the loss curve
at every logging step, evals, base-vs-adapter generations and scores, the adapter as a peft folder.

Host and GPU stay decoupled: a step launches its kernels without waiting; losses accumulate on
the device and reach the host in one copy per few dozen steps or with an eval (`drain`); a slot
whose eval is due holds still while the others train, and finished trials generate together and
write their adapters a few per step (`finish`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Sequence

import numpy as np
import torch

from lora_exp.config import RunConfig
from lora_exp.core.data import PreparedData
from lora_exp.core.models import BaseModel
from lora_exp.core.recording import NullTracker, Tracker, TrialResult, peak_memory_mb, record_start
from lora_exp.core.status import TrialStatus
from lora_exp.core.training import Callback
from lora_exp.errors import ConfigError
from lora_exp.pack import checkpoints
from lora_exp.pack.compile import compile_lock
from lora_exp.pack.drain import HostDrain
from lora_exp.pack.finish import Finisher
from lora_exp.pack.layers import matches
from lora_exp.pack.model import PackedModel
from lora_exp.pack.rows import batch_schedule
from lora_exp.pack.runtime import PackRuntime
from lora_exp.pack.slots import SlotRun, SlotTable, lr_at, pack_key, slot_spec
from lora_exp.pack.step import PackStep

log = logging.getLogger(__name__)

#: host copies of the accumulated losses at most this many steps apart
DRAIN_EVERY = 50
#: slots whose eval is due are evaluated together once the first has waited this many steps (or
#: this many are due); they hold still meanwhile, and the answer is read back a few steps later,
#: when the GPU gets there: an eval per step with a host sync each cost ~30% of a full pack's step
EVAL_GATHER_STEPS = 8
EVAL_GATHER_SLOTS = 256
#: host seconds a step may spend writing finished trials' adapters while the pack trains (at
#: least one a step; ~14 ms each on the H200's host at rank 16)
ADAPTER_WRITE_S = 0.02
#: host seconds a step may spend writing captured checkpoints (`checkpoints.Saver`; at least one)
CHECKPOINT_WRITE_S = 0.02
#: finished trials generate together (one `generate`, which syncs at every token, per batch)
#: once the first has waited this many steps or this many have finished
FINISH_GATHER_STEPS = 64
FINISH_GATHER_SLOTS = 64


class PackTrainer:
    """K slots on one frozen base; trials start in free slots and leave when they end."""

    def __init__(self, base: BaseModel, data: PreparedData, cfg: RunConfig, slots: int, max_rank: int,
                 modules: Sequence[str], compile: str | None = None):
        """`compile` overrides `cfg.pack.compile` (a sweep decides `auto` from the steps ahead)."""
        if cfg.lora.bias != "none":
            raise ConfigError(f"pack: lora.bias={cfg.lora.bias} trains the base model's biases, which the trials "
                              f"of a pack share; use lora.bias=none or pack=1")
        #: the kernels' constants this pack sets (pack.kernel_constants; the interpreter runs the
        #: kernels on the CPU), put back by close()
        self._constants = {}
        if cfg.pack.kernel_constants and (base.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
            from lora_exp.pack.kernels import set_constants

            self._constants = set_constants(cfg.pack.kernel_constants)
        self.rt = PackRuntime(base, data, cfg, slots, max_rank, modules, compile)
        self.key, self.k = pack_key(cfg), slots
        self.table = SlotTable(slots, cfg.trainer.eval_steps, self.rt.eval_table is not None)
        self.drain = HostDrain(self.rt, self.table)
        self.finisher = Finisher(self.rt)
        self.stepper = PackStep(self.rt, slots)
        self.held_slot_steps = 0  # slot-steps trials held (eval or generations pending) while others trained
        self.steps_run, self.trial_steps = 0, 0
        self.first_step: float | None = None
        self.created = time.perf_counter()
        #: seconds from making the pack to the end of its first step (compiling included)
        self.startup_s: float | None = None
        self._progress = (time.perf_counter(), 0)
        #: the slots that trained in the last step, and when it started (for each trial's share of the time)
        self._last_step: tuple[np.ndarray, float] | None = None

    @property
    def pm(self) -> PackedModel:
        return self.rt.pm

    @property
    def runs(self) -> list[SlotRun | None]:
        return self.table.runs

    @property
    def closing(self) -> Any:
        return self.finisher.closing

    @property
    def host_s(self) -> Any:
        return self.rt.host_s

    def set_eval_batch_hook(self, hook: Any) -> None:
        """`hook()` runs once before the callbacks of each batch of evals (a sweep reads its study once)."""
        self.drain.eval_batch_hook = hook

    # -- slots --

    def free_slots(self) -> list[int]:
        return self.table.free_slots()

    def free_count(self) -> int:
        return self.table.free_count()

    def live(self) -> int:
        return self.table.live()

    def steps_left(self) -> tuple[int, int]:
        return self.table.steps_left()

    def ending_within(self, steps: int, fraction: float = 1.0) -> int:
        return self.table.ending_within(steps, fraction)

    def evals_within(self, steps: int, fraction: float = 1.0) -> int:
        return self.table.evals_within(steps, fraction)

    def busy(self) -> bool:
        """Trials in slots, or finished ones whose adapters are still to be written."""
        return self.live() > 0 or bool(self.finisher.closing)

    def fits(self, cfg: RunConfig) -> str | None:
        """Why `cfg` cannot join this pack (None if it can)."""
        if pack_key(cfg) != self.key:
            return "different shared settings (model, data, batch size, logging/eval steps, precision)"
        if cfg.lora.r > self.pm.rank:
            return f"lora.r={cfg.lora.r} above the pack's rank {self.pm.rank}"
        missing = [m for m in cfg.target_modules if not any(matches(n, [m]) for n in self.pm.layers)]
        if missing:
            return f"targets {', '.join(missing)}, which this pack did not wrap"
        if cfg.lora.bias != "none":
            return "lora.bias is not none"
        return cfg.lora.unpackable()

    def start(self, slot: int, cfg: RunConfig, tracker: Tracker, callbacks: Sequence[Callback] = (),
              handle: Any = None, resume: dict[str, Any] | None = None) -> SlotRun:
        """Give `slot` to the trial `cfg`: fresh adapter, its data order, its run's config recorded;
        from `resume` (a packed trial's checkpoint, `pack.checkpoints`) on where it was."""
        t0 = time.perf_counter()
        why = self.fits(cfg)
        if why:
            raise ConfigError(f"pack: this trial cannot join the pack: {why}")
        rt, pm = self.rt, self.rt.pm
        spec = slot_spec(cfg, len(rt.data.train))
        pm.assign(slot, spec)
        sched = batch_schedule(len(rt.data.train), rt.batch, spec.seed, spec.steps)
        self.stepper.set_order(slot, sched)
        self.drain.sums[slot] = 0.0
        lengths = np.array(rt.train_table.lengths + [0])
        trainable = sum(spec.r * (pm.spans[n][1] + pm.spans[n][2]) for n in pm.layers if matches(n, spec.targets))
        run = self.table.new_run(cfg, spec, tracker, callbacks, handle, slot, int(lengths[sched.numpy()].sum()),
                                 trainable)
        self.stepper.dropout_on = pm.static or any(r is not None and r.spec.dropout > 0 for r in self.runs)
        record_start(tracker, cfg, trainable, trainable + rt.base_params, spec.steps, rt.data.key,
                     params={"pack_slots": self.k},
                     tags={"lora_exp.packed": f"slot {slot} of {self.k}"})
        if resume is not None and checkpoints.restore(pm, run, resume):
            step = run.result.steps
            self.table.host_step[slot] = step
            for s, value in run.result.loss_curve:  # what it had logged, logged again into this run
                tracker.log_metrics({"train_loss": value, "learning_rate": lr_at(spec, s)}, s)
            for s, value in run.result.eval_curve:
                tracker.log_metrics({"eval_loss": value}, s)
            tracker.set_tags({"resumed_at_step": str(step)})
            run.checkpoint_at = time.perf_counter()
        rt.host_s["start"] += time.perf_counter() - t0
        rt.host_s["starts"] += 1
        return run

    # -- one step for every live slot --

    def step(self) -> list[SlotRun]:
        """One optimizer step of every slot that trains; returns the trials that ended.

        A slot that reaches an eval (or its last step) holds still, exactly as it is, while the
        others train on: its eval runs with others' a few steps later, is read back when the GPU
        gets there (no host sync), and the trial then goes on, stops (its callbacks) or waits for
        its generations, which are also batched. Nothing waits on the GPU while any slot can train."""
        table, drain = self.table, self.drain
        if not any(run is not None for run in self.runs):
            return self.finisher.write_adapters(None)  # nothing left to train: close every finished trial
        self.train_step()
        ended: list[SlotRun] = []
        stalled = not self._trainable()  # every trial holds: wait for what they wait for
        if len(drain.snapshots) >= DRAIN_EVERY:
            drain.launch([])
        if table.due and (stalled or len(table.due) >= EVAL_GATHER_SLOTS
                          or self.steps_run - min(table.due.values()) >= EVAL_GATHER_STEPS):
            drain.launch(sorted(table.due))
            table.due.clear()
        ended += self._collect(wait=stalled)
        idle = not self._trainable() and not table.due and not drain.pending
        if table.finishing and (idle or len(table.finishing) >= FINISH_GATHER_SLOTS
                                or self.steps_run - min(table.finishing.values()) >= FINISH_GATHER_STEPS):
            # every logged loss read first (generation waits for the GPU anyway)
            if drain.snapshots:
                drain.launch([])
            ended += self._collect(wait=True)
            # (a trial whose last losses came back non-finite just now has failed: not finished)
            runs = [run for run in (self.runs[s] for s in sorted(table.finishing))
                    if run is not None and run.error is None]
            table.finishing.clear()
            for run in runs:
                run.compute_s = float(table.compute_s[run.slot])
            self.finisher.finish_completed(runs)
            for run in runs:  # their slots are free now; their adapters are written step by step
                self._release(run)
        for run in ended:
            self._release(run)
        if self.drain.saver.pending:
            t0 = time.perf_counter()
            self.drain.saver.write(CHECKPOINT_WRITE_S)
            self.rt.host_s["checkpoints"] += time.perf_counter() - t0
        return ended + self.finisher.write_adapters(ADAPTER_WRITE_S)

    def _collect(self, wait: bool) -> list[SlotRun]:
        """What the drain read back; trials a callback stopped get their final metrics."""
        ended = self.drain.collect(self.steps_run, wait)
        for run in ended:
            if run.result.status is TrialStatus.PRUNED:  # its final metrics, as a pruned trial alone logs them
                run.compute_s = float(self.table.compute_s[run.slot])
                self.finisher.close_metrics(run)
                run.tracker.log_metrics(run.result.metrics, step=run.result.steps)
        return ended

    def _trainable(self) -> bool:
        return bool(self.table.training(self.pm.paused).any())

    def train_step(self) -> bool:
        """One step of the slots not held; logs their losses (on the device) and holds those
        whose eval is due. False if no slot trains."""
        table, pm = self.table, self.pm
        training = table.training(pm.paused)
        if not training.any():
            return False
        self.held_slot_steps += table.live() - int(training.sum())
        start = time.perf_counter()
        if self._last_step is not None:
            table.share(start - self._last_step[1], self._last_step[0])
        self._last_step = (training, start)
        if self.first_step is None and self.rt.device.type == "cuda":
            # the first step compiles: the workers of a multi-GPU sweep take turns, so the later
            # ones load the first one's compiled graphs from the cache instead of compiling again
            with compile_lock() if pm.compile else contextlib.nullcontext():
                self.stepper.launch(self.drain.sums)
                torch.cuda.synchronize(self.rt.device)
        else:
            self.stepper.launch(self.drain.sums)
        if self.first_step is None:
            self.startup_s = time.perf_counter() - self.created
        table.host_step[training] += 1
        self.steps_run += 1
        self.trial_steps += int(training.sum())
        if self.first_step is None:
            self.first_step = start
        steps, rt = table.host_step, self.rt
        logs = training & ((steps % rt.logging_steps == 0) | (steps == table.steps_total))
        evals = training & (((steps % rt.eval_steps == 0) if rt.eval_steps else False) | (steps == table.steps_total))
        if logs.any():
            self.drain.snapshot(logs)
        held = [int(s) for s in np.flatnonzero(evals if rt.eval_table is not None else
                                                training & (steps == table.steps_total))]
        pm.pause(held)
        for slot in held:
            if rt.eval_table is not None:
                table.due[slot] = self.steps_run
            else:  # nothing to evaluate: a finished trial goes straight to its generations
                table.finishing[slot] = self.steps_run
        return True

    def _release(self, run: SlotRun) -> None:
        self.drain.saver.discard(run)
        checkpoints.drop(run)
        if self.table.remove(run):
            self.pm.release(run.slot)

    def write_pending(self) -> list[SlotRun]:
        """After an error: the adapters of the trials that finished training (`Finisher.write_pending`),
        and the checkpoints captured but not yet written (their retries resume there), as far as
        they can be written."""
        done = self.finisher.write_pending()
        try:
            self.drain.saver.write(None)
        except BaseException as exc:  # noqa: BLE001 -- the caller fails the trials in flight
            log.warning("pack: %d checkpoint(s) not written (%s)", len(self.drain.saver.pending),
                        f"{type(exc).__name__}: {exc}".splitlines()[0])
        return done

    # -- what a pack reports --

    def progress(self, every: float, verbose: bool = False) -> str | None:
        """A progress line at most every `every` seconds: busy slots, steps and the recent step
        time; `verbose` adds the engine's internals (slots holding, trials started, host seconds
        by what)."""
        now = time.perf_counter()
        last_time, last_steps = self._progress
        if now - last_time < every:
            return None
        self._progress = (now, self.steps_run)
        ms = 1e3 * (now - last_time) / max(1, self.steps_run - last_steps)
        line = f"{self.live()}/{self.k} slots busy, step {self.steps_run} at {ms:.1f} ms/step"
        host_s = self.rt.host_s
        if verbose:
            host = ", ".join(f"{what} {v:.1f}" for what, v in sorted(host_s.items()) if what != "starts" and v >= 0.05)
            line += (f" over the last {now - last_time:.0f}s ({self.trial_steps} trial-steps; {len(self.pm.paused)} "
                     f"holding for evals or generations; {int(host_s['starts'])} started; host seconds: "
                     f"{host or 'none over 0.05'})")
        host_s.clear()
        return line

    def summary(self) -> dict[str, Any]:
        """Pack-wide figures: steps, wall time since the first step (evals, generations and
        trial starts included), slot occupancy (slots training), the share of slot-steps held for
        evals or generations, and peak GPU memory."""
        wall = time.perf_counter() - self.first_step if self.first_step is not None else 0.0
        return {"slots": self.k, "compile": self.pm.mode, "startup_s": round(self.startup_s or 0.0, 2),
                "steps": self.steps_run, "trial_steps": self.trial_steps, "wall_s": round(wall, 2),
                "ms_per_step": round(1e3 * wall / max(1, self.steps_run), 2),
                "occupancy": round(self.trial_steps / max(1, self.steps_run * self.k), 4),
                "held": round(self.held_slot_steps / max(1, self.steps_run * self.k), 4),
                "peak_memory_gib": round(peak_memory_mb(self.rt.device) / 1024, 2), "device": str(self.rt.device)}

    def close(self) -> None:
        self.stepper.close()
        self.rt.close()
        if self._constants:
            from lora_exp.pack.kernels import restore_constants

            restore_constants(self._constants)


def train_packed(cfgs: list[RunConfig], base: BaseModel, data: PreparedData, trackers: Sequence[Tracker] | None = None,
                 slots: int | None = None, adapters_to: list[str] | None = None) -> list[TrialResult]:
    """Train `cfgs` packed (all in one pack if `slots` is None; else continuously, `slots` at a
    time). Returns the results in the order of `cfgs`. For tests and library use."""
    k = slots or len(cfgs)
    max_rank = max(c.lora.r for c in cfgs)
    modules = sorted({m for c in cfgs for m in c.target_modules})
    trainer = PackTrainer(base, data, cfgs[0], k, max_rank, modules)
    results: dict[int, TrialResult] = {}
    queue = list(enumerate(cfgs))
    try:
        while queue or trainer.busy():
            for slot in trainer.free_slots():
                if not queue:
                    break
                i, cfg = queue.pop(0)
                run = trainer.start(slot, cfg, trackers[i] if trackers else NullTracker(), handle=i)
                run.adapter_dir = adapters_to[i] if adapters_to else None
            for run in trainer.step():
                results[run.handle] = run.result
    finally:
        trainer.close()
    return [results[i] for i in range(len(cfgs))]
