"""What a training run records, written once for every path that trains (one trial alone, or a
slot of a pack): its config and parameter counts at the start, its final metrics, its
base-vs-adapter generations table. Runs are recorded through a `Tracker`: an MLflow run
(`lora_exp.tracking`), a queue to a tracking process (a pack), or `NullTracker`."""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from lora_exp.config import RunConfig, flatten
from lora_exp.core.data import Prompt
from lora_exp.core.status import TrialStatus

if TYPE_CHECKING:
    import torch


class Tracker(Protocol):
    run_id: str | None
    #: final MLflow status the run closes with (FINISHED unless the caller changes it).
    status: str

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_dir(self, local_dir: str | Path, artifact_path: str) -> None: ...
    def log_table(self, table: dict[str, list[Any]], artifact_file: str) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None: ...
    def flush(self) -> None: ...


class NullTracker:
    """Records nothing (tracking.enabled=false, or unit tests of the training loop)."""

    run_id = None
    status = "FINISHED"

    def log_params(self, params: dict[str, Any]) -> None: pass
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: pass
    def set_tags(self, tags: dict[str, Any]) -> None: pass
    def log_text(self, text: str, artifact_file: str) -> None: pass
    def log_dir(self, local_dir: str | Path, artifact_path: str) -> None: pass
    def log_table(self, table: dict[str, list[Any]], artifact_file: str) -> None: pass
    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None: pass
    def flush(self) -> None: pass


@dataclass
class TrialResult:
    status: TrialStatus
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    generations: dict[str, list[Any]] = field(default_factory=dict)
    run_id: str | None = None


#: metrics every completed run records, whatever its config
ALWAYS_RECORDED = ("final_train_loss", "trainable_params", "train_runtime_s", "eval_s", "train_step_s",
                   "train_steps_per_s", "train_tokens_per_s", "peak_memory_mb", "train_tokens", "compute_s")


def metric_problem(metric: str, cfg: RunConfig, n_validation: int, n_scored_prompts: int) -> str | None:
    """Why a run of `cfg` cannot record `metric` (None if it records it): for a sweep's objective,
    known before any trial trains. `eval_loss` is the final eval loss."""
    from lora_exp.config import GENERATION_METRICS

    name = metric.removeprefix("final_")
    if name in ("eval_loss", "base_eval_loss"):
        return None if n_validation else (f"needs validation data, and data={cfg.data.name} has none (set "
                                          f"data.validation_files=[...] or data.validation_split)")
    base = name.removeprefix("base_").removesuffix("_count")
    if base in GENERATION_METRICS:
        if base not in cfg.trainer.generation_metrics:
            return f"is not computed: add {base} to trainer.generation_metrics"
        return None if n_scored_prompts else (f"needs generation prompts with reference answers, and data="
                                              f"{cfg.data.name} has none")
    if metric in ALWAYS_RECORDED or name in ("generation_s", "generation_tokens_per_s"):
        return None
    known = sorted({*ALWAYS_RECORDED, "eval_loss", *GENERATION_METRICS})
    return f"is not a metric a run records (known: {', '.join(known)})"


def trainable_line(trainable: int, total: int) -> str:
    """peft's `print_trainable_parameters` line."""
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def config_yaml(cfg: RunConfig) -> str:
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # the C dumper: a pack starts hundreds of runs
    return yaml.dump(cfg.to_dict(), Dumper=dumper, sort_keys=False)


def record_start(tracker: Tracker, cfg: RunConfig, trainable: int, total: int, steps: int, data_key: str = "",
                 params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None) -> None:
    """The run's config (every key a param, and `config.yaml`), its overrides, parameter counts,
    and its datasets as the run's inputs (`data_key` identifies their contents)."""
    tracker.log_params({**flatten(cfg.to_dict()), "target_modules": cfg.target_modules, "trainable_params": trainable,
                        "total_params": total, "total_steps": steps, **(params or {})})
    tracker.set_tags({"trainable_line": trainable_line(trainable, total), "lora_exp.overrides": " ".join(cfg.overrides),
                      **(tags or {})})
    tracker.log_text(config_yaml(cfg), "config.yaml")
    data = cfg.data
    splits = [("train", "training", data.train_files, data.train_split)]
    if data.validation_files or (data.hub_path and data.validation_split):
        splits.append(("validation", "evaluation", data.validation_files, data.validation_split))
    for split, context, files, hub_split in splits:
        source = ",".join(files) if files else f"{data.hub_path}:{hub_split}"
        tracker.log_dataset(f"{data.name}/{split}", f"{data_key}-{split}" if data_key else split, source, context)


def finish_metrics(result: TrialResult, seconds: float, eval_seconds: float, tokens: float, trainable: int,
                   device: torch.device, base_loss: float | None, tracker: Tracker) -> None:
    """The run's timing, final losses, size and memory, into `result.metrics`; the base model's
    eval loss is the eval curve's point at step 0 (logged now: it is computed once per base)."""
    train_seconds = max(1e-9, seconds - eval_seconds)
    m = result.metrics
    m.update({"train_runtime_s": seconds, "eval_s": eval_seconds, "train_step_s": train_seconds / max(1, result.steps),
              "train_steps_per_s": result.steps / train_seconds, "train_tokens_per_s": tokens / train_seconds,
              "trainable_params": trainable, "peak_memory_mb": peak_memory_mb(device), "train_tokens": tokens,
              "compute_s": seconds})
    if result.loss_curve:
        m["final_train_loss"] = result.loss_curve[-1][1]
    if result.eval_curve:
        m["final_eval_loss"] = result.eval_curve[-1][1]
    if base_loss is not None:
        m["base_eval_loss"] = base_loss
        tracker.log_metrics({"base_eval_loss": base_loss, "eval_loss": base_loss}, step=0)


def record_generations(tracker: Tracker, result: TrialResult, prompts: list[Prompt], base_out: list[str],
                       adapter_out: list[str], metrics: tuple[str, ...], base_scores: dict[str, list[float]],
                       seconds: float, new_tokens: int) -> None:
    """The side-by-side table (`generations.json`) and the mean score of each metric, for both sides."""
    from lora_exp.core.evaluation import generations_table

    m = result.metrics
    m["generation_s"] = seconds
    if new_tokens:
        m["generation_tokens_per_s"] = new_tokens / max(1e-9, seconds)
    result.generations, means = generations_table(prompts, base_out, adapter_out, metrics, base_scores)
    m.update(means)
    if "exact_match" in means:
        m["exact_match_count"] = round(means["exact_match"] * sum(bool(p.answers) for p in prompts))
    if prompts:
        tracker.log_table(result.generations, "generations.json")


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; the process's peak RSS on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def seconds_since_process_start() -> float:
    """Wall time since this process started (for the start-up figure: command to first step)."""
    import psutil

    return time.time() - psutil.Process().create_time()
