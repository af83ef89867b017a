"""Warm starts and enqueued trials: `warm_start=STUDY[:K]` and `enqueue=FILE.yaml` put trials at
the front of a study, marked in Optuna and MLflow, never twice; end to end on a tiny model."""
from __future__ import annotations

import os

from lora_exp.pack.worker import run_packed_worker
from lora_exp.sweep.command import cmd_sweep, dry_run

from helpers import REPO, load_study, sweep_runs

os.environ["LORA_EXP_SWEEPS_DIR"] = str(REPO / "sweeps")

SHORT = ["trainer.max_steps=10", "trainer.eval_steps=5"]


def test_warm_start_and_enqueue_run_first_marked_and_never_twice(workdir, store, caplog, capsys):
    caplog.set_level("INFO", logger="lora_exp")
    storage = f"sqlite:///{workdir}/mlruns/optuna.db"
    assert cmd_sweep(["sweep=tiny", "n_trials=4", *SHORT]) == 0
    source = load_study(storage)
    done = [t for t in source.trials if t.state.name == "COMPLETE"]
    best = sorted(done, key=lambda t: t.value)[:2]

    # one set with a key the space does not search (kept as the trial's override), alpha given
    # absolute where the space searches it as a ratio of r; one as a mapping
    (workdir / "first.yaml").write_text("- [lora.r=8, lora.lora_alpha=16, trainer.lr=0.003, lora.lora_dropout=0.0]\n"
                                        "- {lora.r: 2, lora.preset: attn}\n")
    args = ["sweep=tiny", "study=warm", "n_trials=5", "pack=2", "enqueue=first.yaml", "warm_start=tiny:2", *SHORT]
    assert dry_run(args) == 0  # lists them first, writes nothing
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trial ")]
    assert shown[0].startswith("trial   0  lora.r=8 lora.lora_alpha=16")
    assert shown[0].endswith("(enqueued: first.yaml#1)")
    assert shown[3].endswith(f"(enqueued: tiny#{best[1].number})") and "enqueued" not in shown[4]
    assert cmd_sweep(args, packed=run_packed_worker) == 0
    warm = load_study(storage, "warm")
    trials = sorted(warm.trials, key=lambda t: t.number)
    assert len(trials) == 5 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)

    first, second = trials[0], trials[1]
    assert first.user_attrs["enqueued"] == "first.yaml#1" and second.user_attrs["enqueued"] == "first.yaml#2"
    assert first.params["lora.r"] == 8 and first.params["lora.lora_alpha"] == 2 and first.params["trainer.lr"] == 0.003
    assert {"lora.r=8", "lora.lora_alpha=16", "trainer.lr=0.003", "lora.lora_dropout=0.0"} <= set(
        first.user_attrs["overrides"])
    assert second.params["lora.r"] == 2 and second.params["lora.preset"] == "attn"
    for trial, source_trial in zip(trials[2:4], best):  # the source study's best two, best first
        assert trial.user_attrs["enqueued"] == f"tiny#{source_trial.number}"
        assert trial.params == source_trial.params
        assert trial.user_attrs["overrides"] == source_trial.user_attrs["overrides"]
    assert "enqueued" not in trials[4].user_attrs  # sampled as usual

    _, parents, children = sweep_runs(store)
    runs = {int(r.data.tags["trial_number"]): r for r in children if r.data.tags["lora_exp.study"] == "warm"}
    assert [runs[n].data.tags.get("lora_exp.enqueued") for n in range(5)] == [
        "first.yaml#1", "first.yaml#2", f"tiny#{best[0].number}", f"tiny#{best[1].number}", None]
    assert runs[0].data.params["lora.lora_dropout"] == "0.0" and runs[0].data.params["lora.lora_alpha"] == "16.0"
    assert "4 trial(s) enqueued to run first (first.yaml, tiny)" in caplog.text

    # resumed with the same arguments and a larger budget: nothing enqueued again
    caplog.clear()
    more = [a if not a.startswith("n_trials=") else "n_trials=6" for a in args]
    assert cmd_sweep(more, packed=run_packed_worker) == 0
    assert "0 trial(s) enqueued to run first (first.yaml, tiny); 4 enqueued by an earlier run" in caplog.text
    again = load_study(storage, "warm").trials
    assert len(again) == 6
    assert sum("enqueued" in t.user_attrs for t in again) == 4
