"""Sweeps end to end on a tiny model: real Optuna storage, real MLflow store, real processes."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from lora_exp.sweep.command import cmd_sweep

from helpers import REPO, load_study, parent_files, popen_cli, run_cli, sweep_runs

os.environ["LORA_EXP_SWEEPS_DIR"] = str(REPO / "sweeps")


def test_tiny_sweep_prunes_and_mlflow_matches_optuna(workdir, store, capsys, monkeypatch):
    assert cmd_sweep(["sweep=tiny", "n_trials=6"]) == 0
    out = capsys.readouterr().out
    study = load_study(f"sqlite:///{workdir}/mlruns/optuna.db")
    states = [t.state.name for t in study.trials]
    assert len(states) == 6 and states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 2
    assert "FAIL" not in states

    client, parents, children = sweep_runs(store)
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
        # what the trial cost: its training, evals and generations, alone on this machine
        assert run.data.metrics["compute_s"] == pytest.approx(t.user_attrs["compute_s"], abs=1e-3)
        assert run.data.metrics["compute_s"] >= run.data.metrics["train_runtime_s"] > 0
        assert run.data.metrics["train_tokens"] > 0

    best = study.best_trial
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial_number"] == str(best.number)
    assert parent.data.tags["best_run_id"] == best.user_attrs["mlflow_run_id"]
    # parameters as the trials trained with them: lora_alpha's value, not the ratio of r sampled
    best_params = json.loads(parent.data.tags["best_params"])
    assert best_params["lora.lora_alpha"] == best_params["lora.r"] * best.params["lora.lora_alpha"]
    assert f"lora.lora_alpha={best_params['lora.lora_alpha']}" in best.user_attrs["overrides"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.yaml", "trials.json", "best_adapter", "plots"} <= artifacts
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials.json")).read_text())
    assert sorted(row[0] for row in table["data"]) == list(range(6)), "one row per trial, refreshed not appended"
    assert table["columns"][:3] == ["number", "state", "value"]
    params, overrides = table["columns"].index("params"), table["columns"].index("overrides")
    for row in table["data"]:
        trained = json.loads(row[params])
        assert f"lora.lora_alpha={trained['lora.lora_alpha']}" in row[overrides].split()
        assert f"lora.r={trained['lora.r']}" in row[overrides].split()
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/loss_curves.png", "plots/parallel_coordinate.png",
            "plots/best_per_compute_hour.png"} <= plots
    total = sum(t.user_attrs["compute_s"] for t in study.trials)
    assert client.get_run(parent.info.run_id).data.metrics["compute_s_total"] == pytest.approx(total, rel=1e-6)
    from lora_exp.tracking.sweep_plots import cost_curve

    curve = cost_curve(study.trials)
    assert len(curve) == 6 and curve[-1][0] == pytest.approx(total / 3600) and curve[-1][1] == best_value(study)
    assert all(b1 is None or b0 is None or b1 <= b0 for (_, b0), (_, b1) in zip(curve, curve[1:]))
    version = client.get_model_version_by_alias("tiny", "best")
    assert version.run_id == best.user_attrs["mlflow_run_id"]

    # The summary names the counts, the best run and the command that reproduces it.
    assert f"6 trials -- {states.count('COMPLETE')} completed, {states.count('PRUNED')} pruned, 0 failed" in out
    assert f"run {best.user_attrs['mlflow_run_id']}" in out
    reproduce = next(line for line in out.splitlines() if line.startswith("reproduce: "))
    assert reproduce.endswith(" ".join(best.user_attrs["overrides"]))

    # The best adapter comes through the registry alias in one call: an MLflow model holding the
    # peft folder.
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    path = mlflow.artifacts.download_artifacts("models:/tiny@best")
    assert (Path(path) / "MLmodel").is_file()
    assert (Path(path) / "artifacts" / "adapter" / "adapter_config.json").is_file()

    # Running the same command again adds nothing and keeps one parent, whose tables and plots
    # (drawn from the same trials) are not drawn again.
    drawn = parent_files(client, parent.info.run_id)
    assert {"trials.json", "plots/loss_curves.png"} <= set(drawn)
    assert cmd_sweep(["sweep=tiny", "n_trials=6"]) == 0
    assert len(load_study(f"sqlite:///{workdir}/mlruns/optuna.db").trials) == 6
    _, parents, children = sweep_runs(store)
    assert len(parents) == 1 and len(children) == 6
    assert parent_files(client, parent.info.run_id) == drawn
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    # One more trial: drawn again, with it.
    assert cmd_sweep(["sweep=tiny", "n_trials=7", "trainer.max_steps=10"]) == 0
    again = parent_files(client, parent.info.run_id)
    assert all(again[f] > drawn[f] for f in ("trials.json", "plots/loss_curves.png")), (drawn, again)
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials.json")).read_text())
    assert sorted(row[0] for row in table["data"]) == list(range(7))


def best_value(study):
    return min(t.value for t in study.trials if t.state.name == "COMPLETE")


def test_sweep_stopped_midway_resumes_to_exactly_n_trials(workdir, store):
    proc = popen_cli("sweep", "sweep=tiny", "n_trials=8", "trainer.max_steps=60", cwd=workdir)
    seen = []
    for line in proc.stdout:  # Ctrl-C once the second trial is done
        seen.append(line)
        if line.startswith("[2/8]"):
            proc.send_signal(signal.SIGINT)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, "".join(seen) + out
    storage = f"sqlite:///{workdir}/mlruns/optuna.db"
    done = [t for t in load_study(storage).trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert 2 <= len(done) < 8, "stopped mid-way, after the trial in flight"
    assert all(t.state.name in ("COMPLETE", "PRUNED", "WAITING") for t in load_study(storage).trials)

    proc = run_cli("sweep", "sweep=tiny", "n_trials=8", "trainer.max_steps=60", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = load_study(storage).trials
    assert len(trials) == 8 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    _, parents, children = sweep_runs(store)
    assert len(parents) == 1 and len(children) == 8


def _two_workers(workdir, store, storage_args):
    proc = run_cli("sweep", "sweep=tiny", "n_trials=8", "workers=2", *storage_args, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _assert_exact(storage, store, n, study="tiny"):
    trials = load_study(storage, study).trials
    assert len(trials) == n and sorted(t.number for t in trials) == list(range(n))
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    _, parents, children = sweep_runs(store)
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


def _refresh_at_once(barrier, record, storage):
    import optuna

    from lora_exp.tracking import parent

    study = optuna.load_study(study_name=record.study_name, storage=storage)
    barrier.wait()
    parent.refresh(record, study, 0, final=True)


def test_two_processes_that_publish_the_best_at_once_register_it_once(workdir, store):
    """Two workers (or machines) that finish together both refresh the parent run: the best
    trial's adapter becomes one model version, not one per process."""
    import multiprocessing

    import mlflow

    from lora_exp.config import TrackingConfig
    from lora_exp.tracking.parent import SweepRecord

    proc = run_cli("sweep", "sweep=tiny", "n_trials=1", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(store)
    client.delete_registered_model("tiny")  # as before the first publication
    storage = f"sqlite:///{workdir}/mlruns/optuna.db"
    study = load_study(storage)
    record = SweepRecord("tiny", TrackingConfig(uri=store), (("eval_loss", "minimize"),), 1, (), 2,
                         run_id=study.user_attrs["mlflow_parent_run_id"], storage=storage)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_refresh_at_once, args=(barrier, record, storage)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    versions = client.search_model_versions("name='tiny'")
    assert len(versions) == 1, [(v.version, v.run_id) for v in versions]
    best = client.get_model_version_by_alias("tiny", "best")
    assert best.run_id == study.best_trial.user_attrs["mlflow_run_id"]


def test_a_trial_line_goes_out_in_one_write(monkeypatch):
    """Tracking processes print trial lines at once; with PYTHONUNBUFFERED, `print` writes the
    text and its newline separately and two processes' lines interleave (seen once in CI)."""

    from lora_exp.sweep.report import write_line

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
