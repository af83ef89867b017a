"""A packed sweep's ETA: its trials end in waves, so the rate of finished trials (the unpacked
sweep's ETA) would say hours when a wave of a hundred trials is seconds from its end. The pack
estimates from the trial-steps left at the trial-steps a second it ran."""
from __future__ import annotations

import numpy as np

from lora_exp.pack import worker
from lora_exp.pack.slots import SlotTable
from lora_exp.sweep.report import progress_text


class Pack:
    """What `Eta` reads of a pack: its trial-steps so far and its slots (a real `SlotTable`)."""

    def __init__(self, k: int):
        self.table = SlotTable(k, eval_steps=10, evaluates=True)
        self.trial_steps = 0

    def steps_left(self) -> tuple[int, int]:
        return self.table.steps_left()


def test_the_estimate_is_the_trial_steps_left_at_the_rate_the_pack_ran(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(worker.time, "perf_counter", lambda: clock[0])
    pack = Pack(4)
    pack.table.runs = ["trial"] * 3 + [None]  # three live, one slot free
    pack.table.steps_total[:] = [40, 40, 40, 0]
    eta = worker.Eta()
    assert eta.update(pack, pending=5) is None  # after the first step (which compiled): the mark
    clock[0] += 10.0
    pack.trial_steps += 60  # 6 trial-steps a second
    pack.table.host_step[:] = [20, 20, 20, 0]
    # 3 x 20 steps left, and 5 trials of 40 steps not started: 260 trial-steps, 43.3 s
    assert abs(eta.update(pack, pending=5) - 260 / 6) < 1e-9
    # the wave ends: no trial live; the 5 to start keep the last trials' length
    clock[0] += 5.0
    pack.trial_steps += 60
    pack.table.runs = [None] * 4
    assert abs(eta.update(pack, pending=5) - 200 / (120 / 15)) < 1e-9
    # a new pack (another group of settings) is measured afresh, its compiling left out
    assert eta.update(Pack(2), pending=5) is None


def test_a_workers_share_of_the_trials_left():
    from types import SimpleNamespace

    plan = SimpleNamespace(n_trials=300, done_at_start=44, workers=1)
    assert worker.share_left(plan, 0) == 256 and worker.share_left(plan, 100) == 156
    plan.workers = 3  # 256 over 3 workers: 86 each at most
    assert worker.share_left(plan, 0) == 86 and worker.share_left(plan, 80) == 6
    assert worker.share_left(plan, 90) == 0  # a fast worker finished more than its share


def test_slot_table_steps_left_counts_live_slots_only():
    table = SlotTable(3, eval_steps=None, evaluates=False)
    assert table.steps_left() == (0, 0)
    table.runs = ["a", None, "b"]
    table.steps_total[:] = np.array([30, 99, 50])
    table.host_step[:] = np.array([10, 99, 5])
    assert table.steps_left() == (20 + 45, 40)


def test_progress_takes_the_packs_estimate_and_keeps_the_commands_rate(monkeypatch):
    import time

    monkeypatch.setattr(time, "time", lambda: 1000.0)
    text = progress_text(done=1, done_at_start=0, n_trials=256, started=1000.0 - 65, eta_s=18.0)
    assert text == "elapsed 65s, ETA 18s, 55.4 trials/h"
    assert progress_text(1, 0, 256, 1000.0 - 65) == "elapsed 65s, ETA 4.6 h, 55.4 trials/h"
