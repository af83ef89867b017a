"""SIGTERM (or a second Ctrl-C) at the worst moments of a sweep: between claiming a trial and
running it, and while a finished trial is recorded. Real stores; the signal is real, sent by the
process to itself from inside the step it interrupts."""
from __future__ import annotations

import os
import signal

import pytest

from helpers import REPO, load_study, sweep_runs

os.environ["LORA_EXP_SWEEPS_DIR"] = str(REPO / "sweeps")


def _sigterm_inside(monkeypatch, module, name, when):
    """`module.name` runs as before, but sends this process SIGTERM at the end of the call `when` picks."""
    real = getattr(module, name)
    calls = []

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result)
        if when(calls, result):
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, at the next bytecode
        return result

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("moment", ["claimed, not started", "finished, being recorded"])
def test_sigterm_at_a_trials_edges_leaves_both_stores_agreeing_and_the_parent_closed(workdir, store, monkeypatch,
                                                                                    moment):
    """A claimed trial that had not started fails at once as `interrupted` (it would have stayed
    RUNNING for the heartbeat's grace period, counted as running elsewhere, so the parent run
    stayed RUNNING too); a finished trial being recorded is recorded in both stores first."""
    from lora_exp.sweep import outcome, worker
    from lora_exp.sweep.command import cmd_sweep

    if moment == "claimed, not started":  # the second claim
        _sigterm_inside(monkeypatch, worker, "claim_waiting_trial", lambda calls, got: len(calls) == 2)
    else:  # the first trial's run just closed FINISHED; Optuna not yet told
        _sigterm_inside(monkeypatch, outcome, "close_run", lambda calls, got: len(calls) == 1)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        cmd_sweep(["sweep=tiny", "n_trials=3", "trainer.max_steps=4", "trainer.eval_steps=2"])
    assert signal.getsignal(signal.SIGTERM) is handler
    trials = load_study(f"sqlite:///{workdir}/mlruns/optuna.db").trials
    states = {t.number: t.state.name for t in trials}
    _, parents, children = sweep_runs(store)
    assert parents[0].info.status == "KILLED" and parents[0].data.tags["sweep_state"] == "stopped"
    assert not [r for r in children if r.info.status == "RUNNING"]
    assert "RUNNING" not in states.values(), states
    if moment == "claimed, not started":
        assert states[0] in ("COMPLETE", "PRUNED") and states[1] == "FAIL", states
        assert trials[1].user_attrs["failure"] == "interrupted"
    else:
        assert states[0] in ("COMPLETE", "PRUNED"), states
        run = next(r for r in children if r.info.run_id == trials[0].user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert len(children) == 1, "the sweep stopped after the trial it was recording"
