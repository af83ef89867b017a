"""The packed LoRA delta on CUDA: one program per slot that does only what the slot trains.

A pack stores every slot padded to the pack's rank and to every module any of its trials may
target, and torch's bmm's compute all of it: a slot that does not target a module still reads
its inputs and weights and adds a delta of exactly zero, and a rank-4 slot in a rank-16 pack
reads four times its weights. In the seed's search that is about half of the LoRA work and the
memory traffic of a step. These kernels skip it: a slot's program reads its inputs, its r rows of
A and B and the output's gradient only where the slot targets the module, and computes the
dropout mask (core.randomness.dropout_mask's hash, bit for bit) in place of a masked copy of the input.

`lora_delta(x, A, B, scale, rank, ...)` is a torch custom op with its own backward, so the pack's
compiled step (torch.compile) calls the kernels inside its graph:

    forward    h = drop(x) A^T  [M, r];  delta = (h B) * scale                    (per slot)
    backward   g_s = g * scale;  dh = g_s B^T;  dB = h^T g_s;  dA = dh^T drop(x);  dx = (dh A) * mask

with the roundings torch's own formulation has under bf16 autocast (h, delta, dh rounded to the
compute dtype; fp32 accumulation). In fp32 the products are exact fp32 (no TF32), so a trial's
loss curve stays that of the trial trained alone. A's and B's gradients are written only where a
slot trains (its first r rows of the modules it targets): the rest is left unwritten, which the
pack's optimizer (kernels.adamw) never reads.

`lora_linear(x, W, bias, ...)` is the frozen base layer and the delta as one op, what a pack's
training step uses: the base layer's product (cuBLAS), then the delta added to it in place, and
in the backward the delta's input gradient added in place to the base layer's. A slot that does
not target the module costs nothing there: no copy of the base output, no zero gradient written
and then summed.

A slot's row group of at most `MAX_M` positions (the seed's short rows, batch 1-8) whose tiles fit
in shared memory is one program's: it holds the whole group, so a backward program sums B's and A's gradients over it in
one product. Longer groups (rows of up to 1024 tokens, batch > 1): the forward runs one program
per `BM` positions, the backward is `kernels.lora_tiled`'s.
"""
from __future__ import annotations

import functools

import torch
import triton

from lora_exp.pack.kernels import lora_gemm, lora_slot, lora_tiled
from lora_exp.pack.settings import KERNEL_TUNABLES

#: the tiles a program steps through the inputs (BK) and outputs (BN) by, its warps, and the
#: fewest programs per slot (the bench's `engine --lora-configs` times others)
BK, BN, NUM_WARPS, MIN_SPLIT = 128, 128, 4, 1
#: the programs per multiprocessor the long rows' backward splits each slot's positions to reach
PROGRAMS_PER_SM = 4
#: the longest row group one program holds (the short kernels); longer ones are tiled by BM
#: positions (32: 0.5-3% faster a Qwen2.5-0.5B step than 64), as is the input gradient of every group
MAX_M, BM = 256, 32
#: a SwiGLU MLP's activation fused with its down projection's LoRA delta (kernels.swiglu); 0: apart
SWIGLU = 1
#: 1: long row groups in bf16/fp16 on CUDA run the base layer's product and the delta as one
#: kernel (kernels.lora_gemm), forward and input gradient; 0 (the default): cuBLAS's product, the
#: delta added in place. Faster per module at Qwen2.5-0.5B's shapes, but no faster a step: the
#: passes it saves, the Triton product's gap to cuBLAS costs again (docs/benchmarks.md)
GEMM = 0
#: the constants here, which the benches set to time other values (and `pack.kernel_constants` for a sweep)
TUNABLE = KERNEL_TUNABLES["lora"]


def block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _short(m: int, rmax: int, x: torch.Tensor) -> bool:
    """Whether one program holds a slot's group of `m` positions (the short kernels): at most
    MAX_M, and its tiles within the GPU's shared memory. B's gradient kernel, the largest, keeps
    3 stages of its loop's tiles there and 2 more copies of the output gradient's for its two
    products: 5 x positions x BN + 3 x BN x rank elements (352 KB measured in bf16 at 256
    positions and rank 32, where an H200 has 227 KiB a block). Groups past that are tiled."""
    if m > MAX_M:
        return False
    bm, br, wide = block_m(m), block_r(rmax), max(BK, BN)
    need = (5 * bm * wide + 3 * wide * br) * x.element_size()
    return need <= _shared(x.device)


def precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _shared(device: torch.device) -> int:
    """Shared memory a program may use, less a margin for what Triton adds (CPU: no limit)."""
    if device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 99 * 1024) - 8 * 1024


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def split_for(k: int, device: torch.device) -> int:
    """Programs per slot: one at large K (a slot's work is one program's), more at small K so
    the GPU has ~4 programs per multiprocessor."""
    return max(1, min(8, -(-4 * sm_count(device) // max(1, k))))


def launch_options() -> dict:
    """The launch options every LoRA kernel takes (read at each launch: the benches time others)."""
    return {"num_warps": NUM_WARPS}


def _check(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    assert x.dim() == 3 and a.dim() == 3 and b.dim() == 3 and a.shape[0] == x.shape[0] == b.shape[0]
    assert x.stride(2) == 1 and x.stride(1) == x.shape[2], "x: rows of one slot must be dense"
    assert a.stride(2) == 1 and b.stride(2) == 1, "A and B: dense rows"


def delta_forward(x, a, b, scale, rank, keys, thr, kscale, rows, split, out, add, h=None):
    """The forward kernel: each slot's delta written to `out` (added to it in place with `add`);
    returns h = drop(x) A^T, kept for the backward (given as `h`: read, x and A not)."""
    _check(x, a, b)
    split = max(split, MIN_SPLIT)
    k, m, fin = x.shape
    fout, rmax = b.shape[2], a.shape[1]
    assert out.shape == (k, m, fout) and out.dtype == x.dtype and out.is_contiguous(), (out.shape, out.dtype)
    given = h is not None
    if not given:
        h = torch.empty(k, m, rmax, device=x.device, dtype=x.dtype)  # read back only where a slot trains
    dropout = keys is not None
    # short rows: a program holds a slot's group; long ones: a program per BM positions
    bm, split, tiles = (block_m(m), split, 1) if _short(m, rmax, x) else (BM, 1, triton.cdiv(m, BM))
    dropped = (keys, thr, kscale) if dropout else (x, x, x)
    lora_slot.delta_kernel[(k, split, tiles)](x, a, b, out, h, scale, rank, *dropped, m, m // rows, fin, fout, rows,
                                              x.stride(0), a.stride(0), a.stride(1), b.stride(0), b.stride(1), rmax,
                                              SPLIT=split, DROPOUT=dropout, ADD=add, BM=bm, BR=block_r(rmax), BK=BK,
                                              BN=BN, PREC=precision(x.dtype), GIVEN_H=given, **launch_options())
    return h


def base_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, conv: bool) -> torch.Tensor:
    """The frozen base layer's output for x [N, in]: nn.Linear's (w [out, in]) or GPT-2's Conv1D's (w [in, out])."""
    if conv:
        return torch.addmm(bias, x, w) if bias is not None else torch.mm(x, w)
    return torch.nn.functional.linear(x, w, bias)


@torch.library.custom_op("lora_exp::lora_delta", mutates_args=(),
                         schema="(Tensor x, Tensor a, Tensor b, Tensor scale, Tensor rank, Tensor? keys, Tensor? thr, "
                                "Tensor? kscale, int rows, int split) -> (Tensor, Tensor)")
def _delta(x, a, b, scale, rank, keys, thr, kscale, rows, split):
    x = x.contiguous()
    out = torch.empty(x.shape[0], x.shape[1], b.shape[2], device=x.device, dtype=x.dtype)
    return out, delta_forward(x, a, b, scale, rank, keys, thr, kscale, rows, split, out, False)


@_delta.register_fake
def _delta_fake(x, a, b, scale, rank, keys, thr, kscale, rows, split):
    k, m, _ = x.shape
    return x.new_empty(k, m, b.shape[2]), x.new_empty(k, m, a.shape[1])


@torch.library.custom_op("lora_exp::lora_linear", mutates_args=(),
                         schema="(Tensor x, Tensor w, Tensor? bias, Tensor a, Tensor b, Tensor scale, Tensor rank, "
                                "Tensor? keys, Tensor? thr, Tensor? kscale, int rows, int split, bool conv) "
                                "-> (Tensor, Tensor)")
def _linear(x, w, bias, a, b, scale, rank, keys, thr, kscale, rows, split, conv):
    x = x.contiguous()
    k, m, fin = x.shape
    if in_gemm(x, w, a):  # h first (the forward kernel with no outputs), then the product and its delta
        h = delta_forward(x, a, b[:, :, :0], scale, rank, keys, thr, kscale, rows, split, x.new_empty(k, m, 0), True)
        out = lora_gemm.gemm_lora(x.view(k * m, fin), w, conv, bias, h.view(k * m, -1), b, scale, rank, m)
        return out.view(k, m, -1), h
    out = base_linear(x.view(k * m, fin), w, bias, conv).view(k, m, -1)
    return out, delta_forward(x, a, b, scale, rank, keys, thr, kscale, rows, split, out, True)


def in_gemm(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether kernels.lora_gemm runs a layer's product with its delta (`GEMM`), for x [K, M, in]
    (or an output gradient) and A [K, R, in]: long row groups (the tiled kernels) that it takes."""
    return bool(GEMM) and not _short(x.shape[1], a.shape[1], x) and lora_gemm.fits(x, w, x.shape[1])


@_linear.register_fake
def _linear_fake(x, w, bias, a, b, scale, rank, keys, thr, kscale, rows, split, conv):
    k, m, _ = x.shape
    return x.new_empty(k, m, b.shape[2]), x.new_empty(k, m, a.shape[1])


@torch.library.custom_op("lora_exp::lora_delta_backward", mutates_args=(),
                         schema="(Tensor g, Tensor x, Tensor a, Tensor b, Tensor h, Tensor scale, Tensor rank, "
                                "Tensor? keys, Tensor? thr, Tensor? kscale, int rows, int split, bool need_dx, "
                                "Tensor? w=None, bool conv=False) -> (Tensor, Tensor, Tensor)")
def _delta_backward(g, x, a, b, h, scale, rank, keys, thr, kscale, rows, split, need_dx, w=None, conv=False):
    """A's and B's gradients, and the input's (with `w`: the base layer's input gradient plus
    the delta's, added in place; without: the delta's, zero where a slot does not train)."""
    g, x = g.contiguous(), x.contiguous()
    split = max(split, MIN_SPLIT)
    k, m, fin = x.shape
    fout, rmax = b.shape[2], a.shape[1]
    acc = w is not None
    fused = need_dx and acc and in_gemm(g, w, a)  # the input gradient made by kernels.lora_gemm, after dh
    dx = None
    if need_dx and not fused:
        dx = ((torch.mm(g.view(k * m, fout), w.t() if conv else w).view(k, m, fin)) if acc
              else torch.empty(k, m, fin, device=x.device, dtype=x.dtype))
    if not _short(m, rmax, x):
        ga, gb, dh = lora_tiled.backward(g, x, a, b, h, scale, rank, keys, thr, kscale, rows, split, dx, acc, bm=BM,
                                         bk=BK, bn=BN, br=block_r(rmax), prec=precision(x.dtype),
                                         programs=PROGRAMS_PER_SM * sm_count(x.device), launch=launch_options())
        if fused:  # g W (w's layout: Conv1D's [in, out] is W^T) + (dh A) * mask
            dropout = (keys, thr, kscale) if keys is not None else None
            dx = lora_gemm.gemm_lora(g.view(k * m, fout), w, not conv, None, dh.view(k * m, -1), a, None, rank, m,
                                     dropout, rows).view(k, m, fin)
        return (dx if need_dx else x.new_empty(0)), ga, gb
    bm, br = block_m(m), block_r(rmax)
    # written only where a slot trains (its first r rows of the modules it targets): the
    # optimizer reads nothing else
    ga = torch.empty(k, rmax, fin, device=x.device, dtype=a.dtype)
    gb = torch.empty(k, rmax, fout, device=x.device, dtype=b.dtype)
    dh = torch.empty(k, split, bm, br, device=x.device, dtype=torch.float32)
    dropout = keys is not None
    prec = precision(x.dtype)
    dropped = (keys, thr, kscale) if dropout else (x, x, x)
    lora_slot.grad_b_kernel[(k, split)](g, b, h, gb, dh, scale, rank, m, fout, b.stride(0), b.stride(1), rmax,
                                        SPLIT=split, BM=bm, BR=br, BN=BN, PREC=prec, **launch_options())
    lora_slot.grad_a_kernel[(k, split)](x, dh, ga, rank, *dropped, m, m // rows, fin, rows, x.stride(0), rmax,
                                        SPLIT=split, DROPOUT=dropout, BM=bm, BR=br, BK=BK, PREC=prec,
                                        **launch_options())
    if need_dx:
        lora_tiled.input_grad(a, dh, split, dx, rank, keys, thr, kscale, rows, acc, bm=min(bm, BM), br=br, bk=BK,
                              prec=prec, launch=launch_options())
    return (dx if need_dx else x.new_empty(0)), ga, gb


@_delta_backward.register_fake
def _delta_backward_fake(g, x, a, b, h, scale, rank, keys, thr, kscale, rows, split, need_dx, w=None, conv=False):
    k, m, fin = x.shape
    dx = x.new_empty(k, m, fin) if need_dx else x.new_empty(0)
    return dx, a.new_empty(k, a.shape[1], fin), b.new_empty(k, b.shape[1], b.shape[2])


def _setup_delta(ctx, inputs, output):
    x, a, b, scale, rank, keys, thr, kscale, rows, split = inputs
    ctx.save_for_backward(x, a, b, output[1], scale, rank, keys, thr, kscale, None)
    ctx.rows, ctx.split, ctx.conv = rows, split, False
    ctx.mark_non_differentiable(output[1])


def _setup_linear(ctx, inputs, output):
    x, w, bias, a, b, scale, rank, keys, thr, kscale, rows, split, conv = inputs
    ctx.save_for_backward(x, a, b, output[1], scale, rank, keys, thr, kscale, w)
    ctx.rows, ctx.split, ctx.conv = rows, split, conv
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, g, _gh):
    x, a, b, h, scale, rank, keys, thr, kscale, w = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    dx, ga, gb = _delta_backward(g, x, a, b, h, scale, rank, keys, thr, kscale, ctx.rows, ctx.split, need_dx, w,
                                 ctx.conv)
    if w is None:  # lora_delta's inputs
        return (dx if need_dx else None, ga, gb) + (None,) * 7
    return (dx if need_dx else None, None, None, ga, gb) + (None,) * 8  # the frozen base gets no gradient


_delta.register_autograd(_backward, setup_context=_setup_delta)
_linear.register_autograd(_backward, setup_context=_setup_linear)


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, rank: torch.Tensor,
               dropout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, rows: int, split: int) -> torch.Tensor:
    """Each slot's LoRA delta, scale * drop(x) A^T B, for x [K, M, in] (M = rows x sequence) in the
    compute dtype of A [K, R, in] and B [K, R, out]; `rank` [K] (int32) is each slot's r for this
    module, 0 where it does not target it; `dropout` = (module keys, thresholds, scales) per batch
    row, from `dropout_args`, or None; `split` programs per slot (`split_for`)."""
    keys, thr, kscale = dropout if dropout is not None else (None, None, None)
    return _delta(x, a, b, scale, rank, keys, thr, kscale, rows, split)[0]


def lora_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, conv: bool, a: torch.Tensor,
                b: torch.Tensor, scale: torch.Tensor, rank: torch.Tensor,
                dropout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, rows: int, split: int) -> torch.Tensor:
    """The frozen base layer (weight `w`, `bias`, all in x's dtype; `conv`: GPT-2's Conv1D layout)
    plus `lora_delta`'s delta, as one op: the delta is added in place to the base layer's output
    and its input gradient to the base layer's, and only where a slot targets the module (no
    copy, no zeros, no separate sum for the slots that do not)."""
    keys, thr, kscale = dropout if dropout is not None else (None, None, None)
    return _linear(x, w, bias, a, b, scale, rank, keys, thr, kscale, rows, split, conv)[0]


def dropout_args(keys: torch.Tensor, p: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """core.randomness.dropout_mask's per-row threshold and scale (rounded to the input's dtype, as it
    rounds it), for a module's row keys (`module_keys`)."""
    thr = (p.to(torch.float64) * 2.0 ** 32).to(torch.int64)
    return keys, thr, (1.0 / (1.0 - p)).to(dtype).to(torch.float32)

