"""What a downstream codec asks of the listener that accepted its connection: the HTTP
connection manager's ``dispatch`` (one call per request or stream) and ``finish`` (the stream is
over: observe it), plus the connection bookkeeping. ``ListenerRuntime`` implements it."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from sidecar.core.message import Request, Response


class StreamLimits(Protocol):
    """The per-stream timeouts a listener enforces (seconds; 0 = off; a route's own, in the
    request context, override them)."""

    @property
    def request_timeout_s(self) -> float: ...

    @property
    def stream_idle_timeout_s(self) -> float: ...

    @property
    def max_stream_duration_s(self) -> float: ...


class ServedConnection(Protocol):
    """A downstream connection as its listener sees it (HTTP/1.1 or HTTP/2 codec)."""

    @property
    def _busy(self) -> bool:
        """A request or stream is in progress."""
        ...

    @property
    def lr(self) -> object:
        """The stream owner that accepted it (its listener, or an L4 listener's HTTP chain)."""
        ...

    def in_flight(self) -> int: ...

    def idle_check(self, now: float, idle_timeout: float, headers_timeout: float,
                   limits: StreamLimits | None = None) -> None: ...

    def _close(self) -> None: ...


class StreamOwner(Protocol):
    name: str
    max_header_bytes: int
    max_headers_count: int
    headers_with_underscores: str    # ALLOW | REJECT_REQUEST | DROP_HEADER
    server_name: str
    suppress_envoy_headers: bool     # the router's: no x-envoy-upstream-service-time

    @property
    def bound_port(self) -> int: ...

    @property
    def draining(self) -> bool: ...

    def connection_opened(self, conn: ServedConnection) -> None: ...

    def connection_closed(self, conn: ServedConnection) -> None: ...

    def protocol_error(self, status: int) -> None:
        """A request refused by the codec (400, 408, 431, ...)."""
        ...

    def http2_abuse(self, kind: str) -> None:
        """An HTTP/2 limit fired (a flood, a malformed request, too many streams)."""
        ...

    def dispatch(self, req: Request) -> Awaitable[Response]: ...

    def finish(self, req: Request, resp: Response, body_bytes: int) -> None:
        """The stream is over (response written, or abandoned): observe it."""
        ...
