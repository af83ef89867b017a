"""pack=auto on a GPU: one slot's memory is measured and K follows from it (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from lora_exp.compose import compose
from lora_exp.core.data import load_rows, tokenize
from lora_exp.core.models import load_base
from lora_exp.pack.sizing import HEADROOM, choose_slots, heaviest, measure_slot_memory, pack_peak

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_pack_auto_sizes_the_pack_from_one_slots_measured_memory():
    cfg = compose(["model=tiny_llama", "data=seed", "trainer.precision=bf16", "trainer.batch_size=4",
                   "trainer.generation_metrics=[exact_match]"])
    base = load_base(cfg.model, torch.device("cuda"))
    data = tokenize(load_rows(cfg.data), cfg.data, base.tokenizer)
    modules = cfg.model.target_presets["all_linear"]
    memory = measure_slot_memory(base, data, cfg, 16, modules)
    assert 0 < memory.per_slot < 2**30 and memory.free > 0
    k, why = choose_slots(base, data, cfg, 16, modules, trials=12)
    assert k == 12 and why.startswith("pack=auto: 12 slots (limited by the trials to run)"), why
    # K from the memory (or the cap) when the trials do not limit it
    k, why = choose_slots(base, data, cfg, 16, modules, trials=10**9)
    assert 12 < k <= 1024 and ("limited by GPU memory" in why or "limited by the 1024-slot cap" in why), why
    assert memory.holds() <= memory.free * HEADROOM / memory.per_slot


def test_the_probes_of_a_compiled_pack_measure_at_least_what_its_compiled_step_keeps():
    """A `layers` pack is probed on its own step (the LoRA kernels) with its layers eager: less
    than the eager step's bmm's keep, never less than the compiled step keeps a slot."""
    import dataclasses

    from lora_exp.pack.settings import PackConfig

    cfg = compose(["model=tiny_llama", "data=seed", "trainer.precision=bf16", "trainer.batch_size=4",
                   "trainer.generation_metrics=[exact_match]"])
    base = load_base(cfg.model, torch.device("cuda"))
    data = tokenize(load_rows(cfg.data), cfg.data, base.tokenizer)
    modules = cfg.model.target_presets["all_linear"]
    kernels = measure_slot_memory(base, data, cfg, 16, modules, "layers")
    eager = measure_slot_memory(base, data, cfg, 16, modules, "off")
    assert kernels.kernels and not eager.kernels
    assert kernels.per_slot < eager.per_slot
    heavy = dataclasses.replace(heaviest(cfg, 16, modules), pack=PackConfig(compile="layers"))
    peaks = [pack_peak(base, data, heavy, k, 16, modules, "layers") for k in (2, 6)]
    compiled = (peaks[1] - peaks[0]) / 4
    assert 0 < compiled <= kernels.per_slot, (compiled, kernels.per_slot, eager.per_slot)


#: trials that differ in rank, targets, dropout, lr, schedule and length (20 or 30 steps), so that
#: slots are reused out of step and some hold for their evals while the others train
GRAPH_TRIALS = [["lora.r=4", "lora.lora_dropout=0.1", "trainer.lr=1e-3"],
                ["lora.r=16", "lora.preset={all}", "trainer.lr=3e-3", "trainer.max_grad_norm=0.05"],
                ["lora.r=8", "lora.lora_dropout=0.2", "trainer.seed=7", "trainer.lr_scheduler=cosine",
                 "trainer.max_steps=20"],
                ["lora.r=2", "lora.lora_dropout=0.05", "trainer.lr=2e-3", "trainer.seed=3", "trainer.max_steps=20"],
                ["lora.r=8", "lora.lora_dropout=0.3", "lora.preset={all}", "trainer.lr=1e-2", "trainer.seed=11"]]
ALL = {"tiny_gpt2": "all", "tiny_llama": "all_linear"}


def _train(cfgs: list, base, data, slots: int, compile: str) -> tuple[list, object]:
    import dataclasses

    from lora_exp.core.recording import NullTracker
    from lora_exp.pack.settings import PackConfig
    from lora_exp.pack.trainer import PackTrainer

    cfgs = [dataclasses.replace(c, pack=PackConfig(compile=compile)) for c in cfgs]
    trainer = PackTrainer(base, data, cfgs[0], slots, 16, sorted({m for c in cfgs for m in c.target_modules}))
    results, queue = {}, list(enumerate(cfgs))
    try:
        while queue or trainer.busy():
            for slot in trainer.free_slots():
                if queue:
                    i, cfg = queue.pop(0)
                    trainer.start(slot, cfg, NullTracker(), handle=i)
            for run in trainer.step():
                results[run.handle] = run.result
    finally:
        trainer.close()
    return [results[i] for i in range(len(cfgs))], trainer


@pytest.mark.parametrize("model, precision, tol", [("tiny_gpt2", "fp32", 1e-5), ("tiny_llama", "bf16", 2e-3)])
def test_the_step_replayed_as_a_cuda_graph_trains_as_the_compiled_layers(model, precision, tol, monkeypatch):
    """pack.compile=graphs records the step once and replays it while trials come and go, hold
    for their evals and resume: the curves and generations of `layers`, the step recorded once."""
    from lora_exp.pack import trainer as pack_trainer

    monkeypatch.setattr(pack_trainer, "EVAL_GATHER_STEPS", 3)  # evals held while the others train
    monkeypatch.setattr(pack_trainer, "FINISH_GATHER_STEPS", 4)
    common = [f"model={model}", "data=seed", "lora=seed", "trainer=seed", "trainer.max_steps=30",
              "trainer.eval_steps=10", "trainer.logging_steps=5", "trainer.batch_size=2",
              "trainer.generation_metrics=[exact_match]", "trainer.max_new_tokens=8", "tracking=none",
              f"trainer.precision={precision}", "trainer.base_dropout=false"]
    cfgs = [compose([*common, *(o.format(all=ALL[model]) for o in t)]) for t in GRAPH_TRIALS]
    base = load_base(cfgs[0].model, torch.device("cuda"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    layers, _ = _train(cfgs, base, data, 3, "layers")
    graphs, trainer = _train(cfgs, base, data, 3, "graphs")
    assert trainer.stepper.graph.recorded == 1 and trainer.stepper.graph.replays > 40, vars(trainer.stepper.graph)
    assert trainer.held_slot_steps > 0  # slots held while the others trained
    rel = lambda a, b: abs(a - b) / max(abs(a), 1e-12)  # noqa: E731
    for cfg, a, b in zip(cfgs, layers, graphs):
        assert (a.status, a.steps) == (b.status, b.steps), cfg.overrides
        assert [s for s, _ in a.loss_curve] == [s for s, _ in b.loss_curve], cfg.overrides
        assert max(rel(x, y) for (_, x), (_, y) in zip(a.loss_curve, b.loss_curve)) <= tol, cfg.overrides
        assert max(rel(x, y) for (_, x), (_, y) in zip(a.eval_curve, b.eval_curve)) <= tol, cfg.overrides
        assert a.loss_curve[0][1] != a.loss_curve[-1][1]  # it trained
        if precision == "fp32":
            assert a.generations["adapter_output"] == b.generations["adapter_output"], cfg.overrides


def test_a_checkpoint_and_a_finished_row_hold_the_slot_as_it_was_though_the_slot_moves_on_at_once():
    """`checkpoints.capture` and `Finisher.rows_to_host` queue their copies behind the step in
    flight and return without waiting: what lands is the slot at that point, not what the steps
    queued after it make of the slot (they run before the copies would otherwise be read)."""
    from lora_exp.core.recording import NullTracker
    from lora_exp.pack import checkpoints
    from lora_exp.pack.trainer import PackTrainer

    common = ["model=tiny_gpt2", "data=seed", "lora=seed", "trainer=seed", "trainer.max_steps=30",
              "trainer.eval_steps=10", "trainer.generation_metrics=[exact_match]", "tracking=none"]
    cfgs = [compose([*common, "lora.r=4"]), compose([*common, "lora.r=16", "lora.preset=all"])]
    base = load_base(cfgs[0].model, torch.device("cuda"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    modules = sorted({m for c in cfgs for m in c.target_modules})
    trainer = PackTrainer(base, data, cfgs[0], 2, 16, modules, compile="off")
    try:
        runs = [trainer.start(slot, cfg, NullTracker(), handle=slot) for slot, cfg in enumerate(cfgs)]
        for _ in range(5):
            trainer.step()
        pm = trainer.pm
        torch.cuda.synchronize()
        before = [[buf[run.slot, pm.columns(run.slot)].cpu() for buf in (pm.params, pm.exp_avg, pm.exp_avg_sq)]
                  for run in runs]
        adapters = [pm.adapter_state(run.slot) for run in runs]
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):  # the GPU busy for a while: the copies below are queued behind it
            big = big @ big / 64
        captured = [checkpoints.capture(pm, run, 5) for run in runs]
        rows, ready = trainer.finisher.rows_to_host([run.slot for run in runs])
        for buf in (pm.params, pm.exp_avg, pm.exp_avg_sq):  # the slots move on
            buf.add_(1.0)
        assert ready is not None and captured[0].ready is not None
        for run, c, want, adapter in zip(runs, captured, before, adapters):
            state = checkpoints.state_of(c)
            assert state["columns"] == want[0].numel() == rows[run.slot].numel()
            for key, w in zip(("params", "exp_avg", "exp_avg_sq"), want):
                assert torch.equal(state[key], w), key
            ready.synchronize()
            got = pm.adapter_state(run.slot, rows[run.slot], run.spec)
            assert got.keys() == adapter.keys() and all(torch.equal(got[k], adapter[k]) for k in got)
        # what each trains: r 4 on attention alone, against r 16 on every module (the pack's whole row)
        assert rows[runs[0].slot].numel() < rows[runs[1].slot].numel() == pm.params.shape[1]
    finally:
        trainer.close()
