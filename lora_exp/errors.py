"""Errors a user can act on: the CLI prints their one-line message and exits with `exit_code`."""


class LoraExpError(Exception):
    """A failure with a message meant for the user, not a traceback."""

    exit_code = 1


class ConfigError(LoraExpError):
    """Bad input: a wrong override, an impossible value, a missing file, an empty dataset."""

    exit_code = 2


class ModelLoadError(LoraExpError):
    """The base model or tokenizer could not be loaded (e.g. the hub is unreachable)."""

    exit_code = 1


def check(ok: bool, key: str, message: str) -> None:
    """A config check: ConfigError `key: message` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {message}")
