"""Packed trials: K LoRA trials trained at once on ONE frozen base model, in one process.

A small model at batch 1 leaves a GPU almost idle (one trial of the seed's recipe is ~10 GFLOP a
step, launch-bound). Here each trial owns a *slot*: its own slice of every LoRA A/B matrix (padded
to the pack's largest rank; the padding is zero and stays zero), its own scale (alpha/r, 0 where it
does not target a module), dropout rate, seed, data order, learning-rate schedule, AdamW state and
gradient clipping. One batch row group per slot; the frozen base runs once on the whole batch; the
loss is the SUM of the per-slot mean losses, so each slot's gradient is exactly its own trial's
gradient. A slot is freed when its trial finishes or is pruned, and a new trial takes it
(continuous batching of trials).

The randomness of a trial depends on its own seed only (never on what it is packed with): LoRA A
is initialised per (seed, module) and dropout masks come from a counter-based hash of (seed, step,
module, row, position). `adapters.attach_adapter` uses the same two functions for a trial trained
alone, so a trial has the same loss curve alone or in any pack (tests/test_packed.py).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from lora_exp.data import IGNORE, Example
from lora_exp.errors import ConfigError

M32 = 0xFFFFFFFF
#: the longest row group (batch rows x positions) pack_lora's kernels take (a program holds it)
MAX_KERNEL_M = 256


# --- per-trial randomness, shared with a trial trained alone ----------------------------------


def module_key(name: str) -> int:
    """A stable 32-bit id of a module path (the same in every process and every pack)."""
    return zlib.crc32(name.encode())


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Chris Wellons' integer hash), on int64 tensors holding 32-bit values."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & M32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & M32
    return h ^ (h >> 16)


def _mix_int(x: int) -> int:
    return int(_mix32(torch.tensor([x & M32], dtype=torch.int64))[0])


def row_keys(seeds: torch.Tensor, steps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per batch row from (trial seed, optimizer step, row in the trial's batch);
    `module_keys` then gives each module its own stream."""
    h = _mix32(seeds.to(torch.int64) & M32)
    h = _mix32((h + steps.to(torch.int64)) & M32)
    return _mix32((h + rows.to(torch.int64)) & M32)


def module_keys(keys: torch.Tensor, key: int) -> torch.Tensor:
    return _mix32(keys ^ key)


def dropout_mask(x: torch.Tensor, keys: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Inverted-dropout multipliers for x [rows, ...]: element i of row n is kept when
    hash(keys[n], i) >= p[n] * 2^32 (i = its index within the row), scaled by 1/(1-p[n])."""
    rows = x.shape[0]
    n = x[0].numel()
    idx = torch.arange(n, device=x.device, dtype=torch.int64)
    h = _mix32(((keys.view(rows, 1) * 0x9E3779B1) + idx) & M32)
    threshold = (p.to(torch.float64) * 2.0 ** 32).to(torch.int64).view(rows, 1)
    keep = h >= threshold
    scale = (1.0 / (1.0 - p)).to(x.dtype).view(rows, 1)
    return (keep.to(x.dtype) * scale).view_as(x)


def adamw_(params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
           coef: torch.Tensor, decay: torch.Tensor, step_size: torch.Tensor, bc2_sqrt: torch.Tensor,
           b1: float, b2: float, eps: float) -> None:
    """torch.optim.AdamW's update (its formula and order of operations) on [K, P] buffers, with
    per-slot [K, 1] clip coefficient, decay factor (1 - lr*wd), step size and bias correction."""
    g = grads * coef
    params.mul_(decay)
    exp_avg.lerp_(g, 1 - b1)
    exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    params.addcdiv_(exp_avg * step_size, denom, value=-1.0)


_COMPILED: dict[Any, Any] = {}

#: off: eager (torch ops); parts: the Triton optimizer (pack_kernels) and compiled dropout masks;
#: full: also the whole training forward (base + LoRA + loss) and its backward as one compiled
#: graph; graphs: full, replayed as CUDA graphs (measured slower than full on the H200)
COMPILE_MODES = ("off", "parts", "full", "graphs")


def compile_mode(device: torch.device) -> str:
    """LORA_EXP_PACK_COMPILE, else `full` on CUDA and `off` elsewhere (compiling pays on a GPU;
    on a CPU it costs more than it saves)."""
    mode = os.environ.get("LORA_EXP_PACK_COMPILE", "").strip().lower()
    mode = {"0": "off", "1": "full", "": "full" if device.type == "cuda" else "off"}.get(mode, mode)
    if mode not in COMPILE_MODES:
        raise ConfigError(f"LORA_EXP_PACK_COMPILE={mode}: expected one of {', '.join(COMPILE_MODES)}")
    return mode


def fused(fn: Any, enabled: bool) -> Any:
    """`fn` compiled by torch.compile (one fused kernel instead of ~15 passes over memory) when
    enabled; the integer hash is exact either way, so compiled and eager masks are identical."""
    if not enabled:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = compiled(fn)
    return _COMPILED[fn]


def lora_path() -> str:
    """LORA_EXP_PACK_LORA: `kernels` (the default) or `bmm`, how a compiled CUDA step computes the
    LoRA deltas (bench/sweep_throughput.py times both)."""
    path = os.environ.get("LORA_EXP_PACK_LORA", "kernels").strip().lower() or "kernels"
    if path not in ("kernels", "bmm"):
        raise ConfigError(f"LORA_EXP_PACK_LORA={path}: expected kernels or bmm")
    return path


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


def compiled(fn: Any, mode: str | None = None) -> Any:
    import torch._dynamo

    # one graph per shape (eval, train, each module width): allow more than the default 8
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    return torch.compile(fn, dynamic=False, mode=mode)


def init_lora_a(seed: int, key: int, r: int, in_features: int) -> torch.Tensor:
    """LoRA A ([r, in], peft's layout) as peft's default init draws it (kaiming-uniform with
    a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), from a generator seeded by (trial seed, module)."""
    g = torch.Generator().manual_seed(_mix_int((seed & M32) ^ key))
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(r, in_features, generator=g, dtype=torch.float32) * 2 - 1) * bound


@dataclass
class DropoutState:
    """The step a trial trained alone is at (set by the training loop before each forward)."""

    seed: int
    step: int = 0


class CounterDropout(nn.Module):
    """Drop-in for peft's lora_dropout: masks from `dropout_mask`, a function of the trial's seed,
    step, module, batch row and position only."""

    def __init__(self, p: float, key: int, state: DropoutState):
        super().__init__()
        self.p, self.key, self.state = p, key, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        rows = x.shape[0]
        device = x.device
        keys = row_keys(torch.full((rows,), self.state.seed, device=device),
                        torch.full((rows,), self.state.step, device=device), torch.arange(rows, device=device))
        p = torch.full((rows,), self.p, device=device, dtype=torch.float32)
        return x * dropout_mask(x, module_keys(keys, self.key), p)


# --- the packed model ---------------------------------------------------------------------------


@dataclass
class SlotSpec:
    """What a pack needs to know about one trial (built from its RunConfig by `slot_spec`)."""

    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    use_rslora: bool
    lr: float
    weight_decay: float
    max_grad_norm: float
    seed: int
    steps: int
    warmup: int
    scheduler: str

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class _Groups:
    """How the current batch's rows map to slots: `slots[g]` owns rows [g*rows, (g+1)*rows)."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None  # None = every slot, in order
        self.rows = 1
        self.enabled = True
        #: (row keys, dropout rate) per batch row while training; None = no dropout this step
        self.dropout: tuple[torch.Tensor, torch.Tensor] | None = None
        self.compile = False
        #: the LoRA delta of a whole-pack training forward through pack_lora's kernels, with
        #: `split` programs per slot
        self.kernels = False
        self.split = 1


class PackedLoraLayer(nn.Module):
    """A frozen linear (or GPT-2 Conv1D) plus one LoRA delta per slot, computed as two bmm's."""

    def __init__(self, base_layer: nn.Module, name: str, groups: _Groups, a: torch.Tensor, b: torch.Tensor,
                 scale: torch.Tensor, master_a: torch.Tensor, master_b: torch.Tensor, rank: torch.Tensor):
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self.key = module_key(name)
        self.groups = groups
        # views into the pack's flat buffers: the compute copy (the fp32 master itself, or its
        # bf16 copy when the pack trains in bf16) is what autograd sees
        self.lora_A = nn.Parameter(a)  # [K, R, in] (rank-major: a slot's rank r is a prefix)
        self.lora_B = nn.Parameter(b)  # [K, R, out]
        self.master = (master_a, master_b)
        self.register_buffer("scale", scale, persistent=False)  # [K]
        self.register_buffer("rank", rank, persistent=False)  # [K] int32: each slot's r here, 0 if untargeted
        self.active = False  # some slot targets this module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        g = self.groups
        if not self.active or not g.enabled:
            return y
        n_groups = x.shape[0] // g.rows
        xs = x.reshape(n_groups, -1, x.shape[-1])
        if g.kernels and g.slots is None and n_groups == self.rank.shape[0] and xs.shape[1] <= MAX_KERNEL_M:
            return y + self._kernel_delta(xs, g).reshape(y.shape).to(y.dtype)
        if g.dropout is not None and self.training:
            keys, p = g.dropout
            xr = xs.reshape(x.shape[0], -1)
            with torch.no_grad():
                # inside a compiled step the hash fuses into the multiply; eager, it is one kernel
                masker = dropout_mask if torch.compiler.is_compiling() else fused(dropout_mask, g.compile)
                mask = masker(xr.detach(), module_keys(keys, self.key), p)
            xs = (xr * mask).view_as(xs)
        a, b, s = self.lora_A, self.lora_B, self.scale
        if a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            a, b = self.master  # fp32 work (generation) of a bf16 pack: the fp32 weights
        if g.slots is not None:
            a, b, s = a.index_select(0, g.slots), b.index_select(0, g.slots), s.index_select(0, g.slots)
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b)  # autocast runs both in bf16 when asked
        delta = delta * s.to(delta.dtype).view(-1, 1, 1)
        return y + delta.reshape(y.shape).to(y.dtype)

    def _kernel_delta(self, xs: torch.Tensor, g: _Groups) -> torch.Tensor:
        """The same delta through pack_lora's kernels: each slot's own rank and modules only,
        the dropout mask computed where it is used."""
        from lora_exp import pack_lora

        dropout = None
        if g.dropout is not None and self.training:
            keys, p = g.dropout
            dropout = pack_lora.dropout_args(module_keys(keys, self.key), p, xs.dtype)
        return pack_lora.lora_delta(xs.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scale, self.rank,
                                    dropout, g.rows, g.split)


def _layer_shape(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def matches(name: str, targets: Iterable[str]) -> bool:
    """peft's rule for a list of target names: the module's name, or its last dotted parts."""
    return any(name == t or name.endswith("." + t) for t in targets)


class PackedModel:
    """The base model with every module any trial may target wrapped in a PackedLoraLayer.

    All LoRA weights of all slots live in one flat fp32 buffer [K, P] (the master weights; AdamW's
    moments in two more), laid out module by module, A then B. When the pack trains in bf16
    (`low_precision`), the forward reads a bf16 copy of it that the optimizer writes, exactly the
    values autocast would cast the master weights to at every use. `close()` puts the original
    modules back.
    """

    def __init__(self, base: Any, slots: int, max_rank: int, modules: Iterable[str], compile: str | None = None,
                 low_precision: bool = False):
        self.base = base
        self.model = base.model
        self.device = base.device
        self.k, self.rank = slots, max_rank
        self.groups = _Groups()
        self.mode = compile_mode(self.device) if compile is None else compile
        assert self.mode in COMPILE_MODES, self.mode
        self.groups.compile = self.compile = self.mode != "off"
        #: the whole training step is one compiled graph (full, graphs)
        self.whole_step = self.mode in ("full", "graphs")
        #: the Triton optimizer (pack_kernels) on CUDA; torch ops elsewhere
        self.kernels = self.compile and self.device.type == "cuda"
        #: the LoRA deltas of its compiled training step through pack_lora's kernels (each slot's
        #: own rank and modules only), else through bmm's over every slot padded to the pack's rank
        self.groups.kernels = self.kernels and self.whole_step and lora_path() == "kernels" and max_rank <= 64
        if self.groups.kernels:
            from lora_exp import pack_lora

            self.groups.split = pack_lora.split_for(slots, self.device)
        wanted = list(modules)
        found = [(name, mod, _layer_shape(mod)) for name, mod in self.model.named_modules()
                 if matches(name, wanted) and _layer_shape(mod) is not None]
        if not found:
            raise ValueError(f"the model has no linear module named {', '.join(wanted)}")
        sizes = [self.rank * (i + o) for _, _, (i, o) in found]
        total = sum(sizes)
        self.params = torch.zeros(slots, total, device=self.device)
        self.exp_avg = torch.zeros_like(self.params)
        self.exp_avg_sq = torch.zeros_like(self.params)
        self.low = self.params.to(torch.bfloat16) if low_precision else None
        compute = self.low if self.low is not None else self.params
        self.scales = torch.zeros(len(found), slots, device=self.device)
        self.ranks = torch.zeros(len(found), slots, device=self.device, dtype=torch.int32)
        self.layers: dict[str, PackedLoraLayer] = {}
        self._originals: list[tuple[nn.Module, str, nn.Module]] = []
        self.spans: dict[str, tuple[int, int, int, int]] = {}  # name -> (offset, in, out, index)
        #: per LoRA tensor (A, B of each layer): its [K, ...] views and each slot's live prefix
        self.tensors: list[tuple[slice, int]] = []  # (columns of the flat buffer, width per rank)
        offset = 0
        for index, ((name, module, (fin, fout)), size) in enumerate(zip(found, sizes)):
            cols_a, cols_b = slice(offset, offset + fin * self.rank), slice(offset + fin * self.rank, offset + size)
            shape_a, shape_b = (slots, self.rank, fin), (slots, self.rank, fout)
            layer = PackedLoraLayer(module, name, self.groups, compute[:, cols_a].view(shape_a),
                                    compute[:, cols_b].view(shape_b), self.scales[index],
                                    self.params[:, cols_a].view(shape_a), self.params[:, cols_b].view(shape_b),
                                    self.ranks[index])
            self.tensors += [(cols_a, fin), (cols_b, fout)]
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, layer)
            self._originals.append((parent, child, module))
            layer.active = self.whole_step
            self.layers[name] = layer
            self.spans[name] = (offset, fin, fout, index)
            offset += size
        self.weights = [w for layer in self.layers.values() for w in (layer.lora_A, layer.lora_B)]
        #: elements of each tensor's slot prefix the slot trains (r * width, 0 if untargeted)
        self.live_len = torch.zeros(len(self.tensors), slots, dtype=torch.int32, device=self.device)
        self.slot_len = torch.zeros_like(self.live_len)  # the same for every slot that holds a trial
        #: their host copies, and a count of their changes (the optimizer's list of live blocks
        #: is remade when it moves, without reading the device)
        self.live_host = np.zeros((len(self.tensors), slots), dtype=np.int32)
        self.slot_host = np.zeros_like(self.live_host)
        self.live_version = 0
        #: slots whose trial holds still (its parameters, moments and step count kept) while it
        #: waits for an eval's answer or its generations
        self.paused: set[int] = set()
        self.specs: list[SlotSpec | None] = [None] * slots
        self._rows: dict[tuple[Any, ...], torch.Tensor] = {}  # initial parameter rows by (seed, r, targets)
        self.targeting = {name: 0 for name in self.layers}  # live slots that target each module
        # per-slot optimizer settings and counters, on the device (no host sync in a step)
        z = lambda dtype=torch.float32: torch.zeros(slots, device=self.device, dtype=dtype)  # noqa: E731
        self.lr, self.wd, self.max_norm = z(), z(), z()
        self.seed, self.step, self.total, self.warmup = z(torch.int64), z(torch.int64), z(torch.int64), z(torch.int64)
        self.sched = z(torch.int64)  # 0 linear, 1 constant, 2 cosine
        self.p = z()
        self.live = z()  # 1.0 for a slot that holds a trial
        self._layout: Any = None  # pack_kernels.Layout of self.tensors, made at the first step

    # -- slots --

    def assign(self, slot: int, spec: SlotSpec) -> None:
        """Give `slot` to a new trial: fresh A (seeded), zero B, zero optimizer state."""
        missing = [t for t in spec.targets if not any(matches(n, [t]) for n in self.layers)]
        if missing:
            raise ValueError(f"this pack has no module {', '.join(missing)}")
        if spec.r > self.rank:
            raise ValueError(f"lora.r={spec.r} is above the pack's rank {self.rank}")
        for buf in (self.exp_avg, self.exp_avg_sq):
            buf[slot].zero_()
        scales = torch.zeros(len(self.layers))
        ranks = torch.zeros(len(self.layers), dtype=torch.int32)
        live = torch.zeros(len(self.tensors), dtype=torch.int32)
        for name, layer in self.layers.items():
            offset, fin, fout, index = self.spans[name]
            if matches(name, spec.targets):
                scales[index] = spec.scaling
                ranks[index] = spec.r
                live[2 * index], live[2 * index + 1] = spec.r * fin, spec.r * fout
                self.targeting[name] += 1
                layer.active = True
        # host-to-GPU copies from pinned memory, queued behind the step in flight: a copy from
        # ordinary host memory would wait for the GPU to finish it (~75 ms at K=1024, per trial)
        self.params[slot].copy_(self._initial_row(spec), non_blocking=True)
        if self.low is not None:
            self.low[slot].copy_(self.params[slot])
        self.scales[:, slot] = self.to_device(scales)
        self.ranks[:, slot] = self.to_device(ranks)
        self.live_len[:, slot] = self.to_device(live)
        self.slot_len[:, slot] = self.live_len[:, slot]
        self.live_host[:, slot] = self.slot_host[:, slot] = live.numpy()
        self.live_version += 1
        self.paused.discard(slot)
        self.specs[slot] = spec
        sched = {"linear": 0, "constant": 1, "cosine": 2}[spec.scheduler]
        for tensor, value in ((self.lr, spec.lr), (self.wd, spec.weight_decay), (self.max_norm, spec.max_grad_norm),
                              (self.seed, spec.seed), (self.step, 0), (self.total, spec.steps),
                              (self.warmup, spec.warmup), (self.sched, sched), (self.p, spec.dropout),
                              (self.live, 1.0)):
            tensor[slot] = value

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor on the pack's device, queued without waiting for the GPU (pinned on CUDA)."""
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def _initial_row(self, spec: SlotSpec) -> torch.Tensor:
        """The slot's parameters at the start (A seeded per module, B zero), built on the host;
        the same for every trial with this seed, rank and targets: kept (pinned on CUDA)."""
        key = (spec.seed, spec.r, tuple(spec.targets))
        row = self._rows.pop(key, None)
        if row is None:
            row = torch.zeros(self.params.shape[1])
            for name, layer in self.layers.items():
                offset, fin, _, _ = self.spans[name]
                if matches(name, spec.targets):
                    a = init_lora_a(spec.seed, layer.key, spec.r, fin)  # peft layout [r, in]
                    row[offset:offset + fin * self.rank].view(self.rank, fin)[:spec.r] = a
            if self.device.type == "cuda":
                row = row.pin_memory()
        self._rows[key] = row  # most recently used last
        while len(self._rows) > 16:
            self._rows.pop(next(iter(self._rows)))
        return row

    def pause(self, slots: list[int]) -> None:
        """These slots stop training, exactly where they are: no optimizer update (moments and
        step count kept), no loss, no data consumed, until `resume`. Queued without a host sync."""
        if slots:
            idx = self.to_device(torch.tensor(slots, dtype=torch.long))
            self.live.index_fill_(0, idx, 0.0)
            self.live_len.index_fill_(1, idx, 0)
            self.live_host[:, slots] = 0
            self.live_version += 1
            self.paused.update(slots)

    def resume(self, slots: list[int]) -> None:
        if slots:
            idx = self.to_device(torch.tensor(slots, dtype=torch.long))
            self.live.index_fill_(0, idx, 1.0)
            self.live_len.index_copy_(1, idx, self.slot_len.index_select(1, idx))
            self.live_host[:, slots] = self.slot_host[:, slots]
            self.live_version += 1
            self.paused.difference_update(slots)

    def release(self, slot: int) -> None:
        spec = self.specs[slot]
        if spec is not None:
            for name, layer in self.layers.items():
                if matches(name, spec.targets):
                    self.targeting[name] -= 1
                    # a compiled step keeps every layer on (a slot's scale 0 adds exactly nothing)
                    layer.active = self.targeting[name] > 0 or self.whole_step
        self.specs[slot] = None
        self.live[slot] = 0.0
        self.lr[slot] = 0.0
        self.scales[:, slot] = 0.0
        self.ranks[:, slot] = 0
        self.live_len[:, slot] = 0
        self.slot_len[:, slot] = 0
        self.live_host[:, slot] = self.slot_host[:, slot] = 0
        self.live_version += 1
        self.paused.discard(slot)
        for buf in (self.params, self.exp_avg, self.exp_avg_sq, self.low):
            if buf is not None:
                buf[slot].zero_()

    def close(self) -> None:
        """Unwrap: the base model is exactly as it was."""
        for parent, child, module in self._originals:
            setattr(parent, child, module)
        self._originals.clear()

    # -- one optimizer step for every slot --

    def lr_factor(self, step: torch.Tensor) -> torch.Tensor:
        """transformers' schedules (get_scheduler) at `step` (0-based), per slot."""
        s = step.to(torch.float64)
        total, warm = self.total.to(torch.float64), self.warmup.to(torch.float64)
        in_warmup = s < warm
        warm_f = s / warm.clamp(min=1)
        progress = (s - warm) / (total - warm).clamp(min=1)
        linear = torch.where(in_warmup, warm_f, ((total - s) / (total - warm).clamp(min=1)).clamp(min=0))
        cosine = torch.where(in_warmup, warm_f, (0.5 * (1 + torch.cos(math.pi * progress))).clamp(min=0))
        return torch.where(self.sched == 1, torch.ones_like(s), torch.where(self.sched == 2, cosine, linear))

    def gradients(self, loss: torch.Tensor) -> list[torch.Tensor | None]:
        """The LoRA tensors' gradients of `loss`, as the backward computes them. Not through
        .grad: autograd makes a gradient that is not laid out as its parameter contiguous first,
        and A's is a transposed view (2 GB copied a step at K=1024); the kernels read any layout."""
        return list(torch.autograd.grad(loss, self.weights, allow_unused=True))

    @torch.no_grad()
    def optimizer_step(self, grads: list[torch.Tensor | None] | None = None, betas: tuple[float, float] = (0.9, 0.999),
                       eps: float = 1e-8) -> None:
        """AdamW (torch's formula, decoupled weight decay) with per-slot lr, step count and
        gradient clipping (clip_grad_norm_ over the slot's own parameters), for all slots at once.
        Takes `grads` (from `gradients`), else the gradients left in each LoRA tensor's .grad
        (then cleared)."""
        if grads is None:
            grads = [w.grad for w in self.weights]
        grads = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, self.weights)]
        if self.kernels:
            from lora_exp import pack_kernels

            if self._layout is None:
                self._layout = pack_kernels.Layout([cols for cols, _ in self.tensors], self.device)
            norm = pack_kernels.sq_norms(self._layout, grads, self.live_len, self.k, self.live_host,
                                         self.live_version).sqrt()
        else:
            flat = torch.cat([g.reshape(self.k, -1).float() for g in grads], dim=1)
            norm = flat.pow(2).sum(dim=1).sqrt()
        coef = (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
        coef = torch.where(self.max_norm > 0, coef, torch.ones_like(coef))
        lr = (self.lr.to(torch.float64) * self.lr_factor(self.step)) * self.live
        self.step.add_(self.live.to(torch.int64))
        t = self.step.clamp(min=1).to(torch.float64)
        b1, b2 = betas
        step_size = (lr / (1 - b1 ** t)).to(torch.float32)
        bc2_sqrt = torch.sqrt(1 - b2 ** t).to(torch.float32)
        decay = (1 - lr * self.wd).to(torch.float32)
        if self.kernels:
            pack_kernels.adamw(self._layout, self.params, self.exp_avg, self.exp_avg_sq, self.low, grads,
                               self.live_len, coef, decay, step_size, bc2_sqrt, b1, b2, eps, self.live_host,
                               self.live_version)
        else:
            # the torch update runs on every row: a paused slot's zero gradient would decay its
            # moments, so its rows are put back (the kernels above skip it: live_len 0)
            held = torch.tensor(sorted(self.paused), dtype=torch.long, device=self.device) if self.paused else None
            kept = [(buf, buf.index_select(0, held)) for buf in (self.params, self.exp_avg, self.exp_avg_sq)] \
                if held is not None else []
            adamw_(self.params, flat, self.exp_avg, self.exp_avg_sq, coef.view(-1, 1), decay.view(-1, 1),
                   step_size.view(-1, 1), bc2_sqrt.view(-1, 1), b1, b2, eps)
            for buf, rows in kept:
                buf.index_copy_(0, held, rows)
            if self.low is not None:
                self.low.copy_(self.params)
        for w in self.weights:
            w.grad = None

    # -- extraction --

    def adapter_state(self, slot: int, row: torch.Tensor | None = None,
                      spec: SlotSpec | None = None) -> dict[str, torch.Tensor]:
        """The slot's weights as peft names them in adapter_model.safetensors (from `row`, the
        slot's parameters already copied to the host, if given: one copy, not two per module;
        with `spec`, the trial's, once its slot has gone to another)."""
        spec = spec or self.specs[slot]
        assert spec is not None
        params = self.params[slot] if row is None else row
        out = {}
        for name in self.layers:
            if not matches(name, spec.targets):
                continue
            offset, fin, fout, _ = self.spans[name]
            a = params[offset:offset + fin * self.rank].view(self.rank, fin)[:spec.r]
            b = params[offset + fin * self.rank:offset + self.rank * (fin + fout)].view(self.rank, fout)[:spec.r]
            out[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().cpu()
            out[f"base_model.model.{name}.lora_B.weight"] = b.T.contiguous().cpu()
        return out

    def save_adapter(self, slot: int, lora_config: Any, directory: str, row: torch.Tensor | None = None,
                     spec: SlotSpec | None = None) -> None:
        """A normal peft adapter folder (adapter_config.json + adapter_model.safetensors)."""
        from safetensors.torch import save_file

        lora_config.save_pretrained(directory)
        save_file(self.adapter_state(slot, row, spec), f"{directory}/adapter_model.safetensors",
                  metadata={"format": "pt"})


# --- attention over the pack's rows --------------------------------------------------------------

#: the attention implementation a pack trains and evaluates with (transformers' AttentionInterface)
CAUSAL_ROWS = "lora_exp_causal_rows"


def _causal_rows_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention with no mask tensor. A pack's rows (TokenTable) are padded on the right
    only, so the causal mask alone gives every real position exactly the keys its padding mask
    gives it (padded positions compute values no loss reads). On CUDA, rows this short go through
    pack_attention's kernels; elsewhere through sdpa with `is_causal`."""
    if query.is_cuda:
        from lora_exp import pack_attention

        if pack_attention.fits(query, key):
            return pack_attention.causal_attention(query, key, value, dropout, scaling), None
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: as transformers' repeat_kv
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling,
                                                     is_causal=True)
    return out.transpose(1, 2).contiguous(), None


def causal_rows_attention(model: Any) -> str | None:
    """Switch `model` to CAUSAL_ROWS if it attends through sdpa or eager attention with a plain
    causal mask (no sliding window, no logit soft-capping); returns the implementation it had, to
    restore, or None (unchanged). `LORA_EXP_PACK_ATTENTION=model` keeps the model's own."""
    config = model.config
    own = config._attn_implementation
    if (os.environ.get("LORA_EXP_PACK_ATTENTION", "rows") == "model" or own not in ("sdpa", "eager")
            or not getattr(model, "_supports_attention_backend", False)
            or getattr(config, "sliding_window", None) is not None
            or getattr(config, "attn_logit_softcapping", None) is not None
            or getattr(config, "reorder_and_upcast_attn", False) or getattr(config, "add_cross_attention", False)):
        return None
    from transformers import AttentionInterface

    AttentionInterface.register(CAUSAL_ROWS, _causal_rows_attention)
    model.set_attn_implementation(CAUSAL_ROWS)
    return own


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


# --- batches --------------------------------------------------------------------------------------


@dataclass
class TokenTable:
    """A data split as padded tensors on the device, so a step gathers its rows without Python."""

    ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    lengths: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, examples: list[Example], pad_id: int, device: torch.device, field_name: str = "labels") -> "TokenTable":
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
