"""Envoy access log formats (``SubstitutionFormatString``), parsed once into segments: the one
parser of HTTP access logs and connection (TCP) access logs, in both config formats.

A format is text (``text_format_source.inline_string``, ``text_format``) or JSON
(``json_format``: keys mapped to format strings, nested objects allowed). A format string mixes
literal text and *command operators*: ``%NAME%``, ``%NAME(ARG)%``, ``%NAME(ARG):MAX_LEN%``. The
operators and their arguments are checked here, against what the log's context can print
(``HTTP_OPERATORS`` for a request, ``CONNECTION_OPERATORS`` for a connection), so a bad
operator is a ``ConfigError`` with the field's path, never a line of dashes at run time.
``sidecar.observability.formatter`` compiles a ``LogFormat`` into getters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.config.errors import ConfigError

_OPERATOR = re.compile(r"%([A-Z][A-Z0-9_]*)(?:\(([^)]*)\))?(?::(\d+))?%")

# Envoy's default format (an access log without log_format); on a TCP connection the HTTP
# operators in it print "-" (and RESPONSE_CODE 0), as in Envoy
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
    ``json`` (fields in config order; written with sorted keys, as Envoy writes them).
    ``omit_empty_values``: an empty value is "" in text (not "-") and its key is left out of
    JSON."""

    text: tuple[Segment, ...] | None = None
    json: tuple[JsonField, ...] | None = None
    omit_empty_values: bool = False


# ---- what each kind of log can print ----------------------------------------------------------

# Operators every log has: the stream's or the connection's own facts
_COMMON = frozenset((
    "START_TIME", "DURATION", "BYTES_RECEIVED", "BYTES_SENT", "RESPONSE_FLAGS",
    "RESPONSE_FLAGS_LONG", "UPSTREAM_HOST", "UPSTREAM_CLUSTER", "UPSTREAM_REQUEST_ATTEMPT_COUNT",
    "DOWNSTREAM_REMOTE_ADDRESS", "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS", "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_PEER_URI_SAN", "HOSTNAME", "ENVIRONMENT",
    # request operators: on a connection they print "-" (RESPONSE_CODE 0), as in Envoy
    "REQ", "RESP", "TRAILER", "PROTOCOL", "RESPONSE_CODE", "RESPONSE_CODE_DETAILS",
    "GRPC_STATUS", "GRPC_STATUS_NUMBER", "ROUTE_NAME", "DYNAMIC_METADATA",
))
# An HTTP access log: a request's facts (the connection's own are not on RequestContext)
HTTP_OPERATORS = _COMMON
# A connection log (tcp_proxy's access_log, an L4 listener's own)
CONNECTION_OPERATORS = _COMMON | frozenset((
    "UPSTREAM_LOCAL_ADDRESS", "UPSTREAM_TRANSPORT_FAILURE_REASON", "DOWNSTREAM_REMOTE_PORT",
    "DOWNSTREAM_LOCAL_ADDRESS", "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", "DOWNSTREAM_LOCAL_PORT",
    "REQUESTED_SERVER_NAME", "DOWNSTREAM_TLS_VERSION", "CONNECTION_ID", "UPSTREAM_CONNECTION_ID",
    "CONNECTION_TERMINATION_DETAILS", "FILTER_CHAIN_NAME",
))

_TAKES_ARG = frozenset(("REQ", "RESP", "TRAILER", "START_TIME", "GRPC_STATUS",
                        "DYNAMIC_METADATA", "ENVIRONMENT"))
_NEEDS_ARG = frozenset(("REQ", "RESP", "TRAILER", "DYNAMIC_METADATA", "ENVIRONMENT"))
GRPC_STATUS_STYLES = ("CAMEL_STRING", "SNAKE_STRING", "NUMBER")
REQUEST_PSEUDO_HEADERS = (":method", ":path", ":authority", ":scheme", ":protocol")

SENSITIVE_HEADERS = frozenset((
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key",
    "x-auth-token", "x-amz-security-token", "x-csrf-token", "x-xsrf-token",
))
_SENSITIVE_WORDS = ("token", "secret", "password", "passwd", "session", "credential", "apikey",
                    "api-key", "api_key", "auth", "cookie", "signature")


def is_sensitive_header(name: str) -> bool:
    """A header that may carry credentials: never logged."""
    n = name.lower()
    if n in SENSITIVE_HEADERS:
        return True
    return any(w in n for w in _SENSITIVE_WORDS)


def header_names(arg: str) -> tuple[str, ...]:
    """``X-A?X-B`` -> ("x-a", "x-b"): the header, then its fallback."""
    return tuple(n.strip().lower() for n in arg.split("?") if n.strip())


def _check_arg(name: str, arg: str, path: str) -> None:
    if name in ("REQ", "RESP", "TRAILER"):
        for h in header_names(arg):
            if h.startswith(":"):
                if name != "REQ" or h not in REQUEST_PSEUDO_HEADERS:
                    raise ConfigError(path, f"%{name}({arg})%: unknown pseudo-header {h!r}")
            elif is_sensitive_header(h):
                raise ConfigError(path, f"header {h!r} may carry credentials and is never "
                                        "logged")
    elif name == "GRPC_STATUS" and arg and arg not in GRPC_STATUS_STYLES:
        raise ConfigError(path, f"%GRPC_STATUS({arg})%: must be one of "
                                f"{', '.join(GRPC_STATUS_STYLES)}")


# ---- parsing -----------------------------------------------------------------------------------

def parse_format_string(s: str, path: str, operators: frozenset[str]) -> tuple[Segment, ...]:
    """Literal text and operators of one format string; ``operators``: what the log's context
    can print (``HTTP_OPERATORS`` or ``CONNECTION_OPERATORS``)."""
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
        if arg is not None and name not in _TAKES_ARG:
            raise ConfigError(path, f"%{name}% takes no argument")
        if not arg and name in _NEEDS_ARG:
            raise ConfigError(path, f"%{name}(...)% needs an argument")
        _check_arg(name, arg or "", path)
        out.append(Operator(name, arg or "", int(max_len) if max_len is not None else None))
        pos = m.end()
    return tuple(out)


def parse_json_format(d: object, path: str, operators: frozenset[str]) -> tuple[JsonField, ...]:
    if not isinstance(d, dict):
        raise ConfigError(path, "must be a mapping of keys to format strings")
    fields: list[JsonField] = []
    for k, v in d.items():
        kp = f"{path}.{k}"
        if isinstance(v, str):
            fields.append(JsonField(str(k), parse_format_string(v, kp, operators)))
        elif isinstance(v, dict):
            fields.append(JsonField(str(k), parse_json_format(v, kp, operators), nested=True))
        elif v is None or isinstance(v, (bool, int, float)):
            fields.append(JsonField(str(k), v))
        else:
            raise ConfigError(kp, "must be a format string, a number, a boolean or a mapping")
    return tuple(fields)


def text_format(s: str, path: str, operators: frozenset[str],
                omit_empty_values: bool = False) -> LogFormat:
    return LogFormat(text=parse_format_string(s, path, operators),
                     omit_empty_values=omit_empty_values)


def json_format(d: object, path: str, operators: frozenset[str],
                omit_empty_values: bool = False) -> LogFormat:
    return LogFormat(json=parse_json_format(d, path, operators),
                     omit_empty_values=omit_empty_values)


def default_format(operators: frozenset[str]) -> LogFormat:
    """Envoy's default format, for a log of that context."""
    return text_format(DEFAULT_FORMAT, "log_format", operators)
