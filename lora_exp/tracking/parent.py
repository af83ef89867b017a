"""What a sweep records in MLflow: one parent run per study (found again on resume), refreshed
after every trial with the best trial, a table of all trials, Optuna's plots and a loss-curve
overlay; the best adapter as a parent artifact and as a registered model with alias `best`."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from lora_exp.compose import override_value, train_command
from lora_exp.config import TrackingConfig
from lora_exp.tracking.answers import log_answers, top_trials
from lora_exp.tracking.locks import sqlite_wal, store_lock
from lora_exp.tracking.provenance import provenance, redact_text
from lora_exp.tracking.runs import write_table
from lora_exp.tracking.store import connect
from lora_exp.tracking.sweep_plots import log_plots

log = logging.getLogger("lora_exp")

PARENT_ATTR = "mlflow_parent_run_id"
BEST_ALIAS = "best"
PLOT_EVERY_S = 60.0
TABLES = ("trials.json", "pareto_front.json", "answers.json")
#: plots are drawn (~1 s) at most every PLOT_EVERY_S, the first a minute into the process, and at the end
_last_plots = time.monotonic()
#: the parent's tag naming (by a digest) the trials its tables and plots were last drawn from: a
#: refresh that finds the same trials (another process drew them, or a resumed sweep ran nothing)
#: draws nothing again
DRAWN_TAG = "lora_exp.drawn_from"


@dataclass(frozen=True)
class SweepRecord:
    """What the parent run needs to know of a sweep: plain data, sent to every worker process."""

    study_name: str
    tracking: TrackingConfig
    #: (metric, direction) pairs
    objectives: tuple[tuple[str, str], ...]
    n_trials: int
    base_overrides: tuple[str, ...]
    #: how many keys the space searches (parameter importances need two)
    n_searched: int
    run_id: str | None = None
    #: the Optuna storage's URL, whose lock has one process at a time publish the best adapter
    storage: str | None = None

    @property
    def metrics(self) -> list[str]:
        return [m for m, _ in self.objectives]

    @property
    def metric(self) -> str:
        return self.objectives[0][0]

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1


def open_parent(cfg: TrackingConfig, study: Any, params: dict[str, Any], sweep_text: str,
                created: bool = True) -> str | None:
    """The study's parent run: the one recorded in the study, else found by tag, else created.

    Only the process that created the study creates its parent; another machine starting at the
    same moment waits for the parent's id to appear in the study (so there is one parent)."""
    if not cfg.enabled:
        return None
    sqlite_wal(cfg.uri)  # a sweep's processes write the store at once
    client, experiment_id = connect(cfg)
    run_id = study.user_attrs.get(PARENT_ATTR)
    deadline = time.monotonic() + 60
    while run_id is None and not created and time.monotonic() < deadline:
        time.sleep(1)
        run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id is None:
        found = client.search_runs([experiment_id], filter_string=(
            f"tags.`lora_exp.kind` = 'sweep' and tags.`lora_exp.study` = '{study.study_name}'"), max_results=1)
        run_id = found[0].info.run_id if found else None
    if run_id is not None:
        try:
            client.get_run(run_id)
        except Exception:  # recorded in another tracking store: start a parent here
            run_id = None
    if run_id is None:
        tags = {**provenance(), "lora_exp.kind": "sweep", "lora_exp.study": study.study_name}
        run = client.create_run(experiment_id, run_name=f"sweep-{study.study_name}",
                                tags={k: redact_text(str(v)) for k, v in tags.items()})
        run_id = run.info.run_id
        client.log_batch(run_id, params=_params(params))
        client.log_text(run_id, redact_text(sweep_text), "sweep.yaml")
        study.set_user_attr(PARENT_ATTR, run_id)
    else:
        client.update_run(run_id, status="RUNNING")
    return run_id


def _params(values: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, redact_text(str(v))[:6000]) for k, v in values.items()]


def monitor_system(record: SweepRecord) -> Any:
    """CPU, memory, disk, network (and GPU, with nvidia-ml-py) of this machine as the parent run's
    `system/*` metrics, every 10 s until `.finish()`; None where nothing is tracked. Each machine of
    a shared study logs under its host name."""
    if record.run_id is None:
        return None
    import socket

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    uri = connect(record.tracking)[0].tracking_uri
    shared = not record.tracking.uri.startswith("sqlite:")
    monitor = SystemMetricsMonitor(record.run_id, sampling_interval=10, resume_logging=True, tracking_uri=uri,
                                   node_id=socket.gethostname() if shared else None)
    monitor.start()
    return monitor


def close_orphan_runs(record: SweepRecord, study: Any,
                      reason: str = "worker died (no heartbeat); trial failed and retried",
                      numbers: set[int] | None = None) -> None:
    """MLflow runs left RUNNING by a worker that died (or was stopped between the steps that
    record a trial): FAILED, once Optuna has failed their trial (only trials `numbers` if given)."""
    if record.run_id is None:
        return
    try:
        client, _ = connect(record.tracking)
    except Exception as exc:  # noqa: BLE001 - retried at the next check
        log.warning("could not check for orphan runs: %s", exc)
        return
    for t in study.get_trials(deepcopy=False):
        run_id = t.user_attrs.get("mlflow_run_id")
        if t.state.name != "FAIL" or not run_id or (numbers is not None and t.number not in numbers):
            continue
        try:
            run = client.get_run(run_id)
            if run.info.status == "RUNNING":
                client.set_tag(run_id, "error", reason)
                client.set_tag(run_id, "trial_state", "FAIL")
                client.set_terminated(run_id, "FAILED")
        except Exception as exc:  # noqa: BLE001
            log.warning("could not close orphan run %s: %s", run_id, exc)


# --- after each trial ------------------------------------------------------------------------


def refresh(record: SweepRecord, study: Any, number: int, final: bool = False) -> None:
    """Refresh the parent run after trial `number`; if it is the new best, publish its adapter.
    Its tables and plots are drawn at most every PLOT_EVERY_S and when `final`, never twice from
    the same trials (DRAWN_TAG)."""
    global _last_plots
    if record.run_id is None:
        return
    try:
        client, _ = connect(record.tracking)
        trials = study.get_trials(deepcopy=False)
        draw = final or time.monotonic() - _last_plots >= PLOT_EVERY_S  # tables and plots
        digest = trials_digest(record, trials) if draw else ""
        drawn = draw and client.get_run(record.run_id).data.tags.get(DRAWN_TAG) == digest  # nothing new since
        if not drawn:
            _log_summary(client, record, study, trials)
        best = best_trial(study)
        if best is not None and (best.number == number or final):
            _publish_best(client, record, study)
        if draw and not drawn:
            log_plots(client, record, study, trials)
            client.set_tag(record.run_id, DRAWN_TAG, digest)
        if draw:
            _last_plots = time.monotonic()
    except Exception as exc:  # noqa: BLE001 - the parent's refresh must never fail a trial
        log.warning("could not refresh the sweep's parent run: %s", exc)


def trials_digest(record: SweepRecord, trials: list[Any]) -> str:
    """A digest of everything the parent's tables and plots are drawn from: each trial's state,
    values, parameters, attributes and times, and the number of trials the sweep wants."""
    rows = [(t.number, t.state.name, t.values, t.params, t.user_attrs, t.datetime_start, t.datetime_complete)
            for t in sorted(trials, key=lambda t: t.number)]
    text = json.dumps([record.n_trials, rows], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def best_trial(study: Any) -> Any:
    """The best trial of a single-objective study (None for multi-objective: see `pareto_front`)."""
    if len(study.directions) > 1:
        return None
    try:
        return study.best_trial
    except ValueError:
        return None


def pareto_front(study: Any) -> list[Any]:
    """Trials on the Pareto front of a multi-objective study (empty for single-objective)."""
    if len(study.directions) < 2:
        return []
    return sorted(study.best_trials, key=lambda t: t.number)


def trial_params(trial: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trial's searched parameters as it trained with them (its overrides: what its MLflow run
    and the progress lines show), and Optuna's own value of those it sampled as something else:
    a `ratio_of` parameter trains lora_alpha 16 where Optuna sampled 2 (x r)."""
    given = {o.split("=", 1)[0]: o for o in trial.user_attrs.get("overrides", []) if "=" in o}
    trained, sampled = {}, {}
    for key, value in trial.params.items():
        trained[key] = override_value(given[key]) if key in given else value
        if trained[key] != value:
            sampled[key] = value
    return trained, sampled


def trials_table(trials: list[Any]) -> dict[str, list[Any]]:
    rows = sorted(trials, key=lambda t: t.number)
    return {
        "number": [t.number for t in rows],
        "state": [t.state.name for t in rows],
        "value": [t.value if t.values is None or len(t.values) == 1 else t.values for t in rows],
        "params": [json.dumps(trial_params(t)[0]) for t in rows],
        "overrides": [" ".join(t.user_attrs.get("overrides", [])) for t in rows],
        "duration_s": [round(t.duration.total_seconds(), 2) if t.duration else None for t in rows],
        "compute_s": [t.user_attrs.get("compute_s") for t in rows],
        "run_id": [t.user_attrs.get("mlflow_run_id") for t in rows],
    }


def _log_summary(client: Any, record: SweepRecord, study: Any, trials: list[Any]) -> None:
    from mlflow.entities import Metric, RunTag

    counts = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    tags = {"n_trials": record.n_trials, **{f"trials_{k.lower()}": v for k, v in counts.items()}}
    now = int(time.time() * 1000)
    compute_s = sum(float(t.user_attrs.get("compute_s") or 0.0) for t in trials)
    metrics = [Metric("compute_s_total", compute_s, now, 0)]
    best = best_trial(study)
    if best is not None:
        tags.update({"best_trial_number": best.number, "best_value": best.value,
                     "best_params": json.dumps(trial_params(best)[0]),
                     "best_run_id": best.user_attrs.get("mlflow_run_id"),
                     "best_overrides": " ".join(best.user_attrs.get("overrides", []))})
        finished = counts["COMPLETE"] + counts["PRUNED"] + counts["FAIL"]
        metrics.append(Metric("best_value", best.value, now, finished))
    client.log_batch(record.run_id, metrics=metrics,
                     tags=[RunTag(k, redact_text(str(v))) for k, v in tags.items()], synchronous=True)
    front = pareto_front(study)
    if front:
        table = {"number": [t.number for t in front], "run_id": [t.user_attrs.get("mlflow_run_id") for t in front],
                 **{m: [t.values[i] for t in front] for i, m in enumerate(record.metrics)},
                 "params": [json.dumps(t.params) for t in front]}
        write_table(client, record.run_id, table, "pareto_front.json", tables(front, trials))
        client.set_tag(record.run_id, "pareto_front",
                       redact_text(json.dumps([[t.number, t.user_attrs.get("mlflow_run_id")] for t in front]))[:8000])
    top = top_trials(study, front)
    if top:
        log_answers(client, record.run_id, record.metric, study, front, tables(front, top))
    write_table(client, record.run_id, trials_table(trials), "trials.json", tables(front, trials))


def tables(front: list[Any], trials: list[Any]) -> tuple[str, ...]:
    """The parent's table artifacts (the tag MLflow's UI reads to show them as tables)."""
    return tuple(t for t in TABLES if t == "trials.json" or (t == "pareto_front.json" and front)
                 or (t == "answers.json" and any(x.state.name == "COMPLETE" for x in trials)))


def _publish_best(client: Any, record: SweepRecord, study: Any) -> None:
    """The study's best trial published, one process at a time (the storage's lock), the best read
    again inside it: two workers that finish together publish it once (not two model versions of
    one run), and neither publishes an older best over a newer one."""
    lock = store_lock(record.storage, f"best-{record.study_name}") if record.storage else contextlib.nullcontext()
    with lock:
        best = best_trial(study)
        run_id = best.user_attrs.get("mlflow_run_id") if best is not None else None
        if run_id and publish_adapter(client, record.study_name, record.run_id, run_id, best.number, best.value):
            log.info("best so far: trial %d (%s=%.4f) -> models:/%s@%s", best.number, record.metric, best.value,
                     record.study_name, BEST_ALIAS)


def publish_adapter(client: Any, name: str, parent_run_id: str | None, run_id: str, number: int, value: Any) -> bool:
    """A new best trial: its adapter copied to the parent (`best_adapter/`, a plain peft folder),
    logged as an MLflow model (a LoggedModel of the sweep's parent run that loads with
    `mlflow.pyfunc.load_model` and generates), and `models:/<name>@best` pointed at it. False if
    it is published already."""
    from mlflow.exceptions import MlflowException

    from lora_exp.tracking.pyfunc import log_adapter_model

    try:
        if client.get_model_version_by_alias(name, BEST_ALIAS).run_id == run_id:
            return False
    except MlflowException:
        pass
    if parent_run_id:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, "adapter", tmp)
            client.log_artifacts(parent_run_id, local, "best_adapter")
    try:
        client.create_registered_model(name, description=f"Best LoRA adapter of the lora-exp study {name!r}")
    except MlflowException:
        pass  # exists already
    run = client.get_run(run_id)
    params = {k: run.data.params[k] for k in ("lora.r", "lora.lora_alpha", "lora.lora_dropout", "target_modules",
                                              "trainer.lr", "model.name") if k in run.data.params}
    tags = {"lora_exp.study": name, "trial_number": str(number), "trial_run_id": run_id, "value": str(value)}
    model = log_adapter_model(client, run_id, parent_run_id or run_id, run.info.experiment_id, f"{name}-best",
                              params, tags)
    version = client.create_model_version(name, source=model.artifact_location, run_id=run_id,
                                          model_id=model.model_id,
                                          tags={"trial_number": str(number), "value": str(value)})
    client.set_registered_model_alias(name, BEST_ALIAS, version.version)
    return True


# --- the end ---------------------------------------------------------------------------------


def finish_parent(study: Any, record: SweepRecord, stopped: str | None = None) -> str:
    """Final refresh, close the parent, and the summary text. The parent closes FINISHED when the
    study holds its n_trials; KILLED (tag `sweep_state`: stopped, and why) when this command stopped
    before (`stopped`: Ctrl-C, max_failures, an error, the timeout) and no trial runs elsewhere; it
    stays RUNNING only while another process or machine still trains the study's trials (the last
    of them closes it). The next start sets it RUNNING again."""
    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)  # a killed worker's trials are not "running elsewhere"
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    if record.run_id is not None:
        refresh(record, study, best.number if best else -1, final=True)
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        elsewhere = any(t.state == TrialState.RUNNING for t in trials)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if done >= record.n_trials and not elsewhere:
            status, tags = "FINISHED", {"sweep_state": "finished"}
        elif not elsewhere and (stopped or waiting or done < record.n_trials):
            status, tags = "KILLED", {"sweep_state": "stopped", "sweep_stop_reason": stopped or "stopped early"}
        else:
            status, tags = None, {}
        if status is not None:
            try:
                client = connect(record.tracking)[0]
                for key, value in tags.items():
                    client.set_tag(record.run_id, key, redact_text(value)[:5000])
                client.set_terminated(record.run_id, status)
            except Exception as exc:  # noqa: BLE001 - the next start closes it
                log.warning("could not close the parent run: %s", exc)
    counts = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    lines = [f"study {record.study_name}: {len(trials)} trials -- {counts[TrialState.COMPLETE]} completed, "
             f"{counts[TrialState.PRUNED]} pruned, {counts[TrialState.FAIL]} failed"]
    if best is not None:
        run_id = best.user_attrs.get("mlflow_run_id") or "-"
        lines.append(f"best: trial {best.number}  {record.metric}={best.value:.4f}  run {run_id}")
        lines.append(f"reproduce: {train_command([*record.base_overrides, *best.user_attrs.get('overrides', [])])}")
        if record.run_id:
            lines.append(f"parent run {record.run_id}; best adapter: models:/{record.study_name}@{BEST_ALIAS}")
    front = pareto_front(study)
    if front:
        lines.append(f"Pareto front ({', '.join(f'{m} {d}' for m, d in record.objectives)}): {len(front)} trials")
        for t in front:
            values = " ".join(f"{m}={v:.4g}" for m, v in zip(record.metrics, t.values))
            lines.append(f"  trial {t.number:>3}  {values}  run {t.user_attrs.get('mlflow_run_id', '-')}")
        lines.append("pick one: lora-exp best --promote RUN_ID  (points models:/"
                     f"{record.study_name}@{BEST_ALIAS} at it)")
    return "\n".join(lines)
