"""Envoy's access log formats (``SubstitutionFormatString``): text with ``%COMMAND%`` operators,
and JSON whose values are formats too (a value that is exactly one operator keeps its type:
``"status": "%RESPONSE_CODE%"`` logs the number).

A format is compiled once, at config time, into a list of literals and getters; an unknown
operator is a ``FormatError`` naming it, which the config parsers turn into a ``ConfigError``
with the field's path. Missing values are ``-`` in text and ``null`` in JSON, as in Envoy.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.config.listener import LOG_OPERATORS
from sidecar.core.message import Request, Response

Value = str | int | None
Getter = Callable[[Request, Response, float], Value]

# Envoy's default access log format (used when a file/stdout logger sets no log_format)
DEFAULT_FORMAT = ('[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
                  '%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
                  '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" '
                  '"%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" '
                  '"%UPSTREAM_HOST%"\n')

_OPERATOR = re.compile(r"%([A-Z_0-9]+)(?:\(([^)]*)\))?(?::(\d+))?%")

GRPC_NAMES = ("OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
              "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition",
              "Aborted", "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss",
              "Unauthenticated")
_GRPC_SNAKE = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
               "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
               "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
               "UNAUTHENTICATED")


class FormatError(ValueError):
    """A format string Envoy would refuse, or one using an operator the sidecar cannot honour."""


# ---- operators -------------------------------------------------------------------------------

def _header_getter(arg: str | None, response: bool) -> Getter:
    if not arg:
        raise FormatError(f"%{'RESP' if response else 'REQ'}(...)% needs a header name")
    main, _, alt = arg.partition("?")
    names = tuple(_header_name(n.strip()) for n in (main, alt) if n.strip())

    if response:
        def get(req: Request, resp: Response, d: float) -> Value:
            h = resp.headers
            for n in names:
                v = h.get(n)
                if v is None and n == "content-length" and resp.local and \
                        isinstance(resp.body, bytes):
                    v = str(len(resp.body))     # a local reply's length, set when written
                if v is not None:
                    return v
            return None
        return get

    def get_req(req: Request, resp: Response, d: float) -> Value:
        for n in names:
            v = _request_value(req, n)
            if v is not None:
                return v
        return None
    return get_req


def _header_name(n: str) -> str:
    low = n.lower()
    if low.startswith(":") and low not in (":method", ":path", ":authority", ":scheme",
                                           ":protocol"):
        raise FormatError(f"unknown pseudo-header {n!r}")
    return low


def _request_value(req: Request, name: str) -> str | None:
    if name[0] == ":":
        if name == ":method":
            return req.method
        if name == ":path":
            path = req.ctx.original_path or req.path
            return path + "?" + req.query if req.query else path
        if name == ":authority":
            return req.headers.get("host")
        if name == ":scheme":
            return req.scheme
        return None
    return req.headers.get(name)


def _trailer_getter(arg: str | None) -> Getter:
    if not arg:
        raise FormatError("%TRAILER(...)% needs a header name")
    names = tuple(n.strip().lower() for n in arg.split("?") if n.strip())

    def get(req: Request, resp: Response, d: float) -> Value:
        t = resp.trailers
        if t is None:
            return None
        for n in names:
            v = t.get(n)
            if v is not None:
                return v
        return None
    return get


def _start_time(arg: str | None) -> Getter:
    if not arg:
        def iso(req: Request, resp: Response, d: float) -> Value:
            t = time.time() - d
            ms = int((t - int(t)) * 1000)
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{ms:03d}Z"
        return iso
    fmt = arg

    def custom(req: Request, resp: Response, d: float) -> Value:
        t = time.time() - d
        frac = t - int(t)
        out = fmt.replace("%s", str(int(t)))
        for digits in (9, 6, 3):
            out = out.replace(f"%{digits}f", f"{int(frac * 10 ** digits):0{digits}d}")
        out = out.replace("%f", f"{int(frac * 1e9):09d}")
        return time.strftime(out, time.gmtime(t))
    return custom


def _grpc_status(arg: str | None) -> Getter:
    style = arg or "CAMEL_STRING"
    if style not in ("CAMEL_STRING", "SNAKE_STRING", "NUMBER"):
        raise FormatError(f"%GRPC_STATUS({arg})%: must be CAMEL_STRING, SNAKE_STRING or NUMBER")

    def get(req: Request, resp: Response, d: float) -> Value:
        if not req.ctx.grpc:
            return None              # only a gRPC request has a gRPC status (Envoy)
        v = None
        if resp.trailers is not None:
            v = resp.trailers.get("grpc-status")
        if v is None:
            v = resp.headers.get("grpc-status")
        if v is None or not v.isdigit():
            return None
        code = int(v)
        if style == "NUMBER":
            return code
        names = GRPC_NAMES if style == "CAMEL_STRING" else _GRPC_SNAKE
        return names[code] if code < len(names) else str(code)
    return get


def _addr(addr: tuple[str, int] | None, port: bool) -> str | None:
    if not addr:
        return None
    host = f"[{addr[0]}]" if ":" in addr[0] and port else addr[0]
    return f"{host}:{addr[1]}" if port else addr[0]


def _remote(req: Request, port: bool) -> Value:
    """The client's address: the peer, or the XFF entry trusted by xff_num_trusted_hops (then
    without a port, as Envoy prints it: ``:0``)."""
    ctx = req.ctx
    peer = ctx.downstream_addr
    if peer is not None and ctx.remote_ip == peer[0]:
        return _addr(peer, port)
    if not ctx.remote_ip:
        return None
    return _addr((ctx.remote_ip, 0), port)


def _metadata(arg: str | None) -> Getter:
    if not arg:
        raise FormatError("%DYNAMIC_METADATA(NAMESPACE:KEY...)% needs a namespace")
    ns, *keys = arg.split(":")

    def get(req: Request, resp: Response, d: float) -> Value:
        v: object = req.ctx.metadata.get(ns)
        for k in keys:
            if not isinstance(v, dict):
                return None
            v = v.get(k)
        if v is None:
            return None
        return v if isinstance(v, (str, int)) else json.dumps(v, separators=(",", ":"))
    return get


def _constant(v: Value) -> Getter:
    def get(req: Request, resp: Response, d: float) -> Value:
        return v
    return get


def _simple(fn: Callable[[Request, Response, float], Value]) -> Callable[[str | None], Getter]:
    def make(arg: str | None) -> Getter:
        return fn
    return make


_HOSTNAME = socket.gethostname()

OPERATORS: dict[str, Callable[[str | None], Getter]] = {
    "START_TIME": _start_time,
    "REQ": lambda a: _header_getter(a, False),
    "RESP": lambda a: _header_getter(a, True),
    "TRAILER": _trailer_getter,
    "RESPONSE_CODE": _simple(lambda req, resp, d: resp.status),
    # "-" even in JSON, as Envoy logs it
    "RESPONSE_FLAGS": _simple(lambda req, resp, d: ",".join(req.ctx.flags) or "-"),
    "RESPONSE_CODE_DETAILS": _simple(lambda req, resp, d: req.ctx.response_code_details or (
        None if resp.local else "via_upstream")),
    "DURATION": _simple(lambda req, resp, d: int(d * 1000)),
    "BYTES_RECEIVED": _simple(lambda req, resp, d: req.ctx.bytes_received),
    "BYTES_SENT": _simple(lambda req, resp, d: req.ctx.bytes_sent),
    "UPSTREAM_HOST": _simple(lambda req, resp, d: req.ctx.upstream_host or None),
    "UPSTREAM_CLUSTER": _simple(lambda req, resp, d: req.ctx.cluster or None),
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": _simple(lambda req, resp, d: req.ctx.attempts),
    "DOWNSTREAM_REMOTE_ADDRESS": _simple(lambda req, resp, d: _remote(req, True)),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": _simple(lambda req, resp, d: _remote(req, False)),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": _simple(
        lambda req, resp, d: _addr(req.ctx.downstream_addr, True)),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": _simple(
        lambda req, resp, d: _addr(req.ctx.downstream_addr, False)),
    "DOWNSTREAM_PEER_URI_SAN": _simple(lambda req, resp, d: req.ctx.peer_identity),
    "PROTOCOL": _simple(lambda req, resp, d: f"HTTP/{req.version}"),
    "GRPC_STATUS": _grpc_status,
    "GRPC_STATUS_NUMBER": _simple(_grpc_status("NUMBER")),
    "ROUTE_NAME": _simple(lambda req, resp, d: req.ctx.route.name or None
                          if req.ctx.route is not None else None),
    "HOSTNAME": _simple(lambda req, resp, d: _HOSTNAME),
    "DYNAMIC_METADATA": _metadata,
    "ENVIRONMENT": lambda a: _constant(os.environ.get(a or "")),
}


# ---- compiled formats ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Op:
    get: Getter
    max_len: int | None


Part = str | _Op


def compile_text(fmt: str) -> tuple[Part, ...]:
    """Literals and operators of a format string; ``FormatError`` for an unknown operator."""
    parts: list[Part] = []
    pos = 0
    for m in _OPERATOR.finditer(fmt):
        if m.start() > pos:
            parts.append(fmt[pos:m.start()])
        name, arg, max_len = m.group(1), m.group(2), m.group(3)
        make = OPERATORS.get(name)
        if make is None:
            raise FormatError(f"unsupported command operator %{name}%")
        parts.append(_Op(make(arg), int(max_len) if max_len else None))
        pos = m.end()
    if pos < len(fmt):
        parts.append(fmt[pos:])
    return tuple(parts)


def _value(op: _Op, req: Request, resp: Response, d: float) -> Value:
    v = op.get(req, resp, d)
    if op.max_len is not None and isinstance(v, str):
        v = v[:op.max_len]
    return v


class TextFormat:
    """Envoy's text format: operators substituted, ``-`` for what is missing."""

    __slots__ = ("parts",)

    def __init__(self, fmt: str):
        # the sink ends every line itself: a format's own trailing newline is not doubled
        self.parts = compile_text(fmt[:-1] if fmt.endswith("\n") else fmt)

    def format(self, req: Request, resp: Response, d: float) -> str:
        out = []
        for p in self.parts:
            if isinstance(p, str):
                out.append(p)
            else:
                v = _value(p, req, resp, d)
                out.append("-" if v is None or v == "" else str(v))
        return "".join(out)


JsonTemplate = dict[str, object]


@dataclass(frozen=True, slots=True)
class _Literal:
    value: object


@dataclass(frozen=True, slots=True)
class _Nested:
    fields: tuple[tuple[str, object], ...]


class JsonFormat:
    """Envoy's JSON format: each value is a format; a value that is exactly one operator keeps
    the operator's type (numbers stay numbers), missing ones are null (or left out with
    ``omit_empty_values``)."""

    __slots__ = ("fields", "omit_empty", "_dumps")

    def __init__(self, template: JsonTemplate, omit_empty: bool = False):
        self.fields = _compile_json(template)
        self.omit_empty = omit_empty
        self._dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    def record(self, req: Request, resp: Response, d: float,
               fields: tuple[tuple[str, object], ...] | None = None) -> dict[str, object]:
        rec: dict[str, object] = {}
        for k, spec in (fields if fields is not None else self.fields):
            v: object
            if isinstance(spec, _Literal):
                v = spec.value
            elif isinstance(spec, _Nested):
                v = self.record(req, resp, d, spec.fields)
            else:
                assert isinstance(spec, tuple)
                if len(spec) == 1 and isinstance(spec[0], _Op):
                    v = _value(spec[0], req, resp, d)          # typed
                else:
                    s = []
                    for p in spec:
                        if isinstance(p, str):
                            s.append(p)
                        else:
                            x = _value(p, req, resp, d)
                            s.append("-" if x is None else str(x))
                    v = "".join(s)
            if v is None and self.omit_empty:
                continue
            rec[k] = v
        return rec

    def format(self, req: Request, resp: Response, d: float) -> str:
        return self._dumps(self.record(req, resp, d))


def _compile_json(template: JsonTemplate) -> tuple[tuple[str, object], ...]:
    out: list[tuple[str, object]] = []
    for k, v in template.items():
        if isinstance(v, dict):
            out.append((k, _Nested(_compile_json(v))))
        elif isinstance(v, str):
            out.append((k, compile_text(v)))
        elif isinstance(v, (int, float, bool)) or v is None:
            out.append((k, _Literal(v)))
        else:
            raise FormatError(f"{k}: must be a string, number, bool or mapping")
    return tuple(out)


assert set(OPERATORS) == LOG_OPERATORS, "formatter and config disagree on the operators"


def make_format(text: str | None, json_template: str | None,
                omit_empty: bool = False) -> TextFormat | JsonFormat:
    """The compiled format of an access log config (Envoy's default when neither is given)."""
    if json_template is not None:
        return JsonFormat(json.loads(json_template), omit_empty)
    return TextFormat(text if text is not None else DEFAULT_FORMAT)
