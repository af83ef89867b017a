"""Links into the MLflow UI that open where a user wants to look: a sweep's parent run in the
"Model training" view (MLflow 3 opens experiments in its GenAI view otherwise)."""
from __future__ import annotations

from typing import Any

from lora_exp.config import TrackingConfig

DEFAULT_UI = "http://127.0.0.1:5000"


def ui_base(cfg: TrackingConfig, served_at: str | None = None) -> str:
    """The UI's address: the tracking server itself for an http(s) store, else where `lora-exp ui`
    serves the store (`served_at`, by default 127.0.0.1:5000)."""
    if cfg.uri.startswith(("http://", "https://")):
        return cfg.uri.rstrip("/")
    return (served_at or DEFAULT_UI).rstrip("/")


def run_link(base: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the Model-training view (its params, metrics, child runs, artifacts)."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def latest_sweep(client: Any, experiment_id: str) -> Any:
    """The most recently started sweep's parent run in the experiment, or None."""
    runs = client.search_runs([experiment_id], filter_string="tags.`lora_exp.kind` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None
