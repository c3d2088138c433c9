"""Typed config from a dataclass: the class is the schema.

A filter (built-in or user) declares its config as a frozen dataclass and parses a raw
mapping (native YAML or an Envoy ``typed_config`` body) into it with ``from_mapping``::

    @dataclass(frozen=True)
    class Config:
        header: str                                   # required
        claims: tuple[str, ...] = ()
        timeout: Duration = 1.0                       # "250ms", "1.5s", {seconds, nanos}
        mode: Literal["allow", "deny"] = "deny"
        limit: Annotated[int, Range(1, 1000)] = 10
        upstream: Upstream | None = None              # a nested dataclass, optional

    cfg = from_mapping(Config, raw, "listeners[0].filters[2].python.config")

Errors are ``ConfigError`` with the full path of the bad value
(``....config.claims[1]: must be a string``), exactly like the hand-written parsers, and
unknown keys are refused by name. Supported field types: ``str``, ``int``, ``float``,
``bool``, ``Duration``, ``Literal[...]``, ``X | None``, ``tuple[X, ...]``, ``list[X]``,
``dict[str, X]``, nested dataclasses, ``Annotated[int | float, Range(lo, hi)]`` and ``object``
(any JSON value, unchecked). Parsing happens at config time only; the plan for each class is
compiled once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, Union

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError

T = TypeVar("T")

Parser = Callable[[object, str], object]


@dataclasses.dataclass(frozen=True, slots=True)
class Range:
    """``Annotated[int, Range(1, 100)]``: inclusive bounds (either may be None)."""

    lo: float | None = None
    hi: float | None = None


class _DurationMarker:
    __slots__ = ()


Duration = Annotated[float, _DurationMarker()]
"""Seconds, written as ``"1.5s"``, ``"250ms"``, a number, or protobuf ``{seconds, nanos}``."""

_MISSING = object()
_plans: dict[type, Parser] = {}


def from_mapping(cls: type[T], raw: object, path: str) -> T:
    """``raw`` (a mapping; None counts as empty) parsed into the dataclass ``cls``."""
    return typing.cast(T, _dataclass_parser(cls)({} if raw is None else raw, path))


def parser_for(tp: object) -> Parser:
    """The parser of one annotated type (for hand-written parsers that want one field's rules)."""
    return _parser(tp)


def _dataclass_parser(cls: type) -> Parser:
    plan = _plans.get(cls)
    if plan is not None:
        return plan
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    # resolve string annotations (``from __future__ import annotations``) in the class's module
    hints = typing.get_type_hints(cls, include_extras=True)
    # (name, parser, default or _MISSING, default factory or None)
    fields: list[tuple[str, Parser, object, Callable[[], object] | None]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        factory = None if f.default_factory is dataclasses.MISSING else f.default_factory
        default = _MISSING if f.default is dataclasses.MISSING else f.default
        fields.append((f.name, _parser(hints[f.name]), default, factory))
    names = tuple(f[0] for f in fields)

    def parse(raw: object, path: str) -> object:
        d = w.check_keys(raw, names, path)
        kw: dict[str, object] = {}
        for name, parse_field, default, factory in fields:
            v = d.get(name, _MISSING)
            if v is _MISSING or v is None:
                if factory is not None:
                    kw[name] = factory()
                elif default is _MISSING:
                    raise ConfigError(w.join(path, name), "is required")
                else:
                    kw[name] = default
                continue
            kw[name] = parse_field(v, w.join(path, name))
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:     # the class's own __post_init__ checks
            raise ConfigError(path, str(e)) from None

    _plans[cls] = parse
    return parse


def _parser(tp: object) -> Parser:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        base, *extras = args
        for extra in extras:
            if isinstance(extra, _DurationMarker):
                return _duration
            if isinstance(extra, Range):
                return _ranged(_parser(base), extra)
        return _parser(base)
    if tp is str:
        return _string
    if tp is bool:
        return _boolean
    if tp is int:
        return _integer
    if tp is float:
        return _number
    if tp is object or tp is Any:
        return _any
    if origin is Literal:
        return _choice(args)
    if origin is Union or origin is types.UnionType:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unions other than X | None are not supported: {tp!r}")
        return _parser(rest[0])
    if origin in (tuple, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            raise TypeError(f"only tuple[X, ...] is supported: {tp!r}")
        return _sequence(_parser(args[0]), tuple if origin is tuple else list)
    if origin is dict:
        if args[0] is not str:
            raise TypeError(f"only dict[str, X] is supported: {tp!r}")
        return _mapping(_parser(args[1]))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_parser(tp)
    raise TypeError(f"unsupported config field type {tp!r}")


def _one(reader: Callable[..., object]) -> Parser:
    """A wire reader (which reads ``d[key]``) as a parser of one value."""
    def parse(v: object, path: str) -> object:
        return reader({"v": v}, "v", "")
    return parse


def _relabel(parse: Parser) -> Parser:
    # the wire readers name the key they read; give the error the caller's path instead
    def run(v: object, path: str) -> object:
        try:
            return parse(v, path)
        except ConfigError as e:
            if e.path == "v":
                raise ConfigError(path, e.message) from None
            raise
    return run


_string = _relabel(_one(w.string))
_boolean = _relabel(_one(w.boolean))
_integer = _relabel(_one(w.integer))
_number = _relabel(_one(w.number))


def _duration(v: object, path: str) -> object:
    return w.parse_duration(v, path)


def _any(v: object, path: str) -> object:
    return v


def _choice(choices: tuple[object, ...]) -> Parser:
    def parse(v: object, path: str) -> object:
        if v not in choices or isinstance(v, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError(path, f"must be one of {', '.join(map(str, choices))}; got {v!r}")
        return v
    return parse


def _ranged(inner: Parser, r: Range) -> Parser:
    def parse(v: object, path: str) -> object:
        x = inner(v, path)
        assert isinstance(x, (int, float))
        if (r.lo is not None and x < r.lo) or (r.hi is not None and x > r.hi):
            if r.lo is not None and r.hi is not None:
                raise ConfigError(path, f"must be {r.lo:g}..{r.hi:g}")
            raise ConfigError(path, f"must be >= {r.lo:g}" if r.lo is not None
                              else f"must be <= {r.hi:g}")
        return x
    return parse


def _sequence(item: Parser, kind: type) -> Parser:
    def parse(v: object, path: str) -> object:
        if not isinstance(v, list):
            raise ConfigError(path, f"must be a list, got {type(v).__name__}")
        return kind(item(x, w.join(path, i)) for i, x in enumerate(v))
    return parse


def _mapping(value: Parser) -> Parser:
    def parse(v: object, path: str) -> object:
        if not isinstance(v, dict):
            raise ConfigError(path, f"must be a mapping, got {type(v).__name__}")
        out: dict[str, object] = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise ConfigError(w.join(path, str(k)), "keys must be strings")
            out[k] = value(x, w.join(path, k))
        return out
    return parse
