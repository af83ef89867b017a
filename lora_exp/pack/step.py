"""A pack's training step, launched without waiting: each slot's rows gathered on the device from
its data order, the forward (the model's blocks compiled where `pack.compile` says), the backward
and the optimizer; under `graphs`, the whole step replayed as one CUDA graph (`graph.py`).

`PackTrainer` (trainer.py) decides which slots train and reads the results back; this holds what
the step itself needs: each slot's data order on the device, and whether dropout masks are made."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.profiler import record_function

from lora_exp.core.evaluation import autocast
from lora_exp.core.randomness import row_keys
from lora_exp.pack.compile import CompiledLayers, compiled
from lora_exp.pack.graph import StepGraph
from lora_exp.pack.optimizer import gradients, optimizer_step
from lora_exp.pack.rows import slot_losses
from lora_exp.pack.runtime import PackRuntime


def train_loss(model: Any, head: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, live: torch.Tensor,
               k: int, rows: int, compile: bool = False, first: torch.Tensor | None = None,
               span: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slot's mean loss and the sum that backward starts from (compiled as one graph in
    the `full` mode)."""
    losses = slot_losses(model, ids, mask, labels, k, rows, head, compile, first, span)
    return losses, (losses * live).sum()


class PackStep:
    """The step of a pack of `k` slots on `rt`."""

    def __init__(self, rt: PackRuntime, k: int):
        self.rt, self.k = rt, k
        pm = rt.pm
        self.train_loss = compiled(train_loss) if pm.whole_step else train_loss
        #: `layers`, `graphs`: each of the model's repeated blocks through one compiled graph while the pack trains
        self.layers = CompiledLayers(rt.base.model) if pm.mode in ("layers", "graphs") else None
        #: `graphs` where the step's deltas go through the LoRA kernels (`PackedModel.graphs`): the whole
        #: step recorded as one CUDA graph and replayed
        self.graph = StepGraph() if pm.graphs else None
        batch, device = rt.batch, rt.device
        #: each slot's example indices, step by step [K, steps, batch]
        self.schedule = torch.full((k, 1, batch), rt.train_table.empty, dtype=torch.long, device=device)
        self.arange = torch.arange(k, device=device)
        self.row_in_batch = torch.arange(batch, device=device).repeat(k)
        #: whether the step makes dropout masks (a compiled step always does: p=0 keeps every
        #: element, times exactly 1, so no recompile when the last trial with dropout leaves)
        self.dropout_on = False

    def set_order(self, slot: int, order: torch.Tensor) -> None:
        """The trial in `slot` reads its examples in `order` ([steps, batch], on the host); the
        table grows (a new tensor) when a trial is longer than any before it."""
        rt = self.rt
        if order.shape[0] > self.schedule.shape[1]:
            grown = torch.full((self.k, order.shape[0], rt.batch), rt.train_table.empty, dtype=torch.long,
                               device=rt.device)
            grown[:, :self.schedule.shape[1]] = self.schedule
            self.schedule = grown
        self.schedule[slot, :order.shape[0]] = rt.pm.to_device(order)

    def launch(self, sums: torch.Tensor) -> None:
        """One step of every live slot, queued; each slot's loss added to `sums` on the device."""
        if self.graph is None:
            self._launch(sums)
            return
        # what the recorded kernels depend on besides the buffers they read: the schedule's
        # tensor (remade when a longer trial joins) and whether dropout masks are computed
        self.graph.run((self.schedule.data_ptr(), self.schedule.shape, self.dropout_on), lambda: self._launch(sums))

    def _launch(self, sums: torch.Tensor) -> None:
        """Forward, backward and optimizer of every live slot, launched without waiting."""
        rt, pm = self.rt, self.rt.pm
        position = pm.step.clamp(max=self.schedule.shape[1] - 1)
        idx = self.schedule[self.arange, position]  # [K, batch]
        idx = torch.where(pm.live.bool().view(-1, 1), idx, rt.train_table.empty).view(-1)
        table = rt.train_table
        ids, mask, labels, first = table.ids[idx], table.mask[idx], table.labels[idx], table.first[idx]
        g = pm.groups
        g.slots, g.rows, g.enabled = None, rt.batch, True
        if self.dropout_on:
            b = rt.batch
            g.dropout = (row_keys(pm.seed.repeat_interleave(b), pm.step.repeat_interleave(b), self.row_in_batch),
                         pm.p.repeat_interleave(b))
        else:
            g.dropout = None
        with autocast(rt.device, rt.precision), record_function("pack.forward"), \
                self.layers.active() if self.layers is not None else contextlib.nullcontext():
            losses, total = self.train_loss(rt.base.model, rt.head, ids, mask, labels, pm.live, self.k, rt.batch,
                                            pm.compile, first, table.span)
        with record_function("pack.backward"):
            grads = gradients(pm, total)
        sums += losses.detach().double() * pm.live
        with record_function("pack.optimizer"):
            optimizer_step(pm, grads)
        g.dropout = None

    def close(self) -> None:
        if self.graph is not None:
            self.graph.close()
