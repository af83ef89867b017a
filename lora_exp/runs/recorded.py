"""A run id (or `models:/<name>@<alias>`) -> the config recorded with it.

The recorded config is data: it is parsed with yaml.safe_load and validated against the same
schema as a composed one. Nothing named in it is imported or instantiated.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lora_exp.compose import compose_raw, from_container
from lora_exp.config import GROUP_NAMES, RunConfig, TrackingConfig
from lora_exp.errors import ConfigError
from lora_exp.tracking.provenance import redact_uri
from lora_exp.tracking.store import connect

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


def existing_store(tracking: TrackingConfig) -> None:
    """Commands that read runs never create a store: a sqlite file that is not there is bad input."""
    uri = tracking.uri
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).expanduser().is_file():
        raise ConfigError(f"tracking.uri: no MLflow store at {uri} (run lora-exp train or sweep first, from the "
                          f"folder that holds mlruns/, or set tracking.uri=... or $MLFLOW_TRACKING_URI)")


def resolve_run(ref: str, tracking: TrackingConfig) -> tuple[Any, Any, str | None]:
    """(client, run, parent id) for a run id, a sweep parent's id (-> its best trial) or models:/ URI."""
    from mlflow.exceptions import MlflowException

    if not ref.startswith("models:/") and not RUN_ID.match(ref):
        raise ConfigError(f"run: {ref!r} is not a run id (32 hex characters) nor a models:/NAME@ALIAS URI")
    existing_store(tracking)
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
        if key in GROUP_NAMES:
            cfg[key] = compose_raw([text])[key]
            continue
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"override {text!r} does not apply to the recorded config: no key {key}")
        OmegaConf.update(cfg, key, override.value(), merge=False)
    recorded = list(raw.get("overrides") or [])
    return from_container(OmegaConf.to_container(cfg, resolve=True), recorded + list(overrides))


def download_adapter(client: Any, run_id: str, tmp: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        path = client.download_artifacts(run_id, "adapter", tmp)
    except (MlflowException, OSError) as exc:
        raise ConfigError(f"run {run_id} has no adapter artifact (was it pruned or failed?)") from exc
    if not (Path(path) / "adapter_config.json").is_file():
        raise ConfigError(f"run {run_id} has no adapter artifact (was it pruned or failed?)")
    return path

