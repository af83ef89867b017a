"""A run id (or `models:/<name>@<alias>`) -> the config recorded with it -> retrain, export, generate.

The recorded config is data: it is parsed with yaml.safe_load and validated against the same
schema as a composed one. Nothing named in it is imported or instantiated.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lora_exp.config import RunConfig, TrackingConfig, compose_raw, from_container
from lora_exp.errors import ConfigError
from lora_exp.tracking import connect, redact_uri

log = logging.getLogger("lora_exp")

GROUPS = ("model", "lora", "trainer", "data", "tracking")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class RecordedRun:
    run: Any  # mlflow.entities.Run
    config: RunConfig
    raw: dict[str, Any]
    #: set when the reference named a sweep's parent run (then `run` is its best trial)
    via_parent: str | None = None


def tracking_for(overrides: list[str]) -> TrackingConfig:
    """The store to look runs up in: the default tracking config, or `tracking.*` overrides."""
    raw = compose_raw([o for o in overrides if o.startswith(("tracking.", "tracking="))])
    return from_container(raw).tracking


def resolve_run(ref: str, tracking: TrackingConfig) -> tuple[Any, Any, str | None]:
    """(client, run, parent id) for a run id, a sweep parent's id (-> its best trial) or models:/ URI."""
    from mlflow.exceptions import MlflowException

    client, _ = connect(tracking)
    store = redact_uri(tracking.uri)
    run_id = ref
    if ref.startswith("models:/"):
        name, _, alias = ref[len("models:/"):].partition("@")
        try:
            if alias:
                run_id = client.get_model_version_by_alias(name, alias).run_id
            else:
                name, _, version = ref[len("models:/"):].partition("/")
                run_id = client.get_model_version(name, version).run_id
        except MlflowException as exc:
            raise ConfigError(f"run: no registered model {ref} in {store}") from exc
    elif not RUN_ID.match(ref):
        raise ConfigError(f"run: {ref!r} is not a run id (32 hex characters) nor a models:/NAME@ALIAS URI")
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(f"run: no run {run_id} in the tracking store {store} (another store? set "
                          f"tracking.uri=...)") from exc
    parent = None
    if run.data.tags.get("lora_exp.kind") == "sweep":
        best = run.data.tags.get("best_run_id")
        if not best or best == "None":
            raise ConfigError(f"run: sweep run {run_id} has no completed trial yet")
        parent, run = run_id, client.get_run(best)
    return client, run, parent


def load_recorded(ref: str, tracking: TrackingConfig) -> tuple[Any, RecordedRun]:
    from mlflow.exceptions import MlflowException

    client, run, parent = resolve_run(ref, tracking)
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
            text = Path(path).read_text()
        except (MlflowException, OSError) as exc:
            raise ConfigError(f"run {run_id} has no recorded config (config.yaml artifact)") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"run {run_id}: its config.yaml is not valid YAML") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"run {run_id}: its config.yaml is not a mapping")
    return client, RecordedRun(run, from_container(raw, raw.get("overrides") or []), raw, parent)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> RunConfig:
    """Hydra overrides on a recorded config: `group=option` swaps a whole group from conf/,
    `a.b=value` changes an existing key (an unknown key is an error, as in Hydra's struct mode)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({k: v for k, v in raw.items() if k != "overrides"})
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        raise ConfigError(f"cannot parse override: {str(exc).splitlines()[0]}") from exc
    for override, text in zip(parsed, overrides):
        key = override.key_or_group
        if key in GROUPS:
            cfg[key] = compose_raw([text])[key]
            continue
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"override {text!r} does not apply to the recorded config: no key {key}")
        OmegaConf.update(cfg, key, override.value(), merge=False)
    recorded = list(raw.get("overrides") or [])
    return from_container(OmegaConf.to_container(cfg, resolve=True), recorded + list(overrides))


# --- commands -------------------------------------------------------------------------------


def cmd_rerun(ref: str, overrides: list[str]) -> int:
    from lora_exp.cli import train_config

    tracking = tracking_for(overrides)
    client, recorded = load_recorded(ref, tracking)
    cfg = apply_overrides(recorded.raw, [o for o in overrides if not o.startswith("tracking.")])
    original = recorded.run
    experiment = client.get_experiment(original.info.experiment_id).name
    cfg = _with_tracking(cfg, tracking, experiment)
    tags = {"lora_exp.kind": "rerun", "rerun_of": original.info.run_id}
    result, run_id = train_config(cfg, tags=tags, run_name=f"rerun-{original.info.run_name or original.info.run_id[:8]}")
    print(compare(client, original, run_id, result))
    return 0


def _with_tracking(cfg: RunConfig, tracking: TrackingConfig, experiment: str) -> RunConfig:
    import dataclasses

    return dataclasses.replace(cfg, tracking=dataclasses.replace(tracking, experiment=experiment))


def compare(client: Any, original: Any, rerun_id: str | None, result: Any) -> str:
    """Side-by-side final metrics and the largest gap between the two train-loss curves."""
    keys = ("final_train_loss", "final_eval_loss", "base_eval_loss", "exact_match")
    lines = [f"{'metric':<18} {'original':>12} {'rerun':>12}"]
    for key in keys:
        a, b = original.data.metrics.get(key), result.metrics.get(key)
        if a is not None or b is not None:
            lines.append(f"{key:<18} {_fmt(a):>12} {_fmt(b):>12}")
    old = {m.step: m.value for m in client.get_metric_history(original.info.run_id, "train_loss")}
    new = dict(result.loss_curve)
    common = sorted(set(old) & set(new))
    if common:
        gap = max(abs(old[s] - new[s]) for s in common)
        worst = max(common, key=lambda s: abs(old[s] - new[s]))
        lines.append(f"train_loss curves: {len(common)} common steps, largest difference {gap:.3g} (step {worst})")
    lines.append(f"original run {original.info.run_id}  rerun run {rerun_id or '-'}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def cmd_best(options: list[str], promote: str | None = None) -> int:
    """Best trial of a study (default: the most recently started one); its Pareto front when the
    study has several objectives. `promote` points models:/<study>@best at one trial's run."""
    import optuna

    from lora_exp.search import DEFAULT_STORAGE, _engine_kwargs

    opts = dict(o.split("=", 1) for o in options if "=" in o)
    unknown = sorted(k for k in set(opts) - {"study", "storage"} if not k.startswith("tracking."))
    if unknown or any("=" not in o for o in options):
        raise ConfigError(f"best: unknown option(s) {', '.join(unknown or options)} (use study=NAME storage=URL)")
    storage_url = opts.get("storage", DEFAULT_STORAGE)
    if storage_url.startswith("sqlite:///") and not Path(storage_url[len("sqlite:///"):]).is_file():
        raise ConfigError(f"best: no study storage at {storage_url} (run `lora-exp sweep` first)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(storage_url, engine_kwargs=_engine_kwargs(storage_url))
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
    print(describe_best(study))
    return 0


def promote_run(study: Any, run_id: str, opts: dict[str, str]) -> int:
    """Point the study's registered model alias `best` at the trial that logged `run_id`."""
    from lora_exp.sweep_tracking import publish_adapter

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


def describe_best(study: Any) -> str:
    if len(study.directions) > 1:
        return describe_front(study)
    try:
        best = study.best_trial
    except ValueError:
        return f"study {study.study_name}: no completed trial yet"
    overrides = best.user_attrs.get("overrides", [])
    base = study.user_attrs.get("base_overrides", [])
    return "\n".join([
        f"study {study.study_name}: best trial {best.number} of {len(study.trials)}",
        f"run id:     {best.user_attrs.get('mlflow_run_id', '-')}",
        f"objective:  {best.value:.6g}",
        f"params:     {json.dumps(best.params)}",
        f"reproduce:  lora-exp train {' '.join([*base, *overrides])}",
        f"rerun:      lora-exp rerun {best.user_attrs.get('mlflow_run_id', '-')}",
    ])


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
        lines.append(f"           lora-exp train {' '.join([*base, *t.user_attrs.get('overrides', [])])}")
    lines.append(f"pick one: lora-exp best --promote RUN_ID  (models:/{study.study_name}@best then names it)")
    return "\n".join(lines)


def cmd_export(ref: str, out: str, merge: bool, force: bool, overrides: list[str]) -> int:
    import torch

    from lora_exp.models import load_base

    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise ConfigError(f"export: {out} exists and is not empty (use --force to overwrite)")
    client, recorded = load_recorded(ref, tracking_for(overrides))
    run_id = recorded.run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        adapter = _download_adapter(client, run_id, tmp)
        base = load_base(recorded.config.model, torch.device("cpu"))
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent if target.parent.exists() else None))
        try:
            if merge:
                from peft import PeftModel

                model = PeftModel.from_pretrained(base.model, adapter).merge_and_unload()
                model.save_pretrained(staging)
            else:
                for f in Path(adapter).iterdir():
                    shutil.copy2(f, staging / f.name)
            base.tokenizer.save_pretrained(staging)
            (staging / "lora_exp_export.json").write_text(json.dumps({
                "run_id": run_id, "via": recorded.via_parent, "merged": merge,
                "tracking_uri": redact_uri(recorded.config.tracking.uri), "config": recorded.raw}, indent=1))
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    kind = "merged model" if merge else "adapter"
    how = "AutoModelForCausalLM.from_pretrained(DIR)" if merge else "PeftModel.from_pretrained(base, DIR)"
    print(f"exported the {kind} of run {run_id} to {target} (load with {how})")
    return 0


def _download_adapter(client: Any, run_id: str, tmp: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        path = client.download_artifacts(run_id, "adapter", tmp)
    except (MlflowException, OSError) as exc:
        raise ConfigError(f"run {run_id} has no adapter artifact (was it pruned or failed?)") from exc
    if not (Path(path) / "adapter_config.json").is_file():
        raise ConfigError(f"run {run_id} has no adapter artifact (was it pruned or failed?)")
    return path


def cmd_generate(ref: str, prompts: list[str], max_new_tokens: int | None, overrides: list[str]) -> int:
    from peft import PeftModel

    from lora_exp.data import Prompt
    from lora_exp.evaluation import generate
    from lora_exp.models import load_base, pick_device

    client, recorded = load_recorded(ref, tracking_for(overrides))
    with tempfile.TemporaryDirectory() as tmp:
        adapter = _download_adapter(client, recorded.run.info.run_id, tmp)
        base = load_base(recorded.config.model, pick_device(recorded.config.trainer.device))
        model = PeftModel.from_pretrained(base.model, adapter).to(base.device)
    texts = [p.encode().decode("unicode_escape") if "\\n" in p else p for p in prompts]
    outputs = generate(model, base.tokenizer, [Prompt(t, t, ()) for t in texts], base.device,
                       max_new_tokens or recorded.config.trainer.max_new_tokens)
    for text, output in zip(texts, outputs):
        print(f"{text}{'' if text.endswith(' ') else ' '}{output}")
    return 0
