"""Multi-objective sweeps (Pareto front, best, promote), the dashboard, and tracebacks of failed trials."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from helpers import REPO, run_cli

os.environ["LORA_EXP_SWEEPS_DIR"] = str(REPO / "sweeps")


def _two_objective_sweep(workdir: Path) -> str:
    path = workdir / "pareto.yaml"
    path.write_text("""# lora-exp sweep sweep=pareto.yaml
study: pareto
objective:
  - {metric: eval_loss, direction: minimize}
  - {metric: trainable_params, direction: minimize}
n_trials: 5
sampler: {name: nsga2, seed: 1, population_size: 4}
pruner: median
base: [model=tiny_gpt2, data=seed, trainer.max_steps=15, trainer.batch_size=5, trainer.eval_steps=5,
       trainer.max_new_tokens=4, "trainer.generation_metrics=[exact_match,rouge_l]"]
space:
  lora.r: {type: categorical, choices: [1, 2, 4, 8]}
  lora.preset: {type: categorical, choices: [attn, all]}
  trainer.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
""")
    return f"sweep={path}"


def test_two_objective_sweep_front_best_and_promote(workdir, store):
    import optuna
    from mlflow.tracking import MlflowClient

    proc = run_cli("sweep", _two_objective_sweep(workdir), cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pruning is off: Optuna cannot prune multi-objective studies" in proc.stdout
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{workdir}/mlruns/optuna.db")
    assert len(study.trials) == 5 and all(t.state.name == "COMPLETE" for t in study.trials)
    front = study.best_trials
    assert front and "Pareto front" in proc.stdout

    client = MlflowClient(store)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "pareto_front.json" in artifacts
    assert "plots/pareto_front.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "pareto_front.json")).read_text())
    assert sorted(row[table["columns"].index("number")] for row in table["data"]) == sorted(t.number for t in front)

    listed = run_cli("best", cwd=workdir)
    assert listed.returncode == 0 and f"Pareto front of {len(front)} trials" in listed.stdout
    for t in front:
        assert t.user_attrs["mlflow_run_id"] in listed.stdout
    pick = front[-1].user_attrs["mlflow_run_id"]
    promoted = run_cli("best", "--promote", pick, cwd=workdir)
    assert promoted.returncode == 0, promoted.stderr
    assert client.get_model_version_by_alias("pareto", "best").run_id == pick
    bad = run_cli("best", "--promote", "0" * 32, cwd=workdir)
    assert bad.returncode == 2 and "is not a trial of study pareto" in bad.stderr


def test_failed_trial_keeps_its_traceback(workdir, store):
    from mlflow.tracking import MlflowClient

    proc = run_cli("train", "model=tiny_gpt2", "data=seed", "trainer.lr=1e30", "trainer.max_grad_norm=null",
                   "trainer.max_steps=10", cwd=workdir)
    assert proc.returncode == 1 and "train loss became" in proc.stderr
    client = MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("lora-exp").experiment_id])[0]
    assert run.info.status == "FAILED"
    text = Path(client.download_artifacts(run.info.run_id, "traceback.txt")).read_text()
    assert "NonFiniteLoss" in text and "Traceback" in text


def test_dashboard_serves_the_study_with_trial_notes(workdir, store):
    from lora_exp.sweep.command import cmd_sweep

    assert cmd_sweep(["sweep=tiny", "n_trials=2"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "optuna-dashboard"
    proc = subprocess.Popen([str(exe), f"sqlite:///{workdir}/mlruns/optuna.db", "--host", "127.0.0.1", "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = None
        for _ in range(60):
            try:
                body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).read())
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, "dashboard did not answer"
        studies = body["study_summaries"]
        study = next(s for s in studies if s["study_name"] == "tiny")
        detail = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/studies/{study['study_id']}?after=0", timeout=10).read())
        notes = json.dumps(detail)
        import optuna

        run_id = optuna.load_study(study_name="tiny", storage=f"sqlite:///{workdir}/mlruns/optuna.db") \
            .trials[0].user_attrs["mlflow_run_id"]
        assert run_id in notes and "adapter" in notes, "each trial's note names its run and its answers"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
