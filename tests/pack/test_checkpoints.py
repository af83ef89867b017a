"""Which packed trials keep a checkpoint at an eval (`checkpoints.Saver`): those with enough
unsaved work, within the pack's share of time for checkpoints and its bytes of states waiting
for their files, the most unsaved first; captured states written oldest first, a few a step, and
forgotten when their trial ends. The saving itself (a real pack, MLflow run and resume) is
tests/e2e/test_reliability.py's; the capture behind a step in flight, tests/gpu's."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from lora_exp.pack import checkpoints


def _run(name: str, started: float, saved: float | None = None, run_id: str | None = "r"):
    return SimpleNamespace(name=name, started=started, checkpoint_at=saved,
                           tracker=SimpleNamespace(run_id=run_id))


@pytest.fixture
def saves(monkeypatch):
    """The trials `Saver` captures, in order; each capture takes `cost` seconds of host time and
    holds 1 KB; `written` lists the states written, as (trial, step)."""
    done: list[str] = []
    written: list[tuple[str, int]] = []

    def fake_capture(pm, run, step):
        time.sleep(saves_cost[0])
        done.append(run.name)
        return checkpoints.Capture(run, step, {}, torch.zeros(2, 128))

    saves_cost = [0.0]
    monkeypatch.setattr(checkpoints, "capture", fake_capture)
    monkeypatch.setattr(checkpoints, "write_state", lambda c: written.append((c.run.name, c.step)))
    return done, saves_cost, written


def test_a_trial_saves_once_it_has_enough_unsaved_work_the_most_unsaved_first(saves):
    done, _, _ = saves
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
    done, _, _ = saves
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
    done, cost, _ = saves
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


def test_captured_states_are_written_oldest_first_and_forgotten_when_their_trial_ends(saves, monkeypatch):
    """A capture waits for its file (`write`, a few a step); a newer capture of the same trial
    replaces the one not yet written; a trial that ends leaves nothing to write; the bytes
    waiting are bounded (the others wait for a later eval)."""
    done, _, written = saves
    now = time.perf_counter()
    saver = checkpoints.Saver(every=0.0)
    saver.start = now - 1000.0
    a, b, c = (_run(n, now - 100.0 + i) for i, n in enumerate("abc"))
    assert saver.save_due(None, [(a, 100), (b, 100), (c, 100)]) == 3
    assert written == [] and saver.pending_bytes == 3 * 1024
    saver.discard(b)                                 # b ended before its file was written
    assert saver.write(0.0) == 1 and written == [("a", 100)]   # a budget of 0: one a step
    assert saver.save_due(None, [(c, 200)]) == 1     # c's newer state replaces its older one
    assert saver.write(None) == 1 and written == [("a", 100), ("c", 200)]
    assert not saver.pending and saver.pending_bytes == 0
    monkeypatch.setattr(checkpoints, "PENDING_BYTES", 2 * 1024)
    done.clear()
    assert saver.save_due(None, [(r, 300) for r in (a, b, c)]) == 2   # the third waits for a later eval
    assert saver.pending_bytes == 2 * 1024
