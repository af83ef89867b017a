"""The one owner of MLflow. Runs are opened and closed here; everything else logs through a
`Tracker` (an MLflow run, or a null tracker for runs that must not be recorded).

Metrics are buffered and sent with `log_batch` (one call per flush instead of one per point:
~55 ms a call against a server)."""
from __future__ import annotations

import contextlib
import logging
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Protocol
from urllib.parse import urlsplit, urlunsplit

from lora_exp.config import PACKAGE_DIR, TrackingConfig
from lora_exp.errors import ConfigError

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MAX_PARAM_LEN = 6000
PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "hydra-core", "optuna", "mlflow",
            "lora-exp")


class Tracker(Protocol):
    run_id: str | None
    #: final MLflow status the run closes with (FINISHED unless the caller changes it).
    status: str

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_dir(self, local_dir: str | Path, artifact_path: str) -> None: ...
    def log_table(self, table: dict[str, list[Any]], artifact_file: str) -> None: ...
    def flush(self) -> None: ...


class NullTracker:
    """Records nothing (tracking.enabled=false, or unit tests of the training loop)."""

    run_id = None
    status = "FINISHED"

    def log_params(self, params: dict[str, Any]) -> None: pass
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: pass
    def set_tags(self, tags: dict[str, Any]) -> None: pass
    def log_text(self, text: str, artifact_file: str) -> None: pass
    def log_dir(self, local_dir: str | Path, artifact_path: str) -> None: pass
    def log_table(self, table: dict[str, list[Any]], artifact_file: str) -> None: pass
    def flush(self) -> None: pass


class MlflowTracker:
    """One MLflow run, written through MlflowClient by run id (so several can be open at once)."""

    def __init__(self, client: Any, run_id: str, flush_seconds: float = 5.0):
        self.client = client
        self.run_id = run_id
        self.status = "FINISHED"
        self.flush_seconds = flush_seconds
        self._buffer: list[Any] = []
        self._last_flush = time.monotonic()

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact_text(_param_value(v))) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if len(self._buffer) >= 1000 or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
        self._last_flush = time.monotonic()

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, redact_text(str(v))[:8000]) for k, v in tags.items()],
                              synchronous=True)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact_text(text), artifact_file)

    def log_dir(self, local_dir: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_table(self, table: dict[str, list[Any]], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=table, artifact_file=artifact_file)


def write_table(client: Any, run_id: str, table: dict[str, list[Any]], artifact_file: str,
                known_tables: tuple[str, ...] = ()) -> None:
    """Write (overwrite) a table artifact in MLflow's table format.

    `MlflowClient.log_table` appends to an existing artifact of the same name; a table refreshed
    after every trial must replace it. The run tag MLflow's UI reads to offer the table view is set
    as log_table sets it."""
    import json

    import pandas as pd
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    client.log_text(run_id, redact_text(pd.DataFrame(table).to_json(orient="split", index=False)), artifact_file)
    tag = [{"path": path, "type": "table"} for path in sorted({artifact_file, *known_tables})]
    client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(tag))


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value) if not isinstance(value, (int, float, bool)) else str(value)
    return text if len(text) <= MAX_PARAM_LEN else text[: MAX_PARAM_LEN - 3] + "..."


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 8}} -> {'lora.r': 8}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


_SECRET_IN_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")


def redact_text(text: str) -> str:
    """Replace the password of every URL in `text` (a command line, an override list, a YAML dump)."""
    return _SECRET_IN_URL.sub(r"\1***@", text)


def redact_uri(uri: str) -> str:
    """Drop the password from a URL (postgresql://user:pw@host/db -> postgresql://user:***@host/db)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def provenance() -> dict[str, str]:
    """Git commit, package versions, Python and platform: logged as tags on every run."""
    tags = {"python": platform.python_version(), "platform": platform.platform(terse=True),
            "command": redact_text(" ".join(["lora-exp"] + sys.argv[1:]))
            if sys.argv and sys.argv[0].endswith("lora-exp") else ""}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"version.{name}"] = metadata.version(name)
    repo = PACKAGE_DIR.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(bool(dirty)).lower()
    return {k: v for k, v in tags.items() if v}


# --- connecting and opening runs ----------------------------------------------------------

_clients: dict[str, Any] = {}


def connect(cfg: TrackingConfig) -> tuple[Any, str]:
    """An MlflowClient for `cfg.uri` and the id of `cfg.experiment` (created if missing)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = cfg.uri
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):]).expanduser().resolve()  # relative to the cwd, now
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{path}"
    elif "://" not in uri:
        raise ConfigError(f"tracking.uri: {uri!r} is not a URI (sqlite:///path.db, postgresql://..., "
                          f"http://host:port); MLflow 3 refuses plain file stores")
    client = _clients.get(uri)
    if client is None:
        client = _clients[uri] = MlflowClient(tracking_uri=uri)
    try:
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            return client, experiment.experiment_id
        location = None if uri.startswith(("http://", "https://")) else Path(cfg.artifact_root).resolve().as_uri()
        try:
            # the UI then opens on the runs table (model training), not on the GenAI overview
            return client, client.create_experiment(cfg.experiment, artifact_location=location,
                                                    tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
        except MlflowException:  # another worker created it first
            experiment = client.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                raise
            return client, experiment.experiment_id
    except MlflowException as exc:
        raise ConfigError(f"tracking.uri: cannot use {redact_uri(uri)}: {str(exc).splitlines()[0]}") from exc


def reachable(cfg: TrackingConfig) -> bool:
    """Whether the tracking store answers now (one cheap request)."""
    if not cfg.enabled:
        return True
    try:
        client, _ = connect(cfg)
        client.search_experiments(max_results=1)
        return True
    except Exception:  # noqa: BLE001 - any failure means: not now
        return False


def wait_until_reachable(cfg: TrackingConfig, max_wait_s: float) -> bool:
    """Poll the tracking store with backoff for up to `max_wait_s`; True once it answers."""
    deadline, delay, warned = time.monotonic() + max_wait_s, 1.0, False
    while not reachable(cfg):
        if time.monotonic() >= deadline:
            return False
        if not warned:
            log.warning("tracking store %s unreachable: waiting up to %.0fs for it", redact_uri(cfg.uri), max_wait_s)
            warned = True
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 30.0)
    if warned:
        log.warning("tracking store %s is back", redact_uri(cfg.uri))
    return True


@contextlib.contextmanager
def start_run(cfg: TrackingConfig, run_name: str | None = None, tags: dict[str, Any] | None = None,
              parent_run_id: str | None = None) -> Iterator[Tracker]:
    """Open a run (nested under `parent_run_id` if given) and always close it with a status.

    Normal exit: `tracker.status` (FINISHED unless the caller set KILLED, e.g. a pruned trial).
    Ctrl-C or any exception: FAILED with the error tagged. Metrics buffered so far are flushed
    first, so no logged point is lost.
    """
    if not cfg.enabled:
        yield NullTracker()
        return
    client, experiment_id = connect(cfg)
    all_tags = {**provenance(), **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name or cfg.run_name,
                            tags={k: redact_text(str(v)) for k, v in all_tags.items()})
    tracker = MlflowTracker(client, run.info.run_id, cfg.flush_seconds)
    try:
        yield tracker
    except KeyboardInterrupt:  # Ctrl-C twice, or SIGTERM: the run did not finish
        _safe(tracker.set_tags, {"error": "interrupted"})
        _safe(tracker.flush)
        _safe(client.set_terminated, tracker.run_id, "FAILED")
        raise
    except BaseException as exc:
        import traceback

        _safe(tracker.set_tags, {"error": f"{type(exc).__name__}: {exc}"[:8000]})
        _safe(tracker.log_text, "".join(traceback.format_exception(exc)), "traceback.txt")
        _safe(tracker.flush)
        _safe(client.set_terminated, tracker.run_id, "FAILED")
        raise
    # Not best effort: a run that cannot be closed (tracking server gone) must fail its caller,
    # so a sweep never records a trial as complete without its MLflow run.
    tracker.flush()
    client.set_terminated(tracker.run_id, tracker.status)


def _safe(fn: Any, *args: Any) -> None:
    """Best effort while already failing: never mask the original error."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001
        log.warning("mlflow: %s failed: %s", getattr(fn, "__name__", fn), exc)
