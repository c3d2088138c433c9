"""Access logs: one line per request (JSON by default, or an Envoy format), one per connection
(connection logs, always an Envoy format), to stdout, stderr or a file.

* Envoy formats (``log_format``) are compiled by ``sidecar.observability.formatter``, the one
  formatter of request and connection logs.

* Fields are configurable (``fields:``); the default set is ``DEFAULT_FIELDS``. Request and
  response headers can be logged by name (``request_header.x-tenant``,
  ``response_header.content-type``) except sensitive ones (``Authorization``, cookies, API
  keys, anything that looks like a token or secret), which are refused: never logged.
* Writing never blocks the event loop: a line is formatted on the loop and appended to an
  in-memory queue; one writer thread per destination joins the queue and writes it in large
  chunks (every 50 ms, or sooner when 512 lines wait). If the destination cannot keep up and
  ``MAX_QUEUED_LINES`` wait, new lines are dropped and counted
  (``sidecar_access_log_lines_total{outcome="dropped"}``) rather than growing memory or
  stalling requests.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import sys
import threading
import time
from typing import Protocol

from sidecar.config.l4 import ConnectionLog
from sidecar.config.listener import (
    DEFAULT_FIELDS,
    KNOWN_FIELDS,
    REQUEST_HEADER,
    RESPONSE_HEADER,
    AccessLogConfig,
)
from sidecar.config.log_format import HTTP_OPERATORS, default_format, is_sensitive_header
from sidecar.core.connection import ConnectionContext
from sidecar.core.message import Request, Response
from sidecar.observability.devlog import DevLogger
from sidecar.observability.flags import flags_text
from sidecar.observability.formatter import compile_connection, compile_http

log = logging.getLogger("sidecar.access_log")


MAX_QUEUED_LINES = 100_000
FLUSH_INTERVAL_S = 0.05
WAKE_AT_LINES = 512


# ---- the sink: a queue and a writer thread per destination ----------------------------------

class LogSink:
    """Lines queued by the event loop, written by a daemon thread in large chunks."""

    def __init__(self, path: str):
        self.path = path
        self._q: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._pending = 0          # lines taken off the queue but not yet written
        self.dropped = 0
        self.written = 0
        self._closed = False
        self._file = None
        if path not in ("/dev/stdout", "-", "/dev/stderr"):
            self._file = open(path, "a", encoding="utf-8", buffering=1 << 16)
        self._thread = threading.Thread(target=self._run, name=f"access-log:{path}", daemon=True)
        self._thread.start()

    def _stream(self):
        if self._file is not None:
            return self._file
        return sys.stderr if self.path == "/dev/stderr" else sys.stdout

    def write(self, line: str) -> None:
        """Called on the event loop: O(1), never blocks."""
        q = self._q
        n = len(q)
        if n >= MAX_QUEUED_LINES:
            self.dropped += 1
            return
        q.append(line)
        if n == WAKE_AT_LINES:
            self._wake.set()

    def _drain(self) -> None:
        q = self._q
        if not q:
            return
        parts = []
        pop = q.popleft
        try:
            while True:
                parts.append(pop())
        except IndexError:
            pass
        self._pending = len(parts)
        try:
            out = self._stream()
            out.write("\n".join(parts) + "\n")
            out.flush()
            self.written += len(parts)
        except (OSError, ValueError) as e:   # a closed or broken destination: drop, say so once
            self.dropped += len(parts)
            if not getattr(self, "_warned", False):
                self._warned = True
                log.warning("access log %s: write failed (%s); lines are being dropped", self.path, e)
        finally:
            self._pending = 0

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(FLUSH_INTERVAL_S)
            self._wake.clear()
            self._drain()
            with self._idle:
                self._idle.notify_all()
        self._drain()

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until everything queued so far is written (tests, shutdown)."""
        end = time.monotonic() + timeout
        while (self._q or self._pending) and time.monotonic() < end:
            self._wake.set()
            with self._idle:
                self._idle.wait(0.05)
        return not self._q and not self._pending

    def close(self) -> None:
        self.flush()
        self._closed = True
        self._wake.set()
        self._thread.join(1.0)
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass


_SINKS: dict[str, LogSink] = {}
_SINKS_LOCK = threading.Lock()


def access_log_sinks() -> list[tuple[str, LogSink]]:
    with _SINKS_LOCK:
        return list(_SINKS.items())


def sink_for(path: str) -> LogSink:
    """One sink per destination for the process (listeners and config reloads share it)."""
    with _SINKS_LOCK:
        s = _SINKS.get(path)
        if s is None or s._closed:
            s = _SINKS[path] = LogSink(path)
        return s


def flush_all(timeout: float = 2.0) -> bool:
    ok = True
    for s in list(_SINKS.values()):
        ok = s.flush(timeout) and ok
    return ok


def close_all() -> None:
    with _SINKS_LOCK:
        sinks = list(_SINKS.values())
        _SINKS.clear()
    for s in sinks:
        s.close()


atexit.register(flush_all, 2.0)


# ---- the logger ------------------------------------------------------------------------------

class _TimeCache:
    """ISO-8601 UTC with milliseconds; the seconds part is formatted once per second."""
    __slots__ = ("sec", "prefix")

    def __init__(self):
        self.sec = -1
        self.prefix = ""

    def format(self, t: float) -> str:
        sec = int(t)
        if sec != self.sec:
            self.sec = sec
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self.prefix}.{int((t - sec) * 1000):03d}Z"


_TIME = _TimeCache()
_DEFAULT_HTTP_FORMAT = default_format(HTTP_OPERATORS)


def _trace_ids(req) -> tuple[str | None, str | None]:
    """(trace id, span id) of the request: its server span, else an incoming context that
    was passed through unsampled (so the log still joins the caller's trace)."""
    span = req.ctx.span
    if span is not None:
        return getattr(span, "trace_id_hex", None), getattr(span, "span_id_hex", None)
    h = req.headers
    tp = h.get("traceparent")
    if tp is not None and len(tp) >= 55 and tp[2] == "-":
        return tp[3:35], None
    b3 = h.get("b3")
    if b3 is not None and "-" in b3:
        return b3.split("-", 1)[0], None
    t = h.get("x-b3-traceid")
    return (t, None) if t else (None, None)


def _peer(req, resp, d):
    peer = req.ctx.downstream_addr
    return f"{peer[0]}:{peer[1]}" if peer else None


def _upstream_ms(req, resp, d):
    up = req.ctx.upstream_duration
    return round(up * 1000, 3) if up is not None else None


# field name -> getter(req, resp, duration); the logger binds the configured ones once
_GETTERS = {
    "start_time": lambda req, resp, d: _TIME.format(time.time() - d),
    "method": lambda req, resp, d: req.method,
    # the path as the client sent it (a route may have rewritten req.path since)
    "path": lambda req, resp, d: req.ctx.original_path or req.path,
    "protocol": lambda req, resp, d: f"HTTP/{req.version}",
    "status": lambda req, resp, d: resp.status,
    "response_flags": lambda req, resp, d: flags_text(req.ctx.flags),
    "duration_ms": lambda req, resp, d: round(d * 1000, 3),
    "upstream_duration_ms": _upstream_ms,
    "bytes_received": lambda req, resp, d: req.ctx.bytes_received,
    "bytes_sent": lambda req, resp, d: req.ctx.bytes_sent,
    "upstream_host": lambda req, resp, d: req.ctx.upstream_host or None,
    "route": lambda req, resp, d: req.ctx.route.name if req.ctx.route is not None else None,
    "cluster": lambda req, resp, d: req.ctx.cluster or None,
    "upstream_cluster": lambda req, resp, d: req.ctx.cluster or None,
    "request_id": lambda req, resp, d: req.ctx.request_id or None,
    "trace_id": lambda req, resp, d: _trace_ids(req)[0],
    "span_id": lambda req, resp, d: _trace_ids(req)[1],
    "user_agent": lambda req, resp, d: req.headers.get("user-agent"),
    "downstream_address": _peer,
    "authority": lambda req, resp, d: req.headers.get("host"),
    "attempts": lambda req, resp, d: req.ctx.attempts,
    "virtual_host": lambda req, resp, d: req.ctx.vhost_name or None,
    "peer_identity": lambda req, resp, d: req.ctx.peer_identity,
    "x_forwarded_for": lambda req, resp, d: req.headers.get("x-forwarded-for"),
    "referer": lambda req, resp, d: req.headers.get("referer"),
    # of gRPC requests (headers or trailers), set when the stream ended; null otherwise
    "grpc_status": lambda req, resp, d: req.ctx.grpc_status,
}
assert set(_GETTERS) == KNOWN_FIELDS - {"listener"}


def _getter(field: str, listener: str):
    if field == "listener":
        return lambda req, resp, d: listener
    g = _GETTERS.get(field)
    if g is not None:
        return g
    if field.startswith(REQUEST_HEADER):
        name = field[len(REQUEST_HEADER):].lower()
        return lambda req, resp, d: req.headers.get(name)
    if field.startswith(RESPONSE_HEADER):
        name = field[len(RESPONSE_HEADER):].lower()
        return lambda req, resp, d: resp.headers.get(name)
    log.warning("unknown access log field %r (logged as null)", field)
    return lambda req, resp, d: None


class RequestLogger(Protocol):
    """Writes one line per finished request (``AccessLogger``, the dev log)."""

    def log(self, req: Request, resp: Response, duration: float) -> None: ...


class AccessLogger:
    __slots__ = ("fields", "format", "_sink", "listener", "_getters", "_dumps")

    def __init__(self, path: str, fmt: str, fields: tuple[str, ...], listener: str):
        wanted = []
        for f in (fields or DEFAULT_FIELDS):
            for prefix in (REQUEST_HEADER, RESPONSE_HEADER):
                if f.startswith(prefix) and is_sensitive_header(f[len(prefix):]):
                    log.warning("access log field %r refused: it may carry credentials", f)
                    break
            else:
                wanted.append(f)
        self.fields = tuple(wanted)
        self.format = fmt
        self.listener = listener
        self._getters = tuple((f, _getter(f, listener)) for f in self.fields)
        self._dumps = json.JSONEncoder(separators=(",", ":")).encode   # values are str/int/float/None
        self._sink = sink_for(path)     # its counts are exported at scrape time (sidecar.stats)

    def record(self, req, resp, duration: float) -> dict:
        return {name: get(req, resp, duration) for name, get in self._getters}

    def format_line(self, req, resp, duration: float) -> str:
        rec = self.record(req, resp, duration)
        if self.format == "json":
            return self._dumps(rec)
        return " ".join("-" if v is None else str(v) for v in rec.values())

    def log(self, req, resp, duration: float) -> None:
        try:
            line = self.format_line(req, resp, duration)
        except Exception:  # a log line must never fail a request
            log.exception("access log formatting failed")
            return
        self._sink.write(line)


class EnvoyFormatLogger:
    """An access log in one of Envoy's formats (text or JSON command operators)."""

    __slots__ = ("_format", "_sink")

    def __init__(self, cfg: AccessLogConfig):
        self._format = compile_http(cfg.log_format or _DEFAULT_HTTP_FORMAT)
        self._sink = sink_for(cfg.path)

    def format_line(self, req: Request, resp: Response, duration: float) -> str:
        return self._format(req, resp, duration)

    def log(self, req: Request, resp: Response, duration: float) -> None:
        try:
            line = self._format(req, resp, duration)
        except Exception:  # a log line must never fail a request
            log.exception("access log formatting failed")
            return
        self._sink.write(line)


class ConnectionLogger:
    """A connection access log (tcp_proxy's ``access_log``, an L4 listener's own): one line per
    connection, in an Envoy format, through the same sinks and formatter as HTTP logs."""

    __slots__ = ("_format", "_sink")

    def __init__(self, cfg: ConnectionLog):
        self._format = compile_connection(cfg.format)
        self._sink = sink_for(cfg.path)

    def format_line(self, ctx: ConnectionContext) -> str:
        return self._format(ctx)

    def log(self, ctx: ConnectionContext) -> None:
        try:
            line = self._format(ctx)
        except Exception:  # a log line must never break a connection
            log.exception("connection access log formatting failed")
            return
        self._sink.write(line)


def make_access_logger(cfg: AccessLogConfig, listener_name: str) -> RequestLogger:
    if cfg.format == "dev":
        return DevLogger(cfg.path, listener_name)
    if cfg.format == "envoy":
        return EnvoyFormatLogger(cfg)
    return AccessLogger(cfg.path, cfg.format, cfg.fields, listener_name)
