"""Packed trials (`sweep pack=K`): a trial trained in a pack of mixed trials trains exactly as it
does alone, its exported adapter is a normal peft adapter with the same logits, and a packed
sweep records every trial in MLflow and Optuna as an unpacked sweep does. CPU, tiny models."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from lora_exp.config import compose
from lora_exp.data import load_rows, tokenize
from lora_exp.models import load_base
from lora_exp.pack_training import train_packed
from lora_exp.data import Example, train_batches
from lora_exp.packed import (CAUSAL_ROWS, TokenTable, batch_schedule, causal_rows_attention, dropout_mask, module_keys,
                             padded_attention, row_keys)
from lora_exp.tracking import NullTracker
from lora_exp.training import run_trial

COMMON = ["data=seed", "lora=seed", "trainer=seed", "trainer.max_steps=30", "trainer.eval_steps=10",
          "trainer.logging_steps=5", "trainer.generation_metrics=[exact_match]", "trainer.max_new_tokens=8",
          "tracking=none", "trainer.batch_size=2"]
#: trials that differ in everything a pack lets differ: rank, alpha, dropout, targets, lr,
#: clipping, seed, schedule, warmup, weight decay, length
MIXED = [["lora.r=4", "lora.lora_alpha=8", "lora.lora_dropout=0.1", "trainer.lr=1e-3"],
         ["lora.r=16", "lora.lora_alpha=16", "lora.lora_dropout=0.0", "lora.preset={all}", "trainer.lr=3e-3",
          "trainer.max_grad_norm=0.05"],
         ["lora.r=8", "lora.lora_alpha=32", "lora.lora_dropout=0.2", "lora.preset={mid}", "trainer.lr=5e-4",
          "trainer.seed=7", "trainer.lr_scheduler=cosine", "trainer.warmup_steps=5"],
         ["lora.r=2", "lora.lora_alpha=4", "lora.lora_dropout=0.05", "trainer.lr=2e-3", "trainer.seed=3",
          "trainer.max_steps=20", "trainer.weight_decay=0.1", "lora.use_rslora=true"],
         ["lora.r=8", "lora.lora_alpha=8", "lora.lora_dropout=0.3", "trainer.lr=1e-2", "trainer.seed=11",
          "trainer.lr_scheduler=constant", "trainer.max_grad_norm=null"]]
PRESETS = {"tiny_gpt2": {"all": "all", "mid": "attn_proj", "extra": ["trainer.base_dropout=false"]},
           "tiny_llama": {"all": "all_linear", "mid": "attn", "extra": []}}


def _mixed(model: str) -> list:
    p = PRESETS[model]
    return [compose([f"model={model}", *COMMON, *p["extra"], *(o.format(**p) for o in v)]) for v in MIXED]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_a_trial_in_a_mixed_pack_trains_exactly_as_alone(model):
    torch.set_num_threads(2)
    cfgs = _mixed(model)
    base = load_base(cfgs[0].model, torch.device("cpu"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    alone = [run_trial(c, base, data, NullTracker()) for c in cfgs]
    packed = train_packed(cfgs, base, data)
    for cfg, a, p in zip(cfgs, alone, packed):
        assert [s for s, _ in a.loss_curve] == [s for s, _ in p.loss_curve], cfg.overrides
        assert len(a.loss_curve) == cfg.trainer.max_steps // 5
        for (step, x), (_, y) in zip(a.loss_curve, p.loss_curve):
            assert _rel(x, y) <= 1e-4, (cfg.overrides, step, x, y)
        assert [s for s, _ in a.eval_curve] == [s for s, _ in p.eval_curve]
        for (_, x), (_, y) in zip(a.eval_curve, p.eval_curve):
            assert _rel(x, y) <= 1e-4
        assert a.generations["adapter_output"] == p.generations["adapter_output"]
        assert a.metrics["trainable_params"] == p.metrics["trainable_params"]
    # and the trials really differ from each other (a pack that trained one config K times would fail)
    finals = [round(r.loss_curve[-1][1], 4) for r in packed]
    assert len(set(finals)) == len(finals)
    assert all(r.loss_curve[-1][1] < r.loss_curve[0][1] for r in packed[1:])
    # the base model is given back untouched
    assert not any("PackedLora" in type(m).__name__ for m in base.model.modules())


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])  # llama: grouped-query attention
@pytest.mark.parametrize("own", ["sdpa", "eager"])
def test_right_padded_rows_attend_without_a_mask_as_with_it_and_padded_attention_brings_the_masks_back(model, own):
    cfg = compose([f"model={model}", "data=seed"])
    base = load_base(cfg.model, torch.device("cpu"))
    m = base.model.eval()
    m.set_attn_implementation(own)
    table = TokenTable.build(tokenize(load_rows(cfg.data), cfg.data, base.tokenizer).train,
                             base.tokenizer.pad_token_id, torch.device("cpu"))
    real = table.mask.bool()
    assert 0 < int(real.sum()) < real.numel()  # rows of several lengths, padded on the right
    with torch.no_grad():
        masked = m(input_ids=table.ids, attention_mask=table.mask).logits
        assert causal_rows_attention(m) == own and m.config._attn_implementation == CAUSAL_ROWS
        causal = m(input_ids=table.ids, attention_mask=table.mask).logits
        with padded_attention(m, own):
            assert m.config._attn_implementation == own
            again = m(input_ids=table.ids, attention_mask=table.mask).logits
        assert m.config._attn_implementation == CAUSAL_ROWS
    torch.testing.assert_close(causal[real], masked[real], rtol=1e-5, atol=1e-5)
    # the mask really is gone (padded positions now see padded keys), and comes back
    assert not torch.allclose(causal[~real], masked[~real], atol=1e-3)
    torch.testing.assert_close(again, masked)


def test_slots_are_reused_continuous_batching_gives_the_same_trials():
    """5 trials through 2 slots: later trials take freed slots (fresh A, zero B and optimizer state)."""
    cfgs = _mixed("tiny_llama")
    base = load_base(cfgs[0].model, torch.device("cpu"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    full = train_packed(cfgs, base, data)
    two = train_packed(cfgs, base, data, slots=2)
    for a, b in zip(full, two):
        assert all(_rel(x, y) <= 1e-4 for (_, x), (_, y) in zip(a.loss_curve, b.loss_curve))


class _StopAt:
    """Stops its trial at the eval of `step` (as a pruner would)."""

    def __init__(self, step: int):
        self.step = step

    def on_eval(self, step: int, metrics: dict) -> bool:
        return step == self.step


def test_trials_that_hold_for_evals_and_generations_while_others_train_train_exactly_as_alone(monkeypatch):
    """Out of step (2 slots, trials of 20 and 30 steps), a slot whose eval is due holds still while
    the other trains, is evaluated a few steps later with others, and goes on, stops (a callback),
    or waits for its generations: every trial's curves, evals and generations are those it has
    alone, and a trial stopped at an eval ends there."""
    from lora_exp import pack_training
    from lora_exp.pack_training import PackTrainer

    monkeypatch.setattr(pack_training, "EVAL_GATHER_STEPS", 3)
    monkeypatch.setattr(pack_training, "FINISH_GATHER_STEPS", 4)
    torch.set_num_threads(2)
    cfgs = _mixed("tiny_llama")
    cfgs = [cfgs[3], cfgs[0], cfgs[1], cfgs[2], cfgs[4]]  # 20 steps first: the next trial starts out of step
    stops = {3: 20}  # the fourth trial is stopped at its eval of step 20 (of 30)
    base = load_base(cfgs[0].model, torch.device("cpu"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    alone = [run_trial(c, base, data, NullTracker(), [_StopAt(stops[i])] if i in stops else [])
             for i, c in enumerate(cfgs)]
    trainer = PackTrainer(base, data, cfgs[0], 2, 16, sorted({m for c in cfgs for m in c.target_modules}))
    results, queue = {}, list(enumerate(cfgs))
    try:
        while queue or trainer.busy():
            for slot in trainer.free_slots():
                if queue:
                    i, cfg = queue.pop(0)
                    trainer.start(slot, cfg, NullTracker(), [_StopAt(stops[i])] if i in stops else [], handle=i)
            for run in trainer.step():
                results[run.handle] = run.result
    finally:
        trainer.close()
    assert trainer.held_slot_steps > 0  # slots really held while the other trained
    for i, (cfg, a) in enumerate(zip(cfgs, alone)):
        p = results[i]
        assert (p.status, p.steps) == (a.status, a.steps), cfg.overrides
        assert [s for s, _ in a.loss_curve] == [s for s, _ in p.loss_curve], cfg.overrides
        assert all(_rel(x, y) <= 1e-4 for (_, x), (_, y) in zip(a.loss_curve, p.loss_curve)), cfg.overrides
        assert [s for s, _ in a.eval_curve] == [s for s, _ in p.eval_curve], cfg.overrides
        assert all(_rel(x, y) <= 1e-4 for (_, x), (_, y) in zip(a.eval_curve, p.eval_curve)), cfg.overrides
        assert a.generations.get("adapter_output") == p.generations.get("adapter_output"), cfg.overrides
    assert all(results[i].generations["adapter_output"] for i in (0, 1, 2, 4))
    assert results[3].status == "stopped" and results[3].loss_curve[-1][0] == 20


def test_the_compiled_step_trains_as_the_eager_one_through_slot_reuse_without_recompiling(monkeypatch):
    """LORA_EXP_PACK_COMPILE=full (the default on CUDA) compiles the whole training step once:
    5 trials through 2 slots (slots freed and re-assigned, dropout on and off) give the eager
    curves and generations, with one graph for the step."""
    import torch._dynamo

    torch.set_num_threads(2)
    cfgs = _mixed("tiny_gpt2")
    base = load_base(cfgs[0].model, torch.device("cpu"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    monkeypatch.setenv("LORA_EXP_PACK_COMPILE", "off")
    eager = train_packed(cfgs, base, data, slots=2)
    monkeypatch.setenv("LORA_EXP_PACK_COMPILE", "full")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train_packed(cfgs, base, data, slots=2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for a, b in zip(eager, compiled):
        assert [s for s, _ in a.loss_curve] == [s for s, _ in b.loss_curve]
        assert all(_rel(x, y) <= 1e-4 for (_, x), (_, y) in zip(a.loss_curve, b.loss_curve))
        assert a.generations["adapter_output"] == b.generations["adapter_output"]


def test_the_bf16_compute_copy_holds_what_autocast_would_cast_the_master_weights_to():
    """A bf16 pack's forward reads a bf16 copy of the LoRA weights that the optimizer keeps: the
    losses and updated fp32 weights are those of casting the fp32 weights at every use (CPU
    autocast here; on CUDA the Triton kernel writes the copy)."""
    from lora_exp.pack_training import slot_spec
    from lora_exp.packed import PackedModel, TokenTable, slot_losses

    cfgs = _mixed("tiny_llama")[:3]
    base = load_base(cfgs[0].model, torch.device("cpu"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    table = TokenTable.build(data.train, base.tokenizer.pad_token_id, torch.device("cpu"))
    modules = sorted({m for c in cfgs for m in c.target_modules})
    runs = []
    for low in (False, True):
        pm = PackedModel(base, 3, 16, modules, compile="off", low_precision=low)
        for slot, cfg in enumerate(cfgs):
            pm.assign(slot, slot_spec(cfg, len(data.train)))
        losses = []
        for step in range(4):
            idx = torch.tensor([(step + s) % len(data.train) for s in range(3)])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = slot_losses(base.model, table.ids[idx], table.mask[idx], table.labels[idx], 3, 1)
            loss.sum().backward()
            pm.optimizer_step()
            losses.append(loss.detach().clone())
        if low:
            assert torch.equal(pm.low, pm.params.to(torch.bfloat16))
        runs.append((torch.stack(losses), pm.params.clone()))
        pm.close()
    (loss_a, params_a), (loss_b, params_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(params_a, params_b)
    assert not torch.equal(loss_a[0], loss_a[-1])  # it trained


class _AdapterTracker(NullTracker):
    """Keeps the adapter folder a trial logs (what MLflow would store as its `adapter` artifact)."""

    run_id = "local"

    def __init__(self, folder: Path):
        self.folder = folder

    def log_dir(self, local_dir, artifact_path):
        shutil.copytree(local_dir, self.folder)


def test_exported_adapter_is_a_normal_peft_adapter_with_the_logits_of_the_trial_trained_alone(tmp_path):
    from peft import PeftModel

    cfgs = _mixed("tiny_gpt2")[:4]
    base = load_base(cfgs[0].model, torch.device("cpu"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    alone_dirs = [tmp_path / f"alone{i}" for i in range(4)]
    for cfg, folder in zip(cfgs, alone_dirs):
        run_trial(cfg, base, data, _AdapterTracker(folder))
    packed_dirs = [str(tmp_path / f"packed{i}") for i in range(4)]
    train_packed(cfgs, base, data, adapters_to=packed_dirs)
    ids = torch.tensor([data.train[0].input_ids])
    for cfg, a, p in zip(cfgs, alone_dirs, packed_dirs):
        config = json.loads(Path(p, "adapter_config.json").read_text())
        assert config["r"] == cfg.lora.r and sorted(config["target_modules"]) == sorted(cfg.target_modules)
        logits = []
        for folder in (a, p):
            model = PeftModel.from_pretrained(base.model, str(folder)).eval()
            with torch.no_grad():
                logits.append(model(input_ids=ids).logits)
            model.unload()
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
        assert (logits[1] - base.model(input_ids=ids).logits).abs().max() > 1e-3, "the adapter does something"


def test_dropout_masks_depend_on_the_trial_only():
    x = torch.ones(3, 4000)
    keys = module_keys(row_keys(torch.tensor([5, 5, 6]), torch.tensor([2, 2, 2]), torch.tensor([0, 0, 0])), 123)
    mask = dropout_mask(x, keys, torch.tensor([0.25, 0.25, 0.25]))
    assert torch.equal(mask[0], mask[1]), "same seed, step, module, row: same mask, whatever else is packed"
    assert not torch.equal(mask[0], mask[2])
    assert mask.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]
    assert abs(float((mask[0] == 0).float().mean()) - 0.25) < 0.03
    other = dropout_mask(x[:1], module_keys(row_keys(torch.tensor([5]), torch.tensor([3]), torch.tensor([0])), 123),
                         torch.tensor([0.25]))
    assert not torch.equal(other[0], mask[0]), "a new mask every step"


def test_packed_sweep_records_every_trial_and_its_best_reruns_the_same(workdir, store):
    import optuna
    from mlflow.tracking import MlflowClient

    args = ["sweep", "sweep=tiny", "pack=4", "n_trials=7", "trainer.base_dropout=false"]
    # two tracking processes (one on a 2-core machine by default): each trial's tasks in order in
    # one of them, the [n/7] count shared, the parent run refreshed by one, last
    proc = run_cli(*args, cwd=workdir, env={"LORA_EXP_PACK_TRACKERS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "packing up to 4 trials" in proc.stderr and "pack summary" in proc.stderr
    # each trial's line once, with its own count (a line another process wrote into mid-line still counts)
    counts = sorted(int(m.group(1)) for m in re.finditer(r"\[(\d+)/7\] trial", proc.stdout))
    assert counts == list(range(1, 8)), proc.stdout + proc.stderr[-3000:]
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
    best = study.best_trial
    assert client.get_model_version_by_alias("tiny", "best").run_id == best.user_attrs["mlflow_run_id"]

    # the best trial, rerun alone from its run id, gives the same curve
    rerun = run_cli("rerun", best.user_attrs["mlflow_run_id"], cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    line = next(ln for ln in rerun.stdout.splitlines() if ln.startswith("final_eval_loss"))
    original, again = (float(v) for v in line.split()[1:3])
    assert _rel(original, again) <= 1e-3  # printed with 6 significant digits


def test_pack_option_bad_values_fail_in_one_line_before_any_model_loads(workdir):
    for args, message, env in ((["pack=0"], "pack: must be >= 1", {}), (["pack=two"], "sweep option", {}),
                               (["pack=2", "lora.bias=all"], "pack: lora.bias=all trains the base model's biases", {}),
                               (["pack=2"], "LORA_EXP_PACK_COMPILE=fast: expected one of off, parts, full, graphs",
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
    sweep.write_text((Path(__file__).parent.parent / "sweeps" / "tiny.yaml").read_text()
                     + "  trainer.batch_size: {type: categorical, choices: [1, 5]}\n")
    proc = run_cli("sweep", f"sweep={sweep}", "pack=4", "n_trials=8", "trainer.max_steps=20", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{workdir}/mlruns/optuna.db")
    sizes = {t.params["trainer.batch_size"] for t in study.trials}
    assert sizes == {1, 5}, "both batch sizes sampled (else the test proves nothing)"
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert proc.stderr.count("packing up to 4 trials") == 2 and proc.stderr.count("pack summary") == 2


def _popen(workdir, *args, env=None):
    import os
    import subprocess
    import sys

    exe = str(Path(sys.executable).parent / "lora-exp")
    return subprocess.Popen([exe, "sweep", *args], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})


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


def test_packed_sweep_ctrl_c_twice_fails_the_pack_then_resumes(workdir, store):
    import signal

    from mlflow.tracking import MlflowClient

    args = ["sweep=tiny", "pack=2", "n_trials=4", "trainer.max_steps=3000", "trainer.eval_steps=1000"]
    proc, seen = _popen(workdir, *args), []
    _wait_for(proc, "packing up to 2 trials", seen)
    time.sleep(3)
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
    time.sleep(3)
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


@pytest.mark.parametrize("n,batch,seed,steps", [(5, 1, 42, 2500), (5, 2, 3, 31), (7, 3, 1, 10), (4, 4, 0, 3), (4, 2, 9, 0)])
def test_batch_schedule_is_the_order_train_batches_yields(n, batch, seed, steps):
    """A slot's data order is the one its trial would see alone (a short last batch of an
    epoch is padded with the empty example, index n)."""
    examples = [Example(input_ids=[i], labels=[i], answer_labels=[i]) for i in range(n)]
    stream = train_batches(examples, batch, seed)
    expected = [[e.input_ids[0] for e in next(stream)] for _ in range(steps)]
    got = batch_schedule(n, batch, seed, steps)
    assert got.shape == (steps, batch)
    assert [[i for i in row if i != n] for row in got.tolist()] == expected
    assert all(row[:len(e)] == e for row, e in zip(got.tolist(), expected))


def test_a_claim_that_finds_nothing_reads_no_trial_in_flight(tmp_path, monkeypatch):
    """A pack with a free slot asks for WAITING trials at every step; Optuna's cached reads
    re-load every unfinished trial each time (~0.5 s with a thousand in flight: the step on the
    GPU went 6x slower). A claim that finds nothing must load no trial."""
    import optuna
    from optuna.trial import TrialState

    from lora_exp.search import claim_waiting_trials

    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=url, study_name="s", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        study.ask()  # RUNNING, as a pack's trials are
    for _ in range(2):
        study.enqueue_trial({})
    backend = study._storage._backend
    loaded: list[TrialState] = []
    read = backend._get_trials

    def spy(*args, **kwargs):
        trials = read(*args, **kwargs)
        loaded.extend(t.state for t in trials)
        return trials

    monkeypatch.setattr(backend, "_get_trials", spy)
    claimed = claim_waiting_trials(study, url, 5)
    assert sorted(t.number for t in claimed) == [20, 21]
    assert 0 <= claimed[0].suggest_float("x", 0, 1) <= 1  # a claimed trial samples (no sampler read)
    loaded.clear()
    for _ in range(3):
        assert claim_waiting_trials(study, url, 5) == []
    assert loaded == []
    assert {t.state for t in study.get_trials()} == {TrialState.RUNNING}


def test_a_packed_worker_sees_trials_another_process_finished(tmp_path, monkeypatch):
    """A pack's trials are told to Optuna by its tracking process, so the training process never
    calls `tell` or `ask` (which drop Optuna's per-thread cache of the study's trials). Without a
    fresh read at each claim, TPE there counts the finished trials as of its first sample forever
    and never leaves its random start-up phase."""
    import optuna

    from lora_exp.search import claim_waiting_trials

    url = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(storage=url, study_name="s")
    tpe = optuna.samplers.TPESampler(n_startup_trials=3, constant_liar=True, seed=0)
    worker = optuna.load_study(study_name="s", storage=url, sampler=tpe)  # the training process
    tracker = optuna.load_study(study_name="s", storage=url)  # the tracking process
    for _ in range(4):
        worker.enqueue_trial({})
    first = claim_waiting_trials(worker, url, 3)
    for trial in first:
        trial.suggest_float("x", 0, 1)
    for trial in first:
        tracker.tell(trial.number, trial.params["x"])  # three finished trials: TPE's start-up is over

    random_samples = []
    real = tpe._random_sampler.sample_independent

    def counting(*args, **kwargs):
        random_samples.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(tpe._random_sampler, "sample_independent", counting)
    (trial,) = claim_waiting_trials(worker, url, 1)
    trial.suggest_float("x", 0, 1)
    assert random_samples == []  # sampled by TPE from the three finished trials


def _study_with_history(url):
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    dists = {"x": FloatDistribution(0, 1), "y": FloatDistribution(1e-4, 1e-1, log=True)}
    tpe = optuna.samplers.TPESampler(n_startup_trials=3, constant_liar=True, seed=0)
    study = optuna.create_study(storage=url, study_name="s", sampler=tpe)
    for i in range(8):  # five finished trials and three in flight, whose params the liar counts
        params = {"x": (i * 0.37) % 1, "y": 10 ** (-1 - (i % 3))}
        study.add_trial(create_trial(params=params, distributions=dists, value=(params["x"] - 0.3) ** 2)
                        if i < 5 else create_trial(params=params, distributions=dists, state=TrialState.RUNNING))
    for _ in range(6):
        study.enqueue_trial({})
    return study


def test_a_batch_samples_as_trial_by_trial_reads_would_with_one_read(tmp_path, monkeypatch):
    """A pack claims trials in batches: TPE (constant liar) samples them against one read of the
    study, not one per trial (quadratic in the trials in flight), and samples exactly what it
    would with a fresh read per trial, the batch's earlier trials counted as in flight."""
    from lora_exp.search import TrialReader, claim_waiting_trials

    sampled, n_reads = {}, {}
    for view in (False, True, "reader"):
        url = f"sqlite:///{tmp_path}/optuna-{view}.db"
        study = _study_with_history(url)
        backend = study._storage._backend
        reads = []
        read = backend._get_trials

        def spy(*args, _read=read, _reads=reads, **kwargs):
            _reads.append(1)
            return _read(*args, **kwargs)

        monkeypatch.setattr(backend, "_get_trials", spy)
        trials = claim_waiting_trials(study, url, 6, batch_view=bool(view),
                                      reader=TrialReader(study) if view == "reader" else None)
        reads.clear()
        sampled[view] = [(t.suggest_float("x", 0, 1), t.suggest_float("y", 1e-4, 1e-1, log=True)) for t in trials]
        n_reads[view] = len(reads)
    assert n_reads[False] >= 6 and n_reads[True] == 1
    assert n_reads["reader"] == 2  # the finished trials, then the live ones
    assert len(set(sampled[True])) == 6
    assert sampled[True] == sampled[False] == sampled["reader"]


def test_a_trial_reader_answers_as_a_full_read_and_loads_each_finished_trial_once(tmp_path):
    """The pruner's view and the sampler read the study again and again in a long packed search:
    the reader answers exactly what a full read of the database answers (live trials as they are
    now), and loads a finished trial only once, also one that finishes after a later one."""
    import optuna
    from optuna.trial import TrialState as S

    from lora_exp.search import TrialReader

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="s")
    backend = getattr(study._storage, "_backend", study._storage)
    trials = [study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}) for _ in range(6)]
    for t, (state, value) in zip(trials, [(S.COMPLETE, 0.5), (S.COMPLETE, 0.2), (S.PRUNED, None), (S.FAIL, None)]):
        t.report(t.params["x"], 10)
        t.set_user_attr("overrides", [f"x={t.params['x']}"])
        study.tell(t, value, state=state)
    study.enqueue_trial({"x": 0.25})

    def rows(got: list) -> list:
        return [(t.number, t.state, t.params, t.values, t.intermediate_values, t.user_attrs) for t in got]

    def same_as_full_reads() -> None:
        for states in (None, (S.COMPLETE, S.PRUNED), (S.RUNNING,), (S.WAITING, S.FAIL), (S.COMPLETE, S.RUNNING)):
            assert rows(reader.read(states)) == rows(backend.get_all_trials(study._study_id, deepcopy=False,
                                                                            states=states)), states

    reader = TrialReader(study)
    same_as_full_reads()
    assert reader.loaded == 4
    trials[4].report(0.1, 10)  # live trials change: seen at the next read
    study.tell(trials[5], 0.3)  # a later trial finishes first
    same_as_full_reads()
    assert reader.loaded == 5
    study.tell(trials[4], 0.1)  # then an earlier one
    same_as_full_reads()
    assert reader.loaded == 6
    kept = {t.number: t for t in reader.read((S.COMPLETE,))}
    same_as_full_reads()
    assert reader.loaded == 6 and all(kept[t.number] is t for t in reader.read((S.COMPLETE,)))


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


def test_the_sampler_process_claims_and_samples_while_the_trainer_is_busy(tmp_path):
    """A pack's trials are claimed and sampled in a process of their own (TPE over a thousand
    trials: ~25 ms each; a pack refilling a thousand slots would stop the GPU for tens of
    seconds): asked trials are ready when the training process looks, without waiting for them."""
    from optuna.trial import TrialState

    from lora_exp.config import compose
    from lora_exp.pack_io import Sampler
    from lora_exp.search import SweepPlan, open_study, parse_options, top_up
    from lora_exp.sweeps import load_sweep

    url = f"sqlite:///{tmp_path}/optuna.db"
    spec = load_sweep("tiny")
    options = parse_options(["sweep=tiny", f"storage={url}"])
    plan = SweepPlan(spec, options, "s", 4, None, list(spec.base), None, compose(list(spec.base)))
    study, _ = open_study(spec, url, "s", create=True)
    top_up(study, 4)
    sampler = Sampler(plan, chunk=2, retry_s=0.5)
    try:
        sampler.ask(3)
        time.sleep(8)  # the trainer busy (its first step compiling, say): the sampler works on
        got, empty = sampler.poll()
        assert len(got) == 3 and not empty and sampler.asked == 0
        stored = {t.number: t for t in study.get_trials(deepcopy=False)}
        for trial in got:
            assert stored[trial.number].state == TrialState.RUNNING
            assert trial.params == stored[trial.number].params and set(trial.params) == set(spec.space)
            assert f"trainer.lr={trial.params['trainer.lr']!r}" in trial.overrides
        sampler.ask(3)  # one trial left to claim: then an empty answer, retried while wanted
        claimed, seen_empty = [], False
        deadline = time.time() + 60
        while not seen_empty and time.time() < deadline:
            more, seen_empty = sampler.poll(timeout=1.0)
            claimed += more
        assert len(claimed) == 1 and seen_empty and sampler.asked == 2
        top_up(study, 5)  # another trial appears (a retry, another process's top-up): it is claimed
        time.sleep(3)
    finally:
        left = sampler.close()
    assert len(left) == 1  # claimed, never taken: the caller fails it
    assert not sampler.process.is_alive()


def test_a_trial_whose_loss_goes_non_finite_fails_alone_and_the_pack_goes_on():
    """A trial at lr 1e30 fails (its loss becomes non-finite, found when the losses come back to
    the host) without touching its neighbours, which train as they do alone."""
    torch.set_num_threads(2)
    cfgs = _mixed("tiny_llama")[:3]
    cfgs[1] = compose([*cfgs[1].overrides, "trainer.lr=1e30", "trainer.max_grad_norm=null"])
    base = load_base(cfgs[0].model, torch.device("cpu"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    packed = train_packed(cfgs, base, data, slots=2)
    assert packed[1].status == "failed"
    assert not packed[1].generations.get("adapter_output")
    for i in (0, 2):
        alone = run_trial(cfgs[i], base, data, NullTracker())
        assert packed[i].status == "completed"
        assert all(_rel(x, y) <= 1e-4 for (_, x), (_, y) in zip(alone.loss_curve, packed[i].loss_curve))
        assert alone.generations["adapter_output"] == packed[i].generations["adapter_output"]


def test_a_pack_stopped_by_an_error_closes_its_finished_trials_with_their_adapters(monkeypatch):
    """Trials that finished training and wait only for their adapters to be written are closed as
    completed, adapters and all, when the pack stops on an error; the trial still training fails."""
    from types import SimpleNamespace

    from lora_exp import pack_training
    from lora_exp.pack_sweep import _stop_pack
    from lora_exp.pack_training import PackTrainer

    monkeypatch.setattr(pack_training, "ADAPTER_WRITE_S", 0.0)  # one adapter a step: the others wait
    torch.set_num_threads(2)
    cfgs = _mixed("tiny_llama")[:4]
    cfgs[3] = compose([*cfgs[3].overrides, "trainer.max_steps=3000"])  # still training at the error

    class Recorder(NullTracker):
        run_id = "run"

        def __init__(self):
            self.adapter_files, self.metrics = [], {}

        def log_dir(self, local_dir, artifact_path):
            self.adapter_files = sorted(p.name for p in Path(local_dir).iterdir())

        def log_metrics(self, metrics, step):
            self.metrics.update(metrics)

    base = load_base(cfgs[0].model, torch.device("cpu"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    trainer = PackTrainer(base, data, cfgs[0], 4, 16, sorted({m for c in cfgs for m in c.target_modules}))
    trackers = [Recorder() for _ in cfgs]
    for i, cfg in enumerate(cfgs):
        trainer.start(i, cfg, trackers[i], handle=(SimpleNamespace(number=i, _trial_id=100 + i), [], time.perf_counter()))
    try:
        for _ in range(200):
            trainer.step()
            if len(trainer.closing) >= 2:
                break
        waiting = list(trainer.closing)
        assert len(waiting) >= 2 and trainer.runs[3] is not None, "no finished trial left waiting for its adapter"
        submitted = []
        io = SimpleNamespace(submit=lambda kind, number, *args: submitted.append((kind, number, *args)))
        plan = SimpleNamespace(spec=SimpleNamespace(metrics=["eval_loss"], multi=False))
        failures = _stop_pack(plan, trainer, io, "RuntimeError: boom")
    finally:
        trainer.close()
    assert failures == 1
    finished = {number: (status, value, error) for _kind, number, _id, status, value, error, *_ in submitted}
    assert finished[3] == ("failed", None, "RuntimeError: boom")
    for run in waiting:
        status, value, error = finished[run.slot]
        assert status == "completed" and error is None and value == run.result.eval_curve[-1][1]
        assert "adapter_model.safetensors" in trackers[run.slot].adapter_files
        assert trackers[run.slot].metrics["final_eval_loss"] == value
    assert not trainer.closing and len(finished) == len(waiting) + 1


def test_the_look_ahead_counts_trials_an_eval_may_prune_soon_and_trials_ending_soon():
    """What the packed sweep samples ahead for: slots that free within a number of steps, by a
    trial's end, or by a pruner at an eval before it (the eval at the last step is its end)."""
    from lora_exp.pack_training import PackTrainer

    cfgs = [compose(["model=tiny_gpt2", *COMMON, "trainer.base_dropout=false", f"trainer.seed={s}"]) for s in (1, 2)]
    base = load_base(cfgs[0].model, torch.device("cpu"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    trainer = PackTrainer(base, data, cfgs[0], 3, 8, sorted(cfgs[0].target_modules))
    try:
        assert trainer.evals_within(10**6) == trainer.ending_within(10**6) == 0  # no trial yet
        for slot, cfg in enumerate(cfgs):
            trainer.start(slot, cfg, NullTracker())
        assert trainer.evals_within(10) == 2 and trainer.evals_within(9) == 0  # evals every 10 of 30 steps
        for _ in range(7):
            trainer.step()
        assert trainer.evals_within(3) == 2 and trainer.evals_within(2) == 0
        assert trainer.evals_within(10**6, fraction=0.1) == 2 and trainer.evals_within(10**6, fraction=0.09) == 0
        assert trainer.ending_within(23) == 2 and trainer.ending_within(22) == 0
    finally:
        trainer.close()
