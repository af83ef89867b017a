"""What every run is tagged with (git commit, package versions, Python, the command), and the
redaction of secrets: no password in a URL reaches a param, tag, artifact or log line."""
from __future__ import annotations

import contextlib
import platform
import re
import subprocess
import sys
from importlib import metadata
from urllib.parse import urlsplit, urlunsplit

from lora_exp.config import PACKAGE_DIR

PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "hydra-core", "optuna", "mlflow",
            "lora-exp")

_SECRET_IN_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")


def redact_text(text: str) -> str:
    """Replace the password of every URL in `text` (a command line, an override list, a YAML dump)."""
    return _SECRET_IN_URL.sub(r"\1***@", text)


def redact_uri(uri: str) -> str:
    """Drop the password from a URL (postgresql://user:pw@host/db -> postgresql://user:***@host/db)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def provenance() -> dict[str, str]:
    """Git commit, package versions, Python and platform: logged as tags on every run."""
    tags = {"python": platform.python_version(), "platform": platform.platform(terse=True),
            "command": redact_text(" ".join(["lora-exp"] + sys.argv[1:]))
            if sys.argv and sys.argv[0].endswith("lora-exp") else ""}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"version.{name}"] = metadata.version(name)
    repo = PACKAGE_DIR.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(bool(dirty)).lower()
    return {k: v for k, v in tags.items() if v}
