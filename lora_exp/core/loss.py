"""The causal-LM loss, with the vocabulary head applied only where a token is scored.

`model(**batch).loss` projects every position of every row onto the vocabulary, prompts and
padding included, and then ignores most of them (`answer_only_loss`: only the answers are
learned). On a small model the head is a large share of the work (SmolLM2-135M: a 576 x 49,152
matrix against ~100M parameters in its layers), so the loss here runs the model's layers, keeps
the hidden states of the positions that predict a label, and projects only those. The value is
the same mean cross-entropy over the same tokens as the model's own loss.

Only for architectures whose logits are exactly `head(last hidden state)` (no soft-capping or
scaling of the logits) and whose head is a plain linear layer; any other model computes its own
loss as before.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

#: model types whose forward is `lm_head(backbone(...).last_hidden_state)`, nothing more
HEAD_ONLY_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox"})


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the next token over the positions whose label is not -100."""
    parts = _backbone_and_head(model)
    if parts is None:
        return model(**batch).loss
    backbone, head = parts
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), labels[keep])


def _backbone_and_head(model: Any) -> tuple[Any, torch.nn.Linear] | None:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(hf, "config", None)
    if getattr(config, "model_type", None) not in HEAD_ONLY_TYPES:
        return None
    backbone = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if backbone is None or type(head) is not torch.nn.Linear:  # an adapted head: let the model compute it
        return None
    return backbone, head
