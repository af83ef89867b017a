"""The installed `lora-exp` entry point, as a user runs it: exit codes, one-line errors."""
from __future__ import annotations

import pytest
from helpers import TINY, run_cli

BAD_INPUT = [
    (["lora.r=0"], "lora.r: must be >= 1, got 0"),
    (["model=nope"], "unknown model option 'nope'"),
    (["lora.lora_dropout=1.0"], "lora.lora_dropout"),
    (["lora.target_modules=[c_attn]"], "has no module c_attn"),
    (["data.train_files=[nope.jsonl]"], "file not found: nope.jsonl"),
    (["lora.rr=3"], "lora.rr"),
    (["tracking.uri=mlruns"], "tracking.uri: 'mlruns' is not a URI"),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUT, ids=[o[0] for o, _ in BAD_INPUT])
def test_bad_input_one_line_exit_2_nothing_written(workdir, overrides, message):
    proc = run_cli("train", *overrides, cwd=workdir)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert message in lines[0] and lines[0].startswith("lora-exp: error: ")
    assert not (workdir / "mlruns").exists(), "bad input writes nothing"


def test_empty_dataset_fails_before_the_model_loads(workdir):
    (workdir / "empty.jsonl").write_text("\n")
    proc = run_cli("train", "data=custom", f"data.train_files=[{workdir}/empty.jsonl]", cwd=workdir)
    assert proc.returncode == 2
    assert "empty" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_hub_model_offline_fails_with_one_clear_line(workdir):
    proc = run_cli("train", "model=gpt2", "lora=seed", "trainer=seed", "data=seed", "tracking=none", cwd=workdir,
                   env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lora-exp: error: cannot load") and "gpt2" in last


def test_train_command_runs_and_reports(workdir):
    proc = run_cli("train", *TINY, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: 30 steps" in proc.stdout and "run " in proc.stdout
    assert (workdir / "mlruns" / "mlflow.db").is_file()
    assert "step 30/30" in proc.stderr, "plain progress lines when not on a terminal"
