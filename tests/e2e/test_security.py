"""Loopback by default, no remote code by default, recorded configs are data."""
from __future__ import annotations

import subprocess

import pytest

from lora_exp.compose import compose, from_container
from lora_exp.errors import ConfigError

from helpers import CONF, REPO, run_cli


@pytest.mark.parametrize("target", ["ui", "server", "dashboard"])
def test_ui_and_server_bind_loopback_unless_told(target):
    plan = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True).stdout
    assert "--host 127.0.0.1" in plan
    plan = subprocess.run(["make", "-n", target, "HOST=0.0.0.0"], cwd=REPO, capture_output=True, text=True).stdout
    assert "--host 0.0.0.0" in plan


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_trust_remote_code_is_off(model):
    assert compose([f"model={model}", "lora.preset=null"]).model.trust_remote_code is False


def test_a_recorded_config_names_nothing_to_instantiate():
    raw = compose(["model=tiny_gpt2"]).to_dict()
    raw["model"]["_target_"] = "os.system"
    with pytest.raises(ConfigError, match="_target_"):
        from_container(raw)


def test_rerun_of_a_run_with_a_hostile_config_is_refused(workdir, store):
    from mlflow.tracking import MlflowClient

    from lora_exp.config import TrackingConfig
    from lora_exp.tracking.store import connect

    client, exp = connect(TrackingConfig(uri=store))
    run = client.create_run(exp).info.run_id
    client.log_text(run, "model: !!python/object/apply:os.system ['touch pwned']\n", "config.yaml")
    client.set_terminated(run)
    proc = run_cli("rerun", run, cwd=workdir)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr
    assert not (workdir / "pwned").exists()
    assert isinstance(client, MlflowClient)
