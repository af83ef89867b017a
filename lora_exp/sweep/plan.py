"""A sweep's command line -> options, and the plan every worker process gets (plain data)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from lora_exp.config import RunConfig
from lora_exp.errors import ConfigError
from lora_exp.sweep.spec import SweepSpec, check_study_name
from lora_exp.tracking.parent import SweepRecord

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
OPTIONS = ("sweep", "n_trials", "workers", "storage", "study", "timeout", "pack", "warm_start", "enqueue")


@dataclass(frozen=True)
class SweepOptions:
    sweep: str = "default"
    n_trials: int | None = None
    workers: int | None = None
    storage: str = DEFAULT_STORAGE
    study: str | None = None
    timeout: float | None = None
    #: `STUDY[:K]`: the K best finished trials of another study run first
    warm_start: str | None = None
    #: a YAML file of override sets run first
    enqueue: str | None = None
    #: Hydra overrides of the base config (`pack=K` becomes `pack.slots=K` here)
    overrides: tuple[str, ...] = ()


@dataclass
class SweepPlan:
    """Everything a worker needs, as plain data (sent to spawned worker processes)."""

    spec: SweepSpec
    options: SweepOptions
    study_name: str
    n_trials: int
    #: the sweep's parent run, as the MLflow side needs it
    record: SweepRecord
    base_overrides: list[str]
    timeout: float | None
    #: the base config, composed once (trials add their overrides to `base_overrides`)
    base: RunConfig
    workers: int = 1
    started: float = field(default_factory=time.time)
    #: trials of the budget (completed, pruned) already done when this command started (for its ETA)
    done_at_start: int = 0

    @property
    def parent_run_id(self) -> str | None:
        return self.record.run_id

    @property
    def pack(self) -> int | str:
        """Trials trained at once per worker (`pack=K`): 1 trains them one at a time; `auto`
        as many as the GPU's memory holds (the pack decides)."""
        return self.base.pack.slots

    @property
    def packed(self) -> bool:
        return self.base.pack.packs


def default_storage() -> str:
    """$OPTUNA_STORAGE when set, else the sqlite file beside the MLflow store's default."""
    return os.environ.get("OPTUNA_STORAGE") or DEFAULT_STORAGE


def parse_options(args: list[str]) -> SweepOptions:
    """Split `key=value` tokens into sweep options and Hydra config overrides."""
    opts: dict[str, Any] = {}
    overrides: list[str] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in OPTIONS:
            opts[key] = value
        else:
            overrides.append(arg)
    n_trials = _number(opts, "n_trials", int, "a whole number of trials")
    workers = _number(opts, "workers", int, "a whole number of worker processes")
    timeout = _number(opts, "timeout", float, "seconds")
    pack = "auto" if opts.get("pack") == "auto" else _number(opts, "pack", int,
                                                             "auto or a whole number of trials trained at once")
    if n_trials is not None and n_trials <= 0:
        raise ConfigError(f"n_trials: must be >= 1, got {n_trials}")
    if workers is not None and workers <= 0:
        raise ConfigError(f"workers: must be >= 1, got {workers}")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"timeout: must be > 0 seconds, got {timeout}")
    if opts.get("study"):
        check_study_name(opts["study"])
    if pack is not None:
        if pack != "auto" and pack <= 0:
            raise ConfigError(f"pack: must be >= 1 (trials trained at once), got {pack}")
        overrides.insert(0, f"pack.slots={pack}")
    return SweepOptions(sweep=opts.get("sweep", "default"), n_trials=n_trials, workers=workers,
                        storage=opts.get("storage") or default_storage(), study=opts.get("study") or None,
                        timeout=timeout, warm_start=opts.get("warm_start") or None,
                        enqueue=opts.get("enqueue") or None, overrides=tuple(overrides))


def _number(opts: dict[str, Any], key: str, kind: type, what: str) -> Any:
    if key not in opts:
        return None
    try:
        return kind(opts[key])
    except ValueError:
        raise ConfigError(f"{key}: expected {what}, got {opts[key]!r}") from None


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (what taskset, a cgroup cpuset or
    a job scheduler such as SLURM leaves it, and what torch's default thread count follows), not
    every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_workers() -> int:
    """One worker per visible GPU on a CUDA machine, else one."""
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
