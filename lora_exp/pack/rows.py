"""A pack's data on the device: splits as padded token tables, each trial's batch order, the LM
head padded for fast GEMMs, and each slot's mean loss from one forward over every slot's rows."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lora_exp.core.data import IGNORE, Example


@dataclass
class TokenTable:
    """A data split as padded tensors on the device, so a step gathers its rows without Python."""

    ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    lengths: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, examples: list[Example], pad_id: int, device: torch.device,
              field_name: str = "labels") -> "TokenTable":
        n = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples) + 1, n), pad_id, dtype=torch.long)  # last row: an empty example
        labels = torch.full((len(examples) + 1, n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples) + 1, n), dtype=torch.long)
        for i, e in enumerate(examples):
            k = len(e.input_ids)
            ids[i, :k] = torch.tensor(e.input_ids)
            labels[i, :k] = torch.tensor(getattr(e, field_name))
            mask[i, :k] = 1
        return cls(ids.to(device), labels.to(device), mask.to(device), [len(e.input_ids) for e in examples])

    @property
    def empty(self) -> int:
        return self.ids.shape[0] - 1


@functools.lru_cache(maxsize=64)
def batch_schedule(n_examples: int, batch_size: int, seed: int, steps: int) -> torch.Tensor:
    """Example indices [steps, batch_size] exactly as data.train_batches yields them (a short
    last batch of an epoch is filled with the empty example, index n_examples). Cached: the
    trials of a search often share a seed; the tensor is read-only."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = -(-n_examples // batch_size)
    epochs = -(-steps // per_epoch)
    pad = torch.full((per_epoch * batch_size - n_examples,), n_examples, dtype=torch.long)
    rows = [torch.cat([torch.randperm(n_examples, generator=generator), pad]) for _ in range(epochs)]
    if not rows:
        return torch.empty((0, batch_size), dtype=torch.long)
    return torch.stack(rows).view(-1, batch_size)[:steps]


class OutputHead:
    """The model's LM head with its vocabulary padded to a multiple of 64 (padded logits are
    -inf, so the loss is unchanged): GEMMs over an odd vocabulary (GPT-2's 50257) fall back to
    slow tensor-core kernels. For bf16 the weight is cast once, as autocast would cast it."""

    def __init__(self, model: Any, dtype: torch.dtype):
        head = model.get_output_embeddings()
        weight = head.weight.detach()
        vocab, width = weight.shape
        padded = -(-vocab // 64) * 64
        self.weight = torch.zeros(padded, width, dtype=dtype, device=weight.device)
        self.weight[:vocab] = weight.to(dtype)
        self.bias = torch.zeros(padded, dtype=dtype, device=weight.device)
        if getattr(head, "bias", None) is not None:
            self.bias[:vocab] = head.bias.detach().to(dtype)
        self.bias[vocab:] = float("-inf")

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.weight, self.bias)


def slot_losses(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, n_groups: int,
                rows: int, head: Any = None) -> torch.Tensor:
    """Mean next-token loss of each row group (one per slot), as HF's causal-LM loss computes it
    for that group alone. Logits at every position (no data-dependent shapes: no host sync)."""
    # no key/value cache: filling one copies every layer's keys and values, and nothing reads it
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    logits = (head or model.get_output_embeddings())(hidden[:, :-1])
    token_loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                                             reduction="none")
    sums = token_loss.view(n_groups, -1).sum(dim=1)
    counts = (target != IGNORE).view(n_groups, -1).sum(dim=1)
    return sums / counts.clamp(min=1)

