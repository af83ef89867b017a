"""A sweep trial's checkpoint, kept with its MLflow run (`checkpoint/state.pt`), so that when a
killed worker's trial is retried (same parameters, by Optuna's heartbeat callback), the retry
resumes at its predecessor's last eval on any machine that reaches the tracking store. A trial
that finishes drops its checkpoint."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from lora_exp.core.recording import Tracker

log = logging.getLogger("lora_exp")

FOLDER, FILE = "checkpoint", "state.pt"


class RunCheckpoint:
    """Saves into this trial's run; loads from the run of the trial it retries (if any)."""

    def __init__(self, tracker: Tracker, resume_from: str | None):
        self.tracker, self.resume_from = tracker, resume_from
        self.saved = False

    def load(self) -> dict[str, Any] | None:
        if self.resume_from is None or getattr(self.tracker, "client", None) is None:
            return None

        state = download_checkpoint(self.tracker.client, self.resume_from)  # type: ignore[attr-defined]
        if state is None or state.get("format") is not None:  # none yet, or a packed slot's
            return None
        log.info("resuming run %s's trial at step %d", self.resume_from, state["step"])
        return state

    def save(self, state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="lora-exp-checkpoint-") as tmp:
            torch.save(state, Path(tmp) / FILE)
            self.tracker.log_dir(tmp, FOLDER)
        self.saved = True

    def drop(self) -> None:
        """The trial finished: its checkpoint is no longer needed (best effort)."""
        if self.saved:
            drop_checkpoint(self.tracker)


def drop_checkpoint(tracker: Tracker) -> None:
    """Remove a finished trial's checkpoint from its run (best effort: a left-over checkpoint
    costs disk, not correctness)."""
    delete = getattr(tracker, "delete_artifacts", None)
    if delete is None:
        return
    try:
        delete(FOLDER)
    except Exception as exc:  # noqa: BLE001
        log.debug("checkpoint not removed: %s", exc)


def download_checkpoint(client: Any, run_id: str) -> dict[str, Any] | None:
    """The checkpoint kept with run `run_id`, or None if it has none (it died before its first
    save). Loaded as data only (`weights_only`): no pickled code runs."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="lora-exp-checkpoint-") as tmp:
        try:
            path = client.download_artifacts(run_id, f"{FOLDER}/{FILE}", tmp)
        except (MlflowException, OSError):
            return None
        return torch.load(path, map_location="cpu", weights_only=True)


def retried_run(study: Any, trial: Any) -> str | None:
    """The MLflow run of the trial `trial` retries (Optuna's retry copies the user attributes
    and records the trial it retries), or None for a first try."""
    frozen = study._storage.get_trial(trial._trial_id)
    if frozen.system_attrs.get("failed_trial") is None:
        return None
    return frozen.user_attrs.get("mlflow_run_id")
