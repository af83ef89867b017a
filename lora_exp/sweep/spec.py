"""Sweep files (sweeps/*.yaml): study settings and a search space written as dotted config keys.

    study: default                         # Optuna study name (= MLflow parent run, registered model)
    objective: {metric: eval_loss, direction: minimize}
    n_trials: 12
    sampler: {name: tpe, seed: 42}         # tpe | random | grid | gp
    pruner: {name: median}                 # median | hyperband | none
    heartbeat_seconds: 10                  # a trial whose worker stops beating for 4x this is retried
    base: [trainer.max_steps=40]           # overrides every trial starts from
    space:
      lora.r: {type: categorical, choices: [4, 8, 16]}
      lora.lora_alpha: {type: categorical, choices: [1, 2, 4], ratio_of: lora.r}   # alpha = 1r, 2r, 4r
      trainer.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}

A trial is the list of Hydra overrides its sampled values make; logged with its run, it
reproduces the trial by hand (`lora-exp train <overrides>`).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lora_exp.compose import shipped_dir
from lora_exp.errors import ConfigError

SAMPLERS = ("tpe", "random", "grid", "gp", "nsga2")
#: a study's name names its MLflow parent run and registered model too: letters, digits, . _ -
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
PRUNERS = ("median", "hyperband", "none")
TYPES = ("categorical", "int", "float")
DIRECTIONS = ("minimize", "maximize")


@dataclass(frozen=True)
class ParamSpec:
    type: str
    choices: Optional[list[Any]] = None
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[float] = None
    log: bool = False
    #: the sampled value is a multiplier of this other key's value (e.g. alpha as a ratio to r).
    ratio_of: Optional[str] = None


@dataclass(frozen=True)
class SweepSpec:
    name: str
    study: str
    #: (metric, direction) pairs: one = a single-objective study, more = multi-objective
    objectives: tuple[tuple[str, str], ...] = (("eval_loss", "minimize"),)
    n_trials: int = 12
    timeout: Optional[float] = None
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe", "seed": 42})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    base: list[str] = field(default_factory=list)
    space: dict[str, ParamSpec] = field(default_factory=dict)
    #: failed trials after which the sweep stops (null = never).
    max_failures: Optional[int] = 5
    #: a running trial's worker records a heartbeat this often; a trial silent for 4x this is
    #: taken as dead (SIGKILL, power loss), failed and retried. LORA_EXP_HEARTBEAT_SECONDS overrides it.
    heartbeat_seconds: float = 10.0
    text: str = ""

    @property
    def heartbeat(self) -> float:
        """Seconds between heartbeats: LORA_EXP_HEARTBEAT_SECONDS, else the sweep file's."""
        env = os.environ.get("LORA_EXP_HEARTBEAT_SECONDS", "").strip()
        return float(env) if env else self.heartbeat_seconds

    @property
    def grace(self) -> float:
        """Seconds without a heartbeat after which a running trial is taken as dead."""
        return 4 * self.heartbeat

    @property
    def metric(self) -> str:
        return self.objectives[0][0]

    @property
    def direction(self) -> str:
        return self.objectives[0][1]

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    @property
    def metrics(self) -> list[str]:
        return [m for m, _ in self.objectives]

    @property
    def directions(self) -> list[str]:
        return [d for _, d in self.objectives]


def sweep_dirs() -> list[Path]:
    """Where sweep files are looked up, first match wins: $LORA_EXP_SWEEPS_DIR if set; else
    `./sweeps` in the working folder, then the shipped ones."""
    env = os.environ.get("LORA_EXP_SWEEPS_DIR")
    if env:
        return [Path(env)]
    local, shipped = Path.cwd() / "sweeps", shipped_dir("sweeps")
    return [local, shipped] if local.is_dir() and local.resolve() != shipped.resolve() else [shipped]


def sweep_names() -> list[str]:
    """The sweep files `sweep=NAME` can name."""
    return sorted({p.stem for d in sweep_dirs() for p in d.glob("*.yaml")})


def find_sweep_file(name: str) -> Path:
    """`default` -> sweeps/default.yaml; a path to a .yaml file is taken as it is."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"sweep: file not found: {name}")
        return path
    for folder in sweep_dirs():
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    raise ConfigError(f"sweep: unknown sweep {name!r} (available: {', '.join(sweep_names())})")


def load_sweep(name: str) -> SweepSpec:
    path = find_sweep_file(name)
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"sweep {path.name}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    return parse_sweep(raw, path.stem, text)


def parse_sweep(raw: Any, name: str, text: str = "") -> SweepSpec:
    """Validate a sweep file's contents; every problem is one line naming the key."""
    where = f"sweep {name}"
    _need(isinstance(raw, dict), where, "must be a mapping of settings")
    known = {"study", "objective", "n_trials", "timeout", "sampler", "pruner", "base", "space", "max_failures",
             "heartbeat_seconds"}
    unknown = sorted(set(raw) - known)
    _need(not unknown, where, f"unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(sorted(known))})")
    study = raw.get("study", name)
    _need(isinstance(study, str) and bool(study.strip()), f"{where}: study", "must be a non-empty name")
    check_study_name(study.strip(), f"{where}: study")
    objective = raw.get("objective", {}) or {}
    entries = objective if isinstance(objective, list) else [objective]
    _need(len(entries) >= 1, f"{where}: objective", "must name at least one metric")
    objectives = []
    for i, entry in enumerate(entries):
        key = f"{where}: objective" + (f"[{i}]" if isinstance(objective, list) else "")
        _need(isinstance(entry, dict), key, "must be {metric: NAME, direction: minimize|maximize} (or a list of them)")
        metric, direction = entry.get("metric", "eval_loss"), entry.get("direction", "minimize")
        _need(isinstance(metric, str) and bool(metric), f"{key}.metric", "must be a metric name")
        _need(direction in DIRECTIONS, f"{key}.direction", f"must be minimize or maximize, got {direction!r}")
        objectives.append((metric, direction))
    _need(len({m for m, _ in objectives}) == len(objectives), f"{where}: objective", "names a metric twice")
    n_trials = raw.get("n_trials", 12)
    _need(isinstance(n_trials, int) and not isinstance(n_trials, bool) and n_trials >= 1, f"{where}: n_trials",
          f"must be an integer >= 1, got {n_trials!r}")
    timeout = raw.get("timeout")
    _need(timeout is None or (isinstance(timeout, (int, float)) and timeout > 0), f"{where}: timeout",
          f"must be seconds > 0 or null, got {timeout!r}")
    sampler = _named(raw.get("sampler", {"name": "tpe"}), SAMPLERS, f"{where}: sampler")
    pruner = _named(raw.get("pruner", {"name": "median"}), PRUNERS, f"{where}: pruner")
    base = raw.get("base", []) or []
    _need(isinstance(base, list) and all(isinstance(b, str) for b in base), f"{where}: base",
          "must be a list of overrides like trainer.max_steps=40")
    max_failures = raw.get("max_failures", 5)
    _need(max_failures is None or (isinstance(max_failures, int) and max_failures >= 1), f"{where}: max_failures",
          f"must be an integer >= 1 or null, got {max_failures!r}")
    heartbeat = raw.get("heartbeat_seconds", 10)
    _need(isinstance(heartbeat, (int, float)) and not isinstance(heartbeat, bool) and 1 <= heartbeat <= 3600,
          f"{where}: heartbeat_seconds", f"must be seconds in [1, 3600], got {heartbeat!r}")
    space_raw = raw.get("space", {}) or {}
    _need(isinstance(space_raw, dict) and space_raw, f"{where}: space", "must map config keys to distributions")
    space = {str(k): _param(v, f"{where}: space.{k}") for k, v in space_raw.items()}
    for key, spec in space.items():
        if spec.ratio_of is not None:
            _need(isinstance(spec.ratio_of, str) and spec.ratio_of != key, f"{where}: space.{key}.ratio_of",
                  "must name another config key (e.g. lora.r)")
            anchor = space.get(spec.ratio_of)
            _need(anchor is None or anchor.ratio_of is None, f"{where}: space.{key}.ratio_of",
                  f"{spec.ratio_of} is itself a ratio")
    if sampler["name"] == "grid":
        for key, spec in space.items():
            _need(spec.type == "categorical" or (spec.type == "int" and spec.step is not None),
                  f"{where}: space.{key}", "the grid sampler needs categorical (or stepped int) parameters")
    return SweepSpec(name=name, study=study.strip(), objectives=tuple(objectives), n_trials=n_trials,
                     timeout=timeout, sampler=sampler, pruner=pruner, base=list(base), space=space,
                     max_failures=max_failures, heartbeat_seconds=float(heartbeat), text=text)


def check_study_name(name: str, where: str = "study") -> None:
    """A study name that MLflow's registry and run names take as it is (no path, no spaces)."""
    _need(bool(STUDY_NAME.match(name)) and ".." not in name, where,
          f"{name!r} is not a study name (letters, digits, '.', '_' and '-', at most 100, starting with a letter "
          f"or digit)")


def _named(value: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"name": value}
    _need(isinstance(value, dict) and "name" in value, where, "must be {name: ..., options...}")
    _need(value["name"] in allowed, where, f"unknown {where.rsplit(' ', 1)[-1]} {value['name']!r} "
                                           f"(choose from: {', '.join(allowed)})")
    return dict(value)


def _param(raw: Any, where: str) -> ParamSpec:
    _need(isinstance(raw, dict), where, "must be {type: categorical|int|float, ...}")
    unknown = sorted(set(raw) - {"type", "choices", "low", "high", "step", "log", "ratio_of"})
    _need(not unknown, where, f"unknown key(s) {', '.join(map(str, unknown))}")
    kind = raw.get("type")
    _need(kind in TYPES, where, f"unknown distribution {kind!r} (choose from: {', '.join(TYPES)})")
    if kind == "categorical":
        choices = raw.get("choices")
        _need(isinstance(choices, list) and len(choices) > 0, where, "categorical needs a non-empty choices list")
        _need(all(c is None or isinstance(c, (str, int, float, bool)) for c in choices), where,
              "choices must be plain values (strings, numbers, booleans, null)")
        return ParamSpec("categorical", choices=list(choices), ratio_of=raw.get("ratio_of"))
    low, high = raw.get("low"), raw.get("high")
    numeric = (int,) if kind == "int" else (int, float)
    _need(isinstance(low, numeric) and not isinstance(low, bool) and isinstance(high, numeric)
          and not isinstance(high, bool), where, f"{kind} needs numeric low and high")
    _need(math.isfinite(low) and math.isfinite(high), where, "low and high must be finite")
    _need(low <= high, where, f"low ({low}) > high ({high})")
    log = bool(raw.get("log", False))
    step = raw.get("step")
    _need(not (log and low <= 0), where, "log scale needs low > 0")
    _need(step is None or (isinstance(step, (int, float)) and step > 0), where, "step must be > 0")
    _need(not (log and step is not None), where, "step and log cannot be combined")
    return ParamSpec(kind, low=low, high=high, step=step, log=log, ratio_of=raw.get("ratio_of"))


def _need(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


# --- trial -> overrides ------------------------------------------------------------------


def suggest(trial: Any, space: dict[str, ParamSpec], base_values: dict[str, Any] | None = None) -> list[str]:
    """Sample every key of the space on an Optuna trial; return the trial as Hydra overrides."""
    values: dict[str, Any] = {}
    for key, spec in space.items():
        if spec.type == "categorical":
            values[key] = trial.suggest_categorical(key, spec.choices)
        elif spec.type == "int":
            values[key] = trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
        else:
            values[key] = trial.suggest_float(key, float(spec.low), float(spec.high), step=spec.step, log=spec.log)
    resolved = dict(values)
    for key, spec in space.items():
        if spec.ratio_of is not None:
            anchor = values.get(spec.ratio_of, (base_values or {}).get(spec.ratio_of))
            resolved[key] = values[key] * float(anchor)
    return [f"{k}={format_value(v)}" for k, v in resolved.items()]


def format_value(value: Any) -> str:
    """A Python value as Hydra override text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def corner_overrides(space: dict[str, ParamSpec]) -> list[list[str]]:
    """One override set per extreme value of each parameter: composing them all checks the
    whole search space against the config schema before any trial runs."""
    out = []
    for key, spec in space.items():
        if spec.ratio_of is not None:
            continue  # checked through the sampled trials; depends on another key
        values = spec.choices if spec.type == "categorical" else [spec.low, spec.high]
        out.extend([[f"{key}={format_value(v)}"] for v in values or []])
    return out
