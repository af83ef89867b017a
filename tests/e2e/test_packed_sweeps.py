"""`lora-exp sweep pack=K` end to end: every trial recorded in MLflow and Optuna as an unpacked
sweep records it, bad pack options refused up front, Ctrl-C, timeouts, killed workers and
helper processes that die."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, parent_files, popen_cli, run_cli


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


def _seconds(shown: str) -> float:
    """A trial line's duration ("12s", "1.5 min", "2.0 h") in seconds."""
    number, unit = re.fullmatch(r"([\d.]+) ?(s|min|h)", shown).groups()
    return float(number) * {"s": 1, "min": 60, "h": 3600}[unit]


def test_packed_sweep_records_every_trial_and_its_best_reruns_the_same(workdir, store):
    import optuna
    from mlflow.tracking import MlflowClient

    # trainer.max_steps=30 again (the sweep's base sets it): the reproduce line names it once
    args = ["sweep", "sweep=tiny", "pack=4", "n_trials=7", "trainer.base_dropout=false", "trainer.max_steps=30"]
    # two tracking processes (one on a 2-core machine by default): each trial's tasks in order in
    # one of them, the [n/7] count shared, the parent run refreshed by one, last
    proc = run_cli(*args, cwd=workdir, env={"LORA_EXP_PACK_TRACKERS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "packing up to 4 trials" in proc.stderr and "pack summary" in proc.stderr
    # each trial's line once, with its own count (a line another process wrote into mid-line still counts)
    counts = sorted(int(m.group(1)) for m in re.finditer(r"\[(\d+)/7\] trial", proc.stdout))
    assert counts == list(range(1, 8)), proc.stdout + proc.stderr[-3000:]
    # the first trial's ETA is the pack's (its wave's steps left, then the 3 trials not started
    # in 4 slots: about the first wave's training again), not 6 x the time the first took
    elapsed, eta = (_seconds(v) for v in re.search(r"\[1/7\] trial .*?\[elapsed ([^,]+), ETA ([^,]+),",
                                                       proc.stdout).groups())
    assert eta < elapsed, proc.stdout
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{workdir}/mlruns/optuna.db")
    states = [t.state.name for t in study.trials]
    assert len(states) == 7 and "FAIL" not in states and states.count("COMPLETE") >= 2
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("lora-exp")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    children = {r.info.run_id: r for r in runs if r.data.tags.get("lora_exp.kind") == "trial"}
    parent = next(r for r in runs if r.data.tags.get("lora_exp.kind") == "sweep")
    assert len(children) == 7
    for t in study.trials:
        run = children[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["pack_slots"] == "4"
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[t.state.name]
        history = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert history == [s for s, _ in t.user_attrs["loss_curve"]] and history[:3] == [1, 2, 3]
        assert set(t.intermediate_values) == {s for s in (10, 20, 30) if s <= max(history)}
        if t.state.name == "COMPLETE":
            assert run.data.metrics["final_eval_loss"] == pytest.approx(t.value)
            files = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"adapter", "generations.json", "config.yaml"} <= files
        # its cost: a share of the pack's time, less than the time it spent in the pack
        assert run.data.metrics["compute_s"] == pytest.approx(t.user_attrs["compute_s"], abs=1e-3)
        assert 0 < t.user_attrs["compute_s"] < run.data.metrics["train_runtime_s"]
        assert run.data.metrics["train_tokens"] > 0 and run.data.metrics["peak_memory_mb"] > 0
    shares = sum(t.user_attrs["compute_s"] for t in study.trials)
    pack_wall = json.loads(re.findall(r"pack summary: (\{.*\})", proc.stderr)[-1])["wall_s"]
    assert shares <= pack_wall * 1.05, "the trials' shares add up to at most the pack's time"
    best = study.best_trial
    assert client.get_model_version_by_alias("tiny", "best").run_id == best.user_attrs["mlflow_run_id"]

    # the same command again: nothing left to run, so no pack is made (no model loaded, no helper
    # process started) and the parent's tables and plots stay as they were drawn
    drawn = parent_files(client, parent.info.run_id)
    again = run_cli(*args, cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "packing up to" not in again.stderr and "pack summary" not in again.stderr, again.stderr[-3000:]
    assert "7 trials -- " in again.stdout and len(optuna.load_study(
        study_name="tiny", storage=f"sqlite:///{workdir}/mlruns/optuna.db").trials) == 7
    assert parent_files(client, parent.info.run_id) == drawn and "plots/loss_curves.png" in drawn

    # the best trial, rerun alone from its run id, gives the same curve
    rerun = run_cli("rerun", best.user_attrs["mlflow_run_id"], cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    line = next(ln for ln in rerun.stdout.splitlines() if ln.startswith("final_eval_loss"))
    original, again = (float(v) for v in line.split()[1:3])
    assert _rel(original, again) <= 1e-3  # printed with 6 significant digits

    # the summary's `reproduce:` line, pasted into a shell, trains the best trial alone: each key
    # once, no pack.* (how the sweep packed it), the list value quoted (bash and zsh read `[a,b]`
    # as a glob), and the same eval loss as the trial packed (fp32, no base dropout: 1e-4)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("reproduce: ")).removeprefix("reproduce: ")
    words = shlex.split(line)
    keys = [w.partition("=")[0] for w in words[2:]]
    assert len(keys) == len(set(keys)) and not any(k.startswith("pack") for k in keys), line
    assert "trainer.generation_metrics=[exact_match,token_f1,rouge_l]" in words, line
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    alone = subprocess.run(["bash", "-c", line], cwd=workdir, capture_output=True, text=True, timeout=600, env=env)
    assert alone.returncode == 0, alone.stderr[-3000:]
    run_id = re.search(r"run ([0-9a-f]{32})", alone.stdout.split("done:", 1)[1]).group(1)
    assert _rel(client.get_run(run_id).data.metrics["final_eval_loss"], best.value) <= 1e-4


def test_pack_option_bad_values_fail_in_one_line_before_any_model_loads(workdir):
    for args, message, env in ((["pack=0"], "pack: must be >= 1", {}),
                               (["pack=two"], "pack: expected auto or a whole number of trials trained at once", {}),
                               (["pack.slots=many"], "pack.slots: must be auto or a whole number >= 1", {}),
                               (["pack=2", "lora.bias=all"], "pack: lora.bias=all trains the base model's biases", {}),
                               (["pack=2", "lora.use_dora=true"],
                                "pack: lora.use_dora=true (DoRA) is not trained in a pack for every trial", {}),
                               (["pack=2"],
                                "LORA_EXP_PACK_COMPILE=fast: expected one of auto, off, parts, layers, full, graphs",
                                {"LORA_EXP_PACK_COMPILE": "fast"}),
                               (["pack=2"], "LORA_EXP_PACK_TRACKERS=0: expected a whole number >= 1",
                                {"LORA_EXP_PACK_TRACKERS": "0"})):
        proc = run_cli("sweep", "sweep=tiny", *args, cwd=workdir, env=env)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.strip().splitlines() if "Warning" not in ln and "warn" not in ln]
        assert message in lines[-1]
        assert not (workdir / "mlruns" / "optuna.db").exists(), "rejected before the study was created"


def test_trials_with_other_shared_settings_get_a_pack_of_their_own(workdir, store):
    """Searching the batch size: trials of each batch size train in their own pack."""
    import optuna

    sweep = workdir / "bs.yaml"
    sweep.write_text((REPO / "sweeps" / "tiny.yaml").read_text()
                     + "  trainer.batch_size: {type: categorical, choices: [1, 5]}\n")
    proc = run_cli("sweep", f"sweep={sweep}", "pack=4", "n_trials=8", "trainer.max_steps=20", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{workdir}/mlruns/optuna.db")
    sizes = {t.params["trainer.batch_size"] for t in study.trials}
    assert sizes == {1, 5}, "both batch sizes sampled (else the test proves nothing)"
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert proc.stderr.count("packing up to 4 trials") == 2 and proc.stderr.count("pack summary") == 2


def _popen(workdir, *args, env=None):
    return popen_cli("sweep", *args, cwd=workdir, env=env)


def _wait_for(proc, text, seen):
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError("".join(seen))


def _study_states(workdir):
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{workdir}/mlruns/optuna.db")
    return study.trials


def _wait_training(workdir, n, proc, timeout=180):
    """Until n trials are RUNNING with their MLflow runs open (the pack trains them), however
    busy the machine is."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the sweep ended before its trials trained"
        try:
            running = [t for t in _study_states(workdir)
                       if t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs]
        except Exception:  # noqa: BLE001 - the study is not created yet
            running = []
        if len(running) >= n:
            time.sleep(1)  # a few steps in
            return
        time.sleep(0.5)
    raise AssertionError(f"{n} trials were not training after {timeout} s")


def test_packed_sweep_ctrl_c_twice_fails_the_pack_then_resumes(workdir, store):
    import signal

    from mlflow.tracking import MlflowClient

    args = ["sweep=tiny", "pack=2", "n_trials=4", "trainer.max_steps=3000", "trainer.eval_steps=1000"]
    proc, seen = _popen(workdir, *args), []
    _wait_for(proc, "packing up to 2 trials", seen)
    _wait_training(workdir, 2, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, "".join(seen) + out
    failed = [t for t in _study_states(workdir) if t.state.name == "FAIL"]
    assert len(failed) == 2 and {t.user_attrs["failure"] for t in failed} == {"interrupted"}
    client = MlflowClient(store)
    for t in failed:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["error"] == "interrupted"
    proc = run_cli("sweep", "sweep=tiny", "pack=2", "n_trials=4", "trainer.max_steps=20", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [t.state.name for t in _study_states(workdir)]
    assert states.count("COMPLETE") + states.count("PRUNED") == 4


@pytest.mark.slow
def test_a_packed_sweeps_timeout_starts_no_trial_after_it_and_the_sweep_ends_then_resumes(workdir, store):
    """As Optuna's timeout: the trials in slots finish, none starts after it (those sampled ahead
    are failed, never run), the sweep exits, and the next start tops the study up."""
    from mlflow.tracking import MlflowClient

    # the first four trials start 3-10 s in and train 700 steps (~35 s on 2 cores, longer when
    # busy): the timeout falls while they train, with the pack's reserve (a quarter of its
    # slots) already sampled; no trial can have finished before it
    proc = run_cli("sweep", "sweep=tiny", "pack=4", "n_trials=6", "timeout=20", "trainer.max_steps=700",
                   "trainer.eval_steps=250", cwd=workdir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"timeout reached: no new trials \((\d+) in slots finish; (\d+) claimed, not started: failed\)",
                  proc.stderr)
    assert m, proc.stderr[-3000:]
    in_slots, unstarted = int(m.group(1)), int(m.group(2))
    assert in_slots >= 1 and unstarted >= 1, proc.stderr[-3000:]
    trials = _study_states(workdir)
    ran = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(ran) == in_slots, ([(t.number, t.state.name) for t in trials], proc.stderr[-3000:])
    assert len(failed) == unstarted
    assert {t.user_attrs["failure"] for t in failed} == {"not started: the sweep's timeout came first"}
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("lora-exp")
    children = [r for r in client.search_runs([exp.experiment_id], max_results=100)
                if r.data.tags.get("lora_exp.kind") == "trial"]
    assert len(children) == in_slots  # the unstarted ones never opened a run
    # the next start runs what is left: the study ends with its 6 trials
    proc = run_cli("sweep", "sweep=tiny", "pack=4", "n_trials=6", "trainer.max_steps=20", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [t.state.name for t in _study_states(workdir)]
    assert states.count("COMPLETE") + states.count("PRUNED") == 6, states


def test_packed_worker_killed_its_trials_go_stale_and_are_retried(workdir, store):
    import signal

    env = {"LORA_EXP_HEARTBEAT_SECONDS": "1", "LORA_EXP_PACK_TRACKERS": "2"}  # grace: 4 s; each tracker stops
    args = ["sweep=tiny", "pack=2", "n_trials=4", "trainer.max_steps=3000", "trainer.eval_steps=1000"]
    proc, seen = _popen(workdir, *args, env=env), []
    _wait_for(proc, "packing up to 2 trials", seen)
    _wait_training(workdir, 2, proc)
    proc.send_signal(signal.SIGKILL)  # no handler runs; its tracking process must notice and stop beating
    proc.wait(timeout=30)
    assert len([t for t in _study_states(workdir) if t.state.name == "RUNNING"]) == 2
    time.sleep(6)
    proc = run_cli("sweep", "sweep=tiny", "pack=2", "n_trials=4", "trainer.max_steps=20", cwd=workdir, env=env,
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _study_states(workdir)
    states = [t.state.name for t in trials]
    assert states.count("FAIL") == 2 and states.count("COMPLETE") + states.count("PRUNED") == 4
    dead = [t for t in trials if t.state.name == "FAIL"]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") in {d.number for d in dead}]
    assert len(retried) == 2, "each dead trial retried with its parameters"


@pytest.mark.parametrize("name,line", [("lora-exp-track0", "the tracking process lora-exp-tracking-0 stopped"),
                                       ("lora-exp-sample", "the sampling process lora-exp-sampler stopped")])
def test_a_helper_process_that_dies_stops_the_pack_with_one_line(workdir, store, name, line):
    """The trainer writes its tasks to the tracking process's pipe: a dead reader would block it
    forever once the pipe is full; a dead sampler would leave free slots waiting forever. It stops
    instead, in one line, and a later sweep retries."""
    import psutil

    env = {"LORA_EXP_HEARTBEAT_SECONDS": "1"}  # grace: 4 s
    args = ["sweep=tiny", "pack=2", "n_trials=4", "trainer.max_steps=3000", "trainer.eval_steps=1000",
            "trainer.logging_steps=1"]
    proc, seen = _popen(workdir, *args, env=env), []
    _wait_for(proc, "packing up to 2 trials", seen)
    time.sleep(3)
    helpers = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == name]
    assert len(helpers) == 1
    helpers[0].kill()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, "".join(seen) + out
    assert "Traceback" not in out
    assert out.strip().splitlines()[-1].startswith(f"lora-exp: error: {line}"), out[-2000:]
    time.sleep(6)  # its trials' heartbeats stopped with it: stale, then retried
    proc = run_cli("sweep", "sweep=tiny", "pack=2", "n_trials=4", "trainer.max_steps=20", cwd=workdir, env=env,
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [t.state.name for t in _study_states(workdir)]
    assert states.count("COMPLETE") + states.count("PRUNED") == 4
