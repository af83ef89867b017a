"""Shared fixtures: every test runs in its own folder with its own MLflow store; no network."""
from __future__ import annotations

import os

import pytest
from helpers import CONF

os.environ["LORA_EXP_CONFIG_DIR"] = str(CONF)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh folder: ./mlruns (sqlite + artifacts) lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def store(workdir):
    """The tracking URI of this test's own MLflow store."""
    return f"sqlite:///{workdir}/mlruns/mlflow.db"


@pytest.fixture
def postgres_url():
    """A fresh database on the PostgreSQL server that .ci/run starts (LORA_EXP_TEST_POSTGRES_URL)."""
    import uuid

    import sqlalchemy

    admin_url = os.environ.get("LORA_EXP_TEST_POSTGRES_URL")
    if not admin_url:
        if os.environ.get("CI"):
            pytest.fail("CI must provide LORA_EXP_TEST_POSTGRES_URL (.ci/run starts PostgreSQL)")
        pytest.skip("no PostgreSQL server: set LORA_EXP_TEST_POSTGRES_URL (as .ci/run does)")
    name = f"loraexp_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    yield url
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()
