"""The next-token loss over the LM head's logits on CUDA: one program per position, two passes.

A chunk of the pack's head loss is [positions, vocabulary] logits (1,728 x 151,936 for Qwen2.5 at
1 GiB). Compiled by inductor, the loss and its gradient took three passes over them (the maximum,
the sum of exponentials with the target's logit, then the softmax minus the one-hot), each a
looped reduction over a 150k-wide row: ~1.1 ms a chunk on the H200, ~20 ms of a 220 ms step.
Here a program reads its row once for an online log-sum-exp (running maximum and rescaled sum,
FlashAttention's trick), then once more to write the logits' gradient, (softmax - one-hot) in the
gradient's dtype, with the roundings of `pack.rows.chunk_loss_and_grad` (fp32 softmax, the
gradient rounded once at the end).

`head_loss(logits, target, grad)` returns each position's loss (0 where the target is IGNORE)
and, with `grad`, the logits' gradient (0 on IGNORE rows).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_exp.core.data import IGNORE
from lora_exp.pack.settings import KERNEL_TUNABLES

#: logits a program reads at a time, and its warps
BLOCK, NUM_WARPS = 4096, 8
#: the constants here, which the benches set to time other values
TUNABLE = KERNEL_TUNABLES["head"]


@triton.jit
def _head_loss_kernel(logits_ptr, target_ptr, loss_ptr, grad_ptr, V, stride, IGNORE_ID: tl.constexpr,
                      GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    target = tl.load(target_ptr + row)
    valid = target != IGNORE_ID
    cols = tl.arange(0, BLOCK)
    # running maximum and sum of exponentials per lane, merged at the end (-inf logits, the
    # padded vocabulary, add nothing)
    m = tl.full((BLOCK,), -3.0e38, dtype=tl.float32)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, x)
        s = s * tl.exp(m - new_m) + tl.exp(x - new_m)
        m = new_m
    top = tl.max(m, axis=0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))
    picked = tl.load(base + tl.where(valid, target, 0).to(tl.int64)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
    if GRAD:
        out = grad_ptr + row * V
        for v0 in range(0, V, BLOCK):
            c = v0 + cols
            x = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(c == target, 1.0, 0.0)
            p = tl.where(valid, p, 0.0)
            tl.store(out + c, p.to(grad_ptr.dtype.element_ty), mask=c < V)


def head_loss(logits: torch.Tensor, target: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's next-token loss (fp32, 0 where `target` is IGNORE) from `logits` [N, V] (rows
    dense), and with `grad` the logits' gradient [N, V] in their dtype."""
    n, vocab = logits.shape
    assert logits.stride(1) == 1, "logits: dense rows"
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    out = torch.empty(n, vocab, device=logits.device, dtype=logits.dtype) if grad else loss
    _head_loss_kernel[(n,)](logits, target.contiguous(), loss, out, vocab, logits.stride(0), IGNORE_ID=IGNORE,
                            GRAD=grad, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return loss, (out if grad else None)
