"""The command's log lines, in every process a command starts (the sweep's workers and tracking
processes too): lora-exp's own at INFO (WARNING with -q); the libraries' only from WARNING up,
unless -v (`LORA_EXP_VERBOSE`), so their INFO chatter (matplotlib's font cache, alembic's
migrations, httpx's requests) stays out of a sweep's output."""
from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(message)s"


def configure(fmt: str = FORMAT, quiet: bool = False) -> None:
    verbose = bool(os.environ.get("LORA_EXP_VERBOSE"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=fmt, datefmt="%H:%M:%S")
    logging.getLogger("lora_exp").setLevel(logging.WARNING if quiet else logging.INFO)
