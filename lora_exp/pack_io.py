"""The tracking side of a packed sweep, in processes of its own.

A packed worker launches thousands of small CUDA kernels a step from Python. A second Python
thread in that process doing MLflow and Optuna writes (SQLAlchemy: pure-Python work) takes the GIL
every time an operator releases it, and each hand-back waits up to the interpreter's switch
interval (bench/gil_contention.py: 3000 small torch ops, 0.006 s alone, 4.4 s with one busy thread
beside them). So every MLflow call, every Optuna write (user attributes, reports, tells) and
the trials' heartbeats run in separate processes; the training process only appends tasks to a
list and sends it once a step (one pickle, no thread). Tasks run in order, so a trial is told to
Optuna only after its MLflow run is closed, as in the unpacked worker.

Claiming trials and sampling their parameters run in a process of their own too (`Sampler`):
TPE with a thousand trials in the study takes ~25 ms a trial, plus a commit per parameter; a
pack that refills a thousand slots would otherwise stop the GPU for tens of seconds.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import shutil
import threading
import time
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_exp.search import SweepPlan

log = logging.getLogger("lora_exp")

#: seconds between refreshes of the sweep's parent run (tables, best adapter) while packing
REFRESH_S = 30.0


def tracking_processes() -> int:
    """How many tracking processes a pack uses: closing a trial is ~0.1 s of Python (MLflow and
    Optuna writes), and a wave of a thousand trials ends at once; one process per four cores, up
    to four (one on a small machine). `LORA_EXP_PACK_TRACKERS` sets it."""
    raw = os.environ.get("LORA_EXP_PACK_TRACKERS", "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            from lora_exp.errors import ConfigError

            raise ConfigError(f"LORA_EXP_PACK_TRACKERS={raw}: expected a whole number >= 1")
        return value
    return min(4, max(1, (os.cpu_count() or 1) // 4))


class IOClient:
    """The training process's end: `submit` queues a task, `send` ships the queues (once a step).

    Every task names its trial; a trial's tasks all go to one tracking process (trial number
    modulo their count), so they run in order. Process 0 also refreshes the sweep's parent run,
    and closes last, so its final refresh sees every trial told."""

    def __init__(self, plan: SweepPlan, worker_index: int = 0):
        ctx = multiprocessing.get_context("spawn")
        n = tracking_processes()
        self.results = ctx.SimpleQueue()
        # kept here: a child unpickles it after `start` returns, and it must still exist then
        self.done = ctx.Value("i", 0)
        self.tasks = [ctx.SimpleQueue() for _ in range(n)]
        self.pending: list[list[tuple[Any, ...]]] = [[] for _ in range(n)]
        self.processes = [ctx.Process(target=_main, args=(plan, self.tasks[i], self.results, worker_index, i,
                                                          self.done),
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
            from lora_exp.errors import LoraExpError

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


@dataclass
class ClaimedTrial:
    """A trial the sampler process claimed and sampled: what the training process needs of it
    (its number and id for the stores, its params and distributions for the pruner)."""

    number: int
    _trial_id: int
    params: dict[str, Any]
    distributions: dict[str, Any]
    overrides: list[str] | None
    error: str | None = None


class Sampler:
    """The training process's end of the sampling process: `ask(n)` asks for n more trials,
    `poll()` returns those sampled since (never blocks).

    The process claims WAITING trials (RUNNING from then on, with a first heartbeat) a chunk at a
    time and samples each with the study's sampler (one read of the study per chunk: TPE's constant
    liar sees the chunk's own trials as they are sampled). Its answers queue up on its side, so it
    samples on while the training process is busy (compiling its first step, say). A claim that
    finds no WAITING trial answers `[]` and is retried every `retry_s` while trials are wanted."""

    def __init__(self, plan: SweepPlan, worker_index: int = 0, chunk: int = 64, retry_s: float = 2.0):
        ctx = multiprocessing.get_context("spawn")
        self.requests, self.answers = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=_sampler_main,
                                   args=(plan, worker_index, self.requests, self.answers, chunk, retry_s),
                                   name="lora-exp-sampler", daemon=True)
        self.process.start()
        self.asked = 0  # asked for and not delivered yet
        self.seconds_per_trial = 0.0  # the last chunk's claim and sampling time, a trial
        self.closed = False

    def ask(self, n: int) -> None:
        if n > 0:
            self._alive()
            self.requests.put(n)
            self.asked += n

    def poll(self, timeout: float = 0.0) -> tuple[list[ClaimedTrial], bool]:
        """The trials sampled since the last call, and whether a claim found no WAITING trial.
        With a timeout, waits that long for the first answer."""
        out: list[ClaimedTrial] = []
        empty = False
        while True:
            try:
                trials, seconds = self.answers.get(timeout=timeout) if timeout else self.answers.get_nowait()
            except queue.Empty:
                break
            timeout = 0.0
            if trials:
                self.seconds_per_trial = seconds / len(trials)
            out += [ClaimedTrial(*t) for t in trials]
            empty = empty or not trials
            self.asked -= len(trials)
        if not out and not empty:
            self._alive()
        return out, empty

    def _alive(self) -> None:
        if not self.process.is_alive():
            from lora_exp.errors import LoraExpError

            raise LoraExpError(f"the sampling process {self.process.name} stopped (exit code "
                               f"{self.process.exitcode}); its trials are retried when the sweep runs again")

    def close(self) -> list[ClaimedTrial]:
        """Stop the process; returns the trials it claimed that no one took yet (none once closed)."""
        out: list[ClaimedTrial] = []
        if self.closed:
            return out
        self.closed = True
        if self.process.is_alive():
            self.requests.put(None)
        while True:  # read on until it is gone: it cannot exit while its answers fill the pipe
            try:
                out += [ClaimedTrial(*t) for t in self.answers.get(timeout=0.1)[0]]
                continue
            except queue.Empty:
                pass
            if not self.process.is_alive():
                break
        self.process.join()
        try:  # what it flushed on its way out
            while True:
                out += [ClaimedTrial(*t) for t in self.answers.get_nowait()[0]]
        except queue.Empty:
            pass
        self.requests.close()
        self.answers.close()
        return out


def _sampler_main(plan: SweepPlan, worker_index: int, requests: Any, answers: Any, chunk: int,
                  retry_s: float) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer, which stops us
    _name_process("lora-exp-sample")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from lora_exp.search import TrialReader, _base_values, claim_waiting_trials, open_study, quiet_libraries
    from lora_exp.sweeps import suggest

    quiet_libraries()
    study = open_study(plan.spec, plan.options.storage, plan.study_name, create=False, worker_index=worker_index)
    base_values = _base_values(plan)
    reader = TrialReader(study)  # each batch reads only the trials finished since and those live
    parent = multiprocessing.parent_process()
    wanted, retry_at = 0, 0.0
    count, busy = 0, 0.0  # trials sampled, and the seconds spent on them (for a line per 512)
    while True:
        wait = 1.0 if not wanted else max(0.0, retry_at - time.monotonic())
        try:
            while True:
                message = requests.get(timeout=wait) if wait else requests.get_nowait()
                if message is None:
                    return
                wanted += message
                wait = 0.0
        except queue.Empty:
            pass
        if parent is not None and not parent.is_alive():
            os._exit(1)  # the trials it claimed get no more beats: they go stale and are retried
        if not wanted or time.monotonic() < retry_at:
            continue
        began = time.perf_counter()
        claimed = claim_waiting_trials(study, plan.options.storage, min(wanted, chunk), batch_view=True,
                                       reader=reader)
        sampled = []
        for trial in claimed:
            try:
                overrides, error = suggest(trial, plan.spec.space, base_values), None
            except Exception as exc:  # a bad sampled value: this trial fails, the sweep goes on
                overrides, error = None, f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            sampled.append((trial.number, trial._trial_id, dict(trial.params), dict(trial.distributions),
                            overrides, error))
        wanted -= len(claimed)
        retry_at = 0.0 if claimed else time.monotonic() + retry_s
        answers.put((sampled, time.perf_counter() - began))
        if claimed:
            busy += time.perf_counter() - began
            if (count + len(claimed)) // 512 > count // 512:
                log.info("sampler: %d trials claimed and sampled, %.1f ms a trial", count + len(claimed),
                         1e3 * busy / (count + len(claimed)))
            count += len(claimed)


class QueuedTracker:
    """A trial's MLflow run as seen by the training process: every call becomes a task (the run
    id exists only in the tracking process)."""

    records_artifacts = True

    def __init__(self, io: IOClient, number: int, run_name: str, tags: dict[str, Any]):
        self.io, self.number = io, number
        self.run_id: str | None = None
        self.status = "FINISHED"
        io.submit("open", number, run_name, tags)

    def _call(self, name: str, *args: Any) -> None:
        self.io.submit("call", self.number, name, args)

    def log_params(self, params: dict[str, Any]) -> None: self._call("log_params", params)
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: self._call("log_metrics", dict(metrics), step)
    def set_tags(self, tags: dict[str, Any]) -> None: self._call("set_tags", tags)
    def log_text(self, text: str, artifact_file: str) -> None: self._call("log_text", text, artifact_file)
    def log_dir(self, local_dir: Any, artifact_path: str) -> None: self._call("log_dir", str(local_dir), artifact_path)
    def log_table(self, table: dict[str, list[Any]], artifact_file: str) -> None: self._call("log_table", table, artifact_file)
    def flush(self) -> None: self._call("flush")

    def remove_after(self, path: str) -> None:
        """Delete a temporary folder once the tasks before this one (its upload) ran."""
        self.io.submit("rmtree", self.number, path)


# --- the tracking process -------------------------------------------------------------------------


def _name_process(name: str) -> None:
    """The process's name as `ps`, `top` and psutil show it (Linux; 15 characters)."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def _main(plan: SweepPlan, tasks: Any, results: Any, worker_index: int, index: int, done: Any) -> None:
    _name_process(f"lora-exp-track{index}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer, which closes us in order
    from lora_exp.search import HEARTBEAT_S, open_study, quiet_libraries

    quiet_libraries()
    study = open_study(plan.spec, plan.options.storage, plan.study_name, create=False)
    worker = _Worker(plan, study, results, done, refreshes=index == 0)
    worker.label = f"w{worker_index} " if plan.workers > 1 else ""
    beats = _Heartbeats(study, HEARTBEAT_S)
    worker.beats = beats
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


class _Heartbeats:
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


class _Worker:
    def __init__(self, plan: SweepPlan, study: Any, results: Any, done: Any, refreshes: bool = True):
        self.plan, self.study, self.results = plan, study, results
        self.trackers: dict[int, Any] = {}
        self.errors: dict[int, str] = {}
        self.done = done  # trials closed by all of this pack's tracking processes (the [n] count)
        self.refreshes = refreshes  # the one process that refreshes the parent run
        self.last_refresh = time.monotonic()
        self.beats: _Heartbeats | None = None
        self.label = ""  # which worker's count, when several run

    def run(self, task: tuple[Any, ...]) -> None:
        kind = task[0]
        try:
            getattr(self, f"_{kind}")(*task[1:])
        except Exception as exc:  # noqa: BLE001 - one trial's tracking failure must not stop the others
            number = task[1] if kind in ("open", "call", "finish") else None
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            if number is not None and number not in self.errors:
                self.errors[number] = reason
            log.warning("tracking task %s failed: %s", kind, reason)

    # tasks

    def _open(self, number: int, run_name: str, tags: dict[str, Any]) -> None:
        from lora_exp.tracking import PARENT_TAG, MlflowTracker, connect, provenance, redact_text

        cfg = self.plan.base.tracking
        client, experiment_id = connect(cfg)
        all_tags = {**_provenance(provenance), **tags}
        if self.plan.parent_run_id:
            all_tags[PARENT_TAG] = self.plan.parent_run_id
        run = client.create_run(experiment_id, run_name=run_name,
                                tags={k: redact_text(str(v)) for k, v in all_tags.items()})
        # metrics go out in batches (1000 points a call) and at the end, not every few seconds
        self.trackers[number] = MlflowTracker(client, run.info.run_id, flush_seconds=max(60.0, cfg.flush_seconds))

    def _call(self, number: int, method: str, args: tuple[Any, ...]) -> None:
        if number in self.errors:
            return
        getattr(self.trackers[number], method)(*args)

    def _rmtree(self, number: int, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def _user_attr(self, number: int, trial_id: int, key: str, value: Any) -> None:
        self.study._storage.set_trial_user_attr(trial_id, key, value)

    def _report(self, number: int, trial_id: int, step: int, value: float) -> None:
        self.study._storage.set_trial_intermediate_value(trial_id, step, value)

    def _beat_add(self, number: int, trial_id: int) -> None:
        assert self.beats is not None
        self.beats.add(trial_id)

    def _fail(self, number: int, trial_id: int, reason: str) -> None:
        """A trial that never trained (a sampled value the config rejects)."""
        from optuna.trial import TrialState

        self.study._storage.set_trial_user_attr(trial_id, "failure", reason)
        self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        if self.beats is not None:
            self.beats.remove(trial_id)

    def _finish(self, number: int, trial_id: int, status: str, value: Any, error: str | None,
                overrides: list[str], loss_curve: list[Any], compute_s: float, wall: float,
                generations: dict[str, list[Any]], eval_curve: list[Any], steps: int) -> None:
        """Close the trial's run, then tell Optuna (in that order)."""
        from optuna.trial import TrialState

        from lora_exp.search import _dashboard_note

        storage = self.study._storage
        tracker = self.trackers.pop(number, None)
        error = self.errors.pop(number, None) or error
        if error is not None:
            status = "failed"
        try:
            if tracker is None:
                raise RuntimeError("the trial's MLflow run was never opened")
            if status == "failed":
                tracker.set_tags({"error": error or "failed", "trial_state": "FAIL"})
            else:
                tracker.set_tags({"trial_state": "COMPLETE" if status == "completed" else "PRUNED",
                                  **({"pruned": "true"} if status == "stopped" else {})})
            tracker.flush()
            tracker.client.set_terminated(tracker.run_id,
                                          {"completed": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED"))
            storage.set_trial_user_attr(trial_id, "mlflow_run_id", tracker.run_id)
            storage.set_trial_user_attr(trial_id, "loss_curve", loss_curve)
            storage.set_trial_user_attr(trial_id, "compute_s", round(compute_s, 3))
        except Exception as exc:  # noqa: BLE001 - the store failed: the trial cannot count as done
            status, error = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        storage.set_trial_user_attr(trial_id, "wall_s", round(wall, 3))
        if status == "failed":
            storage.set_trial_user_attr(trial_id, "failure", error or "failed")
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            self.results.put(number)
        elif status == "stopped":
            self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            note = types.SimpleNamespace(storage=storage, study=self.study, _trial_id=trial_id)
            _dashboard_note(note, tracker.run_id if tracker else None, overrides,
                            types.SimpleNamespace(generations=generations))
            self.study.tell(number, value, skip_if_finished=True)
        if self.beats is not None:
            self.beats.remove(trial_id)
        with self.done.get_lock():
            self.done.value += 1
            count = self.done.value
        _print_line(self.plan, f"{self.label}{count}", number, status, value, eval_curve, steps, overrides, wall)

    def refresh(self, final: bool = False) -> None:
        from lora_exp import sweep_tracking

        if not self.refreshes:
            return
        if final or time.monotonic() - self.last_refresh >= REFRESH_S:
            self.last_refresh = time.monotonic()
            best = sweep_tracking._best(self.study)
            sweep_tracking.after_trial(self.plan, self.study, best.number if best else -1, None, final=True)


_PROVENANCE: dict[str, str] = {}


def _provenance(provenance: Any) -> dict[str, str]:
    if not _PROVENANCE:  # the same for every trial of this process (git, packages): read once
        _PROVENANCE.update(provenance())
    return _PROVENANCE


def _print_line(plan: SweepPlan, done: str, number: int, status: str, value: Any, eval_curve: list[Any],
                steps: int, overrides: list[str], wall: float) -> None:
    from lora_exp.search import trial_line, write_line

    state = {"completed": "COMPLETE", "stopped": "PRUNED"}.get(status, "FAIL")
    stopped = status == "stopped"
    shown = eval_curve[-1][1] if stopped and eval_curve else value
    write_line(trial_line(plan, done, number, state, shown, overrides, f"{wall:.1f}s, packed", steps if stopped else None))
