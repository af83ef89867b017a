"""How a sweep's worker processes start: a fresh interpreter each where CUDA is (each sets its GPU
before CUDA starts), forked from one preloaded server elsewhere."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest

from lora_exp.sweep.worker import WORKER_PRELOAD, worker_processes


def test_workers_on_gpus_start_as_fresh_interpreters():
    assert worker_processes(["0", "1"]).get_start_method() == "spawn"


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="no forkserver here")
def test_workers_without_cuda_fork_from_a_server_that_imported_what_a_trial_needs():
    ctx = worker_processes([])
    assert ctx.get_start_method() == "forkserver"
    assert {"torch", "transformers", "peft", "mlflow", "optuna", "lora_exp.core.training"} <= set(WORKER_PRELOAD)
    for name in WORKER_PRELOAD:  # each importable: forkserver skips a failing one silently
        __import__(name)
        assert name in sys.modules


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two cores to leave one")
def test_the_cores_workers_share_are_those_the_process_may_run_on():
    """Under taskset, a cpuset or a job scheduler (SLURM pins a job to its cores), the workers
    divide the cores the sweep was given, as torch's own default thread count does, not the
    machine's."""
    one = min(os.sched_getaffinity(0))
    script = ("import torch; from lora_exp.sweep.plan import usable_cores; "
              "print(usable_cores(), torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                         preexec_fn=lambda: os.sched_setaffinity(0, {one}))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "1"], (out.stdout, os.cpu_count())
