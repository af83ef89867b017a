"""Claiming WAITING trials: the WAITING -> RUNNING change is a compare-and-set in the storage
(under a lock file on sqlite), so no two workers, processes or machines run the same trial, and
no worker runs a trial beyond the study's budget (Optuna's `ask` would create one)."""
from __future__ import annotations

import contextlib
from typing import Any

from lora_exp.sweep.storage import TrialReader, stored_trials


def claim_waiting_trial(study: Any, storage_url: str) -> Any:
    """Take one WAITING trial (RUNNING from now on), or None when the queue is empty.

    What `study.ask()` does first, without its fallback of creating a new trial when the queue
    is empty: that fallback would let a worker run a trial beyond the budget. The WAITING ->
    RUNNING change is a compare-and-set in the storage, so two workers never get the same trial.
    """
    claimed = claim_waiting_trials(study, storage_url, 1)
    return claimed[0] if claimed else None


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

