"""Processes that start together take turns where a store is created or topped up."""
from __future__ import annotations

import multiprocessing
import time

from lora_exp.config import TrackingConfig
from lora_exp.tracking.links import run_link, ui_base
from lora_exp.tracking.locks import store_lock


def _hold(url: str, log: str, name: str) -> None:
    with store_lock(url, "init"):
        with open(log, "a") as fh:
            fh.write(f"{name} in {time.monotonic()}\n")
        time.sleep(0.4)
        with open(log, "a") as fh:
            fh.write(f"{name} out {time.monotonic()}\n")


def test_a_sqlite_store_lock_lets_one_process_in_at_a_time(tmp_path):
    url, log = f"sqlite:///{tmp_path}/db/optuna.db", str(tmp_path / "log")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hold, args=(url, log, str(i))) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    events = [line.split() for line in open(log)]
    assert [e[1] for e in events] == ["in", "out"] * 3, events  # never two inside at once
    assert all(events[i][0] == events[i + 1][0] for i in range(0, 6, 2))


def test_the_ui_link_opens_the_model_training_view():
    local = TrackingConfig(uri="sqlite:///mlruns/mlflow.db")
    assert run_link(ui_base(local), "3", "abc") == \
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    server = TrackingConfig(uri="http://tracking.example:5000/")
    assert run_link(ui_base(server), "1", "r") == "http://tracking.example:5000/#/experiments/1/runs/r" \
        "?workflowType=machine_learning"
