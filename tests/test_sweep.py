"""Sweeps end to end on a tiny model: real Optuna storage, real MLflow store, real processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from lora_exp.config import compose
from lora_exp.errors import ConfigError
from lora_exp.search import cmd_sweep, parse_options
from lora_exp.sweeps import corner_overrides, load_sweep, parse_sweep

SWEEPS = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml"))
os.environ["LORA_EXP_SWEEPS_DIR"] = str(REPO / "sweeps")


@pytest.mark.parametrize("name", SWEEPS)
def test_every_shipped_sweep_file_parses_and_its_space_composes(name):
    spec = load_sweep(name)
    assert spec.n_trials >= 1 and spec.space
    assert (REPO / "sweeps" / f"{name}.yaml").read_text().startswith("# lora-exp sweep")
    compose(spec.base)
    for corner in corner_overrides(spec.space):
        compose(spec.base + corner)


def test_default_sweep_searches_the_offline_model_on_qa_demo():
    spec = load_sweep("default")
    cfg = compose(spec.base)
    assert cfg.model.name == "smollm2_135m" and cfg.data.name == "qa_demo"
    assert spec.metric == "eval_loss" and spec.direction == "minimize"
    assert {"lora.r", "lora.lora_alpha", "lora.lora_dropout", "lora.preset", "trainer.lr"} <= set(spec.space)
    assert spec.space["trainer.lr"].log and spec.space["lora.lora_alpha"].ratio_of == "lora.r"


BAD_SWEEPS = [
    ("n_trials: 0\nspace: {lora.r: {type: int, low: 1, high: 4}}", "n_trials: must be an integer >= 1"),
    ("space: {lora.r: {type: int, low: 8, high: 4}}", "space.lora.r: low (8) > high (4)"),
    ("space: {lora.r: {type: normal, low: 1, high: 4}}", "unknown distribution 'normal'"),
    ("sampler: {name: cmaes}\nspace: {lora.r: {type: int, low: 1, high: 4}}", "unknown sampler 'cmaes'"),
    ("pruner: patient\nspace: {lora.r: {type: int, low: 1, high: 4}}", "unknown pruner 'patient'"),
    ("space: {}", "space: must map config keys"),
    ("space: {trainer.lr: {type: float, low: 0, high: 1, log: true}}", "log scale needs low > 0"),
    ("objective: {metric: eval_loss, direction: down}\nspace: {lora.r: {type: int, low: 1, high: 4}}",
     "must be minimize or maximize"),
    ("trials: 4\nspace: {lora.r: {type: int, low: 1, high: 4}}", "unknown key(s) trials"),
]


@pytest.mark.parametrize("text,message", BAD_SWEEPS, ids=[m for _, m in BAD_SWEEPS])
def test_bad_sweep_files_are_rejected_with_one_line(text, message):
    import yaml

    with pytest.raises(ConfigError) as info:
        parse_sweep(yaml.safe_load(text), "bad")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_invalid_yaml_and_bad_options(workdir):
    (workdir / "broken.yaml").write_text("study: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(str(workdir / "broken.yaml"))
    with pytest.raises(ConfigError, match="n_trials: must be >= 1"):
        parse_options(["n_trials=0"])
    with pytest.raises(ConfigError, match="unknown sweep 'nope'"):
        load_sweep("nope")
    opts = parse_options(["sweep=tiny", "n_trials=3", "workers=2", "lora.r=4", "model=tiny_llama"])
    assert (opts.sweep, opts.n_trials, opts.workers, opts.overrides) == ("tiny", 3, 2, ("lora.r=4", "model=tiny_llama"))


def test_search_space_value_the_config_rejects_fails_before_any_trial(workdir):
    (workdir / "bad_space.yaml").write_text(
        "base: [model=tiny_gpt2, data=seed]\nspace: {lora.r: {type: int, low: 0, high: 4}}\n")
    with pytest.raises(ConfigError, match="lora.r: must be >= 1, got 0"):
        cmd_sweep([f"sweep={workdir}/bad_space.yaml"])
    assert not (workdir / "mlruns").exists()


def _study(storage, name="tiny"):
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def _runs(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("lora-exp")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("lora_exp.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("lora_exp.kind") == "trial"]
    return client, parents, children


def test_tiny_sweep_prunes_and_mlflow_matches_optuna(workdir, store, capsys):
    assert cmd_sweep(["sweep=tiny", "n_trials=6"]) == 0
    out = capsys.readouterr().out
    study = _study(f"sqlite:///{workdir}/mlruns/optuna.db")
    states = [t.state.name for t in study.trials]
    assert len(states) == 6 and states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 2
    assert "FAIL" not in states

    client, parents, children = _runs(store)
    assert len(parents) == 1 and len(children) == 6
    parent = parents[0]
    by_number = {int(r.data.tags["trial_number"]): r for r in children}
    for t in study.trials:
        run = by_number[t.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[t.state.name]
        assert run.data.tags["trial_state"] == t.state.name
        assert run.data.tags["lora_exp.trial_overrides"] == " ".join(t.user_attrs["overrides"])
        if t.state.name == "COMPLETE":
            assert run.data.metrics["final_eval_loss"] == pytest.approx(t.value)

    best = study.best_trial
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial_number"] == str(best.number)
    assert parent.data.tags["best_run_id"] == best.user_attrs["mlflow_run_id"]
    assert {"sweep.yaml", "trials.json", "best_adapter", "plots"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials.json")).read_text())
    assert sorted(row[0] for row in table["data"]) == list(range(6)), "one row per trial, refreshed not appended"
    assert table["columns"][:3] == ["number", "state", "value"]
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/loss_curves.png", "plots/parallel_coordinate.png"} <= plots
    version = client.get_model_version_by_alias("tiny", "best")
    assert version.run_id == best.user_attrs["mlflow_run_id"]

    # The summary names the counts, the best run and the command that reproduces it.
    assert f"6 trials -- {states.count('COMPLETE')} completed, {states.count('PRUNED')} pruned, 0 failed" in out
    assert f"run {best.user_attrs['mlflow_run_id']}" in out
    reproduce = next(line for line in out.splitlines() if line.startswith("reproduce: "))
    assert reproduce.endswith(" ".join(best.user_attrs["overrides"]))

    # The best adapter loads through the registry alias in one call.
    import mlflow

    mlflow.set_tracking_uri(store)
    path = mlflow.artifacts.download_artifacts("models:/tiny@best")
    assert (Path(path) / "adapter_config.json").is_file()

    # Running the same command again adds nothing and keeps one parent.
    assert cmd_sweep(["sweep=tiny", "n_trials=6"]) == 0
    assert len(_study(f"sqlite:///{workdir}/mlruns/optuna.db").trials) == 6
    _, parents, children = _runs(store)
    assert len(parents) == 1 and len(children) == 6


def test_sweep_stopped_midway_resumes_to_exactly_n_trials(workdir, store):
    exe = Path(sys.executable).parent / "lora-exp"
    args = [str(exe), "sweep", "sweep=tiny", "n_trials=8", "trainer.max_steps=60"]
    proc = subprocess.Popen(args, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # Ctrl-C once the second trial is done
        seen.append(line)
        if line.startswith("[2/8]"):
            proc.send_signal(signal.SIGINT)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, "".join(seen) + out
    storage = f"sqlite:///{workdir}/mlruns/optuna.db"
    done = [t for t in _study(storage).trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert 2 <= len(done) < 8, "stopped mid-way, after the trial in flight"
    assert all(t.state.name in ("COMPLETE", "PRUNED", "WAITING") for t in _study(storage).trials)

    proc = run_cli("sweep", "sweep=tiny", "n_trials=8", "trainer.max_steps=60", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _study(storage).trials
    assert len(trials) == 8 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    _, parents, children = _runs(store)
    assert len(parents) == 1 and len(children) == 8


def _two_workers(workdir, store, storage_args):
    proc = run_cli("sweep", "sweep=tiny", "n_trials=8", "workers=2", *storage_args, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _assert_exact(storage, store, n, study="tiny"):
    trials = _study(storage, study).trials
    assert len(trials) == n and sorted(t.number for t in trials) == list(range(n))
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    _, parents, children = _runs(store)
    assert len(parents) == 1 and len(children) == n
    assert len({r.data.tags["trial_number"] for r in children}) == n
    for r in children:
        if r.data.tags["trial_state"] == "COMPLETE":
            assert "final_eval_loss" in r.data.metrics


def test_two_workers_on_one_sqlite_study(workdir, store):
    _two_workers(workdir, store, [])
    _assert_exact(f"sqlite:///{workdir}/mlruns/optuna.db", store, 8)


@pytest.mark.postgres
def test_two_workers_on_one_postgresql_study(workdir, store, postgres_url):
    _two_workers(workdir, store, [f"storage={postgres_url}"])
    _assert_exact(postgres_url, store, 8)


def test_a_trial_line_goes_out_in_one_write(monkeypatch):
    """Tracking processes print trial lines at once; with PYTHONUNBUFFERED, `print` writes the
    text and its newline separately and two processes' lines interleave (seen once in CI)."""
    import sys

    from lora_exp.search import write_line

    writes: list[str] = []

    class Out:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Out())
    write_line("[1/7] trial   0 COMPLETE eval_loss=1.0000")
    assert writes == ["[1/7] trial   0 COMPLETE eval_loss=1.0000\n"]
