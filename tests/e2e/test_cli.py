"""The installed `lora-exp` entry point, as a user runs it (the bad-input table of every command is
tests/e2e/test_bad_input.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_server import CliServer

from helpers import TINY, run_cli


def test_a_call_through_the_preloaded_server_is_the_call_in_a_fresh_process(workdir):
    """run_cli's fork of the preloaded server: the same exit code, stdout and stderr as the
    installed entry point started afresh, and a timeout that kills it as subprocess.run's does."""
    server = CliServer.get()
    if server is None:
        pytest.skip("the preloaded server is off here (LORA_EXP_TEST_PRELOAD=0, or no fork)")
    exe = str(Path(sys.executable).parent / "lora-exp")
    for args in (["config", "model=nope"], ["config", "model=tiny_gpt2", "trainer.max_steps=3"]):
        fresh = subprocess.run([exe, *args], cwd=workdir, capture_output=True, text=True, timeout=120)
        forked = server.run([exe, *args], workdir, dict(os.environ), 120)
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert fresh.returncode == 0 and "max_steps: 3" in fresh.stdout
    with pytest.raises(subprocess.TimeoutExpired):
        server.run([exe, "sweep", "sweep=tiny", "n_trials=50"], workdir, dict(os.environ), 1)


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
