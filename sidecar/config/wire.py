"""Typed readers for config dicts (native YAML and Envoy JSON alike).

Every reader takes the field's full path so an error reads
``clusters[2].endpoints[0].port: must be 1..65535``. Unknown keys are refused by
``check_keys``: nothing in a config is silently ignored.

A raw config is what YAML/JSON parsing gives: ``Raw`` is a mapping of such values. The readers
turn it into typed values; a reader called without a default raises ``is required`` for a
missing field, one called with a default returns the default (of the default's type).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, overload

from sidecar.config.errors import ConfigError

Raw = Mapping[str, Any]
"""A mapping from parsed YAML/JSON, before validation (values of any JSON type)."""

T = TypeVar("T")


class _Missing:
    """The 'no default given' marker (a field without a default is required)."""


_MISSING: Any = _Missing()
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|us)?$")


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def check_keys(d: object, allowed: Iterable[str], path: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(path, f"must be a mapping, got {type(d).__name__}")
    known = set(allowed)
    for k in d:
        if k not in known:
            raise ConfigError(join(path, str(k)), "unknown or unsupported field")
    return d


def _get(d: Raw, key: str, path: str, default: object) -> tuple[bool, Any]:
    """(present, value); a missing field without a default is an error."""
    v = d.get(key, _MISSING)
    if v is _MISSING or v is None:
        if default is _MISSING:
            raise ConfigError(join(path, key), "is required")
        return False, default
    return True, v


@overload
def mapping(d: Raw, key: str, path: str) -> dict[str, Any]: ...
@overload
def mapping(d: Raw, key: str, path: str, default: T) -> dict[str, Any] | T: ...


def mapping(d: Raw, key: str, path: str, default: object = _MISSING) -> object:
    present, v = _get(d, key, path, default)
    if not present:
        return v
    if not isinstance(v, dict):
        raise ConfigError(join(path, key), f"must be a mapping, got {type(v).__name__}")
    return v


@overload
def seq(d: Raw, key: str, path: str) -> list[Any]: ...
@overload
def seq(d: Raw, key: str, path: str, default: T) -> list[Any] | T: ...


def seq(d: Raw, key: str, path: str, default: object = _MISSING) -> object:
    present, v = _get(d, key, path, default)
    if not present:
        return v
    if not isinstance(v, list):
        raise ConfigError(join(path, key), f"must be a list, got {type(v).__name__}")
    return v


@overload
def string(d: Raw, key: str, path: str, *, choices: Iterable[str] | None = None,
           nonempty: bool = False) -> str: ...
@overload
def string(d: Raw, key: str, path: str, default: T, *, choices: Iterable[str] | None = None,
           nonempty: bool = False) -> str | T: ...


def string(d: Raw, key: str, path: str, default: object = _MISSING, *,
           choices: Iterable[str] | None = None, nonempty: bool = False) -> object:
    present, v = _get(d, key, path, default)
    if not present:
        return v
    if not isinstance(v, str):
        raise ConfigError(join(path, key), f"must be a string, got {type(v).__name__}")
    if nonempty and not v:
        raise ConfigError(join(path, key), "must not be empty")
    if choices is not None:
        allowed = tuple(choices)
        if v not in allowed:
            raise ConfigError(join(path, key), f"must be one of {', '.join(allowed)}; got {v!r}")
    return v


_INT = re.compile(r"-?\d+")


@overload
def integer(d: Raw, key: str, path: str, *, lo: int | None = None,
            hi: int | None = None) -> int: ...
@overload
def integer(d: Raw, key: str, path: str, default: T, *, lo: int | None = None,
            hi: int | None = None) -> int | T: ...


def integer(d: Raw, key: str, path: str, default: object = _MISSING, *, lo: int | None = None,
            hi: int | None = None) -> object:
    present, v = _get(d, key, path, default)
    if not present:
        return v
    # Envoy JSON encodes uint64 as strings; accept digit strings like protobuf JSON does
    if isinstance(v, str) and _INT.fullmatch(v):
        v = int(v)
    if isinstance(v, dict) and set(v) == {"value"}:   # google.protobuf.UInt32Value
        return integer(v, "value", join(path, key), default, lo=lo, hi=hi)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(join(path, key), f"must be an integer, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if lo is not None and hi is not None:
            raise ConfigError(join(path, key), f"must be {lo}..{hi}")
        raise ConfigError(join(path, key), f"must be >= {lo}" if lo is not None else f"must be <= {hi}")
    return v


@overload
def number(d: Raw, key: str, path: str, *, lo: float | None = None,
           hi: float | None = None) -> float: ...
@overload
def number(d: Raw, key: str, path: str, default: T, *, lo: float | None = None,
           hi: float | None = None) -> float | T: ...


def number(d: Raw, key: str, path: str, default: object = _MISSING, *, lo: float | None = None,
           hi: float | None = None) -> object:
    present, v = _get(d, key, path, default)
    if not present:
        return v
    if isinstance(v, dict) and set(v) == {"value"}:   # google.protobuf.DoubleValue
        return number(v, "value", join(path, key), default, lo=lo, hi=hi)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(join(path, key), f"must be a number, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(join(path, key), f"must be {lo}..{hi}")
    return float(v)


@overload
def boolean(d: Raw, key: str, path: str) -> bool: ...
@overload
def boolean(d: Raw, key: str, path: str, default: T) -> bool | T: ...


def boolean(d: Raw, key: str, path: str, default: object = _MISSING) -> object:
    present, v = _get(d, key, path, default)
    if not present:
        return v
    if isinstance(v, dict) and set(v) == {"value"}:   # google.protobuf.BoolValue
        return boolean(v, "value", join(path, key), default)
    if not isinstance(v, bool):
        raise ConfigError(join(path, key), f"must be true or false, got {v!r}")
    return v


@overload
def duration(d: Raw, key: str, path: str) -> float: ...
@overload
def duration(d: Raw, key: str, path: str, default: T) -> float | T: ...


def duration(d: Raw, key: str, path: str, default: object = _MISSING) -> object:
    """Seconds from ``"1.5s"``, ``"250ms"``, a number of seconds, or protobuf
    ``{seconds, nanos}``."""
    present, v = _get(d, key, path, default)
    if not present:
        return v
    return parse_duration(v, join(path, key))


def parse_duration(v: object, path: str) -> float:
    if isinstance(v, bool):
        raise ConfigError(path, f"must be a duration like '1.5s' or '250ms', got {v!r}")
    if isinstance(v, (int, float)):
        if v < 0:
            raise ConfigError(path, "must not be negative")
        return float(v)
    if isinstance(v, dict):
        try:
            check_keys(v, ("seconds", "nanos"), path)
            s = int(v.get("seconds", 0)) + int(v.get("nanos", 0)) / 1e9
        except (TypeError, ValueError):
            raise ConfigError(path, "seconds/nanos must be integers") from None
        if s < 0:
            raise ConfigError(path, "must not be negative")
        return s
    if isinstance(v, str):
        m = _DURATION.match(v.strip())
        if m:
            n = float(m.group(1))
            unit = m.group(2) or "s"
            return n * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    raise ConfigError(path, f"must be a duration like '1.5s' or '250ms', got {v!r}")


@overload
def port(d: Raw, key: str, path: str) -> int: ...
@overload
def port(d: Raw, key: str, path: str, default: T) -> int | T: ...


def port(d: Raw, key: str, path: str, default: object = _MISSING) -> object:
    return integer(d, key, path, default, lo=1, hi=65535)


def compile_regex(pattern: object, path: str, flags: int = 0) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise ConfigError(path, "must be a regular expression string")
    try:
        return re.compile(pattern, flags)
    except re.error as e:
        raise ConfigError(path, f"invalid regular expression: {e}") from None


def google_re2(r: Raw, path: str) -> None:
    """A RegexMatcher's ``google_re2``: the (only) engine, selected by ``{}``; its deprecated
    ``max_program_size`` is refused by name (Python's ``re`` compiles the pattern)."""
    if "google_re2" in r:
        check_keys(r["google_re2"] or {}, (), join(path, "google_re2"))


@overload
def one_of(d: Raw, keys: Iterable[str], path: str, required: Literal[True] = True) -> str: ...
@overload
def one_of(d: Raw, keys: Iterable[str], path: str, required: bool) -> str | None: ...


def one_of(d: Raw, keys: Iterable[str], path: str, required: bool = True) -> str | None:
    names = tuple(keys)
    present = [k for k in names if d.get(k) is not None]
    if len(present) > 1:
        raise ConfigError(path, f"only one of {', '.join(present)} may be set")
    if not present:
        if required:
            raise ConfigError(path, f"one of {', '.join(names)} is required")
        return None
    return present[0]
