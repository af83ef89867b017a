"""Opening the study storage from several processes at once, on a database nobody has used yet."""
import multiprocessing
import time


def _open(url: str, start: float) -> str:
    from lora_exp.sweep.storage import rdb_storage

    while time.time() < start:  # all four reach the empty database together
        time.sleep(0.001)
    try:
        rdb_storage(url)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - the test reports what each process met
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def test_processes_that_open_an_empty_postgresql_storage_together_all_succeed(postgres_db):
    """Each opener of an empty database creates the tables and inserts the schema's version; without
    the store's lock two of them collide on `alembic_version` (a second machine starting its sweep,
    `lora-exp best`, anything polling for the study). Three empty databases, four processes each."""
    import optuna  # noqa: F401 - imported before the fork, as a sweep's processes have it

    import lora_exp.sweep.storage  # noqa: F401

    with multiprocessing.get_context("fork").Pool(4) as pool:
        for _ in range(3):
            url = postgres_db()
            results = pool.starmap(_open, [(url, time.time() + 1.0)] * 4)
            assert results == ["ok"] * 4, results
