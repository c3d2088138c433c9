"""A readable, colourful one-line request log for local development (``format: dev``)."""

from __future__ import annotations

import sys
import time

from sidecar.observability.flags import envoy_order

_RESET = "\033[0m"
_COLOURS = {2: "\033[32m", 3: "\033[36m", 4: "\033[33m", 5: "\033[31m"}
_DIM = "\033[2m"


class DevLogger:
    __slots__ = ("_out", "listener", "colour")

    def __init__(self, path: str, listener: str):
        self._out = sys.stderr if path == "/dev/stderr" else (
            sys.stdout if path in ("/dev/stdout", "-") else open(path, "a", buffering=1, encoding="utf-8"))
        self.listener = listener
        self.colour = hasattr(self._out, "isatty") and self._out.isatty()

    def format(self, req, resp, duration: float) -> str:
        ctx = req.ctx
        status = resp.status
        flags = ",".join(envoy_order(ctx.flags))
        url = req.path + (f"?{req.query}" if req.query else "")
        where = ctx.cluster or (ctx.route.name if ctx.route is not None else "no route")
        if ctx.upstream_host:
            where += f" ({ctx.upstream_host})"
        stamp = time.strftime("%H:%M:%S")
        tries = f" tries={ctx.attempts}" if ctx.attempts > 1 else ""
        if self.colour:
            c = _COLOURS.get(status // 100, "")
            return (f"{_DIM}{stamp}{_RESET} {c}{status}{_RESET} {req.method:6} {url} "
                    f"{_DIM}-> {where} {duration * 1000:.1f}ms{tries}"
                    f"{' [' + flags + ']' if flags else ''}{_RESET}")
        return (f"{stamp} {status} {req.method:6} {url} -> {where} {duration * 1000:.1f}ms{tries}"
                f"{' [' + flags + ']' if flags else ''}")

    def log(self, req, resp, duration: float) -> None:
        self._out.write(self.format(req, resp, duration) + "\n")
