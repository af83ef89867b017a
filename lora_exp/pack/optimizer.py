"""One optimizer step for every slot of a pack: AdamW (torch's formula, decoupled weight decay)
with each slot's own learning-rate schedule, step count and gradient clipping. On CUDA through
the Triton kernels (`kernels.adamw`), which touch only what each slot trains; elsewhere through
torch ops over the flat buffers (`adamw_`, also the kernels' reference)."""
from __future__ import annotations

import math

import torch

from lora_exp.pack.model import PackedModel


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


def lr_factor(pm: PackedModel, step: torch.Tensor) -> torch.Tensor:
    """transformers' schedules (get_scheduler) at `step` (0-based), per slot."""
    s = step.to(torch.float64)
    total, warm = pm.total.to(torch.float64), pm.warmup.to(torch.float64)
    in_warmup = s < warm
    warm_f = s / warm.clamp(min=1)
    progress = (s - warm) / (total - warm).clamp(min=1)
    linear = torch.where(in_warmup, warm_f, ((total - s) / (total - warm).clamp(min=1)).clamp(min=0))
    cosine = torch.where(in_warmup, warm_f, (0.5 * (1 + torch.cos(math.pi * progress))).clamp(min=0))
    return torch.where(pm.sched == 1, torch.ones_like(s), torch.where(pm.sched == 2, cosine, linear))


def gradients(pm: PackedModel, loss: torch.Tensor) -> list[torch.Tensor | None]:
    """The LoRA tensors' gradients of `loss`, as the backward computes them. Not through
    .grad: autograd makes a gradient that is not laid out as its parameter contiguous first,
    and A's is a transposed view (2 GB copied a step at K=1024); the kernels read any layout."""
    return list(torch.autograd.grad(loss, pm.weights, allow_unused=True))


@torch.no_grad()
def optimizer_step(pm: PackedModel, grads: list[torch.Tensor | None] | None = None,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """AdamW (torch's formula, decoupled weight decay) with per-slot lr, step count and
    gradient clipping (clip_grad_norm_ over the slot's own parameters), for all slots at once.
    Takes `grads` (from `gradients`), else the gradients left in each LoRA tensor's .grad
    (then cleared)."""
    if grads is None:
        grads = [w.grad for w in pm.weights]
    grads = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, pm.weights)]
    if pm.kernels:
        from lora_exp.pack.kernels import adamw

        if pm.layout is None:
            pm.layout = adamw.Layout([cols for cols, _ in pm.tensors], pm.device)
        # a recorded step (`pack.graph`) runs over every slot's padded blocks: a list of the live
        # ones would change as trials hold, come and go
        listed = not pm.graphs
        norm = adamw.sq_norms(pm.layout, grads, pm.live_len, pm.k, pm.live_host, pm.live_version, listed).sqrt()
    else:
        flat = torch.cat([g.reshape(pm.k, -1).float() for g in grads], dim=1)
        norm = flat.pow(2).sum(dim=1).sqrt()
    coef = (pm.max_norm / (norm + 1e-6)).clamp(max=1.0)
    coef = torch.where(pm.max_norm > 0, coef, torch.ones_like(coef))
    lr = (pm.lr.to(torch.float64) * lr_factor(pm, pm.step)) * pm.live
    pm.step.add_(pm.live.to(torch.int64))
    t = pm.step.clamp(min=1).to(torch.float64)
    b1, b2 = betas
    step_size = (lr / (1 - b1 ** t)).to(torch.float32)
    bc2_sqrt = torch.sqrt(1 - b2 ** t).to(torch.float32)
    decay = (1 - lr * pm.wd).to(torch.float32)
    if pm.kernels:
        adamw.adamw(pm.layout, pm.params, pm.exp_avg, pm.exp_avg_sq, pm.low, grads, pm.live_len, coef, decay,
                    step_size, bc2_sqrt, b1, b2, eps, pm.live_host, pm.live_version, listed)
    else:
        # the torch update runs on every row: a paused slot's zero gradient would decay its
        # moments, so its rows are put back (the kernels above skip it: live_len 0)
        held = torch.tensor(sorted(pm.paused), dtype=torch.long, device=pm.device) if pm.paused else None
        kept = [(buf, buf.index_select(0, held)) for buf in (pm.params, pm.exp_avg, pm.exp_avg_sq)] \
            if held is not None else []
        adamw_(pm.params, flat, pm.exp_avg, pm.exp_avg_sq, coef.view(-1, 1), decay.view(-1, 1),
               step_size.view(-1, 1), bc2_sqrt.view(-1, 1), b1, b2, eps)
        for buf, rows in kept:
            buf.index_copy_(0, held, rows)
        if pm.low is not None:
            pm.low.copy_(pm.params)
    for w in pm.weights:
        w.grad = None
