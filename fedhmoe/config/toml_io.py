"""TOML and dicts <-> :class:`~fedhmoe.config.experiment.Config`: kebab-case keys become snake_case fields, with
their types and allowed values checked and unknown keys named (with close matches)."""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from fedhmoe.config.experiment import Config
from fedhmoe.config.sections import ConfigError

__all__ = [
    "all_keys",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_to_documented_toml",
    "config_to_toml",
    "load_config",
    "parse_override",
    "toml_value",
]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _snake(key: str) -> str:
    return key.replace("-", "_")


def _section_types() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``federation.num-clients``."""
    out = []
    for sec, cls in _section_types().items():
        out += [f"{sec}.{_kebab(f.name)}" for f in fields(cls)]
    return out


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint}")


def _coerce(key: str, value: Any, typ: Any, choices: tuple[Any, ...] | None) -> Any:
    origin = get_origin(typ)
    ok: bool
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif typ is str:
        ok = isinstance(value, str)
    elif origin is list:
        (item,) = get_args(typ)
        ok = isinstance(value, list) and all(isinstance(v, item) for v in value)
        value = list(value) if ok else value
    elif origin is dict:
        ok = isinstance(value, dict)
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported config type {typ} for {key}")
    if not ok:
        want = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"config key '{key}' must be {want}, got {type(value).__name__} {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested dict of kebab-case keys."""
    sections = _section_types()
    kwargs: dict[str, Any] = {}
    for sec, body in raw.items():
        if sec not in sections:
            raise _unknown(sec)
        if not isinstance(body, dict):
            raise ConfigError(f"config key '{sec}' must be a table, got {body!r}")
        cls = sections[sec]
        hints = get_type_hints(cls)
        meta = {f.name: f.metadata for f in fields(cls)}
        vals = {}
        for key, value in body.items():
            name = _snake(key)
            if name not in hints or "_" in key:
                raise _unknown(f"{sec}.{key}")
            vals[name] = _coerce(f"{sec}.{key}", value, hints[name], meta[name]["choices"])
        kwargs[sec] = cls(**vals)
    return Config(**kwargs)


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The fully resolved config as nested kebab-case dicts (every default written out)."""
    out: dict[str, dict[str, Any]] = {}
    for sec in fields(cfg):
        body = getattr(cfg, sec.name)
        out[sec.name] = {_kebab(f.name): getattr(body, f.name) for f in fields(body)}
    return out


def toml_value(v: Any) -> str:
    """``v`` (bool, number, string, list, table) as a TOML value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {toml_value(x)}' for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def config_to_toml(cfg: Config) -> str:
    """Serialise the resolved config as TOML that :func:`load_config` reads back to an equal Config."""
    lines = []
    for sec, body in config_to_dict(cfg).items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
        lines.append("")
    return "\n".join(lines)


def config_to_documented_toml(cfg: Config) -> str:
    """Like :func:`config_to_toml`, with each key's documentation as a comment above it."""
    lines = []
    for sec in fields(cfg):
        body = getattr(cfg, sec.name)
        lines.append(f"[{sec.name}]")
        for f in fields(body):
            lines.append(f"# {f.metadata['doc']}")
            lines.append(f"{_kebab(f.name)} = {toml_value(getattr(body, f.name))}")
        lines.append("")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``--set section.key=value``; the value is read as TOML, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``section.key=value`` override applied."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        key, value = parse_override(text)
        if "." not in key:
            raise _unknown(key)
        sec, name = key.split(".", 1)
        out.setdefault(sec, {})[name] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, text: str | None = None) -> Config:
    """Load a TOML experiment file (or TOML text), apply ``--set`` overrides and validate."""
    if text is None:
        if path is None:
            text = ""
        else:
            text = _read_text(Path(path))
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{path or '<text>'}' is not valid TOML: {e}") from e
    return config_from_dict(apply_overrides(raw, overrides or []))


def _read_text(path: Path) -> str:
    """The file's text as UTF-8 (what TOML requires), a :class:`ConfigError` naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (TOML files must be): byte {e.start} is "
                          f"{data[e.start:e.start + 1]!r}") from e
