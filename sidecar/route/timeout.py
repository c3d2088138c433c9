"""The route timeout: one deadline for every attempt of a request (Envoy's route ``timeout``).

The deadline is handed down in ``ctx.deadline`` and enforced where the waiting happens (the
upstream connection's timer, the connect, the wait for a connection slot, the retry backoff),
so the common case costs no task or cancellation machinery, and this layer adds no frame: it
returns its next's coroutine. Whoever sees the deadline pass raises ``RouteTimeout`` and counts
it on the cluster (``Cluster.send``, the retry layer's backoff).

A route with ``max_stream_duration`` uses it instead of ``timeout`` (as Envoy does): the stream
may last ``max_stream_duration``, or what a gRPC client's ``grpc-timeout`` asks (capped by
``grpc_timeout_header_max``, less ``grpc_timeout_header_offset``); past it the client gets
504 (408 if its request had not all arrived) "downstream duration timeout" (gRPC:
DEADLINE_EXCEEDED). The codecs' sweeps also enforce ``ctx.max_stream_duration`` and the stream
idle timeout over the whole stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sidecar.config.route import RouteAction, StreamDuration
from sidecar.core.body import BodyStream
from sidecar.core.errors import RouteTimeout, UpstreamTimeout
from sidecar.core.filter import Handler
from sidecar.core.message import Request, Response, local_reply
from sidecar.route.observe import grpc_reply

Clock = Callable[[], float]

_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
DEADLINE_EXCEEDED = 4
_TIMER_SLACK_S = 0.005


def parse_grpc_timeout(v: str | None) -> float | None:
    """``grpc-timeout`` (1 to 8 digits and a unit: H M S m u n) in seconds, None if invalid."""
    if not v or len(v) > 9:
        return None
    digits, unit = v[:-1], v[-1:]
    scale = _GRPC_UNITS.get(unit)
    if scale is None or not digits.isascii() or not digits.isdigit():
        return None
    return int(digits) * scale


def stream_duration(d: StreamDuration, req: Request) -> float | None:
    """What a gRPC client's ``grpc-timeout`` allows the stream under ``max_stream_duration``
    (0 = unbounded), None when it does not apply (the route's ``max_stream_duration_s`` does)."""
    if d.grpc_header_max_s is not None and req.ctx.grpc:
        t = req.ctx.grpc_timeout
        if t is not None:
            cap = d.grpc_header_max_s
            if cap > 0 and (t == 0 or t > cap):
                t = cap
            if d.grpc_header_offset_s > 0 and t > 0:
                t = max(t - d.grpc_header_offset_s, 0.001)
            return t
    return None


def duration_timeout_reply(req: Request) -> Response:
    ctx = req.ctx
    ctx.flags.append("DT")
    ctx.response_code_details = "max_duration_timeout"
    if ctx.grpc:
        return grpc_reply(DEADLINE_EXCEEDED, "downstream duration timeout")
    body = req.body
    received = isinstance(body, bytes) or (isinstance(body, BodyStream) and body.ended)
    # Envoy: 504 once the whole request had arrived, else 408
    return local_reply(ctx, 504 if received else 408, "downstream duration timeout")


def loop_clock() -> float:
    return asyncio.get_running_loop().time()


def bound_clock() -> Clock:
    """The running loop's clock, bound once (stacks are built on the loop that runs them)."""
    try:
        return asyncio.get_running_loop().time
    except RuntimeError:
        return loop_clock


class TimeoutLayer:
    """Sets ``ctx.deadline`` (and ``x-envoy-expected-rq-timeout-ms`` when no retry layer sets
    it per attempt)."""

    __slots__ = ("next", "timeout", "timeout_ms", "allow_header", "set_expected", "clock",
                 "duration")

    def __init__(self, action: RouteAction, next: Handler, set_expected_header: bool,
                 clock: Clock | None = None):
        self.next = next
        self.timeout = action.timeout_s
        self.timeout_ms = str(int(action.timeout_s * 1000))
        self.allow_header = action.allow_timeout_header
        self.set_expected = set_expected_header
        self.clock = clock if clock is not None else bound_clock()
        self.duration = action.max_stream_duration

    def __call__(self, req: Request) -> Awaitable[Response]:
        if self.duration is not None:
            return self._bounded_stream(req, self.duration)
        timeout = self.timeout
        headers = req.headers
        t = headers.get("x-envoy-upstream-rq-timeout-ms")
        if t is not None:
            # always consumed; honoured only where the route allows it (a client may shorten,
            # never lengthen, the route timeout)
            headers.popall("x-envoy-upstream-rq-timeout-ms")
            if self.allow_header and t.isascii() and t.isdigit():
                t_s = int(t) / 1000.0
                if timeout <= 0 or 0 < t_s < timeout:
                    timeout = t_s
        if timeout <= 0:
            req.ctx.deadline = None
        else:
            req.ctx.deadline = self.clock() + timeout
            if self.set_expected:
                headers["x-envoy-expected-rq-timeout-ms"] = (
                    self.timeout_ms if timeout == self.timeout else str(int(timeout * 1000)))
        return self.next(req)

    async def _bounded_stream(self, req: Request, d: StreamDuration) -> Response:
        """``max_stream_duration``: the route timeout does not apply (Envoy)."""
        req.headers.popall("x-envoy-upstream-rq-timeout-ms", None)
        ctx = req.ctx
        timeout = stream_duration(d, req)
        if timeout is not None:
            ctx.max_stream_duration = timeout     # the codec's sweep bounds the rest of the stream
        else:
            timeout = ctx.max_stream_duration or 0.0
        if timeout <= 0:
            ctx.deadline = None
            return await self.next(req)
        deadline = ctx.deadline = self.clock() + timeout
        try:
            return await self.next(req)
        except UpstreamTimeout as e:
            # the loop's timers may fire a little early (uvloop rounds to milliseconds)
            if isinstance(e, RouteTimeout) or self.clock() >= deadline - _TIMER_SLACK_S:
                return duration_timeout_reply(req)
            raise
