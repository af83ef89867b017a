"""Eval loss on answer tokens, greedy generations (base vs adapter on ONE model), exact match."""
from __future__ import annotations

import contextlib
import re
from typing import Any

import torch

from lora_exp.data import Example, Prompt, collate


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
        batch = collate(examples[start:start + batch_size], pad_id, field="answer_labels")
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n == 0:
            continue
        with autocast(device, precision):
            loss = model(**batch).loss
        total += float(loss) * n
        tokens += n
    model.train(was_training)
    return total / tokens if tokens else None


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[Prompt], device: torch.device,
             max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy continuations of each prompt (left-padded batches), stopped at EOS."""
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [p.text for p in prompts[start:start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def exact_match(output: str, answers: tuple[str, ...]) -> bool:
    """The generated answer equals one of the references (whitespace-normalised)."""
    return any(normalize(output) == normalize(a) for a in answers)


def generations_table(prompts: list[Prompt], base: list[str], adapter: list[str]) -> dict[str, list[Any]]:
    """Columns of the side-by-side table logged with each run."""
    return {
        "prompt": [p.text for p in prompts],
        "expected": [" | ".join(p.answers) for p in prompts],
        "base_output": base,
        "adapter_output": adapter,
        "base_exact_match": [exact_match(o, p.answers) if p.answers else None for o, p in zip(base, prompts)],
        "exact_match": [exact_match(o, p.answers) if p.answers else None for o, p in zip(adapter, prompts)],
    }
