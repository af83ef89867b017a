"""`lora-exp sweep pack=K`: a sweep worker that trains up to K trials at once on one base model.

The worker claims WAITING trials as slots free up (continuous batching: a pruned or finished
trial's slot is reset and the next trial takes it). Each trial still gets its own nested MLflow
run with its loss curve, evals, generations and adapter, and its own Optuna trial (pruning at its
evals, TPE's constant liar counting the trials in flight). MLflow writes, Optuna writes and
heartbeats run in a tracking process (lora_exp/pack_io.py), in order, so the training loop never
waits for the stores; a trial is told to Optuna only after its run is closed, as unpacked.

Trials whose shared settings differ from the pack's (another batch size, model or data) cannot
share it: they wait, grouped by those settings, and each group gets a pack of its own.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from lora_exp import sweep_tracking
from lora_exp.config import RunConfig
from lora_exp.errors import LoraExpError

if TYPE_CHECKING:
    from lora_exp.pack_training import PackTrainer, SlotRun
    from lora_exp.search import SweepPlan

log = logging.getLogger("lora_exp")

#: the pruner's view of the study is read again at most this often (finished trials it misses
#: meanwhile count at the next read)
VIEW_REFRESH_S = 5.0
#: trials the sampling process claims and samples at a time (one read of the study each)
CLAIM_BATCH = 64
#: a free slot with no WAITING trial asks the storage again after this long (a retried trial
#: or another process's top-up can add one), not at every step
CLAIM_RETRY_S = 2.0
#: a trial's successor is sampled this long before the trial ends, plus the time the sampler
#: needs for all the trials ending within a quarter of their length (it tells its time a trial),
#: never further ahead than that quarter: a wave of a thousand trials ending together takes the
#: sampler 30-50 s, and TPE, with a thousand trials in flight anyway, misses only those that end
#: meanwhile
SAMPLE_AHEAD_S = 15.0
SAMPLE_AHEAD_FRACTION = 0.25
#: and this share of the slots sampled in reserve: pruned trials end when no one can say (in a
#: wave, hundreds at one eval), and the sampler takes ~25 ms a trial
SAMPLE_RESERVE_FRACTION = 0.25
#: with a pruner, this share of the trials that reach an eval within the look-ahead is sampled
#: ahead too (a median pruner stops up to half; measured on the H200: a second wave's eval at
#: step 1000 pruned 474 of 1024 at once, and without this the pack showed 550 of 1024 slots
#: busy until the sampler caught up)
SAMPLE_PRUNE_FRACTION = 0.5


class _Pace:
    """Seconds per packed step, as measured (for how many steps `SAMPLE_AHEAD_S` is)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.seconds = 0.0

    def tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            dt = now - self.last
            self.seconds = dt if not self.seconds else 0.9 * self.seconds + 0.1 * min(dt, 10 * self.seconds)
        self.last = now

    def steps_in(self, seconds: float) -> int:
        return int(seconds / self.seconds) + 1 if self.seconds else 1


def pack_shape(plan: SweepPlan, cfg: RunConfig) -> tuple[int, list[str]]:
    """The largest rank and every module any trial of the space may target."""
    space = plan.spec.space
    ranks = [cfg.lora.r]
    if "lora.r" in space:
        p = space["lora.r"]
        ranks += [int(c) for c in p.choices] if p.type == "categorical" else [int(p.high)]
    modules = set(cfg.target_modules)
    if "lora.preset" in space:
        for preset in space["lora.preset"].choices or []:
            modules.update(cfg.model.target_presets.get(preset, []))
    if "lora.target_modules" in space:
        for choice in space["lora.target_modules"].choices or []:
            modules.update(choice)
    return max(ranks), sorted(modules)


#: a progress line from a pack at most this often
PROGRESS_SECONDS = 30.0


def run_packed_worker(plan: SweepPlan, worker_index: int, stop: Any, study: Any, context: Any) -> bool:
    """Run the study's WAITING trials K at a time. Returns False when the failure limit stopped it.

    Trials that cannot share the current pack (other shared settings: batch size, model, data...)
    wait, grouped by those settings; when the pack drains, the next group gets a pack of its own."""
    import json

    import optuna
    import torch

    from lora_exp.pack_io import IOClient, Sampler
    from lora_exp.pack_training import pack_key
    from lora_exp.search import HEARTBEAT_S, _in_flight_elsewhere, run_one_trial, stored_trials

    io = IOClient(plan, worker_index)
    sampler = Sampler(plan, worker_index, chunk=CLAIM_BATCH, retry_s=CLAIM_RETRY_S)
    base_dict = plan.base.to_dict()
    view = _StudyView(study, VIEW_REFRESH_S)
    parked: dict[Any, list[tuple[Any, list[str], RunConfig]]] = {}  # by shared settings, in claim order
    alone: list[Any] = []  # trials no pack can hold (e.g. lora.bias searched): run one at a time
    failures, exhausted, timed_out = 0, False, False
    cfg: RunConfig = plan.base
    trainer: PackTrainer | None = None
    pace = _Pace()
    prunes = not isinstance(study.pruner, optuna.pruners.NopPruner)

    def ending(steps: int) -> int:
        """Slots likely to free within `steps` steps: trials ending, and a share of those an
        eval may prune."""
        assert trainer is not None
        pruned = trainer.evals_within(steps, SAMPLE_AHEAD_FRACTION) if prunes else 0
        return trainer.ending_within(steps, SAMPLE_AHEAD_FRACTION) + int(SAMPLE_PRUNE_FRACTION * pruned)

    def too_many() -> bool:
        return bool(plan.spec.max_failures and failures >= plan.spec.max_failures)

    def begin(prepared: tuple[Any, list[str], RunConfig]) -> None:
        assert trainer is not None
        trial, overrides, tcfg = prepared
        if trainer.fits(tcfg) is not None:
            if pack_key(tcfg) == trainer.key:
                alone.append(trial)
            else:
                parked.setdefault(pack_key(tcfg), []).append(prepared)
            return
        _begin(plan, trainer, trainer.free_slots()[0], trial, overrides, tcfg, io, view)

    try:
        while True:
            if trainer is None:
                trainer = _new_pack(plan, cfg, study, context, view)
            if not stop.requested and not too_many() and not exhausted:
                if plan.timeout and time.time() - plan.started > plan.timeout:
                    # as Optuna's timeout: the trials in slots finish, no other starts; those
                    # already claimed and sampled ahead are failed (a later run tops the study up)
                    exhausted = timed_out = True
                    unstarted = _fail_unstarted(parked, alone, io, "not started: the sweep's timeout came first", sampler)
                    alone.clear()
                    log.info("timeout reached: no new trials (%d in slots finish; %d claimed, not started: failed)",
                             trainer.live(), unstarted)
                else:
                    ready = parked.setdefault(trainer.key, [])
                    # slots free now, those whose trial ends soon, and a share of those an eval
                    # may prune soon: their next trials are sampled while the GPU works
                    ahead = SAMPLE_AHEAD_S + sampler.seconds_per_trial * ending(2**62)
                    soon = trainer.free_count() + ending(pace.steps_in(ahead)) + int(SAMPLE_RESERVE_FRACTION * trainer.k)
                    sampler.ask(soon - sampler.asked - len(ready))
                    idle = not trainer.busy() and not ready
                    # nothing to train: wait for the sampler (an empty answer then means no trial is left)
                    t0 = time.perf_counter()
                    claimed, empty = sampler.poll(timeout=2 * CLAIM_RETRY_S + 1 if idle else 0.0)
                    for trial in claimed:
                        prepared = _prepare(plan, trial, io, base_dict)
                        if prepared is None:
                            failures += 1
                        else:
                            parked.setdefault(pack_key(prepared[2]), []).append(prepared)
                    trainer.host_s["claim"] += time.perf_counter() - t0
                    if idle and empty and not claimed:
                        exhausted = True
            if not stop.requested and not too_many():
                ready = parked.get(trainer.key, [])
                while ready and trainer.free_count():
                    begin(ready.pop(0))
            if trainer.busy():
                pace.tick()
                ended = trainer.step()
                t0 = time.perf_counter()
                for run in ended:
                    failures += _finish(plan, run, io)
                trainer.host_s["finish"] += time.perf_counter() - t0
                line = trainer.progress(PROGRESS_SECONDS)
                if line:
                    log.info("pack: %s", line)
            failures += len(io.poll())
            t0 = time.perf_counter()
            io.send()
            trainer.host_s["send"] += time.perf_counter() - t0
            if trainer.busy():
                continue
            if stop.requested or too_many():
                break
            if parked.get(trainer.key):
                continue
            waiting = [group for group in parked.values() if group]
            if waiting:  # the next group of shared settings gets a pack of its own
                log.info("pack summary: %s", json.dumps(trainer.summary()))
                trainer.close()
                cfg, trainer = waiting[0][0][2], None
                continue
            if exhausted:
                break
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}".splitlines()[0]
        _stop_pack(plan, trainer, io, reason)
        _fail_unstarted(parked, alone, io, reason, sampler)
        if trainer is not None:
            trainer.close()
        io.close()
        raise
    finally:
        if trainer is not None:
            log.info("pack summary: %s", json.dumps(trainer.summary()))
            trainer.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if stop.requested or too_many():
        _fail_unstarted(parked, alone, io, "the sweep stopped before it ran", sampler)
        alone = []
    else:  # only what the sampler claimed after the study ran out (a retry appearing just then)
        _fail_unstarted({}, [], io, "claimed as the pack closed; not run", sampler)
    for claimed in alone:  # heartbeats go on from the tracking process until it closes
        if run_one_trial(plan, study, optuna.Trial(study, claimed._trial_id), context) == "FAIL":
            failures += 1
    failures += len(io.close())
    if too_many():
        log.error("%d trials failed (max_failures=%d): stopping the sweep", failures, plan.spec.max_failures)
        return False
    if timed_out:  # the trials still queued wait for the next start; other workers stop at theirs
        return True
    from optuna.trial import TrialState

    while _in_flight_elsewhere(study, plan) and not stop.requested:  # other workers still running
        time.sleep(max(0.5, HEARTBEAT_S / 2))
        if stored_trials(study, (TrialState.WAITING,)):
            return run_packed_worker(plan, worker_index, stop, study, context)
    return True


def _stop_pack(plan: SweepPlan, trainer: PackTrainer | None, io: Any, reason: str) -> int:
    """A pack stopped by an error: trials that finished training and wait only for their adapters
    are written and close as completed (nothing a trial finished is lost); the trials still in
    slots fail with `reason`. Returns the trials that failed."""
    if trainer is None:
        return 0
    done = trainer.write_pending()
    failing = [r for r in [*trainer.runs, *trainer.closing] if r is not None]
    log.error("pack stopped (%s): failing its %d trial(s) in flight%s", reason, len(failing),
              f"; {len(done)} finished trial(s) closed with their adapters" if done else "")
    failures = sum(_finish(plan, run, io) for run in done)
    for run in failing:
        run.error = reason
        run.result.status = "failed"
        failures += _finish(plan, run, io)
    return failures


def _new_pack(plan: SweepPlan, cfg: RunConfig, study: Any, context: Any, view: Any) -> PackTrainer:
    from lora_exp.pack_training import PackTrainer

    base, data = context.prepare(cfg)
    sweep_tracking.load_base_cache(study, base)
    max_rank, modules = pack_shape(plan, cfg)
    trainer = PackTrainer(base, data, cfg, plan.options.pack, max_rank, modules)
    trainer.eval_batch_hook = view.refresh
    log.info("packing up to %d trials on %s (rank %d, modules %s)", plan.options.pack, context.device, max_rank,
             ", ".join(modules))
    return trainer


def _fail_unstarted(parked: dict[Any, list[Any]], alone: list[Any], io: Any, reason: str,
                    sampler: Any = None) -> int:
    """Claimed trials that never got a slot, and those the sampler still held: failed (a later
    start tops the study up again). Stops the sampler; returns how many it failed."""
    left = sampler.close() if sampler is not None else []
    trials = [p[0] for group in parked.values() for p in group] + list(alone) + left
    for trial in trials:
        io.submit("fail", trial.number, trial._trial_id, reason)
    parked.clear()
    return len(trials)


class _StudyView:
    """The study as one read of its trials: what a pruner sees for a whole batch of evals.

    `Trial.should_prune` reads every trial of the study from the storage; with a thousand trials
    in flight that is ~0.1-0.3 s per call, per trial, per eval. Here the study is read once per
    batch of evals and each trial's own intermediate values come from memory."""

    def __init__(self, study: Any, every: float = 0.0):
        from lora_exp.search import TrialReader

        self._study = study
        self._reader = TrialReader(study)  # each finished trial loaded once
        self._trials: list[Any] = []
        self.every = every
        self._read = -float("inf")

    def refresh(self) -> None:
        """Read the study again, unless it was read less than `every` seconds ago: once trials
        run out of step some slot evaluates at almost every step, and each read loads every
        finished trial (thousands, in a long packed search)."""
        from optuna.trial import TrialState

        if time.monotonic() - self._read < self.every:
            return
        self._trials = self._reader.read((TrialState.COMPLETE, TrialState.PRUNED))
        self._read = time.monotonic()

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[Any]:
        return [t for t in self._trials if states is None or t.state in states]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class PackPruning:
    """Reports each eval to Optuna (through the tracking process, in order) and asks the study's
    pruner with the batch's view of the study: the decision `Trial.should_prune` makes."""

    def __init__(self, trial: Any, metric: str, view: _StudyView, io: Any):
        self.trial, self.metric, self.view, self.io = trial, metric, view, io
        self.values: dict[int, float] = {}

    def on_eval(self, step: int, metrics: dict[str, float]) -> bool:
        from optuna.trial import FrozenTrial, TrialState

        if self.metric not in metrics:
            return False
        value = metrics[self.metric]
        self.io.submit("report", self.trial.number, self.trial._trial_id, step, value)
        self.values[step] = value
        t = self.trial
        frozen = FrozenTrial(number=t.number, state=TrialState.RUNNING, value=None, datetime_start=None,
                             datetime_complete=None, params=t.params, distributions=t.distributions, user_attrs={},
                             system_attrs={}, intermediate_values=dict(self.values), trial_id=t._trial_id)
        return bool(self.view._study.pruner.prune(self.view, frozen))


def _prepare(plan: SweepPlan, trial: Any, io: Any, base_dict: dict[str, Any]) -> tuple[Any, list[str], RunConfig] | None:
    """The sampled trial's config; None if the config rejects it (the trial fails)."""
    io.submit("beat_add", trial.number, trial._trial_id)
    from lora_exp.search import trial_config

    try:
        if trial.error:
            raise ValueError(trial.error)
        overrides = trial.overrides
        io.submit("user_attr", trial.number, trial._trial_id, "overrides", overrides)
        cfg = trial_config(plan.base, plan.base_overrides, overrides, base_dict)
    except Exception as exc:  # a bad sampled value: this trial fails, the sweep goes on
        reason = trial.error or f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        log.error("trial %d failed: %s", trial.number, reason)
        io.submit("fail", trial.number, trial._trial_id, reason)
        return None
    return trial, overrides, cfg


def _begin(plan: SweepPlan, trainer: PackTrainer, slot: int, trial: Any, overrides: list[str], cfg: RunConfig,
           io: Any, view: _StudyView) -> None:
    """Give the trial a slot: its MLflow run opens (in the tracking process) and it trains."""
    from lora_exp.pack_io import QueuedTracker

    tags = {"lora_exp.kind": "trial", "lora_exp.study": plan.study_name, "trial_number": trial.number,
            "lora_exp.trial_overrides": " ".join(overrides)}
    tracker = QueuedTracker(io, trial.number, f"{plan.study_name}-trial-{trial.number}", tags)
    callbacks = [] if plan.spec.multi else [PackPruning(trial, plan.spec.metric, view, io)]
    trainer.start(slot, cfg, tracker, callbacks, handle=(trial, overrides, time.perf_counter()))


def _finish(plan: SweepPlan, run: SlotRun, io: Any) -> int:
    """Queue the trial's closing (run closed, then Optuna told); returns 1 if it failed."""
    from lora_exp.search import objective_value

    trial, overrides, started = run.handle
    result = run.result
    value: Any = None
    status, error = result.status, run.error
    if status == "completed":
        try:
            values = [objective_value(result.metrics, m) for m in plan.spec.metrics]
            value = values if plan.spec.multi else values[0]
        except LoraExpError as exc:
            status, error = "failed", str(exc)
    io.submit("finish", trial.number, trial._trial_id, status, value, error, overrides, result.loss_curve,
              result.metrics.get("train_runtime_s", 0.0), time.perf_counter() - started, result.generations,
              result.eval_curve, result.steps)
    return int(status == "failed")
