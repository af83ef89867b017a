"""The study's storage: Optuna's RDB storage (sqlite or PostgreSQL) with heartbeats, the sampler
and pruner a sweep file names, reads of a study's trials that scale to thousands of trials, the
top-up to `n_trials`, and the base model's results shared by every worker of a study."""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from lora_exp.errors import ConfigError, LoraExpError
from lora_exp.sweep.spec import SweepSpec
from lora_exp.tracking.locks import sqlite_wal, store_lock
from lora_exp.tracking.provenance import redact_uri

log = logging.getLogger("lora_exp")

RETRIES = 2
LIVE = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")


#: Optuna's final trial states (by name)
FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")


#: more new finished trials than this are read with all the others (no list of ids in the query)
FULL_READ_ABOVE = 5000


def make_sampler(spec: SweepSpec) -> Any:
    """The sweep file's sampler, its random draws seeded per trial (`seed_per_trial`)."""
    import optuna

    opts = {k: v for k, v in spec.sampler.items() if k != "name"}
    name = spec.sampler["name"]
    if name == "tpe":
        opts.setdefault("seed", 42)
        opts.setdefault("constant_liar", True)  # trials in flight count as pending for other workers
        opts.setdefault("multivariate", True)
        sampler = optuna.samplers.TPESampler(**opts)
    elif name == "random":
        sampler = optuna.samplers.RandomSampler(**opts)
    elif name == "gp":
        sampler = optuna.samplers.GPSampler(**opts)
    elif name == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(**opts)
    else:
        grid = {k: (p.choices if p.type == "categorical" else list(range(int(p.low), int(p.high) + 1,
                                                                          int(p.step or 1))))
                for k, p in spec.space.items()}
        sampler = optuna.samplers.GridSampler(grid, **opts)
    if opts.get("seed") is not None:
        seed_per_trial(sampler, int(opts["seed"]))
    return sampler


def seed_per_trial(sampler: Any, seed: int) -> None:
    """Reseed the sampler's random draws for each trial from (seed, trial number).

    A seeded sampler otherwise restarts its draws in every process: a resumed sweep's first new
    trial drew trial 0's values again, and processes started together on one study drew the same
    values as each other. Seeded by trial number, each trial draws its own values, the same ones
    whichever process or worker samples it, and a fresh study stays reproducible. (Optuna keeps the
    generators in `_rng` attributes of the sampler and of the random sampler it falls back to.)"""
    from lora_exp.core.lowbias32 import mix_int

    rngs = [getattr(obj, "_rng", None) for obj in (sampler, getattr(sampler, "_random_sampler", None),
                                                    getattr(sampler, "_independent_sampler", None))]
    rngs = [r for r in rngs if r is not None and hasattr(r, "rng")]
    original = sampler.before_trial

    def before_trial(study: Any, trial: Any) -> None:
        for i, state in enumerate(rngs):
            state.rng.seed(mix_int(mix_int(seed) ^ (trial.number + 0x9E3779B1 * i)))
        original(study, trial)

    sampler.before_trial = before_trial


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


def retry_stale(max_retry: int) -> dict[str, Any]:
    """RDBStorage's argument for Optuna's callback that re-queues a trial whose heartbeat went
    stale, with its parameters: `heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback`
    from Optuna 4.9, `failed_trial_callback=RetryFailedTrialCallback` before (deprecated since)."""
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    # the retry carries its predecessor's reports: it resumes at the last eval (sweep.checkpoints)
    if cls is None:
        return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(
            max_retry=max_retry, inherit_intermediate_values=True)}
    return {"heartbeat_stale_trial_callback": cls(max_retry=max_retry, inherit_intermediate_values=True)}


def rdb_storage(url: str, **kwargs: Any) -> Any:
    """Optuna's RDBStorage at `url`, opened under the store's "optuna-init" lock.

    Opening one on an empty database creates the tables and inserts the schema's version: two
    processes doing it at once (a sweep on a second machine, `lora-exp best`, a reader polling for
    the study) collide on `alembic_version` ("duplicate key value"). Every opener takes the lock."""
    import optuna

    with store_lock(url, "optuna-init"):
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url), **kwargs)


def open_study(plan_or_spec: SweepSpec, storage_url: str, study_name: str, create: bool) -> Any:
    """The study, through a storage that records heartbeats. With `create`: (study, whether this
    process created it); the creator opens the sweep's parent run."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = plan_or_spec
    try:
        # processes that start together take turns: the first creates the tables (the storage's
        # migrations) and the study, the others find them
        with store_lock(storage_url, "optuna-init"), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, retries
            sqlite_wal(storage_url)
            storage = optuna.storages.RDBStorage(  # rdb_storage's lock, held on to create the study
                storage_url, engine_kwargs=engine_kwargs(storage_url),
                heartbeat_interval=int(max(1, spec.heartbeat)), grace_period=int(max(2, spec.grace)),
                **retry_stale(max_retry=RETRIES))
            if create:
                try:
                    return optuna.create_study(study_name=study_name, storage=storage, load_if_exists=False,
                                               directions=spec.directions, sampler=make_sampler(spec),
                                               pruner=make_pruner(spec)), True
                except optuna.exceptions.DuplicatedStudyError:
                    return optuna.load_study(study_name=study_name, storage=storage, sampler=make_sampler(spec),
                                             pruner=make_pruner(spec)), False
            return optuna.load_study(study_name=study_name, storage=storage, sampler=make_sampler(spec),
                                     pruner=make_pruner(spec))
    except LoraExpError:
        raise
    except Exception as exc:  # SQLAlchemy / driver errors: unreachable or wrong URL
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"storage: cannot open {redact_uri(storage_url)}: {first[:300]}") from exc


def engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return {"connect_args": {"timeout": 60}}  # several workers write one file
    if url.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    return {}


def stored_trials(study: Any, states: tuple[Any, ...]) -> list[Any]:
    """The study's trials in `states`, read with the states filter in the database query.

    `study.get_trials` goes through Optuna's cache, which re-reads every unfinished trial (params,
    attributes, intermediate values) at each call: with a thousand trials in flight, ~0.5 s, even
    to learn that none is WAITING. Asked every packed step, that made the step 6x slower. (Trials
    read this way are not registered with that cache: claim through `study.get_trials`.)"""
    backend = database(study)
    if backend is None:  # not a database (in-memory, journal): the cache is cheap
        return study.get_trials(deepcopy=False, states=states)
    return backend.get_all_trials(study._study_id, deepcopy=False, states=states)


def database(study: Any) -> Any:
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

        backend = database(self._study)
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


def top_up(study: Any, n_trials: int, storage_url: str) -> int:
    """Enqueue WAITING trials until the study holds n_trials live ones; returns how many were added.
    Under the study's lock: processes starting together count and add in turn, so the study ends
    with n_trials, not n_trials per process."""
    from optuna.trial import TrialState

    with store_lock(storage_url, f"top-up:{study.study_name}"):
        live = len(stored_trials(study, tuple(TrialState[s] for s in LIVE)))  # as the database holds them now
        for _ in range(max(0, n_trials - live)):
            study.enqueue_trial({}, skip_if_exists=False)
    return max(0, n_trials - live)


def load_base_cache(study: Any, base: Any) -> None:
    """Base-model eval loss and generations are the same for every trial: computed once per study."""
    prefix = _cache_prefix(base)
    for key, value in study.user_attrs.items():
        if key.startswith(prefix):
            base.cache.setdefault(_tuplify(json.loads(key[len(prefix):])), value)


def _tuplify(value: Any) -> Any:
    """JSON turns the cache keys' tuples into lists: turn them back (keys must be hashable)."""
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def save_base_cache(study: Any, base: Any) -> None:
    prefix = _cache_prefix(base)
    existing = set(study.user_attrs)
    for key, value in base.cache.items():
        name = prefix + json.dumps(list(key))
        if name not in existing:
            study.set_user_attr(name, value)


def _cache_prefix(base: Any) -> str:
    return "base:" + hashlib.sha1(repr(base.config).encode()).hexdigest()[:8] + ":"
