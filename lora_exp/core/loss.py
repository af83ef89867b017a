"""The causal-LM loss, with the vocabulary head applied only where a token is scored.

`model(**batch).loss` projects every position of every row onto the vocabulary, prompts and
padding included, and then ignores most of them (`answer_only_loss`: only the answers are
learned). On a small model the head is a large share of the work (SmolLM2-135M: a 576 x 49,152
matrix against ~100M parameters in its layers), so the loss here runs the model's layers, keeps
the hidden states of the positions that predict a label, and projects only those. The value is
the same mean cross-entropy over the same tokens as the model's own loss.

Only for models whose logits are exactly `head(last hidden state)` and whose head is a plain
linear layer (`backbone_and_head`, which checks it once per model by running it); a model that
soft-caps, scales or otherwise changes its logits (Gemma 2, Cohere, Granite) computes its own.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

#: positions of the probe that checks a model's logits are its head's output (`_head_is_last`)
PROBE_POSITIONS = 8

#: the probe's answer for each model seen (architectures do not change under a model)
_HEAD_IS_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the next token over the positions whose label is not -100."""
    parts = backbone_and_head(model)
    if parts is None:
        return model(**batch).loss
    backbone, head = parts
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), labels[keep])


def backbone_and_head(model: Any) -> tuple[Any, torch.nn.Linear] | None:
    """The model's backbone and its LM head where its logits are exactly `head(backbone(ids)
    .last_hidden_state)`, a plain linear layer applied to the last hidden state and nothing after;
    else None (the model must compute its own logits)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if backbone is None or type(head) is not torch.nn.Linear:  # an adapted head: let the model compute it
        return None
    if hf not in _HEAD_IS_LAST:
        _HEAD_IS_LAST[hf] = _head_is_last(hf, backbone, head)
    return (backbone, head) if _HEAD_IS_LAST[hf] else None


def _head_is_last(hf: Any, backbone: Any, head: torch.nn.Linear) -> bool:
    """Run the model once on a few tokens with the head's output replaced by values far from 0:
    its logits must be those values, untouched (no soft-capping, scaling or bias after the head),
    and the head's input the backbone's last hidden state (nothing scaled before it). In eval
    mode and without gradients; the global random state is not used."""
    device = head.weight.device
    ids = (torch.arange(PROBE_POSITIONS, device=device) % head.out_features).unsqueeze(0)
    seen: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(0)

    def take_input(module: Any, args: tuple) -> None:
        seen["input"] = args[0]

    def replace_output(module: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
        seen["output"] = (100 * torch.randn(out.shape, generator=generator)).to(out.device, out.dtype)
        return seen["output"]

    training = {m: m.training for m in hf.modules()}
    hooks = [head.register_forward_pre_hook(take_input), head.register_forward_hook(replace_output)]
    hf.eval()
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids, use_cache=False).logits
            hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in training.items():
            module.training = mode
    if "output" not in seen or logits.shape != seen["output"].shape or seen["input"].shape != hidden.shape:
        return False
    return (torch.equal(logits.float(), seen["output"].float())
            and torch.allclose(seen["input"].float(), hidden.float(), rtol=1e-5, atol=1e-6))
