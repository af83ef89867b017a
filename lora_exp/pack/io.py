"""The tracking side of a packed sweep, in processes of its own.

A packed worker launches thousands of small CUDA kernels a step from Python. A second Python
thread in that process doing MLflow and Optuna writes (SQLAlchemy: pure-Python work) takes the GIL
every time an operator releases it, and each hand-back waits up to the interpreter's switch
interval (bench/gil_contention.py: 3000 small torch ops, 0.006 s alone, 4.4 s with one busy thread
beside them). So every MLflow call, every Optuna write (user attributes, reports, tells) and
the trials' heartbeats run in separate processes; the training process only appends tasks to a
list and sends it once a step (one pickle, no thread). Tasks run in order, so a trial is told to
Optuna only after its MLflow run is closed, as in the unpacked worker.

Claiming trials and sampling their parameters run in a process of their own too (`sampler`).
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
import queue
import shutil
import threading
import time
from typing import Any

from lora_exp.core import logs
from lora_exp.core.recording import NullTracker
from lora_exp.core.status import TrialStatus
from lora_exp.errors import LoraExpError
from lora_exp.pack.sampler import name_process
from lora_exp.sweep.outcome import TrialOutcome, record_outcome
from lora_exp.sweep.plan import SweepPlan, usable_cores
from lora_exp.sweep.storage import open_study
from lora_exp.sweep.trial import print_trial_line
from lora_exp.sweep.worker import quiet_libraries
from lora_exp.tracking import parent
from lora_exp.tracking.provenance import provenance
from lora_exp.tracking.runs import open_run

log = logging.getLogger("lora_exp")

#: seconds between refreshes of the sweep's parent run (tables, best adapter) while packing
REFRESH_S = 30.0


def tracking_processes(setting: int | None) -> int:
    """How many tracking processes a pack uses: closing a trial is ~0.1 s of Python (MLflow and
    Optuna writes), and a wave of a thousand trials ends at once; `pack.trackers`, else one
    process per four cores, up to four (one on a small machine)."""
    if setting:
        return setting
    return min(4, max(1, usable_cores() // 4))


class IOClient:
    """The training process's end: `submit` queues a task, `send` ships the queues (once a step).

    Every task names its trial; a trial's tasks all go to one tracking process (trial number
    modulo their count), so they run in order. Process 0 also refreshes the sweep's parent run,
    and closes last, so its final refresh sees every trial told."""

    def __init__(self, plan: SweepPlan, worker_index: int = 0):
        ctx = multiprocessing.get_context("spawn")
        n = tracking_processes(plan.base.pack.trackers)
        self.results = ctx.SimpleQueue()
        # kept here: a child unpickles it after `start` returns, and it must still exist then
        self.done = ctx.Array("i", 2)  # trials this pack closed: [completed or pruned, failed]
        #: when (Unix time) the packed worker expects its trials done, NaN while it cannot say; the
        #: trial lines' ETA. One float, written by the worker only: no lock
        self.eta = ctx.Value("d", math.nan, lock=False)
        self.tasks = [ctx.SimpleQueue() for _ in range(n)]
        self.pending: list[list[tuple[Any, ...]]] = [[] for _ in range(n)]
        self.processes = [ctx.Process(target=tracking_main, args=(plan, self.tasks[i], self.results, worker_index, i,
                                                          self.done, self.eta),
                                      name=f"lora-exp-tracking-{i}", daemon=True)
                          for i in range(n)]
        for process in self.processes:
            process.start()
        self.failed: list[int] = []

    def submit(self, kind: str, number: int, *args: Any) -> None:
        self.pending[number % len(self.pending)].append((kind, number, *args))

    def send(self) -> None:
        for i, batch in enumerate(self.pending):
            if batch:
                self._alive(i)
                self.tasks[i].put(batch)
                self.pending[i] = []

    def _alive(self, i: int) -> None:
        """A dead tracking process reads nothing more: writing on would block once its pipe is
        full. The pack stops instead (its trials' heartbeats stopped with it: they are retried)."""
        process = self.processes[i]
        if not process.is_alive():
            raise LoraExpError(f"the tracking process {process.name} stopped (exit code {process.exitcode}); "
                               f"its trials are retried when the sweep runs again")

    def poll(self) -> list[int]:
        """Trial numbers the tracking processes failed (e.g. the store went away) since last asked."""
        while not self.results.empty():
            self.failed.append(self.results.get())
        out, self.failed = self.failed, []
        return out

    def close(self) -> list[int]:
        """Run every queued task, stop the processes (process 0 last); returns the trials they failed."""
        for i in [*range(1, len(self.tasks)), 0]:
            if self.processes[i].is_alive():
                if self.pending[i]:
                    self.tasks[i].put(self.pending[i])
                    self.pending[i] = []
                self.tasks[i].put(None)
            self.processes[i].join()
        return self.poll()


class QueuedTracker:
    """A trial's MLflow run as seen by the training process: every call becomes a task (the run
    id exists only in the tracking process)."""

    records_artifacts = True

    def __init__(self, io: IOClient, number: int, run_name: str, tags: dict[str, Any], trial_id: int | None = None):
        self.io, self.number = io, number
        self.run_id: str | None = None
        self.status = "FINISHED"
        io.submit("open", number, run_name, tags, trial_id)

    def _call(self, name: str, *args: Any) -> None:
        self.io.submit("call", self.number, name, args)

    def log_params(self, params: dict[str, Any]) -> None: self._call("log_params", params)
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: self._call("log_metrics", dict(metrics), step)
    def set_tags(self, tags: dict[str, Any]) -> None: self._call("set_tags", tags)
    def log_text(self, text: str, artifact_file: str) -> None: self._call("log_text", text, artifact_file)
    def log_dir(self, local_dir: Any, artifact_path: str) -> None: self._call("log_dir", str(local_dir), artifact_path)
    def log_table(self, table: dict[str, list[Any]], artifact_file: str) -> None:
        self._call("log_table", table, artifact_file)
    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None:
        self._call("log_dataset", name, digest, source, context)

    def flush(self) -> None: self._call("flush")
    def delete_artifacts(self, path: str) -> None: self._call("delete_artifacts", path)

    def remove_after(self, path: str) -> None:
        """Delete a temporary folder once the tasks before this one (its upload) ran."""
        self.io.submit("rmtree", self.number, path)


# --- the tracking process -------------------------------------------------------------------------


def tracking_main(plan: SweepPlan, tasks: Any, results: Any, worker_index: int, index: int, done: Any,
                  eta: Any = None) -> None:
    name_process(f"lora-exp-track{index}")
    logs.configure()
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer, which closes us in order
    quiet_libraries()
    study = open_study(plan.spec, plan.options.storage, plan.study_name, create=False)
    beats = Heartbeats(study, plan.spec.heartbeat)
    worker = TrackingTasks(plan, study, results, done, beats, refreshes=index == 0, eta=eta)
    worker.label = f"w{worker_index} " if plan.workers > 1 else ""
    # the pipe is drained as soon as a batch arrives, so the trainer's `send` never blocks while
    # this process is busy writing (a round of 1024 Optuna reports takes seconds on sqlite)
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def pump() -> None:
        while True:
            batch = tasks.get()
            for task in batch or ():
                if task[0] == "beat_add":  # at once, not behind a wave of closings (a stale trial is retried)
                    beats.add(task[2])
            inbox.put(batch)
            if batch is None:
                return

    threading.Thread(target=pump, daemon=True, name="lora-exp-inbox").start()
    if worker.refreshes and plan.base.tracking.enabled:
        from lora_exp.tracking.sweep_plots import preload

        threading.Thread(target=preload, daemon=True, name="lora-exp-preload").start()
    try:
        while True:
            batch = inbox.get()
            if batch is None:
                break
            for task in batch:
                worker.run(task)
            if inbox.empty():  # not while trials wait to be closed (a wave ends at once): ~10 s a refresh
                worker.refresh()
    finally:
        beats.close()
        worker.refresh(final=True)


class Heartbeats:
    """One thread recording the heartbeat of every trial the packed worker holds."""

    def __init__(self, study: Any, interval: float):
        self.storage, self.interval = study._storage, interval
        self.trial_ids: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="lora-exp-heartbeats")
        self.thread.start()

    def _beat(self) -> None:
        parent = multiprocessing.parent_process()
        while not self.stop.wait(self.interval):
            if parent is not None and not parent.is_alive():
                # the trainer died without closing us (SIGKILL, power loss): stop beating at once,
                # so its trials go stale and are retried, as an unpacked worker's would
                os._exit(1)
            with self.lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as exc:  # noqa: BLE001 - a missed beat is retried
                    log.debug("heartbeat failed: %s", exc)

    def add(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.add(trial_id)

    def remove(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.discard(trial_id)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


class TrackingTasks:
    """The tasks a tracking process runs, in the order the training process queued them."""

    def __init__(self, plan: SweepPlan, study: Any, results: Any, done: Any, beats: Heartbeats,
                 refreshes: bool = True, eta: Any = None):
        self.plan, self.study, self.results, self.beats = plan, study, results, beats
        self.trackers: dict[int, Any] = {}
        self.errors: dict[int, str] = {}
        self.done = done  # trials closed by all of this pack's tracking processes: [done, failed]
        self.eta = eta  # `IOClient.eta`
        self.refreshes = refreshes  # the one process that refreshes the parent run
        self.last_refresh = time.monotonic()
        self.label = ""  # which worker's count, when several run
        self.base_tags: dict[str, str] | None = None  # git, packages: the same for every trial, read once
        self.handlers = {"open": self.open, "call": self.call, "rmtree": self.rmtree, "user_attr": self.user_attr,
                         "report": self.report, "beat_add": self.beat_add, "fail": self.fail, "finish": self.finish}

    def run(self, task: tuple[Any, ...]) -> None:
        kind = task[0]
        try:
            self.handlers[kind](*task[1:])
        except Exception as exc:  # noqa: BLE001 - one trial's tracking failure must not stop the others
            number = task[1] if kind in ("open", "call", "finish") else None
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            if number is not None and number not in self.errors:
                self.errors[number] = reason
            log.warning("tracking task %s failed: %s", kind, reason)

    def open(self, number: int, run_name: str, tags: dict[str, Any], trial_id: int | None = None) -> None:
        cfg = self.plan.base.tracking
        if not cfg.enabled:
            self.trackers[number] = NullTracker()
            return
        if self.base_tags is None:
            self.base_tags = provenance()
        # metrics go out in batches (1000 points a call) and at the end, not every few seconds
        tracker = open_run(cfg, run_name, tags, self.plan.parent_run_id, base_tags=self.base_tags,
                           flush_seconds=max(60.0, cfg.flush_seconds))
        self.trackers[number] = tracker
        if trial_id is not None and tracker.run_id:  # as unpacked: a trial in flight names its run
            self.study._storage.set_trial_user_attr(trial_id, "mlflow_run_id", tracker.run_id)

    def call(self, number: int, method: str, args: tuple[Any, ...]) -> None:
        if number in self.errors:
            return
        getattr(self.trackers[number], method)(*args)

    def rmtree(self, number: int, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def user_attr(self, number: int, trial_id: int, key: str, value: Any) -> None:
        self.study._storage.set_trial_user_attr(trial_id, key, value)

    def report(self, number: int, trial_id: int, step: int, value: float) -> None:
        self.study._storage.set_trial_intermediate_value(trial_id, step, value)

    def beat_add(self, number: int, trial_id: int) -> None:
        self.beats.add(trial_id)

    def fail(self, number: int, trial_id: int, reason: str) -> None:
        """A trial that never trained (a sampled value the config rejects, or never started)."""
        record_outcome(self.study, TrialOutcome(number, trial_id, TrialStatus.FAIL, error=reason))
        self.beats.remove(trial_id)

    def finish(self, number: int, outcome: TrialOutcome) -> None:
        """Close the trial's run, then tell Optuna (in that order: `record_outcome`)."""
        tracker = self.trackers.pop(number, None)
        error = self.errors.pop(number, None)
        if error is not None:
            outcome.status, outcome.error = TrialStatus.FAIL, error
        elif tracker is None and outcome.status is not TrialStatus.FAIL:
            outcome.status, outcome.error = TrialStatus.FAIL, "the trial's MLflow run was never opened"
        outcome = record_outcome(self.study, outcome, tracker)
        if outcome.status is TrialStatus.FAIL:
            self.results.put(number)
        self.beats.remove(outcome.trial_id)
        with self.done.get_lock():
            self.done[int(outcome.status is TrialStatus.FAIL)] += 1
            counts = (self.plan.done_at_start + self.done[0], self.done[1])
        # counted here, not read from the study: a wave of a thousand trials closes at once
        eta_at = self.eta.value if self.eta is not None else math.nan
        print_trial_line(self.plan, self.study, outcome, f"{outcome.wall_s:.1f}s, packed", self.label, counts,
                         max(0.0, eta_at - time.time()) if math.isfinite(eta_at) else None)

    def refresh(self, final: bool = False) -> None:
        if not self.refreshes:
            return
        if final or time.monotonic() - self.last_refresh >= REFRESH_S:
            self.last_refresh = time.monotonic()
            best = parent.best_trial(self.study)
            parent.refresh(self.plan.record, self.study, best.number if best else -1, final=True)
