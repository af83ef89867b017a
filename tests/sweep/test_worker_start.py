"""How a sweep's worker processes start: a fresh interpreter each where CUDA is (each sets its GPU
before CUDA starts), forked from one preloaded server elsewhere."""
from __future__ import annotations

import multiprocessing
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
