"""Three instances of a small "catalog" service, each unreliable in its own way.

    steady   always answers (5 ms)
    flaky    25% of answers are 503; 5% of requests never get an answer
    broken   from ``broken_from`` to ``broken_until`` seconds after start: every answer is
             503, and so is /healthz; fine before and after

Every instance counts what it served, so the report can show the load each one took.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Instance:
    name: str
    port: int
    fail_rate: float = 0.0
    hang_rate: float = 0.0
    broken_from: float = -1.0
    broken_until: float = -1.0
    started: float = field(default_factory=time.monotonic)
    served: int = 0
    failed: int = 0
    hung: int = 0
    health_checks: int = 0

    def broken(self) -> bool:
        t = time.monotonic() - self.started
        return self.broken_from <= t < self.broken_until

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.path == "/healthz":
            self.health_checks += 1
            return web.Response(status=503 if self.broken() else 200, text=self.name)
        r = random.random()
        if self.broken() or r < self.fail_rate:
            self.failed += 1
            return web.Response(status=503, text=f"{self.name}: unavailable\n")
        if r < self.fail_rate + self.hang_rate:
            self.hung += 1
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.05)      # until the caller gives up
            return web.Response(status=504)
        await asyncio.sleep(0.005)
        self.served += 1
        return web.json_response({"item": request.path, "served_by": self.name})


def instances(ports: list[int], broken_from: float = 1.0, broken_for: float = 4.0) -> list[Instance]:
    return [
        Instance("steady", ports[0]),
        Instance("flaky", ports[1], fail_rate=0.25, hang_rate=0.05),
        Instance("broken", ports[2], broken_from=broken_from, broken_until=broken_from + broken_for),
    ]


async def start(insts: list[Instance]) -> list[web.AppRunner]:
    runners = []
    for inst in insts:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", inst.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", inst.port, reuse_address=True).start()
        inst.started = time.monotonic()
        runners.append(runner)
    return runners


async def stop(runners: list[web.AppRunner]) -> None:
    for r in runners:
        await r.cleanup()
