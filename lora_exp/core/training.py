"""The training loop: one trial = one adapter on a shared frozen base, reading top to bottom.

A trial is a unit of work with its own config and tracker, not a process: a sweep worker runs
many in one process on one loaded base. Training knows nothing of Optuna: a sweep passes
callbacks, and a callback that returns True from `on_eval` stops the trial (pruning).
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from typing import Any, Protocol, Sequence

import torch

from lora_exp.config import RunConfig
from lora_exp.core import interrupts
from lora_exp.core.adapters import (
    attach_adapter,
    count_parameters,
    detach_adapter,
    original_base,
    save_adapter,
    train_mode,
)
from lora_exp.core.checkpoint import Checkpointer, restore, training_state
from lora_exp.core.data import PreparedData, collate, train_batches
from lora_exp.core.evaluation import autocast, eval_loss, generate, score_outputs
from lora_exp.core.loss import causal_lm_loss
from lora_exp.core.models import BaseModel
from lora_exp.core.progress import StepProgress
from lora_exp.core.recording import (
    Tracker,
    TrialResult,
    finish_metrics,
    record_generations,
    record_start,
    seconds_since_process_start,
    trainable_line,
)
from lora_exp.core.status import TrialStatus
from lora_exp.errors import LoraExpError

log = logging.getLogger(__name__)


class NonFiniteLoss(LoraExpError):
    """The loss became NaN or inf: the trial stops at once."""


class Callback(Protocol):
    def on_eval(self, step: int, metrics: dict[str, float]) -> bool:
        """Called after each evaluation; return True to stop the trial early."""
        ...


def total_steps(cfg: RunConfig, n_train: int) -> int:
    if cfg.trainer.max_steps is not None:
        return cfg.trainer.max_steps
    assert cfg.trainer.epochs is not None
    return cfg.trainer.epochs * math.ceil(n_train / cfg.trainer.batch_size)


def warmup_steps(cfg: RunConfig, steps: int) -> int:
    w = cfg.trainer.warmup_steps
    return int(w) if w >= 1 else math.ceil(w * steps)


def run_trial(cfg: RunConfig, base: BaseModel, data: PreparedData, tracker: Tracker,
              callbacks: Sequence[Callback] = (), label: str = "", position: int | None = None,
              checkpoint: Checkpointer | None = None) -> TrialResult:
    """Attach a fresh adapter to `base`, train it, evaluate, log everything; restore the base.
    `label` and `position` name the trial in progress lines and place its bar (one per worker);
    `checkpoint` keeps the training state at each eval and gives one to resume from."""
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)  # sums in the same order as the run it reruns
    model = attach_adapter(base, cfg)
    try:
        return _train(cfg, base, model, data, tracker, callbacks, StepProgress(total_steps(cfg, len(data.train)),
                                                                              label, position), checkpoint)
    finally:
        tracker.flush()
        detach_adapter(model)


def _train(cfg: RunConfig, base: BaseModel, model: Any, data: PreparedData, tracker: Tracker,
           callbacks: Sequence[Callback], progress: StepProgress, checkpoint: Checkpointer | None) -> TrialResult:
    t = cfg.trainer
    device, pad_id = base.device, base.tokenizer.pad_token_id
    steps = total_steps(cfg, len(data.train))
    trainable, total = count_parameters(model)
    log.info(trainable_line(trainable, total))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    record_start(tracker, cfg, trainable, total, steps, data.key)

    def evaluate() -> float | None:
        return eval_loss(model, data.validation, pad_id, device, t.eval_batch_size, t.precision)

    result = TrialResult(status=TrialStatus.COMPLETE, steps=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    from transformers import get_scheduler

    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(cfg, steps),
                              num_training_steps=steps)
    batches = train_batches(data.train, t.batch_size, t.seed)
    torch.manual_seed(t.seed)  # dropout stream: identical whether base results were cached or not
    train_mode(model, t.base_dropout)
    running = torch.zeros((), device=device)
    dropout = getattr(model, "lora_exp_dropout", None)
    count, tokens, eval_seconds, start = 0, 0, 0.0, time.perf_counter()
    learning_rates: list[float] = []
    first, tokens = _resume(checkpoint, steps, model, optimizer, scheduler, batches, result, learning_rates, tracker)
    if first > 1:
        progress.note(first - 1, "resumed from its checkpoint")
    for step in range(first, steps + 1):
        interrupts.check()
        batch = {k: v.to(device, non_blocking=True) for k, v in collate(next(batches), pad_id).items()}
        tokens += int(batch["attention_mask"].sum())
        if dropout is not None:
            dropout.step = step - 1  # the masks depend on (seed, step, module, row, position) only
        with autocast(device, t.precision):
            loss = causal_lm_loss(model, batch)
        loss.backward()
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach()
        count += 1
        result.steps = step
        if step == 1:
            result.metrics["startup_s"] = seconds_since_process_start()
        if step % t.logging_steps == 0 or step == steps:
            value = float(running) / count  # the one host sync per logging interval
            running.zero_()
            count = 0
            if not math.isfinite(value):
                tracker.set_tags({"failure_reason": f"non-finite train loss ({value}) at step {step}"})
                raise NonFiniteLoss(f"train loss became {value} at step {step}: trial stopped")
            result.loss_curve.append((step, value))
            learning_rates.append(scheduler.get_last_lr()[0])
            tracker.log_metrics({"train_loss": value, "learning_rate": learning_rates[-1]}, step)
            progress.update(step, value)
        if (t.eval_steps and step % t.eval_steps == 0) or step == steps:
            eval_start = time.perf_counter()
            current = evaluate()
            train_mode(model, t.base_dropout)
            eval_seconds += time.perf_counter() - eval_start
            if current is not None:
                result.eval_curve.append((step, current))
                tracker.log_metrics({"eval_loss": current}, step)
                progress.note(step, f"eval_loss {current:.4f}")
                tracker.flush()
                stop = [cb.on_eval(step, {"eval_loss": current}) for cb in callbacks]  # all see every eval
                if any(stop) and step < steps:  # a finished trial is complete, whatever the callback says
                    result.status = TrialStatus.PRUNED
                    break
                if checkpoint is not None and step < steps:
                    checkpoint.save(training_state(model, optimizer, scheduler, step, result.loss_curve,
                                                   learning_rates, result.eval_curve, tokens))
    seconds = time.perf_counter() - start
    progress.close()
    # The base model's eval loss is the curve's point at step 0; computed once per base (after the
    # loop, so it does not delay the first step) on the same weights with the adapter switched off.
    base_loss = base.cached(("eval_loss", data.key, t.precision), lambda: _without_adapter(model, evaluate),
                            "the base model's eval loss (once per base model and data)")
    finish_metrics(result, seconds, eval_seconds, tokens, trainable, device, base_loss, tracker)
    if result.status is TrialStatus.COMPLETE:
        _generate_and_save(cfg, base, model, data, tracker, result, progress.label)
        result.metrics["compute_s"] += result.metrics.get("generation_s", 0.0)
    tracker.log_metrics(result.metrics, step=result.steps)
    return result


def _resume(checkpoint: Checkpointer | None, steps: int, model: Any, optimizer: Any, scheduler: Any, batches: Any,
            result: TrialResult, learning_rates: list[float], tracker: Tracker) -> tuple[int, int]:
    """The step to start from and the tokens trained so far: after the checkpoint's step, with its
    state restored, the batches it saw skipped and what it had logged logged again into this run
    (step 1 without a checkpoint)."""
    state = checkpoint.load() if checkpoint is not None else None
    if state is None or not 0 < state["step"] < steps:
        return 1, 0
    restore(state, model, optimizer, scheduler)
    for _ in range(state["step"]):
        next(batches)
    result.loss_curve[:] = [(int(s), float(v)) for s, v in state["loss_curve"]]
    result.eval_curve[:] = [(int(s), float(v)) for s, v in state["eval_curve"]]
    learning_rates[:] = [float(lr) for lr in state["learning_rates"]]
    result.steps = int(state["step"])
    for (step, value), lr in zip(result.loss_curve, learning_rates):
        tracker.log_metrics({"train_loss": value, "learning_rate": lr}, step)
    for step, value in result.eval_curve:
        tracker.log_metrics({"eval_loss": value}, step)
    tracker.set_tags({"resumed_at_step": str(state["step"])})
    return int(state["step"]) + 1, int(state["tokens"])


def _generate_and_save(cfg: RunConfig, base: BaseModel, model: Any, data: PreparedData, tracker: Tracker,
                       result: TrialResult, progress_label: str = "") -> None:
    t = cfg.trainer
    base_out = base.cached(("generations", data.key, t.max_new_tokens),
                           lambda: _without_adapter(model, lambda: generate(model, base.tokenizer, data.prompts,
                                                                              base.device, t.max_new_tokens)),
                           f"the base model's answers to {len(data.prompts)} prompts (once per base model and data)")
    stats: dict[str, float] = {}
    log.info("%sgenerating the adapter's answers to %d prompts", f"{progress_label}: " if progress_label else "",
             len(data.prompts))
    gen_start = time.perf_counter()
    adapter_out = generate(model, base.tokenizer, data.prompts, base.device, t.max_new_tokens, stats=stats)
    seconds = time.perf_counter() - gen_start
    metrics = tuple(t.generation_metrics)
    base_scores = base.cached(("base_scores", data.key, t.max_new_tokens, metrics),
                              lambda: score_outputs(data.prompts, base_out, metrics),
                              f"the base model's scores ({', '.join(metrics)})")
    record_generations(tracker, result, data.prompts, base_out, adapter_out, metrics, base_scores, seconds,
                       int(stats.get("new_tokens", 0)))
    if tracker.run_id is not None:
        with tempfile.TemporaryDirectory() as tmp:
            save_adapter(model, tmp)
            tracker.log_dir(tmp, "adapter")


def _without_adapter(model: Any, fn: Any) -> Any:
    """Run `fn` on the base model: the same weights in memory, LoRA switched off."""
    with model.disable_adapter(), original_base(model):
        return fn()
