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
#: one launch over all tensors; False: one launch per tensor (the same kernels; the bench's A/B)
GROUPED = True


@triton.jit
def _block_of(blk, tensor_ptr, first_ptr, live_ptr, K, slot, BLOCK: tl.constexpr):
    """The tensor block `blk` of the launch belongs to, the block's start inside the slot's part
    of it, and the slot's live length there."""
    t = tl.load(tensor_ptr + blk)
    start = (blk - tl.load(first_ptr + t)) * BLOCK
    live = tl.load(live_ptr + t * K + slot)
    return t, start, live


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
def _sq_norm_kernel(table_ptr, tensor_ptr, first_ptr, live_ptr, out_ptr, K, out_stride, blk0,
                    GTYPE: tl.constexpr, DENSE: tl.constexpr, BLOCK: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)  # slot * stride passes 2^31 in a large pack
    blk = blk0 + tl.program_id(1)
    t, start, live = _block_of(blk, tensor_ptr, first_ptr, live_ptr, K, slot, BLOCK)
    if start < live:
        offs = start + tl.arange(0, BLOCK)
        g = tl.load(_grad_at(table_ptr, t, slot, offs, GTYPE, DENSE), mask=offs < live, other=0.0).to(tl.float32)
        tl.store(out_ptr + slot * out_stride + blk, tl.sum(g * g, axis=0))


@triton.jit
def _adamw_kernel(p_ptr, m_ptr, v_ptr, low_ptr, table_ptr, tensor_ptr, first_ptr, col_ptr, live_ptr, coef_ptr,
                  decay_ptr, step_size_ptr, bc2_ptr, K, p_stride, low_stride, b1, b2, eps, blk0,
                  GTYPE: tl.constexpr, HAS_LOW: tl.constexpr, DENSE: tl.constexpr, BLOCK: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)  # slot * stride passes 2^31 in a large pack (K=1024: 2.4e9)
    blk = blk0 + tl.program_id(1)
    t, start, live = _block_of(blk, tensor_ptr, first_ptr, live_ptr, K, slot, BLOCK)
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
        self._table: tuple[tuple[int, ...], torch.Tensor] | None = None

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
            self._table = (key, host.to(self.device, non_blocking=True))
        return self._table[1], dense


def _gtype(grads: list[torch.Tensor]):
    dtypes = {g.dtype for g in grads}
    assert len(dtypes) == 1, dtypes
    return {torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float16: tl.float16}[dtypes.pop()]


def _groups(n: int) -> list[tuple[int, ...]]:
    return [tuple(range(n))] if GROUPED else [(t,) for t in range(n)]


def sq_norms(layout: Layout, grads: list[torch.Tensor], live: torch.Tensor, k: int) -> torch.Tensor:
    """Each slot's squared gradient norm [K] over `grads` (one [K, R, width] tensor per LoRA
    tensor, any strides; `live[i, slot]` = elements of slot's prefix in tensor i that it trains)."""
    table, dense = layout.table(grads)
    gtype = _gtype(grads)
    launches = [layout.blocks(which) for which in _groups(len(grads))]
    partial = torch.zeros(len(launches), k, max(n for *_, n in launches), device=live.device, dtype=torch.float32)
    for i, (owner, first, n) in enumerate(launches):
        for lo in range(0, n, MAX_BLOCKS):
            _sq_norm_kernel[(k, min(MAX_BLOCKS, n - lo))](table, owner, first, live, partial[i], k, partial.stride(1),
                                                          lo, GTYPE=gtype, DENSE=dense, BLOCK=BLOCK,
                                                          num_warps=NUM_WARPS)
    return partial.sum(dim=(0, 2))


def adamw(layout: Layout, params: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
          low: torch.Tensor | None, grads: list[torch.Tensor], live: torch.Tensor, coef: torch.Tensor,
          decay: torch.Tensor, step_size: torch.Tensor, bc2_sqrt: torch.Tensor, b1: float, b2: float,
          eps: float) -> None:
    """AdamW on each slot's live prefix of each tensor of the flat [K, P] master weights and
    moments (and their bf16 copy `low`); per-slot [K] coef, decay, step size and bias correction
    as `packed.adamw_` takes them."""
    table, dense = layout.table(grads)
    gtype = _gtype(grads)
    k = params.shape[0]
    out = low if low is not None else params
    for which in _groups(len(grads)):
        owner, first, n = layout.blocks(which)
        for lo in range(0, n, MAX_BLOCKS):
            _adamw_kernel[(k, min(MAX_BLOCKS, n - lo))](
                params, exp_avg, exp_avg_sq, out, table, owner, first, layout.col, live, coef, decay, step_size,
                bc2_sqrt, k, params.stride(0), out.stride(0), b1, b2, eps, lo, GTYPE=gtype, HAS_LOW=low is not None,
                DENSE=dense, BLOCK=BLOCK, num_warps=NUM_WARPS)
