"""Connecting to an MLflow store: one client per URI, the experiment found or created, and
whether the store answers (a sweep waits for a tracking server that went away)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lora_exp.config import TrackingConfig
from lora_exp.errors import ConfigError
from lora_exp.tracking.locks import store_lock
from lora_exp.tracking.provenance import redact_uri

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"

_clients: dict[str, Any] = {}
#: (uri, experiment name) -> its id, once found or created in this process (a pack opens a run a
#: trial; the id of an experiment never changes)
_experiments: dict[tuple[str, str], str] = {}
#: tracking servers that answered `check_uri` in this process (connect does not ask them again)
_answered: set[str] = set()


def check_uri(cfg: TrackingConfig) -> str:
    """`cfg.uri` as `connect` opens it (a sqlite path made absolute, its folder made), or one
    line on what is wrong with it (not a URI, a tracking server that does not answer), in well
    under a second and before MLflow loads."""
    uri = cfg.uri
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):]).expanduser().resolve()  # relative to the cwd, now
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"tracking.uri: cannot make the folder of {path} ({exc.strerror})") from exc
        return f"sqlite:///{path}"
    if "://" not in uri:
        raise ConfigError(f"tracking.uri: {uri!r} is not a URI (sqlite:///path.db, postgresql://..., "
                          f"http://host:port); MLflow 3 refuses plain file stores")
    if uri not in _answered and uri.startswith(("http://", "https://")):
        check_server(uri)  # seconds and one line, not minutes of retries
        _answered.add(uri)
    return uri


def connect(cfg: TrackingConfig) -> tuple[Any, str]:
    """An MlflowClient for `cfg.uri` and the id of `cfg.experiment` (created if missing)."""
    uri = check_uri(cfg)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    client = _clients.get(uri)
    if client is not None and (uri, cfg.experiment) in _experiments:
        return client, _experiments[uri, cfg.experiment]
    client, experiment_id = _connect(cfg, uri, client)
    _experiments[uri, cfg.experiment] = experiment_id
    return client, experiment_id


def _connect(cfg: TrackingConfig, uri: str, client: Any) -> tuple[Any, str]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        if client is None:
            with store_lock(uri, "mlflow-init"):  # one process at a time runs a new store's migrations
                client = MlflowClient(tracking_uri=uri)
                experiment = client.get_experiment_by_name(cfg.experiment)
            _clients[uri] = client
        else:
            experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            return client, experiment.experiment_id
        location = None if uri.startswith(("http://", "https://")) else artifact_root(cfg, uri).as_uri()
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


def artifact_root(cfg: TrackingConfig, uri: str) -> Path:
    """Where a new experiment keeps its artifacts: `tracking.artifact_root`, else beside the sqlite
    file (the store and its artifacts stay together wherever the store is), else ./mlruns/artifacts."""
    if cfg.artifact_root:
        return Path(cfg.artifact_root).expanduser().resolve()
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent / "artifacts"
    return Path("mlruns/artifacts").resolve()


def check_server(uri: str, timeout: float = 5.0) -> None:
    """A tracking server answers its health check within `timeout` seconds, or this says why not."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as answer:
            if answer.status == 200:
                return
            reason = f"HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} from /health"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = str(getattr(exc, "reason", exc)) or type(exc).__name__
    raise ConfigError(f"tracking.uri: cannot reach the tracking server {redact_uri(uri)} ({reason})")


def reachable(cfg: TrackingConfig) -> bool:
    """Whether the tracking store answers now (one cheap request)."""
    if not cfg.enabled:
        return True
    try:
        if cfg.uri.startswith(("http://", "https://")):
            check_server(cfg.uri)
        client, _ = connect(cfg)
        client.search_experiments(max_results=1)
        return True
    except Exception:  # noqa: BLE001 - any failure means: not now
        return False


#: the longest wait between two polls of a store that is down: a poll is one small request, and
#: a sweep goes on within this long of the store coming back
POLL_MAX_S = 5.0


def wait_until_reachable(cfg: TrackingConfig, max_wait_s: float) -> bool:
    """Poll the tracking store with backoff (1, 2, 4 s, then every POLL_MAX_S) for up to
    `max_wait_s`; True once it answers."""
    deadline, delay, warned = time.monotonic() + max_wait_s, 1.0, False
    while not reachable(cfg):
        if time.monotonic() >= deadline:
            return False
        if not warned:
            log.warning("tracking store %s unreachable: waiting up to %.0fs for it", redact_uri(cfg.uri), max_wait_s)
            warned = True
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, POLL_MAX_S)
    if warned:
        log.warning("tracking store %s is back", redact_uri(cfg.uri))
    return True
