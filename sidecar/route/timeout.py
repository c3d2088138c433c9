"""The route timeout: one deadline for every attempt of a request (Envoy's route ``timeout``).

The deadline is handed down in ``ctx.deadline`` and enforced where the waiting happens (the
upstream connection's timer, the connect, the wait for a connection slot, the retry backoff),
so the common case costs no task or cancellation machinery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sidecar.config.route import RouteAction
from sidecar.core.errors import RouteTimeout, UpstreamTimeout
from sidecar.core.filter import Handler
from sidecar.core.message import Request, Response
from sidecar.core.metrics import CounterChild

Clock = Callable[[], float]


def loop_clock() -> float:
    return asyncio.get_running_loop().time()


class TimeoutLayer:
    """Sets ``ctx.deadline`` (and ``x-envoy-expected-rq-timeout-ms`` when no retry layer sets it
    per attempt); counts requests the route timeout ended."""

    __slots__ = ("next", "timeout", "timeout_ms", "allow_header", "set_expected", "rq_timeout",
                 "clock")

    def __init__(self, action: RouteAction, next: Handler, rq_timeout: CounterChild,
                 set_expected_header: bool, clock: Clock = loop_clock):
        self.next = next
        self.timeout = action.timeout_s
        self.timeout_ms = str(int(action.timeout_s * 1000))
        self.allow_header = action.allow_timeout_header
        self.set_expected = set_expected_header
        self.rq_timeout = rq_timeout
        self.clock = clock

    async def __call__(self, req: Request) -> Response:
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
            return await self.next(req)
        deadline = req.ctx.deadline = self.clock() + timeout
        if self.set_expected:
            headers["x-envoy-expected-rq-timeout-ms"] = (
                self.timeout_ms if timeout == self.timeout else str(int(timeout * 1000)))
        try:
            return await self.next(req)
        except UpstreamTimeout as e:
            if isinstance(e, RouteTimeout) or self.clock() >= deadline:
                self.rq_timeout.inc()
                if not isinstance(e, RouteTimeout):
                    raise RouteTimeout() from None
            raise
