"""Sweep files and sweep options: every shipped sweep parses and its space composes; bad files and
options fail with one line."""
from __future__ import annotations

import os

import pytest

from lora_exp.compose import compose
from lora_exp.errors import ConfigError
from lora_exp.sweep.command import cmd_sweep
from lora_exp.sweep.plan import parse_options
from lora_exp.sweep.spec import corner_overrides, load_sweep, parse_sweep

from helpers import REPO

os.environ["LORA_EXP_SWEEPS_DIR"] = str(REPO / "sweeps")


SWEEPS = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("name", SWEEPS)
def test_every_shipped_sweep_file_parses_and_its_space_composes(name):
    spec = load_sweep(name)
    assert spec.n_trials >= 1 and spec.space
    assert (REPO / "sweeps" / f"{name}.yaml").read_text().startswith("# lora-exp sweep")
    compose(spec.base)
    for corner in corner_overrides(spec.space):
        compose(spec.base + corner)


def test_default_sweep_searches_the_offline_model_on_qa_demo():
    spec = load_sweep("default")
    cfg = compose(spec.base)
    assert cfg.model.name == "smollm2_135m" and cfg.data.name == "qa_demo"
    assert spec.metric == "eval_loss" and spec.direction == "minimize"
    assert {"lora.r", "lora.lora_alpha", "lora.lora_dropout", "lora.preset", "trainer.lr"} <= set(spec.space)
    assert spec.space["trainer.lr"].log and spec.space["lora.lora_alpha"].ratio_of == "lora.r"


BAD_SWEEPS = [
    ("n_trials: 0\nspace: {lora.r: {type: int, low: 1, high: 4}}", "n_trials: must be an integer >= 1"),
    ("space: {lora.r: {type: int, low: 8, high: 4}}", "space.lora.r: low (8) > high (4)"),
    ("space: {lora.r: {type: normal, low: 1, high: 4}}", "unknown distribution 'normal'"),
    ("sampler: {name: cmaes}\nspace: {lora.r: {type: int, low: 1, high: 4}}", "unknown sampler 'cmaes'"),
    ("pruner: patient\nspace: {lora.r: {type: int, low: 1, high: 4}}", "unknown pruner 'patient'"),
    ("space: {}", "space: must map config keys"),
    ("space: {trainer.lr: {type: float, low: 0, high: 1, log: true}}", "log scale needs low > 0"),
    ("objective: {metric: eval_loss, direction: down}\nspace: {lora.r: {type: int, low: 1, high: 4}}",
     "must be minimize or maximize"),
    ("trials: 4\nspace: {lora.r: {type: int, low: 1, high: 4}}", "unknown key(s) trials"),
]


@pytest.mark.parametrize("text,message", BAD_SWEEPS, ids=[m for _, m in BAD_SWEEPS])
def test_bad_sweep_files_are_rejected_with_one_line(text, message):
    import yaml

    with pytest.raises(ConfigError) as info:
        parse_sweep(yaml.safe_load(text), "bad")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_invalid_yaml_and_bad_options(workdir):
    (workdir / "broken.yaml").write_text("study: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(str(workdir / "broken.yaml"))
    with pytest.raises(ConfigError, match="n_trials: must be >= 1"):
        parse_options(["n_trials=0"])
    with pytest.raises(ConfigError, match="unknown sweep 'nope'"):
        load_sweep("nope")
    opts = parse_options(["sweep=tiny", "n_trials=3", "workers=2", "lora.r=4", "model=tiny_llama"])
    assert (opts.sweep, opts.n_trials, opts.workers, opts.overrides) == ("tiny", 3, 2, ("lora.r=4", "model=tiny_llama"))


def test_search_space_value_the_config_rejects_fails_before_any_trial(workdir):
    (workdir / "bad_space.yaml").write_text(
        "base: [model=tiny_gpt2, data=seed]\nspace: {lora.r: {type: int, low: 0, high: 4}}\n")
    with pytest.raises(ConfigError, match="lora.r: must be >= 1, got 0"):
        cmd_sweep([f"sweep={workdir}/bad_space.yaml"])
    assert not (workdir / "mlruns").exists()
