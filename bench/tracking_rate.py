"""How fast a packed sweep's tracking processes record finished trials, on the CPU.

A pack hands every MLflow and Optuna write of its trials to tracking processes (`pack.io`). A
wave of trials ends at once, so their recording is the sweep's tail (and what the progress lines
wait for). This bench sends N trials of the default sweep (sweeps/default.yaml: 40 steps, an eval
every 10, 4 generations, SmolLM2-135M's config) through those processes, as a pack sends them:
the tasks are made by the same code a pack runs (`QueuedTracker`, `record_start`,
`record_generations`, an adapter folder of `--adapter-mb`), before the clock starts; then they are
sent (after one trial per process, untimed: their imports, then WAIT_S as a first wave's
training gives them) and the bench waits until every
trial is told to Optuna (`recorded`), then for the processes
to close (the parent run's last refresh: tables and plots of all trials, `close`). The stores are
fresh sqlite files (MLflow and Optuna), as `make sweep` makes them.

    python bench/tracking_rate.py --trials 256 --trackers 1,4
    python bench/tracking_rate.py --trials 256 --trackers 1,4 --baseline /tmp/old   # a tree to compare, same run

`--baseline DIR` runs the same bench with the package of another checkout (a `git worktree` of an
earlier commit) first, so both figures come from one command on one machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: seconds between the untimed first trials and the rest (what a pack's first wave gives its
#: tracking processes before its trials end)
WAIT_S = float(os.environ.get("TRACKING_RATE_WAIT_S", 15.0))


def build_streams(n: int, trackers: int, adapter: Path) -> tuple[object, list[list[tuple]]]:
    """The plan (fresh stores in the cwd) and each trial's tasks, in the order a pack submits them."""
    from lora_exp.compose import compose
    from lora_exp.core.data import Prompt
    from lora_exp.core.evaluation import score_outputs
    from lora_exp.core.recording import TrialResult, record_generations, record_start
    from lora_exp.core.status import TrialStatus
    from lora_exp.pack.io import QueuedTracker
    from lora_exp.sweep.command import parent_params
    from lora_exp.sweep.outcome import TrialOutcome
    from lora_exp.sweep.plan import SweepPlan, parse_options
    from lora_exp.sweep.spec import load_sweep, suggest
    from lora_exp.sweep.storage import open_study, top_up
    from lora_exp.sweep.trial import trial_config, trial_tags
    from lora_exp.tracking import parent

    spec = load_sweep("default")
    options = parse_options(["sweep=default", f"n_trials={n}"])
    overrides = [*spec.base, f"pack.trackers={trackers}", "pack.slots=256"]
    base = compose(overrides)
    study, created = open_study(spec, options.storage, spec.study, create=True)
    top_up(study, n, options.storage)
    record = parent.SweepRecord(spec.study, base.tracking, spec.objectives, n, tuple(overrides), len(spec.space),
                                storage=options.storage)
    run_id = parent.open_parent(base.tracking, study, parent_params(spec, options, spec.study), "", created)
    record = dataclasses.replace(record, run_id=run_id)
    plan = SweepPlan(spec, options, spec.study, n, record, overrides, None, base)

    class Collect:  # what `IOClient.submit` receives, kept per trial
        def __init__(self) -> None:
            self.tasks: list[tuple] = []

        def submit(self, kind: str, number: int, *args: object) -> None:
            self.tasks.append((kind, number, *args))

    prompts = [Prompt(f"Q: question {i}?\nA:", f"question {i}", (f"the answer to question {i}",)) for i in range(4)]
    base_out = [f"a base answer {i}" for i in range(4)]
    metrics = ("exact_match", "token_f1", "rouge_l")
    base_scores = score_outputs(prompts, base_out, metrics)  # once per sweep, as a pack scores them
    streams = []
    for _ in range(n):
        trial = study.ask()
        trial_overrides = suggest(trial, spec.space)
        cfg = trial_config(base, overrides, trial_overrides)
        io = Collect()
        io.submit("beat_add", trial.number, trial._trial_id)
        io.submit("user_attr", trial.number, trial._trial_id, "overrides", trial_overrides)
        tracker = QueuedTracker(io, trial.number, f"{spec.study}-trial-{trial.number}",
                                trial_tags(plan, trial.number, trial_overrides), trial._trial_id)
        record_start(tracker, cfg, 1_628_160, 136_143_168, 40, "0123456789abcdef", params={"pack_slots": 256})
        result = TrialResult(TrialStatus.COMPLETE, 40)
        for step in range(1, 41):
            loss = 3.0 - step / 40
            tracker.log_metrics({"train_loss": loss, "learning_rate": 1e-3}, step)
            result.loss_curve.append((step, loss))
            if step % 10 == 0:
                tracker.log_metrics({"eval_loss": loss + 0.1}, step)
                io.submit("report", trial.number, trial._trial_id, step, loss + 0.1)
                result.eval_curve.append((step, loss + 0.1))
        result.metrics.update({"final_train_loss": 2.0, "final_eval_loss": 2.1, "train_runtime_s": 10.0,
                               "eval_s": 1.0, "compute_s": 0.5, "base_eval_loss": 3.4, "pack_slots": 256})
        tracker.log_metrics({"base_eval_loss": 3.4, "eval_loss": 3.4}, step=0)
        record_generations(tracker, result, prompts, base_out, [f"an answer {i}" for i in range(4)],
                           metrics, base_scores, 0.1, 64)
        folder = Path(tempfile.mkdtemp(prefix="adapter-", dir="."))
        for f in adapter.iterdir():
            os.link(f, folder / f.name)  # the pack writes a folder per trial and removes it once logged
        tracker.log_dir(str(folder.resolve()), "adapter")
        tracker.remove_after(str(folder.resolve()))
        tracker.log_metrics(result.metrics, step=40)
        outcome = TrialOutcome(trial.number, trial._trial_id, TrialStatus.COMPLETE, 2.1, None, trial_overrides,
                               result.loss_curve, result.eval_curve, 40, 0.5, 10.0, result.generations)
        io.submit("finish", trial.number, outcome)
        streams.append(io.tasks)
    return plan, streams


def measure(n: int, trackers: int, adapter_mb: float) -> dict:
    from lora_exp.pack.io import IOClient

    work = Path(tempfile.mkdtemp(prefix="tracking-rate-"))
    os.chdir(work)
    adapter = work / "adapter-source"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(int(adapter_mb * 2**20)))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "peft_type": "LORA"}))
    plan, streams = build_streams(trackers + n, trackers, adapter)
    io = IOClient(plan)

    def record(tasks_of: list[list[tuple]], total: int) -> None:
        for tasks in tasks_of:
            for task in tasks:
                io.submit(*task)
            io.send()
        while io.done[0] + io.done[1] < total:
            time.sleep(0.01)

    record(streams[:trackers], trackers)  # one trial each first: the processes' imports, not their recording
    time.sleep(WAIT_S)  # in a sweep the first wave trains for tens of seconds before it ends
    t0 = time.perf_counter()
    record(streams[trackers:], trackers + n)
    recorded = time.perf_counter() - t0
    failed = io.close()
    closed = time.perf_counter() - t0
    import optuna

    study = optuna.load_study(study_name=plan.study_name, storage=plan.options.storage)
    complete = sum(t.state.name == "COMPLETE" for t in study.trials) - trackers
    return {"trials": n, "trackers": trackers, "recorded_s": round(recorded, 2), "trials_per_s": round(n / recorded, 1),
            "close_s": round(closed - recorded, 2), "complete": complete, "failed": len(failed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=256)
    parser.add_argument("--trackers", default="1,4", help="tracking processes, comma-separated counts")
    parser.add_argument("--adapter-mb", type=float, default=4.0, help="each trial's adapter file (MB)")
    parser.add_argument("--baseline", help="another checkout whose package is measured first, in this run")
    parser.add_argument("--label", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        cmd = [sys.executable, __file__, "--trials", str(args.trials), "--trackers", args.trackers,
               "--adapter-mb", str(args.adapter_mb), "--label", "baseline"]
        env = {**os.environ, "PYTHONPATH": str(Path(args.baseline).resolve())}
        subprocess.run(cmd, check=True, env=env)
    if not args.label:
        sys.path.insert(0, str(ROOT))
    import lora_exp

    label = args.label or "this tree"
    for count in (int(c) for c in args.trackers.split(",")):
        row = measure(args.trials, count, args.adapter_mb)
        print(json.dumps({"tree": label, "package": str(Path(lora_exp.__file__).parent.parent), **row}), flush=True)


if __name__ == "__main__":
    main()
