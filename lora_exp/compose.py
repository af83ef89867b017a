"""Hydra composes `conf/` with a command line's overrides; `from_container` validates the result
(or a config read back from a run) into a `RunConfig`. Trial configs are built on a composed base
without recomposing (`replace_keys`)."""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

from lora_exp.config import GROUP_NAMES, PACKAGE_DIR, SECTIONS, RunConfig
from lora_exp.errors import ConfigError
from lora_exp.pack.settings import PACK_ATTENTION, PACK_COMPILE, PACK_ENV, PACK_LORA


def shipped_dir(name: str) -> Path:
    """A folder the package ships (`conf`, `sweeps`): inside the installed package, or at the top
    of the checkout (an editable install)."""
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name


def config_dir() -> Path:
    """The `conf/` Hydra composes: $LORA_EXP_CONFIG_DIR if set; else the shipped one, with the
    files of a `./conf` in the working folder laid over it (a user's own model, data or config.yaml
    adds to or replaces the shipped file of the same name)."""
    env = os.environ.get("LORA_EXP_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    shipped = shipped_dir("conf")
    local = Path.cwd() / "conf"
    if local.is_dir() and local.resolve() != shipped.resolve():
        return _overlay(shipped, local.resolve())
    return shipped


_OVERLAYS: dict[tuple[Path, Path, float], Path] = {}


def _overlay(shipped: Path, local: Path) -> Path:
    """A temporary copy of `shipped` with `local`'s YAML files copied over it (made once per
    process and content; removed at exit)."""
    import atexit
    import shutil
    import tempfile

    files = sorted(local.rglob("*.yaml"))
    key = (shipped, local, max((f.stat().st_mtime for f in files), default=0.0))
    if key not in _OVERLAYS:
        target = Path(tempfile.mkdtemp(prefix="lora-exp-conf-"))
        atexit.register(shutil.rmtree, target, ignore_errors=True)
        shutil.copytree(shipped, target, dirs_exist_ok=True)
        for f in files:
            dest = target / f.relative_to(local)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
        _OVERLAYS[key] = target
    return _OVERLAYS[key]


def config_options() -> dict[str, list[str]]:
    """Each config group and its options, as `config_dir()` holds them (for help texts)."""
    root = config_dir()
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(root.iterdir()) if d.is_dir()}


def env_overrides() -> list[str]:
    """`pack.*` overrides from the documented environment variables (LORA_EXP_PACK_*), so what
    they change is part of the composed config and recorded with every run."""
    allowed = {"compile": PACK_COMPILE, "lora": PACK_LORA, "attention": PACK_ATTENTION}
    out = []
    for var, key in PACK_ENV.items():
        value = os.environ.get(var, "").strip()
        if not value:
            continue
        if key == "kernel_constants":  # NAME=VALUE,...: one quoted value (checked with the config)
            out.append(f"pack.{key}='{value}'")
            continue
        value = value.lower()
        if key == "compile":
            value = {"0": "off", "1": "full"}.get(value, value)
        if key in allowed and value not in allowed[key]:
            raise ConfigError(f"{var}={value}: expected one of {', '.join(allowed[key])}")
        if key == "trackers" and not (value.isdigit() and int(value) >= 1):
            raise ConfigError(f"{var}={value}: expected a whole number >= 1")
        out.append(f"pack.{key}={value}")
    return out


def replace_keys(base: RunConfig, base_dict: dict[str, Any], overrides: list[str],
                 all_overrides: list[str]) -> RunConfig:
    """`section.key=value` overrides on an already composed config, without recomposing with
    Hydra (~60 ms a trial; a pack starts hundreds at once). Values are read by Hydra's own
    override parser (`1e-05` is a float, as compose reads it); each changed section is rebuilt
    through its dataclass, so the same value checks run. Anything else (a group swap, a nested
    key) goes through the full `from_container` validation."""
    changes: dict[str, dict[str, Any]] = {}
    for text in overrides:
        key, sep, _ = text.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in GROUP_NAMES or not name or "." in name:
            return from_container(_with(base_dict, overrides), all_overrides)
        changes.setdefault(section, {})[name] = override_value(text)
    built: dict[str, Any] = {}
    for section, values in changes.items():
        current = getattr(base, section)
        types = {f.name: f.type for f in dataclasses.fields(current)}
        unknown = [n for n in values if n not in types]
        if unknown:
            raise ConfigError(f"{section}.{unknown[0]}: no such config key")
        for name, value in values.items():
            if not _fits(str(types[name]), value):  # OmegaConf converts it, or says why not
                return from_container(_with(base_dict, overrides), all_overrides)
            if "float" in str(types[name]) and isinstance(value, int) and not isinstance(value, bool):
                values[name] = float(value)
        try:
            built[section] = dataclasses.replace(current, **values)
        except (TypeError, ValueError):  # a value of the wrong type: the schema's own message
            return from_container(_with(base_dict, overrides), all_overrides)
    return dataclasses.replace(base, **built, overrides=list(all_overrides))


_SCALARS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (float, int), "bool": (bool,), "str": (str,)}


def _fits(type_text: str, value: Any) -> bool:
    """Whether `value` is already what a field of this (annotation text) type holds: else the
    schema path converts it (`name=123` to a string) or rejects it (`r=1.5`), as compose does."""
    optional = type_text.startswith("Optional[")
    inner = type_text[len("Optional["):-1] if optional else type_text
    if value is None:
        return optional
    if inner not in _SCALARS:
        return True  # lists and dicts: the dataclass checks them
    return isinstance(value, _SCALARS[inner]) and (inner == "bool" or not isinstance(value, bool))


@functools.lru_cache(maxsize=1)
def _override_parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def override_value(override: str) -> Any:
    """An override's value as Hydra's compose reads it (`1e-05` a float, `null` None, `[a,b]` a
    list), so a trial's config is the same whichever way it is built."""
    try:
        parsed = _override_parser().parse_override(override)
    except Exception as exc:  # Hydra's parse errors: one line, as compose gives them
        raise ConfigError(f"{override}: {str(exc).splitlines()[0]}") from exc
    if parsed.is_sweep_override():
        raise ConfigError(f"{override}: a trial's override must be one value")
    return parsed.value()


def train_command(overrides: list[str] | tuple[str, ...]) -> str:
    """The `lora-exp train` command that trains what these overrides describe (a sweep's base, then
    a trial's own): each key once, at its last value (the one Hydra keeps), and without `pack.*`,
    which only says how a sweep packed its trials (a packed trial trains as it does alone); quoted
    where a shell would read a value otherwise (`[a,b]` is a glob, a mapping has spaces)."""
    import shlex

    kept: dict[str, str] = {}
    for text in overrides:
        key = text.partition("=")[0].lstrip("+~")
        if key == "pack" or key.startswith("pack."):
            continue
        kept.pop(key, None)  # the last value, where it came
        kept[key] = text
    return " ".join(["lora-exp train", *map(shlex.quote, kept.values())])


def _with(base_dict: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    import copy

    raw = copy.deepcopy(base_dict)
    for text in overrides:
        key, _, value = text.partition("=")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{key}: no such config key")
            node = node[part]
        node[parts[-1]] = override_value(text)
    raw.pop("overrides", None)
    return raw


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> RunConfig:
    """Compose conf/ with Hydra overrides and validate it into a RunConfig. The LORA_EXP_PACK_*
    environment variables come first, so an explicit override wins over them."""
    overrides = [*env_overrides(), *overrides]
    cfg = from_container(compose_raw(_open_mappings(overrides), config_name), overrides)
    check_local_folders(cfg)
    return cfg


def check_local_folders(cfg: RunConfig) -> None:
    """A model or tokenizer named by a local path (absolute, `./`, `../`, `~`) must be there: a
    missing one fails here, before anything is recorded, where transformers would read it as a
    hub id once the sweep had started. (Configs read back from runs are not checked: a folder
    gone since then does not hide its runs.)"""
    model = cfg.model
    for key, value in (("path", model.path if model.source == "hub" else None), ("tokenizer", model.tokenizer)):
        if value and value.startswith(("/", "./", "../", "~")) and not Path(value).expanduser().exists():
            raise ConfigError(f"model.{key}: no such folder: {value}")


#: config keys that are open mappings (transformers' config kwargs): their keys are set, added
#: or merged (`model.architecture={...}`, `model.architecture.rope_theta=5e5`), not refused as unknown
OPEN_MAPPINGS = ("model.architecture",)


def _open_mappings(overrides: list[str]) -> list[str]:
    return [f"++{o}" if o.split("=", 1)[0] in OPEN_MAPPINGS or o.startswith(tuple(f"{m}." for m in OPEN_MAPPINGS))
            else o for o in overrides]


def compose_raw(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> dict[str, Any]:
    """Hydra composition only: the resolved config as a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception as exc:  # Hydra and OmegaConf raise many types; all are bad input here
        raise ConfigError(_one_line(exc)) from exc
    finally:
        GlobalHydra.instance().clear()


def from_container(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate a plain dict (composed now, or read back from a run) against the schema.

    Types are checked by OmegaConf's structured configs; values by the dataclasses.
    The dict is data only: nothing named in it is imported or instantiated.
    """
    from omegaconf import OmegaConf

    unknown = sorted(set(raw) - set(SECTIONS) - {"overrides"})
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(unknown)}")
    raw = {"pack": {}, **raw}  # recorded before packs had a section: the defaults
    built = {}
    for name, schema_type in SECTIONS.items():
        if not isinstance(raw.get(name), dict):
            raise ConfigError(f"{name}: missing or not a mapping")
        try:
            schema = OmegaConf.structured(schema_type)
            OmegaConf.set_readonly(schema, False)  # frozen dataclasses make read-only nodes
            built[name] = OmegaConf.to_object(OmegaConf.merge(schema, raw[name]))
        except ConfigError:
            raise
        except Exception as exc:
            if isinstance(exc.__cause__, ConfigError):
                raise exc.__cause__ from exc
            raise ConfigError(f"{name}.{_one_line(exc)}" if getattr(exc, "full_key", None)
                              else f"{name}: {_one_line(exc)}") from exc
    return RunConfig(**built, overrides=list(overrides))


#: sweep options: a `train` command line that names one gets told where it belongs
SWEEP_OPTIONS = ("sweep", "n_trials", "workers", "storage", "study", "timeout", "pack")


def _one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf messages span lines (option lists, search paths, hints): fold them into
    one, keeping Hydra's own hint."""
    outer = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if outer and outer[0].startswith("Could not override"):
        key = outer[0].split("'")[1]
        hint = next((ln for ln in outer[1:] if ln.startswith("To append")), "")
        if key in SWEEP_OPTIONS:
            return f"{key}: not a config key but a sweep option (lora-exp sweep {key}=...)"
        near = _near_keys(key)
        return (f"{key}: no such config key" + (f" (did you mean {' or '.join(near)}?)" if near else "")
                + (f"; {hint[0].lower()}{hint[1:]}" if hint else ""))
    if outer and outer[0].startswith("Ambiguous value for argument"):
        text = outer[0].split("'")[1]
        key, _, value = text.partition("=")
        return (f"{text}: one value per key (a list is {key}=[{value}]); to try several values, search them: "
                f"lora-exp sweep, with {key} in the sweep file's space")
    inner = exc.__cause__ if exc.__cause__ is not None and not isinstance(exc, ConfigError) else exc
    lines = [ln.strip() for ln in str(inner).strip().splitlines() if ln.strip()]
    if not lines:
        return type(inner).__name__
    head = lines[0]
    if "Could not find" in head:  # unknown group option: list what exists
        group = head.split("'")[-2].split("/")[0] if head.count("'") >= 2 else ""
        options = []
        for ln in lines[1:]:
            if ln.startswith("Config search path"):
                break
            if not ln.startswith("Available options"):
                options.append(ln)
        return f"unknown {group} option {head.split('/')[-1].rstrip(chr(39))!r}" + (
            f" (available: {', '.join(options)})" if options else "")
    if "no viable alternative" in head or "mismatched input" in head or "extraneous input" in head:
        return f"cannot parse override: {head}"
    key = getattr(inner, "full_key", None)
    if key and not head.startswith(str(key)):
        return f"{key}: {head}"
    return head


def _near_keys(key: str) -> list[str]:
    """Config keys spelled like `key` (its section's fields, or the sections themselves)."""
    import difflib

    section, _, name = key.partition(".")
    if name and section in SECTIONS:
        known = [f"{section}.{f.name}" for f in dataclasses.fields(SECTIONS[section])]
    else:
        known = list(SECTIONS)
    return [k for k in difflib.get_close_matches(key, known, n=2, cutoff=0.75) if k != key]
