"""The route timeout: one deadline for every attempt of a request (Envoy's route ``timeout``).

The deadline is handed down in ``ctx.deadline`` and enforced where the waiting happens (the
upstream connection's timer, the connect, the wait for a connection slot, the retry backoff),
so the common case costs no task or cancellation machinery, and this layer adds no frame: it
returns its next's coroutine. Whoever sees the deadline pass raises ``RouteTimeout`` and counts
it on the cluster (``Cluster.send``, the retry layer's backoff).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sidecar.config.route import RouteAction
from sidecar.core.filter import Handler
from sidecar.core.message import Request, Response

Clock = Callable[[], float]


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

    __slots__ = ("next", "timeout", "timeout_ms", "allow_header", "set_expected", "clock")

    def __init__(self, action: RouteAction, next: Handler, set_expected_header: bool,
                 clock: Clock | None = None):
        self.next = next
        self.timeout = action.timeout_s
        self.timeout_ms = str(int(action.timeout_s * 1000))
        self.allow_header = action.allow_timeout_header
        self.set_expected = set_expected_header
        self.clock = clock if clock is not None else bound_clock()

    def __call__(self, req: Request) -> Awaitable[Response]:
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
            return self.next(req)
        req.ctx.deadline = self.clock() + timeout
        if self.set_expected:
            headers["x-envoy-expected-rq-timeout-ms"] = (
                self.timeout_ms if timeout == self.timeout else str(int(timeout * 1000)))
        return self.next(req)
