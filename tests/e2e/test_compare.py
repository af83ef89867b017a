"""Answers side by side across trials: the sweep's parent holds `answers.json` (every eval prompt,
the base model and the best trials, with scores), refreshed as the sweep goes; `lora-exp compare`
prints and logs the same for any runs."""
from __future__ import annotations

import json
import os

from lora_exp.sweep.command import cmd_sweep
from lora_exp.tracking.answers import answers_side_by_side
from lora_exp.tracking.runs import read_table

from helpers import REPO, load_study, run_cli, sweep_runs

os.environ["LORA_EXP_SWEEPS_DIR"] = str(REPO / "sweeps")


def test_answers_side_by_side_matches_rows_by_prompt():
    a = {"prompt": ["p1", "p2"], "expected": ["e1", "e2"], "base_output": ["b1", "b2"], "adapter_output": ["a1", "a2"],
         "base_token_f1": [0.1, 0.2], "token_f1": [0.5, 0.6]}
    b = {"prompt": ["p2", "p3"], "expected": ["e2", "e3"], "base_output": ["b2", "b3"], "adapter_output": ["x2", "x3"],
         "base_token_f1": [0.2, 0.3], "token_f1": [0.9, 0.8]}
    table = answers_side_by_side([("A", a), ("B", b)])
    assert table["prompt"] == ["p1", "p2", "p3"]
    assert table["base"] == ["b1", "b2", "b3"] and table["base token_f1"] == [0.1, 0.2, 0.3]
    assert table["A"] == ["a1", "a2", None] and table["A token_f1"] == [0.5, 0.6, None]
    assert table["B"] == [None, "x2", "x3"] and table["B token_f1"] == [None, 0.9, 0.8]
    assert list(table) == ["prompt", "expected", "base", "A", "B", "base token_f1", "A token_f1", "B token_f1"]


def test_parent_answers_table_and_compare_command(workdir, store):
    from mlflow.tracking import MlflowClient

    assert cmd_sweep(["sweep=tiny", "n_trials=4", "trainer.max_steps=10", "trainer.eval_steps=5"]) == 0
    study = load_study(f"sqlite:///{workdir}/mlruns/optuna.db")
    client, parents, children = sweep_runs(store)
    parent = parents[0]
    done = sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: (t.value, t.number))
    table = read_table(client, parent.info.run_id, "answers.json")
    labels = [f"trial {t.number} (eval_loss {t.value:.4g})" for t in done[:5]]
    assert [c for c in table if c.startswith("trial ") and not c.endswith(("exact_match", "token_f1", "rouge_l"))] \
        == labels, "the best trials, best first"
    best_gens = read_table(client, done[0].user_attrs["mlflow_run_id"], "generations.json")
    assert table["prompt"] == best_gens["prompt"] and table["base"] == best_gens["base_output"]
    assert table[labels[0]] == best_gens["adapter_output"]
    assert table[f"{labels[0]} token_f1"] == best_gens["token_f1"]
    tag = json.loads(client.get_run(parent.info.run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": "answers.json", "type": "table"} in tag, "the UI shows it as a table"

    # compare: two trials' runs, printed side by side and logged as a run of its own
    a, b = (t.user_attrs["mlflow_run_id"] for t in done[:2])
    proc = run_cli("compare", a, b, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    first = best_gens["prompt"][0].replace("\n", " / ")
    assert f"[1] {first[:40]}" in out
    assert f"trial {done[0].number} ({a[:8]}, eval_loss" in out and f"trial {done[1].number} ({b[:8]}" in out
    logged = out.strip().splitlines()[-1]
    assert logged.startswith("logged: run ")
    run_id = logged.split()[2]
    run = MlflowClient(store).get_run(run_id)
    assert run.data.tags["lora_exp.kind"] == "comparison" and run.data.tags["lora_exp.compared"] == f"{a} {b}"
    compared = read_table(client, run_id, "answers.json")
    assert compared["prompt"] == table["prompt"] and compared[f"trial {done[0].number} ({a[:8]}, eval_loss "
                                                                f"{done[0].value:.4g})"] == table[labels[0]]
    # the parent run (= its best trial) works as a reference too; a run without generations is bad input
    assert run_cli("compare", parent.info.run_id, "--no-log", cwd=workdir).returncode == 0
    assert len(sweep_runs(store)[1]) == 1
    bad = run_cli("compare", run_id, cwd=workdir)
    assert bad.returncode == 2 and "has no generations" in bad.stderr
