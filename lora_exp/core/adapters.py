"""RunConfig -> peft.LoraConfig, and attaching / detaching an adapter on a shared frozen base."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from typing import Any

import torch

from lora_exp.config import RunConfig
from lora_exp.core.models import BaseModel
from lora_exp.core.randomness import CounterDropout, DropoutState, init_lora_a, module_key
from lora_exp.errors import ConfigError


def build_lora_config(cfg: RunConfig) -> Any:
    """One pure function from our typed config to peft's (names mirror peft's own)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.lora_alpha,
        lora_dropout=cfg.lora.lora_dropout,
        bias=cfg.lora.bias,
        target_modules=cfg.target_modules,
        fan_in_fan_out=cfg.model.fan_in_fan_out,
        use_rslora=cfg.lora.use_rslora,
        use_dora=cfg.lora.use_dora,
        init_lora_weights=True if cfg.lora.init_lora_weights == "default" else cfg.lora.init_lora_weights,
        task_type="CAUSAL_LM",
    )


def attach_adapter(base: BaseModel, cfg: RunConfig) -> Any:
    """Wrap the shared base with a fresh adapter, initialised from trainer.seed.

    The base is modified in place (LoRA layers injected); `detach_adapter` restores it exactly,
    so the next trial in the same process starts from the same frozen weights.
    """
    from peft import get_peft_model

    check_fits(base, cfg)
    torch.manual_seed(cfg.trainer.seed)  # what an init draws unseeded (orthogonal, pissa_niter_N)
    init = cfg.lora.init_lora_weights
    originals = base_weights(base.model, cfg.target_modules) if mutates_base(init) else None
    model = get_peft_model(base.model, build_lora_config(cfg))
    seed_randomness(model, cfg.trainer.seed, init)
    if originals is not None:
        # what the adapter started from: saving converts the trained adapter to plain LoRA
        # against the original base (peft's path_initial_model_for_weight_conversion)
        model.lora_exp_base_weights = originals
        model.lora_exp_initial = tempfile.mkdtemp(prefix="lora-exp-init-")
        model.save_pretrained(model.lora_exp_initial)
    return model.to(base.device)


def mutates_base(init: str) -> bool:
    """PiSSA and OLoRA move the adapter's starting part out of the base weights."""
    return init.startswith("pissa") or init == "olora"


def base_weights(model: Any, targets: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the target modules' weights (restored when the adapter comes off)."""
    return {name: module.weight.detach().clone() for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
            if any(name == t or name.endswith("." + t) for t in targets)}


@contextlib.contextmanager
def original_base(model: Any) -> Any:
    """The base's own weights in place while inside (PiSSA / OLoRA moved part of them into the
    adapter): what the base model's eval loss and answers are computed on."""
    originals = getattr(model, "lora_exp_base_weights", None)
    if originals is None:
        yield
        return
    modules = {name.removeprefix(PEFT_PREFIX).replace(".base_layer", ""): m
               for name, m in model.named_modules() if name.endswith(".base_layer")}
    residual = {name: modules[name].weight.detach().clone() for name in originals}
    with torch.no_grad():
        for name, weight in originals.items():
            modules[name].weight.copy_(weight)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, weight in residual.items():
                modules[name].weight.copy_(weight)


def save_adapter(model: Any, folder: str) -> None:
    """The trained adapter, loadable on the original base: an adapter whose init moved part of
    the base weights is saved converted to plain LoRA (rank 2r) against the untouched base."""
    initial = getattr(model, "lora_exp_initial", None)
    if initial is None:
        model.save_pretrained(folder)
        return
    model.save_pretrained(folder, path_initial_model_for_weight_conversion=initial)


def check_fits(base: BaseModel, cfg: RunConfig) -> None:
    """What only the loaded model can tell, before anything is allocated for the adapter: the
    target modules exist, the rank fits them, the rows fit the model's positions."""
    missing = [m for m in cfg.target_modules if m not in base.module_names]
    if missing:
        raise ConfigError(f"lora.target_modules: model {cfg.model.name} has no module {', '.join(missing)} "
                          f"(it has: {', '.join(base.module_names)})")
    widths = [min(shape) for name, shape in base.linear_shapes().items()
              if any(name == t or name.endswith("." + t) for t in cfg.target_modules)]
    if widths and cfg.lora.r > min(widths):
        raise ConfigError(f"lora.r: {cfg.lora.r} is more than the narrowest target module's width ({min(widths)}) "
                          f"in model {cfg.model.name}")
    positions = base.max_positions
    if positions is not None and cfg.data.max_length > positions:
        raise ConfigError(f"data.max_length: {cfg.data.max_length} tokens, but model {cfg.model.name} takes at most "
                          f"{positions} positions")


PEFT_PREFIX = "base_model.model."


def seed_randomness(model: Any, seed: int, init: str = "default") -> None:
    """Make the adapter's randomness a function of (seed, module) only, as in a pack.

    LoRA A gets peft's default distribution drawn from a generator seeded by (seed, module), and
    dropout masks come from a counter-based hash of (seed, step, module, row, position): a trial
    then trains identically alone or packed with any other trials (lora_exp.pack). The
    training loop sets `model.lora_exp_dropout.step` before each forward. Inits drawn from the base
    weights or their own distribution (pissa, olora, orthogonal) keep peft's A.
    """
    state = DropoutState(seed=seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not (hasattr(module, "lora_A") and hasattr(module, "lora_dropout")):
                continue
            key = module_key(name.removeprefix(PEFT_PREFIX))
            for adapter, lin in module.lora_A.items():
                if init in ("default", "gaussian"):
                    lin.weight.copy_(init_lora_a(seed, key, lin.weight.shape[0], lin.weight.shape[1], init))
                drop = module.lora_dropout[adapter]
                if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                    module.lora_dropout[adapter] = CounterDropout(drop.p, key, state)
    model.lora_exp_dropout = state


def detach_adapter(model: Any) -> Any:
    """Remove the LoRA layers, giving back the untouched base model (its own weights back where
    the adapter's init had moved part of them out)."""
    originals = getattr(model, "lora_exp_base_weights", None)
    initial = getattr(model, "lora_exp_initial", None)
    base = model.unload()
    if originals is not None:
        modules = dict(base.named_modules())
        with torch.no_grad():
            for name, weight in originals.items():
                modules[name].weight.copy_(weight)
    if initial is not None:
        shutil.rmtree(initial, ignore_errors=True)
    return base


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total), as peft's print_trainable_parameters counts them."""
    return model.get_nb_trainable_parameters()


def train_mode(model: Any, base_dropout: bool) -> None:
    """Training mode; with base_dropout=False the frozen base stays in eval mode (its dropout
    layers off) and only the adapters' dropout is active (modules marked `adapter_module`, and
    peft's own dropout layers)."""
    if base_dropout:
        model.train()
        return
    model.eval()
    for name, module in model.named_modules():
        if getattr(module, "adapter_module", False) or ".lora_dropout." in f".{name}.":
            module.train()
