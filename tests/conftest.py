"""Shared fixtures: every test runs in its own folder with its own MLflow store; no network."""
from __future__ import annotations

import os

import pytest

# Before anything imports torch: one intra-op thread in this process and in every process a test
# starts (they inherit it). The tests train tiny models, whose ops are too small to split, in
# several processes at once (`make test` runs two pytest workers); a second OpenMP thread per
# process only spins on the cores the others need (docs/benchmarks.md, the `make test` row).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from helpers import CONF  # noqa: E402

os.environ["LORA_EXP_CONFIG_DIR"] = str(CONF)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh folder: ./mlruns (sqlite + artifacts) lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def store_template(tmp_path_factory):
    """An empty MLflow store with its tables made (MLflow's migrations take ~1.5 s a store)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(workdir, store_template):
    """The tracking URI of this test's own MLflow store, at the default place (./mlruns), made
    from the template: what lora-exp makes there on first use, without the migrations each time.
    (Tests of a store's creation take `workdir` alone.)"""
    import shutil

    (workdir / "mlruns").mkdir(exist_ok=True)
    shutil.copy(store_template, workdir / "mlruns" / "mlflow.db")
    return f"sqlite:///{workdir}/mlruns/mlflow.db"


@pytest.fixture
def postgres_db():
    """Makes fresh databases on the PostgreSQL server that .ci/run starts (LORA_EXP_TEST_POSTGRES_URL);
    drops them after the test."""
    import uuid

    import sqlalchemy

    admin_url = os.environ.get("LORA_EXP_TEST_POSTGRES_URL")
    if not admin_url:
        if os.environ.get("CI"):
            pytest.fail("CI must provide LORA_EXP_TEST_POSTGRES_URL (.ci/run starts PostgreSQL)")
        pytest.skip("no PostgreSQL server: set LORA_EXP_TEST_POSTGRES_URL (as .ci/run does)")
    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    made = []

    def make() -> str:
        name = f"loraexp_{uuid.uuid4().hex[:10]}"
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return admin_url.rsplit("/", 1)[0] + "/" + name

    yield make
    # the test's own leftover connections ended, then a plain DROP, which stops an autovacuum
    # worker busy in the database itself (WITH (FORCE) refuses to: its role is not ours)
    with engine.connect() as conn:
        for name in made:
            conn.execute(sqlalchemy.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                         "WHERE datname = :name AND usename = current_user"), {"name": name})
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
    engine.dispose()


@pytest.fixture
def postgres_url(postgres_db):
    """A fresh database on the test PostgreSQL server."""
    return postgres_db()


@pytest.fixture
def postgres_url_2(postgres_db):
    """Another one (MLflow and Optuna each need a database of their own: both keep alembic_version)."""
    return postgres_db()
