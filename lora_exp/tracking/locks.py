"""One process at a time where stores are created or topped up: N processes (or machines) that
start a sweep at the same moment must not each run the store's migrations, nor each add trials.

sqlite: a lock file beside the database file (sqlite is one machine's). PostgreSQL: an advisory
lock of the database, held on a connection of its own. An HTTP tracking server serialises itself.

And many processes writing one sqlite store at once (a pack's tracking processes, its sampler,
workers): `sqlite_wal`."""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Iterator

#: the sqlite files (absolute paths) whose connections `sqlite_wal` sets up in this process
_WAL_FILES: set[str] = set()


def sqlite_wal(url: str) -> None:
    """Write-ahead logging on the sqlite store at `url` (MLflow's or Optuna's), which this process
    is about to write (a reader leaves a store's mode alone), for every connection it opens to
    it from now on: readers no longer wait for a writer, and a
    commit no longer syncs a rollback journal and the database file several times
    (`synchronous=NORMAL`: the store stays consistent; a power cut may lose the last commits).
    Recording a packed trial synced the disk ~36 times in SQLite's default journal mode, and less
    than once in this one (bench/tracking_rate.py under strace). Other URLs: nothing to do."""
    if not url.startswith("sqlite:///"):
        return
    if not _WAL_FILES:
        import atexit

        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        # every engine's connections (MLflow makes its own engine), each checked against the files here
        event.listen(Engine, "connect", _wal_pragmas)
        atexit.register(_checkpoint)
    path = Path(url[len("sqlite:///"):]).expanduser().resolve()
    if str(path) in _WAL_FILES:
        return
    _WAL_FILES.add(str(path))
    if path.is_file():  # connections this process opened before (a reader's) follow the file's mode
        _pragmas(path, "PRAGMA journal_mode=WAL")


def _checkpoint() -> None:
    """At exit, the write-ahead log moved into the database file: the command ends with
    `os._exit`, which closes no connection, so SQLite would leave the last commits in `-wal`
    (safe, but lost to whoever copies the database file alone)."""
    for path in _WAL_FILES:
        _pragmas(Path(path), "PRAGMA wal_checkpoint(TRUNCATE)")


def _pragmas(path: Path, *statements: str) -> None:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
            for statement in statements:
                db.execute(statement).fetchall()
    except sqlite3.Error:  # busy, or gone: the next connection (or exit) does it
        pass


def _wal_pragmas(dbapi_connection: Any, record: Any) -> None:
    import sqlite3

    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    cursor = dbapi_connection.cursor()
    try:
        row = cursor.execute("PRAGMA database_list").fetchone()  # (seq, name, file) of "main"
        if row is None or not row[2] or str(Path(row[2]).resolve()) not in _WAL_FILES:
            return
        cursor.execute("PRAGMA journal_mode=WAL")  # kept in the file: a no-op once set
        cursor.execute("PRAGMA synchronous=NORMAL")  # this connection's
    except sqlite3.OperationalError:  # locked by a writer just now: the next connection sets it
        pass
    finally:
        cursor.close()


@contextlib.contextmanager
def store_lock(url: str, name: str) -> Iterator[None]:
    """Hold the lock `name` of the store at `url` for the block."""
    if url.startswith("sqlite:///"):
        import fcntl

        path = Path(url[len("sqlite:///"):]).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{path}.{name.replace('/', '_').replace(':', '_')}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif url.startswith("postgresql"):
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        key = int.from_bytes(hashlib.sha1(f"lora-exp:{name}".encode()).digest()[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 10})
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
    else:
        yield
