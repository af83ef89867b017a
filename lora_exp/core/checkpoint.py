"""A trial's training state at its last eval, so a trial killed mid-way (SIGKILL, power loss)
resumes there when it is retried, and its loss curve is the one it would have had.

The state is the adapter's weights, the optimizer's and scheduler's states, the random number
generators, the step (the data order is a function of the seed: the retried trial skips the
batches already seen) and what was logged so far. Training asks a `Checkpointer` for a state to
resume from and gives it one at each eval; where the state is kept is the caller's (a sweep keeps
it with the trial's MLflow run)."""
from __future__ import annotations

from typing import Any, Protocol

import torch


class Checkpointer(Protocol):
    def load(self) -> dict[str, Any] | None:
        """The state to resume from, or None (start from step 0)."""
        ...

    def save(self, state: dict[str, Any]) -> None:
        """Keep `state` (the latest replaces the one before)."""
        ...


def training_state(model: Any, optimizer: Any, scheduler: Any, step: int, loss_curve: list[tuple[int, float]],
                   learning_rates: list[float], eval_curve: list[tuple[int, float]], tokens: int) -> dict[str, Any]:
    """Everything the loop needs to go on after `step` exactly as it would have (tensors on the
    CPU; only tensors and plain values, so it loads with `torch.load(weights_only=True)`)."""
    state: dict[str, Any] = {
        "step": step, "tokens": tokens, "loss_curve": list(loss_curve), "learning_rates": list(learning_rates),
        "eval_curve": list(eval_curve),
        "adapter": {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": _to_cpu(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore(state: dict[str, Any], model: Any, optimizer: Any, scheduler: Any) -> None:
    """Put a saved state back: weights, optimizer, scheduler, random number generators."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["adapter"].items():
            params[name].copy_(value.to(params[name].device))
    device = next(iter(params.values())).device
    optimizer.load_state_dict(_to_device(state["optimizer"], device))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _to_cpu(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().clone()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree


def _to_device(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device) if tree.dim() > 0 else tree  # Adam's step counts stay on the CPU
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_device(v, device) for v in tree)
    return tree
