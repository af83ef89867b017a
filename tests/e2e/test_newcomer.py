"""A newcomer's path: help that says what exists, progress in plain output, the stores the
environment names, a best model MLflow loads and serves, an installed (not editable) package that
runs from any folder, and a `make clean` that keeps tracking data."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml

from helpers import REPO, TINY, run_cli

os.environ["LORA_EXP_SWEEPS_DIR"] = str(REPO / "sweeps")


def test_help_lists_commands_groups_sweep_files_and_exit_codes():
    top = run_cli("--help", cwd=REPO)
    assert top.returncode == 0
    for word in ("train", "sweep", "config", "ui", "best", "rerun", "export", "generate", "exit codes", "130"):
        assert word in top.stdout, word
    assert run_cli("--version", cwd=REPO).stdout.strip() == "lora-exp 0.1.0"
    train = run_cli("train", "--help", cwd=REPO).stdout
    assert "config groups" in train and "tiny_gpt2" in train and "qa_demo" in train and "pack" in train
    sweep = run_cli("sweep", "--help", cwd=REPO).stdout
    assert re.search(r"shipped: .*default.*tiny", sweep) and "--dry-run" in sweep and "OPTUNA_STORAGE" in sweep


def test_config_prints_the_composed_yaml_and_hydras_hints_survive(workdir):
    out = run_cli("config", "model=tiny_llama", "lora.r=4", "-q", cwd=workdir)  # -q after the subcommand
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["name"] == "tiny_llama" and cfg["lora"]["r"] == 4 and cfg["pack"]["slots"] == 1
    typo = run_cli("config", "lora.rr=4", cwd=workdir)
    assert typo.returncode == 2
    assert "lora.rr: no such config key (did you mean lora.r?)" in typo.stderr and "+lora.rr=4" in typo.stderr
    several = run_cli("train", "lora.r=4,8", cwd=workdir)
    assert several.returncode == 2 and "lora-exp sweep" in several.stderr and "lora.r=[4,8]" in several.stderr
    assert not (workdir / "mlruns").exists()


def test_dry_run_prints_the_trials_a_sweep_would_run_and_writes_nothing(workdir):
    out = run_cli("sweep", "--dry-run", "sweep=tiny", "n_trials=4", cwd=workdir)
    assert out.returncode == 0, out.stderr
    trials = [ln for ln in out.stdout.splitlines() if ln.startswith("trial ")]
    assert len(trials) == 4 and all("lora.r=" in t and "trainer.lr=" in t for t in trials)
    assert not (workdir / "mlruns").exists()
    # the sweep itself runs exactly those trials
    proc = run_cli("sweep", "sweep=tiny", "n_trials=2", "trainer.max_steps=4", "trainer.eval_steps=2", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    ran = [re.search(r"(lora\.r=\S+ .*trainer\.lr=\S+)", ln).group(1) for ln in proc.stdout.splitlines()
           if re.match(r"\[\d+/2\] trial", ln)]
    assert sorted(ran) == sorted(t.split(None, 2)[2] for t in trials[:2])


def test_progress_lines_when_the_output_is_not_a_terminal(workdir):
    """Piped output (a file, CI): a line saying what happens first, within seconds even where a
    new MLflow store is made, then steps with loss and elapsed time, and per sweep `[k/n]` lines
    with elapsed time, ETA and trials/hour."""
    start = time.time()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "lora-exp"), "train", *TINY],
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = proc.stdout.readline()
    assert time.time() - start < 5, first
    assert re.search(r"config and data checked \(5 training rows, 5 validation\); opening the MLflow store "
                     r"sqlite:///\S+mlflow\.db$", first), first
    lines = []
    for line in proc.stdout:  # until the process closes its output: when it ends
        lines.append(line)
        last = time.time()
    proc.wait(timeout=60)
    # it ends once its last line is out, not after the interpreter has freed torch's objects (2-3 s)
    assert time.time() - last < 1.0, time.time() - last
    rest = "".join(lines)
    assert proc.returncode == 0, rest
    assert "loading model tiny_gpt2 (random) on cpu" in rest
    assert re.search(r"step 1/30  train_loss \d+\.\d+  \(\d+s\)", rest)
    assert re.search(r"step 30/30  train_loss \d+\.\d+", rest) and "step 30/30  eval_loss" in rest
    sweep = run_cli("sweep", "sweep=tiny", "n_trials=2", "trainer.max_steps=4", "trainer.eval_steps=2", cwd=workdir)
    assert sweep.returncode == 0, sweep.stderr
    lines = [ln for ln in sweep.stdout.splitlines() if ln.startswith("[")]
    assert re.search(r"^\[1/2\] trial .*\[elapsed \d+s, ETA \d+s, [\d.]+ trials/h\]$", lines[0]), lines
    assert re.search(r"^\[2/2\] trial .*\[elapsed \d+s, ETA 0s", lines[1]), lines
    # a trial's numbers to 4 significant digits on its line; the trial itself keeps every digit
    from optuna import load_study

    study = load_study(study_name="tiny", storage=f"sqlite:///{workdir}/mlruns/optuna.db")
    full = dict(o.split("=", 1) for o in study.trials[0].user_attrs["overrides"])["trainer.lr"]
    shown = re.search(r"trainer\.lr=(\S+)", next(ln for ln in lines if " trial   0 " in ln)).group(1)
    assert shown == f"{float(full):.4g}" and len(full) > len(shown), (shown, full)
    assert "watch it: lora-exp ui, then http://127.0.0.1:5000/#/experiments/1/runs/" in sweep.stdout
    assert "trial 0: step 1/4" in sweep.stderr and "loading model tiny_gpt2" in sweep.stderr


def test_the_environments_stores_are_the_defaults(tmp_path):
    """$MLFLOW_TRACKING_URI and $OPTUNA_STORAGE: a sweep started anywhere writes there, and
    `best` finds it there; nothing lands in the working folder."""
    stores, here = tmp_path / "stores", tmp_path / "elsewhere"
    here.mkdir()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{stores}/mlflow.db", "OPTUNA_STORAGE": f"sqlite:///{stores}/optuna.db"}
    proc = run_cli("sweep", "sweep=tiny", "n_trials=1", "trainer.max_steps=3", cwd=here, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (stores / "mlflow.db").is_file() and (stores / "optuna.db").is_file()
    assert not list(here.iterdir()), "nothing written in the working folder"
    best = run_cli("best", cwd=here, env=env)
    assert best.returncode == 0 and "study tiny: best trial 0" in best.stdout
    lost = run_cli("best", cwd=here)  # without the environment: the default store, which is not there
    assert lost.returncode == 2 and "no study storage" in lost.stderr


def test_the_best_adapter_loads_with_mlflow_pyfunc_and_generates(workdir, store, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    proc = run_cli("sweep", "sweep=tiny", "n_trials=2", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(store)
    version = client.get_model_version_by_alias("tiny", "best")
    parent = next(r for r in client.search_runs(["1"]) if r.data.tags.get("lora_exp.kind") == "sweep")
    models = client.search_logged_models(experiment_ids=["1"])
    model = next(m for m in models if m.tags["trial_run_id"] == version.run_id)
    assert version.source == model.artifact_location  # the registered version is that model
    assert model.source_run_id == parent.info.run_id and str(model.status) == "READY"
    assert {m.key for m in model.metrics} >= {"final_eval_loss", "exact_match"}  # linked to its trial's metrics
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # what mlflow.set_tracking_uri does, undone after the test
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loaded = mlflow.pyfunc.load_model("models:/tiny@best")
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], [str(w.message) for w in seen]
    answers = loaded.predict(["Q: What is LoRA?\nA:", "Q: Why train?\nA:"], params={"max_new_tokens": 4})
    assert isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # the same answers as the run's own adapter gives through `lora-exp generate`
    gen = run_cli("generate", "models:/tiny@best", "Q: What is LoRA?\\nA:", "--max-new-tokens", "4", cwd=workdir)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip().endswith(answers[0].strip()) or not answers[0].strip()
    # served the way `mlflow models serve` serves it (the same scoring path), with the local environment
    request = {"inputs": ["Q: What is LoRA?\nA:"], "params": {"max_new_tokens": 4}}
    (workdir / "input.json").write_text(json.dumps(request))
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    served = subprocess.run([mlflow_cli, "models", "predict", "-m", "models:/tiny@best", "-i", "input.json",
                             "-t", "json", "--env-manager", "local"], cwd=workdir,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MLFLOW_TRACKING_URI": store})
    assert served.returncode == 0, served.stderr[-2000:]
    assert answers[0] in served.stdout


def test_a_non_editable_install_runs_from_any_folder(tmp_path):
    """`pip install .` (a wheel, not the checkout) into a fresh venv: the configs and sweep files
    ship inside the package; a user's own ./conf adds to them; no library chatter. (The venv borrows this
    environment's dependencies through a .pth file: what is under test is this package.)"""
    import site
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    ask = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", ask], capture_output=True, text=True,
                                  check=True).stdout.strip())
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()] + [sysconfig.get_paths()["purelib"]]
    (purelib / "deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(purelib), str(REPO)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    work = tmp_path / "work"
    (work / "conf" / "model").mkdir(parents=True)
    (work / "conf" / "model" / "mine.yaml").write_text((REPO / "conf" / "model" / "tiny_llama.yaml").read_text()
                                                       .replace("name: tiny_llama", "name: mine"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LORA_EXP_") and k not in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")}
    python = str(venv / "bin" / "python")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, "-m", "lora_exp.cli", *args], cwd=work, capture_output=True, text=True,
                              env=env, timeout=600)

    where = subprocess.run([python, "-c", "import lora_exp; print(lora_exp.__file__)"], cwd=work,
                           capture_output=True, text=True, env=env)
    assert str(purelib) in where.stdout, where.stdout + where.stderr  # the installed copy, not the checkout
    train = cli("train", "model=tiny_gpt2", "data=seed", "trainer.max_steps=3", "trainer.batch_size=5",
                "trainer.generation_metrics=[exact_match]", "trainer.max_new_tokens=4")
    assert train.returncode == 0, train.stderr[-2000:]
    assert (work / "mlruns" / "mlflow.db").is_file() and "done: 3 steps" in train.stdout
    # a fresh process making a fresh store: none of MLflow's and alembic's chatter (the tests'
    # forked CLI calls have MLflow imported already, so its loggers are checked here)
    assert not re.search(r"\bINFO\b", train.stderr), train.stderr[-2000:]
    # a first sweep on the machine: matplotlib builds its font cache for the parent run's plots,
    # and says so at INFO ("generated new fontManager"), which is not the user's business
    env["MPLCONFIGDIR"] = str(tmp_path / "matplotlib")
    sweep = cli("sweep", "sweep=tiny", "n_trials=1", "trainer.max_steps=2", "trainer.eval_steps=1")
    assert sweep.returncode == 0 and "[1/1] trial   0 COMPLETE" in sweep.stdout, sweep.stderr[-2000:]
    assert (tmp_path / "matplotlib").is_dir()  # its cache was made in this sweep
    assert "fontManager" not in sweep.stdout + sweep.stderr, sweep.stderr[-2000:]
    mine = cli("config", "model=mine")
    assert mine.returncode == 0 and yaml.safe_load(mine.stdout)["model"]["name"] == "mine"
    assert "tiny_gpt2" in cli("train", "--help").stdout  # the shipped groups are still there


@pytest.mark.parametrize("answer,kept", [("n", True), ("y", False)])
def test_make_clean_keeps_tracking_data_and_clean_runs_asks(tmp_path, answer, kept):
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "mlruns" / "mlflow.db").write_text("x")
    make = ["make", "-f", str(REPO / "Makefile")]
    subprocess.run([*make, "clean"], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "mlruns" / "mlflow.db").exists(), "make clean never touches tracking data"
    out = subprocess.run([*make, "clean-runs"], cwd=tmp_path, input=f"{answer}\n", capture_output=True, text=True)
    assert "delete ./mlruns" in out.stdout
    assert (tmp_path / "mlruns").exists() == kept
