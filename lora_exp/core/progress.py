"""Progress of one trial: a bar on a terminal, plain log lines elsewhere (CI, a file)."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("lora_exp.training")


class StepProgress:
    """A tqdm bar over optimizer steps on a terminal; elsewhere a log line every ~10% of the steps."""

    def __init__(self, total: int):
        self.total = total
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 10)
        self.start = time.perf_counter()
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=False)

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=True)
        elif step % self.every == 0 or step == self.total:
            log.info("step %d/%d  train_loss %.4f", step, self.total, loss)

    def note(self, step: int, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"step {step}/{self.total}  {text}")
        else:
            log.info("step %d/%d  %s", step, self.total, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
