"""`make sweep` as a new user runs it, timed on this machine, against the seed's LoRA config.

    python bench/sweep_default.py            # ~11 min on 2 CPU cores

Runs `lora-exp sweep` (the default sweep, fresh store in a temp folder), then trains `lora=seed`
with the sweep's own per-trial budget, and prints: wall time, trials (completed / pruned / failed),
best objective vs lora=seed, the per-trial overhead of the sweep machinery (config compose,
tracking, Optuna, parent-run refresh) as a share of each trial's wall time, and where the trials'
time went (training steps, evals, generations, the rest of each run, between runs).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "lora-exp"


def main() -> None:
    env = {**os.environ, "LORA_EXP_CONFIG_DIR": str(REPO / "conf"), "LORA_EXP_SWEEPS_DIR": str(REPO / "sweeps")}
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    start = time.perf_counter()
    proc = subprocess.run([str(EXE), "sweep", *sys.argv[1:]], cwd=work, env=env, capture_output=True, text=True)
    sweep_wall = time.perf_counter() - start
    print(proc.stdout)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        sys.exit(1)

    import optuna

    study = optuna.load_study(study_name="default", storage=f"sqlite:///{work}/mlruns/optuna.db")
    trials = sorted(study.trials, key=lambda t: t.number)
    states = [t.state.name for t in trials]
    # Per-trial overhead: one worker runs trials back to back, so the gap between two trial starts
    # is one whole iteration (claim, compose, MLflow run, training, tell, parent refresh).
    overheads = []
    for cur, nxt in zip(trials, trials[1:]):
        iteration = (nxt.datetime_start - cur.datetime_start).total_seconds()
        compute = cur.user_attrs.get("compute_s")
        if compute is not None and cur.number > 0:  # trial 0 also pays the one-off base-model evals
            overheads.append((iteration - compute) / iteration)

    split = _trial_split(work, trials)

    spec_base = _sweep_base()
    seed_runs = {}
    for label, extra in (("lora=seed", ["lora=seed"]), ("lora=seed trainer.lr=1e-4", ["lora=seed", "trainer.lr=1e-4"])):
        out = subprocess.run([str(EXE), "train", *spec_base, *extra], cwd=work, env=env, capture_output=True,
                             text=True)
        match = re.search(r"final_eval_loss ([0-9.]+)", out.stdout)
        seed_runs[label] = float(match.group(1)) if match else None

    result = {
        "sweep_wall_s": round(sweep_wall, 1),
        "trials": len(trials), "completed": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
        "best_eval_loss": round(study.best_value, 4), "best_params": study.best_trial.params,
        "seed_config_eval_loss_same_budget": seed_runs,
        "overhead_share_median": round(statistics.median(overheads), 4) if overheads else None,
        "overhead_share_max": round(max(overheads), 4) if overheads else None,
        "cores": os.cpu_count(),
        "trial_split_s": split,
    }
    print(json.dumps(result, indent=1))
    print(f"make sweep: {sweep_wall / 60:.1f} min, {result['trials']} trials ({result['completed']} completed, "
          f"{result['pruned']} pruned, {result['failed']} failed); best eval_loss {result['best_eval_loss']} vs "
          f"lora=seed {seed_runs}; per-trial machinery overhead median "
          f"{100 * (result['overhead_share_median'] or 0):.1f}%"
          f" (max {100 * (result['overhead_share_max'] or 0):.1f}%)")
    total = sum(split.values()) or 1.0
    print("where the trials' time went (all trials, seconds): " + ", ".join(
        f"{name} {seconds:.0f} ({100 * seconds / total:.0f}%)" for name, seconds in split.items()))


def _trial_split(work: Path, trials: list) -> dict[str, float]:
    """The sweep's trial time, summed over its trials, by what it was spent on: training steps,
    evals, the adapter's generations, the rest of the run (scores, adapter upload, tracking) and
    what lies between runs (Optuna, claims, the first trial's base-model evals, the next config)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lora-exp").experiment_id], max_results=1000)
    by_trial = {int(r.data.tags["trial_number"]): r for r in runs if "trial_number" in r.data.tags}
    split = dict.fromkeys(("train steps", "evals", "generations", "rest of run", "between runs"), 0.0)
    for trial in trials:
        run = by_trial.get(trial.number)
        if run is None or trial.datetime_complete is None or run.info.end_time is None:
            continue
        m = run.data.metrics
        run_s = (run.info.end_time - run.info.start_time) / 1000
        train_s, eval_s, gen_s = m.get("train_runtime_s", 0.0), m.get("eval_s", 0.0), m.get("generation_s", 0.0)
        split["train steps"] += train_s - eval_s
        split["evals"] += eval_s
        split["generations"] += gen_s
        split["rest of run"] += run_s - train_s - gen_s
        split["between runs"] += (trial.datetime_complete - trial.datetime_start).total_seconds() - run_s
    return {k: round(v, 1) for k, v in split.items()}


def _sweep_base() -> list[str]:
    sys.path.insert(0, str(REPO))
    os.environ["LORA_EXP_SWEEPS_DIR"] = str(REPO / "sweeps")
    from lora_exp.sweep.spec import load_sweep

    return load_sweep("default").base


if __name__ == "__main__":
    main()
