"""Which packed trials keep a checkpoint at an eval (`checkpoints.Saver`): those with enough
unsaved work, within the pack's share of time for checkpoints, the most unsaved first. The
saving itself (a real pack, MLflow run and resume) is tests/e2e/test_reliability.py's."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from lora_exp.pack import checkpoints


def _run(name: str, started: float, saved: float | None = None, run_id: str | None = "r"):
    return SimpleNamespace(name=name, started=started, checkpoint_at=saved,
                           tracker=SimpleNamespace(run_id=run_id))


@pytest.fixture
def saves(monkeypatch):
    """The trials `Saver` saves, in order; each save takes `cost` seconds of host time."""
    done: list[str] = []

    def fake_save(pm, run, step):
        time.sleep(saves_cost[0])
        done.append(run.name)
        run.checkpoint_at = time.perf_counter()

    saves_cost = [0.0]
    monkeypatch.setattr(checkpoints, "save", fake_save)
    return done, saves_cost


def test_a_trial_saves_once_it_has_enough_unsaved_work_the_most_unsaved_first(saves):
    done, _ = saves
    now = time.perf_counter()
    saver = checkpoints.Saver(every=60.0)
    saver.start = now - 1000.0                       # a pack running for a while: budget to spare
    runs = [_run("young", now - 10.0),               # 10 s of work: run again if killed, no checkpoint
            _run("old", now - 200.0),
            _run("older", now - 300.0),
            _run("saved", now - 500.0, saved=now - 30.0),   # 30 s since its last checkpoint
            _run("due", now - 500.0, saved=now - 90.0),
            _run("untracked", now - 400.0, run_id=None)]
    assert saver.save_due(None, [(r, 100) for r in runs]) == 3
    assert done == ["older", "old", "due"]
    assert saver.save_due(None, [(r, 200) for r in runs]) == 0   # just saved: nothing due again


def test_every_eval_with_zero_and_never_with_none(saves):
    done, _ = saves
    now = time.perf_counter()
    runs = [_run("a", now - 1.0), _run("b", now - 2.0)]
    assert checkpoints.Saver(every=None).save_due(None, [(r, 100) for r in runs]) == 0
    saver = checkpoints.Saver(every=0.0)
    saver.start = now - 1000.0
    assert saver.save_due(None, [(r, 100) for r in runs]) == 2 and done == ["b", "a"]
    assert saver.save_due(None, [(r, 200) for r in runs]) == 2


def test_checkpoints_take_at_most_their_share_of_the_pack_time(saves):
    """Saves stop once they have taken more than `share` of the pack's time; the trials left wait
    for a later eval, and go first then."""
    done, cost = saves
    cost[0] = 0.05
    now = time.perf_counter()
    saver = checkpoints.Saver(every=0.0, share=0.1)
    saver.start = now - 1.0                          # 1 s in: 0.1 s of saves, then no more
    runs = [_run(f"t{i}", now - 100.0 + i) for i in range(10)]
    n = saver.save_due(None, [(r, 100) for r in runs])
    assert 2 <= n <= 4 and done == [f"t{i}" for i in range(n)]
    assert saver.spent >= 0.1
    saver.start -= 100 * saver.spent                 # the pack runs on: the share is free again
    done.clear()
    saver.save_due(None, [(r, 200) for r in runs])
    assert done[:10 - n] == [f"t{i}" for i in range(n, 10)]   # those that waited first
