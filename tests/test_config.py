"""Every shipped config composes and validates; every bad value fails with its message."""
from __future__ import annotations

import pytest
import torch

from lora_exp.compose import compose
from lora_exp.errors import ConfigError

from helpers import CONF

GROUPS = ["model", "lora", "trainer", "data", "tracking", "pack"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_shipped_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "lora" or group == "model":  # presets must exist on the model
        overrides.append("lora.preset=null" if group == "model" else "model=gpt2")
    cfg = compose(overrides)
    assert getattr(cfg, group) is not None
    assert cfg.target_modules, "every combination resolves target modules"


def test_every_yaml_opens_with_its_command():
    for path in CONF.rglob("*.yaml"):
        assert path.read_text().startswith("# "), f"{path} should open with the command that uses it"


def test_defaults_are_offline_model_and_qa_demo():
    cfg = compose([])
    assert cfg.model.name == "smollm2_135m" and cfg.model.source == "gguf_package"
    assert cfg.data.name == "qa_demo"
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.tracking.uri == "sqlite:///mlruns/mlflow.db"


def test_seed_recipe_matches_the_blog():
    cfg = compose(["model=gpt2", "lora=seed", "trainer=seed", "data=seed"])
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout, cfg.lora.bias) == (8, 16, 0.1, "none")
    assert cfg.target_modules == ["c_attn"] and cfg.model.fan_in_fan_out is True
    t = cfg.trainer
    assert (t.lr, t.epochs, t.batch_size, t.warmup_steps, t.logging_steps, t.seed) == (1e-4, 500, 1, 0, 5, 42)
    assert cfg.data.max_length == 128


def test_overrides_are_recorded():
    cfg = compose(["lora.r=16", "trainer.lr=3e-4"])
    assert cfg.lora.r == 16 and cfg.trainer.lr == 3e-4
    assert cfg.overrides == ["lora.r=16", "trainer.lr=3e-4"]


def test_preset_or_explicit_target_modules():
    assert compose(["lora.preset=all_linear"]).target_modules[-1] == "down_proj"
    assert compose(["lora.target_modules=[q_proj,o_proj]"]).target_modules == ["q_proj", "o_proj"]
    assert compose(["model=gpt2", "lora.preset=attn_proj"]).target_modules == ["c_attn", "c_proj"]


BAD = [
    (["lora.r=0"], "lora.r: must be >= 1"),
    (["lora.lora_alpha=-1"], "lora.lora_alpha: must be > 0"),
    (["lora.lora_alpha=0"], "lora.lora_alpha: must be > 0"),
    (["lora.lora_dropout=1.0"], "lora.lora_dropout: must be in [0, 1)"),
    (["lora.lora_dropout=-0.1"], "lora.lora_dropout: must be in [0, 1)"),
    (["trainer.lr=0"], "trainer.lr: must be > 0"),
    (["trainer.lr=-1e-3"], "trainer.lr: must be > 0"),
    (["lora.preset=qkv"], "has no preset 'qkv' (it has: qv, attn, all_linear)"),
    (["lora.target_modules=[c_attn]"], "has no module c_attn (it has: q_proj, k_proj"),
    (["model=gpt2", "lora.target_modules=[q_proj]"], "has no module q_proj (it has: c_attn, c_proj, c_fc)"),
    (["data.train_files=[missing.jsonl]"], "data.train_files: file not found: missing.jsonl"),
    (["model=llama7b"], "unknown model option 'llama7b' (available: gpt2, smollm2_135m, tiny_gpt2, tiny_llama)"),
    (["lora.rank=4"], "lora.rank"),
    (["lora.r=eight"], "lora.r: Value 'eight'"),
    (["trainer.max_steps=0"], "trainer.max_steps: must be >= 1"),
    (["trainer.batch_size=0"], "trainer.batch_size: must be >= 1"),
    (["trainer.precision=fp8"], "trainer.precision: must be one of fp32, bf16"),
    (["lora.r=[1"], "cannot parse override"),
    (["model.attn_implementation=flash"], "model.attn_implementation: must be one of eager, sdpa"),
    (["model.dtype=fp16"], "model.dtype: must be one of fp32, bf16, got 'fp16'"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_rejected_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_yaml_lists_every_field(group, option):
    """Hydra only lets a user override keys the YAML has: every field must be there."""
    import dataclasses

    import yaml

    from lora_exp.config import RunConfig

    schema = {f.name: f.type for f in dataclasses.fields(RunConfig)}[group]
    from lora_exp import config as config_module

    fields = {f.name for f in dataclasses.fields(getattr(config_module, schema))}
    keys = set(yaml.safe_load((CONF / group / f"{option}.yaml").read_text()))
    assert keys == fields, f"missing {fields - keys}, unknown {keys - fields}"


def test_attention_implementation_reaches_the_model():
    from lora_exp.core.models import load_base

    cfg = compose(["model=tiny_gpt2", "model.attn_implementation=eager"])
    assert load_base(cfg.model, torch.device("cpu")).model.config._attn_implementation == "eager"
    default = compose(["model=tiny_gpt2"])
    assert load_base(default.model, torch.device("cpu")).model.config._attn_implementation == "sdpa"


def test_model_dtype_loads_the_base_in_it_and_leaves_the_lora_weights_fp32():
    from lora_exp.core.adapters import attach_adapter
    from lora_exp.core.models import load_base

    cfg = compose(["model=tiny_llama", "model.dtype=bf16"])
    base = load_base(cfg.model, torch.device("cpu"))
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16}
    assert base.model.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained keeps it
    lora = [p for n, p in attach_adapter(base, cfg).named_parameters() if "lora_" in n]
    assert lora and {p.dtype for p in lora} == {torch.float32}
    assert {p.dtype for p in load_base(compose(["model=tiny_llama"]).model, torch.device("cpu")).model.parameters()} \
        == {torch.float32}


TRIAL_OVERRIDES = [["trainer.lr=1e-05"], ["trainer.lr=1e-3", "lora.r=8", "lora.lora_alpha=16"], ["lora.preset=all"],
                   ["lora.target_modules=[c_attn]"], ["trainer.max_grad_norm=null"], ["lora.lora_dropout=0"],
                   ["trainer.lr=3"], ["lora=seed", "trainer.lr=1e-4"], ["model.architecture.n_layer=3"],
                   ["data.name=123"], ["trainer.max_grad_norm=1"], ["trainer.lr=-1"], ["lora.r=abc"], ["lora.r=1.5"],
                   ["trainer.max_steps=true"], ["lora.r=null"]]


@pytest.mark.parametrize("overrides", TRIAL_OVERRIDES, ids=[" ".join(o) for o in TRIAL_OVERRIDES])
def test_a_trials_config_built_on_the_composed_base_is_what_hydra_composes(overrides):
    """Sweeps build each trial's config on the base composed once (no Hydra compose per trial):
    the same config, or the same one-line error, as composing it (`1e-05` is a float there too)."""
    from lora_exp.sweep.trial import trial_config

    base_overrides = ["model=tiny_gpt2", "data=seed", "trainer.max_steps=10"]
    base = compose(base_overrides)
    try:
        want = compose(base_overrides + overrides)
    except ConfigError as exc:
        with pytest.raises(ConfigError) as got:
            trial_config(base, base_overrides, overrides)
        assert str(got.value) == str(exc)
        return
    assert trial_config(base, base_overrides, overrides) == want


def test_an_unknown_key_in_a_trials_overrides_is_named():
    from lora_exp.sweep.trial import trial_config

    base = compose(["model=tiny_gpt2"])
    with pytest.raises(ConfigError, match=r"^lora\.nope: "):
        trial_config(base, ["model=tiny_gpt2"], ["lora.nope=1"])


def test_a_full_architecture_mapping_replaces_any_models_architecture():
    """`model.architecture=` takes a whole mapping, also on a model whose shipped architecture is
    `{}` (random weights of any real architecture: how benchmarks and users size a model)."""
    from lora_exp.core.models import load_base

    cfg = compose(["model=smollm2_135m", "model.source=random",
                   "model.architecture={model_type: llama, num_hidden_layers: 2, hidden_size: 64,"
                   " intermediate_size: 128, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 49152}"])
    assert cfg.model.architecture["num_key_value_heads"] == 2
    model = load_base(cfg.model, torch.device("cpu")).model
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads) == ("llama", 2, 2)
    one_key = compose(["model=smollm2_135m", "model.source=random", "model.architecture.model_type=llama"])
    assert one_key.model.architecture == {"model_type": "llama"}
    extended = compose(["model=tiny_llama", "model.architecture.rope_theta=500000.0"])
    assert extended.model.architecture["rope_theta"] == 500000.0
    assert extended.model.architecture["num_key_value_heads"] == compose(["model=tiny_llama"]).model.architecture[
        "num_key_value_heads"]
