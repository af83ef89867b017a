"""Ctrl-C and SIGTERM land where Python happens to be: a stop inside a store's read must not leave
the sqlite database locked for the writes that record the stop, a stop that lands in a `__del__`
must be raised after it (not printed and dropped), and one that a library swallows must still stop
the loop (`lora_exp.core.interrupts`)."""
from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
import traceback

import pytest

from lora_exp.config import TrackingConfig
from lora_exp.core import interrupts
from lora_exp.tracking.store import connect

#: where a stop is made to land: SQLAlchemy's code, and MLflow's store code around it
STORE_CODE = ("sqlalchemy", "mlflow.store")


def _free_for_writing(path) -> bool:
    """No connection holds a lock on the sqlite file: another one gets an exclusive lock at once."""
    db = sqlite3.connect(path, timeout=0.05)
    try:
        db.execute("BEGIN EXCLUSIVE")
        db.execute("COMMIT")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        db.close()


def test_wherever_a_stop_lands_inside_a_store_read_it_is_raised_after_it_and_leaves_the_store_unlocked(tmp_path):
    """The CI failure: SIGTERM landed while SQLAlchemy loaded an experiment row; the interrupted
    cursor lived on in the traceback with its sqlite lock, and the writes that close the runs
    (while that exception is handled) each failed with "database is locked" after 20 s. Here the
    signal lands at every 7th Python call of SQLAlchemy's and MLflow's store code in one read (a
    third of SQLAlchemy's left the lock before the fix); each time the stop must come out of the read, from outside
    SQLAlchemy, with the file free for the next writer. Then a run is closed with the last
    exception alive, as `start_run`'s handler and the sweep's `finally` close it."""
    path = tmp_path / "mlflow.db"
    client, experiment_id = connect(TrackingConfig(uri=f"sqlite:///{path}", experiment="e"))
    run_id = client.create_run(experiment_id).info.run_id
    client.get_experiment(experiment_id)  # the first read's one-off work is not what is measured
    landed, calls = 0, 0
    for n in range(1, 100_000, 7):
        calls = 0
        with interrupts.answering():  # each stop a command's first

            def land(frame, event, arg, n=n):
                nonlocal calls
                if event == "call" and frame.f_globals.get("__name__", "").startswith(STORE_CODE):
                    calls += 1
                    if calls == n:
                        sys.setprofile(None)
                        signal.raise_signal(signal.SIGTERM)

            try:
                sys.setprofile(land)
                client.get_experiment(experiment_id)
                sys.setprofile(None)
                if calls < n:  # the read made fewer calls: every point was tried
                    break
                for _ in range(200):  # the held stop is raised within a few ms of the read's end
                    time.sleep(0.01)
                pytest.fail(f"a stop that landed at SQLAlchemy's call {n} was lost")
            except KeyboardInterrupt as exc:
                sys.setprofile(None)
                landed += 1
                frames = [f.filename for f in traceback.extract_tb(exc.__traceback__)]
                assert not [f for f in frames if f"{os.sep}sqlalchemy{os.sep}" in f], (n, frames)
                assert _free_for_writing(path), f"a stop at SQLAlchemy's call {n} left the store locked"
                if landed == 1:
                    start = time.perf_counter()
                    client.set_tag(run_id, "error", "interrupted")
                    client.set_terminated(run_id, "KILLED")
                    assert time.perf_counter() - start < 5
    assert landed > 50, landed
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["error"] == "interrupted"


class _SignalsOnCollection:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)  # lands in the finalizer


def test_a_stop_that_lands_in_a_del_is_raised_just_after_it_not_printed_and_lost(monkeypatch):
    """Python prints an exception raised in a finalizer ("Exception ignored", a traceback) and
    drops it: a stop landing there is held and raised as soon as the finalizer returns."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with interrupts.answering():
        with pytest.raises(KeyboardInterrupt):
            obj = _SignalsOnCollection()
            del obj  # the stop lands in __del__
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # where the held stop is raised, within a few retries
                time.sleep(0.001)
        assert interrupts.stopping()
    assert unraisable == []


def test_a_stop_that_a_library_swallows_is_raised_again_at_the_next_step():
    with interrupts.answering():
        interrupts.check()  # nothing asked: goes on
        try:
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt:  # a library that catches it and goes on
            pass
        assert interrupts.stopping()
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    interrupts.check()  # the command is over: the next one in this process starts clean


def test_a_sweeps_first_ctrl_c_asks_to_finish_and_sigterm_stops_now():
    from lora_exp.sweep.worker import StopFlag

    stop = StopFlag()
    with interrupts.answering(stop):
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and not interrupts.stopping()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
            time.sleep(0.1)
        assert interrupts.stopping()


def test_once_stopping_a_second_sigterm_cuts_no_cleanup_short_but_ctrl_c_still_does():
    """A process group's SIGTERM and the one a sweep passes on to its workers both arrive: the
    second must not interrupt the recording of the first. A user's further Ctrl-C still does."""
    with interrupts.answering():
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        try:
            signal.raise_signal(signal.SIGTERM)  # ignored: the cleanup goes on
        except KeyboardInterrupt:
            pytest.fail("a second SIGTERM interrupted the cleanup of the first")
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_a_stop_that_lands_in_a_thread_pools_bookkeeping_leaves_every_thread_registered_for_pythons_exit():
    """The CI hang: SIGTERM landed in the first `submit` of MLflow's artifact thread pool, after
    it started a worker thread and before it registered that thread for Python's exit (which wakes
    the registered ones); the worker process then waited at exit for a thread nothing would wake,
    and the sweep for that worker. Here the stop lands at every Python call of the pool's and
    threading's code in a first `submit`; each time it must come out of it, with every thread the
    pool started registered (and no lock of threading's left broken)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import thread as pool_threads

    landed = 0
    for n in range(1, 10_000):
        calls = 0
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stop-test-{n}")
        with interrupts.answering():

            def land(frame, event, arg, n=n):
                nonlocal calls
                if event == "call" and frame.f_globals.get("__name__", "").startswith(("concurrent.futures",
                                                                                        "threading")):
                    calls += 1
                    if calls == n:
                        sys.setprofile(None)
                        signal.raise_signal(signal.SIGTERM)

            try:
                sys.setprofile(land)
                pool.submit(time.sleep, 0)
                sys.setprofile(None)
                for _ in range(200):  # a held stop is raised within a few ms of the call's end
                    time.sleep(0.01)
                if calls < n:  # the call made fewer calls: every point was tried
                    break
                pytest.fail(f"a stop that landed at call {n} was lost")
            except KeyboardInterrupt as exc:
                sys.setprofile(None)
                landed += 1
                frames = [f.filename for f in traceback.extract_tb(exc.__traceback__)]
                assert not [f for f in frames if f.endswith((f"{os.sep}threading.py", f"{os.sep}thread.py"))], frames
        started = [t for t in threading.enumerate() if t.name.startswith(f"stop-test-{n}_")]
        unregistered = [t.name for t in started if t not in pool_threads._threads_queues]
        pool.shutdown(wait=True)  # wakes its threads through its own queue, registered or not
        assert not unregistered, f"a stop at call {n} left {unregistered} for Python's exit to wait for, forever"
    assert landed > 5, landed
