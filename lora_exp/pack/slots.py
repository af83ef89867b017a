"""Which trial holds which slot of a pack, where each is, and what a trial needs of its slot.

Host-side bookkeeping only (numpy, no GPU): the trainer asks it which slots are free, which
train, which hold still for an eval or their generations, and how many will free up soon (the
sweep samples their successors ahead)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from lora_exp.config import RunConfig
from lora_exp.core.recording import Tracker, TrialResult
from lora_exp.core.status import TrialStatus
from lora_exp.core.training import Callback, total_steps, warmup_steps
from lora_exp.pack.model import SlotSpec


def pack_key(cfg: RunConfig) -> tuple[Any, ...]:
    """What trials in one pack must share. Everything else may differ per slot."""
    t = cfg.trainer
    return (repr(cfg.model), repr(cfg.data), repr(cfg.pack), t.batch_size, t.logging_steps, t.eval_steps,
            t.precision, t.base_dropout, t.eval_batch_size, t.max_new_tokens, tuple(t.generation_metrics), t.device)


def slot_spec(cfg: RunConfig, n_train: int) -> SlotSpec:
    t, lo = cfg.trainer, cfg.lora
    steps = total_steps(cfg, n_train)
    return SlotSpec(r=lo.r, alpha=float(lo.lora_alpha), dropout=float(lo.lora_dropout),
                    targets=tuple(cfg.target_modules), use_rslora=lo.use_rslora, lr=t.lr,
                    weight_decay=t.weight_decay, max_grad_norm=float(t.max_grad_norm or 0.0), seed=t.seed,
                    steps=steps, warmup=warmup_steps(cfg, steps), scheduler=t.lr_scheduler,
                    init=lo.init_lora_weights)


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
    result: TrialResult = field(default_factory=lambda: TrialResult(status=TrialStatus.COMPLETE, steps=0))
    trainable: int = 0
    tokens: int = 0
    prev_sum: float = 0.0
    last_log: int = 0
    eval_seconds: float = 0.0
    #: its share of the pack's time (`SlotTable.share`), read when it ends
    compute_s: float = 0.0
    #: when the trial last kept a checkpoint (perf_counter), None if never (pack.checkpoints)
    checkpoint_at: float | None = None
    error: str | None = None
    #: also write the adapter here when the trial completes
    adapter_dir: str | None = None
    #: its parameters on the host, from its last step until its adapter is written
    row: torch.Tensor | None = None
    #: the CUDA event after which `row` holds them (None: it does already)
    row_ready: Any = None

    def fail(self, reason: str) -> None:
        self.error = reason
        self.result.status = TrialStatus.FAIL


class SlotTable:
    """The pack's K slots: the trial in each, its optimizer step and length, and the slots that
    hold still until their eval's answer (`due`) or their generations (`finishing`) come."""

    def __init__(self, k: int, eval_steps: int | None, evaluates: bool):
        self.k = k
        self.eval_steps = eval_steps if evaluates else None
        self.runs: list[SlotRun | None] = [None] * k
        self.host_step = np.zeros(k, dtype=np.int64)
        self.steps_total = np.zeros(k, dtype=np.int64)
        #: each slot's share of the pack's time so far, and its tokens a step (what the share goes by)
        self.compute_s = np.zeros(k)
        self.token_rate = np.zeros(k)
        self.due: dict[int, int] = {}  # slot -> the pack step it began holding for its eval
        self.finishing: dict[int, int] = {}  # slot -> the pack step it began waiting for its generations

    def put(self, run: SlotRun) -> None:
        self.runs[run.slot] = run
        self.host_step[run.slot] = 0
        self.steps_total[run.slot] = run.spec.steps
        self.compute_s[run.slot] = 0.0
        self.token_rate[run.slot] = run.tokens / max(1, run.spec.steps)

    def share(self, seconds: float, training: np.ndarray) -> None:
        """The pack's `seconds` since the last step (the step, and the evals, generations and
        adapter writes between steps) shared among the slots that trained in it, by their tokens."""
        weights = training * self.token_rate
        total = weights.sum()
        if total > 0:
            self.compute_s += seconds * weights / total

    def remove(self, run: SlotRun) -> bool:
        """Free the trial's slot (False if the slot already went to another trial)."""
        if self.runs[run.slot] is not run:
            return False
        self.runs[run.slot] = None
        self.due.pop(run.slot, None)
        self.finishing.pop(run.slot, None)
        return True

    def free_slots(self) -> list[int]:
        return [i for i, run in enumerate(self.runs) if run is None]

    def live(self) -> int:
        return sum(run is not None for run in self.runs)

    def free_count(self) -> int:
        return self.k - self.live()

    def occupied(self) -> np.ndarray:
        return np.array([run is not None for run in self.runs])

    def steps_left(self) -> tuple[int, int]:
        """(steps its live trials have left to train, the steps of a trial: their mean length, 0
        with none live)."""
        live = self.occupied()
        if not live.any():
            return 0, 0
        return int((self.steps_total - self.host_step)[live].sum()), round(float(self.steps_total[live].mean()))

    def training(self, paused: set[int]) -> np.ndarray:
        """Slots whose trial trains this step (not held for an eval or its generations)."""
        return np.array([run is not None and slot not in paused for slot, run in enumerate(self.runs)])

    def ending_within(self, steps: int, fraction: float = 1.0) -> int:
        """Live trials that reach their last step within `steps` steps and within `fraction`
        of their length (unless stopped sooner)."""
        ahead = np.minimum(steps, fraction * self.steps_total)
        return int((self.occupied() & (self.steps_total - self.host_step <= ahead)).sum())

    def evals_within(self, steps: int, fraction: float = 1.0) -> int:
        """Live trials with an eval before their last step (where a pruner may stop them) within
        `steps` steps and within `fraction` of their length; one being evaluated now counts."""
        if not self.eval_steps:
            return 0
        e = self.eval_steps
        upcoming = np.maximum(-(-self.host_step // e), 1) * e  # the eval at or after each slot's step
        ahead = np.minimum(steps, fraction * self.steps_total)
        return int((self.occupied() & (upcoming < self.steps_total) & (upcoming - self.host_step <= ahead)).sum())

    def new_run(self, cfg: RunConfig, spec: SlotSpec, tracker: Tracker, callbacks: Sequence[Callback], handle: Any,
                slot: int, tokens: int, trainable: int) -> SlotRun:
        run = SlotRun(cfg, spec, tracker, callbacks, handle, slot, time.perf_counter(), tokens=tokens,
                      trainable=trainable)
        self.put(run)
        return run
