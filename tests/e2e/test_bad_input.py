"""Bad input to every command: one clear line, exit code 2, nothing written. Plus fuzzing of the
sweep-file and override parsers: nothing but the clean error may come out of them."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cli_server import CliServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_exp.compose import compose
from lora_exp.errors import ConfigError
from lora_exp.sweep.plan import parse_options
from lora_exp.sweep.spec import parse_sweep

from helpers import REPO, run_cli

os.environ["LORA_EXP_SWEEPS_DIR"] = str(REPO / "sweeps")

GOOD_SPACE = "space: {lora.r: {type: int, low: 1, high: 4}}\n"
SWEEP_HEAD = "# lora-exp sweep sweep=bad.yaml\nbase: [model=tiny_gpt2, data=seed]\n"
RUN = "0123456789abcdef0123456789abcdef"  # a well-formed run id that no store holds
MISSING = "tracking.uri=sqlite:///missing/mlflow.db"
#: (name, command line, sweep file text or None, what the one line must say)
TABLE = [
    # train: overrides, values, data, stores
    ("r zero", ["train", "lora.r=0"], None, "lora.r: must be >= 1, got 0"),
    ("r huge", ["train", "lora.r=1000000000"], None, "lora.r: must be <= 16384"),
    ("key typo", ["train", "lora.rr=4"], None, "lora.rr: no such config key (did you mean lora.r?)"),
    ("several values", ["train", "lora.r=4,8"], None, "one value per key"),
    ("unknown group option", ["train", "model=nope"], None, "unknown model option 'nope'"),
    ("wrong type", ["train", "lora.r=four"], None, "lora.r: Value 'four'"),
    ("negative lr", ["train", "trainer.lr=-1"], None, "trainer.lr: must be > 0"),
    ("dropout 1", ["train", "lora.lora_dropout=1.0"], None, "lora.lora_dropout: must be in [0, 1)"),
    ("module the model lacks", ["train", "lora.target_modules=[c_attn]"], None, "has no module c_attn"),
    ("missing tokenizer folder", ["train", "model.tokenizer=/nonexistent/tokenizer"], None,
     "model.tokenizer: no such folder: /nonexistent/tokenizer"),
    ("missing model folder", ["sweep", "model=smollm2_135m", "model.source=hub", "model.path=./no-model"], None,
     "model.path: no such folder: ./no-model"),
    ("missing data file", ["train", "data=custom", "data.train_files=[nope.jsonl]"], None,
     "file not found: nope.jsonl"),
    ("empty data file", ["train", "data=custom", "data.train_files=[empty.jsonl]"], None, "empty.jsonl is empty"),
    ("row without the field", ["train", "data=custom", "data.train_files=[rows.jsonl]"], None, "has no 'answer' text"),
    ("unknown metric", ["train", "trainer.generation_metrics=[bleu]"], None, "unknown metric(s) bleu"),
    ("threads zero", ["train", "trainer.num_threads=0"], None, "trainer.num_threads: must be >= 1"),
    ("bad pack setting", ["train", "pack.compile=fast"], None, "pack.compile: must be one of"),
    ("sweep option in train", ["train", "n_trials=3"], None, "n_trials: not a config key but a sweep option"),
    ("not a URI", ["train", "tracking.uri=mlruns"], None, "tracking.uri: 'mlruns' is not a URI"),
    ("server down", ["train", "tracking.uri=http://127.0.0.1:1"], None, "cannot reach the tracking server"),
    # sweep: options, sweep files, objectives, stores
    ("unknown sweep", ["sweep", "sweep=nonesuch"], None, "unknown sweep 'nonesuch'"),
    ("n_trials not a number", ["sweep", "n_trials=abc"], None, "n_trials: expected a whole number"),
    ("n_trials zero", ["sweep", "n_trials=0"], None, "n_trials: must be >= 1"),
    ("negative workers", ["sweep", "workers=-1"], None, "workers: must be >= 1"),
    ("timeout zero", ["sweep", "timeout=0"], None, "timeout: must be > 0 seconds"),
    ("pack zero", ["sweep", "pack=0"], None, "pack: must be >= 1"),
    ("study name a path", ["sweep", "study=../../etc"], None, "'../../etc' is not a study name"),
    ("unreachable storage", ["sweep", "storage=postgresql://nobody:secret@127.0.0.1:1/none"], None,
     "storage: cannot open postgresql://nobody:***@127.0.0.1:1/none"),
    ("sweep server down", ["sweep", "tracking.uri=http://127.0.0.1:1"], None, "cannot reach the tracking server"),
    ("no validation data", ["sweep", "data=custom", "data.train_files=[one.jsonl]"], None,
     "objective eval_loss needs validation data"),
    ("invalid YAML", ["sweep"], "study: [oops\n", "not valid YAML"),
    ("low > high", ["sweep"], "space: {lora.r: {type: int, low: 9, high: 2}}\n", "low (9) > high (2)"),
    ("unknown distribution", ["sweep"], "space: {lora.r: {type: zipf}}\n", "unknown distribution 'zipf'"),
    ("unknown sampler", ["sweep"], "sampler: annealing\n" + GOOD_SPACE, "unknown sampler 'annealing'"),
    ("unknown pruner", ["sweep"], "pruner: {name: asha}\n" + GOOD_SPACE, "unknown pruner 'asha'"),
    ("n_trials zero in file", ["sweep"], "n_trials: 0\n" + GOOD_SPACE, "n_trials: must be an integer >= 1"),
    ("study name with a space", ["sweep"], "study: my study\n" + GOOD_SPACE, "'my study' is not a study name"),
    ("heartbeat zero", ["sweep"], "heartbeat_seconds: 0\n" + GOOD_SPACE, "heartbeat_seconds: must be seconds"),
    ("objective nobody records", ["sweep"], "objective: {metric: bleu}\n" + GOOD_SPACE,
     "objective bleu is not a metric a run records"),
    ("metric not computed", ["sweep"], "objective: {metric: rouge_l, direction: maximize}\nbase: "
     "[model=tiny_gpt2, data=seed, 'trainer.generation_metrics=[exact_match]']\n" + GOOD_SPACE,
     "objective rouge_l is not computed: add rouge_l to trainer.generation_metrics"),
    ("enqueue file missing", ["sweep", "enqueue=nope.yaml"], None, "enqueue nope.yaml: file not found"),
    ("enqueue unknown key", ["sweep", "enqueue=typo.yaml"], None,
     "enqueue typo.yaml: entry 1: lora.rr is not a key of this config"),
    ("enqueue value outside the space", ["sweep", "enqueue=outside.yaml"], None,
     "enqueue outside.yaml: entry 2: lora.r=3 is outside this sweep's space for lora.r"),
    ("warm start without a storage", ["sweep", "warm_start=other:3"], None, "warm_start=other:3: no study storage"),
    ("warm start unknown study", ["sweep", "warm_start=other", "storage=sqlite:///store/optuna.db"], None,
     "warm_start=other: no study 'other' in the storage (studies: earlier)"),
    ("warm start from itself", ["sweep", "warm_start=tiny"], None, "warm_start=tiny: that is this study"),
    ("warm start K not a number", ["sweep", "warm_start=other:many"], None, "expected STUDY or STUDY:K"),
    ("space value the config rejects", ["sweep"], "space: {lora.r: {type: int, low: 0, high: 4}}\n",
     "lora.r: must be >= 1, got 0"),
    # rerun, export, generate, best, ui: run ids, paths, stores
    ("rerun not a run id", ["rerun", "not-a-run"], None, "'not-a-run' is not a run id"),
    ("rerun missing store", ["rerun", RUN, MISSING], None, "no MLflow store at sqlite:///missing/mlflow.db"),
    ("rerun unknown run", ["rerun", RUN, "tracking.uri=sqlite:///store/mlflow.db"], None, f"no run {RUN}"),
    ("export unwritable folder", ["export", RUN, "--out", "/proc/nope/x", MISSING], None, "cannot write /proc/nope/x"),
    ("export not a run id", ["export", "xyz", "--out", "out"], None, "'xyz' is not a run id"),
    ("export unknown model", ["export", "models:/nope@best", "--out", "out", "tracking.uri=sqlite:///store/mlflow.db"],
     None, "no registered model models:/nope@best"),
    ("generate not a run id", ["generate", "abc", "Q: hi"], None, "'abc' is not a run id"),
    ("generate missing store", ["generate", RUN, "Q: hi", MISSING], None, "no MLflow store at"),
    ("best without a study storage", ["best"], None, "no study storage at"),
    ("best unknown option", ["best", "colour=blue"], None, "unknown option(s) colour"),
    ("ui missing store", ["ui", MISSING], None, "no MLflow store at sqlite:///missing/mlflow.db"),
]


@dataclass
class Outcome:
    proc: subprocess.CompletedProcess
    seconds: float
    before: list[Path]
    after: list[Path]
    store: str


def _files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.suffix != ".lock")


#: rows also run as a `lora-exp` process of their own (the installed entry point's exit code and
#: stderr, with the libraries' logging as a user gets it); the others run `cli.main` in the test's
#: process: the same code from the command line on, without a process start (0.3-3 s) each
AS_A_PROCESS = {"r zero", "server down", "unknown sweep", "unreachable storage", "enqueue unknown key",
                "rerun not a run id", "export unwritable folder", "generate missing store", "best unknown option",
                "ui missing store"}


def _main(args: list[str], folder: Path) -> subprocess.CompletedProcess:
    """`lora-exp ARGS` as `cli.main` runs it, in `folder`, its stdout and stderr captured."""
    import contextlib
    import io
    import warnings

    from lora_exp.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a process of its own filters them in main(); here, once per process
            try:
                code = main(args)
            except SystemExit as exc:  # argparse's own errors
                code = exc.code
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _try(case: tuple, folder: Path, template: Path) -> Outcome:
    """One row of the table, in its own folder beside an existing, empty MLflow store."""
    _, args, sweep_text, _ = case
    (folder / "empty.jsonl").write_text("")
    (folder / "rows.jsonl").write_text('{"question": "Q?", "reply": "A."}\n')
    (folder / "one.jsonl").write_text('{"question": "Q?", "answer": "A."}\n')
    (folder / "typo.yaml").write_text("- [lora.rr=4]\n")
    (folder / "outside.yaml").write_text("- [lora.r=4]\n- lora.r=3 trainer.lr=1e-3\n")
    shutil.copytree(template, folder / "store")
    args = list(args)
    if args[0] == "sweep":
        args.insert(1, "sweep=tiny")
        if sweep_text is not None:
            (folder / "bad.yaml").write_text(SWEEP_HEAD + sweep_text)
            args[1] = f"sweep={folder}/bad.yaml"
    before = _files(folder)
    start = time.monotonic()
    proc = run_cli(*args, cwd=folder, timeout=60) if case[0] in AS_A_PROCESS else _main(args, folder)
    return Outcome(proc, time.monotonic() - start, before, _files(folder), f"sqlite:///{folder}/store/mlflow.db")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A real MLflow store and a study storage with one study, made once per test process and
    copied into each row's folder; and the tests' CLI server started, outside every row's time
    (seconds when busy). Each row runs in its own test: pytest-xdist workers share the table."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("template") / "store"
    MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()
    import optuna

    optuna.create_study(study_name="earlier", storage=f"sqlite:///{folder}/optuna.db")
    CliServer.get()
    return folder


@pytest.mark.parametrize("name,args,sweep_text,message", TABLE, ids=[t[0] for t in TABLE])
def test_bad_input_is_one_line_exit_2_nothing_written_within_20_s(template, tmp_path, name, args, sweep_text,
                                                                  message):
    """Every command, each way of getting it wrong: one line naming the problem, exit 2, no file
    written (no store created, no run added to an existing one), in seconds."""
    from mlflow.tracking import MlflowClient

    got = _try((name, args, sweep_text, message), tmp_path, template)
    proc = got.proc
    assert got.seconds < 20
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lora-exp: error: "), proc.stderr
    assert message in lines[0], lines[0]
    assert "secret" not in proc.stderr
    assert got.after == got.before, "nothing written"
    store = MlflowClient(got.store)
    assert not store.search_runs([e.experiment_id for e in store.search_experiments()])


def test_a_missing_argument_names_what_is_required_and_not_the_optional_overrides(tmp_path):
    """argparse's own error for a command called without its arguments: exit 2, and the list of
    what is missing leaves out the Hydra overrides, which every command takes but none needs."""
    for args, missing in ((["export"], "run_id, --out"), (["generate"], "run_id, prompts"), (["rerun"], "run_id")):
        proc = _main(args, tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].endswith(f"the following arguments are required: {missing}"), \
            proc.stderr


def test_the_table_is_broad():
    commands = {args[0] for _, args, _, _ in TABLE}
    assert AS_A_PROCESS <= {case[0] for case in TABLE}
    assert {args[0] for name, args, _, _ in TABLE if name in AS_A_PROCESS} == commands, "each command as a process too"
    assert len(TABLE) >= 35 and commands >= {"train", "sweep", "rerun", "export", "generate", "best", "ui"}


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


#: bad input that the config alone shows: refused before torch, transformers or MLflow load
#: (a second, not the ~3 s of importing them)
LIGHT = [["train", "lora.r=0"], ["sweep", "sweep=tiny", "pack=banana"], ["sweep", "sweep=tiny", "lora.rr=4"],
         ["config", "model=nope"], ["prepare", "model=nope"], ["sweep", "sweep=tiny", "n_trials=0"]]


def test_bad_config_is_refused_before_the_heavy_libraries_load(tmp_path):
    import json
    import sys

    script = ("import contextlib, io, json, sys\nfrom lora_exp.cli import main\n"
              "with contextlib.redirect_stderr(io.StringIO()) as err:\n    code = main(json.loads(sys.argv[1]))\n"
              "print(json.dumps([code, err.getvalue().strip().splitlines()[-1:],"
              " sorted(m for m in ('torch', 'transformers', 'mlflow', 'peft') if m in sys.modules)]))")
    for args in LIGHT:
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(args)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, env={**os.environ, "LORA_EXP_SWEEPS_DIR": str(REPO / "sweeps")})
        code, line, loaded = json.loads(proc.stdout.strip().splitlines()[-1])
        assert code == 2 and line and line[0].startswith("lora-exp: error:"), (args, proc.stdout, proc.stderr[-2000:])
        assert loaded == [], (args, loaded)
