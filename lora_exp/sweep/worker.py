"""A sweep worker: claims WAITING trials of the study and runs them on one base model, until none
is left; many workers (processes, machines) share one study.

Budget: the study holds exactly `n_trials` live trials. The starting process tops the study up
with WAITING trials (Optuna's own queue); workers claim them (`claims`), so any number of workers
run exactly `n_trials` trials in all. Running the same command again resumes: only the missing
trials are added. A packed worker (`pack=K`, `lora_exp.pack`) is passed in by the command: the
sweep does not depend on the pack."""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

from lora_exp.core import interrupts, logs
from lora_exp.core.status import TrialStatus
from lora_exp.errors import LoraExpError
from lora_exp.sweep.claims import claim_waiting_trial
from lora_exp.sweep.plan import SweepPlan, usable_cores
from lora_exp.sweep.storage import open_study
from lora_exp.sweep.trial import WorkerContext, run_one_trial
from lora_exp.tracking import parent
from lora_exp.tracking.provenance import redact_uri
from lora_exp.tracking.store import reachable, wait_until_reachable

log = logging.getLogger("lora_exp")

#: how long a worker waits for an unreachable tracking store before it stops (trials stay queued)
TRACKING_WAIT_S = float(os.environ.get("LORA_EXP_TRACKING_WAIT_SECONDS", "600"))
FAILURE_LIMIT_EXIT = 3
#: how long after a SIGINT in the terminal's foreground the sweep waits for each worker to say it
#: got it too (a Ctrl-C reaches the whole group) before passing it on (a `kill -INT` reached the
#: sweep alone)
PASS_ON_S = 2.0

#: (plan, worker index, stop flag, study, context) -> False if the failure limit stopped it
PackedWorker = Callable[[SweepPlan, int, "StopFlag", Any, WorkerContext], bool]


def quiet_libraries() -> None:
    """In a sweep the per-trial line is the output: keep per-step logs and library chatter out."""
    import warnings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    with contextlib.suppress(ImportError):
        from optuna.exceptions import ExperimentalWarning

        warnings.filterwarnings("ignore", category=ExperimentalWarning)
    if not os.environ.get("LORA_EXP_VERBOSE"):
        logging.getLogger("lora_exp.core.training").setLevel(logging.WARNING)  # a parameter count per trial
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
        else:  # read when transformers loads (in a trial, or a worker process): not loaded just for this
            os.environ["TRANSFORMERS_VERBOSITY"] = "error"


class StopFlag:
    """First Ctrl-C: finish the trial in flight, then stop. Second (or SIGTERM): stop now, except
    inside `deferred()`, which then stops as it ends: a trial claimed but not yet running, or a
    trial being recorded in both stores, is never cut in half. `received` (a worker process's
    shared counter) counts the SIGINTs it answers, for the sweep's process to read."""

    def __init__(self, received: Any = None) -> None:
        self.requested = False
        self._deferring = 0
        self._pending = False
        self.received = received

    def __call__(self, signum: int, frame: Any = None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            self.received.value += 1
        if not (self.requested or signum == signal.SIGTERM):
            self.requested = True
            log.warning("stopping after the trial(s) in flight (Ctrl-C again to stop now)")
        elif self._deferring:
            self.requested = self._pending = True
        else:
            interrupts.stop_now(frame)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            if not self._deferring and self._pending:
                self._pending = False
                interrupts.stop_now()


class Heartbeat:
    """Records the trial's heartbeat in the storage from a thread while the trial runs."""

    def __init__(self, study: Any, trial: Any, interval: float):
        self.storage, self.trial_id, self.interval = study._storage, trial._trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="lora-exp-heartbeat")

    def _beat(self) -> None:
        while not self.stop.is_set():
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the trial goes on
                log.debug("heartbeat failed: %s", exc)
            self.stop.wait(self.interval)

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def in_flight_elsewhere(study: Any, plan: SweepPlan) -> bool:
    """Fail trials whose worker died (stale heartbeat; Optuna enqueues a retry with the same
    parameters) and tell whether other trials are still running somewhere."""
    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)
    parent.close_orphan_runs(plan.record, study)
    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)))


def run_worker(plan: SweepPlan, worker_index: int, n_workers: int | None = 1,
               packed: PackedWorker | None = None, received: Any = None) -> bool:
    """Claim WAITING trials and run them on one base model, until none is left (`packed` runs
    them K at a time when the plan packs). Returns False when the failure limit stopped it."""
    import torch

    if n_workers is None or plan.base.trainer.num_threads:
        # a worker process shares the CPU cores with the other workers (as its trials record); a
        # pack, which trains its trials here rather than in `run_trial`, takes the set count too
        torch.set_num_threads(plan.base.trainer.num_threads or max(1, usable_cores() // plan.workers))
    stop = StopFlag(received)
    answers = multiprocessing.current_process().name == "MainProcess" or n_workers is None
    with interrupts.answering(stop) if answers else contextlib.nullcontext():
        study = open_study(plan.spec, plan.options.storage, plan.study_name, create=False)
        from lora_exp.core.models import pick_device

        context = WorkerContext(device=pick_device(plan.base.trainer.device),
                                position=worker_index if plan.workers > 1 else None, stop=stop)
        if plan.pack == "auto" and context.device.type != "cuda":
            log.info("pack=auto: one trial at a time on %s (packing pays on a GPU)", context.device)
        elif plan.packed:
            if packed is None:
                raise LoraExpError("pack: this worker has no packed engine")
            return packed(plan, worker_index, stop, study, context)
        return _run_trials(plan, study, context, stop)


def _run_trials(plan: SweepPlan, study: Any, context: WorkerContext, stop: StopFlag) -> bool:
    tracking = plan.base.tracking
    failures = 0
    while not stop.requested:
        interrupts.check()
        if plan.timeout and time.time() - plan.started > plan.timeout:
            log.info("timeout reached: no new trials")
            break
        if not wait_until_reachable(tracking, TRACKING_WAIT_S):
            raise LoraExpError(f"tracking store {redact_uri(tracking.uri)} unreachable for {TRACKING_WAIT_S:.0f}s: "
                               f"sweep stopped; queued trials run on the next start")
        trial = None
        try:
            with stop.deferred():
                trial = claim_waiting_trial(study, plan.options.storage)
            if trial is None:
                if in_flight_elsewhere(study, plan):
                    time.sleep(max(0.5, plan.spec.heartbeat / 2))  # take over any of them that goes stale
                    continue
                break
            with Heartbeat(study, trial, plan.spec.heartbeat):
                status = run_one_trial(plan, study, trial, context)
        except KeyboardInterrupt:
            if trial is not None:
                fail_if_in_flight(plan, study, trial, "interrupted")
            raise
        if status is TrialStatus.FAIL:
            if not reachable(tracking):  # the store went away: not the trial's fault
                study.enqueue_trial({})
                continue
            failures += 1
            if plan.spec.max_failures and failures >= plan.spec.max_failures:
                log.error("%d trials failed (max_failures=%d): stopping the sweep", failures, plan.spec.max_failures)
                return False
            study.enqueue_trial({})  # a replacement, so the study still ends with n_trials trials
    return True


def fail_if_in_flight(plan: SweepPlan, study: Any, trial: Any, reason: str) -> None:
    """A trial this worker claimed and left RUNNING (stopped before its run opened, say):
    failed in both stores now, not left for the heartbeat's grace period (meanwhile it would
    count as running elsewhere, and the parent run would stay RUNNING)."""
    from optuna.trial import TrialState

    try:
        if study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
            return
        study._storage.set_trial_user_attr(trial._trial_id, "failure", reason)
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        parent.close_orphan_runs(plan.record, study, reason, numbers={trial.number})
    except Exception as exc:  # noqa: BLE001 - the heartbeat's grace period fails it later
        log.warning("could not fail trial %d: %s", trial.number, exc)


#: what a worker imports to run a trial: imported once by the fork server of a machine without
#: CUDA (`worker_processes`), not once per worker (~6 s of CPU each on two cores)
WORKER_PRELOAD = ["torch", "transformers", "peft", "datasets", "mlflow", "optuna", "lora_exp.sweep.worker",
                  "lora_exp.core.training", "lora_exp.core.evaluation", "lora_exp.tracking.runs"]


def worker_processes(gpus: list[str]) -> Any:
    """How worker processes start. With CUDA: a fresh interpreter each (spawn), so each sets its
    GPU before CUDA starts and inherits no CUDA state. Without: forked from a server that imported
    what a trial needs once (multiprocessing's forkserver; it has run no torch op and holds no
    thread of ours), so N workers cost one import, not N."""
    if gpus or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_PRELOAD)
    return ctx


def run_worker_processes(plan: SweepPlan, workers: int, packed: PackedWorker | None = None) -> bool:
    gpus = worker_gpus()
    ctx = worker_processes(gpus)
    received = [ctx.RawValue("i", 0) for _ in range(workers)]  # the SIGINTs each worker answered
    procs = [ctx.Process(target=worker_entry, args=(plan, i, gpus[i % len(gpus)] if gpus else None, packed,
                                                    received[i]),
                         name=f"lora-exp-worker-{i}") for i in range(workers)]
    foreground_sigints = 0

    def send(signum: int, count: int | None = None) -> None:
        """`signum` to each live worker (with `count`: each that has answered fewer SIGINTs)."""
        for p, got in zip(procs, received):
            if p.pid is not None and p.is_alive() and (count is None or got.value < count):
                os.kill(p.pid, signum)

    def forward(signum: int, frame: Any) -> None:
        """A terminal's Ctrl-C reaches every process of its foreground group, the workers
        included; a signal sent to this process (SIGTERM from `kill` or `docker stop`, SIGINT from
        `kill -INT`, `timeout -s INT` or a job scheduler) reaches it alone: the workers get it
        from here. A SIGINT while this group is the terminal's foreground group may be either (a
        Ctrl-C there, or `kill -INT` from another shell): a worker that got it twice would stop now
        instead of finishing its trial, so it is passed on only to the workers that have not
        answered as many SIGINTs as this process got, `PASS_ON_S` later."""
        nonlocal foreground_sigints
        if signum == signal.SIGTERM or not terminal_foreground():
            send(signum)
        else:
            foreground_sigints += 1
            timer = threading.Timer(PASS_ON_S, send, args=(signal.SIGINT, foreground_sigints))
            timer.daemon = True
            timer.start()
        interrupts.stop_now(frame)

    with interrupts.answering(forward):
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:  # the workers stop too (after their trial on a first Ctrl-C)
            for p in procs:
                p.join()
            raise
    failed = [p.name for p in procs if p.exitcode not in (0, None, FAILURE_LIMIT_EXIT)]
    if failed:
        log.warning("worker(s) %s exited with an error", ", ".join(failed))
    return not any(p.exitcode == FAILURE_LIMIT_EXIT for p in procs)


def terminal_foreground() -> bool:
    """Whether this process's group is the foreground group of its controlling terminal (where a
    Ctrl-C reaches every process of the group); False without a terminal."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def worker_gpus() -> list[str]:
    """The GPUs the workers spread over, as CUDA_VISIBLE_DEVICES names them (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    names = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return names[:torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


def worker_entry(plan: SweepPlan, index: int, gpu: str | None = None, packed: PackedWorker | None = None,
                 received: Any = None) -> None:
    if gpu is not None:
        # each worker sees its one GPU as cuda:0: the same compiled graphs on every GPU, so a
        # worker whose pack starts second reuses the first one's compile cache (lora_exp.pack)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    logs.configure(f"%(asctime)s [w{index}] %(message)s")
    quiet_libraries()
    try:
        finished = run_worker(plan, index, n_workers=None, packed=packed, received=received)
    except KeyboardInterrupt:  # stopped now: its trial is recorded FAILED (interrupted); no traceback
        raise SystemExit(130) from None
    if not finished:
        raise SystemExit(FAILURE_LIMIT_EXIT)
