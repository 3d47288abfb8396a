"""Config checking: every key and value type, numeric ranges, and the stable hash a stage's
manifest is keyed by. Errors are `ConfigError`s naming the key and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


@dataclass(frozen=True)
class Range:
    """Inclusive bounds of a numeric config field: `x: Annotated[int, Range(1, 64)] = 4`."""

    lo: float
    hi: float


def check_ranges(cfg: Any, section: str) -> None:
    """Refuse any field (or tuple item) outside its `Range`, naming `section.field`.

    Also refuses NaN, which no comparison admits.
    """
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        bounds = next((m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, Range)), None)
        value = getattr(cfg, f.name)
        if bounds is None or value is None:
            continue
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, v in items:
            if isinstance(v, str):  # a word the field allows besides numbers ("auto")
                continue
            if not bounds.lo <= v <= bounds.hi:
                key = f"{section}.{f.name}" + ("" if i is None else f"[{i}]")
                raise ConfigError(f"{key} must be in [{bounds.lo:g}, {bounds.hi:g}], got {v!r}")


T = typing.TypeVar("T")


def from_dict(cls: type[T], raw: Mapping[str, Any], prefix: str) -> T:
    """Build dataclass `cls` from `raw`, checking every key and value type."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = prefix or "config"
        raise ConfigError(
            f"unknown key(s) {', '.join(_key(prefix, u) for u in unknown)} in {where}; "
            f"allowed: {', '.join(names)}"
        )
    kwargs = {k: _coerce(hints[k], v, _key(prefix, k)) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the checks above
        raise ConfigError(f"{prefix}: {e}") from e


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key)  # type: ignore[arg-type]
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; allowed values: {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(get_args(tp)[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp is Any:
        if origin is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass."""
    out = dataclasses.asdict(cfg)
    return json.loads(json.dumps(out, default=list))


def config_hash(*parts: Any) -> str:
    """A short stable hash of config sections: the key a stage's manifest is checked against."""
    blob = json.dumps([to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
