"""Typed readers for config dicts (native YAML and Envoy JSON alike).

Every reader takes the field's full path so an error reads
``clusters[2].endpoints[0].port: must be 1..65535``. Unknown keys are refused by
``check_keys``: nothing in a config is silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from sidecar.config.errors import ConfigError

_MISSING = object()
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|us)?$")


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def check_keys(d: Any, allowed: Iterable[str], path: str) -> dict:
    if not isinstance(d, dict):
        raise ConfigError(path, f"must be a mapping, got {type(d).__name__}")
    allowed = set(allowed)
    for k in d:
        if k not in allowed:
            raise ConfigError(join(path, str(k)), "unknown or unsupported field")
    return d


def mapping(d: dict, key: str, path: str, default: Any = _MISSING) -> dict:
    v = d.get(key, _MISSING)
    if v is _MISSING or v is None:
        if default is _MISSING:
            raise ConfigError(join(path, key), "is required")
        return default
    if not isinstance(v, dict):
        raise ConfigError(join(path, key), f"must be a mapping, got {type(v).__name__}")
    return v


def seq(d: dict, key: str, path: str, default: Any = _MISSING) -> list:
    v = d.get(key, _MISSING)
    if v is _MISSING or v is None:
        if default is _MISSING:
            raise ConfigError(join(path, key), "is required")
        return default
    if not isinstance(v, list):
        raise ConfigError(join(path, key), f"must be a list, got {type(v).__name__}")
    return v


def string(d: dict, key: str, path: str, default: Any = _MISSING, *,
           choices: Iterable[str] | None = None, nonempty: bool = False) -> str:
    v = d.get(key, _MISSING)
    if v is _MISSING or v is None:
        if default is _MISSING:
            raise ConfigError(join(path, key), "is required")
        return default
    if not isinstance(v, str):
        raise ConfigError(join(path, key), f"must be a string, got {type(v).__name__}")
    if nonempty and not v:
        raise ConfigError(join(path, key), "must not be empty")
    if choices is not None:
        choices = tuple(choices)
        if v not in choices:
            raise ConfigError(join(path, key), f"must be one of {', '.join(choices)}; got {v!r}")
    return v


def integer(d: dict, key: str, path: str, default: Any = _MISSING, *, lo: int | None = None,
            hi: int | None = None) -> int:
    v = d.get(key, _MISSING)
    if v is _MISSING or v is None:
        if default is _MISSING:
            raise ConfigError(join(path, key), "is required")
        return default
    # Envoy JSON encodes uint64 as strings; accept digit strings like protobuf JSON does
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v):
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


def number(d: dict, key: str, path: str, default: Any = _MISSING, *, lo: float | None = None,
           hi: float | None = None) -> float:
    v = d.get(key, _MISSING)
    if v is _MISSING or v is None:
        if default is _MISSING:
            raise ConfigError(join(path, key), "is required")
        return default
    if isinstance(v, dict) and set(v) == {"value"}:   # google.protobuf.DoubleValue
        return number(v, "value", join(path, key), default, lo=lo, hi=hi)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(join(path, key), f"must be a number, got {type(v).__name__}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(join(path, key), f"must be {lo}..{hi}")
    return float(v)


def boolean(d: dict, key: str, path: str, default: Any = _MISSING) -> bool:
    v = d.get(key, _MISSING)
    if v is _MISSING or v is None:
        if default is _MISSING:
            raise ConfigError(join(path, key), "is required")
        return default
    if isinstance(v, dict) and set(v) == {"value"}:   # google.protobuf.BoolValue
        return boolean(v, "value", join(path, key), default)
    if not isinstance(v, bool):
        raise ConfigError(join(path, key), f"must be true or false, got {v!r}")
    return v


def duration(d: dict, key: str, path: str, default: Any = _MISSING) -> float:
    """Seconds from ``"1.5s"``, ``"250ms"``, a number of seconds, or protobuf
    ``{seconds, nanos}``."""
    v = d.get(key, _MISSING)
    if v is _MISSING or v is None:
        if default is _MISSING:
            raise ConfigError(join(path, key), "is required")
        return default
    return parse_duration(v, join(path, key))


def parse_duration(v: Any, path: str) -> float:
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


def port(d: dict, key: str, path: str, default: Any = _MISSING) -> int:
    return integer(d, key, path, default, lo=1, hi=65535)


def compile_regex(pattern: Any, path: str, flags: int = 0) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ConfigError(path, "must be a regular expression string")
    try:
        return re.compile(pattern, flags)
    except re.error as e:
        raise ConfigError(path, f"invalid regular expression: {e}") from None


def google_re2(r: dict, path: str) -> None:
    """A RegexMatcher's ``google_re2``: the (only) engine, selected by ``{}``; its deprecated
    ``max_program_size`` is refused by name (Python's ``re`` compiles the pattern)."""
    if "google_re2" in r:
        check_keys(r["google_re2"] or {}, (), join(path, "google_re2"))


def one_of(d: dict, keys: Iterable[str], path: str, required: bool = True) -> str | None:
    present = [k for k in keys if d.get(k) is not None]
    if len(present) > 1:
        raise ConfigError(path, f"only one of {', '.join(present)} may be set")
    if not present:
        if required:
            raise ConfigError(path, f"one of {', '.join(keys)} is required")
        return None
    return present[0]
