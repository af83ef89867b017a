"""Trials that start together in one experiment each record the same dataset as an MLflow input.

MLflow looks the dataset up and inserts it if missing in one transaction, so two processes can both
miss it and the second insert breaks the table's key (`sqlite3.IntegrityError`); a trial must not
fail for that."""
from __future__ import annotations

import multiprocessing

import pytest

from lora_exp.config import TrackingConfig

ROUNDS = 12


def _log_rounds(url: str, barrier, errors) -> None:
    from lora_exp.tracking.runs import MlflowTracker
    from lora_exp.tracking.store import connect

    client, experiment_id = connect(TrackingConfig(uri=url, experiment="race"))
    run_id = client.create_run(experiment_id).info.run_id
    tracker = MlflowTracker(client, run_id)
    for i in range(ROUNDS):
        barrier.wait(timeout=60)
        try:
            tracker.log_dataset("qa_demo/train", f"digest-{i}", "pkg:lora_exp/assets/qa_demo", "training")
        except Exception as exc:  # noqa: BLE001 - the test reports what a trial would have died of
            errors.put(f"round {i}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_processes_recording_the_same_dataset_at_once_all_succeed(tmp_path, store, request):
    url = f"sqlite:///{tmp_path}/mlflow.db" if store == "sqlite" else request.getfixturevalue("postgres_db")()
    ctx = multiprocessing.get_context("spawn")
    barrier, errors = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_log_rounds, args=(url, barrier, errors)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == [] and [p.exitcode for p in procs] == [0] * 4, failures

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("race")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4
    for run in runs:  # every run lists each round's dataset once
        digests = sorted(d.dataset.digest for d in run.inputs.dataset_inputs)
        assert digests == sorted(f"digest-{i}" for i in range(ROUNDS)), digests
