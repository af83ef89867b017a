"""How a pack's step is compiled (`pack.compile`), and one compile at a time per machine."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator

import torch
from torch import nn

#: off: eager (torch ops); parts: the Triton optimizer (kernels.adamw), compiled dropout masks and
#: loss chunks; layers: also each of the model's repeated blocks (decoder layers) through one
#: compiled graph, compiled once for all of them (seconds, where the whole step takes minutes on a
#: deep model); full: the whole training forward (base + LoRA + loss) and its backward as one
#: compiled graph; graphs: layers, and the whole step (forward, backward, optimizer) recorded as one
#: CUDA graph and replayed (`pack.graph`; layers elsewhere than on CUDA)
COMPILE_MODES = ("off", "parts", "layers", "full", "graphs")

_COMPILED: dict[Any, Any] = {}


def compile_mode(setting: str, device: torch.device) -> str:
    """`pack.compile` on this device: `auto` is `layers` on CUDA and `off` elsewhere (compiling
    pays on a GPU; on a CPU it costs more than it saves). A sweep decides `auto` from the steps
    it has ahead (`sizing.choose_compile`)."""
    if setting == "auto":
        return "layers" if device.type == "cuda" else "off"
    assert setting in COMPILE_MODES, setting
    return setting


def compiled(fn: Any, mode: str | None = None) -> Any:
    import torch._dynamo

    # one graph per shape (eval, train, each module width): allow more than the default 8
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    return torch.compile(fn, dynamic=False, mode=mode)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: its longest ModuleList of one module type (decoder layers)."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len({type(m) for m in module}) == 1:
            best = list(module)
    return best


def _requires_grad(module: nn.Module, args: Any, output: Any) -> Any:
    """A forward hook: the (frozen) embeddings' output requires grad where grad is on."""
    if isinstance(output, torch.Tensor) and torch.is_grad_enabled() and not output.requires_grad:
        return output.requires_grad_()
    return None


class CompiledLayers:
    """Regional compilation: while `active()`, every repeated block of the model runs one
    compiled function, its class's `forward` compiled once: the blocks' parameters and buffers
    are inputs of its graph (torch.compile inlines modules), so all the blocks share it. Outside
    (evals, generation with its growing key/value cache) the blocks run eagerly.

    The first block's input would not require grad (the embeddings are frozen) where every other
    block's does, and the graph guards on that: a second graph, compiled again, for one block of
    30. While active, the input embeddings' output requires grad instead, so one graph serves all;
    the first block's input gradient it computes, never read (the pack's backward asks autograd
    for the LoRA tensors' gradients only), is ~1% of a step's products on a model of 30 blocks
    and ~2.5% on GPT-2's 12 (~0.4 ms of the seed's 52 ms step at K=1024, counted, not timed)."""

    def __init__(self, model: nn.Module):
        self.blocks = repeated_blocks(model)
        forward = type(self.blocks[0]).forward if self.blocks else None
        self.fn = compiled(forward) if forward is not None else None
        embeddings = getattr(model, "get_input_embeddings", None)
        self.embeddings = embeddings() if embeddings is not None else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.fn is None:
            yield
            return
        for block in self.blocks:
            block.forward = functools.partial(self.fn, block)
        hook = self.embeddings.register_forward_hook(_requires_grad) if self.embeddings is not None else None
        try:
            yield
        finally:
            if hook is not None:
                hook.remove()
            for block in self.blocks:
                del block.forward  # the class's own forward again


def fused(fn: Any, enabled: bool) -> Any:
    """`fn` compiled by torch.compile (one fused kernel instead of ~15 passes over memory) when
    enabled; the integer hash is exact either way, so compiled and eager masks are identical."""
    if not enabled:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = compiled(fn)
    return _COMPILED[fn]


@contextlib.contextmanager
def compile_lock() -> Iterator[None]:
    """Held while a pack compiles its step: one process at a time per machine compiles, and the
    next loads the compiled graphs from the compile cache (same shapes, each GPU seen as cuda:0)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: compile side by side
        yield
        return
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        folder = cache_dir()
    except Exception:  # noqa: BLE001 - an older torch: any shared folder does
        import tempfile
        folder = tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "lora-exp-compile.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
