"""Bad input to `lora-exp sweep`: one clear line, exit code 2, nothing written. Plus fuzzing of the
sweep-file and override parsers: nothing but the clean error may come out of them."""
from __future__ import annotations

import os

import pytest
import yaml
from helpers import REPO, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_exp.compose import compose
from lora_exp.errors import ConfigError
from lora_exp.sweep.plan import parse_options
from lora_exp.sweep.spec import parse_sweep

os.environ["LORA_EXP_SWEEPS_DIR"] = str(REPO / "sweeps")

GOOD_SPACE = "space: {lora.r: {type: int, low: 1, high: 4}}\n"
TABLE = [
    ("unknown group option", ["model=nope"], None, "unknown model option 'nope'"),
    ("mistyped key", ["lora.rr=4"], None, "lora.rr"),
    ("wrong type", ["lora.r=four"], None, "lora.r: Value 'four'"),
    ("r = 0", ["lora.r=0"], None, "lora.r: must be >= 1, got 0"),
    ("negative alpha", ["lora.lora_alpha=-8"], None, "lora.lora_alpha: must be > 0"),
    ("dropout 1.0", ["lora.lora_dropout=1.0"], None, "lora.lora_dropout: must be in [0, 1)"),
    ("module the model lacks", ["lora.target_modules=[q_proj]"], None, "has no module q_proj"),
    ("missing data file", ["data=custom", "data.train_files=[nope.jsonl]"], None, "file not found: nope.jsonl"),
    ("empty data file", ["data=custom", "data.train_files=[empty.jsonl]"], None, "empty.jsonl is empty"),
    ("row without fields", ["data=custom", "data.train_files=[rows.jsonl]"], None, "has no 'answer' text"),
    ("invalid YAML", [], "study: [oops\n", "not valid YAML"),
    ("low > high", [], "space: {lora.r: {type: int, low: 9, high: 2}}\n", "low (9) > high (2)"),
    ("unknown distribution", [], "space: {lora.r: {type: zipf}}\n", "unknown distribution 'zipf'"),
    ("unknown sampler", [], "sampler: annealing\n" + GOOD_SPACE, "unknown sampler 'annealing'"),
    ("unknown pruner", [], "pruner: {name: asha}\n" + GOOD_SPACE, "unknown pruner 'asha'"),
    ("n_trials 0 in file", [], "n_trials: 0\n" + GOOD_SPACE, "n_trials: must be an integer >= 1"),
    ("n_trials 0 option", ["n_trials=0"], None, "n_trials: must be >= 1"),
    ("negative workers", ["workers=-1"], None, "workers: must be >= 1"),
    ("unreachable storage", ["storage=postgresql://nobody:secret@127.0.0.1:1/none"], None,
     "storage: cannot open postgresql://nobody:***@127.0.0.1:1/none"),
    ("unknown sweep", ["sweep=nonesuch"], None, "unknown sweep 'nonesuch'"),
]


@pytest.mark.parametrize("name,args,sweep_text,message", TABLE, ids=[t[0] for t in TABLE])
def test_sweep_bad_input(workdir, name, args, sweep_text, message):
    (workdir / "empty.jsonl").write_text("")
    (workdir / "rows.jsonl").write_text('{"question": "Q?", "reply": "A."}\n')
    base = ["sweep=tiny"]
    if sweep_text is not None:
        (workdir / "bad.yaml").write_text("# lora-exp sweep sweep=bad.yaml\nbase: [model=tiny_gpt2, data=seed]\n"
                                          + sweep_text)
        base = [f"sweep={workdir}/bad.yaml"]
    proc = run_cli("sweep", *base, *args, cwd=workdir, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lora-exp: error: ") and message in lines[0]
    assert "secret" not in proc.stderr
    assert not (workdir / "mlruns").exists(), "nothing written"


values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 50) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["categorical", "int", "float", "tpe", "median", "lora.r"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "low", "high", "choices", "log", "step", "ratio_of", "name", "metric",
                         "direction", "lora.r", "trainer.lr"]) | st.text(max_size=6), inner, max_size=5),
    max_leaves=20)
sweep_docs = st.dictionaries(
    st.sampled_from(["study", "objective", "n_trials", "timeout", "sampler", "pruner", "base", "space",
                     "max_failures", "extra"]), values, max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sweep_docs)
def test_fuzz_sweep_files_fail_only_cleanly(doc):
    try:
        parse_sweep(doc, "fuzz")
    except ConfigError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=80))
def test_fuzz_sweep_yaml_text(text):
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return  # load_sweep turns this into a ConfigError (tested above)
    try:
        parse_sweep(raw, "fuzz")
    except ConfigError:
        pass


override = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["lora.r", "lora.lora_alpha", "lora.lora_dropout",
                                                         "trainer.lr", "lora.preset", "model", "data",
                                                         "lora.target_modules", "trainer.max_steps", "zz"]),
              st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=10)),
    st.text(max_size=20))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(override, max_size=3))
def test_fuzz_overrides_fail_only_cleanly(overrides):
    try:
        compose(overrides)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    try:
        parse_options(overrides)
    except ConfigError:
        pass
