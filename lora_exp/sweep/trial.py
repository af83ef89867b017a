"""One trial of a sweep, unpacked: sampled values -> overrides -> config -> `run_trial` on the
worker's shared base model -> its outcome recorded in MLflow, then in Optuna."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_exp.compose import compose, replace_keys
from lora_exp.config import GROUP_NAMES, RunConfig, flatten
from lora_exp.core.data import load_rows, tokenize
from lora_exp.core.recording import NullTracker
from lora_exp.core.status import TrialStatus
from lora_exp.errors import ConfigError
from lora_exp.sweep.enqueue import ENQUEUED, trial_overrides
from lora_exp.sweep.outcome import TrialOutcome, outcome_of, record_outcome
from lora_exp.sweep.plan import SweepPlan
from lora_exp.sweep.report import progress_text, study_counts, trial_line, write_line
from lora_exp.sweep.spec import SweepSpec
from lora_exp.sweep.storage import load_base_cache, save_base_cache
from lora_exp.tracking import parent
from lora_exp.tracking.runs import open_run

if TYPE_CHECKING:  # torch and transformers load when a trial runs, not when a sweep checks its input
    from lora_exp.core.models import BaseModel

log = logging.getLogger("lora_exp")


@dataclass
class WorkerContext:
    """Per-process caches: the base model is loaded once per worker, data once per data config."""

    device: Any
    #: this worker's line for its progress bar on a terminal (one bar per worker)
    position: int | None = None
    bases: dict[str, BaseModel] = field(default_factory=dict)
    datasets: dict[str, Any] = field(default_factory=dict)
    #: the worker's `StopFlag`: a stop request waits while a trial is recorded
    stop: Any = None

    def uninterrupted(self) -> Any:
        """A section that a stop request (Ctrl-C twice, SIGTERM) waits for, then stops after."""
        return self.stop.deferred() if self.stop is not None else contextlib.nullcontext()

    def prepare(self, cfg: RunConfig) -> tuple[BaseModel, Any]:
        from lora_exp.core.models import load_base

        mkey = repr(cfg.model)
        if mkey not in self.bases:
            self.bases.clear()  # one base in memory at a time
            log.info("loading model %s (%s) on %s", cfg.model.name, cfg.model.source, self.device)
            self.bases[mkey] = load_base(cfg.model, self.device)
            log.info("model %s loaded in %.1fs", cfg.model.name, self.bases[mkey].load_seconds)
        base = self.bases[mkey]
        dkey = repr((cfg.data, mkey))
        if dkey not in self.datasets:
            self.datasets[dkey] = tokenize(load_rows(cfg.data), cfg.data, base.tokenizer)
        return base, self.datasets[dkey]


class PruningCallback:
    """Reports the objective at each eval; asks Optuna whether to stop."""

    def __init__(self, trial: Any, metric: str):
        self.trial, self.metric = trial, metric

    def on_eval(self, step: int, metrics: dict[str, float]) -> bool:
        if self.metric not in metrics:
            return False
        self.trial.report(metrics[self.metric], step)
        return bool(self.trial.should_prune())


def trial_config(base: RunConfig, base_overrides: list[str], overrides: list[str],
                 base_dict: dict[str, Any] | None = None) -> RunConfig:
    """A trial's config: its plain key=value overrides applied to the sweep's composed base
    (`base`, from `base_overrides`; no Hydra compose per trial, the same validation); a group
    override (`lora=seed`) goes through Hydra's compose."""
    if any(o.split("=", 1)[0].lstrip("+~") in GROUP_NAMES for o in overrides):
        return compose(base_overrides + overrides)
    return replace_keys(base, base.to_dict() if base_dict is None else base_dict, overrides,
                        base_overrides + overrides)


def base_values(base: RunConfig) -> dict[str, Any]:
    """Values of the base config (for `ratio_of` anchors that are not searched)."""
    return flatten(base.to_dict())


def check_ratio_anchors(spec: SweepSpec, base: RunConfig) -> None:
    """A `ratio_of` anchor must be searched or be a numeric key of the base config."""
    values = base_values(base)
    for key, param in spec.space.items():
        anchor = param.ratio_of
        if anchor is not None and anchor not in spec.space and not isinstance(values.get(anchor), (int, float)):
            raise ConfigError(f"sweep {spec.name}: space.{key}.ratio_of: {anchor} is neither searched nor a "
                              f"numeric config key")


def trial_tags(plan: SweepPlan, number: int, overrides: list[str], enqueued: str | None = None) -> dict[str, Any]:
    """A trial's run tags; `enqueued` names where an enqueued trial came from (`sweep.enqueue`)."""
    tags = {"lora_exp.kind": "trial", "lora_exp.study": plan.study_name, "trial_number": number,
            "lora_exp.trial_overrides": " ".join(overrides)}
    if enqueued:
        tags["lora_exp.enqueued"] = enqueued
    return tags


def run_one_trial(plan: SweepPlan, study: Any, trial: Any, context: WorkerContext) -> TrialStatus:
    """Train one trial into its own nested MLflow run; tell Optuna only after the run is closed."""
    from lora_exp.core.training import run_trial
    from lora_exp.sweep.checkpoints import RunCheckpoint, retried_run

    start = time.perf_counter()
    overrides: list[str] = []
    tracker: Any = None
    error: BaseException | None = None
    try:
        overrides = trial_overrides(trial, plan.spec.space, base_values(plan.base))
        trial.set_user_attr("overrides", overrides)
        cfg = trial_config(plan.base, plan.base_overrides, overrides)
        base, data = context.prepare(cfg)
        load_base_cache(study, base)
        tracker = NullTracker()
        checkpoint = None
        if cfg.tracking.enabled:
            resume_from = retried_run(study, trial)
            tracker = open_run(cfg.tracking, f"{plan.study_name}-trial-{trial.number}",
                               trial_tags(plan, trial.number, overrides, trial.user_attrs.get(ENQUEUED)),
                               plan.parent_run_id)
            trial.set_user_attr("mlflow_run_id", tracker.run_id)  # an orphan's run is found again
            checkpoint = RunCheckpoint(tracker, resume_from)
        callbacks = [] if plan.spec.multi else [PruningCallback(trial, plan.spec.metric)]
        result = run_trial(cfg, base, data, tracker, callbacks=callbacks, label=f"trial {trial.number}",
                           position=context.position, checkpoint=checkpoint)
        if checkpoint is not None:
            checkpoint.drop()
        save_base_cache(study, base)
        outcome = outcome_of(trial.number, trial._trial_id, result, plan.spec.metrics, plan.spec.multi, overrides,
                             time.perf_counter() - start)
    except KeyboardInterrupt as exc:
        with context.uninterrupted():
            record_outcome(study, _failed(trial, overrides, "interrupted", start), tracker, exc)
        raise
    except Exception as exc:  # a bad sampled value, OOM, a bug: this trial fails, the sweep goes on
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        log.error("trial %d failed: %s", trial.number, reason)
        outcome, error = _failed(trial, overrides, reason, start), exc
    with context.uninterrupted():  # both stores, or neither: the run closed and Optuna told
        outcome = record_outcome(study, outcome, tracker, error)
    parent.refresh(plan.record, study, trial.number)
    print_trial_line(plan, study, outcome, f"{outcome.wall_s:.1f}s")
    return outcome.status


def _failed(trial: Any, overrides: list[str], reason: str, start: float) -> TrialOutcome:
    return TrialOutcome(trial.number, trial._trial_id, TrialStatus.FAIL, error=reason, overrides=overrides,
                        wall_s=time.perf_counter() - start)


def print_trial_line(plan: SweepPlan, study: Any, outcome: TrialOutcome, wall: str, label: str = "",
                     counts: tuple[int, int] | None = None, eta_s: float | None = None) -> None:
    """The trial's line: `[done/n_trials]` (completed and pruned trials: failed ones are replaced)
    counted from the study unless `counts` (done, failed) are given, and the sweep's elapsed time,
    ETA (`eta_s` if given) and rate so far."""
    done, failed = counts if counts is not None else study_counts(study)
    at_step = outcome.steps if outcome.status is TrialStatus.PRUNED else None
    progress = progress_text(done, plan.done_at_start, plan.n_trials, plan.started, failed, eta_s)
    write_line(trial_line(plan.spec.metrics, plan.n_trials, f"{label}{done}", outcome.number, outcome.status,
                          outcome.shown_value, outcome.overrides, wall, at_step, progress))
