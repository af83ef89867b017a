"""Attention over a pack's rows: they are padded on the right only, so the causal mask alone is
every real position's mask, and the pack attends without building one (transformers'
`AttentionInterface`). Generation pads on the left: it gets the model's own attention back."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch import nn

from lora_exp.core.models import evaluating

#: the attention implementation a pack trains and evaluates with (transformers' AttentionInterface)
CAUSAL_ROWS = "lora_exp_causal_rows"
#: positions of the probe that checks a model attends with the pack's attention as with its own
PROBE_POSITIONS = 12
#: what models hand attention beyond q, k, v and the mask that changes its result, and the pack's
#: attention does not do: attention sinks (GPT-OSS), soft-capped scores (Gemma 2)
_NOT_DONE = ("s_aux", "softcap")


#: while `_attends_as_its_own` runs: its check is of the model's attention, not of the kernels (which
#: it would compile for a dtype the pack may not train in)
_probing = False


class UnsupportedAttention(RuntimeError):
    """A model asks the pack's attention for something it does not do."""


def _causal_rows_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           sliding_window: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention with no mask tensor. A pack's rows (TokenTable) are padded on the right
    only, so the causal mask alone gives every real position exactly the keys its padding mask
    gives it (padded positions compute values no loss reads), and a sliding window no shorter than
    the rows masks nothing more (`pack_attention` checks that). On CUDA, rows of up to 64
    positions go through the pack's attention kernels; longer ones, and the CPU, through sdpa with
    `is_causal`."""
    if sliding_window is not None and sliding_window < key.shape[2]:
        raise UnsupportedAttention(f"pack attention: rows of {key.shape[2]} positions under a sliding window of "
                                   f"{sliding_window}; the pack takes the model's own attention for such rows")
    asked = [name for name in _NOT_DONE if kwargs.get(name) is not None]
    if asked:
        raise UnsupportedAttention(f"pack attention: {type(module).__name__} asks for {', '.join(asked)}")
    query, key, value = attention_inputs(query, key, value)
    if not _probing and (query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):  # (the interpreter: CPU)
        from lora_exp.pack.kernels import attention

        if attention.fits(query, key):
            return attention.causal_attention(query, key, value, dropout, scaling), None
    # longer rows: sdpa's tiled kernels (flash attention in bf16) with the causal mask built in;
    # grouped-query attention reads each key/value head in place (no repeated copies)
    out = nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling,
                                                     is_causal=True, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def attention_inputs(query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v in the one dtype attention computes in, as eager and sdpa attention compute under
    autocast: its dtype where it is on (Llama's rotary embedding hands over fp32 q and k beside a
    bf16 v), else the widest of the three. The kernels take one dtype."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    return query.to(dtype), key.to(dtype), value.to(dtype)


def causal_rows_attention(model: Any, setting: str = "rows", longest: int | None = None) -> str | None:
    """Switch `model` to CAUSAL_ROWS where `pack_attention` says it may; returns the implementation
    it had, to restore, or None (unchanged)."""
    return switch_attention(model) if pack_attention(model, setting, longest) else None


def pack_attention(model: Any, setting: str = "rows", longest: int | None = None) -> bool:
    """Whether `model` (as transformers built it, before the pack wraps its layers) may attend
    through CAUSAL_ROWS on rows of up to `longest` positions: it attends through sdpa or eager
    attention with what is a plain causal mask there (no sliding window shorter than that: Gemma
    3's 512 or 1,024, Mistral 7B v0.1's 4,096 and Phi-3's 2,047 mask nothing more on shorter rows;
    no chunked or bidirectional attention, no soft-capped scores), and run once on a few tokens it
    gives the logits it gives with its own (`_attends_as_its_own`: attention sinks, or anything
    else a model does in its attention that its config does not say, keep its own). The model is
    left as it was. `pack.attention=model` keeps the model's own."""
    config = model.config
    own = config._attn_implementation
    if (setting == "model" or own not in ("sdpa", "eager")
            or not getattr(model, "_supports_attention_backend", False)
            or not _plain_causal(config, longest)
            or getattr(config, "attn_logit_softcapping", None) is not None
            or getattr(config, "reorder_and_upcast_attn", False) or getattr(config, "add_cross_attention", False)):
        return False
    return _attends_as_its_own(model, own)


def switch_attention(model: Any) -> str:
    """Switch `model` to CAUSAL_ROWS; returns the implementation it had."""
    from transformers import AttentionInterface

    own = model.config._attn_implementation
    AttentionInterface.register(CAUSAL_ROWS, _causal_rows_attention)
    model.set_attn_implementation(CAUSAL_ROWS)
    return own


def _attends_as_its_own(model: Any, own: str) -> bool:
    """The model's logits on PROBE_POSITIONS tokens (one row, no padding) through CAUSAL_ROWS and
    through `own`, in eval mode and without gradients, agree (to a few roundings of its dtype); the
    global random state is not used, and each module's train/eval mode and the implementation are
    put back."""
    param = next(model.parameters())
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, PROBE_POSITIONS), generator=generator).to(param.device)
    global _probing
    _probing = True
    try:
        with evaluating(model):
            theirs = model(input_ids=ids, use_cache=False).logits.float()
            switch_attention(model)
            try:
                ours = model(input_ids=ids, use_cache=False).logits.float()
            except UnsupportedAttention:
                return False
    finally:
        _probing = False
        model.set_attn_implementation(own)
    tol = 1e-4 if param.dtype in (torch.float32, torch.float64) else 2e-2
    return bool(torch.allclose(ours, theirs, rtol=tol, atol=tol * float(theirs.abs().max())))


def _plain_causal(config: Any, longest: int | None) -> bool:
    """Whether every layer's mask is the causal one on rows of up to `longest` positions
    (transformers' sliding window lets position i see keys i - window < j <= i); an unknown
    `longest` takes any window as shorter."""
    kinds = set(getattr(config, "layer_types", None) or ())
    if not kinds <= {"full_attention", "sliding_attention"} or getattr(config, "use_bidirectional_attention", False) \
            or getattr(config, "attention_chunk_size", None) is not None:
        return False
    window = getattr(config, "sliding_window", None)
    if window is None or (kinds and "sliding_attention" not in kinds):
        return True
    return longest is not None and longest <= window


@contextlib.contextmanager
def padded_attention(model: Any, own: str | None) -> Iterator[None]:
    """The model's own attention (`own`, masks built from the padding) for a while: generation
    pads on the left. Nothing to do where the model was not switched (`own` None)."""
    if own is None:
        yield
        return
    model.set_attn_implementation(own)
    try:
        yield
    finally:
        model.set_attn_implementation(CAUSAL_ROWS)

