"""The metrics-only listener (``Snapshot.metrics``): ``GET /stats/prometheus`` and nothing else.

Worker 0 binds it (without SO_REUSEPORT: one socket, one answer) and answers with every
worker's metrics merged, exactly as the admin's ``/stats/prometheus``: the App's
``render_metrics`` is the merging renderer in multi-worker mode (``sidecar.runtime.workers``).
So Prometheus can scrape the pod IP while the admin, which can stop or drain the proxy, stays
on loopback. OpenMetrics when the scraper's ``Accept`` asks for it.

A config reload that moves it binds the new address before the config is swapped (a port that
cannot be bound refuses the reload, as for any listener) and closes the old one after.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from sidecar.config.telemetry import METRICS_PATH, MetricsListener
from sidecar.core.message import Response
from sidecar.runtime.local_http import LocalRequest, LocalServer, Router, respond, text

log = logging.getLogger("sidecar.metrics_port")

Renderer = Callable[[str], Awaitable[tuple[bytes, str]]]


def _app(render: Renderer) -> Router:
    async def serve(request: LocalRequest) -> Response:
        if request.path != METRICS_PATH:
            return text(f"only {METRICS_PATH} is served here\n", 404)
        if request.method not in ("GET", "HEAD"):
            return respond(b"", status=405, headers=(("allow", "GET, HEAD"),))
        if request.query:
            return text("query parameters are not supported\n", 400)
        body, ctype = await render(request.headers.get("Accept", ""))
        return respond(body, ctype)

    router = Router()
    router.fallback = serve
    return router


class MetricsPort:
    """Worker 0's metrics-only server, following the config's ``metrics:``."""

    def __init__(self, render: Callable[[], Renderer]):
        # looked up per request: the multi-worker renderer is installed after construction
        self._render = render
        self.config: MetricsListener | None = None
        self.runner: LocalServer | None = None
        self.bound_port: int | None = None

    async def _start(self, cfg: MetricsListener) -> tuple[LocalServer, int]:
        async def render(accept: str) -> tuple[bytes, str]:
            return await self._render()(accept)

        runner = LocalServer(_app(render), "metrics")
        port = await runner.start_tcp(cfg.host, cfg.port)
        log.info("metrics listener %s on %s:%s%s", cfg.name, cfg.host, port, METRICS_PATH)
        return runner, port

    async def prepare(self, cfg: MetricsListener | None) -> Callable[[bool], Awaitable[None]]:
        """Bind ``cfg``'s address if it differs from the one served (OSError if it cannot);
        returns ``finish(applied)``: the new server stays and the old one closes if the config
        was applied, else the new one closes."""
        same_address = cfg is not None and self.config is not None and \
            (cfg.host, cfg.port) == (self.config.host, self.config.port)
        if cfg == self.config or same_address:
            async def keep(applied: bool) -> None:
                if applied:
                    self.config = cfg
            return keep
        new = await self._start(cfg) if cfg is not None else None

        async def finish(applied: bool) -> None:
            if not applied:
                if new is not None:
                    await new[0].cleanup()
                return
            old = self.runner
            self.config = cfg
            self.runner, self.bound_port = new if new is not None else (None, None)
            if old is not None:
                await old.cleanup()
        return finish

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
