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

from aiohttp import web

from sidecar.config.telemetry import METRICS_PATH, MetricsListener

log = logging.getLogger("sidecar.metrics_port")

Renderer = Callable[[str], Awaitable[tuple[bytes, str]]]


def _app(render: Renderer) -> web.Application:
    async def serve(request: web.Request) -> web.StreamResponse:
        if request.path != METRICS_PATH:
            return web.Response(status=404, text=f"only {METRICS_PATH} is served here\n")
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, headers={"Allow": "GET, HEAD"})
        if request.query_string:
            return web.Response(status=400, text="query parameters are not supported\n")
        body, ctype = await render(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": ctype})

    web_app = web.Application()
    web_app.router.add_route("*", "/{tail:.*}", serve)
    return web_app


class MetricsPort:
    """Worker 0's metrics-only server, following the config's ``metrics:``."""

    def __init__(self, render: Callable[[], Renderer]):
        # looked up per request: the multi-worker renderer is installed after construction
        self._render = render
        self.config: MetricsListener | None = None
        self.runner: web.AppRunner | None = None
        self.bound_port: int | None = None

    async def _start(self, cfg: MetricsListener) -> tuple[web.AppRunner, int]:
        async def render(accept: str) -> tuple[bytes, str]:
            return await self._render()(accept)

        runner = web.AppRunner(_app(render), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True).start()
        except OSError:
            await runner.cleanup()
            raise
        port = runner.addresses[0][1] if runner.addresses else cfg.port
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
