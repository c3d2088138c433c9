"""The route timeout: one deadline for every attempt of a request (Envoy's route ``timeout``).

The deadline is handed down in ``ctx.deadline`` and enforced where the waiting happens (the
upstream connection's timer, the connect, the wait for a connection slot, the retry backoff),
so the common case costs no task or cancellation machinery, and this layer adds no frame: it
returns its next's coroutine. Whoever sees the deadline pass raises ``RouteTimeout`` and counts
it on the cluster (``Cluster.send``, the retry layer's backoff).

A route with ``max_stream_duration`` uses it instead of ``timeout`` (as Envoy does): the stream
may last ``max_stream_duration``, or what a gRPC client's ``grpc-timeout`` asks (capped by
``grpc_timeout_header_max``, less ``grpc_timeout_header_offset``); past it the client gets
408 "downstream duration timeout" (gRPC: DEADLINE_EXCEEDED). A route ``idle_timeout`` bounds the
wait for the response headers of an ordinary request (504 "stream timeout", flag SI); tunnels
apply it themselves (``codec.tunnel``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sidecar.config.route import RouteAction, StreamDuration
from sidecar.core.errors import UpstreamTimeout
from sidecar.core.filter import Handler
from sidecar.core.message import Request, Response, local_reply
from sidecar.route.observe import grpc_reply

Clock = Callable[[], float]

_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
DEADLINE_EXCEEDED = 4


def parse_grpc_timeout(v: str | None) -> float | None:
    """``grpc-timeout`` (1 to 8 digits and a unit: H M S m u n) in seconds, None if invalid."""
    if not v or len(v) > 9:
        return None
    digits, unit = v[:-1], v[-1:]
    scale = _GRPC_UNITS.get(unit)
    if scale is None or not digits.isascii() or not digits.isdigit():
        return None
    return int(digits) * scale


def stream_duration(d: StreamDuration, req: Request) -> float:
    """The stream's allowed duration under ``max_stream_duration`` (0 = unbounded)."""
    if d.grpc_header_max_s is not None and req.ctx.grpc:
        t = req.ctx.grpc_timeout
        if t is not None:
            cap = d.grpc_header_max_s
            if cap > 0 and (t == 0 or t > cap):
                t = cap
            if d.grpc_header_offset_s > 0 and t > 0:
                t = max(t - d.grpc_header_offset_s, 0.001)
            return t
    return d.max_s


def duration_timeout_reply(req: Request) -> Response:
    ctx = req.ctx
    ctx.flags.append("DT")
    ctx.response_code_details = "max_duration_timeout"
    if ctx.grpc:
        return grpc_reply(DEADLINE_EXCEEDED, "downstream duration timeout")
    return local_reply(ctx, 408, "downstream duration timeout")


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
                 "duration", "idle")

    def __init__(self, action: RouteAction, next: Handler, set_expected_header: bool,
                 clock: Clock | None = None):
        self.next = next
        self.timeout = action.timeout_s
        self.timeout_ms = str(int(action.timeout_s * 1000))
        self.allow_header = action.allow_timeout_header
        self.set_expected = set_expected_header
        self.clock = clock if clock is not None else bound_clock()
        self.duration = action.max_stream_duration
        self.idle = action.idle_timeout_s

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
        if self.idle > 0 and req.upgrade is None:
            return self._idle_bounded(req)
        return self.next(req)

    async def _bounded_stream(self, req: Request, d: StreamDuration) -> Response:
        """``max_stream_duration``: the route timeout does not apply (Envoy)."""
        req.headers.popall("x-envoy-upstream-rq-timeout-ms", None)
        timeout = stream_duration(d, req)
        ctx = req.ctx
        if timeout <= 0:
            ctx.deadline = None
            return await self.next(req)
        deadline = ctx.deadline = self.clock() + timeout
        try:
            return await self.next(req)
        except UpstreamTimeout:
            if self.clock() >= deadline:
                return duration_timeout_reply(req)
            raise

    async def _idle_bounded(self, req: Request) -> Response:
        """Wait for the response headers at most the route's idle timeout. The attempt is not
        cancelled on expiry (cancellation is not safe everywhere below); it runs on to its own
        deadline and its response is discarded."""
        task = asyncio.ensure_future(self.next(req))
        done, _ = await asyncio.wait((task,), timeout=self.idle)
        if done:
            return task.result()
        task.add_done_callback(_discard_late)
        ctx = req.ctx
        ctx.flags.append("SI")
        ctx.response_code_details = "stream_idle_timeout"
        return local_reply(ctx, 504, "stream timeout")


def _discard_late(task: asyncio.Future[Response]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().discard()
