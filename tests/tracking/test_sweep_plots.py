"""The parent run's plots as a sweep goes: none of Optuna's before a trial completes (it would draw
empty axes and print "There are no complete trials" into the sweep's output), all of them after."""
from __future__ import annotations

import logging

import optuna
import pytest

from lora_exp.config import TrackingConfig
from lora_exp.tracking.parent import SweepRecord
from lora_exp.tracking.store import connect
from lora_exp.tracking.sweep_plots import log_plots


def _trial(study: optuna.Study, state: optuna.trial.TrialState, value: float | None, r: int, lr: float) -> None:
    study.add_trial(optuna.trial.create_trial(
        state=state, value=value, params={"lora.r": r, "trainer.lr": lr},
        distributions={"lora.r": optuna.distributions.CategoricalDistribution([4, 8, 16]),
                       "trainer.lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)},
        user_attrs={"loss_curve": [[1, 3.0], [2, 2.5]], "compute_s": 2.0},
        intermediate_values={1: 3.0}))


@pytest.fixture
def optuna_warnings(caplog):
    optuna.logging.enable_propagation()  # Optuna's own handler writes to the stderr of import time
    caplog.set_level(logging.WARNING, logger="optuna")
    yield caplog
    optuna.logging.disable_propagation()


def test_plots_of_a_sweep_before_and_after_its_first_completed_trial(tmp_path, optuna_warnings):
    client, experiment_id = connect(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="plots"))
    record = SweepRecord("plots", TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"), (("eval_loss", "minimize"),),
                         n_trials=4, base_overrides=(), n_searched=2,
                         run_id=client.create_run(experiment_id).info.run_id)
    study = optuna.create_study(direction="minimize")

    def plots() -> set[str]:
        return {f.path for f in client.list_artifacts(record.run_id, "plots")}

    _trial(study, optuna.trial.TrialState.PRUNED, None, 4, 1e-4)
    log_plots(client, record, study, study.get_trials())
    assert plots() == {"plots/loss_curves.png"}
    assert not [r for r in optuna_warnings.records if r.name.startswith("optuna")]

    _trial(study, optuna.trial.TrialState.COMPLETE, 2.0, 8, 1e-3)
    _trial(study, optuna.trial.TrialState.COMPLETE, 2.4, 16, 3e-3)
    log_plots(client, record, study, study.get_trials())
    assert plots() == {"plots/loss_curves.png", "plots/optimization_history.png", "plots/parallel_coordinate.png",
                       "plots/param_importances.png", "plots/best_per_compute_hour.png"}
