"""Trials a sweep runs first: the best finished trials of another study (`warm_start=STUDY[:K]`)
and override sets listed in a file (`enqueue=FILE.yaml`).

Each becomes a WAITING Optuna trial whose searched keys are fixed params (the sampler sees them
as its own trials) and whose other config keys are the trial's extra overrides. Both are marked:
the Optuna user attribute `enqueued` and the MLflow tag `lora_exp.enqueued` say where the trial
came from. A trial already enqueued (same source, same overrides) is never enqueued again, so a
resumed sweep with the same arguments adds nothing.

An enqueue file lists override sets, one per trial, each a list, one line or a mapping:

    - [lora.r=16, lora.lora_alpha=32, trainer.lr=3.0e-4]
    - lora.r=8 trainer.lr=1.0e-3
    - {lora.r: 4, lora.lora_dropout: 0.0}
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_exp.compose import override_value
from lora_exp.config import GROUP_NAMES, RunConfig, flatten
from lora_exp.errors import ConfigError
from lora_exp.sweep.spec import ParamSpec, SweepSpec, format_value, suggest
from lora_exp.tracking.locks import store_lock

log = logging.getLogger("lora_exp")

#: Optuna user attributes of an enqueued trial: where it came from, its identity (source and
#: overrides: what is never enqueued twice), and its overrides of keys the space does not search
ENQUEUED = "enqueued"
ENQUEUE_KEY = "enqueue_key"
EXTRA_OVERRIDES = "enqueued_overrides"
#: best trials taken from another study when `warm_start=STUDY` names no count
DEFAULT_WARM_START = 5


@dataclass
class Seeded:
    """One trial to enqueue: its source, fixed params (searched keys) and extra overrides."""

    source: str
    params: dict[str, Any] = field(default_factory=dict)
    extras: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # as given (absolute values)

    @property
    def key(self) -> str:
        return self.source.split("#")[0] + "|" + " ".join(sorted(self.overrides))


def trial_overrides(trial: Any, space: dict[str, ParamSpec], base_values: dict[str, Any]) -> list[str]:
    """A claimed trial's overrides: its sampled (or enqueued) values, then an enqueued trial's
    overrides of keys the space does not search."""
    return suggest(trial, space, base_values) + list(trial.user_attrs.get(EXTRA_OVERRIDES, []))


def seeded_trials(warm_start: str | None, enqueue: str | None, spec: SweepSpec, base: RunConfig,
                  storage: str) -> list[Seeded]:
    """The trials `warm_start=` and `enqueue=` ask for, checked against this sweep (before any
    model loads): a file's unknown key or out-of-space value is refused; another study's keys
    this config lacks, or values outside this space, are dropped with a note."""
    out: list[Seeded] = []
    if enqueue:
        out += from_file(enqueue, spec, base)
    if warm_start:
        out += from_study(warm_start, spec, base, storage)
    return out


def from_file(path: str, spec: SweepSpec, base: RunConfig) -> list[Seeded]:
    where = f"enqueue {path}"
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{where}: file not found")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: must be a list of override sets (e.g. - [lora.r=16, trainer.lr=3.0e-4])")
    out = []
    for i, entry in enumerate(raw):
        overrides = _entry_overrides(entry, f"{where}: entry {i + 1}")
        seeded = to_seeded(overrides, spec, base, f"{file.name}#{i + 1}", strict=f"{where}: entry {i + 1}")
        out.append(seeded)
    return out


def _entry_overrides(entry: Any, where: str) -> list[str]:
    if isinstance(entry, str):
        items = entry.split()
    elif isinstance(entry, list) and all(isinstance(e, str) for e in entry):
        items = list(entry)
    elif isinstance(entry, dict):
        items = [f"{k}={format_value(v)}" for k, v in entry.items()]
    else:
        raise ConfigError(f"{where}: must be a list of key=value overrides, one line of them, or a mapping")
    if not items:
        raise ConfigError(f"{where}: is empty")
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{where}: {item!r} is not a key=value override")
    return items


def from_study(arg: str, spec: SweepSpec, base: RunConfig, storage: str) -> list[Seeded]:
    """The K best finished trials of study `arg` (`STUDY[:K]`) in `storage`, as this sweep's trials."""
    import optuna

    name, _, count = arg.partition(":")
    where = f"warm_start={arg}"
    try:
        k = int(count) if count else DEFAULT_WARM_START
    except ValueError:
        raise ConfigError(f"{where}: expected STUDY or STUDY:K with K a whole number, got {count!r}") from None
    if k < 1:
        raise ConfigError(f"{where}: K must be >= 1")
    from lora_exp.sweep.storage import rdb_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).expanduser().is_file():
        raise ConfigError(f"{where}: no study storage at {storage} to start from")  # and none made by asking
    try:
        other = optuna.load_study(study_name=name, storage=rdb_storage(storage))
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)] if storage else []
        raise ConfigError(f"{where}: no study {name!r} in the storage "
                          f"(studies: {', '.join(names) or 'none'})") from None
    best = best_trials(other, k)
    if not best:
        raise ConfigError(f"{where}: study {name!r} has no completed trial to start from")
    out = []
    for trial in best:
        overrides = list(trial.user_attrs.get("overrides") or [])
        seeded = to_seeded(overrides, spec, base, f"{name}#{trial.number}", strict=None)
        out.append(seeded)
    return out


def best_trials(study: Any, k: int) -> list[Any]:
    """The study's k best COMPLETE trials by its (first) objective."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    sign = 1 if study.directions[0].name == "MINIMIZE" else -1
    return sorted(done, key=lambda t: (sign * t.values[0], t.number))[:k]


def to_seeded(overrides: list[str], spec: SweepSpec, base: RunConfig, source: str, strict: str | None) -> Seeded:
    """Overrides as given (absolute values) -> fixed params of this space and extra overrides.
    `strict` (where to say it) refuses what the lenient path drops with a note."""
    known = flatten(base.to_dict())
    values = {o.partition("=")[0]: override_value(o) for o in overrides}
    seeded = Seeded(source, overrides=list(overrides))
    notes = []
    for text in overrides:
        key = text.partition("=")[0]
        value = values[key]
        if key in spec.space:
            param = spec.space[key]
            if param.ratio_of is not None:
                anchor = values.get(param.ratio_of, known.get(param.ratio_of))
                value = value / float(anchor) if isinstance(value, (int, float)) and anchor else None
            fixed = in_space(param, value)
            if fixed is _OUTSIDE:
                notes.append(f"{text} is outside this sweep's space for {key}")
            else:
                seeded.params[key] = fixed
        elif key in known and key.split(".")[0] in GROUP_NAMES:
            seeded.extras.append(text)
        else:
            notes.append(f"{key} is not a key of this config")
    if strict and notes:
        raise ConfigError(f"{strict}: {notes[0]}")
    for note in notes:
        print(f"note: warm start from trial {source}: {note}: dropped")
    return seeded


_OUTSIDE = object()


def in_space(param: ParamSpec, value: Any) -> Any:
    """`value` as the param's own value (a categorical choice, an int, a float in range), or _OUTSIDE."""
    if param.type == "categorical":
        for choice in param.choices or []:
            if choice == value or (_number(choice) and _number(value) and math.isclose(choice, value, rel_tol=1e-9)):
                return choice
        return _OUTSIDE
    if not _number(value):
        return _OUTSIDE
    low, high = float(param.low), float(param.high)
    tol = 1e-9 * max(1.0, abs(low), abs(high))
    if not low - tol <= value <= high + tol:
        return _OUTSIDE
    if param.type == "int":
        step = int(param.step or 1)
        if float(value) != int(value) or (int(value) - int(param.low)) % step:
            return _OUTSIDE
        return int(value)
    return min(high, max(low, float(value)))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def enqueue_seeded(study: Any, seeded: list[Seeded], storage: str) -> int:
    """Enqueue the trials not enqueued before (by source and overrides); returns how many. Under
    the study's top-up lock, so processes starting together add them once."""
    from lora_exp.sweep.storage import stored_trials

    if not seeded:
        return 0
    with store_lock(storage, f"top-up:{study.study_name}"):
        existing = {t.user_attrs.get(ENQUEUE_KEY) for t in stored_trials(study, None)}
        added = 0
        for s in seeded:
            if s.key in existing:
                continue
            attrs = {ENQUEUED: s.source, ENQUEUE_KEY: s.key}
            if s.extras:
                attrs[EXTRA_OVERRIDES] = s.extras
            study.enqueue_trial(s.params, user_attrs=attrs, skip_if_exists=False)
            existing.add(s.key)
            added += 1
    return added
