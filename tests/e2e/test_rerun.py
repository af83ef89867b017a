"""Rerun, best, export and generate from MLflow run ids, as a user runs them (subprocesses)."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from lora_exp.sweep.command import cmd_sweep

from helpers import REPO, run_cli

os.environ["LORA_EXP_SWEEPS_DIR"] = str(REPO / "sweeps")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One tiny sweep shared by the tests here (they only read it or add new runs)."""
    work = tmp_path_factory.mktemp("swept")
    old = os.getcwd()
    os.chdir(work)
    try:
        assert cmd_sweep(["sweep=tiny", "n_trials=4"]) == 0
    finally:
        os.chdir(old)
    import optuna
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{work}/mlruns/mlflow.db"
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{work}/mlruns/optuna.db")
    return work, store, study, MlflowClient(store)


def _history(client, run_id, key="train_loss"):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_rerun_of_a_sweep_trial_reproduces_its_loss_curve_exactly(swept):
    work, store, study, client = swept
    trial = study.best_trial
    run_id = trial.user_attrs["mlflow_run_id"]
    proc = run_cli("rerun", run_id, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "largest difference 0 " in proc.stdout, proc.stdout
    new_id = re.search(r"rerun run ([0-9a-f]{32})", proc.stdout).group(1)
    new = client.get_run(new_id)
    assert new.data.tags["rerun_of"] == run_id
    assert new.info.experiment_id == client.get_run(run_id).info.experiment_id
    assert _history(client, new_id) == _history(client, run_id), "bit-identical on CPU"
    assert "final_eval_loss" in proc.stdout and "original" in proc.stdout


def test_rerun_with_overrides_and_from_the_parent_and_registry(swept):
    work, store, study, client = swept
    parent = study.user_attrs["mlflow_parent_run_id"]
    proc = run_cli("rerun", parent, "trainer.max_steps=12", "lora.r=2", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    new_id = re.search(r"rerun run ([0-9a-f]{32})", proc.stdout).group(1)
    run = client.get_run(new_id)
    assert run.data.tags["rerun_of"] == study.best_trial.user_attrs["mlflow_run_id"], "parent -> its best trial"
    assert run.data.params["lora.r"] == "2" and len(_history(client, new_id)) == 12
    proc = run_cli("rerun", "models:/tiny@best", "trainer.max_steps=3", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]


BAD = [
    (["rerun", "0" * 32], "no run 00000000000000000000000000000000 in the tracking store"),
    (["rerun", "not-a-run"], "is not a run id"),
    (["rerun", "models:/nope@best"], "no registered model models:/nope@best"),
    (["export", "0" * 32, "--out", "x"], "no run"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[a[1][:12] for a, _ in BAD])
def test_bad_run_references(swept, args, message):
    work, store, study, client = swept
    before = len(client.search_runs([client.get_experiment_by_name("lora-exp").experiment_id]))
    proc = run_cli(*args, cwd=work)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert len(client.search_runs([client.get_experiment_by_name("lora-exp").experiment_id])) == before


def test_run_id_from_another_store_and_override_that_does_not_apply(swept, tmp_path):
    work, store, study, client = swept
    run_id = study.best_trial.user_attrs["mlflow_run_id"]
    proc = run_cli("rerun", run_id, cwd=tmp_path)  # no store there: named, none created
    assert proc.returncode == 2 and "no MLflow store at sqlite:///mlruns/mlflow.db" in proc.stderr
    assert not (tmp_path / "mlruns").exists()
    other = tmp_path / "other"
    other.mkdir()
    assert run_cli("train", "model=tiny_gpt2", "data=seed", "trainer.max_steps=1", "trainer.max_new_tokens=2",
                   "trainer.generation_metrics=[exact_match]", cwd=other).returncode == 0
    proc = run_cli("rerun", run_id, cwd=other)  # a store of its own, without that run
    assert proc.returncode == 2 and "no run" in proc.stderr and "another store?" in proc.stderr
    proc = run_cli("rerun", run_id, "trainer.nope=1", cwd=work)
    assert proc.returncode == 2 and "does not apply to the recorded config: no key trainer.nope" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_run_without_config_or_adapter(swept):
    work, store, study, client = swept
    exp = client.get_experiment_by_name("lora-exp").experiment_id
    bare = client.create_run(exp, run_name="not-ours").info.run_id
    client.set_terminated(bare)
    proc = run_cli("rerun", bare, cwd=work)
    assert proc.returncode == 2 and "has no recorded config" in proc.stderr
    pruned = next(t for t in study.trials if t.state.name == "PRUNED")
    proc = run_cli("export", pruned.user_attrs["mlflow_run_id"], "--out", str(work / "pruned"), cwd=work)
    assert proc.returncode == 2 and "has no adapter artifact" in proc.stderr
    assert not (work / "pruned").exists()


def test_export_adapter_and_merged_model(swept, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_exp.compose import compose
    from lora_exp.core.models import load_base

    work, store, study, client = swept
    run_id = study.best_trial.user_attrs["mlflow_run_id"]
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    assert run_cli("export", run_id, "--out", str(adapter_dir), cwd=work).returncode == 0
    assert run_cli("export", run_id, "--out", str(merged_dir), "--merge", cwd=work).returncode == 0
    meta = json.loads((adapter_dir / "lora_exp_export.json").read_text())
    assert meta["run_id"] == run_id and meta["config"]["lora"]["r"] == study.best_trial.params["lora.r"]
    assert (adapter_dir / "tokenizer.json").is_file() and (merged_dir / "tokenizer.json").is_file()

    cfg = compose(["model=tiny_gpt2"])
    base = load_base(cfg.model, torch.device("cpu"))
    peft_model = PeftModel.from_pretrained(base.model, str(adapter_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    ids = torch.tensor([list(range(5, 45))])
    with torch.no_grad():
        a, b = peft_model(ids).logits, merged(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    with torch.no_grad():
        plain = load_base(cfg.model, torch.device("cpu")).model(ids).logits
    assert not torch.allclose(a, plain, atol=1e-3), "the adapter changes the output"

    proc = run_cli("export", run_id, "--out", str(adapter_dir), cwd=work)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert run_cli("export", run_id, "--out", str(adapter_dir), "--force", cwd=work).returncode == 0


def test_best_and_generate(swept):
    work, store, study, client = swept
    proc = run_cli("best", cwd=work)
    assert proc.returncode == 0, proc.stderr
    run_id = study.best_trial.user_attrs["mlflow_run_id"]
    assert f"run id:     {run_id}" in proc.stdout
    assert "reproduce:  lora-exp train model=tiny_gpt2" in proc.stdout
    assert " ".join(study.best_trial.user_attrs["overrides"]) in proc.stdout
    # the parameters as the trial trained with them: lora_alpha's value, not the ratio of r sampled
    params = next(line for line in proc.stdout.splitlines() if line.startswith("params: "))
    shown = json.loads(params.split(":", 1)[1].split("  (")[0])
    trained = dict(o.split("=", 1) for o in study.best_trial.user_attrs["overrides"])
    assert shown["lora.lora_alpha"] == int(trained["lora.lora_alpha"]) == shown["lora.r"] * \
        study.best_trial.params["lora.lora_alpha"]
    assert shown["lora.r"] == int(trained["lora.r"]) and shown["trainer.lr"] == float(trained["trainer.lr"])
    assert f"(sampled as a ratio: lora.lora_alpha={study.best_trial.params['lora.lora_alpha']})" in params
    assert run_cli("best", "study=nope", cwd=work).returncode == 2
    proc = run_cli("generate", run_id, "Q: What is self-attention?\\nA:", "--max-new-tokens", "5", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Q: What is self-attention?\nA:")
