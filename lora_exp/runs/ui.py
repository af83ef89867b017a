"""`lora-exp ui`: the MLflow UI over the tracking store a command line names (`tracking.uri`,
$MLFLOW_TRACKING_URI, or the default ./mlruns store), bound to loopback unless told, with the
link to the latest sweep's parent run in the Model-training view."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lora_exp.config import TrackingConfig
from lora_exp.errors import ConfigError
from lora_exp.runs.recorded import existing_store, tracking_for
from lora_exp.tracking.links import latest_sweep, run_link, ui_base
from lora_exp.tracking.provenance import redact_uri

START_TIMEOUT_S = 90


def cmd_ui(overrides: list[str], host: str = "127.0.0.1", port: int = 5000) -> int:
    tracking = tracking_for(overrides)
    if tracking.uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        print(f"MLflow UI: {tracking.uri}")
        _print_link(tracking, None)
        return 0
    existing_store(tracking)  # a missing sqlite store is reported, not created
    exe = Path(sys.executable).parent / "mlflow"
    command = [str(exe if exe.exists() else "mlflow"), "ui", "--backend-store-uri", _absolute(tracking.uri),
               "--host", host, "--port", str(port), "--workers", "1", "--uvicorn-opts", "--log-level warning"]
    # its own process group: with MLflow's job runner on, `mlflow ui` starts huey consumers beside
    # the server; all of them stop with it, on Ctrl-C, SIGTERM or SIGHUP alike
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    proc = subprocess.Popen(command, start_new_session=True, env=server_env())
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        _wait_healthy(proc, base)
        print(f"MLflow UI on {base} over {redact_uri(tracking.uri)} (Ctrl-C stops it)")
        _print_link(tracking, base)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        _stop(proc)
    return 0


def server_env() -> dict[str, str]:
    """The environment of an MLflow server lora-exp starts: MLflow's job runner (its GenAI
    evaluation and prompt jobs: seven huey consumer processes, ~10 s of CPU at start) off, as
    lora-exp runs none of those jobs, unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION says otherwise."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _absolute(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).expanduser().resolve()}"
    return uri


def _wait_healthy(proc: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"ui: mlflow ui exited with code {proc.returncode} (is {base} in use?)")
        try:
            if urllib.request.urlopen(f"{base}/health", timeout=2).read() == b"OK":
                return
        except OSError:
            time.sleep(0.5)
    raise ConfigError(f"ui: mlflow ui did not answer on {base} within {START_TIMEOUT_S} s")


def _print_link(tracking: TrackingConfig, served_at: str | None) -> None:
    from lora_exp.tracking.store import connect

    client, experiment_id = connect(tracking)
    parent = latest_sweep(client, experiment_id)
    if parent is None:
        print(f"no sweep in experiment {tracking.experiment!r} yet: {ui_base(tracking, served_at)}/#/experiments/"
              f"{experiment_id}?workflowType=machine_learning")
        return
    study = parent.data.tags.get("lora_exp.study", "?")
    print(f"latest sweep ({study}): {run_link(ui_base(tracking, served_at), experiment_id, parent.info.run_id)}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
    else:  # the server is gone; its huey consumer may not be
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
