"""A tiny model trained end to end into a real (temporary) MLflow store."""
from __future__ import annotations

import json

import pytest
import torch

from lora_exp.compose import compose
from lora_exp.core.adapters import attach_adapter, count_parameters, detach_adapter
from lora_exp.core.data import load_rows, tokenize
from lora_exp.core.evaluation import eval_loss, generate
from lora_exp.core.models import load_base
from lora_exp.core.recording import NullTracker, trainable_line
from lora_exp.core.status import TrialStatus
from lora_exp.core.training import NonFiniteLoss, run_trial
from lora_exp.tracking.runs import start_run

from helpers import TINY


def setup_trial(overrides):
    cfg = compose(overrides)
    base = load_base(cfg.model, torch.device("cpu"))
    return cfg, base, tokenize(load_rows(cfg.data), cfg.data, base.tokenizer)


def test_gpt2_full_size_parameter_counts_match_the_blog():
    cfg = compose(["model=gpt2", "model.source=random", "model.tokenizer=byte", "lora=seed", "trainer=seed",
                   "data=seed"])
    base = load_base(cfg.model, torch.device("cpu"))
    assert sum(p.numel() for p in base.model.parameters()) == 124_439_808
    model = attach_adapter(base, cfg)
    line = trainable_line(*count_parameters(model))
    assert line == "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"
    detach_adapter(model)
    assert sum(p.numel() for p in base.model.parameters()) == 124_439_808


def test_tiny_run_end_to_end_into_mlflow(store):
    from mlflow.tracking import MlflowClient

    cfg, base, data = setup_trial(TINY + [f"tracking.uri={store}"])
    with start_run(cfg.tracking, run_name="tiny") as tracker:
        result = run_trial(cfg, base, data, tracker)
    curve = [v for _, v in result.loss_curve]
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5, "loss goes down on the seed data"
    assert result.metrics["final_eval_loss"] < result.metrics["base_eval_loss"]

    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "8" and run.data.params["trainer.lr"] == "0.01"
    assert int(run.data.params["trainable_params"]) > 0 and int(run.data.params["total_params"]) > 0
    assert run.data.tags["lora_exp.overrides"] == " ".join(cfg.overrides)
    assert "mlflow.source.git.commit" in run.data.tags and "version.torch" in run.data.tags
    history = client.get_metric_history(tracker.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 31)), "one point per logging step"
    assert [m.value for m in history] == pytest.approx(curve)
    evals = client.get_metric_history(tracker.run_id, "eval_loss")
    assert sorted(m.step for m in evals) == [0, 10, 20, 30]
    assert len(client.get_metric_history(tracker.run_id, "learning_rate")) == 30

    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "generations.json", "adapter"} <= artifacts
    adapter_files = {a.path for a in client.list_artifacts(tracker.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= adapter_files
    table = json.loads(open(client.download_artifacts(tracker.run_id, "generations.json")).read())
    assert table["columns"][:4] == ["prompt", "expected", "base_output", "adapter_output"]
    assert {"exact_match", "token_f1", "rouge_l", "base_exact_match", "base_token_f1", "base_rouge_l"} \
        <= set(table["columns"])
    for key in ("exact_match", "token_f1", "rouge_l", "base_rouge_l", "generation_tokens_per_s", "peak_memory_mb",
                "train_tokens_per_s"):
        assert key in run.data.metrics
    assert len(table["data"]) == 6

    # The logged adapter reloads onto a fresh base and reproduces the run's eval loss and generations.
    from peft import PeftModel

    fresh = load_base(cfg.model, torch.device("cpu"))
    reloaded = PeftModel.from_pretrained(fresh.model, client.download_artifacts(tracker.run_id, "adapter"))
    again = eval_loss(reloaded, data.validation, fresh.tokenizer.pad_token_id, fresh.device)
    assert again == pytest.approx(result.metrics["final_eval_loss"], rel=1e-6)
    assert generate(reloaded, fresh.tokenizer, data.prompts, fresh.device, 8) == result.generations["adapter_output"]


def test_trials_share_one_base_and_are_reproducible():
    cfg, base, data = setup_trial(TINY)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    first = run_trial(cfg, base, data, NullTracker())
    second = run_trial(cfg, base, data, NullTracker())  # base results now cached
    assert first.loss_curve == second.loss_curve, "same config + seed = identical curve on CPU"
    after = base.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    other = run_trial(compose(TINY + ["lora.r=4", "trainer.seed=7"]), base, data, NullTracker())
    assert other.loss_curve != first.loss_curve


def test_callback_can_stop_a_trial_early():
    cfg, base, data = setup_trial(TINY)

    class StopAtFirstEval:
        seen: list[int] = []

        def on_eval(self, step, metrics):
            self.seen.append(step)
            return True

    result = run_trial(cfg, base, data, NullTracker(), callbacks=[StopAtFirstEval()])
    assert result.status is TrialStatus.PRUNED and result.steps == 10 and StopAtFirstEval.seen == [10]


def test_non_finite_loss_stops_the_trial_and_marks_the_run_failed(store):
    from mlflow.tracking import MlflowClient

    cfg, base, data = setup_trial(TINY + [f"tracking.uri={store}", "trainer.lr=1e30", "trainer.max_grad_norm=null"])
    with pytest.raises(NonFiniteLoss):
        with start_run(cfg.tracking) as tracker:
            run_trial(cfg, base, data, tracker)
    run = MlflowClient(store).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert "non-finite" in run.data.tags["failure_reason"]


def test_llama_architecture_trains():
    cfg, base, data = setup_trial(TINY + ["model=tiny_llama", "lora.preset=all_linear"])
    result = run_trial(cfg, base, data, NullTracker())
    assert result.metrics["final_eval_loss"] < result.metrics["base_eval_loss"]


def test_a_prompt_longer_than_the_models_positions_is_cut_and_generates():
    """A 10k-character question (512 positions on tiny_gpt2): cut to its last tokens, it
    generates (uncut it crashed in the position embedding with an IndexError)."""
    from lora_exp.core.data import Prompt
    from lora_exp.core.evaluation import encode_prompts, max_positions, prompt_budget

    cfg, base, _ = setup_trial(TINY)
    question = "why? " * 2000
    prompts = [Prompt(text=f"Q: {question}\nA:", question=question, answers=("x",)), Prompt("Q: hi\nA:", "hi", ("x",))]
    budget = prompt_budget(base.model, 8)
    assert budget == max_positions(base.model) - 8 == 504
    enc = encode_prompts(base.tokenizer, [p.text for p in prompts], budget)
    assert enc["input_ids"].shape[1] == budget
    assert base.tokenizer.decode(enc["input_ids"][0][-3:]) == "\nA:", "the end of the prompt is kept"
    out = generate(base.model, base.tokenizer, prompts, torch.device("cpu"), max_new_tokens=8)
    assert len(out) == 2
    with pytest.raises(IndexError):
        generate_uncut = encode_prompts(base.tokenizer, [prompts[0].text], None)
        base.model.generate(**generate_uncut, max_new_tokens=8, do_sample=False,
                            pad_token_id=base.tokenizer.pad_token_id)
