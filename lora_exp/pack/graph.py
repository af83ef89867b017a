"""The packed training step recorded once as a CUDA graph and replayed (`pack.compile=graphs`).

A pack with short rows launches ~1,500 kernels a step that each do little: the seed's GPT-2 step
at K=1024 is ~53 ms of GPU work, and the host needs about as long to launch it, so anything else
the host does (reading losses back, writing adapters, starting trials) makes the step longer.
Replayed as one graph, a step costs the host one launch.

What makes this possible is that the step's kernels never change while the pack trains: every
shape is fixed, every slot's settings, step count and live prefix are read on the device from
buffers that are written in place, and the optimizer runs over every slot's padded blocks (the
programs past a slot's live prefix exit), not over a list of live blocks remade on the host as
trials come and go. What can change the recorded kernels is part of the key given to `run`: a
new key runs one step as usual first (it compiles what is new, and makes the tables the step
reuses), then records the next.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable

import torch


class StepGraph:
    """One recorded step, replayed while its key holds."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: Hashable = None
        self._ran: Hashable = None  # the key the last unrecorded step ran with
        #: how many times the step was recorded (once, unless its key changed), and replayed
        self.recorded = self.replays = 0

    def run(self, key: Hashable, launch: Callable[[], Any]) -> None:
        """One step: `launch()` queues it (forward, backward, optimizer), with no host sync and
        no host-to-device copy that is not from pinned memory."""
        if self.graph is not None and key == self.key:
            self.graph.replay()
            self.replays += 1
            return
        self.graph = None  # its memory goes back to the pool before another is recorded
        if key != self._ran:
            launch()
            self._ran = key
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            launch()  # recorded, not run
        graph.replay()
        self.graph, self.key = graph, key
        self.recorded += 1

    def close(self) -> None:
        self.graph = None
