"""The pack's wrapped linear layers: `PackedLoraLayer` adds every slot's LoRA delta to a base
layer's output (each slot on its own row group, `Groups`), through the LoRA kernels in a compiled
CUDA step and through bmm's elsewhere; `matches` is peft's rule for which modules a trial
targets. `model.PackedModel` wraps the base model's modules in them."""
from __future__ import annotations

import functools
from typing import Iterable

import torch
from torch import nn

from lora_exp.core.randomness import dropout_mask, dropout_mask_int32, module_key, module_keys
from lora_exp.pack.compile import fused


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
        whole = self._whole_pack(x)
        if whole:
            out = self._kernel_linear(x, g)
            if out is not None:
                return out
        y = self.base_layer(x)
        if not self.active or not g.enabled:
            return y
        n_groups = x.shape[0] // g.rows
        xs = x.reshape(n_groups, -1, x.shape[-1])
        if whole:
            return y + self._kernel_delta(xs, g).reshape(y.shape).to(y.dtype)
        # the input in the LoRA weights' own dtype (fp32), as peft casts it before its dropout: a bf16
        # base's activations, or a bf16 output of autocast (attention's, the MLP's activation)
        xs = xs.to(self.master[0].dtype)
        if g.dropout is not None and self.training:
            keys, p = g.dropout
            xr = xs.reshape(x.shape[0], -1)
            with torch.no_grad():
                # inside a compiled step the hash fuses into the multiply (one kernel with `parts`);
                # eager (the CPU, `compile=off`), the same mask in 32-bit lanes, in place
                if torch.compiler.is_compiling():
                    masker = dropout_mask
                elif g.compile:
                    masker = fused(dropout_mask, True)
                else:
                    masker = dropout_mask_int32
                mask = masker(xr.detach(), module_keys(keys, self.key_t), p)
            xs = (xr * mask).view_as(xs)
        a, b, s = self.lora_A, self.lora_B, self.scale
        if a.dtype != xs.dtype and not torch.is_autocast_enabled(x.device.type):
            a, b = self.master  # fp32 work (generation) of a bf16 pack: the fp32 weights
        if g.slots is not None:
            a, b, s = a.index_select(0, g.slots), b.index_select(0, g.slots), s.index_select(0, g.slots)
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b)  # autocast runs both in bf16 when asked
        delta = delta * s.to(delta.dtype).view(-1, 1, 1)
        return (y + delta.reshape(y.shape)).to(y.dtype)  # added in the wider dtype, then rounded, as peft does

    def _dropout_args(self, g: Groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The kernels' dropout: its scale rounded in the LoRA weights' dtype (fp32), where peft's
        dropout sees the input (cast to that dtype before it), whatever dtype the kernels read."""
        from lora_exp.pack.kernels import lora

        if g.dropout is None or not self.training:
            return None
        keys, p = g.dropout
        return lora.dropout_args(module_keys(keys, self.key_t), p, self.master[0].dtype)

    def _whole_pack(self, x: torch.Tensor) -> bool:
        """A whole-pack training forward through the LoRA kernels (every slot's rows, in order)."""
        g = self.groups
        return (self.active and g.enabled and g.kernels and g.slots is None
                and x.shape[0] // g.rows == self.rank.shape[0])

    def _plain_base(self) -> bool:
        """The base layer is a frozen linear layer (or Conv1D) in the compute dtype: not quantized,
        not fp32 weights under a bf16 pack's fp32 generation."""
        base, dtype = self.base_layer, self.lora_A.dtype
        weight, bias = base.weight, getattr(base, "bias", None)
        return ((type(base).__name__ == "Conv1D" or type(base) is nn.Linear) and weight.dtype == dtype
                and not weight.requires_grad and (bias is None or (bias.dtype == dtype and not bias.requires_grad)))

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
        """This layer on silu(gate) * up, a SwiGLU MLP's down projection, with the activation and
        the LoRA delta in one op (`kernels.swiglu`) in a whole-pack training step through the
        kernels; None elsewhere (the MLP runs as it is)."""
        from lora_exp.pack.kernels import lora, swiglu

        if not (lora.SWIGLU and self._whole_pack(gate) and self._plain_base() and type(self.base_layer) is nn.Linear
                and gate.dtype == up.dtype == self.lora_A.dtype and gate.shape == up.shape):
            return None
        k = self.rank.shape[0]
        out = swiglu.swiglu_lora_linear(gate.reshape(k, -1, gate.shape[-1]), up.reshape(k, -1, up.shape[-1]),
                                        self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                                        self.scale, self.rank, self._dropout_args(self.groups),
                                        self.groups.rows, self.groups.split)
        return out.reshape(*gate.shape[:-1], out.shape[-1])

    def _kernel_linear(self, x: torch.Tensor, g: Groups) -> torch.Tensor | None:
        """The base layer and the LoRA kernels' delta as one op (`kernels.lora.lora_linear`): the
        delta added in place where a slot targets the module, nothing done where it does not.
        None where the base layer is not `_plain_base` or x is not in the compute dtype (nor
        autocast to it): the caller adds the delta."""
        from lora_exp.pack.kernels import lora

        base, dtype = self.base_layer, self.lora_A.dtype
        conv = type(base).__name__ == "Conv1D"
        weight, bias = base.weight, getattr(base, "bias", None)
        autocast = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == dtype
        if not self._plain_base() or (x.dtype != dtype and not autocast):
            return None
        xs = x.reshape(self.rank.shape[0], -1, x.shape[-1]).to(dtype)
        out = lora.lora_linear(xs, weight, bias, conv, self.lora_A, self.lora_B, self.scale, self.rank,
                               self._dropout_args(g), g.rows, g.split)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _kernel_delta(self, xs: torch.Tensor, g: Groups) -> torch.Tensor:
        """The same delta through the LoRA kernels, alone (each slot's own rank and modules only,
        the dropout mask computed where it is used)."""
        from lora_exp.pack.kernels import lora

        return lora.lora_delta(xs.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scale, self.rank,
                               self._dropout_args(g), g.rows, g.split)


#: the MLPs whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)): with SiLU as
#: act_fn, `swiglu_forward` runs them
SWIGLU_MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP", "Olmo2MLP", "GraniteMLP")


def swiglu_mlp(module: nn.Module) -> bool:
    """A SwiGLU MLP whose down projection is packed: `swiglu_forward` may run it."""
    return (type(module).__name__ in SWIGLU_MLPS and isinstance(getattr(module, "down_proj", None), PackedLoraLayer)
            and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            and all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj")))


@functools.cache
def swiglu_class(cls: type) -> type:
    """`cls` with `swiglu_forward` as its forward: a pack's SwiGLU MLPs take this class while it
    runs. A class rather than a forward bound to each module, because compiled layers guard on
    what `mlp.forward` is: one bound object per layer compiled one graph per layer (30 on
    SmolLM2), and a new one per pack compiled them all again. Same name, so checks by class
    name (`swiglu_mlp`, the model families) see the model's own."""
    return type(cls.__name__, (cls,), {"forward": swiglu_forward, "__module__": cls.__module__,
                                        "__qualname__": cls.__qualname__})


def swiglu_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A SwiGLU MLP's forward (`swiglu_mlp`), the activation fused with the down projection's LoRA
    delta where `PackedLoraLayer.swiglu` can (a whole-pack training step through the kernels)."""
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    out = mlp.down_proj.swiglu(gate, up)
    return out if out is not None else mlp.down_proj(mlp.act_fn(gate) * up)


def layer_shape(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def matches(name: str, targets: Iterable[str]) -> bool:
    """peft's rule for a list of target names: the module's name, or its last dotted parts."""
    return any(name == t or name.endswith("." + t) for t in targets)
