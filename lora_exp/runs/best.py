"""`lora-exp best`: the best trial of a study (or its Pareto front), the command that reproduces
it, and `--promote RUN_ID` to point the study's registered model at another trial."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_exp.compose import train_command
from lora_exp.errors import ConfigError
from lora_exp.runs.recorded import tracking_for
from lora_exp.sweep.plan import default_storage
from lora_exp.sweep.storage import rdb_storage
from lora_exp.tracking.parent import publish_adapter, trial_params
from lora_exp.tracking.provenance import redact_uri
from lora_exp.tracking.store import connect


def cmd_best(options: list[str], promote: str | None = None) -> int:
    """Best trial of a study (default: the most recently started one); its Pareto front when the
    study has several objectives. `promote` points models:/<study>@best at one trial's run."""
    import optuna

    opts = dict(o.split("=", 1) for o in options if "=" in o)
    unknown = sorted(k for k in set(opts) - {"study", "storage"} if not k.startswith("tracking."))
    if unknown or any("=" not in o for o in options):
        raise ConfigError(f"best: unknown option(s) {', '.join(unknown or options)} (use study=NAME storage=URL)")
    storage_url = opts.get("storage") or default_storage()
    if storage_url.startswith("sqlite:///") and not Path(storage_url[len("sqlite:///"):]).is_file():
        raise ConfigError(f"best: no study storage at {storage_url} (run `lora-exp sweep` first)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = rdb_storage(storage_url)
    summaries = optuna.get_all_study_summaries(storage)
    if not summaries:
        raise ConfigError(f"best: no study in {redact_uri(storage_url)}")
    if "study" in opts:
        names = [s.study_name for s in summaries]
        if opts["study"] not in names:
            raise ConfigError(f"best: no study {opts['study']!r} (have: {', '.join(names)})")
        name = opts["study"]
    else:
        name = max(summaries, key=lambda s: (s.datetime_start.timestamp() if s.datetime_start else 0.0,
                                             s.study_name)).study_name
    study = optuna.load_study(study_name=name, storage=storage)
    if promote:
        return promote_run(study, promote, opts)
    store = [f"{k}={v}" for k, v in opts.items() if k.startswith("tracking.")]
    print(describe_best(study, store))
    return 0


def promote_run(study: Any, run_id: str, opts: dict[str, str]) -> int:
    """Point the study's registered model alias `best` at the trial that logged `run_id`."""
    trial = next((t for t in study.trials if t.user_attrs.get("mlflow_run_id") == run_id), None)
    if trial is None:
        raise ConfigError(f"best --promote: run {run_id} is not a trial of study {study.study_name}")
    if trial.state.name != "COMPLETE":
        raise ConfigError(f"best --promote: trial {trial.number} is {trial.state.name}, not COMPLETE")
    client, _ = connect(tracking_for([f"{k}={v}" for k, v in opts.items() if k.startswith("tracking.")]))
    publish_adapter(client, study.study_name, study.user_attrs.get("mlflow_parent_run_id"), run_id,
                    trial.number, trial.values)
    print(f"models:/{study.study_name}@best -> trial {trial.number} (run {run_id})")
    return 0


def describe_best(study: Any, store: list[str] | None = None) -> str:
    """The best trial, and the commands that reproduce it (`store`: the tracking.* options `best`
    was given, else those the sweep ran with: a rerun must read the same store)."""
    if len(study.directions) > 1:
        return describe_front(study)
    try:
        best = study.best_trial
    except ValueError:
        return f"study {study.study_name}: no completed trial yet"
    overrides = best.user_attrs.get("overrides", [])
    base = study.user_attrs.get("base_overrides", [])
    store = store or [o for o in base if o.startswith("tracking.")]
    return "\n".join([
        f"study {study.study_name}: best trial {best.number} of {len(study.trials)}",
        f"run id:     {best.user_attrs.get('mlflow_run_id', '-')}",
        f"objective:  {best.value:.6g}",
        f"params:     {trained_params(best)}",
        f"reproduce:  {train_command([*base, *overrides])}",
        f"rerun:      lora-exp rerun {' '.join([best.user_attrs.get('mlflow_run_id', '-'), *store])}",
    ])


def trained_params(trial: Any) -> str:
    """The searched parameters as the trial trained with them (`trial_params`), with those
    Optuna sampled as a ratio noted beside them."""
    shown, sampled = trial_params(trial)
    note = ", ".join(f"{k}={v}" for k, v in sampled.items())
    return json.dumps(shown) + (f"  (sampled as a ratio: {note})" if note else "")


def describe_front(study: Any) -> str:
    """The Pareto front of a multi-objective study, one trial a line."""
    metrics = study.user_attrs.get("objectives") or [f"objective_{i}" for i in range(len(study.directions))]
    front = sorted(study.best_trials, key=lambda t: t.number)
    if not front:
        return f"study {study.study_name}: no completed trial yet"
    base = study.user_attrs.get("base_overrides", [])
    lines = [f"study {study.study_name}: Pareto front of {len(front)} trials "
             f"({', '.join(f'{m} {d.name.lower()}' for m, d in zip(metrics, study.directions))})"]
    for t in front:
        values = "  ".join(f"{m}={v:.6g}" for m, v in zip(metrics, t.values))
        lines.append(f"trial {t.number:>3}  {values}  run {t.user_attrs.get('mlflow_run_id', '-')}")
        lines.append(f"           {train_command([*base, *t.user_attrs.get('overrides', [])])}")
    lines.append(f"pick one: lora-exp best --promote RUN_ID  (models:/{study.study_name}@best then names it)")
    return "\n".join(lines)

