"""The packed optimizer step on CUDA: two Triton kernels, each one launch over every LoRA tensor
of the pack, that touch only what each slot trains.

A pack stores every slot padded to the largest rank and to every module any trial may target;
in the seed's search about a third of that is live. The padding is exactly zero and stays zero
(its gradients are zero: a zero row of A gives zero B gradients and vice versa, and scale 0 gives
zero gradients to an untargeted module), so an optimizer that skips it computes the same update.
A is stored rank-major ([K, R, in]) and B as [K, R, out], so a slot's live part of each tensor is
one prefix: r * in (or r * out) elements, 0 where the slot does not target the module.

`sq_norms` gives each slot's gradient norm (clip_grad_norm_ over the slot's parameters) and
`adamw` applies torch.optim.AdamW's update (its formula and order of operations) to the fp32
master weights and moments, and writes the bf16 compute copy the forward reads when the pack
trains in bf16. No gradient is copied: autograd's fresh gradient tensors are read in place,
whatever their layout (A's comes out of the bmm's backward as a transposed view, [K, in, R] in
memory), through a small table of their addresses and strides.

Each kernel is one launch: program (slot, block) finds its tensor from the block's index (a
`Layout` of the pack's columns, made once). A GPT-2 pack has 144 LoRA tensors: per tensor, that
was 288 launches a step, most of them tiny, each with its own tail.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

#: elements a program updates, and its warps (the bench's `engine --kernel-configs` times others:
#: on the H200, 1024x4 steps a K=1024 GPT-2 pack in 59.9 ms against 63.9 for 4096x4, and its
#: heaviest mix in 75.2 against 87.0)
BLOCK = 1024
NUM_WARPS = 4
#: most programs along a launch's second axis (CUDA's grid limit); more blocks take more launches
MAX_BLOCKS = 65535
#: most programs of a launch over the list of live blocks (its one axis)
MAX_LIST = 2 ** 31 - 1
#: how the kernels launch (the bench's A/B): 2, one program per block a slot trains (a list of
#: them, remade when slots change); 1, one launch over every tensor's padded blocks, where programs
#: past a slot's live prefix exit at once (~2/3 of them in the seed's search); 0, one launch per tensor
GROUPED = 2


@triton.jit
def _block_of(blk, tensor_ptr, first_ptr, live_ptr, K, slot, BLOCK: tl.constexpr):
    """The tensor block `blk` of the launch belongs to, the block's start inside the slot's part
    of it, and the slot's live length there."""
    t = tl.load(tensor_ptr + blk)
    start = (blk - tl.load(first_ptr + t)) * BLOCK
    live = tl.load(live_ptr + t * K + slot)
    return t, start, live


@triton.jit
def _program_block(tensor_ptr, first_ptr, live_ptr, item_ptr, j_ptr, K, NT, blk0,
                   COMPACT: tl.constexpr, BLOCK: tl.constexpr):
    """This program's slot, block (its index in the launch's padded blocks; the compact list's
    index), tensor, the block's start inside the slot's part of the tensor, and the slot's live
    length there."""
    if COMPACT:  # 1-D: entry blk of the list of live blocks
        blk = blk0 + tl.program_id(0)
        item = tl.load(item_ptr + blk)
        slot = (item // NT).to(tl.int64)  # slot * stride passes 2^31 in a large pack
        t = item % NT
        start = tl.load(j_ptr + blk) * BLOCK
        live = tl.load(live_ptr + t * K + slot)
    else:
        slot = tl.program_id(0).to(tl.int64)
        blk = blk0 + tl.program_id(1)
        t, start, live = _block_of(blk, tensor_ptr, first_ptr, live_ptr, K, slot, BLOCK)
    return slot, blk, t, start, live


@triton.jit
def _grad_at(table_ptr, t, slot, offs, GTYPE: tl.constexpr, DENSE: tl.constexpr):
    """Where element `offs` of a slot's [R, width] gradient of tensor t is (rank-major order, as
    the parameters are stored): the slot's row itself when dense, else through the strides."""
    row = table_ptr + t * 5  # Layout.table's row of tensor t
    g_ptr = tl.load(row).to(tl.pointer_type(GTYPE))
    s0 = tl.load(row + 1)
    if DENSE:
        return g_ptr + slot * s0 + offs
    s1, s2, width = tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
    return g_ptr + slot * s0 + (offs // width) * s1 + (offs % width) * s2


@triton.jit
def _sq_norm_kernel(table_ptr, tensor_ptr, first_ptr, live_ptr, item_ptr, j_ptr, pos_ptr, out_ptr, K, NT,
                    out_stride, blk0, COMPACT: tl.constexpr, GTYPE: tl.constexpr, DENSE: tl.constexpr,
                    BLOCK: tl.constexpr):
    slot, blk, t, start, live = _program_block(tensor_ptr, first_ptr, live_ptr, item_ptr, j_ptr, K, NT,
                                               blk0, COMPACT, BLOCK)
    if start < live:
        offs = start + tl.arange(0, BLOCK)
        g = tl.load(_grad_at(table_ptr, t, slot, offs, GTYPE, DENSE), mask=offs < live, other=0.0).to(tl.float32)
        if COMPACT:  # the block's place among the slot's own
            tl.store(out_ptr + slot * out_stride + tl.load(pos_ptr + blk), tl.sum(g * g, axis=0))
        else:
            tl.store(out_ptr + slot * out_stride + blk, tl.sum(g * g, axis=0))


@triton.jit
def _adamw_kernel(p_ptr, m_ptr, v_ptr, low_ptr, table_ptr, tensor_ptr, first_ptr, col_ptr, live_ptr, item_ptr,
                  j_ptr, coef_ptr, decay_ptr, step_size_ptr, bc2_ptr, K, NT, p_stride, low_stride, b1, b2, eps, blk0,
                  COMPACT: tl.constexpr, GTYPE: tl.constexpr, HAS_LOW: tl.constexpr, DENSE: tl.constexpr,
                  BLOCK: tl.constexpr):
    slot, blk, t, start, live = _program_block(tensor_ptr, first_ptr, live_ptr, item_ptr, j_ptr, K, NT,
                                               blk0, COMPACT, BLOCK)
    if start < live:
        offs = start + tl.arange(0, BLOCK)
        mask = offs < live
        col = tl.load(col_ptr + t) + offs
        at = slot * p_stride + col
        g = tl.load(_grad_at(table_ptr, t, slot, offs, GTYPE, DENSE), mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + at, mask=mask, other=0.0)
        m = tl.load(m_ptr + at, mask=mask, other=0.0)
        v = tl.load(v_ptr + at, mask=mask, other=0.0)
        g = g * tl.load(coef_ptr + slot)
        p = p * tl.load(decay_ptr + slot)
        m = m + (1.0 - b1) * (g - m)  # lerp_(g, 1 - b1), weight < 0.5
        v = v * b2 + (1.0 - b2) * g * g
        denom = tl.sqrt(v) / tl.load(bc2_ptr + slot) + eps
        p = p - (m * tl.load(step_size_ptr + slot)) / denom
        tl.store(p_ptr + at, p, mask=mask)
        tl.store(m_ptr + at, m, mask=mask)
        tl.store(v_ptr + at, v, mask=mask)
        if HAS_LOW:
            tl.store(low_ptr + slot * low_stride + col, p.to(tl.bfloat16), mask=mask)


class Layout:
    """The pack's LoRA tensors as columns of its flat [K, P] buffers (`cols`, one slice each),
    cut into blocks of BLOCK elements: which tensor each block of a launch belongs to, and the
    first block of each tensor. Made once per pack (and per BLOCK, which the bench varies)."""

    def __init__(self, cols: list[slice], device: torch.device):
        self.cols, self.device = cols, device
        self.col = torch.tensor([c.start for c in cols], dtype=torch.int64, device=device)  # each tensor's first column
        self._by_block: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._table: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None
        self._live: tuple[Any, ...] | None = None

    def blocks(self, which: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """For the tensors `which`: each block's tensor, each tensor's first block, and the
        number of blocks."""
        key = (BLOCK, which)
        if key not in self._by_block:
            first, owner = [0] * len(self.cols), []
            for t in which:
                first[t] = len(owner)
                owner += [t] * triton.cdiv(self.cols[t].stop - self.cols[t].start, BLOCK)
            as_int = lambda xs: torch.tensor(xs, dtype=torch.int32, device=self.device)  # noqa: E731
            self._by_block[key] = (as_int(owner), as_int(first), len(owner))
        return self._by_block[key]

    def live_blocks(self, live: torch.Tensor, host: np.ndarray | None = None, version: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """The blocks the slots train, slot by slot and tensor by tensor: for each, `slot * NT +
        tensor`, its index in the tensor's part of the slot and its index among the slot's own
        blocks; their number and the most any slot has. Made on the device from `live` [NT, K];
        the two counts from its host copy `host` (no sync), and kept until `version` changes."""
        key = (BLOCK, version)
        if version is None or self._live is None or self._live[0] != key:
            if host is None:
                host = live.cpu().numpy()
            nt, k = host.shape
            per_slot = ((host.astype(np.int64) + BLOCK - 1) // BLOCK).sum(axis=0)
            total, widest = int(per_slot.sum()), int(per_slot.max(initial=0))
            counts = (live.to(torch.int64) + BLOCK - 1) // BLOCK
            flat = counts.t().reshape(-1)  # slot-major
            item = torch.repeat_interleave(torch.arange(k * nt, device=live.device), flat, output_size=total)
            index = torch.arange(total, device=live.device)
            in_tensor = index - (torch.cumsum(flat, 0) - flat)[item]
            per_slot_dev = counts.sum(dim=0)
            in_slot = index - (torch.cumsum(per_slot_dev, 0) - per_slot_dev)[item // nt]
            as_int = lambda x: x.to(torch.int32)  # noqa: E731
            self._live = (key, as_int(item), as_int(in_tensor), as_int(in_slot), total, widest)
        return self._live[1:]

    def table(self, grads: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """The gradients' table on the device, a row of five per gradient (address, three
        strides, width per rank; uploaded only when they change: the backward's allocations
        repeat step after step), and whether every slot's part of every gradient is one dense row."""
        rows: list[int] = []
        dense = True
        for g in grads:
            s0, s1, s2 = g.stride()
            rows += [g.data_ptr(), s0, s1, s2, g.shape[2]]
            dense &= s2 == 1 and (s1 == g.shape[2] or g.shape[1] == 1)
        key = tuple(rows)
        if self._table is None or self._table[0] != key:
            host = torch.tensor(rows, dtype=torch.int64, device="cpu")
            if self.device.type == "cuda":  # no sync: from pinned memory, which torch keeps until copied
                host = host.pin_memory()
            # the host copy is kept: a step recorded as a CUDA graph copies from it at every replay
            self._table = (key, host.to(self.device, non_blocking=True), host)
        return self._table[1], dense


def _gtype(grads: list[torch.Tensor]):
    dtypes = {g.dtype for g in grads}
    assert len(dtypes) == 1, dtypes
    return {torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float16: tl.float16}[dtypes.pop()]


def _groups(n: int, grouped: int) -> list[tuple[int, ...]]:
    return [tuple(range(n))] if grouped else [(t,) for t in range(n)]


def _grouped(listed: bool) -> int:
    """GROUPED, or one launch over the padded blocks where a list of live blocks is not wanted
    (a step recorded as a CUDA graph, whose launches cannot change as slots come and go)."""
    return GROUPED if listed or GROUPED != 2 else 1


def sq_norms(layout: Layout, grads: list[torch.Tensor], live: torch.Tensor, k: int, live_host: np.ndarray | None = None,
             version: int | None = None, listed: bool = True) -> torch.Tensor:
    """Each slot's squared gradient norm [K] over `grads` (one [K, R, width] tensor per LoRA
    tensor, any strides; `live[i, slot]` = elements of slot's prefix in tensor i that it trains;
    `live_host`, its host copy, and `version`, which changes with it: see Layout.live_blocks)."""
    table, dense = layout.table(grads)
    gtype = _gtype(grads)
    nt = len(grads)
    grouped = _grouped(listed)
    if grouped == 2:
        item, in_tensor, in_slot, total, widest = layout.live_blocks(live, live_host, version)
        partial = torch.zeros(k, max(1, widest), device=live.device, dtype=torch.float32)
        for lo in range(0, total, MAX_LIST):
            _sq_norm_kernel[(min(MAX_LIST, total - lo),)](table, table, table, live, item, in_tensor, in_slot, partial,
                                                          k, nt, partial.stride(0), lo, COMPACT=True, GTYPE=gtype,
                                                          DENSE=dense, BLOCK=BLOCK, num_warps=NUM_WARPS)
        return partial.sum(dim=1)
    launches = [layout.blocks(which) for which in _groups(nt, grouped)]
    partial = torch.zeros(len(launches), k, max(n for *_, n in launches), device=live.device, dtype=torch.float32)
    for i, (owner, first, n) in enumerate(launches):
        for lo in range(0, n, MAX_BLOCKS):
            _sq_norm_kernel[(k, min(MAX_BLOCKS, n - lo))](table, owner, first, live, owner, owner, owner, partial[i],
                                                          k, nt, partial.stride(1), lo, COMPACT=False, GTYPE=gtype,
                                                          DENSE=dense, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return partial.sum(dim=(0, 2))


def adamw(layout: Layout, params: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
          low: torch.Tensor | None, grads: list[torch.Tensor], live: torch.Tensor, coef: torch.Tensor,
          decay: torch.Tensor, step_size: torch.Tensor, bc2_sqrt: torch.Tensor, b1: float, b2: float,
          eps: float, live_host: np.ndarray | None = None, version: int | None = None, listed: bool = True) -> None:
    """AdamW on each slot's live prefix of each tensor of the flat [K, P] master weights and
    moments (and their bf16 copy `low`); per-slot [K] coef, decay, step size and bias correction
    as `pack.optimizer.adamw_` takes them."""
    table, dense = layout.table(grads)
    gtype = _gtype(grads)
    k, nt = params.shape[0], len(grads)
    out = low if low is not None else params
    common = dict(GTYPE=gtype, HAS_LOW=low is not None, DENSE=dense, BLOCK=BLOCK, num_warps=NUM_WARPS)
    grouped = _grouped(listed)
    if grouped == 2:
        item, in_tensor, _, total, _ = layout.live_blocks(live, live_host, version)
        for lo in range(0, total, MAX_LIST):
            _adamw_kernel[(min(MAX_LIST, total - lo),)](
                params, exp_avg, exp_avg_sq, out, table, table, table, layout.col, live, item, in_tensor, coef, decay,
                step_size, bc2_sqrt, k, nt, params.stride(0), out.stride(0), b1, b2, eps, lo, COMPACT=True, **common)
        return
    for which in _groups(nt, grouped):
        owner, first, n = layout.blocks(which)
        for lo in range(0, n, MAX_BLOCKS):
            _adamw_kernel[(k, min(MAX_BLOCKS, n - lo))](
                params, exp_avg, exp_avg_sq, out, table, owner, first, layout.col, live, owner, owner, coef, decay,
                step_size, bc2_sqrt, k, nt, params.stride(0), out.stride(0), b1, b2, eps, lo, COMPACT=False, **common)
