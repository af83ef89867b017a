"""Attention over a pack's rows: they are padded on the right only, so the causal mask alone is
every real position's mask, and the pack attends without building one (transformers'
`AttentionInterface`). A sliding window shorter than the rows and soft-capped scores (Gemma 2)
are computed from positions too: the eager formula, fused in compiled steps; FlexAttention in
uncompiled ones on CUDA. Generation pads on the left: it gets the model's own attention back."""
from __future__ import annotations

import contextlib
import functools
import os
import weakref
from typing import Any, Iterator

import torch
from torch import nn

from lora_exp.core.models import evaluating

#: the attention implementation a pack trains and evaluates with (transformers' AttentionInterface)
CAUSAL_ROWS = "lora_exp_causal_rows"
#: positions of the probe that checks a model attends with the pack's attention as with its own
PROBE_POSITIONS = 12
#: what models hand attention beyond q, k, v and the mask that changes its result, and the pack's
#: attention does not do: attention sinks (GPT-OSS)
_NOT_DONE = {"s_aux": "attention sinks"}
#: outside compiled steps on CUDA, rows of at least this many positions whose scores are capped or
#: windowed go through FlexAttention (one tiled kernel; it computes 128-position blocks, which
#: shorter rows would waste), shorter ones through the eager formula
FLEX_FROM = 128
#: each model's probe answers by (its implementation, positions, dtype): a sweep sizes a pack and
#: then makes it, and a model's attention does not change under it
_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: block masks by (positions, window, device index), built at their first use
_BLOCK_MASKS: dict[tuple[int, int | None, int | None], Any] = {}


#: while `_probe` runs: its check is of the model's attention, not of the kernels (which
#: it would compile for a dtype the pack may not train in)
_probing = False


class UnsupportedAttention(RuntimeError):
    """A model asks the pack's attention for something it does not do."""


def _causal_rows_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           sliding_window: int | None = None, softcap: float | None = None,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention with no mask tensor. A pack's rows (TokenTable) are padded on the right
    only, so the causal mask alone gives every real position exactly the keys its padding mask
    gives it (padded positions compute values no loss reads), and a sliding window no shorter than
    the rows masks nothing more. On CUDA, rows of up to 64 positions go through the pack's
    attention kernels; longer ones, and the CPU, through sdpa with `is_causal`. A shorter window
    or soft-capped scores: `masked_rows_attention`."""
    asked = [f"{what} ({name})" for name, what in _NOT_DONE.items() if kwargs.get(name) is not None]
    if asked:
        raise UnsupportedAttention(f"{type(module).__name__} asks the pack's attention for {', '.join(asked)}, "
                                   "which it does not compute")
    query, key, value = attention_inputs(query, key, value)
    window = sliding_window if sliding_window is not None and sliding_window < key.shape[2] else None
    if window is not None or softcap is not None:
        return masked_rows_attention(query, key, value, dropout, scaling, window, softcap), None
    if not _probing and (query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):  # (the interpreter: CPU)
        from lora_exp.pack.kernels import attention

        if attention.fits(query, key):
            return attention.causal_attention(query, key, value, dropout, scaling), None
    # longer rows: sdpa's tiled kernels (flash attention in bf16) with the causal mask built in;
    # grouped-query attention reads each key/value head in place (no repeated copies)
    out = nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling,
                                                     is_causal=True, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def masked_rows_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
                          scaling: float | None, window: int | None, softcap: float | None) -> torch.Tensor:
    """Causal attention over right-padded rows whose scores are soft-capped (`softcap * tanh(s /
    softcap)`, Gemma 2) and/or whose keys lie within `window` positions (j > i - window), as
    transformers' eager attention computes them, without a mask tensor from the padding. q, k and v
    [rows, heads, positions, dim] in one dtype; returns [rows, positions, heads, dim]. A compiled
    step computes the eager formula, which it fuses (as fast as FlexAttention compiled into the
    step, or faster: docs/packed-trials.md); outside one, on CUDA, rows of FLEX_FROM positions or
    more without dropout go through FlexAttention, compiled on its own, with a block mask that
    skips the blocks no query sees and the cap as its score modification."""
    n = key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.is_cuda and not _probing and not dropout and n >= FLEX_FROM and not torch.compiler.is_compiling():
        out = _compiled_flex()(query, key, value, score_mod=_capped(softcap) if softcap is not None else None,
                               block_mask=_block_mask(n, window, query.device), scale=scale,
                               enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous()
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # as transformers' repeat_kv
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    pos = torch.arange(n, device=query.device)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed = allowed & (pos[None, :] > pos[:, None] - window)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout:
        probs = nn.functional.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def _block_mask(n: int, window: int | None, device: torch.device) -> Any:
    """The causal (and windowed) block mask over rows of `n` positions, built once."""
    key = (n, window, device.index)
    if key not in _BLOCK_MASKS:
        from torch.nn.attention.flex_attention import create_block_mask

        def causal(b: Any, h: Any, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return (k <= q) if window is None else (k <= q) & (k > q - window)

        _BLOCK_MASKS[key] = create_block_mask(causal, None, None, n, n, device=str(device))
    return _BLOCK_MASKS[key]


@functools.cache
def _capped(softcap: float) -> Any:
    """FlexAttention's score modification for a cap: one function per cap, so compiled code is reused."""
    def score_mod(score: torch.Tensor, b: Any, h: Any, q: Any, k: Any) -> torch.Tensor:
        return torch.tanh(score / softcap) * softcap

    return score_mod


@functools.cache
def _compiled_flex() -> Any:
    """FlexAttention compiled on its own, for steps that are not compiled (uncompiled it computes
    the whole score matrix)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


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
    """Whether `model` may attend through CAUSAL_ROWS on rows of up to `longest` positions
    (`own_attention_reason` finds no reason for it to keep its own)."""
    return own_attention_reason(model, setting, longest) is None


def own_attention_reason(model: Any, setting: str = "rows", longest: int | None = None) -> str | None:
    """Why `model` (as transformers built it, before the pack wraps its layers) keeps its own
    attention on rows of up to `longest` positions, or None where it may attend through
    CAUSAL_ROWS: it attends through sdpa or eager attention, each layer causally (with or without
    a sliding window; no chunked or bidirectional attention), and run on a few tokens (more than
    its window where rows are longer than that) it gives the logits it gives with its own
    (`_probe`: attention sinks, a window the model applies only through its masks, or anything
    else a model does in its attention that its config does not say, keep its own). The model is
    left as it was. `pack.attention=model` keeps the model's own."""
    config = model.config
    own = config._attn_implementation
    if setting == "model":
        return "pack.attention=model"
    if own not in ("sdpa", "eager"):
        return f"its attention implementation is {own}, not sdpa or eager"
    if not getattr(model, "_supports_attention_backend", False):
        return "it takes no other attention implementation (transformers' AttentionInterface)"
    if not _causal_layers(config):
        return "its layers attend in chunks or both ways, not causally"
    if getattr(config, "reorder_and_upcast_attn", False) or getattr(config, "add_cross_attention", False):
        return "it reorders and upcasts its attention scores, or attends across to another sequence"
    positions = PROBE_POSITIONS
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None) or ("sliding_attention",)
    if window is not None and "sliding_attention" in kinds and (longest is None or longest > window):
        # where the window masks keys
        positions = window + PROBE_POSITIONS if longest is None else min(window + PROBE_POSITIONS, longest)
        positions = min(positions, getattr(config, "max_position_embeddings", None) or positions)
    answers = _PROBED.setdefault(model, {})
    key = (own, positions, next(model.parameters()).dtype)
    if key not in answers:
        answers[key] = _probe(model, own, positions)
    return answers[key]


def switch_attention(model: Any) -> str:
    """Switch `model` to CAUSAL_ROWS; returns the implementation it had."""
    from transformers import AttentionInterface

    own = model.config._attn_implementation
    AttentionInterface.register(CAUSAL_ROWS, _causal_rows_attention)
    model.set_attn_implementation(CAUSAL_ROWS)
    return own


def _probe(model: Any, own: str, positions: int = PROBE_POSITIONS) -> str | None:
    """None where the model's logits on `positions` tokens (one row, no padding) through
    CAUSAL_ROWS and through `own`, in eval mode and without gradients, agree (to a few roundings of
    its dtype), else how they differ; the global random state is not used, and each module's
    train/eval mode and the implementation are put back."""
    param = next(model.parameters())
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, positions), generator=generator).to(param.device)
    global _probing
    _probing = True
    try:
        with evaluating(model):
            theirs = model(input_ids=ids, use_cache=False).logits.float()
            switch_attention(model)
            try:
                ours = model(input_ids=ids, use_cache=False).logits.float()
            except UnsupportedAttention as exc:
                return str(exc)
    finally:
        _probing = False
        model.set_attn_implementation(own)
    tol = 1e-4 if param.dtype in (torch.float32, torch.float64) else 2e-2
    if torch.allclose(ours, theirs, rtol=tol, atol=tol * float(theirs.abs().max())):
        return None
    return (f"on {positions} tokens its logits through the pack's attention are up to "
            f"{float((ours - theirs).abs().max()):.3g} from its own: its attention does something its config "
            "does not say (attention sinks, a window applied only through its masks)")


def _causal_layers(config: Any) -> bool:
    """Whether every layer attends causally, over all earlier keys or a sliding window of them (no
    chunks, no bidirectional attention)."""
    kinds = set(getattr(config, "layer_types", None) or ())
    return (kinds <= {"full_attention", "sliding_attention"}
            and not getattr(config, "use_bidirectional_attention", False)
            and getattr(config, "attention_chunk_size", None) is None)


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

