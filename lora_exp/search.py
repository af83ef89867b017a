"""The sweep: owns Optuna. Sweep file -> study, objective, pruning callback, workers.

Training never imports optuna; this module turns a trial into overrides, composes its config
with Hydra, runs `run_trial` on the worker's shared base model, and reports back.

Budget: the study holds exactly `n_trials` live trials. The starting process tops the study up
with WAITING trials (Optuna's own queue); workers pop them with `study.ask()`, which is atomic in
the RDB storage, so any number of workers (or machines) run exactly `n_trials` trials in all.
Running the same command again resumes: only the missing trials are added.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from lora_exp import sweep_tracking
from lora_exp.config import GROUP_NAMES, RunConfig, compose, replace_keys
from lora_exp.errors import ConfigError, LoraExpError
from lora_exp.sweeps import SweepSpec, corner_overrides, load_sweep, suggest

log = logging.getLogger("lora_exp")

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
#: a worker writes a heartbeat for its trial this often; a RUNNING trial whose heartbeat is older
#: than GRACE is taken as dead (SIGKILL, power loss): failed, and its parameters retried.
HEARTBEAT_S = float(os.environ.get("LORA_EXP_HEARTBEAT_SECONDS", "10"))
GRACE_S = 4 * HEARTBEAT_S
RETRIES = 2
#: how long a worker waits for an unreachable tracking store before it stops (trials stay queued)
TRACKING_WAIT_S = float(os.environ.get("LORA_EXP_TRACKING_WAIT_SECONDS", "600"))
OPTIONS = ("sweep", "n_trials", "workers", "storage", "study", "timeout", "pack")
LIVE = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")


@dataclass(frozen=True)
class SweepOptions:
    sweep: str = "default"
    n_trials: int | None = None
    workers: int | None = None
    storage: str = DEFAULT_STORAGE
    study: str | None = None
    timeout: float | None = None
    overrides: tuple[str, ...] = ()
    #: trials trained at once per worker on one base model (lora_exp/pack_sweep.py); 1 = one at a time
    pack: int = 1


@dataclass
class SweepPlan:
    """Everything a worker needs, as plain data (sent to spawned worker processes)."""

    spec: SweepSpec
    options: SweepOptions
    study_name: str
    n_trials: int
    parent_run_id: str | None
    base_overrides: list[str]
    timeout: float | None
    #: the base config, composed once (trials add their overrides to `base_overrides`)
    base: RunConfig
    workers: int = 1
    started: float = field(default_factory=time.time)


def parse_options(args: list[str]) -> SweepOptions:
    """Split `key=value` tokens into sweep options and Hydra config overrides."""
    opts: dict[str, Any] = {}
    overrides: list[str] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in OPTIONS:
            opts[key] = value
        else:
            overrides.append(arg)
    try:
        n_trials = int(opts["n_trials"]) if "n_trials" in opts else None
        workers = int(opts["workers"]) if "workers" in opts else None
        timeout = float(opts["timeout"]) if "timeout" in opts else None
        pack = int(opts["pack"]) if "pack" in opts else 1
    except ValueError as exc:
        raise ConfigError(f"sweep option: {exc}") from exc
    if n_trials is not None and n_trials <= 0:
        raise ConfigError(f"n_trials: must be >= 1, got {n_trials}")
    if workers is not None and workers <= 0:
        raise ConfigError(f"workers: must be >= 1, got {workers}")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"timeout: must be > 0 seconds, got {timeout}")
    if pack <= 0:
        raise ConfigError(f"pack: must be >= 1 (trials trained at once), got {pack}")
    return SweepOptions(sweep=opts.get("sweep", "default"), n_trials=n_trials, workers=workers,
                        storage=opts.get("storage", DEFAULT_STORAGE), study=opts.get("study") or None,
                        timeout=timeout, overrides=tuple(overrides), pack=pack)


def default_workers() -> int:
    """One worker per visible GPU on a CUDA machine, else one."""
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


# --- Optuna objects -------------------------------------------------------------------------


def make_sampler(spec: SweepSpec, worker_index: int = 0) -> Any:
    """The sampler; each worker offsets the seed, or parallel workers would draw the same values."""
    import optuna

    opts = {k: v for k, v in spec.sampler.items() if k != "name"}
    if opts.get("seed") is not None:
        opts["seed"] = int(opts["seed"]) + worker_index
    name = spec.sampler["name"]
    if name == "tpe":
        opts.setdefault("seed", 42)
        opts.setdefault("constant_liar", True)  # trials in flight count as pending for other workers
        opts.setdefault("multivariate", True)
        return optuna.samplers.TPESampler(**opts)
    if name == "random":
        return optuna.samplers.RandomSampler(**opts)
    if name == "gp":
        return optuna.samplers.GPSampler(**opts)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(**opts)
    grid = {k: (p.choices if p.type == "categorical" else list(range(int(p.low), int(p.high) + 1, int(p.step or 1))))
            for k, p in spec.space.items()}
    return optuna.samplers.GridSampler(grid, **opts)


def make_pruner(spec: SweepSpec) -> Any:
    import optuna

    if spec.multi:  # Optuna cannot prune multi-objective studies
        return optuna.pruners.NopPruner()
    opts = {k: v for k, v in spec.pruner.items() if k != "name"}
    name = spec.pruner["name"]
    if name == "median":
        opts.setdefault("n_startup_trials", 3)
        return optuna.pruners.MedianPruner(**opts)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(**opts)
    return optuna.pruners.NopPruner()


def _retry_stale(max_retry: int) -> dict[str, Any]:
    """RDBStorage's argument for Optuna's callback that re-queues a trial whose heartbeat went
    stale, with its parameters: `heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback`
    from Optuna 4.9, `failed_trial_callback=RetryFailedTrialCallback` before (deprecated since)."""
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    if cls is None:
        return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=max_retry)}
    return {"heartbeat_stale_trial_callback": cls(max_retry=max_retry)}


def open_study(plan_or_spec: SweepSpec, storage_url: str, study_name: str, create: bool,
               worker_index: int = 0) -> Any:
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():  # heartbeats and their retry callback are "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                storage_url, engine_kwargs=_engine_kwargs(storage_url), heartbeat_interval=int(max(1, HEARTBEAT_S)),
                grace_period=int(max(2, GRACE_S)), **_retry_stale(max_retry=RETRIES))
        if storage_url.startswith("sqlite:///"):
            sqlite_wal(storage.engine)
        if create:  # (study, whether this process created it): the creator opens the parent run
            try:
                return optuna.create_study(study_name=study_name, storage=storage, load_if_exists=False,
                                           directions=plan_or_spec.directions, sampler=make_sampler(plan_or_spec),
                                           pruner=make_pruner(plan_or_spec)), True
            except optuna.exceptions.DuplicatedStudyError:
                return optuna.load_study(study_name=study_name, storage=storage,
                                         sampler=make_sampler(plan_or_spec), pruner=make_pruner(plan_or_spec)), False
        return optuna.load_study(study_name=study_name, storage=storage,
                                 sampler=make_sampler(plan_or_spec, worker_index),
                                 pruner=make_pruner(plan_or_spec))
    except LoraExpError:
        raise
    except Exception as exc:  # SQLAlchemy / driver errors: unreachable or wrong URL
        from lora_exp.tracking import redact_uri

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"storage: cannot open {redact_uri(storage_url)}: {first[:300]}") from exc


def sqlite_wal(engine: Any) -> None:
    """Write-ahead logging on a SQLite store: a packed sweep's sampler, tracking processes and
    workers write one file at once; in WAL mode readers no longer wait for a writer's commit,
    and a commit is one sync of the log, not of the journal and the database."""
    import sqlite3

    from sqlalchemy import event

    def pragmas(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")  # kept in the file: once is enough
            cursor.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; a power cut may lose the last commits
        except sqlite3.OperationalError:  # locked by a writer just now: the next connection sets it
            pass
        finally:
            cursor.close()

    event.listen(engine, "connect", pragmas)
    engine.dispose()  # connections opened before (creating the tables) reconnect with it


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return {"connect_args": {"timeout": 60}}  # several workers write one file
    if url.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    return {}


def claim_waiting_trial(study: Any, storage_url: str) -> Any:
    """Take one WAITING trial (RUNNING from now on), or None when the queue is empty.

    What `study.ask()` does first, without its fallback of creating a new trial when the queue
    is empty: that fallback would let a worker run a trial beyond the budget. The WAITING ->
    RUNNING change is a compare-and-set in the storage, so two workers never get the same trial.
    """
    claimed = claim_waiting_trials(study, storage_url, 1)
    return claimed[0] if claimed else None


def stored_trials(study: Any, states: tuple[Any, ...]) -> list[Any]:
    """The study's trials in `states`, read with the states filter in the database query.

    `study.get_trials` goes through Optuna's cache, which re-reads every unfinished trial (params,
    attributes, intermediate values) at each call: with a thousand trials in flight, ~0.5 s, even
    to learn that none is WAITING. Asked every packed step, that made the step 6x slower. (Trials
    read this way are not registered with that cache: claim through `study.get_trials`.)"""
    backend = _database(study)
    if backend is None:  # not a database (in-memory, journal): the cache is cheap
        return study.get_trials(deepcopy=False, states=states)
    return backend.get_all_trials(study._study_id, deepcopy=False, states=states)


def _database(study: Any) -> Any:
    """The study's RDBStorage under Optuna's cache, or None if it is not a database."""
    backend = getattr(study._storage, "_backend", study._storage)
    return backend if hasattr(backend, "scoped_session") else None


class TrialReader:
    """A study's trials as its database holds them, each finished trial loaded once.

    COMPLETE, PRUNED and FAIL are final: Optuna changes nothing of a trial after it finishes. A
    long packed search reads its study again and again (the pruner's view every few seconds, the
    sampler once per batch), and a full read loads every finished trial with its params, values,
    attributes and intermediate values: 0.61 s for 1,564 finished trials and 1.57 s for 3,064 on
    this project's CPU (`bench/study_reads.py`). This keeps the finished trials it has read and
    loads from the database only the ids of the finished ones (one light query), the trials
    finished since, and the trials still live (every read: they change)."""

    def __init__(self, study: Any):
        self._study = study
        self._finished: dict[int, Any] = {}  # trial_id -> FrozenTrial, finished
        self.loaded = 0  # finished trials loaded from the database so far (what the cache saves)

    def read(self, states: tuple[Any, ...] | None = None) -> list[Any]:
        """The study's trials in `states` (all if None), ordered by number, as
        `storage.get_all_trials(..., deepcopy=False, states=states)` answers (do not modify them)."""
        from optuna.trial import TrialState

        backend = _database(self._study)
        if backend is None:  # not a database: Optuna's own read is cheap
            return self._study.get_trials(deepcopy=False, states=states)
        study_id = self._study._study_id
        wanted = set(states) if states is not None else set(TrialState)
        finished = {TrialState[s] for s in FINISHED_STATES}
        out: list[Any] = []
        if wanted & finished:
            try:
                out += [t for t in self._read_finished(backend, study_id, tuple(finished)) if t.state in wanted]
            except (ImportError, AttributeError, TypeError):  # another Optuna's internals: read them all
                out += backend.get_all_trials(study_id, deepcopy=False, states=tuple(wanted & finished))
        if wanted - finished:
            out += backend.get_all_trials(study_id, deepcopy=False, states=tuple(wanted - finished))
        return sorted(out, key=lambda t: t.number)

    def _read_finished(self, backend: Any, study_id: int, finished: tuple[Any, ...]) -> list[Any]:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(backend.scoped_session) as session:
            ids = [i for (i,) in session.query(models.TrialModel.trial_id)
                   .filter(models.TrialModel.study_id == study_id, models.TrialModel.state.in_(finished))]
        new = [i for i in ids if i not in self._finished]
        if new:
            if len(new) > FULL_READ_ABOVE or len(new) == len(ids):  # the first read: no id list
                got = backend.get_all_trials(study_id, deepcopy=False, states=finished)
            else:  # these ids, and any finished since with a larger one
                got = backend._get_trials(study_id, finished, set(new), max(new))
            for t in got:
                if t._trial_id not in self._finished:
                    self._finished[t._trial_id] = t
                    self.loaded += 1
        return [self._finished[i] for i in ids]


#: Optuna's final trial states (by name)
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")
#: more new finished trials than this are read with all the others (no list of ids in the query)
FULL_READ_ABOVE = 5000


def claim_waiting_trials(study: Any, storage_url: str, n: int, batch_view: bool = False,
                         reader: TrialReader | None = None) -> list[Any]:
    """Up to `n` WAITING trials in one pass (a pack asks for many at once). Each claimed trial
    gets its first heartbeat at once: Optuna counts a trial stale only by its heartbeat, so a
    worker killed before its first beat would otherwise leave a RUNNING trial no one retries.

    With `batch_view`, the claimed trials sample against one read of the study (`BatchView`)
    instead of one per trial: for a pack's batch of trials, not for a trial that also prunes
    through its own `Trial` (its pruner must see the study as it is); `reader`, kept from one
    claim to the next, reads only what changed since the last."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage = study._storage  # the study's RDBStorage (public BaseStorage API from here on)
    study_id = storage.get_study_id_from_name(study.study_name)
    claimed: list[Any] = []
    with _claim_lock(storage_url):
        if not stored_trials(study, (TrialState.WAITING,)):  # the usual answer once all are claimed: cheap
            return []
        # the cached read (every unfinished trial) also registers these trials with Optuna's cache,
        # which their suggest_* calls need
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if len(claimed) >= n:
                break
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
            try:
                if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    if storage.get_heartbeat_interval():
                        storage.record_heartbeat(trial_id)
                    claimed.append(trial_id)
            except UpdateFinishedTrialError:
                continue
    # what `study.ask` does for every trial: drop the sampler's per-thread copy of the study's
    # trials, so it sees the trials finished since (a pack's are told by its tracking process,
    # so nothing in this thread would ever drop it: TPE would stay in its random start-up)
    study._thread_local.cached_all_trials = None
    if batch_view and claimed:
        view = BatchView(study, reader)
        trials = [optuna.Trial(view, trial_id) for trial_id in claimed]
        view.batch = trials
        return trials
    return [optuna.Trial(study, trial_id) for trial_id in claimed]


class BatchView:
    """The study as a batch of claimed trials samples it: the study's trials read once (on the
    first sample), with the batch's own trials as they are sampled.

    TPE with constant liar re-reads every trial in flight for each trial it samples (Optuna skips
    its cache then, so the liar sees their latest params). A pack claiming a hundred trials with a
    thousand in flight made that a hundred reads of a thousand trials: ~0.1 s a trial on this
    machine, quadratic in the pack's size. Here the batch samples against one read; the trials it
    has sampled itself are added from memory, so the liar still sees them. What it cannot see are
    trials other processes change while the batch samples (seconds), as if it had asked then."""

    def __init__(self, study: Any, reader: TrialReader | None = None):
        self._study = study
        self._reader = reader
        self._trials: list[Any] | None = None
        self._index: dict[int, int] = {}
        self.batch: list[Any] = []

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False) -> list[Any]:
        import copy

        if self._trials is None:
            self._trials = (self._reader.read() if self._reader is not None else
                            self._study._storage.get_all_trials(self._study._study_id, deepcopy=False))
            self._index = {t.number: i for i, t in enumerate(self._trials)}
        trials = list(self._trials)
        for own in self.batch:
            if own.number in self._index:
                trials[self._index[own.number]] = own._cached_frozen_trial
        if states is not None:
            trials = [t for t in trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


@contextlib.contextmanager
def _claim_lock(url: str) -> Any:
    """SQLite ignores SELECT ... FOR UPDATE and its deferred transactions let two processes both
    read WAITING: serialise claims with a lock file beside the database (SQLite is one machine's
    anyway). PostgreSQL's row lock already makes the WAITING -> RUNNING change a compare-and-set."""
    if not url.startswith("sqlite:///"):
        yield
        return
    import fcntl

    with open(url[len("sqlite:///"):] + ".claim.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def top_up(study: Any, n_trials: int) -> int:
    """Enqueue WAITING trials until the study holds n_trials live ones; returns how many were added."""
    from optuna.trial import TrialState

    live = len(study.get_trials(deepcopy=False, states=tuple(TrialState[s] for s in LIVE)))
    for _ in range(max(0, n_trials - live)):
        study.enqueue_trial({}, skip_if_exists=False)
    return max(0, n_trials - live)


# --- the command ----------------------------------------------------------------------------


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
        logging.getLogger("lora_exp.training").setLevel(logging.WARNING)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def cmd_sweep(args: list[str]) -> int:
    quiet_libraries()
    options = parse_options(args)
    spec = load_sweep(options.sweep)
    study_name = options.study or spec.study
    n_trials = options.n_trials or spec.n_trials
    base_overrides = list(spec.base) + list(options.overrides)
    base_cfg = compose(base_overrides)  # a bad base override fails here, before anything runs
    for corner in corner_overrides(spec.space):  # and so does a search space the config rejects
        compose(base_overrides + corner)
    check_ratio_anchors(spec, base_overrides)
    if options.pack > 1:
        from lora_exp.pack_training import check_packable

        check_packable(base_cfg)
    from lora_exp.data import load_rows

    load_rows(base_cfg.data)
    study, created = open_study(spec, options.storage, study_name, create=True)
    study.set_user_attr("base_overrides", base_overrides)  # `lora-exp best` prints the full command
    study.set_user_attr("objectives", spec.metrics)
    if spec.multi and spec.pruner.get("name") != "none":
        print(f"note: pruning is off: Optuna cannot prune multi-objective studies ({', '.join(spec.metrics)})")
    parent_run_id = sweep_tracking.open_parent(base_cfg.tracking, study, spec, options, created)
    import optuna

    optuna.storages.fail_stale_trials(study)  # trials left RUNNING by a killed worker: failed, retried
    added = top_up(study, n_trials)
    workers = options.workers or default_workers()
    plan = SweepPlan(spec, options, study_name, n_trials, parent_run_id, base_overrides,
                     options.timeout or spec.timeout, base_cfg, workers)
    sweep_tracking.close_orphan_runs(plan, study)
    log.info("study %s: %d trials wanted, %d to run now, %d worker(s); storage %s", study_name, n_trials, added,
             workers, sweep_tracking.redact(options.storage))
    try:
        if workers == 1:
            finished = run_worker(plan, worker_index=0)
        else:
            finished = run_worker_processes(plan, workers)
    finally:
        final = open_study(spec, options.storage, study_name, create=False)
        print(sweep_tracking.finish_parent(base_cfg.tracking, final, plan))
    if not finished:
        raise LoraExpError(f"sweep stopped: {spec.max_failures} trials failed (max_failures); the trials' "
                           f"`failure` attribute and their runs' `error` tags say why")
    return 0


FAILURE_LIMIT_EXIT = 3


def run_worker_processes(plan: SweepPlan, workers: int) -> bool:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no forked torch state
    gpus = _worker_gpus()
    procs = [ctx.Process(target=_worker_entry, args=(plan, i, gpus[i % len(gpus)] if gpus else None),
                         name=f"lora-exp-worker-{i}") for i in range(workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:  # the children got the same Ctrl-C and stop after their trial
        for p in procs:
            p.join()
        raise
    failed = [p.name for p in procs if p.exitcode not in (0, None, FAILURE_LIMIT_EXIT)]
    if failed:
        log.warning("worker(s) %s exited with an error", ", ".join(failed))
    return not any(p.exitcode == FAILURE_LIMIT_EXIT for p in procs)


def _worker_gpus() -> list[str]:
    """The GPUs the workers spread over, as CUDA_VISIBLE_DEVICES names them (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    names = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return names[:torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


def _worker_entry(plan: SweepPlan, index: int, gpu: str | None = None) -> None:
    if gpu is not None:
        # each worker sees its one GPU as cuda:0: the same compiled graphs on every GPU, so a
        # worker whose pack starts second reuses the first one's compile cache (lora_exp/packed.py)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [w{index}] %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_libraries()
    if not run_worker(plan, index, n_workers=None):
        raise SystemExit(FAILURE_LIMIT_EXIT)


class _StopFlag:
    """First Ctrl-C: finish the trial in flight, then stop. Second: stop now."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.requested or signum == signal.SIGTERM:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after the trial(s) in flight (Ctrl-C again to stop now)")


def run_worker(plan: SweepPlan, worker_index: int, n_workers: int | None = 1) -> bool:
    """Claim WAITING trials and run them on one base model, until none is left.

    Returns False when the failure limit stopped it."""
    import torch
    from optuna.trial import TrialState

    from lora_exp.data import load_rows, tokenize
    from lora_exp.models import load_base, pick_device
    from lora_exp.tracking import reachable, wait_until_reachable

    if n_workers is None:  # a worker process: share the CPU cores with the other workers
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan.workers))
    stop = _StopFlag()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} \
        if multiprocessing.current_process().name == "MainProcess" or n_workers is None else {}
    study = open_study(plan.spec, plan.options.storage, plan.study_name, create=False, worker_index=worker_index)
    base_cfg = plan.base
    device = pick_device(base_cfg.trainer.device)
    context = _WorkerContext(device=device, load_base=load_base, load_rows=load_rows, tokenize=tokenize)
    failures = 0
    if plan.options.pack > 1:
        from lora_exp.pack_sweep import run_packed_worker

        try:
            return run_packed_worker(plan, worker_index, stop, study, context)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    try:
        while not stop.requested:
            if plan.timeout and time.time() - plan.started > plan.timeout:
                log.info("timeout reached: no new trials")
                break
            if not wait_until_reachable(base_cfg.tracking, TRACKING_WAIT_S):
                raise LoraExpError(f"tracking store {sweep_tracking.redact(base_cfg.tracking.uri)} unreachable for "
                                   f"{TRACKING_WAIT_S:.0f}s: sweep stopped; queued trials run on the next start")
            trial = claim_waiting_trial(study, plan.options.storage)
            if trial is None:
                if _in_flight_elsewhere(study, plan):
                    time.sleep(max(0.5, HEARTBEAT_S / 2))  # take over any of them that goes stale
                    continue
                break
            with _Heartbeat(study, trial):
                state = run_one_trial(plan, study, trial, context)
            if state == "FAIL":
                if not reachable(base_cfg.tracking):  # the store went away: not the trial's fault
                    study.enqueue_trial({})
                    continue
                failures += 1
                if plan.spec.max_failures and failures >= plan.spec.max_failures:
                    log.error("%d trials failed (max_failures=%d): stopping the sweep", failures,
                              plan.spec.max_failures)
                    return False
                study.enqueue_trial({})  # a replacement, so the study still ends with n_trials trials
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return True


def _in_flight_elsewhere(study: Any, plan: SweepPlan) -> bool:
    """Fail trials whose worker died (stale heartbeat; Optuna enqueues a retry with the same
    parameters) and tell whether other trials are still running somewhere."""
    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)
    sweep_tracking.close_orphan_runs(plan, study)
    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)))


class _Heartbeat:
    """Records the trial's heartbeat in the storage from a thread while the trial runs."""

    def __init__(self, study: Any, trial: Any):
        import threading

        self.storage, self.trial_id = study._storage, trial._trial_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="lora-exp-heartbeat")

    def _beat(self) -> None:
        while not self.stop.is_set():
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the trial goes on
                log.debug("heartbeat failed: %s", exc)
            self.stop.wait(HEARTBEAT_S)

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def _failed_count(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))


@dataclass
class _WorkerContext:
    """Per-process caches: the base model is loaded once per worker, data once per data config."""

    device: Any
    load_base: Any
    load_rows: Any
    tokenize: Any
    bases: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, Any] = field(default_factory=dict)

    def prepare(self, cfg: RunConfig) -> tuple[Any, Any]:
        mkey = repr(cfg.model)
        if mkey not in self.bases:
            self.bases.clear()  # one base in memory at a time
            self.bases[mkey] = self.load_base(cfg.model, self.device)
        base = self.bases[mkey]
        dkey = repr((cfg.data, mkey))
        if dkey not in self.datasets:
            self.datasets[dkey] = self.tokenize(self.load_rows(cfg.data), cfg.data, base.tokenizer)
        return base, self.datasets[dkey]


class PruningCallback:
    """Reports the objective at each eval; asks Optuna whether to stop."""

    def __init__(self, trial: Any, metric: str):
        self.trial, self.metric = trial, metric

    def on_eval(self, step: int, metrics: dict[str, float]) -> bool:
        if self.metric not in metrics:
            return False
        self.trial.report(metrics[self.metric], step)
        return bool(self.trial.should_prune())


def trial_config(base: RunConfig, base_overrides: list[str], overrides: list[str],
                 base_dict: dict[str, Any] | None = None) -> RunConfig:
    """A trial's config: its plain key=value overrides applied to the sweep's composed base
    (`base`, from `base_overrides`; no Hydra compose per trial, the same validation); a group
    override (`lora=seed`) goes through Hydra's compose."""
    if any(o.split("=", 1)[0].lstrip("+~") in GROUP_NAMES for o in overrides):
        return compose(base_overrides + overrides)
    return replace_keys(base, base.to_dict() if base_dict is None else base_dict, overrides,
                        base_overrides + overrides)


def run_one_trial(plan: SweepPlan, study: Any, trial: Any, context: _WorkerContext) -> str:
    """Train one trial into its own nested MLflow run; tell Optuna only after the run is closed."""
    from optuna.trial import TrialState

    from lora_exp.tracking import start_run
    from lora_exp.training import run_trial

    start = time.perf_counter()
    metric = plan.spec.metric
    state, value, result, run_id = TrialState.FAIL, None, None, None
    overrides: list[str] = []
    try:
        overrides = suggest(trial, plan.spec.space, _base_values(plan))
        trial.set_user_attr("overrides", overrides)
        cfg = trial_config(plan.base, plan.base_overrides, overrides)
        base, data = context.prepare(cfg)
        sweep_tracking.load_base_cache(study, base)
        tags = {"lora_exp.kind": "trial", "lora_exp.study": plan.study_name, "trial_number": trial.number,
                "lora_exp.trial_overrides": " ".join(overrides)}
        compute = 0.0
        with start_run(cfg.tracking, run_name=f"{plan.study_name}-trial-{trial.number}", tags=tags,
                       parent_run_id=plan.parent_run_id) as tracker:
            run_id = tracker.run_id
            trial.set_user_attr("mlflow_run_id", run_id)
            callbacks = [] if plan.spec.multi else [PruningCallback(trial, metric)]
            result = run_trial(cfg, base, data, tracker, callbacks=callbacks)
            compute = result.metrics.get("train_runtime_s", 0.0) + result.metrics.get("generation_s", 0.0)
            if result.status == "stopped":
                tracker.status = "KILLED"
                state = TrialState.PRUNED
                tracker.set_tags({"trial_state": "PRUNED", "pruned": "true"})
            else:
                values = [objective_value(result.metrics, m) for m in plan.spec.metrics]
                value = values if plan.spec.multi else values[0]
                state = TrialState.COMPLETE
                tracker.set_tags({"trial_state": "COMPLETE"})
        sweep_tracking.save_base_cache(study, base)
        trial.set_user_attr("loss_curve", result.loss_curve)
        trial.set_user_attr("compute_s", round(compute, 3))
        _dashboard_note(trial, run_id, overrides, result)
    except KeyboardInterrupt:
        trial.set_user_attr("failure", "interrupted")
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:  # a bad sampled value, OOM, a bug: this trial fails, the sweep goes on
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        log.error("trial %d failed: %s", trial.number, reason)
        trial.set_user_attr("failure", reason)
    wall = time.perf_counter() - start
    trial.set_user_attr("wall_s", round(wall, 3))
    # skip_if_finished: a worker too slow to beat may have been taken over as stale meanwhile
    if state == TrialState.COMPLETE:
        study.tell(trial, value, skip_if_finished=True)
    elif state == TrialState.PRUNED:
        study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
    else:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    sweep_tracking.after_trial(plan, study, trial.number, run_id)
    shown = value
    if state == TrialState.PRUNED and result is not None and result.eval_curve:
        shown = result.eval_curve[-1][1]
    _print_trial_line(plan, study, trial.number, state.name, shown, overrides, wall,
                      at_step=result.steps if state == TrialState.PRUNED and result is not None else None)
    return state.name


def _dashboard_note(trial: Any, run_id: str | None, overrides: list[str], result: Any) -> None:
    """A note optuna-dashboard shows beside the trial: its run, its overrides, its answers."""
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    lines = [f"**MLflow run** `{run_id}`", "", f"**overrides** `{' '.join(overrides)}`", ""]
    g = result.generations
    if g:
        lines += ["| prompt | expected | base | adapter |", "|---|---|---|---|"]
        cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")[:200]  # noqa: E731
        for row in zip(g["prompt"], g["expected"], g["base_output"], g["adapter_output"]):
            lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    try:
        save_note(trial, "\n".join(lines))
    except Exception as exc:  # noqa: BLE001 - a note is a nicety
        log.debug("dashboard note not saved: %s", exc)


def objective_value(metrics: dict[str, float], metric: str) -> float:
    """`eval_loss` names the final eval loss (`final_eval_loss`); any other logged metric by name."""
    for key in (metric, f"final_{metric}"):
        if key in metrics:
            return metrics[key]
    raise LoraExpError(f"objective metric {metric!r} was not computed (have: {', '.join(sorted(metrics))})")


def check_ratio_anchors(spec: SweepSpec, base_overrides: list[str]) -> None:
    """A `ratio_of` anchor must be searched or be a numeric key of the base config."""
    from lora_exp.tracking import flatten

    values = flatten(compose(base_overrides).to_dict())
    for key, param in spec.space.items():
        anchor = param.ratio_of
        if anchor is not None and anchor not in spec.space and not isinstance(values.get(anchor), (int, float)):
            raise ConfigError(f"sweep {spec.name}: space.{key}.ratio_of: {anchor} is neither searched nor a "
                              f"numeric config key")


def _base_values(plan: SweepPlan) -> dict[str, Any]:
    """Values of the base config (for `ratio_of` anchors that are not searched)."""
    from lora_exp.tracking import flatten

    return flatten(plan.base.to_dict())


def _print_trial_line(plan: SweepPlan, study: Any, number: int, state: str, value: Any,
                      overrides: list[str], wall: float, at_step: int | None = None) -> None:
    from optuna.trial import TrialState

    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))
    write_line(trial_line(plan, str(done), number, state, value, overrides, f"{wall:.1f}s", at_step))


def write_line(text: str) -> None:
    """One line to stdout in one write: several processes print trial lines at once, and with
    PYTHONUNBUFFERED (common in containers) `print` writes the text and its newline separately,
    so two processes' lines could interleave."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def trial_line(plan: SweepPlan, done: str, number: int, state: str, value: Any, overrides: list[str], wall: str,
               at_step: int | None = None) -> str:
    """The one line a sweep prints per finished trial (packed or not)."""
    if isinstance(value, list):
        shown = " ".join(f"{m}={v:.4g}" for m, v in zip(plan.spec.metrics, value))
    else:
        shown = f"{plan.spec.metric}={value:.4f}" if value is not None else plan.spec.metric + "=-"
    if at_step is not None:
        shown += f"@{at_step}"
    return f"[{done}/{plan.n_trials}] trial {number:>3} {state:<8} {shown}  {' '.join(overrides)}  ({wall})"
