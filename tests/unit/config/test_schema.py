"""The dataclass config schema (``sidecar.sdk.from_mapping``): values, defaults, and errors with
the full path of the bad value, as the hand-written parsers give them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest

from sidecar.sdk import ConfigError, Duration, Range, from_mapping


@dataclass(frozen=True)
class Upstream:
    cluster: str
    timeout: Duration = 0.5


@dataclass(frozen=True)
class Config:
    header: str
    claims: tuple[str, ...] = ()
    mode: Literal["allow", "deny"] = "deny"
    limit: Annotated[int, Range(1, 1000)] = 10
    ratio: float = 1.0
    upstream: Upstream | None = None
    tags: dict[str, int] = field(default_factory=dict)
    strict: bool = False
    extra: object = None


def test_values_and_defaults():
    cfg = from_mapping(Config, {"header": "x-user", "claims": ["sub", "email"], "mode": "allow",
                                "limit": "42", "ratio": 2, "upstream": {"cluster": "auth",
                                                                         "timeout": "250ms"},
                                "tags": {"a": 1}, "strict": True, "extra": {"any": [1]}}, "c")
    assert cfg == Config("x-user", ("sub", "email"), "allow", 42, 2.0, Upstream("auth", 0.25),
                         {"a": 1}, True, {"any": [1]})
    assert from_mapping(Config, {"header": "h"}, "c") == Config("h")
    assert from_mapping(Config, {"header": "h"}, "c").tags == {}


@pytest.mark.parametrize("raw, error", [
    ({}, "p.header: is required"),
    ({"header": 1}, "p.header: must be a string, got int"),
    ({"header": "h", "claims": "sub"}, "p.claims: must be a list, got str"),
    ({"header": "h", "claims": ["a", 2]}, "p.claims[1]: must be a string, got int"),
    ({"header": "h", "mode": "maybe"}, "p.mode: must be one of allow, deny; got 'maybe'"),
    ({"header": "h", "limit": 0}, "p.limit: must be 1..1000"),
    ({"header": "h", "limit": True}, "p.limit: must be an integer, got bool"),
    ({"header": "h", "surprise": 1}, "p.surprise: unknown or unsupported field"),
    ({"header": "h", "upstream": {"timeout": "1s"}}, "p.upstream.cluster: is required"),
    ({"header": "h", "upstream": {"cluster": "a", "timeout": "soon"}},
     "p.upstream.timeout: must be a duration like '1.5s' or '250ms', got 'soon'"),
    ({"header": "h", "tags": {"a": "x"}}, "p.tags.a: must be an integer, got str"),
    ({"header": "h", "strict": "yes"}, "p.strict: must be true or false, got 'yes'"),
    ("just a string", "p: must be a mapping, got str"),
])
def test_errors_name_the_path(raw, error):
    with pytest.raises(ConfigError) as e:
        from_mapping(Config, raw, "p")
    assert str(e.value) == error


def test_unsupported_field_types_are_a_programming_error():
    @dataclass(frozen=True)
    class Bad:
        x: int | str

    with pytest.raises(TypeError):
        from_mapping(Bad, {"x": 1}, "p")
