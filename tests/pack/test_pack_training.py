"""A trial trained in a pack of mixed trials trains exactly as it does alone, and its exported
adapter is a normal peft adapter with the same logits. CPU, tiny models, in process."""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
import weakref
from pathlib import Path

import pytest
import torch

from lora_exp.compose import compose
from lora_exp.core.data import Example, load_rows, tokenize, train_batches
from lora_exp.core.loss import LogitTransform
from lora_exp.core.models import load_base
from lora_exp.core.randomness import dropout_mask, module_keys, row_keys
from lora_exp.core.recording import NullTracker
from lora_exp.core.status import TrialStatus
from lora_exp.core.training import run_trial
from lora_exp.pack import attention
from lora_exp.pack.attention import (
    CAUSAL_ROWS,
    causal_rows_attention,
    own_attention_reason,
    pack_attention,
    padded_attention,
)
from lora_exp.pack.rows import TokenTable, batch_schedule
from lora_exp.pack.settings import PackConfig
from lora_exp.pack.trainer import train_packed

from helpers import family_model

COMMON = ["data=seed", "lora=seed", "trainer=seed", "trainer.max_steps=30", "trainer.eval_steps=10",
          "trainer.logging_steps=5", "trainer.generation_metrics=[exact_match]", "trainer.max_new_tokens=8",
          "tracking=none", "trainer.batch_size=2"]


#: trials that differ in everything a pack lets differ: rank, alpha, dropout, targets, lr,
#: clipping, seed, schedule, warmup, weight decay, length, A's init
MIXED = [["lora.r=4", "lora.lora_alpha=8", "lora.lora_dropout=0.1", "trainer.lr=1e-3"],
         ["lora.r=16", "lora.lora_alpha=16", "lora.lora_dropout=0.0", "lora.preset={all}", "trainer.lr=3e-3",
          "trainer.max_grad_norm=0.05"],
         ["lora.r=8", "lora.lora_alpha=32", "lora.lora_dropout=0.2", "lora.preset={mid}", "trainer.lr=5e-4",
          "trainer.seed=7", "trainer.lr_scheduler=cosine", "trainer.warmup_steps=5"],
         ["lora.r=2", "lora.lora_alpha=4", "lora.lora_dropout=0.05", "trainer.lr=2e-3", "trainer.seed=3",
          "trainer.max_steps=20", "trainer.weight_decay=0.1", "lora.use_rslora=true"],
         ["lora.r=8", "lora.lora_alpha=8", "lora.lora_dropout=0.3", "trainer.lr=1e-2", "trainer.seed=11",
          "trainer.lr_scheduler=constant", "trainer.max_grad_norm=null", "lora.init_lora_weights=gaussian"]]


PRESETS = {"tiny_gpt2": {"all": "all", "mid": "attn_proj", "extra": ["trainer.base_dropout=false"]},
           "tiny_llama": {"all": "all_linear", "mid": "attn", "extra": []}}


def _mixed(model: str, extra: tuple[str, ...] | list[str] = ()) -> list:
    p = PRESETS[model]
    return [compose([f"model={model}", *COMMON, *p["extra"], *extra, *(o.format(**p) for o in v)]) for v in MIXED]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_a_trial_in_a_mixed_pack_trains_exactly_as_alone(model):
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


def test_on_a_bf16_base_a_packed_trial_is_as_close_to_alone_as_bf16_rounding_lets_it():
    """`model.dtype=bf16`: the frozen base in bf16, every trial's LoRA in fp32 (peft's way: the input
    cast up before the dropout, the delta added in fp32, then rounded). A packed trial batches its
    rows with others' and computes its LoRA through bmm's, so bf16 roundings differ by an ulp here
    and there: it is held to the GPU matrix's rule, within twice the distance between the same
    trial alone on the bf16 and on the fp32 base, and it must be on the bf16 base (the loss is not
    the fp32 base's)."""
    cfgs, fp32 = _mixed("tiny_llama", ["model.dtype=bf16"]), _mixed("tiny_llama")
    base, base32 = (load_base(c[0].model, torch.device("cpu")) for c in (cfgs, fp32))
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16}
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    alone = [run_trial(c, base, data, NullTracker()) for c in cfgs]
    alone32 = [run_trial(c, base32, data, NullTracker()) for c in fp32]
    packed = train_packed(cfgs, base, data)

    def gap(a, b) -> float:
        return max(_rel(x, y) for curve in ("loss_curve", "eval_curve")
                   for (_, x), (_, y) in zip(getattr(a, curve), getattr(b, curve)))

    for cfg, a, a32, p in zip(cfgs, alone, alone32, packed):
        assert p.status == TrialStatus.COMPLETE and p.metrics["trainable_params"] == a.metrics["trainable_params"]
        assert [s for s, _ in a.loss_curve] == [s for s, _ in p.loss_curve]
        assert 0 < gap(a, p) <= 2 * gap(a, a32), (cfg.overrides, gap(a, p), gap(a, a32))
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16}  # given back as it was


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


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_a_window_shorter_than_the_rows_and_capped_scores_get_the_models_logits_through_the_packs_attention(family):
    """Mistral's sliding window (8 positions, on rows of up to 98) and Gemma 2's soft-capped scores:
    the pack's attention computes them from positions alone, with no mask from the padding, and each
    real position gets the model's own logits; without the window or the cap they differ."""
    cfg = compose([*family_model(family), "data=seed"])
    base = load_base(cfg.model, torch.device("cpu"))
    m = base.model.eval()
    table = TokenTable.build(tokenize(load_rows(cfg.data), cfg.data, base.tokenizer).train,
                             base.tokenizer.pad_token_id, torch.device("cpu"))
    longest, real = table.ids.shape[1], table.mask.bool()
    attentions = [x for x in m.modules() if hasattr(x, "attn_logit_softcapping")]
    window = m.config.sliding_window
    with torch.no_grad():
        theirs = m(input_ids=table.ids, attention_mask=table.mask).logits
        if family == "mistral":
            assert m.config.sliding_window < longest
            m.config.sliding_window = None
        for x in attentions:
            x.attn_logit_softcapping = None
        plain = m(input_ids=table.ids, attention_mask=table.mask).logits
        m.config.sliding_window = window
        for x in attentions:
            x.attn_logit_softcapping = m.config.attn_logit_softcapping
        assert not torch.allclose(plain[real], theirs[real], atol=1e-3)
        own = causal_rows_attention(m, longest=longest)
        assert own is not None and m.config._attn_implementation == CAUSAL_ROWS
        ours = m(input_ids=table.ids, attention_mask=table.mask).logits
        m.set_attn_implementation(own)
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


def test_a_window_the_model_applies_only_through_its_masks_keeps_the_models_attention():
    """Where rows are longer than the window, the probe runs past it: a model whose attention
    layers do not pass their window on (Mistral's, made to apply it through its masks alone) keeps
    its own attention, which a probe shorter than the window would not find."""
    cfg = compose([*family_model("mistral"), "model.architecture.sliding_window=16", "data=seed"])
    m = load_base(cfg.model, torch.device("cpu")).model
    assert pack_attention(m, longest=98)
    for layer in m.model.layers:
        layer.self_attn.config = copy.copy(m.config)
        layer.self_attn.config.sliding_window = None
    attention._PROBED.clear()  # the model changed under the probe's answer
    assert not pack_attention(m, longest=98)
    assert pack_attention(m, longest=16)  # rows no longer than the window: it masks nothing


@pytest.mark.parametrize("family", ["gpt_oss", "qwen2"])
def test_a_model_whose_attention_does_more_than_the_packs_keeps_its_own(family, monkeypatch):
    """GPT-OSS adds a learned sink to each head's softmax, which no config key names: the pack's
    attention refuses what it does not do, and the probe (both models' logits on a few tokens)
    finds it on its own. The check leaves the model, its modes and the random state as they were."""
    base = load_base(compose([*family_model(family), "data=seed"]).model, torch.device("cpu"))
    m = base.model.train()
    own, rng = m.config._attn_implementation, torch.get_rng_state()
    reason = own_attention_reason(m, longest=64)
    assert (reason is None) == (family == "qwen2")
    assert family == "qwen2" or "for attention sinks (s_aux)" in reason
    monkeypatch.setattr(attention, "_NOT_DONE", {})  # the probe alone (not its answer from before)
    monkeypatch.setattr(attention, "_PROBED", weakref.WeakKeyDictionary())
    reason = own_attention_reason(m, longest=64)
    assert (reason is None) == (family == "qwen2")
    assert family == "qwen2" or "on 12 tokens its logits through the pack's attention are up to" in reason
    assert m.config._attn_implementation == own and all(x.training for x in m.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    forwards = []
    m.register_forward_pre_hook(lambda *_: forwards.append(1))
    assert own_attention_reason(m, longest=64) == reason and not forwards  # asked again: answered from before


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


class _Logged(NullTracker):
    """What a trial logs at its highest step (its final metrics)."""

    def __init__(self):
        self.last, self.last_step = {}, -1

    def log_metrics(self, metrics, step):
        if step > self.last_step:
            self.last, self.last_step = {}, step
        if step == self.last_step:
            self.last.update(metrics)


def test_trials_that_hold_for_evals_and_generations_while_others_train_train_exactly_as_alone(monkeypatch):
    """Out of step (2 slots, trials of 20 and 30 steps), a slot whose eval is due holds still while
    the other trains, is evaluated a few steps later with others, and goes on, stops (a callback),
    or waits for its generations: every trial's curves, evals and generations are those it has
    alone, and a trial stopped at an eval ends there."""
    from lora_exp.pack import trainer as pack_training
    from lora_exp.pack.trainer import PackTrainer

    monkeypatch.setattr(pack_training, "EVAL_GATHER_STEPS", 3)
    monkeypatch.setattr(pack_training, "FINISH_GATHER_STEPS", 4)
    cfgs = _mixed("tiny_llama")
    cfgs = [cfgs[3], cfgs[0], cfgs[1], cfgs[2], cfgs[4]]  # 20 steps first: the next trial starts out of step
    stops = {3: 20}  # the fourth trial is stopped at its eval of step 20 (of 30)
    base = load_base(cfgs[0].model, torch.device("cpu"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    logged_alone = [_Logged() for _ in cfgs]
    alone = [run_trial(c, base, data, logged_alone[i], [_StopAt(stops[i])] if i in stops else [])
             for i, c in enumerate(cfgs)]
    logged = [_Logged() for _ in cfgs]
    trainer = PackTrainer(base, data, cfgs[0], 2, 16, sorted({m for c in cfgs for m in c.target_modules}))
    results, queue = {}, list(enumerate(cfgs))
    try:
        while queue or trainer.busy():
            for slot in trainer.free_slots():
                if queue:
                    i, cfg = queue.pop(0)
                    trainer.start(slot, cfg, logged[i], [_StopAt(stops[i])] if i in stops else [], handle=i)
            for run in trainer.step():
                results[run.handle] = run.result
    finally:
        trainer.close()
    for i in range(len(cfgs)):  # every metric a trial alone logs, at its last step too (the pruned one's);
        # startup_s (the process's start to a trial's first step) is the pack's, in its summary
        assert set(logged[i].last) - {"pack_slots"} == set(logged_alone[i].last) - {"startup_s"}, (i, logged[i].last)
        assert logged[i].last_step == logged_alone[i].last_step == results[i].steps
    assert "compute_s" in logged[3].last and results[3].status is TrialStatus.PRUNED
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
    assert results[3].status is TrialStatus.PRUNED and results[3].loss_curve[-1][0] == 20


@pytest.mark.parametrize("mode, layers, graphs", [("full", 2, 1), ("layers", 4, 2)])
def test_the_compiled_step_trains_as_the_eager_one_through_slot_reuse_without_recompiling(mode, layers, graphs):
    """pack.compile=full compiles the whole training step once (2 layers: its compile time grows
    with them); `layers` compiles the 4 decoder layers into one graph (the first layer's input
    requires grad as the others' do) and one for the loss's chunks: 5 trials through 2 slots
    (slots freed and re-assigned, dropout on and off) give the eager curves and generations, and
    no graph is compiled again."""
    import torch._dynamo

    cfgs = _mixed("tiny_gpt2", [f"model.architecture.n_layer={layers}"])
    base = load_base(cfgs[0].model, torch.device("cpu"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    eager = train_packed([dataclasses.replace(c, pack=PackConfig(compile="off")) for c in cfgs], base, data, slots=2)
    cfgs = [dataclasses.replace(c, pack=PackConfig(compile=mode)) for c in cfgs]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train_packed(cfgs, base, data, slots=2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    for a, b in zip(eager, compiled):
        assert [s for s, _ in a.loss_curve] == [s for s, _ in b.loss_curve]
        assert all(_rel(x, y) <= 1e-4 for (_, x), (_, y) in zip(a.loss_curve, b.loss_curve))
        assert a.generations["adapter_output"] == b.generations["adapter_output"]


def test_the_bf16_compute_copy_holds_what_autocast_would_cast_the_master_weights_to():
    """A bf16 pack's forward reads a bf16 copy of the LoRA weights that the optimizer keeps: the
    losses and updated fp32 weights are those of casting the fp32 weights at every use (CPU
    autocast here; on CUDA the Triton kernel writes the copy)."""
    from lora_exp.pack.model import PackedModel
    from lora_exp.pack.optimizer import optimizer_step
    from lora_exp.pack.rows import TokenTable, slot_losses
    from lora_exp.pack.slots import slot_spec

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
            optimizer_step(pm)
            losses.append(loss.detach().clone())
        if low:
            assert torch.equal(pm.low, pm.params.to(torch.bfloat16))
        runs.append((torch.stack(losses), pm.params.clone()))
        pm.close()
    (loss_a, params_a), (loss_b, params_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(params_a, params_b)
    assert not torch.equal(loss_a[0], loss_a[-1])  # it trained


def test_the_head_makes_logits_only_from_each_rows_first_scored_position_with_the_same_losses_and_gradients():
    """With answer-only loss a row's prompt and padding are not scored: the pack's head makes
    logits for each row's `span` positions from its first scored one (a fixed count a row), and
    each slot's loss and the gradients behind it are those of the logits at every position."""
    import lora_exp.pack.rows as rows_module
    from lora_exp.pack.rows import OutputHead, slot_losses

    cfg = compose(["model=tiny_llama", "data=qa_demo", "tracking=none", "trainer.batch_size=2"])
    base = load_base(cfg.model, torch.device("cpu"))
    data = tokenize(load_rows(cfg.data), cfg.data, base.tokenizer)
    table = TokenTable.build(data.train, base.tokenizer.pad_token_id, torch.device("cpu"))
    positions = table.ids.shape[1] - 1
    assert 0 < table.span < positions and int(table.first.max()) > 0, (table.span, positions)
    head = OutputHead(base.model, torch.float32)
    norm = base.model.get_decoder().norm.weight
    norm.requires_grad_(True)
    made, real = [], rows_module.head_token_losses

    def counted(hidden, *args, **kwargs):  # the rows the head makes logits for
        made.append(hidden.shape[0])
        return real(hidden, *args, **kwargs)

    rows_module.head_token_losses = counted
    try:
        idx = torch.tensor([0, 5, 17, 40, 41, 90])
        results = []
        for first, span in ((None, 0), (table.first[idx], table.span)):
            norm.grad = None
            losses = slot_losses(base.model, table.ids[idx], table.mask[idx], table.labels[idx], 3, 2, head,
                                 first=first, span=span)
            losses.sum().backward()
            results.append((losses.detach(), norm.grad.clone()))
    finally:
        rows_module.head_token_losses = real
        norm.requires_grad_(False)
    assert made == [6 * positions, 6 * table.span]
    (full_loss, full_grad), (loss, grad) = results
    assert torch.allclose(loss, full_loss, rtol=1e-6, atol=0), (loss, full_loss)
    assert torch.allclose(grad, full_grad, rtol=1e-5, atol=1e-9), (grad - full_grad).abs().max()
    assert full_grad.abs().sum() > 0


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


@pytest.mark.parametrize("n,batch,seed,steps",
                         [(5, 1, 42, 2500), (5, 2, 3, 31), (7, 3, 1, 10), (4, 4, 0, 3), (4, 2, 9, 0)])
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


def test_a_trial_whose_loss_goes_non_finite_fails_alone_and_the_pack_goes_on():
    """A trial at lr 1e30 fails (its loss becomes non-finite, found when the losses come back to
    the host) without touching its neighbours, which train as they do alone."""
    cfgs = _mixed("tiny_llama")[:3]
    cfgs[1] = compose([*cfgs[1].overrides, "trainer.lr=1e30", "trainer.max_grad_norm=null"])
    base = load_base(cfgs[0].model, torch.device("cpu"))
    data = tokenize(load_rows(cfgs[0].data), cfgs[0].data, base.tokenizer)
    packed = train_packed(cfgs, base, data, slots=2)
    assert packed[1].status is TrialStatus.FAIL
    assert not packed[1].generations.get("adapter_output")
    for i in (0, 2):
        alone = run_trial(cfgs[i], base, data, NullTracker())
        assert packed[i].status is TrialStatus.COMPLETE
        assert all(_rel(x, y) <= 1e-4 for (_, x), (_, y) in zip(alone.loss_curve, packed[i].loss_curve))
        assert alone.generations["adapter_output"] == packed[i].generations["adapter_output"]


def test_a_pack_stopped_by_an_error_closes_its_finished_trials_with_their_adapters(monkeypatch):
    """Trials that finished training and wait only for their adapters to be written are closed as
    completed, adapters and all, when the pack stops on an error; the trial still training fails."""
    from types import SimpleNamespace

    from lora_exp.pack import trainer as pack_training
    from lora_exp.pack.trainer import PackTrainer
    from lora_exp.pack.worker import stop_pack

    monkeypatch.setattr(pack_training, "ADAPTER_WRITE_S", 0.0)  # one adapter a step: the others wait
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
        handle = (SimpleNamespace(number=i, _trial_id=100 + i), [], time.perf_counter())
        trainer.start(i, cfg, trackers[i], handle=handle)
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
        failures = stop_pack(plan, trainer, io, "RuntimeError: boom")
    finally:
        trainer.close()
    assert failures == 1
    finished = {number: (o.status, o.value, o.error) for _kind, number, o in submitted}
    assert finished[3] == (TrialStatus.FAIL, None, "RuntimeError: boom")
    for run in waiting:
        status, value, error = finished[run.slot]
        assert status is TrialStatus.COMPLETE and error is None and value == run.result.eval_curve[-1][1]
        assert "adapter_model.safetensors" in trackers[run.slot].adapter_files
        assert trackers[run.slot].metrics["final_eval_loss"] == value
    assert not trainer.closing and len(finished) == len(waiting) + 1


def test_the_look_ahead_counts_trials_an_eval_may_prune_soon_and_trials_ending_soon():
    """What the packed sweep samples ahead for: slots that free within a number of steps, by a
    trial's end, or by a pruner at an eval before it (the eval at the last step is its end)."""
    from lora_exp.pack.trainer import PackTrainer

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


@pytest.mark.parametrize("vocab, transform", [(257, None), (1000, None), (257, LogitTransform(scale=0.125)),
                                              (1000, LogitTransform(softcap=1.0))])
def test_the_head_loss_in_chunks_is_cross_entropy_and_its_gradient(monkeypatch, vocab, transform):
    """The pack's loss through its frozen head, a few rows at a time (never the whole batch's
    logits), gives what cross_entropy over all the logits gives: each position's loss (0 where
    the target is ignored) and the hidden states' gradient under any weights of the losses; also
    where the model scales its logits or soft-caps them (a cap of 1 against logits of up to 3: tanh
    far from linear)."""
    from lora_exp.pack import rows

    torch.manual_seed(0)
    monkeypatch.setattr(rows, "HEAD_CHUNK_BYTES", 4 * vocab * 64)  # 64 rows a chunk: 5 chunks, the last short
    head = torch.nn.Linear(16, vocab, bias=True)
    out = rows.OutputHead(type("M", (), {"get_output_embeddings": lambda self: head})(), torch.float32, transform)
    hidden = torch.randn(300, 16, dtype=torch.float64).float().requires_grad_()
    target = torch.randint(0, vocab, (300,))
    target[::7] = -100
    weights = torch.rand(300)
    got = rows.head_token_losses(hidden, out, target)
    (got * weights).sum().backward()
    got_grad, hidden.grad = hidden.grad.clone(), None
    logits = head(hidden) * (transform.scale if transform else 1.0)
    if transform and transform.softcap:
        assert logits.abs().max() > 2 * transform.softcap
        logits = torch.tanh(logits / transform.softcap) * transform.softcap
    want = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="none")
    (want * weights).sum().backward()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert (got[::7] == 0).all()
    assert torch.allclose(got_grad, hidden.grad, rtol=1e-5, atol=1e-7)
