"""What a pack's pruner sees: the study read once per batch of evals, not once per trial.

`Trial.should_prune` reads every trial of the study from the storage; with a thousand trials in
flight that is ~0.1-0.3 s per call, per trial, per eval. Here the study is read once per batch of
evals (at most every few seconds) and each trial's own intermediate values come from memory; the
reports go to the storage through the tracking process, in order."""
from __future__ import annotations

import time
from typing import Any

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

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[Any]:
        return [t for t in self._trials if states is None or t.state in states]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class PackPruning:
    """Reports each eval to Optuna (through the tracking process, in order) and asks the study's
    pruner with the batch's view of the study: the decision `Trial.should_prune` makes."""

    def __init__(self, trial: Any, metric: str, view: StudyView, io: Any):
        self.trial, self.metric, self.view, self.io = trial, metric, view, io
        self.values: dict[int, float] = {}

    def on_eval(self, step: int, metrics: dict[str, float]) -> bool:
        from optuna.trial import FrozenTrial, TrialState

        if self.metric not in metrics:
            return False
        value = metrics[self.metric]
        self.io.submit("report", self.trial.number, self.trial._trial_id, step, value)
        self.values[step] = value
        t = self.trial
        frozen = FrozenTrial(number=t.number, state=TrialState.RUNNING, value=None, datetime_start=None,
                             datetime_complete=None, params=t.params, distributions=t.distributions, user_attrs={},
                             system_attrs={}, intermediate_values=dict(self.values), trial_id=t._trial_id)
        return bool(self.view.pruner.prune(self.view, frozen))  # the study's pruner, through the view

