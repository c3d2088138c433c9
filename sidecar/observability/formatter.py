"""Envoy's access log formats (``SubstitutionFormatString``), compiled once per log: the one
formatter of HTTP access logs and connection (TCP) access logs.

The config layer parses a format into segments (``sidecar.config.log_format``). Here each
operator is bound, once, to a getter of the log's context: ``compile_http`` for a finished
request (``(request, response, duration)``), ``compile_connection`` for a finished connection
(``ConnectionContext``). A text format becomes one generated function per log (the common
HTTP operators inline, the others calls of their getters). Request operators on a connection
print ``-`` (``RESPONSE_CODE`` 0), as Envoy prints them.

Values follow Envoy 1.40: text prints ``-`` for a missing value (``""`` with
``omit_empty_values``); JSON keeps the type of a value that is exactly one operator (numbers
stay numbers), prints ``null`` for a missing one (the key is left out with
``omit_empty_values``), and is written with its keys sorted, nested objects included.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable

from sidecar.config.log_format import (
    CONNECTION_OPERATORS,
    HTTP_OPERATORS,
    JsonField,
    LogFormat,
    Operator,
    Segment,
    header_names,
)
from sidecar.core.connection import ConnectionContext
from sidecar.core.message import Request, Response
from sidecar.observability.flags import flags_long_text, flags_text

Value = str | int | float | None
HttpGetter = Callable[[Request, Response, float], Value]
ConnectionGetter = Callable[[ConnectionContext], Value]

GRPC_NAMES = ("OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
              "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition",
              "Aborted", "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss",
              "Unauthenticated")
_GRPC_SNAKE = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
               "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
               "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
               "UNAUTHENTICATED")
# Envoy's long names of the response flags (%RESPONSE_FLAGS_LONG%)
_HOSTNAME = socket.gethostname()


# ---- shared value helpers ----------------------------------------------------------------------

class _IsoTime:
    """``%START_TIME%``: ISO-8601 UTC with milliseconds; the seconds part formatted once per
    second (a line is written per request: strftime each time would dominate it)."""

    __slots__ = ("sec", "prefix")

    def __init__(self) -> None:
        self.sec = -1
        self.prefix = ""

    def __call__(self, t: float) -> str:
        sec = int(t)
        if sec != self.sec:
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            self.sec = sec
        return f"{self.prefix}.{int((t - sec) * 1000):03d}Z"


def _strftime(fmt: str) -> Callable[[float], str]:
    """``%START_TIME(...)%``: strftime with Envoy's extensions (%3f/%6f/%9f fractions, %f =
    %9f, %s the epoch seconds)."""
    if not fmt:
        return _IsoTime()

    def render(t: float) -> str:
        frac = t - int(t)
        out = fmt.replace("%s", str(int(t)))
        for digits in (9, 6, 3):
            out = out.replace(f"%{digits}f", f"{int(frac * 10 ** digits):0{digits}d}")
        out = out.replace("%f", f"{int(frac * 1e9):09d}")
        return time.strftime(out, time.gmtime(t))
    return render


def _addr(addr: tuple[str, int] | None, port: bool = True) -> str | None:
    if not addr:
        return None
    if not port:
        return addr[0]
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return f"{host}:{addr[1]}"


# ---- HTTP: a finished request -----------------------------------------------------------------

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


def _http_req(arg: str) -> HttpGetter:
    names = header_names(arg)
    if len(names) == 1 and names[0][0] != ":":
        # the common case (one plain header): one lookup, no loop and no helper call
        name = names[0]
        return lambda req, resp, d: req.headers.get(name)
    if names == (":method",):
        return lambda req, resp, d: req.method

    def get(req: Request, resp: Response, d: float) -> Value:
        for n in names:
            v = _request_value(req, n)
            if v is not None:
                return v
        return None
    return get


def _http_resp(arg: str) -> HttpGetter:
    names = header_names(arg)

    def get(req: Request, resp: Response, d: float) -> Value:
        h = resp.headers
        for n in names:
            v = h.get(n)
            if v is None and n == "content-length" and resp.local and isinstance(resp.body, bytes):
                v = str(len(resp.body))     # a local reply's length, set when written
            if v is not None:
                return v
        return None
    return get


def _http_trailer(arg: str) -> HttpGetter:
    names = header_names(arg)

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


def _http_start_time(arg: str) -> HttpGetter:
    fmt = _strftime(arg)
    return lambda req, resp, d: fmt(time.time() - d)


def _http_grpc_status(arg: str) -> HttpGetter:
    style = arg or "CAMEL_STRING"
    names = GRPC_NAMES if style == "CAMEL_STRING" else _GRPC_SNAKE

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
        return names[code] if code < len(names) else str(code)
    return get


def _http_remote(req: Request, port: bool) -> Value:
    """The client's address: the peer, or the XFF entry trusted by xff_num_trusted_hops (then
    without a port, as Envoy prints it: ``:0``)."""
    ctx = req.ctx
    peer = ctx.downstream_addr
    if peer is not None and ctx.remote_ip == peer[0]:
        return _addr(peer, port)
    if not ctx.remote_ip:
        return None
    return _addr((ctx.remote_ip, 0), port)


def _http_metadata(arg: str) -> HttpGetter:
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


def _fixed(get: Callable[..., Value]) -> Callable[[str], Callable[..., Value]]:
    """An operator without an argument: the same getter for every use."""
    return lambda arg: get


def _env(arg: str) -> Callable[..., Value]:
    v = os.environ.get(arg)         # read when the log is built, as Envoy does at config load
    return lambda *a: v


_hostname: Callable[[str], Callable[..., Value]] = lambda arg: lambda *a: _HOSTNAME  # noqa: E731

HTTP: dict[str, Callable[[str], HttpGetter]] = {
    "START_TIME": _http_start_time,
    "REQ": _http_req,
    "RESP": _http_resp,
    "TRAILER": _http_trailer,
    "RESPONSE_CODE": _fixed(lambda req, resp, d: resp.status),
    "RESPONSE_FLAGS": _fixed(lambda req, resp, d: flags_text(req.ctx.flags)),
    "RESPONSE_FLAGS_LONG": _fixed(lambda req, resp, d: flags_long_text(req.ctx.flags)),
    "RESPONSE_CODE_DETAILS": _fixed(lambda req, resp, d: req.ctx.response_code_details or (
        None if resp.local else "via_upstream")),
    "DURATION": _fixed(lambda req, resp, d: int(d * 1000)),
    "BYTES_RECEIVED": _fixed(lambda req, resp, d: req.ctx.bytes_received),
    "BYTES_SENT": _fixed(lambda req, resp, d: req.ctx.bytes_sent),
    "UPSTREAM_HOST": _fixed(lambda req, resp, d: req.ctx.upstream_host or None),
    "UPSTREAM_CLUSTER": _fixed(lambda req, resp, d: req.ctx.cluster or None),
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": _fixed(lambda req, resp, d: req.ctx.attempts),
    "DOWNSTREAM_REMOTE_ADDRESS": _fixed(lambda req, resp, d: _http_remote(req, True)),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": _fixed(lambda req, resp, d: _http_remote(req, False)),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": _fixed(
        lambda req, resp, d: _addr(req.ctx.downstream_addr)),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": _fixed(
        lambda req, resp, d: _addr(req.ctx.downstream_addr, False)),
    "DOWNSTREAM_PEER_URI_SAN": _fixed(lambda req, resp, d: req.ctx.peer_identity),
    "PROTOCOL": _fixed(lambda req, resp, d: f"HTTP/{req.version}"),
    "GRPC_STATUS": _http_grpc_status,
    "GRPC_STATUS_NUMBER": lambda arg: _http_grpc_status("NUMBER"),
    "ROUTE_NAME": _fixed(lambda req, resp, d: req.ctx.route.name or None
                         if req.ctx.route is not None else None),
    "HOSTNAME": _hostname,
    "DYNAMIC_METADATA": _http_metadata,
    "ENVIRONMENT": _env,
}


# ---- connections: a finished TCP connection ---------------------------------------------------

def _conn_start_time(arg: str) -> ConnectionGetter:
    fmt = _strftime(arg)
    return lambda c: fmt(c.wall_start)


def _none(arg: str) -> ConnectionGetter:
    return lambda c: None


CONNECTION: dict[str, Callable[[str], ConnectionGetter]] = {
    "START_TIME": _conn_start_time,
    "DURATION": _fixed(lambda c: int(c.duration * 1000)),
    "BYTES_RECEIVED": _fixed(lambda c: c.bytes_received),
    "BYTES_SENT": _fixed(lambda c: c.bytes_sent),
    "RESPONSE_FLAGS": _fixed(lambda c: flags_text(c.flags)),
    "RESPONSE_FLAGS_LONG": _fixed(lambda c: flags_long_text(c.flags)),
    "UPSTREAM_HOST": _fixed(lambda c: c.upstream_host or None),
    "UPSTREAM_CLUSTER": _fixed(lambda c: c.cluster or None),
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": _fixed(lambda c: c.attempts),
    "UPSTREAM_LOCAL_ADDRESS": _fixed(lambda c: c.upstream_local_addr or None),
    "UPSTREAM_TRANSPORT_FAILURE_REASON": _fixed(lambda c: c.upstream_failure or None),
    "DOWNSTREAM_REMOTE_ADDRESS": _fixed(lambda c: _addr(c.remote_addr)),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": _fixed(lambda c: c.remote_addr[0]),
    "DOWNSTREAM_REMOTE_PORT": _fixed(lambda c: c.remote_addr[1]),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": _fixed(lambda c: _addr(c.direct_remote_addr)),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": _fixed(lambda c: c.direct_remote_addr[0]),
    "DOWNSTREAM_LOCAL_ADDRESS": _fixed(lambda c: _addr(c.local_addr)),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": _fixed(lambda c: c.local_addr[0]),
    "DOWNSTREAM_LOCAL_PORT": _fixed(lambda c: c.local_addr[1]),
    "REQUESTED_SERVER_NAME": _fixed(lambda c: c.server_name or None),
    "DOWNSTREAM_PEER_URI_SAN": _fixed(lambda c: c.peer_identity),
    "DOWNSTREAM_TLS_VERSION": _fixed(lambda c: c.tls_version or None),
    "CONNECTION_ID": _fixed(lambda c: c.id),
    "UPSTREAM_CONNECTION_ID": _none,
    "CONNECTION_TERMINATION_DETAILS": _fixed(lambda c: c.termination or None),
    "FILTER_CHAIN_NAME": _fixed(lambda c: c.filter_chain_name or None),
    "HOSTNAME": _hostname,
    "ENVIRONMENT": _env,
    # request operators on a connection, as Envoy prints them
    "RESPONSE_CODE": _fixed(lambda c: 0),
    "PROTOCOL": _none,
    "REQ": _none,
    "RESP": _none,
    "TRAILER": _none,
    "RESPONSE_CODE_DETAILS": _none,
    "GRPC_STATUS": _none,
    "GRPC_STATUS_NUMBER": _none,
    "ROUTE_NAME": _none,
    "DYNAMIC_METADATA": _none,
}

assert set(HTTP) == HTTP_OPERATORS, "formatter and config disagree on the HTTP operators"
assert set(CONNECTION) == CONNECTION_OPERATORS, \
    "formatter and config disagree on the connection operators"


# ---- compiling ---------------------------------------------------------------------------------

# a getter of either context (HttpGetter or ConnectionGetter): compiled formats are the same
# code for both, called with the context's arguments
_Getter = Callable[..., object]
_Table = dict[str, Callable[[str], Callable[..., Value]]]


def _bind(op: Operator, table: _Table) -> _Getter:
    get = table[op.name](op.arg)
    n = op.max_length
    if n is None:
        return get

    def truncated(*args: object) -> Value:
        v = get(*args)
        return v[:n] if isinstance(v, str) else v
    return truncated


# The common HTTP operators as expressions of the generated line function (below): a line of
# Envoy's default format is then one Python frame instead of one per operator. Each entry maps
# an operator's argument to (expression, kind): "int" never None, "str" a str or None, "any"
# anything. Names in the expressions: req, resp, d, ctx (req.ctx), h (req.headers), and the
# constants the generator binds (_c<i>). Operators not here call their getter.
_REQ_PSEUDO = {":method": "req.method", ":scheme": "req.scheme", ":authority": "h.get('host')",
               ":path": "((ctx.original_path or req.path) + '?' + req.query if req.query "
                        "else (ctx.original_path or req.path))"}
_HTTP_INLINE: dict[str, tuple[str, str]] = {
    "RESPONSE_CODE": ("resp.status", "int"),
    "DURATION": ("int(d * 1000)", "int"),
    "BYTES_RECEIVED": ("ctx.bytes_received", "int"),
    "BYTES_SENT": ("ctx.bytes_sent", "int"),
    "UPSTREAM_HOST": ("ctx.upstream_host", "str"),
    "UPSTREAM_CLUSTER": ("ctx.cluster", "str"),
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": ("ctx.attempts", "int"),
    "RESPONSE_FLAGS": ("_flags_text(ctx.flags)", "str"),
    "PROTOCOL": ("'HTTP/' + req.version", "str"),
}


def _inline_http(op: Operator, consts: list[object]) -> tuple[str, str] | None:
    """An expression for ``op`` in the generated HTTP line, or None to call its getter."""
    if op.max_length is not None:
        return None
    if op.name in _HTTP_INLINE:
        return _HTTP_INLINE[op.name]
    if op.name != "REQ":
        return None
    alternatives = []
    for name in header_names(op.arg):      # the header, then its fallback (``X-A?:PATH``)
        if name[0] == ":":
            alternatives.append(_REQ_PSEUDO.get(name, "None"))
        else:
            consts.append(name)
            alternatives.append(f"h.get(_c{len(consts) - 1})")
    if not alternatives:
        return None
    expr = alternatives[-1]
    for alt in reversed(alternatives[:-1]):
        expr = f"(_v if (_v := {alt}) is not None else {expr})"
    return expr, "str"


_HTTP_PROLOGUE = ("req, resp, d", "    ctx = req.ctx\n    h = req.headers\n")


def _text(segments: tuple[Segment, ...], table: _Table, empty: str) -> Callable[..., str]:
    """A function writing one line of ``segments``: generated once per format, with the
    literals, the common operators inline and the others as calls of their bound getters (a
    per-operator call each line was a third of a request's cost with Envoy's default format).
    Everything taken from the config is bound as a constant, never written into the source."""
    consts: list[object] = [empty]          # _c0 is the text of a missing value
    http = table is HTTP
    params, prologue = _HTTP_PROLOGUE if http else ("*args", "")
    pieces: list[str] = []
    body: list[str] = []
    lit: list[str] = []

    def literal() -> None:
        if lit:
            consts.append("".join(lit))
            pieces.append(f"_c{len(consts) - 1}")
            lit.clear()

    for s in segments:
        if isinstance(s, str):
            lit.append(s)
            continue
        literal()
        inline = _inline_http(s, consts) if http else None
        if inline is None:
            consts.append(_bind(s, table))
            expr, kind = (f"_c{len(consts) - 1}({params})", "any")
        else:
            expr, kind = inline
        v = f"_v{len(body)}"
        body.append(f"    {v} = {expr}\n")
        if kind == "int":
            pieces.append(f"str({v})")
        elif kind == "str":
            pieces.append(f"({v} or _c0)")
        else:
            pieces.append(f"(_c0 if {v} is None or {v} == '' else "
                          f"{v} if {v}.__class__ is str else str({v}))")
    literal()
    if not body:
        line = "".join(consts[1:])  # type: ignore[arg-type]
        return lambda *args: line
    src = (f"def render({params}):\n{prologue if http else ''}{''.join(body)}"
           f"    return ''.join(({', '.join(pieces)},))\n")
    namespace: dict[str, object] = {f"_c{i}": c for i, c in enumerate(consts)}
    namespace["_flags_text"] = flags_text
    exec(compile(src, "<access log format>", "exec"), namespace)   # noqa: S102
    return namespace["render"]  # type: ignore[return-value]


def _json(fields: tuple[JsonField, ...], table: _Table, omit: bool
          ) -> Callable[..., dict[str, object]]:
    empty = "" if omit else "-"
    bound: list[tuple[str, _Getter]] = []
    for f in sorted(fields, key=lambda f: f.key):          # Envoy writes keys sorted
        v = f.value
        if f.nested:
            bound.append((f.key, _json(v, table, omit)))   # type: ignore[arg-type]
        elif isinstance(v, tuple):
            if len(v) == 1 and isinstance(v[0], Operator):
                bound.append((f.key, _bind(v[0], table)))   # one operator keeps its type
            else:
                bound.append((f.key, _text(v, table, empty)))  # type: ignore[arg-type]
        else:
            bound.append((f.key, lambda *args, _v=v: _v))
    items = tuple(bound)

    def render(*args: object) -> dict[str, object]:
        rec: dict[str, object] = {}
        for k, get in items:
            val = get(*args)
            if omit and (val is None or val == {}):
                continue
            rec[k] = val
        return rec
    return render


def _compile(fmt: LogFormat, table: _Table) -> Callable[..., str]:
    if fmt.json is not None:
        record = _json(fmt.json, table, fmt.omit_empty_values)
        dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
        return lambda *args: dumps(record(*args))
    segments = fmt.text or ()
    if segments and isinstance(segments[-1], str) and segments[-1].endswith("\n"):
        # the sink ends every line itself: the format's own final newline is that one
        segments = (*segments[:-1], segments[-1][:-1])
    return _text(segments, table, "" if fmt.omit_empty_values else "-")


HttpFormat = Callable[[Request, Response, float], str]
ConnectionFormat = Callable[[ConnectionContext], str]


def compile_http(fmt: LogFormat) -> HttpFormat:
    """A line of an HTTP access log: ``format(request, response, duration_s)`` (no newline:
    the sink ends each line)."""
    return _compile(fmt, HTTP)


def compile_connection(fmt: LogFormat) -> ConnectionFormat:
    """A line of a connection access log: ``format(connection)``."""
    return _compile(fmt, CONNECTION)
