"""The causal-LM loss, with the vocabulary head applied only where a token is scored.

`model(**batch).loss` projects every position of every row onto the vocabulary, prompts and
padding included, and then ignores most of them (`answer_only_loss`: only the answers are
learned). On a small model the head is a large share of the work (SmolLM2-135M: a 576 x 49,152
matrix against ~100M parameters in its layers), so the loss here runs the model's layers, keeps
the hidden states of the positions that predict a label, and projects only those. The value is
the same mean cross-entropy over the same tokens as the model's own loss.

Only for models whose head is a plain linear layer applied to the last hidden state (or to that
times a number, MiniCPM3, where the head has no bias), followed by nothing, a scale (Granite,
Cohere) or a soft cap (Gemma 2): `logit_transform` finds which by running the model once, and the
loss here does the same to the head's output (as the pack's head does, `pack.rows.OutputHead`).
Any other model computes its own loss.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lora_exp.core.models import evaluating

#: positions of the probe that finds what a model does to its logits after the head (`logit_transform`)
PROBE_POSITIONS = 8


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to its LM head's output: logits = softcap * tanh(scale * z /
    softcap) with z the head's output (Granite divides by `logits_scaling`, Cohere multiplies by
    `logit_scale`, Gemma 2 soft-caps at `final_logit_softcapping`); the identity for most."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The logits from the head's output `z`, in its dtype, as the model's forward makes them."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


#: the probe's answer for each model seen (architectures do not change under a model)
_TRANSFORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_UNKNOWN = object()


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the next token over the positions whose label is not -100."""
    parts = _parts(model)
    transform = _transform(*parts) if parts is not None else None
    if parts is None or transform is None:
        return model(**batch).loss
    _, backbone, head = parts
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = transform(head(hidden[:, :-1][keep]))
    return F.cross_entropy(logits.float(), labels[keep])


def logit_transform(model: Any) -> LogitTransform | None:
    """What the model does to its plain linear head's output to make its logits, found by running
    it (`LogitTransform`); None where the head is not a plain linear layer applied to the
    backbone's last hidden state, or what follows it is not a LogitTransform."""
    parts = _parts(model)
    return _transform(*parts) if parts is not None else None


def _parts(model: Any) -> tuple[Any, Any, torch.nn.Linear] | None:
    """The transformers model under a peft one, its backbone and its head, if that is a plain
    linear layer (an adapted head: the model computes its own logits)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if backbone is None or type(head) is not torch.nn.Linear:
        return None
    return hf, backbone, head


def _transform(hf: Any, backbone: Any, head: torch.nn.Linear) -> LogitTransform | None:
    if hf not in _TRANSFORMS:
        _TRANSFORMS[hf] = _probe(hf, backbone, head) or _UNKNOWN
    found = _TRANSFORMS[hf]
    return None if found is _UNKNOWN else found


def _probe(hf: Any, backbone: Any, head: torch.nn.Linear) -> LogitTransform | None:
    """Run the model once on a few tokens with the head's output replaced by values far from 0:
    the head's input must be the backbone's last hidden state, or that times a number where the
    head has no bias (MiniCPM3 divides it by hidden_size / dim_model_base: the head's output is
    then scaled by that number), and the model's logits those values untouched, scaled, or
    soft-capped at the config's `final_logit_softcapping`. In eval mode and without gradients; the
    global random state is not used."""
    device = head.weight.device
    ids = (torch.arange(PROBE_POSITIONS, device=device) % head.out_features).unsqueeze(0)
    seen: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(0)

    def take_input(module: Any, args: tuple) -> None:
        seen["input"] = args[0]

    def replace_output(module: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
        seen["output"] = (100 * torch.randn(out.shape, generator=generator)).to(out.device, out.dtype)
        return seen["output"]

    hooks = [head.register_forward_pre_hook(take_input), head.register_forward_hook(replace_output)]
    try:
        with evaluating(hf):
            logits = hf(input_ids=ids, use_cache=False).logits
            hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    if "output" not in seen or logits.shape != seen["output"].shape or seen["input"].shape != hidden.shape:
        return None
    # a bf16 model (or autocast) scales or caps in bf16: a tolerance of a few of its roundings
    tol = 1e-5 if logits.dtype in (torch.float32, torch.float64) else 2e-2
    x, h = seen["input"].double(), hidden.double()
    before: float | None = 1.0
    if not torch.allclose(x, h, rtol=1e-5, atol=1e-6):
        before = _scale_of(x, h, tol) if head.bias is None else None
        if before is None:
            return None
    z, logits = seen["output"].double(), logits.double()
    if torch.equal(logits, z):
        return LogitTransform(scale=before)
    scale = _scale_of(logits, z, tol)
    if scale is not None:
        return LogitTransform(scale=before * scale)
    cap = getattr(getattr(hf, "config", None), "final_logit_softcapping", None)
    if cap and torch.allclose(logits, cap * torch.tanh(z / cap), rtol=tol, atol=tol):
        return LogitTransform(scale=before, softcap=float(cap))
    return None


def _scale_of(y: torch.Tensor, x: torch.Tensor, tol: float) -> float | None:
    """The number y is x times (least squares), where it is that to `tol` relative; else None."""
    scale = float((y * x).sum() / (x * x).sum())
    return scale if scale != 0 and torch.allclose(y, x * scale, rtol=tol, atol=0) else None
