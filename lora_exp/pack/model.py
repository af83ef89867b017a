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

from lora_exp.core.randomness import init_lora_a
from lora_exp.pack.compile import COMPILE_MODES, compile_mode
from lora_exp.pack.layers import Groups, PackedLoraLayer, layer_shape, matches, swiglu_class, swiglu_mlp


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
    #: how A starts (config.PACKED_INITS, LoraSettings.unpackable)
    init: str = "default"

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def kernel_deltas(mode: str, device: torch.device, lora: str, max_rank: int) -> bool:
    """A pack compiled in `mode` (`pack.compile`, resolved) computes its training step's LoRA
    deltas with the LoRA kernels (`kernels.lora`): a `layers`, `full` or `graphs` step on CUDA,
    `pack.lora=kernels`, ranks up to 64; else through bmm's over every slot padded to the pack's rank."""
    return mode in ("layers", "full", "graphs") and device.type == "cuda" and lora == "kernels" and max_rank <= 64


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
        #: the whole training step is one compiled graph (full)
        self.whole_step = self.mode == "full"
        #: the step's compiled graphs (the whole step's, or the layers') stay the same as trials come
        #: and go: every wrapped layer stays on (a slot's scale 0 adds exactly nothing) and the
        #: dropout masks are always computed (p=0 keeps every element)
        self.static = self.mode in ("layers", "full", "graphs")
        #: the Triton optimizer (kernels.adamw) on CUDA; torch ops elsewhere
        self.kernels = self.compile and self.device.type == "cuda"
        #: the LoRA deltas of its compiled training step through the LoRA kernels (kernels.lora) (each slot's
        #: own rank and modules only), else through bmm's over every slot padded to the pack's rank
        self.groups.kernels = kernel_deltas(self.mode, self.device, lora, max_rank)
        if self.groups.kernels:
            from lora_exp.pack.kernels.lora import split_for

            self.groups.split = split_for(slots, self.device)
        #: the step (layers compiled) recorded as one CUDA graph and replayed (`pack.graph`), where it
        #: goes through the LoRA kernels (the step measured and tested so); elsewhere `graphs` is `layers`
        self.graphs = self.mode == "graphs" and self.groups.kernels
        wanted = list(modules)
        found = [(name, mod, layer_shape(mod)) for name, mod in self.model.named_modules()
                 if matches(name, wanted) and layer_shape(mod) is not None]
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
        #: SwiGLU MLPs whose down projection is wrapped run `swiglu_forward` (their activation fused
        #: with the down projection's LoRA delta where a step goes through the LoRA kernels; their
        #: own forward's ops elsewhere)
        self._swiglu = [m for m in self.model.modules() if swiglu_mlp(m)]
        for mlp in self._swiglu:
            mlp.__class__ = swiglu_class(type(mlp))
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
        self._columns: dict[tuple[int, ...], torch.Tensor] = {}  # `columns` by each tensor's live prefix
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
        for mlp in self._swiglu:
            mlp.__class__ = type(mlp).__bases__[0]  # its own class again
        self._swiglu.clear()
        for parent, child, module in self._originals:
            setattr(parent, child, module)
        self._originals.clear()
    # -- a slot as a peft adapter --

    def columns(self, slot: int) -> torch.Tensor:
        """The columns of the flat buffers the trial in `slot` trains, on the device: each
        tensor's live prefix (r x width, none where it is not targeted), in the buffers' order."""
        key = tuple(int(n) for n in self.slot_host[:, slot])
        cols = self._columns.get(key)
        if cols is None:
            parts = [torch.arange(c.start, c.start + n) for (c, _), n in zip(self.tensors, key)]
            cols = self._columns[key] = self.to_device(torch.cat(parts))
        return cols

    def adapter_state(self, slot: int, row: torch.Tensor | None = None,
                      spec: SlotSpec | None = None) -> dict[str, torch.Tensor]:
        """The slot's weights as peft names them in adapter_model.safetensors, from `row`, the
        slot's trained columns (`columns`) already copied to the host (one copy of what the trial
        trains, not two per module), with `spec`, the trial's, once its slot has gone to another;
        without `row`, from the slot itself."""
        spec = spec or self.specs[slot]
        assert spec is not None
        if row is None:
            row = self.params[slot].index_select(0, self.columns(slot))
        out, at = {}, 0
        for name in self.layers:  # each targeted module's A (r x in), then its B (r x out)
            if not matches(name, spec.targets):
                continue
            _, fin, fout, _ = self.spans[name]
            a = row[at:at + spec.r * fin].view(spec.r, fin)
            b = row[at + spec.r * fin:at + spec.r * (fin + fout)].view(spec.r, fout)
            at += spec.r * (fin + fout)
            out[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().cpu()
            out[f"base_model.model.{name}.lora_B.weight"] = b.T.contiguous().cpu()
        if at != row.numel():
            raise ValueError(f"a row of {row.numel()} columns for a trial that trains {at}")
        return out

    def save_adapter(self, slot: int, lora_config: Any, directory: str, row: torch.Tensor | None = None,
                     spec: SlotSpec | None = None) -> None:
        """A normal peft adapter folder (adapter_config.json + adapter_model.safetensors)."""
        from safetensors.torch import save_file

        lora_config.save_pretrained(directory)
        save_file(self.adapter_state(slot, row, spec), f"{directory}/adapter_model.safetensors",
                  metadata={"format": "pt"})
