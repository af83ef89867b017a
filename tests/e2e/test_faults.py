"""Sweeps under faults, concurrency and bad input: nothing finished is lost, no run stays RUNNING."""
from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_exp.tracking.store import POLL_MAX_S

from helpers import REPO, load_study, popen_cli, run_cli, sweep_runs

os.environ["LORA_EXP_SWEEPS_DIR"] = str(REPO / "sweeps")


def _sweep_file(workdir: Path, space: str, max_failures: int = 10, seed: int = 3) -> str:
    path = workdir / "faulty.yaml"
    path.write_text(f"""# lora-exp sweep sweep=faulty.yaml
study: tiny
n_trials: 4
sampler: {{name: random, seed: {seed}}}
pruner: none
max_failures: {max_failures}
base: [model=tiny_gpt2, data=seed, trainer.max_steps=10, trainer.batch_size=5, trainer.eval_steps=5,
       trainer.max_new_tokens=4, trainer.max_grad_norm=null]
space:
{space}""")
    return f"sweep={path}"


def test_nan_and_raising_trials_fail_in_both_stores_and_the_sweep_goes_on(workdir, store):
    space = ("  trainer.lr: {type: categorical, choices: [0.01, 0.02, 0.03, 1.0e+30]}\n"
             "  lora.lora_alpha: {type: categorical, choices: [0, 1, 2, 4], ratio_of: lora.r}\n")
    # seed 1 samples (lr, alpha): ok, ok, alpha 0, lr 1e30, ok, ok (`sweep --dry-run` shows them)
    proc = run_cli("sweep", _sweep_file(workdir, space, max_failures=30, seed=1), cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = load_study(f"sqlite:///{workdir}/mlruns/optuna.db")
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(finished) == 4, "failed trials are replaced: the study ends with n_trials finished"
    reasons = {t.user_attrs.get("failure", "") for t in failed}
    assert any("became nan" in r or "became inf" in r for r in reasons), reasons  # NaN/inf loss
    assert any("lora.lora_alpha: must be > 0" in r for r in reasons), reasons     # a bad sampled value
    client, parents, children = sweep_runs(store)
    by_id = {r.info.run_id: r for r in children}
    for t in failed:
        run = by_id.get(t.user_attrs.get("mlflow_run_id"))
        if run is not None:  # a trial that failed before its run opened has none
            assert run.info.status == "FAILED" and run.data.tags["error"]
    assert not [r for r in children if r.info.status == "RUNNING"]
    assert f"{len(failed)} failed" in proc.stdout


def test_failure_limit_stops_the_sweep_with_a_clear_message(workdir, store):
    space = "  lora.lora_alpha: {type: categorical, choices: [0], ratio_of: lora.r}\n"
    proc = run_cli("sweep", _sweep_file(workdir, space, max_failures=2), cwd=workdir)
    assert proc.returncode == 1
    assert "sweep stopped: 2 trials failed (max_failures)" in proc.stderr.strip().splitlines()[-1]
    study = load_study(f"sqlite:///{workdir}/mlruns/optuna.db")
    assert [t.state.name for t in study.trials].count("FAIL") == 2


def _start(workdir, *args, env=None):
    return popen_cli("sweep", *args, cwd=workdir, env=env)


def _wait_for_line(proc, prefix, seen):
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return
    raise AssertionError("".join(seen))


def test_a_claimed_trial_goes_stale_even_if_its_worker_dies_before_beating(workdir):
    """Optuna finds stale trials by their heartbeat: a worker killed between claiming trials and
    its heartbeat thread's first beat must not leave RUNNING trials that no one ever retries."""
    script = f"""
import time, optuna
from lora_exp.sweep.claims import claim_waiting_trials
from lora_exp.sweep.storage import open_study, top_up
from lora_exp.sweep.spec import load_sweep
url = "sqlite:///{workdir}/optuna.db"
study, _ = open_study(load_sweep("tiny"), url, "s", create=True)
top_up(study, 3, url)
claimed = claim_waiting_trials(study, url, 2)   # and then no beat at all, as if killed here
time.sleep(5)                                   # past the grace period (4 s)
optuna.storages.fail_stale_trials(study)
print(sorted(t.state.name for t in study.get_trials(deepcopy=False)))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LORA_EXP_HEARTBEAT_SECONDS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    states = proc.stdout.strip().splitlines()[-1]
    assert states.count("FAIL") == 2 and "RUNNING" not in states, states


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_four_workers_twelve_trials_each(workdir, store, backend, request):
    """Four worker processes on one study: exactly n trials, numbered 0..n-1, each with one run."""
    n = 48
    storage = f"sqlite:///{workdir}/mlruns/optuna.db"
    if backend == "postgresql":
        storage = request.getfixturevalue("postgres_url")
    proc = run_cli("sweep", "sweep=tiny", f"n_trials={n}", "workers=4", f"storage={storage}", "trainer.max_steps=6",
                   "trainer.eval_steps=3", "data.n_generate=1", cwd=workdir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = load_study(storage).trials
    odd = [(t.number, t.state.name, t.system_attrs) for t in trials
           if t.number >= n or t.state.name not in ("COMPLETE", "PRUNED")]
    assert len(trials) == n and sorted(t.number for t in trials) == list(range(n)), (len(trials), odd,
                                                                                       proc.stderr[-2000:])
    assert not odd, odd
    _, parents, children = sweep_runs(store)
    assert len(parents) == 1 and len(children) == n
    assert len({r.data.tags["trial_number"] for r in children}) == n
    assert all("final_eval_loss" in r.data.metrics for r in children if r.data.tags["trial_state"] == "COMPLETE")


@pytest.mark.slow
@pytest.mark.postgres
def test_many_machines_on_loopback_tracking_server_and_postgresql(workdir, postgres_url, tmp_path):
    """An MLflow server on PostgreSQL with served artifacts + an Optuna study on PostgreSQL; two
    workers that reach both only by URL (as two machines would)."""
    import socket

    backend = postgres_url.rsplit("/", 1)[0] + "/" + postgres_url.rsplit("/", 1)[1]  # the test's own database
    mlflow_db = _create_db(postgres_url, "mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _mlflow_server(mlflow_db, tmp_path / "served", port)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url)
        machines = [tmp_path / "m1", tmp_path / "m2"]
        args = ["sweep=tiny", "n_trials=8", f"storage={backend}", f"tracking.uri={url}", "trainer.max_steps=10",
                "trainer.eval_steps=5"]
        first = popen_cli("sweep", *args, cwd=machines[0].mkdir() or machines[0])
        for _ in range(120):  # the first machine creates the study; then the second joins
            time.sleep(0.5)
            try:
                load_study(backend)
                break
            except KeyError:
                continue
        second = run_cli("sweep", *args, cwd=machines[1].mkdir() or machines[1], timeout=600)
        out = first.communicate(timeout=600)[0]
        assert first.returncode == 0 and second.returncode == 0, out + second.stderr[-2000:]
        trials = load_study(backend).trials
        assert len(trials) == 8 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
        client, parents, children = sweep_runs(url)
        assert len(parents) == 1 and len(children) == 8
        best = load_study(backend).best_trial.user_attrs["mlflow_run_id"]
        assert client.get_run(best).info.artifact_uri.startswith("mlflow-artifacts:")
        local = client.download_artifacts(best, "adapter", str(tmp_path))  # served by the server
        assert (Path(local) / "adapter_config.json").is_file()
        assert not (machines[0] / "mlruns").exists() and not (machines[1] / "mlruns").exists(), \
            "workers reach the stores only by URL"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _create_db(admin_url: str, prefix: str) -> str:
    import uuid

    import sqlalchemy

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(admin_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


def test_no_secret_reaches_mlflow(workdir, store, postgres_url):
    password = postgres_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    proc = run_cli("sweep", "sweep=tiny", "n_trials=2", f"storage={postgres_url}", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f":{password}@" not in proc.stdout + proc.stderr
    client, parents, children = sweep_runs(store)
    for run in parents + children:
        blob = repr(run.data.params) + repr(run.data.tags)
        assert f":{password}@" not in blob
        assert "***" in run.data.tags.get("command", "***")
    assert parents[0].data.params["storage"].count("***") == 1
    for path in (workdir / "mlruns").rglob("*.yaml"):
        assert f":{password}@" not in path.read_text()


def _mlflow_server(backend: str, artifacts: Path, port: int):
    """`mlflow server` as `make server` starts it (MLflow's job runner off), in its own process group."""
    from lora_exp.runs.ui import server_env

    return subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend,
                             "--serve-artifacts", "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=server_env())


def _wait_healthy(url: str, seconds: int = 90) -> None:
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"OK":
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("mlflow server not healthy")


@pytest.mark.slow
def test_tracking_server_outage_mid_sweep(workdir):
    """The server goes away for a while: trials wait (MLflow's HTTP retries) or fail cleanly and are
    replaced; no trial is COMPLETE in Optuna without its finished MLflow run."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = _mlflow_server(f"sqlite:///{workdir}/server.db", workdir / "served", port)
    _wait_healthy(url)
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    proc, seen = _start(workdir, "sweep=tiny", "n_trials=4", f"tracking.uri={url}", "trainer.max_steps=100",
                        "trainer.eval_steps=50", env=env), []
    try:
        _wait_for_line(proc, "[1/4]", seen)
        os.killpg(server.pid, signal.SIGKILL)  # the server vanishes mid-trial
        server.wait(timeout=30)
        time.sleep(8)
        server = _mlflow_server(f"sqlite:///{workdir}/server.db", workdir / "served", port)
        _wait_healthy(url)
        healthy = datetime.datetime.now()
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, "".join(seen) + out
        # the sweep polls the store at most POLL_MAX_S apart: it goes on soon after the server is back
        back = re.search(r"^(\d\d:\d\d:\d\d) tracking store \S+ is back", "".join(seen) + out, re.M)
        assert back, "".join(seen) + out
        at = datetime.datetime.combine(healthy.date(), datetime.time.fromisoformat(back.group(1)))
        late = (at - healthy).total_seconds()
        late += 86400 if late < -43200 else 0  # (past midnight)
        assert late <= POLL_MAX_S + 5, (back.group(0), healthy)
        study = load_study(f"sqlite:///{workdir}/mlruns/optuna.db")
        states = [t.state.name for t in study.trials]
        assert states.count("COMPLETE") + states.count("PRUNED") == 4
        client, parents, children = sweep_runs(url)
        assert not [r for r in children if r.info.status == "RUNNING"]
        for t in study.trials:
            if t.state.name == "COMPLETE":
                run = client.get_run(t.user_attrs["mlflow_run_id"])
                assert run.info.status == "FINISHED" and "final_eval_loss" in run.data.metrics
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
