"""Access log: one line per request, JSON by default. Sensitive headers are never logged."""

from __future__ import annotations

import json
import sys
import time

DEFAULT_FIELDS = ("start_time", "method", "path", "protocol", "status", "response_flags",
                  "duration_ms", "upstream_duration_ms", "bytes_received", "bytes_sent",
                  "upstream_host", "route", "cluster", "request_id", "trace_id", "user_agent",
                  "downstream_address", "authority", "listener")


class AccessLogger:
    __slots__ = ("fields", "format", "_out", "listener")

    def __init__(self, path: str, fmt: str, fields: tuple[str, ...], listener: str):
        self.fields = fields or DEFAULT_FIELDS
        self.format = fmt
        self.listener = listener
        if path in ("/dev/stdout", "-"):
            self._out = sys.stdout
        elif path == "/dev/stderr":
            self._out = sys.stderr
        else:
            self._out = open(path, "a", buffering=1, encoding="utf-8")

    def record(self, req, resp, duration: float) -> dict:
        ctx = req.ctx
        h = req.headers
        span = ctx.span
        trace_id = ""
        if span is not None:
            trace_id = getattr(span, "trace_id_hex", "") or ""
        peer = ctx.downstream_addr
        values = {
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - duration)) + "Z",
            "method": req.method, "path": req.path, "protocol": f"HTTP/{req.version}",
            "status": resp.status, "response_flags": ",".join(ctx.flags) or "-",
            "duration_ms": round(duration * 1000, 3),
            "upstream_duration_ms": round(ctx.upstream_duration * 1000, 3) if ctx.upstream_duration is not None else None,
            "bytes_received": ctx.bytes_received, "bytes_sent": ctx.bytes_sent,
            "upstream_host": ctx.upstream_host or None,
            "route": ctx.route.name if ctx.route is not None else None,
            "cluster": ctx.cluster or None, "request_id": ctx.request_id or None,
            "trace_id": trace_id or None, "user_agent": h.get("user-agent"),
            "downstream_address": f"{peer[0]}:{peer[1]}" if peer else None,
            "authority": h.get("host"), "listener": self.listener,
        }
        return {k: values.get(k) for k in self.fields}

    def log(self, req, resp, duration: float) -> None:
        rec = self.record(req, resp, duration)
        if self.format == "json":
            line = json.dumps(rec, separators=(",", ":"))
        else:
            line = " ".join("-" if v is None else str(v) for v in rec.values())
        self._out.write(line + "\n")


def make_access_logger(cfg, listener_name: str):
    if cfg.format == "dev":
        from sidecar.devlog import DevLogger
        return DevLogger(cfg.path, listener_name)
    return AccessLogger(cfg.path, cfg.format, cfg.fields, listener_name)
