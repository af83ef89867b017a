"""The installed `lora-exp` entry point, as a user runs it (the bad-input table of every command is
tests/e2e/test_bad_input.py)."""
from __future__ import annotations

from helpers import TINY, run_cli


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
