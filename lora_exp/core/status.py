"""How a trial ended, and what that is called in each store.

One status type for every path that trains (one trial, a pack of trials) and every store that
records it: Optuna's trial state and MLflow's run status are properties of the status, never
strings mapped by hand at each call site."""
from __future__ import annotations

import enum
from typing import Any


class TrialStatus(enum.Enum):
    """COMPLETE: trained to its last step. PRUNED: stopped early by a callback (Optuna's pruner).
    FAIL: an error (a bad value, a non-finite loss, an interrupt, a store that went away)."""

    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAIL = "FAIL"

    @property
    def mlflow(self) -> str:
        """The MLflow run status a trial's run closes with."""
        return {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}[self.value]

    @property
    def optuna(self) -> Any:
        """Optuna's `TrialState` of the same name (imported only by the sweep that asks)."""
        from optuna.trial import TrialState

        return TrialState[self.value]

    @property
    def tags(self) -> dict[str, str]:
        """The tags a trial's run carries for it (`trial_state`, and `pruned` for a pruned one)."""
        return {"trial_state": self.value, **({"pruned": "true"} if self is TrialStatus.PRUNED else {})}
