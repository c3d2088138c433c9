"""Header vocabulary shared by every codec: what is hop-by-hop, what the router consumes, status
lines and the Date header."""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

# Headers that describe one hop (RFC 9110 7.6.1, RFC 9113 8.2.2) and are rebuilt by us on each
# side; a header named in Connection is hop-by-hop too (see ``connection_drop``).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te",
                        "transfer-encoding", "upgrade", "http2-settings"})

# Per-request control headers the router reads and never forwards (as Envoy's router).
ROUTER_CONSUMED = frozenset({"x-envoy-retry-on", "x-envoy-retry-grpc-on", "x-envoy-max-retries",
                             "x-envoy-upstream-rq-per-try-timeout-ms",
                             "x-envoy-hedge-on-per-try-timeout",
                             "x-envoy-upstream-rq-timeout-alt-response",
                             "x-envoy-retriable-status-codes", "x-envoy-retriable-header-names"})

# Request headers never copied upstream as they are: hop-by-hop ones, the framing we redo and
# the router's control headers (``te: trailers`` is let through). ``Expect: 100-continue`` is
# answered and removed by the downstream codec; other expectations are forwarded, as by Envoy.
NOT_FORWARDED = HOP_BY_HOP | {"content-length"} | ROUTER_CONSUMED


def connection_drop(base: frozenset[str], connection: str | None) -> frozenset[str]:
    """``base`` plus the header names listed in a Connection header value."""
    if not connection:
        return base
    return base | {t.strip().lower() for t in connection.split(",")}


STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus}


def status_line(status: int) -> str:
    line = STATUS_LINES.get(status)
    return line if line is not None else f"HTTP/1.1 {status} Unknown\r\n"


class DateCache:
    """RFC 9110 Date, formatted once per second."""

    __slots__ = ("sec", "value", "header_line")

    def __init__(self) -> None:
        self.sec = 0
        self.value = ""
        self.header_line = ""

    def get(self) -> str:
        now = int(time.time())
        if now != self.sec:
            self._format(now)
        return self.value

    def line(self) -> str:
        """``date: ...\r\n`` (an HTTP/1.1 header line)."""
        now = int(time.time())
        if now != self.sec:
            self._format(now)
        return self.header_line

    def _format(self, now: int) -> None:
        self.sec = now
        self.value = formatdate(now, usegmt=True)
        self.header_line = f"date: {self.value}\r\n"


DATE = DateCache()
