"""A trial's progress in plain output: a line at the first step, at most every ~10 s, and at
the last; the eval notes as they come."""
from __future__ import annotations

import logging

from lora_exp.core import progress


def test_plain_progress_lines_every_ten_seconds(monkeypatch, caplog):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False)
    bar = progress.StepProgress(100, label="trial 7")
    caplog.set_level(logging.INFO, logger="lora_exp.progress")
    for step in range(1, 101):
        clock[0] += 0.5  # a step every half second: 50 s in all
        bar.update(step, 1.0 / step)
        if step == 40:
            bar.note(step, "eval_loss 0.5000")
    lines = [r.getMessage() for r in caplog.records]
    steps = [int(line.split("step ")[1].split("/")[0]) for line in lines if "train_loss" in line]
    assert steps[0] == 1 and steps[-1] == 100
    assert all(b - a <= 21 for a, b in zip(steps, steps[1:])), steps  # <= 10 s apart at 0.5 s a step
    assert len(steps) <= 8, "not every step"
    assert "trial 7: step 40/100  eval_loss 0.5000" in lines
    assert lines[0].startswith("trial 7: step 1/100  train_loss 1.0000  (0s)")
