"""Timing ways of doing one thing alternately, so a GPU's clock and heat move them alike."""
from __future__ import annotations

import time
from typing import Callable


def alternately(ways: dict[str, Callable[[], object]], rounds: int, repeat: int,
                sync: Callable[[], None]) -> dict[str, list[float]]:
    """Each way's ms a call, one figure a round: every round times each way over `repeat` calls in
    turn, `sync` (the device's synchronize) before and after each."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            sync()
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / repeat * 1e3)
    return times
