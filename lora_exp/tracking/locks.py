"""One process at a time where stores are created or topped up: N processes (or machines) that
start a sweep at the same moment must not each run the store's migrations, nor each add trials.

sqlite: a lock file beside the database file (sqlite is one machine's). PostgreSQL: an advisory
lock of the database, held on a connection of its own. An HTTP tracking server serialises itself."""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator


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
