"""Eval loss on answer tokens, greedy generations (base vs adapter on ONE model), exact match."""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from lora_exp.core import interrupts
from lora_exp.core.data import Example, Prompt, collate
from lora_exp.core.loss import causal_lm_loss

log = logging.getLogger(__name__)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when asked; fp32 everywhere else."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def eval_loss(model: Any, examples: list[Example], pad_id: int, device: torch.device,
              batch_size: int = 16, precision: str = "fp32") -> float | None:
    """Mean loss per answer token over `examples` (token-weighted, so batching does not matter)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        interrupts.check()
        batch = collate(examples[start:start + batch_size], pad_id, field="answer_labels")
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n == 0:
            continue
        with autocast(device, precision):
            loss = causal_lm_loss(model, batch)
        total += float(loss) * n
        tokens += n
    model.train(was_training)
    return total / tokens if tokens else None


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[Prompt], device: torch.device,
             max_new_tokens: int = 32, batch_size: int = 16, stats: dict[str, float] | None = None) -> list[str]:
    """Greedy continuations of each prompt (left-padded batches), stopped at EOS.

    `stats`, if given, receives the number of generated tokens (EOS included) under "new_tokens"."""
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    budget = prompt_budget(model, max_new_tokens)
    try:
        for start in range(0, len(prompts), batch_size):
            interrupts.check()
            texts = [p.text for p in prompts[start:start + batch_size]]
            enc = encode_prompts(tokenizer, texts, budget).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            if stats is not None:
                stats["new_tokens"] = stats.get("new_tokens", 0) + int(new_tokens(new, tokenizer.eos_token_id).sum())
            outputs.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def max_positions(model: Any) -> int | None:
    """The longest sequence the model's position embeddings take (None: no limit it states)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_budget(model: Any, max_new_tokens: int) -> int | None:
    """How many prompt tokens leave room for `max_new_tokens` within the model's positions."""
    limit = max_positions(model)
    return None if limit is None else max(1, limit - max_new_tokens)


def encode_prompts(tokenizer: Any, texts: list[str], budget: int | None) -> Any:
    """Left-padded prompts, each cut to its last `budget` tokens (the end of a prompt is what the
    answer continues): a prompt longer than the model's positions would crash generation."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    if budget is not None and enc["input_ids"].shape[1] > budget:
        log.warning("%d prompt(s) longer than %d tokens: cut to their last %d (the model's positions minus "
                    "max_new_tokens)", int((enc["attention_mask"].sum(dim=1) > budget).sum()), budget, budget)
        side = tokenizer.truncation_side
        tokenizer.truncation_side = "left"
        try:
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False, truncation=True,
                            max_length=budget)
        finally:
            tokenizer.truncation_side = side
    return enc


def new_tokens(new: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Generated tokens per row, up to and including the first EOS."""
    is_eos = (new == eos_id).int()
    return ((is_eos.cumsum(dim=1) - is_eos) == 0).sum(dim=1)


def exact_match(output: str, answers: tuple[str, ...]) -> bool:
    """The generated answer equals one of the references (whitespace-normalised)."""
    from lora_exp.core.metrics import exact_match as score

    return bool(score(output, answers))


def generations_table(prompts: list[Prompt], base: list[str], adapter: list[str],
                      metrics: tuple[str, ...] | list[str] = ("exact_match",),
                      base_scores: dict[str, list[float]] | None = None) -> tuple[dict[str, list[Any]],
                                                                                  dict[str, float]]:
    """The side-by-side table logged with each run, and the mean score of each metric over the
    prompts that have reference answers (adapter: `<metric>`, base model: `base_<metric>`).
    `base_scores` (from `score_outputs`) lets a sweep score the base model once per study."""
    table: dict[str, list[Any]] = {"prompt": [p.text for p in prompts],
                                   "expected": [" | ".join(p.answers) for p in prompts],
                                   "base_output": base, "adapter_output": adapter}
    scored = [i for i, p in enumerate(prompts) if p.answers]
    means: dict[str, float] = {}
    sides = (("base_", base_scores if base_scores is not None else score_outputs(prompts, base, metrics)),
             ("", score_outputs(prompts, adapter, metrics)))
    for side, scores in sides:
        for metric in metrics:
            column: list[Any] = [None] * len(prompts)
            for i, value in zip(scored, scores.get(metric, [])):
                column[i] = bool(value) if metric == "exact_match" else round(value, 4)
            table[f"{side}{metric}"] = column
            if scored:
                means[f"{side}{metric}"] = sum(scores[metric]) / len(scored)
    return table, means


def score_outputs(prompts: list[Prompt], outputs: list[str],
                  metrics: tuple[str, ...] | list[str]) -> dict[str, list[float]]:
    """Scores of the outputs of the prompts that have references (in prompt order)."""
    from lora_exp.core.metrics import score

    scored = [i for i, p in enumerate(prompts) if p.answers]
    return score([outputs[i] for i in scored], [prompts[i].answers for i in scored], metrics) if scored else {}
