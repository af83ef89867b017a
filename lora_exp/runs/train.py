"""`lora-exp train` and `lora-exp prepare`: one adapter trained into one MLflow run."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from lora_exp.compose import compose
from lora_exp.config import RunConfig
from lora_exp.core.data import load_rows, tokenize
from lora_exp.tracking.provenance import redact_uri
from lora_exp.tracking.runs import start_run
from lora_exp.tracking.store import check_uri, connect

if TYPE_CHECKING:  # torch and transformers load after the config is checked: bad input fails in a second
    from lora_exp.core.recording import TrialResult

log = logging.getLogger("lora_exp")


def cmd_train(overrides: list[str]) -> int:
    train_config(compose(overrides), tags={"lora_exp.kind": "train"}, run_name=None)
    return 0


def train_config(cfg: RunConfig, tags: dict[str, str], run_name: str | None) -> tuple[TrialResult, str | None]:
    """Validate data and store, load the base, train one adapter into one run; print a summary."""
    rows = load_rows(cfg.data)  # bad data fails here, before the model loads
    if cfg.tracking.enabled:
        check_uri(cfg.tracking)  # so does a bad tracking URI (one line: nothing said before it)
    # said before MLflow and torch load and a new store's tables are made (seconds of silence otherwise)
    log.info("config and data checked (%d training rows, %d validation)%s", len(rows.train), len(rows.validation),
             f"; opening the MLflow store {redact_uri(cfg.tracking.uri)}" if cfg.tracking.enabled else "")
    if cfg.tracking.enabled:
        connect(cfg.tracking)
    from lora_exp.core.models import load_base, pick_device
    from lora_exp.core.training import run_trial, total_steps

    device = pick_device(cfg.trainer.device)
    log.info("loading model %s (%s) on %s", cfg.model.name, cfg.model.source, device)
    base = load_base(cfg.model, device)
    log.info("loaded %s on %s in %.1fs", cfg.model.name, device, base.load_seconds)
    data = tokenize(rows, cfg.data, base.tokenizer)
    with start_run(cfg.tracking, run_name=run_name or cfg.tracking.run_name, tags=tags) as tracker:
        if tracker.run_id:
            log.info("training %d steps into run %s (%s)", total_steps(cfg, len(data.train)), tracker.run_id,
                     redact_uri(cfg.tracking.uri))
        result = run_trial(cfg, base, data, tracker)
    m = result.metrics
    print(f"done: {result.steps} steps in {m['train_runtime_s']:.1f}s | "
          + " | ".join(f"{k} {m[k]:.4g}" for k in ("final_train_loss", "base_eval_loss", "final_eval_loss",
                                                     "exact_match") if k in m)
          + (f" | run {tracker.run_id}" if tracker.run_id else ""))
    if result.generations:
        g = result.generations
        for prompt, expected, out in list(zip(g["prompt"], g["expected"], g["adapter_output"]))[:3]:
            shown = prompt if len(prompt) <= 80 else f"...{prompt[-77:]}"
            print(f"  {shown!r} -> {out!r}" + (f"  (expected {expected!r})" if expected else ""))
    return result, tracker.run_id


def cmd_prepare(overrides: list[str]) -> int:
    cfg = compose(overrides)
    from lora_exp.core.models import load_base, pick_device, prepare_gguf

    if cfg.model.source == "gguf_package":
        path = prepare_gguf(cfg.model)
        print(f"model {cfg.model.name} ready in {path}")
    else:
        load_base(cfg.model, pick_device("cpu"))
        print(f"model {cfg.model.name} loads")
    return 0


def cmd_config(overrides: list[str]) -> int:
    """The composed, validated config as YAML (what `train` with these overrides would run)."""
    import yaml

    cfg = compose(overrides)
    data = {k: v for k, v in cfg.to_dict().items() if k != "overrides"}
    print(yaml.safe_dump(data, sort_keys=False).rstrip())
    return 0
