"""The training loop: one trial = one adapter on a shared frozen base, reading top to bottom.

A trial is a unit of work with its own config and tracker, not a process: a sweep worker runs
many in one process on one loaded base. Training knows nothing of Optuna: a sweep passes
callbacks, and a callback that returns True from `on_eval` stops the trial (pruning).
"""
from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
import yaml

from lora_exp.adapters import attach_adapter, count_parameters, detach_adapter, train_mode, trainable_line
from lora_exp.config import RunConfig
from lora_exp.data import PreparedData, collate, train_batches
from lora_exp.errors import LoraExpError
from lora_exp.evaluation import autocast, eval_loss, generate, generations_table, score_outputs
from lora_exp.models import BaseModel
from lora_exp.tracking import Tracker, flatten

log = logging.getLogger(__name__)


class NonFiniteLoss(LoraExpError):
    """The loss became NaN or inf: the trial stops at once."""


class Callback(Protocol):
    def on_eval(self, step: int, metrics: dict[str, float]) -> bool:
        """Called after each evaluation; return True to stop the trial early."""
        ...


@dataclass
class TrialResult:
    status: str  # "completed" | "stopped" (a callback stopped it, e.g. pruned)
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    generations: dict[str, list[Any]] = field(default_factory=dict)
    run_id: str | None = None


def total_steps(cfg: RunConfig, n_train: int) -> int:
    if cfg.trainer.max_steps is not None:
        return cfg.trainer.max_steps
    assert cfg.trainer.epochs is not None
    return cfg.trainer.epochs * math.ceil(n_train / cfg.trainer.batch_size)


def warmup_steps(cfg: RunConfig, steps: int) -> int:
    w = cfg.trainer.warmup_steps
    return int(w) if w >= 1 else math.ceil(w * steps)


def run_trial(cfg: RunConfig, base: BaseModel, data: PreparedData, tracker: Tracker,
              callbacks: Sequence[Callback] = ()) -> TrialResult:
    """Attach a fresh adapter to `base`, train it, evaluate, log everything; restore the base."""
    model = attach_adapter(base, cfg)
    try:
        return _train(cfg, base, model, data, tracker, callbacks)
    finally:
        tracker.flush()
        detach_adapter(model)


def _train(cfg: RunConfig, base: BaseModel, model: Any, data: PreparedData, tracker: Tracker,
           callbacks: Sequence[Callback]) -> TrialResult:
    t = cfg.trainer
    device, pad_id = base.device, base.tokenizer.pad_token_id
    steps = total_steps(cfg, len(data.train))
    trainable, total = count_parameters(model)
    log.info(trainable_line(model))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tracker.log_params({**flatten(cfg.to_dict()), "target_modules": cfg.target_modules,
                        "trainable_params": trainable, "total_params": total, "total_steps": steps})
    tracker.set_tags({"trainable_line": trainable_line(model), "lora_exp.overrides": " ".join(cfg.overrides)})
    tracker.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")

    def evaluate() -> float | None:
        return eval_loss(model, data.validation, pad_id, device, t.eval_batch_size, t.precision)

    result = TrialResult(status="completed", steps=0)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    from transformers import get_scheduler

    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(cfg, steps),
                              num_training_steps=steps)
    batches = train_batches(data.train, t.batch_size, t.seed)
    progress = _Progress(steps)
    torch.manual_seed(t.seed)  # dropout stream: identical whether base results were cached or not
    train_mode(model, t.base_dropout)
    running = torch.zeros((), device=device)
    dropout = getattr(model, "lora_exp_dropout", None)
    count, tokens, eval_seconds, start = 0, 0, 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        batch = {k: v.to(device, non_blocking=True) for k, v in collate(next(batches), pad_id).items()}
        tokens += int(batch["attention_mask"].sum())
        if dropout is not None:
            dropout.step = step - 1  # the masks depend on (seed, step, module, row, position) only
        with autocast(device, t.precision):
            loss = model(**batch).loss
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
            tracker.log_metrics({"train_loss": value, "learning_rate": scheduler.get_last_lr()[0]}, step)
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
                    result.status = "stopped"
                    break
    seconds = time.perf_counter() - start
    progress.close()
    # The base model's eval loss is the curve's point at step 0; computed once per base (after the
    # loop, so it does not delay the first step) on the same weights with the adapter switched off.
    base_loss = _cached(base, ("eval_loss", data.key, t.precision), lambda: _without_adapter(model, evaluate))
    if base_loss is not None:
        result.metrics["base_eval_loss"] = base_loss
        tracker.log_metrics({"base_eval_loss": base_loss, "eval_loss": base_loss}, step=0)
    train_seconds = seconds - eval_seconds
    result.metrics.update({"train_runtime_s": seconds, "eval_s": eval_seconds,
                           "train_step_s": train_seconds / max(1, result.steps),
                           "train_steps_per_s": result.steps / train_seconds,
                           "train_tokens_per_s": tokens / train_seconds})
    if result.loss_curve:
        result.metrics["final_train_loss"] = result.loss_curve[-1][1]
    if result.eval_curve:
        result.metrics["final_eval_loss"] = result.eval_curve[-1][1]
    result.metrics["trainable_params"] = trainable
    result.metrics["peak_memory_mb"] = peak_memory_mb(device)
    if result.status == "completed":
        _generate_and_save(cfg, base, model, data, tracker, result)
    tracker.log_metrics(result.metrics, step=result.steps)
    return result


def _generate_and_save(cfg: RunConfig, base: BaseModel, model: Any, data: PreparedData, tracker: Tracker,
                       result: TrialResult) -> None:
    t = cfg.trainer
    base_out = _cached(base, ("generations", data.key, t.max_new_tokens),
                       lambda: _without_adapter(model, lambda: generate(model, base.tokenizer, data.prompts,
                                                                          base.device, t.max_new_tokens)))
    stats: dict[str, float] = {}
    gen_start = time.perf_counter()
    adapter_out = generate(model, base.tokenizer, data.prompts, base.device, t.max_new_tokens, stats=stats)
    seconds = time.perf_counter() - gen_start
    result.metrics["generation_s"] = seconds
    if stats.get("new_tokens"):
        result.metrics["generation_tokens_per_s"] = stats["new_tokens"] / seconds
    metrics = tuple(t.generation_metrics)
    base_scores = _cached(base, ("base_scores", data.key, t.max_new_tokens, metrics),
                          lambda: score_outputs(data.prompts, base_out, metrics))
    result.generations, means = generations_table(data.prompts, base_out, adapter_out, metrics, base_scores)
    result.metrics.update(means)
    if "exact_match" in means:
        result.metrics["exact_match_count"] = round(means["exact_match"] * sum(bool(p.answers) for p in data.prompts))
    if data.prompts:
        tracker.log_table(result.generations, "generations.json")
    if tracker.run_id is not None:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            tracker.log_dir(tmp, "adapter")


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated in this trial on CUDA; the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def seconds_since_process_start() -> float:
    """Wall time since this process started (for the start-up figure: command to first step)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def _without_adapter(model: Any, fn: Any) -> Any:
    """Run `fn` on the base model: the same weights in memory, LoRA switched off."""
    with model.disable_adapter():
        return fn()


def _cached(base: BaseModel, key: Any, compute: Any) -> Any:
    if key not in base.cache:
        base.cache[key] = compute()
    return base.cache[key]


class _Progress:
    """A tqdm bar over optimizer steps on a terminal; a log line every ~10% elsewhere (CI)."""

    def __init__(self, total: int):
        self.total = total
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 10)
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=True)
        elif step % self.every == 0 or step == self.total:
            log.info("step %d/%d  train_loss %.4f", step, self.total, loss)

    def note(self, step: int, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"step {step}/{self.total}  {text}")
        else:
            log.info("step %d/%d  %s", step, self.total, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
