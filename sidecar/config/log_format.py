"""Envoy access log formats (``SubstitutionFormatString``) parsed once into segments.

A format is text (``text_format_source.inline_string``, ``text_format``) or JSON
(``json_format``: keys mapped to format strings, nested objects allowed). A format string mixes
literal text and *command operators*: ``%NAME%``, ``%NAME(ARG)%``, ``%NAME(ARG):MAX_LEN%``. The
operators are checked here, against the set the caller supports (connection logs support the
TCP ones), so an unknown operator is a ``ConfigError`` with the field's path, never a line of
dashes at run time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.config.errors import ConfigError

_OPERATOR = re.compile(r"%([A-Z][A-Z0-9_]*)(?:\(([^)]*)\))?(?::(\d+))?%")

# Envoy's default format (used when an access log has no log_format); on a TCP connection the
# HTTP operators in it print "-" (and RESPONSE_CODE 0), as in Envoy
DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    '%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n')


@dataclass(frozen=True, slots=True)
class Operator:
    name: str
    arg: str = ""
    max_length: int | None = None


Segment = str | Operator


@dataclass(frozen=True, slots=True)
class JsonField:
    key: str
    value: tuple[Segment, ...] | tuple[JsonField, ...] | int | float | bool | None
    nested: bool = False        # value is a tuple of JsonField (a nested object)


@dataclass(frozen=True, slots=True)
class LogFormat:
    """Exactly one of ``text`` (segments, newline included when the format has one) and
    ``json`` (fields in config order)."""

    text: tuple[Segment, ...] | None = None
    json: tuple[JsonField, ...] | None = None
    omit_empty_values: bool = False


def parse_format_string(s: str, path: str, operators: frozenset[str],
                        with_args: frozenset[str] = frozenset()) -> tuple[Segment, ...]:
    """Literal text and operators of one format string. ``operators``: the names allowed;
    ``with_args``: those that take an argument (REQ(...), START_TIME(...)) or may."""
    out: list[Segment] = []
    pos = 0
    while pos < len(s):
        i = s.find("%", pos)
        if i < 0:
            out.append(s[pos:])
            break
        if i > pos:
            out.append(s[pos:i])
        m = _OPERATOR.match(s, i)
        if m is None:
            raise ConfigError(path, f"incorrect format at position {i}: a '%' starts no "
                                    "command operator (%NAME%, %NAME(ARG)%, %NAME(ARG):N%)")
        name, arg, max_len = m.group(1), m.group(2), m.group(3)
        if name not in operators:
            raise ConfigError(path, f"command operator %{name}% is not supported here "
                                    f"(supported: {', '.join(sorted(operators))})")
        if arg is not None and name not in with_args:
            raise ConfigError(path, f"%{name}% takes no argument")
        if arg is None and name in with_args and name in _ARG_REQUIRED:
            raise ConfigError(path, f"%{name}(...)% needs an argument")
        out.append(Operator(name, arg or "", int(max_len) if max_len is not None else None))
        pos = m.end()
    return tuple(out)


_ARG_REQUIRED = frozenset(("REQ", "RESP", "TRAILER", "ENVIRONMENT"))


def parse_json_format(d: object, path: str, operators: frozenset[str],
                      with_args: frozenset[str] = frozenset()) -> tuple[JsonField, ...]:
    if not isinstance(d, dict):
        raise ConfigError(path, "must be a mapping of keys to format strings")
    fields: list[JsonField] = []
    for k, v in d.items():
        kp = f"{path}.{k}"
        if isinstance(v, str):
            fields.append(JsonField(str(k), parse_format_string(v, kp, operators, with_args)))
        elif isinstance(v, dict):
            fields.append(JsonField(str(k), parse_json_format(v, kp, operators, with_args),
                                    nested=True))
        elif v is None or isinstance(v, (bool, int, float)):
            fields.append(JsonField(str(k), v))
        else:
            raise ConfigError(kp, "must be a format string, a number, a boolean or a mapping")
    return tuple(fields)


# What a connection log (tcp_proxy, or the listener's own access log) can print. HTTP
# operators are accepted as Envoy does on TCP connections: REQ/RESP/TRAILER print "-",
# RESPONSE_CODE 0, PROTOCOL "-".
CONNECTION_OPERATORS = frozenset((
    "START_TIME", "DURATION", "BYTES_RECEIVED", "BYTES_SENT", "RESPONSE_FLAGS",
    "RESPONSE_FLAGS_LONG", "UPSTREAM_HOST", "UPSTREAM_CLUSTER", "UPSTREAM_LOCAL_ADDRESS",
    "UPSTREAM_TRANSPORT_FAILURE_REASON", "DOWNSTREAM_REMOTE_ADDRESS",
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", "DOWNSTREAM_REMOTE_PORT",
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS", "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_LOCAL_ADDRESS", "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", "DOWNSTREAM_LOCAL_PORT",
    "REQUESTED_SERVER_NAME", "DOWNSTREAM_PEER_URI_SAN", "DOWNSTREAM_TLS_VERSION",
    "CONNECTION_ID", "CONNECTION_TERMINATION_DETAILS", "FILTER_CHAIN_NAME", "HOSTNAME",
    "PROTOCOL", "RESPONSE_CODE", "REQ", "RESP", "TRAILER", "UPSTREAM_CONNECTION_ID",
))
CONNECTION_OPERATORS_WITH_ARGS = frozenset(("REQ", "RESP", "TRAILER", "START_TIME"))
