"""Access log: one line per request, JSON by default, to stdout, stderr or a file.

* Fields are configurable (``fields:``); the default set is ``DEFAULT_FIELDS``. Request and
  response headers can be logged by name (``request_header.x-tenant``,
  ``response_header.content-type``) except sensitive ones (``Authorization``, cookies, API
  keys, anything that looks like a token or secret), which are refused: never logged.
* Writing never blocks the event loop: a line is formatted on the loop and appended to an
  in-memory queue; one writer thread per destination joins the queue and writes it in large
  chunks (every 50 ms, or sooner when 512 lines wait). If the destination cannot keep up and
  ``MAX_QUEUED_LINES`` wait, new lines are dropped and counted
  (``sidecar_access_log_dropped_total``) rather than growing memory or stalling requests.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import sys
import threading
import time
from typing import Optional

log = logging.getLogger("sidecar.access_log")

DEFAULT_FIELDS = ("start_time", "method", "path", "protocol", "status", "response_flags",
                  "duration_ms", "upstream_duration_ms", "bytes_received", "bytes_sent",
                  "upstream_host", "route", "cluster", "request_id", "trace_id", "user_agent",
                  "downstream_address", "authority", "listener")

EXTRA_FIELDS = ("attempts", "upstream_cluster", "virtual_host", "peer_identity", "span_id",
                "x_forwarded_for", "referer")

KNOWN_FIELDS = frozenset(DEFAULT_FIELDS + EXTRA_FIELDS)
REQUEST_HEADER = "request_header."
RESPONSE_HEADER = "response_header."

SENSITIVE_HEADERS = frozenset((
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key",
    "x-auth-token", "x-amz-security-token", "x-csrf-token", "x-xsrf-token",
))
_SENSITIVE_WORDS = ("token", "secret", "password", "passwd", "session", "credential", "apikey",
                    "api-key", "api_key", "auth", "cookie", "signature")

MAX_QUEUED_LINES = 100_000
FLUSH_INTERVAL_S = 0.05
WAKE_AT_LINES = 512


def is_sensitive_header(name: str) -> bool:
    n = name.lower()
    if n in SENSITIVE_HEADERS:
        return True
    return any(w in n for w in _SENSITIVE_WORDS)


def check_fields(fields, path: str = "access_log.fields") -> tuple[str, ...]:
    """Validate a field list (for the config loaders): unknown or sensitive fields are a
    ConfigError with the path of the bad entry."""
    from sidecar.errors import ConfigError
    out = []
    for i, f in enumerate(fields):
        p = f"{path}[{i}]"
        if not isinstance(f, str) or not f:
            raise ConfigError(p, "must be a field name")
        for prefix in (REQUEST_HEADER, RESPONSE_HEADER):
            if f.startswith(prefix):
                name = f[len(prefix):]
                if not name:
                    raise ConfigError(p, f"{prefix}<name> needs a header name")
                if is_sensitive_header(name):
                    raise ConfigError(p, f"header {name!r} may carry credentials and is never logged")
                break
        else:
            if f not in KNOWN_FIELDS:
                raise ConfigError(p, f"unknown access log field {f!r} (known: "
                                  f"{', '.join(sorted(KNOWN_FIELDS))}, request_header.<name>, "
                                  f"response_header.<name>)")
        out.append(f)
    return tuple(out)


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
        self.dropped_counter = None
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
            c = self.dropped_counter
            if c is not None:
                c.inc()
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


def _trace_ids(req) -> tuple[Optional[str], Optional[str]]:
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


class AccessLogger:
    __slots__ = ("fields", "format", "_sink", "listener", "_want_trace")

    def __init__(self, path: str, fmt: str, fields: tuple[str, ...], listener: str,
                 metrics=None):
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
        self._sink = sink_for(path)
        self._want_trace = "trace_id" in self.fields or "span_id" in self.fields
        if metrics is not None and metrics.enabled and self._sink.dropped_counter is None:
            self._sink.dropped_counter = metrics.counter(
                "sidecar_access_log_dropped_total",
                "Access log lines dropped because the destination could not keep up",
                ("path",)).labels(path)

    def record(self, req, resp, duration: float) -> dict:
        ctx = req.ctx
        h = req.headers
        peer = ctx.downstream_addr
        route = ctx.route
        trace_id = span_id = None
        if self._want_trace:
            trace_id, span_id = _trace_ids(req)
        up = ctx.upstream_duration
        values = {
            "start_time": _TIME.format(time.time() - duration),
            "method": req.method, "path": req.path, "protocol": f"HTTP/{req.version}",
            "status": resp.status, "response_flags": ",".join(ctx.flags) or "-",
            "duration_ms": round(duration * 1000, 3),
            "upstream_duration_ms": round(up * 1000, 3) if up is not None else None,
            "bytes_received": ctx.bytes_received, "bytes_sent": ctx.bytes_sent,
            "upstream_host": ctx.upstream_host or None,
            "route": route.name if route is not None else None,
            "cluster": ctx.cluster or None, "upstream_cluster": ctx.cluster or None,
            "request_id": ctx.request_id or None,
            "trace_id": trace_id, "span_id": span_id, "user_agent": h.get("user-agent"),
            "downstream_address": f"{peer[0]}:{peer[1]}" if peer else None,
            "authority": h.get("host"), "listener": self.listener,
            "attempts": ctx.attempts, "virtual_host": ctx.vhost.name if ctx.vhost is not None else None,
            "peer_identity": ctx.peer_identity, "x_forwarded_for": h.get("x-forwarded-for"),
            "referer": h.get("referer"),
        }
        out = {}
        for k in self.fields:
            if k in values:
                out[k] = values[k]
            elif k.startswith(REQUEST_HEADER):
                out[k] = h.get(k[len(REQUEST_HEADER):])
            elif k.startswith(RESPONSE_HEADER):
                out[k] = resp.headers.get(k[len(RESPONSE_HEADER):])
            else:
                out[k] = None
        return out

    def format_line(self, req, resp, duration: float) -> str:
        rec = self.record(req, resp, duration)
        if self.format == "json":
            return json.dumps(rec, separators=(",", ":"), ensure_ascii=False, default=str)
        return " ".join("-" if v is None else str(v) for v in rec.values())

    def log(self, req, resp, duration: float) -> None:
        try:
            line = self.format_line(req, resp, duration)
        except Exception:  # a log line must never fail a request
            log.exception("access log formatting failed")
            return
        self._sink.write(line)


def make_access_logger(cfg, listener_name: str, metrics=None):
    if cfg.format == "dev":
        from sidecar.devlog import DevLogger
        return DevLogger(cfg.path, listener_name)
    return AccessLogger(cfg.path, cfg.format, cfg.fields, listener_name, metrics)
