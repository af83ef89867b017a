"""`lora-exp sweep pack=K`: a sweep worker that trains up to K trials at once on one base model.

The worker claims WAITING trials as slots free up (continuous batching: a pruned or finished
trial's slot is reset and the next trial takes it). Each trial still gets its own nested MLflow
run with its loss curve, evals, generations and adapter, and its own Optuna trial (pruning at its
evals, TPE's constant liar counting the trials in flight). MLflow writes, Optuna writes and
heartbeats run in tracking processes (`io`), in order, so the training loop never waits for the
stores; a trial is told to Optuna only after its run is closed, as unpacked.

Trials whose shared settings differ from the pack's (another batch size, model or data) cannot
share it: they wait, grouped by those settings, and each group gets a pack of its own.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

from lora_exp.config import RunConfig
from lora_exp.core import interrupts
from lora_exp.core.status import TrialStatus
from lora_exp.core.training import total_steps
from lora_exp.pack import checkpoints as pack_checkpoints
from lora_exp.pack.io import IOClient, QueuedTracker
from lora_exp.pack.sampler import ClaimedTrial, Sampler
from lora_exp.pack.sizing import choose_compile, choose_pack, use_project_compile_cache
from lora_exp.pack.slots import SlotRun, pack_key
from lora_exp.pack.study_view import PackPruning, StudyView
from lora_exp.pack.trainer import PackTrainer
from lora_exp.sweep.checkpoints import retried_run
from lora_exp.sweep.outcome import outcome_of
from lora_exp.sweep.plan import SweepPlan
from lora_exp.sweep.report import progress_text
from lora_exp.sweep.storage import load_base_cache, stored_trials
from lora_exp.sweep.trial import WorkerContext, run_one_trial, trial_config, trial_tags
from lora_exp.sweep.worker import StopFlag, in_flight_elsewhere

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
#: a progress line from a pack at most this often
PROGRESS_SECONDS = 15.0

Prepared = tuple[ClaimedTrial, list[str], RunConfig]


class Pace:
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


class Eta:
    """Seconds until a pack's trials are done: the steps its live trials have left, plus a
    trial's steps for each trial of the budget not yet started, at the trial-steps a second the
    pack ran since its first step (compiling left out; evals, generations and trial starts in).
    Its trials end in waves, so the command's rate of finished trials says little until late.
    Pruned trials end early, so the estimate falls as the pruner stops them."""

    def __init__(self) -> None:
        self.mark: tuple[Any, float, int] | None = None  # (the pack, when, its trial-steps then)
        self.per_trial = 0

    def update(self, trainer: Any, pending: int) -> float | None:
        now = time.perf_counter()
        if self.mark is None or self.mark[0] is not trainer:
            self.mark = (trainer, now, trainer.trial_steps)
            return None
        _, since, steps_then = self.mark
        ran = trainer.trial_steps - steps_then
        left, per_trial = trainer.steps_left()
        self.per_trial = per_trial or self.per_trial
        if ran <= 0 or now <= since:
            return None
        return (left + pending * self.per_trial) * (now - since) / ran


def share_left(plan: SweepPlan, closed: int) -> int:
    """A worker's share of the trials still to run: those the sweep had to run when it started,
    over its workers (they claim from one queue, so their shares stay about even), less the
    `closed` ones it finished. With one worker, every trial left."""
    return max(0, -(-(plan.n_trials - plan.done_at_start) // plan.workers) - closed)


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


def run_packed_worker(plan: SweepPlan, worker_index: int, stop: StopFlag, study: Any, context: WorkerContext) -> bool:
    """Run the study's WAITING trials K at a time. Returns False when the failure limit stopped it."""
    from optuna.trial import TrialState

    # the command has failed stale trials already: none WAITING or RUNNING is a finished study
    if not stored_trials(study, (TrialState.WAITING, TrialState.RUNNING)):
        return True  # no pack to make: no model to load, no helper process to start
    return PackedSweep(plan, worker_index, stop, study, context).run()


class PackedSweep:
    """One packed worker of a sweep: a pack (or one per group of shared settings) fed with the
    study's trials, sampled ahead by the sampler process, closed by the tracking processes."""

    def __init__(self, plan: SweepPlan, worker_index: int, stop: StopFlag, study: Any, context: WorkerContext):
        import optuna

        self.plan, self.worker_index, self.stop, self.study, self.context = plan, worker_index, stop, study, context
        self.io = IOClient(plan, worker_index)
        self.sampler = Sampler(plan, worker_index, chunk=CLAIM_BATCH, retry_s=CLAIM_RETRY_S)
        self.base_dict = plan.base.to_dict()
        self.view = StudyView(study, VIEW_REFRESH_S)
        self.parked: dict[Any, list[Prepared]] = {}  # by shared settings, in claim order
        self.alone: list[ClaimedTrial] = []  # trials no pack can hold (e.g. lora.bias searched): one at a time
        self.failures, self.exhausted, self.timed_out = 0, False, False
        self.closed, self.failed = 0, 0  # trials this worker's packs ended: done (completed, pruned), failed
        self.verbose = bool(os.environ.get("LORA_EXP_VERBOSE"))
        self.cfg: RunConfig = plan.base
        self.trainer: PackTrainer | None = None
        self.client: Any = None  # an MLflow client, made when a retried trial's checkpoint is read
        self.pace = Pace()
        self.eta = Eta()
        self.prunes = not isinstance(study.pruner, optuna.pruners.NopPruner)

    def too_many(self) -> bool:
        return bool(self.plan.spec.max_failures and self.failures >= self.plan.spec.max_failures)

    def run(self) -> bool:
        try:
            self._loop()
        except BaseException as exc:
            reason = ("interrupted" if isinstance(exc, KeyboardInterrupt)
                      else f"{type(exc).__name__}: {exc}".splitlines()[0])
            self._stop_pack(reason)
            self._fail_unstarted(reason)
            if self.trainer is not None:
                self.trainer.close()
            self.io.close()
            raise
        finally:
            if self.trainer is not None:
                log.info("pack summary: %s", json.dumps(self.trainer.summary()))
                self.trainer.close()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return self._after()

    def _loop(self) -> None:
        while True:
            interrupts.check()
            if self.trainer is None:
                self.trainer = self._new_pack(self.cfg)
            trainer = self.trainer
            if not self.stop.requested and not self.too_many() and not self.exhausted:
                self._feed(trainer)
            if not self.stop.requested and not self.too_many():
                ready = self.parked.get(trainer.key, [])
                while ready and trainer.free_count():
                    self._begin(trainer, ready.pop(0))
            if trainer.busy():
                self.pace.tick()
                first = trainer.steps_run == 0
                ended = trainer.step()
                if first and trainer.startup_s is not None:
                    log.info("pack: first step done %.1f s after the sweep started (%.1f s to make the pack and run "
                             "its first step, compile %s)", time.time() - self.plan.started, trainer.startup_s,
                             trainer.pm.mode)
                t0 = time.perf_counter()
                for run in ended:
                    failed = self._finish(run)
                    self.failures += failed
                    self.failed += failed
                    self.closed += 1 - failed
                trainer.host_s["finish"] += time.perf_counter() - t0
                done = self.plan.done_at_start + self.closed
                eta = self._eta(trainer)
                line = trainer.progress(PROGRESS_SECONDS, self.verbose)
                if line:
                    log.info("pack: %d/%d trials done [%s]; %s", done, self.plan.n_trials,
                             progress_text(done, self.plan.done_at_start, self.plan.n_trials, self.plan.started,
                                           self.failed, eta), line)
            lost = self.io.poll()  # trials the tracking process could not record: failed, not finished
            self.view.forget(lost)
            self.failures += len(lost)
            t0 = time.perf_counter()
            self.io.send()
            trainer.host_s["send"] += time.perf_counter() - t0
            if trainer.busy():
                continue
            if self.stop.requested or self.too_many():
                return
            if self.parked.get(trainer.key):
                continue
            waiting = [group for group in self.parked.values() if group]
            if waiting:  # the next group of shared settings gets a pack of its own
                log.info("pack summary: %s", json.dumps(trainer.summary()))
                trainer.close()
                self.cfg, self.trainer = waiting[0][0][2], None
                continue
            if self.exhausted:
                return

    def _eta(self, trainer: PackTrainer) -> float | None:
        """`Eta`'s estimate of this worker's share of the trials left, shared with its tracking
        processes for the trial lines."""
        eta = self.eta.update(trainer, max(0, share_left(self.plan, self.closed) - trainer.live()))
        self.io.eta.value = time.time() + eta if eta is not None else math.nan
        return eta

    def _ending(self, steps: int) -> int:
        """Slots likely to free within `steps` steps: trials ending, and a share of those an eval may prune."""
        trainer = self.trainer
        assert trainer is not None
        pruned = trainer.evals_within(steps, SAMPLE_AHEAD_FRACTION) if self.prunes else 0
        return trainer.ending_within(steps, SAMPLE_AHEAD_FRACTION) + int(SAMPLE_PRUNE_FRACTION * pruned)

    def _feed(self, trainer: PackTrainer) -> None:
        """Ask the sampler for the trials the free slots (and those freeing soon) will want, and
        take what it has sampled; at the sweep's timeout, stop starting trials."""
        plan, sampler = self.plan, self.sampler
        if plan.timeout and time.time() - plan.started > plan.timeout:
            # as Optuna's timeout: the trials in slots finish, no other starts; those already
            # claimed and sampled ahead are failed (a later run tops the study up)
            self.exhausted = self.timed_out = True
            unstarted = self._fail_unstarted("not started: the sweep's timeout came first")
            log.info("timeout reached: no new trials (%d in slots finish; %d claimed, not started: failed)",
                     trainer.live(), unstarted)
            return
        ready = self.parked.setdefault(trainer.key, [])
        # slots free now, those whose trial ends soon, and a share of those an eval may prune
        # soon: their next trials are sampled while the GPU works
        ahead = SAMPLE_AHEAD_S + sampler.seconds_per_trial * self._ending(2**62)
        soon = trainer.free_count() + self._ending(self.pace.steps_in(ahead)) + int(SAMPLE_RESERVE_FRACTION * trainer.k)
        sampler.ask(soon - sampler.asked - len(ready))
        idle = not trainer.busy() and not ready
        # nothing to train: wait for the sampler (an empty answer then means no trial is left)
        t0 = time.perf_counter()
        claimed, empty = sampler.poll(timeout=2 * CLAIM_RETRY_S + 1 if idle else 0.0)
        for trial in claimed:
            prepared = self._prepare(trial)
            if prepared is None:
                self.failures += 1
            else:
                self.parked.setdefault(pack_key(prepared[2]), []).append(prepared)
        trainer.host_s["claim"] += time.perf_counter() - t0
        if idle and empty and not claimed:
            self.exhausted = True

    def _prepare(self, trial: ClaimedTrial) -> Prepared | None:
        """The sampled trial's config; None if the config rejects it (the trial fails)."""
        io = self.io
        io.submit("beat_add", trial.number, trial._trial_id)
        try:
            if trial.error:
                raise ValueError(trial.error)
            overrides = trial.overrides or []
            io.submit("user_attr", trial.number, trial._trial_id, "overrides", overrides)
            cfg = trial_config(self.plan.base, self.plan.base_overrides, overrides, self.base_dict)
        except Exception as exc:  # a bad sampled value: this trial fails, the sweep goes on
            reason = trial.error or f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            log.error("trial %d failed: %s", trial.number, reason)
            io.submit("fail", trial.number, trial._trial_id, reason)
            return None
        return trial, overrides, cfg

    def _begin(self, trainer: PackTrainer, prepared: Prepared) -> None:
        """Give the trial a slot (its MLflow run opens in the tracking process), or park it."""
        trial, overrides, cfg = prepared
        why = trainer.fits(cfg)
        if why is not None:
            if pack_key(cfg) == trainer.key:
                log.info("trial %d runs alone after the pack: %s", trial.number, why)
                self.alone.append(trial)
            else:
                self.parked.setdefault(pack_key(cfg), []).append(prepared)
            return
        plan = self.plan
        tracker = QueuedTracker(self.io, trial.number, f"{plan.study_name}-trial-{trial.number}",
                                trial_tags(plan, trial.number, overrides, trial.enqueued), trial._trial_id)
        callbacks = [] if plan.spec.multi else [PackPruning(trial, plan.spec.metric, self.view, self.io)]
        trainer.start(trainer.free_slots()[0], cfg, tracker, callbacks, handle=(trial, overrides, time.perf_counter()),
                      resume=self._checkpoint(trial))

    def _checkpoint(self, trial: ClaimedTrial) -> dict[str, Any] | None:
        """The checkpoint of the trial this one retries (a killed sweep's), if it kept one."""
        tracking = self.plan.base.tracking
        if self.plan.base.pack.checkpoint_seconds is None or not tracking.enabled:
            return None
        source = retried_run(self.study, trial)
        if source is None:
            return None
        if self.client is None:
            from lora_exp.tracking.store import connect

            self.client = connect(tracking)[0]
        state = pack_checkpoints.load(self.client, source)
        if state is not None:
            log.info("resuming run %s's trial at step %d", source, state["step"])
        return state

    def _finish(self, run: SlotRun) -> int:
        return finish_run(self.plan, run, self.io)

    def _new_pack(self, cfg: RunConfig) -> PackTrainer:
        plan = self.plan
        if cfg.pack.compile != "off":  # before the model loads: what runs on the GPU may set torch's own folder
            use_project_compile_cache()
        base, data = self.context.prepare(cfg)
        load_base_cache(self.study, base)
        max_rank, modules = pack_shape(plan, cfg)
        trials = max(1, share_left(plan, self.closed))
        slots = plan.pack
        positions = cfg.trainer.batch_size * max((len(e.input_ids) for e in data.train), default=0)
        steps = total_steps(cfg, len(data.train))
        if slots == "auto":
            slots, slots_why, compile, why = choose_pack(base, data, cfg, max_rank, modules, trials, steps, positions)
            log.info("%s", slots_why)
        else:
            compile, why = choose_compile(cfg, base.device, int(slots), trials, steps, positions)
        trainer = PackTrainer(base, data, cfg, int(slots), max_rank, modules, compile=compile)
        trainer.set_eval_batch_hook(self.view.refresh)
        log.info("packing up to %d trials on %s (rank %d, modules %s); %s", int(slots), self.context.device,
                 max_rank, ", ".join(modules), why)
        return trainer

    def _stop_pack(self, reason: str) -> int:
        return stop_pack(self.plan, self.trainer, self.io, reason)

    def _fail_unstarted(self, reason: str) -> int:
        """Claimed trials that never got a slot, and those the sampler still held: failed (a later
        start tops the study up again). Stops the sampler; returns how many it failed."""
        left = self.sampler.close()
        trials = [p[0] for group in self.parked.values() for p in group] + list(self.alone) + left
        for trial in trials:
            self.io.submit("fail", trial.number, trial._trial_id, reason)
        self.parked.clear()
        self.alone = []
        return len(trials)

    def _after(self) -> bool:
        """After the pack: trials no pack could hold, then wait for other workers' trials."""
        import optuna
        from optuna.trial import TrialState

        plan, study = self.plan, self.study
        if self.stop.requested or self.too_many():
            self._fail_unstarted("the sweep stopped before it ran")
        else:  # only what the sampler claimed after the study ran out (a retry appearing just then)
            alone, self.alone = self.alone, []
            self._fail_unstarted("claimed as the pack closed; not run")
            for claimed in alone:  # heartbeats go on from the tracking process until it closes
                if run_one_trial(plan, study, optuna.Trial(study, claimed._trial_id), self.context) is TrialStatus.FAIL:
                    self.failures += 1
        self.failures += len(self.io.close())
        if self.too_many():
            log.error("%d trials failed (max_failures=%d): stopping the sweep", self.failures, plan.spec.max_failures)
            return False
        if self.timed_out:  # the trials still queued wait for the next start; other workers stop at theirs
            return True
        while in_flight_elsewhere(study, plan) and not self.stop.requested:  # other workers still running
            time.sleep(max(0.5, plan.spec.heartbeat / 2))
            if stored_trials(study, (TrialState.WAITING,)):
                return run_packed_worker(plan, self.worker_index, self.stop, study, self.context)
        return True


def finish_run(plan: SweepPlan, run: SlotRun, io: IOClient) -> int:
    """Queue the trial's closing (run closed, then Optuna told); returns 1 if it failed. The pack's
    pruner counts it as finished from now on, before the stores do."""
    trial, overrides, started = run.handle
    outcome = outcome_of(trial.number, trial._trial_id, run.result, plan.spec.metrics, plan.spec.multi, overrides,
                         time.perf_counter() - started, run.error)
    io.submit("finish", trial.number, outcome)
    for callback in run.callbacks:
        if isinstance(callback, PackPruning):
            callback.closed(outcome.status, outcome.value)
    return int(outcome.status is TrialStatus.FAIL)


def stop_pack(plan: SweepPlan, trainer: PackTrainer | None, io: IOClient, reason: str) -> int:
    """A pack stopped by an error: trials that finished training and wait only for their adapters
    are written and close as completed (nothing a trial finished is lost); the trials still in
    slots fail with `reason`. Returns the trials that failed."""
    if trainer is None:
        return 0
    done = trainer.write_pending()
    failing = [r for r in [*trainer.runs, *trainer.closing] if r is not None]
    log.error("pack stopped (%s): failing its %d trial(s) in flight%s", reason, len(failing),
              f"; {len(done)} finished trial(s) closed with their adapters" if done else "")
    failures = sum(finish_run(plan, run, io) for run in done)
    for run in failing:
        run.fail(reason)
        failures += finish_run(plan, run, io)
    return failures
