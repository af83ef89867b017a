"""MLflow runs: opened and closed here; everything else logs through a `Tracker`
(`lora_exp.core.recording`): an `MlflowTracker` for a run, or a null tracker.

Metrics are buffered and sent with `log_batch` (one call per flush instead of one per point:
~55 ms a call against a server)."""
from __future__ import annotations

import contextlib
import logging
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

from lora_exp.config import TrackingConfig, resolve_path
from lora_exp.core.recording import NullTracker, Tracker
from lora_exp.tracking.locks import sqlite_wal
from lora_exp.tracking.provenance import provenance, redact_text
from lora_exp.tracking.store import connect

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LEN = 6000


class MlflowTracker:
    """One MLflow run, written through MlflowClient by run id (so several can be open at once)."""

    def __init__(self, client: Any, run_id: str, flush_seconds: float = 5.0):
        self.client = client
        self.run_id = run_id
        self.status = "FINISHED"
        self.flush_seconds = flush_seconds
        self._buffer: list[Any] = []
        self._last_flush = time.monotonic()
        self._tables: list[str] = []  # the table artifacts logged (the run tag lists them all)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact_text(param_value(v))) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if len(self._buffer) >= 1000 or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self, tags: dict[str, Any] | None = None) -> None:
        """Send the buffered metrics (and `tags`, in the same request: closing a run)."""
        from mlflow.entities import RunTag

        pending = [RunTag(k, redact_text(str(v))[:8000]) for k, v in (tags or {}).items()]
        while self._buffer or pending:
            # MLflow's limits on one request: 1000 metrics, 100 tags, 1000 entries in all
            tags_now, pending = pending[:100], pending[100:]
            chunk, self._buffer = self._buffer[:1000 - len(tags_now)], self._buffer[1000 - len(tags_now):]
            self.client.log_batch(self.run_id, metrics=chunk, tags=tags_now, synchronous=True)
        self._last_flush = time.monotonic()

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, redact_text(str(v))[:8000]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i:i + 100], synchronous=True)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact_text(text), artifact_file)

    def log_dir(self, local_dir: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_table(self, table: dict[str, list[Any]], artifact_file: str) -> None:
        """The table as MLflow's table artifact (`write_table`: MlflowClient.log_table lists the
        run's artifacts and reads the whole run back first, a third of a packed trial's recording)."""
        if artifact_file not in self._tables:
            self._tables.append(artifact_file)
        write_table(self.client, self.run_id, table, artifact_file, tuple(self._tables))

    def delete_artifacts(self, path: str) -> None:
        """Remove a folder of this run's artifacts (a finished trial's checkpoint)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        run = self.client.get_run(self.run_id)
        get_artifact_repository(run.info.artifact_uri).delete_artifacts(path)

    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None:
        """A dataset the run used, as an MLflow input (the run page's Datasets): files by path
        (`pkg:` ones where the package holds them), hub datasets by their page."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        head = source.split(",", 1)[0]
        if ":" in head and not head.startswith("pkg:") and "/" in head.split(":", 1)[0]:  # a hub dataset, path:split
            origin: Any = HTTPDatasetSource(f"https://huggingface.co/datasets/{head.split(':', 1)[0]}")
        else:
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local file either way
                warnings.simplefilter("ignore")
                origin = resolve_dataset_source(str(resolve_path(head).resolve()))
        entity = MetaDataset(source=origin, name=name, digest=digest[:36])._to_mlflow_entity()
        tags = [InputTag("mlflow.data.context", context)]
        log_inputs_despite_races(self.client, self.run_id, [DatasetInput(entity, tags=tags)])


def log_inputs_despite_races(client: Any, run_id: str, datasets: list[Any], attempts: int = 4) -> None:
    """`log_inputs`, again when another process inserted the same dataset between MLflow's lookup
    and its insert (a duplicate key in the experiment's `datasets` table, sqlite or PostgreSQL):
    the next attempt finds that row and links it. Safe to repeat: MLflow links a dataset to a run
    once."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except MlflowException as exc:
            text = str(exc)
            raced = "IntegrityError" in text or "UNIQUE constraint" in text or "UniqueViolation" in text \
                or "duplicate key" in text
            if not raced or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def param_value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value) if not isinstance(value, (int, float, bool)) else str(value)
    return text if len(text) <= MAX_PARAM_LEN else text[: MAX_PARAM_LEN - 3] + "..."


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


def open_run(cfg: TrackingConfig, run_name: str | None = None, tags: dict[str, Any] | None = None,
             parent_run_id: str | None = None, base_tags: dict[str, str] | None = None,
             flush_seconds: float | None = None) -> MlflowTracker:
    """A new run (nested under `parent_run_id` if given), tagged with the provenance
    (`base_tags`, read once by a caller that opens many runs) and `tags`."""
    sqlite_wal(cfg.uri)
    client, experiment_id = connect(cfg)
    all_tags = {**(base_tags if base_tags is not None else provenance()), **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name or cfg.run_name,
                            tags={k: redact_text(str(v)) for k, v in all_tags.items()})
    return MlflowTracker(client, run.info.run_id, cfg.flush_seconds if flush_seconds is None else flush_seconds)


def close_run(tracker: MlflowTracker, status: str, tags: dict[str, Any] | None = None) -> None:
    """Flush and close the run with `status`. Not best effort: a run that cannot be closed
    (tracking server gone) must fail its caller, so nothing counts as done without its run."""
    tracker.flush(tags)
    tracker.client.set_terminated(tracker.run_id, status)


def fail_run(tracker: MlflowTracker, error: str, exc: BaseException | None = None,
             tags: dict[str, Any] | None = None) -> None:
    """Close the run FAILED with the error tagged (and its traceback as `traceback.txt`), best
    effort: this runs while already failing, and must never hide the original error."""
    _safe(tracker.set_tags, {"error": error[:8000], **(tags or {})})
    if exc is not None and not isinstance(exc, KeyboardInterrupt):
        _safe(tracker.log_text, "".join(traceback.format_exception(exc)), "traceback.txt")
    _safe(tracker.flush)
    _safe(tracker.client.set_terminated, tracker.run_id, "FAILED")


@contextlib.contextmanager
def start_run(cfg: TrackingConfig, run_name: str | None = None, tags: dict[str, Any] | None = None,
              parent_run_id: str | None = None) -> Iterator[Tracker]:
    """Open a run and always close it with a status.

    Normal exit: `tracker.status` (FINISHED unless the caller set another). Ctrl-C or any
    exception: FAILED with the error tagged. Metrics buffered so far are flushed first, so no
    logged point is lost."""
    if not cfg.enabled:
        yield NullTracker()
        return
    tracker = open_run(cfg, run_name, tags, parent_run_id)
    try:
        yield tracker
    except KeyboardInterrupt as exc:  # Ctrl-C twice, or SIGTERM: the run did not finish
        fail_run(tracker, "interrupted", exc)
        raise
    except BaseException as exc:
        fail_run(tracker, f"{type(exc).__name__}: {exc}", exc)
        raise
    close_run(tracker, tracker.status)


def _safe(fn: Any, *args: Any) -> None:
    """Best effort while already failing: never mask the original error."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001
        log.warning("mlflow: %s failed: %s", getattr(fn, "__name__", fn), exc)


def read_table(client: Any, run_id: str, artifact_file: str) -> dict[str, list[Any]] | None:
    """A table artifact of a run (MLflow's table format) as columns, or None if it has none."""
    import json
    import tempfile
    from pathlib import Path

    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            raw = json.loads(Path(client.download_artifacts(run_id, artifact_file, tmp)).read_text())
        except (MlflowException, OSError, ValueError):
            return None
    columns, data = raw.get("columns", []), raw.get("data", [])
    return {c: [row[i] for row in data] for i, c in enumerate(columns)}
