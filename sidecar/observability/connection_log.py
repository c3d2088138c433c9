"""Connection access logs (tcp_proxy's ``access_log``, a listener's own): one line per
connection, in an Envoy format, written through the shared non-blocking sinks.

The format is parsed at config time (``sidecar.config.log_format``); here each operator is
bound once to a getter of ``ConnectionContext``, so a line is a pass over prepared getters.
Values follow Envoy: text prints ``-`` for an empty value, JSON ``null`` (or omits the key
with ``omit_empty_values``); durations in milliseconds, bytes as numbers.

This is a small formatter of the connection (TCP) operators only; HTTP access logs have
their own (``sidecar.observability.access_log``).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable

from sidecar.config.l4 import ConnectionLog
from sidecar.config.log_format import JsonField, LogFormat, Operator, Segment
from sidecar.core.connection import ConnectionContext
from sidecar.observability.access_log import sink_for

log = logging.getLogger("sidecar.access_log")

Value = str | int | float | None
Getter = Callable[[ConnectionContext], Value]

_HOSTNAME = socket.gethostname()
_FLAG_LONG = {
    "UF": "UpstreamConnectionFailure", "UO": "UpstreamOverflow", "UH": "NoHealthyUpstream",
    "NR": "NoRouteFound", "NC": "NoClusterFound", "UT": "UpstreamRequestTimeout",
    "DT": "DurationTimeout", "SI": "StreamIdleTimeout", "UC": "UpstreamConnectionTermination",
    "DC": "DownstreamConnectionTermination", "NFCF": "NoFilterConfigFound",
}


def _addr(a: tuple[str, int] | None) -> str | None:
    if not a:
        return None
    host, port = a
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _start_time(arg: str) -> Getter:
    if not arg:
        def default(c: ConnectionContext) -> str:
            t = c.wall_start
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + \
                f".{int((t % 1) * 1000):03d}Z"
        return default
    # Envoy's extensions of strftime: %3f/%6f/%9f (fractions of a second), %f (= %9f), %s
    def custom(c: ConnectionContext) -> str:
        t = c.wall_start
        frac = t % 1
        out = arg.replace("%s", str(int(t)))
        for n in (3, 6, 9):
            out = out.replace(f"%{n}f", f"{int(frac * 10 ** n):0{n}d}")
        out = out.replace("%f", f"{int(frac * 10 ** 9):09d}")
        return time.strftime(out, time.gmtime(t))
    return custom


_GETTERS: dict[str, Getter] = {
    "DURATION": lambda c: int(c.duration * 1000),
    "BYTES_RECEIVED": lambda c: c.bytes_received,
    "BYTES_SENT": lambda c: c.bytes_sent,
    # Envoy prints "-" for no flag, in JSON too
    "RESPONSE_FLAGS": lambda c: ",".join(c.flags) or "-",
    "RESPONSE_FLAGS_LONG": lambda c: ",".join(_FLAG_LONG.get(f, f) for f in c.flags) or "-",
    "UPSTREAM_HOST": lambda c: c.upstream_host or None,
    "UPSTREAM_CLUSTER": lambda c: c.cluster or None,
    "UPSTREAM_LOCAL_ADDRESS": lambda c: c.upstream_local_addr or None,
    "UPSTREAM_TRANSPORT_FAILURE_REASON": lambda c: c.upstream_failure or None,
    "DOWNSTREAM_REMOTE_ADDRESS": lambda c: _addr(c.remote_addr),
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda c: c.remote_addr[0],
    "DOWNSTREAM_REMOTE_PORT": lambda c: c.remote_addr[1],
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS": lambda c: _addr(c.direct_remote_addr),
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT": lambda c: c.direct_remote_addr[0],
    "DOWNSTREAM_LOCAL_ADDRESS": lambda c: _addr(c.local_addr),
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": lambda c: c.local_addr[0],
    "DOWNSTREAM_LOCAL_PORT": lambda c: c.local_addr[1],
    "REQUESTED_SERVER_NAME": lambda c: c.server_name or None,
    "DOWNSTREAM_PEER_URI_SAN": lambda c: c.peer_identity,
    "DOWNSTREAM_TLS_VERSION": lambda c: c.tls_version or None,
    "CONNECTION_ID": lambda c: c.id,
    "UPSTREAM_CONNECTION_ID": lambda c: None,
    "CONNECTION_TERMINATION_DETAILS": lambda c: c.termination or None,
    "FILTER_CHAIN_NAME": lambda c: c.filter_chain_name or None,
    "HOSTNAME": lambda c: _HOSTNAME,
    # HTTP operators on a TCP connection, as Envoy prints them
    "PROTOCOL": lambda c: None,
    "RESPONSE_CODE": lambda c: 0,
    "REQ": lambda c: None,
    "RESP": lambda c: None,
    "TRAILER": lambda c: None,
}


def _bind(op: Operator) -> Getter:
    get = _start_time(op.arg) if op.name == "START_TIME" else _GETTERS[op.name]
    n = op.max_length
    if n is None:
        return get

    def truncated(c: ConnectionContext) -> Value:
        v = get(c)
        return v[:n] if isinstance(v, str) else v
    return truncated


def _text(parts: tuple[Segment, ...]) -> Callable[[ConnectionContext], str]:
    bound: list[str | Getter] = [p if isinstance(p, str) else _bind(p) for p in parts]

    def render(c: ConnectionContext) -> str:
        out = []
        for p in bound:
            if isinstance(p, str):
                out.append(p)
            else:
                v = p(c)
                out.append("-" if v is None or v == "" else str(v))
        return "".join(out)
    return render


def _json_value(parts: tuple[Segment, ...]) -> Callable[[ConnectionContext], Value]:
    """A single operator keeps its type (numbers stay numbers); anything else is a string."""
    if len(parts) == 1 and isinstance(parts[0], Operator):
        return _bind(parts[0])
    text = _text(parts)
    return lambda c: text(c)


def _const(v: object) -> Callable[[ConnectionContext], object]:
    return lambda c: v


def _json(fields: tuple[JsonField, ...], omit: bool) -> Callable[[ConnectionContext], dict[str, object]]:
    bound: list[tuple[str, Callable[[ConnectionContext], object]]] = []
    for f in fields:
        v = f.value
        if f.nested:
            bound.append((f.key, _json(v, omit)))  # type: ignore[arg-type]
        elif isinstance(v, tuple):
            bound.append((f.key, _json_value(v)))  # type: ignore[arg-type]
        else:
            bound.append((f.key, _const(v)))

    def render(c: ConnectionContext) -> dict[str, object]:
        out: dict[str, object] = {}
        for k, get in bound:
            val = get(c)
            if omit and (val is None or val == "" or val == {}):
                continue
            out[k] = val
        return out
    return render


class ConnectionLogger:
    """One configured connection log (a destination and a format)."""

    __slots__ = ("_render", "_sink")

    def __init__(self, cfg: ConnectionLog):
        fmt: LogFormat = cfg.format
        if fmt.json is not None:
            as_dict = _json(fmt.json, fmt.omit_empty_values)
            # keys sorted, as Envoy writes its JSON logs (a protobuf Struct)
            dumps = json.JSONEncoder(separators=(",", ":"), default=str, sort_keys=True).encode
            self._render: Callable[[ConnectionContext], str] = lambda c: dumps(as_dict(c))
        else:
            text = _text(fmt.text or ())
            # the sink adds the newline; a format's own final newline is that one
            self._render = lambda c: text(c).removesuffix("\n")
        self._sink = sink_for(cfg.path)

    def format_line(self, ctx: ConnectionContext) -> str:
        return self._render(ctx)

    def log(self, ctx: ConnectionContext) -> None:
        try:
            line = self._render(ctx)
        except Exception:  # a log line must never break a connection
            log.exception("connection access log formatting failed")
            return
        self._sink.write(line)
