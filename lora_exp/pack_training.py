"""The packed training loop: what training.py does for one trial, for K trials at once.

Each slot of a `PackTrainer` holds one trial with its own tracker and callbacks; `step()` trains
every live slot one optimizer step and returns the trials that ended (completed, stopped by a
callback, or failed). Per trial the result is what `run_trial` gives: the loss curve at every
logging step, evals, base-vs-adapter generations and scores, the adapter as a peft folder.

Host and GPU stay decoupled: a step launches its kernels without waiting; losses accumulate on
the device and reach the host in one copy per few dozen steps (or at an eval), not once a step.
"""
from __future__ import annotations

import logging
import math
from collections import Counter, deque
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch.profiler import record_function

from lora_exp.adapters import build_lora_config, train_mode
from lora_exp.config import RunConfig
from lora_exp.data import PreparedData
from lora_exp.errors import ConfigError
from lora_exp.evaluation import autocast, eval_loss, generate, generations_table, new_tokens, score_outputs
from lora_exp.models import BaseModel
from lora_exp.packed import (OutputHead, PackedModel, SlotSpec, TokenTable, batch_schedule, causal_rows_attention,
                             compile_lock, compile_mode, padded_attention,
                             compiled, matches, row_keys, slot_losses)
from lora_exp.tracking import Tracker, flatten
from lora_exp.training import Callback, TrialResult, _cached, peak_memory_mb, total_steps, warmup_steps

log = logging.getLogger(__name__)

#: host copies of the accumulated losses at most this many steps apart
DRAIN_EVERY = 50
#: rows per forward when evaluating or generating many slots at once
MAX_EVAL_ROWS = 2048
#: finished slots whose parameters come to the host in one copy (~10 MB a slot at rank 16), at
#: most this many and this many bytes
ROWS_PER_COPY = 64
ROW_COPY_BYTES = 1 << 29
#: slots whose eval is due are evaluated together once the first has waited this many steps (or
#: this many are due); they hold still meanwhile, and the answer is read back a few steps later,
#: when the GPU gets there: an eval per step with a host sync each cost ~30% of a full pack's step
EVAL_GATHER_STEPS = 8
EVAL_GATHER_SLOTS = 256
#: host seconds a step may spend writing finished trials' adapters while the pack trains (at
#: least one a step; ~14 ms each on the H200's host at rank 16)
ADAPTER_WRITE_S = 0.02
#: finished trials generate together (one `generate`, which syncs at every token, per batch)
#: once the first has waited this many steps or this many have finished
FINISH_GATHER_STEPS = 64
FINISH_GATHER_SLOTS = 64


def pack_key(cfg: RunConfig) -> tuple[Any, ...]:
    """What trials in one pack must share. Everything else may differ per slot."""
    t = cfg.trainer
    return (repr(cfg.model), repr(cfg.data), t.batch_size, t.logging_steps, t.eval_steps, t.precision,
            t.base_dropout, t.eval_batch_size, t.max_new_tokens, tuple(t.generation_metrics), t.device)


def check_packable(cfg: RunConfig) -> None:
    """What rules packing out, before any model loads (a ConfigError: one line, exit 2)."""
    from lora_exp.pack_io import tracking_processes

    compile_mode(torch.device("cpu"))  # LORA_EXP_PACK_COMPILE is one of the modes
    tracking_processes()  # and LORA_EXP_PACK_TRACKERS a count
    if cfg.lora.bias != "none":
        raise ConfigError(f"pack: lora.bias={cfg.lora.bias} trains the base model's biases, which the trials of a "
                          f"pack share; use lora.bias=none or pack=1")


def slot_spec(cfg: RunConfig, n_train: int) -> SlotSpec:
    t, lo = cfg.trainer, cfg.lora
    steps = total_steps(cfg, n_train)
    return SlotSpec(r=lo.r, alpha=float(lo.lora_alpha), dropout=float(lo.lora_dropout),
                    targets=tuple(cfg.target_modules), use_rslora=lo.use_rslora, lr=t.lr,
                    weight_decay=t.weight_decay, max_grad_norm=float(t.max_grad_norm or 0.0), seed=t.seed,
                    steps=steps, warmup=warmup_steps(cfg, steps), scheduler=t.lr_scheduler)


def lr_at(spec: SlotSpec, step: int) -> float:
    """The learning rate after `step` optimizer steps (transformers' schedules)."""
    if spec.scheduler == "constant":
        return spec.lr
    if step < spec.warmup:
        return spec.lr * step / max(1, spec.warmup)
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    if spec.scheduler == "cosine":
        return spec.lr * max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
    return spec.lr * max(0.0, (spec.steps - step) / max(1, spec.steps - spec.warmup))


@dataclass
class SlotRun:
    """One trial in a slot."""

    cfg: RunConfig
    spec: SlotSpec
    tracker: Tracker
    callbacks: Sequence[Callback]
    handle: Any  # the caller's (e.g. the Optuna trial)
    slot: int
    started: float
    result: TrialResult = field(default_factory=lambda: TrialResult(status="completed", steps=0))
    trainable: int = 0
    tokens: int = 0
    prev_sum: float = 0.0
    last_log: int = 0
    eval_seconds: float = 0.0
    error: str | None = None
    #: also write the adapter here when the trial completes
    adapter_dir: str | None = None
    #: its parameters on the host, from its last step until its adapter is written
    row: torch.Tensor | None = None
    #: the CUDA event after which `row` holds them (None: it does already)
    row_ready: Any = None


class PackTrainer:
    """K slots on one frozen base; trials start in free slots and leave when they end."""

    def __init__(self, base: BaseModel, data: PreparedData, cfg: RunConfig, slots: int, max_rank: int,
                 modules: Sequence[str]):
        check_packable(cfg)
        self.base, self.data, self.key = base, data, pack_key(cfg)
        t = cfg.trainer
        self.batch, self.logging_steps, self.eval_steps = t.batch_size, t.logging_steps, t.eval_steps
        self.precision, self.base_dropout = t.precision, t.base_dropout
        self.max_new_tokens, self.metrics = t.max_new_tokens, tuple(t.generation_metrics)
        self.device = base.device
        self.pad = base.tokenizer.pad_token_id
        self.base_params = sum(p.numel() for p in base.model.parameters())
        bf16 = self.precision == "bf16" and self.device.type == "cuda"
        self.pm = PackedModel(base, slots, max_rank, modules, low_precision=bf16)
        self.k = slots
        self.train_loss = _train_loss
        if self.pm.whole_step:
            self.train_loss = compiled(_train_loss, "reduce-overhead" if self.pm.mode == "graphs" else None)
        self.head = OutputHead(base.model, torch.bfloat16 if bf16 else torch.float32)
        self.weights = _FrozenWeights(base.model, self.pm) if bf16 else None
        self.train_table = TokenTable.build(data.train, self.pad, self.device)
        self.eval_table = (TokenTable.build(data.validation, self.pad, self.device, "answer_labels")
                           if data.validation else None)
        self.schedule = torch.full((slots, 1, self.batch), self.train_table.empty, dtype=torch.long, device=self.device)
        self.sums = torch.zeros(slots, dtype=torch.float64, device=self.device)
        self.snapshots: list[torch.Tensor] = []
        self.records: list[tuple[int, SlotRun, int, int]] = []  # (snapshot, run, step, count)
        self._pending: list[_HostCopy] = []  # copies to the host in flight, oldest first
        self.due: dict[int, int] = {}  # slot -> the step it began holding for its eval
        self.finishing: dict[int, int] = {}  # slot -> the step it began waiting for its generations
        #: finished trials, slots freed, whose adapters are still to be written (oldest first)
        self.closing: deque[SlotRun] = deque()
        self.held_slot_steps = 0  # slot-steps trials held (eval or generations pending) while others trained
        #: seconds of host work since the last progress line, by what (and `starts`: a count)
        self.host_s: Counter[str] = Counter()
        self.runs: list[SlotRun | None] = [None] * slots
        self.host_step = np.zeros(slots, dtype=np.int64)
        self.steps_total = np.zeros(slots, dtype=np.int64)
        self.arange = torch.arange(slots, device=self.device)
        self.row_in_batch = torch.arange(self.batch, device=self.device).repeat(slots)
        #: called once before the callbacks of each batch of evals (a sweep reads its study once)
        self.eval_batch_hook: Any = None
        self.steps_run, self.trial_steps = 0, 0
        self.first_step: float | None = None
        self._progress = (time.perf_counter(), 0)
        self.dropout_on = False
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        train_mode(self.base.model, self.base_dropout)
        #: the pack's rows are padded on the right: their attention needs no mask (generation's
        #: does); the model's own implementation, to restore, where it was switched
        self.own_attention = causal_rows_attention(self.base.model)

    # -- slots --

    def free_slots(self) -> list[int]:
        return [i for i, run in enumerate(self.runs) if run is None]

    def free_count(self) -> int:
        return self.k - self.live()

    def live(self) -> int:
        return sum(run is not None for run in self.runs)

    def ending_within(self, steps: int, fraction: float = 1.0) -> int:
        """Live trials that reach their last step within `steps` steps and within `fraction`
        of their length (unless stopped sooner)."""
        live = np.array([run is not None for run in self.runs])
        ahead = np.minimum(steps, fraction * self.steps_total)
        return int((live & (self.steps_total - self.host_step <= ahead)).sum())

    def evals_within(self, steps: int, fraction: float = 1.0) -> int:
        """Live trials with an eval before their last step (where a pruner may stop them) within
        `steps` steps and within `fraction` of their length; one being evaluated now counts."""
        if not self.eval_steps or self.eval_table is None:
            return 0
        live = np.array([run is not None for run in self.runs])
        e = self.eval_steps
        upcoming = np.maximum(-(-self.host_step // e), 1) * e  # the eval at or after each slot's step
        ahead = np.minimum(steps, fraction * self.steps_total)
        return int((live & (upcoming < self.steps_total) & (upcoming - self.host_step <= ahead)).sum())

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
        return None

    def start(self, slot: int, cfg: RunConfig, tracker: Tracker, callbacks: Sequence[Callback] = (),
              handle: Any = None) -> SlotRun:
        t0 = time.perf_counter()
        why = self.fits(cfg)
        if why:
            raise ConfigError(f"pack: this trial cannot join the pack: {why}")
        spec = slot_spec(cfg, len(self.data.train))
        self.pm.assign(slot, spec)
        sched = batch_schedule(len(self.data.train), self.batch, spec.seed, spec.steps)
        if sched.shape[0] > self.schedule.shape[1]:
            grown = torch.full((self.k, sched.shape[0], self.batch), self.train_table.empty, dtype=torch.long,
                               device=self.device)
            grown[:, :self.schedule.shape[1]] = self.schedule
            self.schedule = grown
        self.schedule[slot, :sched.shape[0]] = self.pm.to_device(sched)
        self.sums[slot] = 0.0
        lengths = np.array(self.train_table.lengths + [0])
        run = SlotRun(cfg, spec, tracker, callbacks, handle, slot, time.perf_counter(),
                      tokens=int(lengths[sched.numpy()].sum()))
        run.trainable = sum(spec.r * (self.pm.spans[n][1] + self.pm.spans[n][2])
                            for n in self.pm.layers if matches(n, spec.targets))
        total = run.trainable + self.base_params
        self.runs[slot] = run
        self.host_step[slot] = 0
        self.steps_total[slot] = spec.steps
        # a compiled step always masks (p=0 keeps every element, times exactly 1): no recompile
        # when the last trial with dropout leaves
        self.dropout_on = self.pm.whole_step or any(r is not None and r.spec.dropout > 0 for r in self.runs)
        as_dict = cfg.to_dict()
        tracker.log_params({**flatten(as_dict), "target_modules": cfg.target_modules,
                            "trainable_params": run.trainable, "total_params": total, "total_steps": spec.steps,
                            "pack_slots": self.k})
        tracker.set_tags({"trainable_line": f"trainable params: {run.trainable:,d} || all params: {total:,d} || "
                                            f"trainable%: {100 * run.trainable / total:.4f}",
                          "lora_exp.overrides": " ".join(cfg.overrides), "lora_exp.packed": f"slot {slot} of {self.k}"})
        import yaml

        tracker.log_text(yaml.dump(as_dict, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False),
                         "config.yaml")
        self.host_s["start"] += time.perf_counter() - t0
        self.host_s["starts"] += 1
        return run

    # -- one step for every live slot --

    def step(self) -> list[SlotRun]:
        """One optimizer step of every slot that trains; returns the trials that ended.

        A slot that reaches an eval (or its last step) holds still, exactly as it is, while the
        others train on: its eval runs with others' a few steps later, is read back when the GPU
        gets there (no host sync), and the trial then goes on, stops (its callbacks) or waits for
        its generations, which are also batched. Nothing waits on the GPU while any slot can train."""
        if not any(run is not None for run in self.runs):
            return self._write_adapters(None)  # nothing left to train: close every finished trial
        self._train_step()
        ended: list[SlotRun] = []
        stalled = not self._trainable()  # every trial holds: wait for what they wait for
        if len(self.snapshots) >= DRAIN_EVERY:
            self._pending.append(self._launch_host_copy([]))
        if self.due and (stalled or len(self.due) >= EVAL_GATHER_SLOTS
                         or self.steps_run - min(self.due.values()) >= EVAL_GATHER_STEPS):
            self._pending.append(self._launch_host_copy(sorted(self.due)))
            self.due.clear()
        ended += self._collect(wait=stalled)
        idle = not self._trainable() and not self.due and not self._pending
        if self.finishing and (idle or len(self.finishing) >= FINISH_GATHER_SLOTS
                               or self.steps_run - min(self.finishing.values()) >= FINISH_GATHER_STEPS):
            # every logged loss read first (generation waits for the GPU anyway)
            if self.snapshots:
                self._pending.append(self._launch_host_copy([]))
            ended += self._collect(wait=True)
            # (a trial whose last losses came back non-finite just now has failed: not finished)
            runs = [self.runs[s] for s in sorted(self.finishing) if self.runs[s] is not None
                    and self.runs[s].error is None]  # type: ignore[union-attr]
            self.finishing.clear()
            self._finish_completed(runs)  # type: ignore[arg-type]
            for run in runs:  # their slots are free now; their adapters are written step by step
                self._release(run)  # type: ignore[arg-type]
        for run in ended:
            self._release(run)
        return ended + self._write_adapters(ADAPTER_WRITE_S)

    def busy(self) -> bool:
        """Trials in slots, or finished ones whose adapters are still to be written."""
        return self.live() > 0 or bool(self.closing)

    def _trainable(self) -> bool:
        return any(run is not None and slot not in self.pm.paused for slot, run in enumerate(self.runs))

    def _train_step(self) -> bool:
        """One step of the slots not held; logs their losses (on the device) and holds those
        whose eval is due. False if no slot trains."""
        training = np.array([run is not None and slot not in self.pm.paused for slot, run in enumerate(self.runs)])
        if not training.any():
            return False
        self.held_slot_steps += sum(run is not None for run in self.runs) - int(training.sum())
        start = time.perf_counter()
        if self.first_step is None and self.pm.compile and self.device.type == "cuda":
            # the first step compiles: the workers of a multi-GPU sweep take turns, so the later
            # ones load the first one's compiled graphs from the cache instead of compiling again
            with compile_lock():
                self._launch_step()
                torch.cuda.synchronize(self.device)
        else:
            self._launch_step()
        self.host_step[training] += 1
        self.steps_run += 1
        self.trial_steps += int(training.sum())
        if self.first_step is None:
            self.first_step = start
        steps = self.host_step
        logs = training & ((steps % self.logging_steps == 0) | (steps == self.steps_total))
        evals = training & (((steps % self.eval_steps == 0) if self.eval_steps else False) | (steps == self.steps_total))
        if logs.any():
            self.snapshots.append(self.sums.clone())
            for slot in np.flatnonzero(logs):
                run = self.runs[slot]
                assert run is not None
                self.records.append((len(self.snapshots) - 1, run, int(steps[slot]), int(steps[slot]) - run.last_log))
                run.last_log = int(steps[slot])
        held = [int(s) for s in np.flatnonzero(evals if self.eval_table is not None else
                                                training & (steps == self.steps_total))]
        self.pm.pause(held)
        for slot in held:
            if self.eval_table is not None:
                self.due[slot] = self.steps_run
            else:  # nothing to evaluate: a finished trial goes straight to its generations
                self.finishing[slot] = self.steps_run
        return True

    def _launch_step(self) -> None:
        """Forward, backward and optimizer of every live slot, launched without waiting."""
        pm = self.pm
        position = pm.step.clamp(max=self.schedule.shape[1] - 1)
        idx = self.schedule[self.arange, position]  # [K, batch]
        idx = torch.where(pm.live.bool().view(-1, 1), idx, self.train_table.empty).view(-1)
        ids, mask, labels = self.train_table.ids[idx], self.train_table.mask[idx], self.train_table.labels[idx]
        g = pm.groups
        g.slots, g.rows, g.enabled = None, self.batch, True
        if self.dropout_on:
            b = self.batch
            g.dropout = (row_keys(pm.seed.repeat_interleave(b), pm.step.repeat_interleave(b), self.row_in_batch),
                         pm.p.repeat_interleave(b))
        else:
            g.dropout = None
        with autocast(self.device, self.precision), record_function("pack.forward"):
            losses, total = self.train_loss(self.base.model, self.head, ids, mask, labels, pm.live, self.k, self.batch)
        with record_function("pack.backward"):
            grads = pm.gradients(total)
        self.sums += losses.detach().double() * pm.live
        with record_function("pack.optimizer"):
            pm.optimizer_step(grads)
        g.dropout = None

    def _release(self, run: SlotRun) -> None:
        if self.runs[run.slot] is run:
            self.runs[run.slot] = None
            self.due.pop(run.slot, None)
            self.finishing.pop(run.slot, None)
            self.pm.release(run.slot)

    def _launch_host_copy(self, eval_slots: list[int]) -> _HostCopy:
        """Queue the copy of the logged losses to the host (and the evals of `eval_slots`, whose
        trials hold still meanwhile), without waiting: `_collect` reads it when the GPU is there."""
        sums = torch.stack(self.snapshots) if self.snapshots else None
        records, self.snapshots, self.records = self.records, [], []
        values, t0 = None, time.perf_counter()
        if eval_slots:
            values = self._slot_eval(eval_slots, self.eval_table.empty)  # type: ignore[union-attr]
        copy = _HostCopy(records, [(s, self.runs[s]) for s in eval_slots])  # type: ignore[misc]
        if self.device.type == "cuda":
            copy.sums = _to_host(sums)
            copy.values = _to_host(values)
            copy.ready = torch.cuda.Event()
            copy.ready.record()
        else:
            copy.sums, copy.values = sums, values
        copy.launch_s = time.perf_counter() - t0
        self.host_s["eval"] += copy.launch_s
        return copy

    def _collect(self, wait: bool = False) -> list[SlotRun]:
        """Read back, in order, the host copies the GPU has finished (all of them if `wait`):
        log each slot's losses, then its eval (callbacks may stop it); evaluated trials go on,
        or wait for their generations if they reached their last step."""
        ended: list[SlotRun] = []
        while self._pending:
            copy = self._pending[0]
            if copy.ready is not None and not copy.ready.query():
                if not wait:
                    break
                t0 = time.perf_counter()
                copy.ready.synchronize()
                self.host_s["wait"] += time.perf_counter() - t0
            self._pending.pop(0)
            ended += self._log_losses(copy)
            if copy.evals:
                ended += self._read_evals(copy)
        return ended

    def _log_losses(self, copy: _HostCopy) -> list[SlotRun]:
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
                run.error = f"train loss became {value} at step {step}: trial stopped"
                run.result.status = "failed"
                run.tracker.set_tags({"failure_reason": f"non-finite train loss ({value}) at step {step}"})
                failed.append(run)
                continue
            run.result.loss_curve.append((step, value))
            run.result.steps = step
            run.tracker.log_metrics({"train_loss": value, "learning_rate": lr_at(run.spec, step)}, step)
        return failed

    def _read_evals(self, copy: _HostCopy) -> list[SlotRun]:
        """Eval loss of each slot (as eval_loss computes it alone), its callbacks, and what follows."""
        assert copy.values is not None
        t_read = time.perf_counter()
        values = copy.values.tolist()
        if self.eval_batch_hook is not None:
            self.eval_batch_hook()
        # the host's time on these evals (launch and read back; the steps run in between are others')
        seconds = copy.launch_s + time.perf_counter() - t_read
        stopped, resumed = [], []
        for (slot, run), value in zip(copy.evals, values):
            if run is None or self.runs[slot] is not run or run.error is not None:
                continue
            run.eval_seconds += seconds / len(copy.evals)
            step = int(self.host_step[slot])
            run.result.eval_curve.append((step, value))
            run.tracker.log_metrics({"eval_loss": value}, step)
            stop = [cb.on_eval(step, {"eval_loss": value}) for cb in run.callbacks]
            if any(stop) and step < run.spec.steps:
                run.result.status = "stopped"
                run.result.steps = step
                stopped.append(run)
            elif step >= run.spec.steps:
                run.result.steps = step
                self.finishing[slot] = self.steps_run
            else:
                resumed.append(slot)
        self.pm.resume(resumed)
        for run in stopped:
            self._close_metrics(run)
        self.host_s["eval"] += time.perf_counter() - t_read
        return stopped

    @torch.no_grad()
    def _slot_eval(self, slots: list[int], n_val: int) -> torch.Tensor:
        """Each slot's eval loss, on the device (queued: nothing here waits for the GPU)."""
        table = self.eval_table
        assert table is not None
        self.base.model.eval()
        out: list[torch.Tensor] = []
        per = max(1, MAX_EVAL_ROWS // n_val)
        g = self.pm.groups
        try:
            for i in range(0, len(slots), per):
                chunk = slots[i:i + per]
                g.slots, g.rows, g.enabled = self.pm.to_device(torch.tensor(chunk)), n_val, True
                rep = lambda x: x[:n_val].repeat(len(chunk), 1)  # noqa: E731
                with autocast(self.device, self.precision):
                    out.append(slot_losses(self.base.model, rep(table.ids), rep(table.mask), rep(table.labels),
                                           len(chunk), n_val, self.head))
        finally:
            g.slots, g.rows = None, self.batch
            train_mode(self.base.model, self.base_dropout)
        return torch.cat(out)

    def _base_results(self) -> tuple[float | None, list[str], dict[str, list[float]]]:
        """Base-model eval loss, generations and scores: once per base (cached as training.py does)."""
        g, model, data = self.pm.groups, self.base.model, self.data
        g.enabled = False
        if self.weights is not None:
            self.weights.use_fp32()
        try:
            with padded_attention(model, self.own_attention):
                base_loss = _cached(self.base, ("eval_loss", data.key, self.precision),
                                    lambda: eval_loss(model, data.validation, self.pad, self.device, 16,
                                                      self.precision))
                outputs = _cached(self.base, ("generations", data.key, self.max_new_tokens),
                                  lambda: generate(model, self.base.tokenizer, data.prompts, self.device,
                                                   self.max_new_tokens))
        finally:
            if self.weights is not None:
                self.weights.use_bf16()
            g.enabled = True
            train_mode(model, self.base_dropout)
        scores = _cached(self.base, ("base_scores", data.key, self.max_new_tokens, self.metrics),
                         lambda: score_outputs(data.prompts, outputs, self.metrics))
        return base_loss, outputs, scores

    @torch.no_grad()
    def _generate(self, slots: list[int]) -> tuple[list[list[str]], list[int]]:
        """Greedy generations of every prompt for each slot, batched across slots (16 prompts a
        batch, left-padded, as `generate` does for one adapter)."""
        tok, prompts = self.base.tokenizer, self.data.prompts
        outs: list[list[str]] = [[] for _ in slots]
        n_new = [0] * len(slots)
        if not prompts:
            return outs, n_new
        model, g = self.base.model, self.pm.groups
        model.eval()
        side = tok.padding_side
        tok.padding_side = "left"
        if self.weights is not None:
            self.weights.use_fp32()
        try:
            with padded_attention(model, self.own_attention):  # left-padded prompts need their masks
                for start in range(0, len(prompts), 16):
                    texts = [p.text for p in prompts[start:start + 16]]
                    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                    per = max(1, MAX_EVAL_ROWS // len(texts))
                    for i in range(0, len(slots), per):
                        chunk = slots[i:i + per]
                        g.slots, g.rows, g.enabled = torch.tensor(chunk, device=self.device), len(texts), True
                        # greedy generation runs in fp32, as `generate` runs it for one adapter
                        out = model.generate(input_ids=enc["input_ids"].repeat(len(chunk), 1),
                                             attention_mask=enc["attention_mask"].repeat(len(chunk), 1),
                                             max_new_tokens=self.max_new_tokens, do_sample=False,
                                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                        new = out[:, enc["input_ids"].shape[1]:]
                        counted = new_tokens(new, tok.eos_token_id).view(len(chunk), -1).sum(dim=1)
                        decoded = [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
                        for j, slot in enumerate(chunk):
                            pos = slots.index(slot)
                            outs[pos] += decoded[j * len(texts):(j + 1) * len(texts)]
                            n_new[pos] += int(counted[j])
        finally:
            if self.weights is not None:
                self.weights.use_bf16()
            tok.padding_side = side
            g.slots, g.rows = None, self.batch
            train_mode(model, self.base_dropout)
        return outs, n_new

    def _close_metrics(self, run: SlotRun) -> None:
        r, m = run.result, run.result.metrics
        seconds = time.perf_counter() - run.started
        train_seconds = max(1e-9, seconds - run.eval_seconds)
        m.update({"train_runtime_s": seconds, "eval_s": run.eval_seconds,
                  "train_step_s": train_seconds / max(1, r.steps), "train_steps_per_s": r.steps / train_seconds,
                  "train_tokens_per_s": run.tokens * (r.steps / max(1, run.spec.steps)) / train_seconds,
                  "trainable_params": run.trainable, "peak_memory_mb": peak_memory_mb(self.device),
                  "pack_slots": self.k})
        if r.loss_curve:
            m["final_train_loss"] = r.loss_curve[-1][1]
        if r.eval_curve:
            m["final_eval_loss"] = r.eval_curve[-1][1]
        base_loss, _, _ = self._base_results()
        if base_loss is not None:
            m["base_eval_loss"] = base_loss
            run.tracker.log_metrics({"base_eval_loss": base_loss, "eval_loss": base_loss}, step=0)

    def _finish_completed(self, runs: list[SlotRun]) -> None:
        for run in runs:
            self._close_metrics(run)
        _, base_out, base_scores = self._base_results()
        t0 = time.perf_counter()
        outputs, counts = self._generate([run.slot for run in runs])
        self.host_s["generate"] += time.perf_counter() - t0
        seconds = (time.perf_counter() - t0) / len(runs)
        t_tables = time.perf_counter()
        rows: dict[int, torch.Tensor] = {}
        ready = None
        per = self._rows_per_copy()
        for i, (run, adapter_out, n_new) in enumerate(zip(runs, outputs, counts)):
            if i % per == 0:  # the next slots' parameters to the host in one copy
                t_rows = time.perf_counter()
                rows, ready = self._rows_to_host([r.slot for r in runs[i:i + per]])
                copied = time.perf_counter() - t_rows
                self.host_s["rows"] += copied
                t_tables += copied  # not a table's time
            m = run.result.metrics
            m["generation_s"] = seconds
            if n_new:
                m["generation_tokens_per_s"] = n_new / seconds
            table, means = generations_table(self.data.prompts, base_out, adapter_out, self.metrics, base_scores)
            run.result.generations = table
            m.update(means)
            if "exact_match" in means:
                m["exact_match_count"] = round(means["exact_match"] * sum(bool(p.answers) for p in self.data.prompts))
            if self.data.prompts:
                run.tracker.log_table(table, "generations.json")
            run.row, run.row_ready = rows[run.slot], ready
            self.closing.append(run)
        # each trial's generations table, its means and its logging (the copies above apart)
        self.host_s["tables"] += time.perf_counter() - t_tables

    def _rows_per_copy(self) -> int:
        """Finished slots whose parameters go to the host in one copy: ~512 MB (a pinned block)."""
        row_bytes = self.pm.params.shape[1] * self.pm.params.element_size()
        return max(1, min(ROWS_PER_COPY, ROW_COPY_BYTES // max(1, row_bytes)))

    def _rows_to_host(self, slots: list[int]) -> tuple[dict[int, torch.Tensor], Any]:
        """These slots' parameters, on their way to the host: each row, and the CUDA event after
        which it may be read (None on a CPU). On a GPU the copy goes to pinned memory, queued
        behind the step in flight, so the slots can take new trials at once and nothing waits for
        it: a copy to ordinary memory held the GPU idle at a wave's end (~7 s for 1024 trials)."""
        if self.device.type != "cuda":
            return dict(zip(slots, self.pm.params[slots])), None  # (indexing copies)
        idx = self.pm.to_device(torch.tensor(slots, dtype=torch.long))
        host = torch.empty((len(slots), self.pm.params.shape[1]), dtype=self.pm.params.dtype, pin_memory=True)
        host.copy_(self.pm.params.index_select(0, idx), non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return dict(zip(slots, host.unbind(0))), ready

    def _write_adapters(self, budget: float | None) -> list[SlotRun]:
        """Write finished trials' adapters (from their rows, already on the host) for up to `budget`
        seconds (at least one; all if None) and return those trials: they have ended. Writing a
        wave of a thousand at once kept the GPU idle ~14 s; a few a step run while it trains."""
        out: list[SlotRun] = []
        t0 = time.perf_counter()
        while self.closing and (budget is None or not out or time.perf_counter() - t0 < budget):
            run = self.closing[0]  # leaves `closing` once written (a write that fails leaves it there)
            if run.row_ready is not None and not run.row_ready.query():
                if budget is not None:  # its row is still on its way: the next step writes it
                    break
                run.row_ready.synchronize()
            row = run.row
            if run.tracker.run_id is not None or getattr(run.tracker, "records_artifacts", False):
                tmp = tempfile.mkdtemp(prefix="lora-exp-adapter-")
                self.pm.save_adapter(run.slot, build_lora_config(run.cfg), tmp, row, run.spec)
                run.tracker.log_dir(tmp, "adapter")
                cleanup = getattr(run.tracker, "remove_after", None)
                (cleanup or (lambda path: shutil.rmtree(path, ignore_errors=True)))(tmp)
            if run.adapter_dir is not None:
                self.pm.save_adapter(run.slot, build_lora_config(run.cfg), run.adapter_dir, row, run.spec)
            self.closing.popleft()
            run.row, run.row_ready = None, None
            run.tracker.log_metrics(run.result.metrics, step=run.result.steps)
            out.append(run)
        if out:
            self.host_s["adapters"] += time.perf_counter() - t0
        return out

    def write_pending(self) -> list[SlotRun]:
        """After an error: write the adapters of the trials that finished training and wait only
        for them, as far as they can be written, and return those trials (they stay completed).
        Stops at the first that cannot be (its row unreadable, e.g. the GPU failed, or a second
        Ctrl-C): it and those after it stay in `closing`."""
        out: list[SlotRun] = []
        while self.closing:
            try:
                out += self._write_adapters(0.0)  # one at a time: each written one is kept
            except BaseException as exc:  # noqa: BLE001 -- the caller fails what is left
                log.warning("pack: %d finished trial(s) could not be written (%s)", len(self.closing),
                            f"{type(exc).__name__}: {exc}".splitlines()[0])
                break
        return out

    def progress(self, every: float) -> str | None:
        """A progress line at most every `every` seconds: steps, busy slots, recent step time."""
        now = time.perf_counter()
        last_time, last_steps = self._progress
        if now - last_time < every:
            return None
        self._progress = (now, self.steps_run)
        ms = 1e3 * (now - last_time) / max(1, self.steps_run - last_steps)
        held = len(self.pm.paused)
        host = ", ".join(f"{what} {v:.1f}" for what, v in sorted(self.host_s.items()) if what != "starts" and v >= 0.05)
        starts = self.host_s["starts"]
        self.host_s.clear()
        return (f"step {self.steps_run}, {self.live()}/{self.k} slots busy, {self.trial_steps} trial-steps, "
                f"{ms:.1f} ms/step over the last {now - last_time:.0f}s ({held} holding for evals or generations; "
                f"{int(starts)} started; host seconds: {host or 'none over 0.05'})")

    def summary(self) -> dict[str, Any]:
        """Pack-wide figures: steps, wall time since the first step (evals, generations and
        trial starts included), slot occupancy (slots training), the share of slot-steps held for
        evals or generations, and peak GPU memory."""
        wall = time.perf_counter() - self.first_step if self.first_step is not None else 0.0
        return {"slots": self.k, "steps": self.steps_run, "trial_steps": self.trial_steps, "wall_s": round(wall, 2),
                "ms_per_step": round(1e3 * wall / max(1, self.steps_run), 2),
                "occupancy": round(self.trial_steps / max(1, self.steps_run * self.k), 4),
                "held": round(self.held_slot_steps / max(1, self.steps_run * self.k), 4),
                "peak_memory_gib": round(peak_memory_mb(self.device) / 1024, 2), "device": str(self.device)}

    def close(self) -> None:
        if self.weights is not None:
            self.weights.use_fp32()
        if self.own_attention is not None:
            self.base.model.set_attn_implementation(self.own_attention)
        self.pm.close()
        self.base.model.eval()


@dataclass
class _HostCopy:
    """Logged losses (and evals) on their way to the host; `ready` is recorded after the copy."""

    records: list[tuple[int, SlotRun, int, int]]
    evals: list[tuple[int, SlotRun | None]]
    sums: torch.Tensor | None = None
    values: torch.Tensor | None = None
    ready: Any = None
    launch_s: float = 0.0


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """A pinned host copy of `t`, queued (read it once the stream has passed this point)."""
    if t is None:
        return None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _train_loss(model: Any, head: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, live: torch.Tensor,
                k: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slot's mean loss and the sum that backward starts from (compiled as one graph in
    the `full` and `graphs` modes)."""
    losses = slot_losses(model, ids, mask, labels, k, rows, head)
    return losses, (losses * live).sum()


class _FrozenWeights:
    """bf16 copies of the frozen base's matmul weights, made once: autocast would cast the same
    fp32 weights to the same bf16 values at every call (frozen weights are not in its cache).
    Embeddings and norms stay fp32, as autocast keeps them; `use_fp32` swaps the originals back
    (for fp32 generation, and when the pack closes)."""

    def __init__(self, model: Any, pm: PackedModel):
        skip = {id(model.get_output_embeddings())}
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        for module in model.modules():
            if id(module) in skip or not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
                continue
            for param in (module.weight, getattr(module, "bias", None)):
                if param is not None and param.dtype == torch.float32:
                    self.pairs.append((param, param.data, param.data.to(torch.bfloat16)))
        self.use_bf16()

    def use_bf16(self) -> None:
        for param, _, low in self.pairs:
            param.data = low

    def use_fp32(self) -> None:
        for param, full, _ in self.pairs:
            param.data = full


def train_packed(cfgs: list[RunConfig], base: BaseModel, data: PreparedData, trackers: Sequence[Tracker] | None = None,
                 slots: int | None = None, adapters_to: list[str] | None = None) -> list[TrialResult]:
    """Train `cfgs` packed (all in one pack if `slots` is None; else continuously, `slots` at a
    time). Returns the results in the order of `cfgs`. For tests and library use."""
    from lora_exp.tracking import NullTracker

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
