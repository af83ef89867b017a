"""How a trial ended, recorded the same way whichever path trained it (alone or in a pack):
its MLflow run is closed with the status's run status and tags first, then Optuna is told, so a
trial never counts as done in Optuna without its run."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from lora_exp.core.recording import TrialResult
from lora_exp.core.status import TrialStatus
from lora_exp.errors import LoraExpError
from lora_exp.tracking.runs import close_run, fail_run

log = logging.getLogger("lora_exp")


@dataclass
class TrialOutcome:
    """What a trial's stores record of it."""

    number: int
    trial_id: int
    status: TrialStatus
    #: the objective (a list for several objectives) when COMPLETE
    value: Any = None
    error: str | None = None
    overrides: list[str] = field(default_factory=list)
    loss_curve: list[Any] = field(default_factory=list)
    eval_curve: list[Any] = field(default_factory=list)
    steps: int = 0
    compute_s: float = 0.0
    wall_s: float = 0.0
    generations: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def shown_value(self) -> Any:
        """The value a progress line shows: the objective, or a pruned trial's last eval loss."""
        if self.status is TrialStatus.PRUNED and self.eval_curve:
            return self.eval_curve[-1][1]
        return self.value


def objective_value(metrics: dict[str, float], metric: str) -> float:
    """`eval_loss` names the final eval loss (`final_eval_loss`); any other logged metric by name."""
    for key in (metric, f"final_{metric}"):
        if key in metrics:
            return metrics[key]
    raise LoraExpError(f"objective metric {metric!r} was not computed (have: {', '.join(sorted(metrics))})")


def outcome_of(number: int, trial_id: int, result: TrialResult, metrics: list[str], multi: bool,
               overrides: list[str], wall_s: float, error: str | None = None) -> TrialOutcome:
    """A trained trial's outcome: COMPLETE with its objective(s) (FAIL if one was not computed),
    PRUNED, or FAIL with `error`."""
    status, value = result.status, None
    if error is not None:
        status = TrialStatus.FAIL
    elif status is TrialStatus.COMPLETE:
        try:
            values = [objective_value(result.metrics, m) for m in metrics]
            value = values if multi else values[0]
        except LoraExpError as exc:
            status, error = TrialStatus.FAIL, str(exc)
    compute = result.metrics.get("compute_s", result.metrics.get("train_runtime_s", 0.0))
    return TrialOutcome(number, trial_id, status, value, error, list(overrides), list(result.loss_curve),
                        list(result.eval_curve), result.steps, compute, wall_s, result.generations)


def record_outcome(study: Any, outcome: TrialOutcome, tracker: Any = None,
                   exc: BaseException | None = None) -> TrialOutcome:
    """Close the trial's run (`tracker`: an MLflow run, or None/a null tracker when nothing is
    tracked), then tell Optuna. A run that cannot be closed (the store went away) fails the trial.
    Returns the outcome as recorded."""
    run_id = getattr(tracker, "run_id", None)
    if run_id is not None:
        if outcome.status is TrialStatus.FAIL:
            fail_run(tracker, outcome.error or "failed", exc, tags=outcome.status.tags)
        else:
            try:
                close_run(tracker, outcome.status.mlflow, tags=outcome.status.tags)
            except Exception as store_error:  # noqa: BLE001 - the trial cannot count as done
                outcome.status = TrialStatus.FAIL
                outcome.error = f"{type(store_error).__name__}: {store_error}".splitlines()[0][:500]
    storage = study._storage
    attrs: dict[str, Any] = {"wall_s": round(outcome.wall_s, 3), "compute_s": round(outcome.compute_s, 3)}
    if run_id is not None:
        attrs["mlflow_run_id"] = run_id
    if outcome.status is TrialStatus.FAIL:
        attrs["failure"] = outcome.error or "failed"
    else:
        attrs["loss_curve"] = outcome.loss_curve
    for key, value in attrs.items():
        storage.set_trial_user_attr(outcome.trial_id, key, value)
    if outcome.status is not TrialStatus.FAIL:
        dashboard_note(study, outcome.trial_id, run_id, outcome.overrides, outcome.generations)
    if outcome.status is TrialStatus.COMPLETE:
        study.tell(outcome.number, outcome.value, skip_if_finished=True)
    else:
        # skip_if_finished: a worker too slow to beat may have been taken over as stale meanwhile
        study.tell(outcome.number, state=outcome.status.optuna, skip_if_finished=True)
    return outcome


def dashboard_note(study: Any, trial_id: int, run_id: str | None, overrides: list[str],
                   generations: dict[str, list[Any]]) -> None:
    """A note optuna-dashboard shows beside the trial: its run, its overrides, its answers."""
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    import types

    lines = [f"**MLflow run** `{run_id}`", "", f"**overrides** `{' '.join(overrides)}`", ""]
    if generations:
        lines += ["| prompt | expected | base | adapter |", "|---|---|---|---|"]
        for row in zip(generations["prompt"], generations["expected"], generations["base_output"],
                       generations["adapter_output"]):
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    # save_note reads the trial's storage, study and id only
    trial = types.SimpleNamespace(storage=study._storage, study=study, _trial_id=trial_id)
    try:
        save_note(trial, "\n".join(lines))
    except Exception as exc:  # noqa: BLE001 - a note is a nicety
        log.debug("dashboard note not saved: %s", exc)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:200]
