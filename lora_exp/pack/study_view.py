"""What a pack's pruner sees: the study read once per batch of evals, not once per trial, and the
trials the pack itself finished as soon as they finish.

`Trial.should_prune` reads every trial of the study from the storage; with a thousand trials in
flight that is ~0.1-0.3 s per call, per trial, per eval. Here the study is read once per batch of
evals (at most every few seconds) and each trial's own intermediate values come from memory; the
reports go to the storage through the tracking process, in order. That process records a trial
once it has closed its run, seconds after the pack finished it (of a wave of 128 trials finishing
at once on an H100, 60 were recorded 15 s later), while a fast step has the next wave at its
first eval in ~2 s: read from the storage alone, a median pruner found almost no finished trial
there and pruned none of 256. So the view adds the trials the pack finished that the storage does
not show yet."""
from __future__ import annotations

import time
from typing import Any

from lora_exp.core.status import TrialStatus
from lora_exp.sweep.storage import TrialReader


class StudyView:
    """The study as one read of its trials: what a pruner sees for a whole batch of evals.

    `Trial.should_prune` reads every trial of the study from the storage; with a thousand trials
    in flight that is ~0.1-0.3 s per call, per trial, per eval. Here the study is read once per
    batch of evals and each trial's own intermediate values come from memory."""

    def __init__(self, study: Any, every: float = 0.0):
        self._study = study
        self._reader = TrialReader(study)  # each finished trial loaded once
        self._trials: list[Any] = []
        #: trials this pack finished (completed or pruned) that the last read did not show finished
        self._ended: dict[int, Any] = {}
        self.every = every
        self._read = -float("inf")

    def refresh(self) -> None:
        """Read the study again, unless it was read less than `every` seconds ago: once trials
        run out of step some slot evaluates at almost every step, and each read loads every
        finished trial (thousands, in a long packed search)."""
        from optuna.trial import TrialState

        if time.monotonic() - self._read < self.every:
            return
        self._trials = self._reader.read((TrialState.COMPLETE, TrialState.PRUNED))
        self._read = time.monotonic()
        stored = {t.number for t in self._trials}
        self._ended = {n: t for n, t in self._ended.items() if n not in stored}

    def ended(self, trial: Any) -> None:
        """A trial of this pack finished (a FrozenTrial, COMPLETE or PRUNED): the pruner counts it
        from now on, until a read of the storage shows it."""
        self._ended[trial.number] = trial

    def forget(self, numbers: list[int]) -> None:
        """Trials the tracking process failed (their run could not be closed): not finished after all."""
        for number in numbers:
            self._ended.pop(number, None)

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[Any]:
        return [t for t in [*self._trials, *self._ended.values()] if states is None or t.state in states]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class PackPruning:
    """Reports each eval to Optuna (through the tracking process, in order) and asks the study's
    pruner with the batch's view of the study: the decision `Trial.should_prune` makes."""

    def __init__(self, trial: Any, metric: str, view: StudyView, io: Any):
        self.trial, self.metric, self.view, self.io = trial, metric, view, io
        self.values: dict[int, float] = {}

    def on_eval(self, step: int, metrics: dict[str, float]) -> bool:
        from optuna.trial import TrialState

        if self.metric not in metrics:
            return False
        value = metrics[self.metric]
        self.io.submit("report", self.trial.number, self.trial._trial_id, step, value)
        self.values[step] = value
        # the study's pruner, through the view
        return bool(self.view.pruner.prune(self.view, self._frozen(TrialState.RUNNING)))

    def closed(self, status: TrialStatus, value: float | None) -> None:
        """The trial ended: a completed one with its objective, a pruned one with its last eval (as
        Optuna records it) are in the view from now on; a failed one is not."""
        from optuna.trial import TrialState

        if status is TrialStatus.COMPLETE and value is not None:
            self.view.ended(self._frozen(TrialState.COMPLETE, value))
        elif status is TrialStatus.PRUNED:
            last = self.values[max(self.values)] if self.values else None
            self.view.ended(self._frozen(TrialState.PRUNED, last))

    def _frozen(self, state: Any, value: float | None = None) -> Any:
        from optuna.trial import FrozenTrial

        t = self.trial
        return FrozenTrial(number=t.number, state=state, value=value, datetime_start=None, datetime_complete=None,
                           params=t.params, distributions=t.distributions, user_attrs={}, system_attrs={},
                           intermediate_values=dict(self.values), trial_id=t._trial_id)

