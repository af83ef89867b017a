"""Progress of one trial: a bar on a terminal (one per worker), plain log lines every ~10 s
elsewhere (CI, a file, a pipe)."""
from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("lora_exp.progress")

#: a plain progress line at most this often (and at the first and last step)
EVERY_S = 10.0


class StepProgress:
    """Steps, train loss and elapsed time of one trial: a tqdm bar on a terminal, else a log line
    at the first step, every ~10 s and at the last. `label` names the trial ("trial 3"); a worker
    process's bar sits on its own line (`position`)."""

    def __init__(self, total: int, label: str = "", position: int | None = None):
        self.total, self.label = total, label
        self.start = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty() and not os.environ.get("LORA_EXP_NO_BAR"):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=False, desc=label or None,
                            position=position)

    def update(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=True)
        elif step == 1 or step == self.total or now - self.last >= EVERY_S:
            self.last = now
            log.info("%sstep %d/%d  train_loss %.4f  (%.0fs)", self._prefix(), step, self.total, loss, now - self.start)

    def note(self, step: int, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"{self._prefix()}step {step}/{self.total}  {text}")
        else:
            log.info("%sstep %d/%d  %s", self._prefix(), step, self.total, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _prefix(self) -> str:
        return f"{self.label}: " if self.label else ""
