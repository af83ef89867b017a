"""A sweep whose tracking store is down polls it until it answers: soon after it is back, never
hammering it."""
from __future__ import annotations

from lora_exp.config import TrackingConfig
from lora_exp.tracking import store


def test_a_store_that_is_down_is_polled_at_most_poll_max_s_apart(monkeypatch):
    answers = iter([False] * 8 + [True])
    slept: list[float] = []
    monkeypatch.setattr(store, "reachable", lambda cfg: next(answers))
    monkeypatch.setattr(store.time, "sleep", slept.append)
    assert store.wait_until_reachable(TrackingConfig(uri="http://127.0.0.1:1"), max_wait_s=600)
    assert slept == [1.0, 2.0, 4.0] + [store.POLL_MAX_S] * 5


def test_a_store_that_stays_down_is_given_up_at_the_deadline(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(store, "reachable", lambda cfg: False)
    monkeypatch.setattr(store.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(store.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    assert not store.wait_until_reachable(TrackingConfig(uri="http://127.0.0.1:1"), max_wait_s=30)
    assert now[0] == 30.0
