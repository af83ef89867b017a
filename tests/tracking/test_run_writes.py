"""What a run's tracker writes, read back through MLflow's own API, on a real sqlite store."""
from __future__ import annotations

import sqlite3

from lora_exp.config import TrackingConfig
from lora_exp.tracking.runs import close_run, open_run


def _tracker(tmp_path):
    return open_run(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "artifacts")),
                    "r", base_tags={})


def test_a_runs_table_is_mlflows_table_and_a_second_write_replaces_it(tmp_path, monkeypatch):
    tracker = _tracker(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")  # load_table searches through it
    client, run_id = tracker.client, tracker.run_id
    experiment = client.get_run(run_id).info.experiment_id
    tracker.log_table({"prompt": ["a", "b"], "adapter_output": ["x", None], "exact_match": [True, False]},
                      "generations.json")
    tracker.log_table({"prompt": ["c"], "adapter_output": ["y"], "exact_match": [True]}, "generations.json")
    tracker.log_table({"k": [1]}, "other.json")
    close_run(tracker, "FINISHED")
    table = client.load_table(experiment, "generations.json", run_ids=[run_id])  # MLflow's reader
    assert table.to_dict("list") == {"prompt": ["c"], "adapter_output": ["y"], "exact_match": [True]}
    import json

    # the tag MLflow's UI reads to offer the table view names every table of the run
    assert json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"]) == [
        {"path": "generations.json", "type": "table"}, {"path": "other.json", "type": "table"}]


def test_closing_a_run_sends_its_tags_and_every_buffered_metric_within_mlflows_limits(tmp_path):
    """One request per 1000 entries (MLflow refuses more than 1000 metrics or 100 tags a request)."""
    tracker = _tracker(tmp_path)
    tracker.flush_seconds = 1e9
    for step in range(1500):
        tracker.log_metrics({"train_loss": 1.0 / (step + 1)}, step)
    close_run(tracker, "KILLED", tags={f"t{i}": i for i in range(150)})
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert all(run.data.tags[f"t{i}"] == str(i) for i in range(150))
    history = tracker.client.get_metric_history(tracker.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1500))


def test_sqlite_stores_are_written_ahead(tmp_path):
    """MLflow's and Optuna's sqlite files in WAL mode: a packed sweep's processes write them at
    once, and a commit in the default journal mode syncs the disk several times."""
    from lora_exp.sweep.spec import load_sweep
    from lora_exp.sweep.storage import open_study

    tracker = _tracker(tmp_path)
    tracker.log_params({"a": 1})
    open_study(load_sweep("tiny"), f"sqlite:///{tmp_path}/optuna.db", "s", create=True)
    for name in ("mlflow.db", "optuna.db"):
        with sqlite3.connect(tmp_path / name) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal", name


def test_a_command_leaves_everything_it_recorded_in_the_database_file(tmp_path):
    """A command ends with os._exit (no connection closed): its write-ahead log is moved into the
    database file at exit, so the file alone, copied elsewhere, holds the finished run."""
    import shutil

    from helpers import run_cli

    proc = run_cli("train", "model=tiny_gpt2", "data=seed", "trainer.max_steps=2", "trainer.max_new_tokens=2",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wal = tmp_path / "mlruns" / "mlflow.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    shutil.copy(tmp_path / "mlruns" / "mlflow.db", tmp_path / "alone.db")
    with sqlite3.connect(tmp_path / "alone.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # as the command left it
        assert db.execute("SELECT status FROM runs").fetchall() == [("FINISHED",)]
        assert db.execute("SELECT count(*) FROM metrics WHERE key = 'train_loss'").fetchone()[0] == 2
