"""The packed model: every module any trial may target wrapped in a `PackedLoraLayer`, every
slot's LoRA weights in one flat buffer.

Each trial owns a *slot*: its own slice of every LoRA A/B matrix (padded to the pack's largest
rank; the padding is zero and stays zero), its own scale (alpha/r, 0 where it does not target a
module), dropout rate, seed, data order, learning-rate schedule, AdamW state and gradient
clipping. One batch row group per slot; the frozen base runs once on the whole batch. A slot is
freed when its trial finishes or is pruned, and a new trial takes it (continuous batching).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from lora_exp.core.randomness import dropout_mask, init_lora_a, module_key, module_keys
from lora_exp.pack.compile import COMPILE_MODES, compile_mode, fused


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
    #: how A starts (config.PACKED_INITS)
    init: str = "default"

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class Groups:
    """How the current batch's rows map to slots: `slots[g]` owns rows [g*rows, (g+1)*rows)."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None  # None = every slot, in order
        self.rows = 1
        self.enabled = True
        #: (row keys, dropout rate) per batch row while training; None = no dropout this step
        self.dropout: tuple[torch.Tensor, torch.Tensor] | None = None
        self.compile = False
        #: the LoRA delta of a whole-pack training forward through the LoRA kernels (kernels.lora), with
        #: `split` programs per slot
        self.kernels = False
        self.split = 1


class PackedLoraLayer(nn.Module):
    """A frozen linear (or GPT-2 Conv1D) plus one LoRA delta per slot: two bmm's, or the pack's
    LoRA kernels (`kernels.lora`)."""

    #: stays in training mode when the frozen base is put in eval mode (core.adapters.train_mode)
    adapter_module = True

    def __init__(self, base_layer: nn.Module, name: str, groups: Groups, a: torch.Tensor, b: torch.Tensor,
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
        # the module's key as a tensor: a compiled layer's graph takes it as an input (one graph
        # for every layer), where a Python int would be a constant of a graph per layer
        self.register_buffer("key_t", torch.tensor(self.key, dtype=torch.int64, device=scale.device),
                             persistent=False)
        self.active = False  # some slot targets this module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        whole = self.active and g.enabled and g.kernels and g.slots is None
        if whole and x.shape[0] // g.rows == self.rank.shape[0]:
            out = self._kernel_linear(x, g)
            if out is not None:
                return out
        y = self.base_layer(x)
        if not self.active or not g.enabled:
            return y
        n_groups = x.shape[0] // g.rows
        xs = x.reshape(n_groups, -1, x.shape[-1])
        if whole and n_groups == self.rank.shape[0]:
            return y + self._kernel_delta(xs, g).reshape(y.shape).to(y.dtype)
        if g.dropout is not None and self.training:
            keys, p = g.dropout
            xr = xs.reshape(x.shape[0], -1)
            with torch.no_grad():
                # inside a compiled step the hash fuses into the multiply; eager, it is one kernel
                masker = dropout_mask if torch.compiler.is_compiling() else fused(dropout_mask, g.compile)
                mask = masker(xr.detach(), module_keys(keys, self.key_t), p)
            xs = (xr * mask).view_as(xs)
        a, b, s = self.lora_A, self.lora_B, self.scale
        if a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            a, b = self.master  # fp32 work (generation) of a bf16 pack: the fp32 weights
        if g.slots is not None:
            a, b, s = a.index_select(0, g.slots), b.index_select(0, g.slots), s.index_select(0, g.slots)
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b)  # autocast runs both in bf16 when asked
        delta = delta * s.to(delta.dtype).view(-1, 1, 1)
        return y + delta.reshape(y.shape).to(y.dtype)

    def _dropout_args(self, g: Groups, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        from lora_exp.pack.kernels import lora

        if g.dropout is None or not self.training:
            return None
        keys, p = g.dropout
        return lora.dropout_args(module_keys(keys, self.key_t), p, dtype)

    def _kernel_linear(self, x: torch.Tensor, g: Groups) -> torch.Tensor | None:
        """The base layer and the LoRA kernels' delta as one op (`kernels.lora.lora_linear`): the
        delta added in place where a slot targets the module, nothing done where it does not.
        None where the base layer is not a plain linear layer in the compute dtype (quantized,
        or fp32 weights under a bf16 pack's fp32 generation): the caller adds the delta."""
        from lora_exp.pack.kernels import lora

        base, dtype = self.base_layer, self.lora_A.dtype
        conv = type(base).__name__ == "Conv1D"
        weight, bias = base.weight, getattr(base, "bias", None)
        autocast = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == dtype
        if (not (conv or type(base) is nn.Linear) or weight.dtype != dtype or weight.requires_grad
                or (bias is not None and (bias.dtype != dtype or bias.requires_grad))
                or (x.dtype != dtype and not autocast)):
            return None
        xs = x.reshape(self.rank.shape[0], -1, x.shape[-1]).to(dtype)
        out = lora.lora_linear(xs, weight, bias, conv, self.lora_A, self.lora_B, self.scale, self.rank,
                               self._dropout_args(g, x.dtype), g.rows, g.split)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _kernel_delta(self, xs: torch.Tensor, g: Groups) -> torch.Tensor:
        """The same delta through the LoRA kernels, alone (each slot's own rank and modules only,
        the dropout mask computed where it is used)."""
        from lora_exp.pack.kernels import lora

        return lora.lora_delta(xs.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scale, self.rank,
                               self._dropout_args(g, xs.dtype), g.rows, g.split)


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

    def __init__(self, base: Any, slots: int, max_rank: int, modules: Iterable[str], compile: str = "auto",
                 low_precision: bool = False, lora: str = "kernels"):
        self.base = base
        self.model = base.model
        self.device = base.device
        self.k, self.rank = slots, max_rank
        self.groups = Groups()
        self.mode = compile_mode(compile, self.device)
        assert self.mode in COMPILE_MODES, self.mode
        self.groups.compile = self.compile = self.mode != "off"
        #: the whole training step is one compiled graph (full, graphs)
        self.whole_step = self.mode in ("full", "graphs")
        #: the step's compiled graphs (the whole step's, or the layers') stay the same as trials come
        #: and go: every wrapped layer stays on (a slot's scale 0 adds exactly nothing) and the
        #: dropout masks are always computed (p=0 keeps every element)
        self.static = self.mode in ("layers", "full", "graphs")
        #: the Triton optimizer (kernels.adamw) on CUDA; torch ops elsewhere
        self.kernels = self.compile and self.device.type == "cuda"
        #: the LoRA deltas of its compiled training step through the LoRA kernels (kernels.lora) (each slot's
        #: own rank and modules only), else through bmm's over every slot padded to the pack's rank
        self.groups.kernels = self.kernels and self.static and lora == "kernels" and max_rank <= 64
        if self.groups.kernels:
            from lora_exp.pack.kernels.lora import split_for

            self.groups.split = split_for(slots, self.device)
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
            layer.active = self.static
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
        self._rows: dict[tuple[Any, ...], torch.Tensor] = {}  # initial parameter rows by (seed, r, targets, init)
        self.targeting = {name: 0 for name in self.layers}  # live slots that target each module
        # per-slot optimizer settings and counters, on the device (no host sync in a step)
        z = lambda dtype=torch.float32: torch.zeros(slots, device=self.device, dtype=dtype)  # noqa: E731
        self.lr, self.wd, self.max_norm = z(), z(), z()
        self.seed, self.step, self.total, self.warmup = z(torch.int64), z(torch.int64), z(torch.int64), z(torch.int64)
        self.sched = z(torch.int64)  # 0 linear, 1 constant, 2 cosine
        self.p = z()
        self.live = z()  # 1.0 for a slot that holds a trial
        self.layout: Any = None  # kernels.adamw.Layout of self.tensors, made at the first step

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
        key = (spec.seed, spec.r, tuple(spec.targets), spec.init)
        row = self._rows.pop(key, None)
        if row is None:
            row = torch.zeros(self.params.shape[1])
            for name, layer in self.layers.items():
                offset, fin, _, _ = self.spans[name]
                if matches(name, spec.targets):
                    a = init_lora_a(spec.seed, layer.key, spec.r, fin, spec.init)  # peft layout [r, in]
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
                    layer.active = self.targeting[name] > 0 or self.static
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
    # -- a slot as a peft adapter --

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
