"""A pack's data on the device: splits as padded token tables, each trial's batch order, the LM
head padded for fast GEMMs, and each slot's mean loss from one forward over every slot's rows."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lora_exp.core.data import IGNORE, Example
from lora_exp.core.loss import LogitTransform
from lora_exp.pack.compile import fused


@dataclass
class TokenTable:
    """A data split as padded tensors on the device, so a step gathers its rows without Python."""

    ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    lengths: list[int] = field(default_factory=list)
    #: each row's first position whose next token is scored, and the most positions from a row's
    #: first scored one to its last (every row's): where `slot_losses` makes the head's logits
    first: torch.Tensor | None = None
    span: int = 0

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
        first, span = scored_span(labels[:, 1:] != IGNORE)
        return cls(ids.to(device), labels.to(device), mask.to(device), [len(e.input_ids) for e in examples],
                   first.to(device), span)

    @property
    def empty(self) -> int:
        return self.ids.shape[0] - 1


def scored_span(scored: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(each row's first scored position, 0 where none is; the most positions from a row's first
    scored one to its last, over every row) of `scored` [rows, positions]: with answer-only loss
    a row's prompt and padding are not scored, and the head need not make their logits."""
    n = scored.shape[1]
    if n == 0 or not bool(scored.any()):
        return torch.zeros(scored.shape[0], dtype=torch.long), max(n, 1)
    pos = torch.arange(n)
    first = torch.where(scored, pos, n).min(dim=1).values
    last = torch.where(scored, pos, -1).max(dim=1).values
    has = last >= 0
    return torch.where(has, first, 0), int((last - first + 1)[has].max())


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
    slow tensor-core kernels. For bf16 the weight is cast once, as autocast would cast it. What
    the model does to the head's output (`core.loss.LogitTransform`): a scale is folded into the
    weight and bias (exact for Granite's and Cohere's powers of two), a soft cap kept for the loss."""

    def __init__(self, model: Any, dtype: torch.dtype, transform: LogitTransform | None = None):
        head = model.get_output_embeddings()
        transform = transform or LogitTransform()
        #: the model's soft cap of its logits (Gemma 2), applied by the loss
        self.softcap = transform.softcap
        weight = head.weight.detach() * transform.scale
        vocab, width = weight.shape
        padded = -(-vocab // 64) * 64
        self.weight = torch.zeros(padded, width, dtype=dtype, device=weight.device)
        self.weight[:vocab] = weight.to(dtype)
        self.bias = torch.zeros(padded, dtype=dtype, device=weight.device)
        if getattr(head, "bias", None) is not None:
            self.bias[:vocab] = (head.bias.detach() * transform.scale).to(dtype)
        self.bias[vocab:] = float("-inf")

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.weight, self.bias)


#: fp32 logits one chunk of the head loss holds at a time (bytes): the whole pack's logits at once
#: would be K x batch x positions x vocabulary (tens of GB for a 50k-150k vocabulary)
HEAD_CHUNK_BYTES = 1 << 30


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                softcap: float | None = None) -> tuple[torch.Tensor, ...]:
    logits = nn.functional.linear(hidden, weight, bias).float()
    capped = None
    if softcap is not None:  # as the model's forward: softcap * tanh(z / softcap); the padding stays -inf
        capped = torch.tanh(logits / softcap)
        logits = torch.where(logits == float("-inf"), logits, capped * softcap)
    valid = target != IGNORE
    index = torch.where(valid, target, 0).unsqueeze(1)
    lse = torch.logsumexp(logits, dim=1)
    return torch.where(valid, lse - logits.gather(1, index).squeeze(1), 0.0), logits, lse, valid, capped


def chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
               softcap: float | None = None) -> torch.Tensor:
    """A chunk's next-token losses (0 where the target is IGNORE)."""
    return _chunk_loss(hidden, weight, bias, target, softcap)[0]


def chunk_loss_and_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                        softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's losses and their gradient with respect to `hidden`: (softmax - one-hot) x head,
    through the soft cap's derivative (1 - tanh^2) where there is one."""
    loss, logits, lse, valid, capped = _chunk_loss(hidden, weight, bias, target, softcap)
    index = torch.where(valid, target, 0).unsqueeze(1)
    p = torch.exp(logits - lse.unsqueeze(1))
    p = p.scatter_add(1, index, -valid.unsqueeze(1).float()) * valid.unsqueeze(1)
    if capped is not None:
        p = p * (1 - capped * capped)
    return loss, torch.mm(p.to(weight.dtype), weight).to(hidden.dtype)


def kernel_chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                  need_grad: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`chunk_loss_and_grad` (or `chunk_loss`) with the loss and the logits' gradient from the head
    loss kernel: the same roundings, the logits read twice instead of three times."""
    from lora_exp.pack.kernels.head import head_loss

    loss, grad = head_loss(nn.functional.linear(hidden, weight, bias), target, need_grad)
    if grad is None:
        return loss
    return loss, torch.mm(grad, weight).to(hidden.dtype)


class _HeadLoss(torch.autograd.Function):
    """Next-token losses through a frozen LM head, chunk by chunk: each chunk's logits, their
    log-sum-exp and the hidden states' gradient (softmax minus one-hot, times the head) in one
    pass, so the logits never exist for the whole batch and nothing keeps them for the backward
    (the head is frozen: the hidden states' gradient is all the backward needs). The roundings
    are autocast's: logits in the compute dtype, the loss and the softmax in fp32, the logits'
    gradient rounded to the compute dtype before the product with the head. With `compile`,
    each chunk is one compiled graph (the softmax fused into a pass or two over the logits)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                target: torch.Tensor, chunk: int, compile: bool, softcap: float | None) -> torch.Tensor:
        n = hidden.shape[0]
        losses = hidden.new_empty(n, dtype=torch.float32)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        if compile and hidden.is_cuda and softcap is None:  # the softmax in two passes over the logits (kernels.head)
            step = functools.partial(kernel_chunk_loss, need_grad=grad is not None)
        else:
            step = functools.partial(fused(chunk_loss_and_grad if grad is not None else chunk_loss, compile),
                                     softcap=softcap)
        for i in range(0, n, chunk):
            out = step(hidden[i:i + chunk], weight, bias, target[i:i + chunk])
            if grad is not None:
                losses[i:i + chunk], grad[i:i + chunk] = out
            else:
                losses[i:i + chunk] = out
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * g.unsqueeze(1).to(grad.dtype) if grad is not None else None), None, None, None, None, None, None


def head_token_losses(hidden: torch.Tensor, head: OutputHead, target: torch.Tensor,
                      compile: bool = False) -> torch.Tensor:
    """Each position's next-token loss (0 where the target is IGNORE), `hidden` [N, width] in the
    compute dtype. The logits are made a chunk at a time (`HEAD_CHUNK_BYTES`)."""
    chunk = max(64, HEAD_CHUNK_BYTES // (4 * head.weight.shape[0]) // 64 * 64)
    hidden = hidden.to(head.weight.dtype) if hidden.dtype != head.weight.dtype else hidden
    return _HeadLoss.apply(hidden, head.weight, head.bias, target, chunk, compile and not torch.compiler.is_compiling(),
                           head.softcap)


def slot_losses(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, n_groups: int,
                rows: int, head: OutputHead | None = None, compile: bool = False, first: torch.Tensor | None = None,
                span: int = 0) -> torch.Tensor:
    """Mean next-token loss of each row group (one per slot), as HF's causal-LM loss computes it
    for that group alone. Through a frozen `head`, a chunk at a time (`head_token_losses`), and
    with `first` and `span` (the rows' TokenTable's) only at each row's `span` positions from its
    first scored one: the prompt and padding of answer-only loss make no logits (a fixed count a
    row, so no data-dependent shape and no host sync). Without them, logits at every position;
    without a head (a model that makes its logits other than by its head, scaled or soft-capped:
    `core.loss.logit_transform`), the model's own logits."""
    # no key/value cache: filling one copies every layer's keys and values, and nothing reads it
    target = labels[:, 1:]
    if head is not None:
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        states, scored = hidden[:, :-1], target
        if first is not None and 0 < span < target.shape[1]:
            pos = first.view(-1, 1) + torch.arange(span, device=first.device)
            inside = pos < target.shape[1]
            pos = pos.clamp(max=target.shape[1] - 1)  # past a row's end: a repeated position, not scored
            scored = torch.where(inside, target.gather(1, pos), IGNORE)
            states = states.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        token_loss = head_token_losses(states.reshape(-1, hidden.shape[-1]), head, scored.reshape(-1), compile)
    else:  # the model's own logits, whatever its forward does around its head
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        token_loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                                                 reduction="none")
    sums = token_loss.view(n_groups, -1).sum(dim=1)
    counts = (target != IGNORE).view(n_groups, -1).sum(dim=1)
    return sums / counts.clamp(min=1)
