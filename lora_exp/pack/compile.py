"""How a pack's step is compiled (`pack.compile`), and one compile at a time per machine."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

#: off: eager (torch ops); parts: the Triton optimizer (kernels.adamw) and compiled dropout masks;
#: full: also the whole training forward (base + LoRA + loss) and its backward as one compiled
#: graph; graphs: full, replayed as CUDA graphs (measured slower than full on the H200)
COMPILE_MODES = ("off", "parts", "full", "graphs")

_COMPILED: dict[Any, Any] = {}


def compile_mode(setting: str, device: torch.device) -> str:
    """`pack.compile` on this device: `auto` is `full` on CUDA and `off` elsewhere (compiling pays
    on a GPU; on a CPU it costs more than it saves)."""
    if setting == "auto":
        return "full" if device.type == "cuda" else "off"
    assert setting in COMPILE_MODES, setting
    return setting


def compiled(fn: Any, mode: str | None = None) -> Any:
    import torch._dynamo

    # one graph per shape (eval, train, each module width): allow more than the default 8
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    return torch.compile(fn, dynamic=False, mode=mode)


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
