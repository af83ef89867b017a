"""`lora-exp rerun RUN_ID [overrides]`: retrain from the config recorded with a run, into a new
run tagged `rerun_of`, and compare the two."""
from __future__ import annotations

import dataclasses
from typing import Any

from lora_exp.config import RunConfig, TrackingConfig
from lora_exp.runs.recorded import apply_overrides, load_recorded, tracking_for
from lora_exp.runs.train import train_config


def cmd_rerun(ref: str, overrides: list[str]) -> int:
    tracking = tracking_for(overrides)
    client, recorded = load_recorded(ref, tracking)
    cfg = apply_overrides(recorded.raw, [o for o in overrides if not o.startswith("tracking.")])
    original = recorded.run
    experiment = client.get_experiment(original.info.experiment_id).name
    cfg = _with_tracking(cfg, tracking, experiment)
    tags = {"lora_exp.kind": "rerun", "rerun_of": original.info.run_id}
    name = f"rerun-{original.info.run_name or original.info.run_id[:8]}"
    result, run_id = train_config(cfg, tags=tags, run_name=name)
    print(compare(client, original, run_id, result))
    return 0


def _with_tracking(cfg: RunConfig, tracking: TrackingConfig, experiment: str) -> RunConfig:
    return dataclasses.replace(cfg, tracking=dataclasses.replace(tracking, experiment=experiment))


def compare(client: Any, original: Any, rerun_id: str | None, result: Any) -> str:
    """Side-by-side final metrics and the largest gap between the two train-loss curves."""
    keys = ("final_train_loss", "final_eval_loss", "base_eval_loss", "exact_match")
    lines = [f"{'metric':<18} {'original':>12} {'rerun':>12}"]
    for key in keys:
        a, b = original.data.metrics.get(key), result.metrics.get(key)
        if a is not None or b is not None:
            lines.append(f"{key:<18} {_fmt(a):>12} {_fmt(b):>12}")
    old = {m.step: m.value for m in client.get_metric_history(original.info.run_id, "train_loss")}
    new = dict(result.loss_curve)
    common = sorted(set(old) & set(new))
    if common:
        gap = max(abs(old[s] - new[s]) for s in common)
        worst = max(common, key=lambda s: abs(old[s] - new[s]))
        lines.append(f"train_loss curves: {len(common)} common steps, largest difference {gap:.3g} (step {worst})")
    lines.append(f"original run {original.info.run_id}  rerun run {rerun_id or '-'}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"

