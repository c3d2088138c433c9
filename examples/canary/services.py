"""The canary example's services: ``reviews`` v1 (two replicas, the second one slow), v2 (the
canary) and a debug build that also receives the shadow copies of all canary traffic.

    python examples/canary/services.py [--base-port 18090]

Ports: base+0 reviews-v1 replica a (3 ms), base+1 reviews-v1 replica b (30 ms), base+2
reviews-v2, base+3 reviews-debug. The debug build answers ``GET /__shadow`` (directly, not
through the sidecar) with what it has seen: shadow copies (Host ending in ``-shadow``) and
direct requests.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter

from aiohttp import web


def reviews_app(version: str, replica: str, delay: float) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        if delay:
            await asyncio.sleep(delay)
        return web.json_response({"service": "reviews", "version": version, "replica": replica,
                                  "path": request.path})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


class DebugBuild:
    """reviews-debug: answers like the others and remembers what it saw."""

    def __init__(self) -> None:
        self.shadow = 0
        self.direct = 0
        self.hosts: Counter = Counter()
        self.methods: Counter = Counter()
        self.bodies = 0

    def app(self) -> web.Application:
        async def stats(request: web.Request) -> web.Response:
            return web.json_response({"shadow": self.shadow, "direct": self.direct,
                                      "hosts": dict(self.hosts), "methods": dict(self.methods),
                                      "with_body": self.bodies})

        async def handle(request: web.Request) -> web.Response:
            host = request.headers.get("host", "")
            body = await request.read()
            if host.split(":")[0].endswith("-shadow"):
                self.shadow += 1
            else:
                self.direct += 1
            self.hosts[host] += 1
            self.methods[request.method] += 1
            if body:
                self.bodies += 1
            return web.json_response({"service": "reviews", "version": "debug", "replica": "dbg",
                                      "path": request.path})
        app = web.Application()
        app.router.add_get("/__shadow", stats)
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


DEFAULT_PORTS = (18090, 18091, 18092, 18093)


async def start(ports=DEFAULT_PORTS) -> tuple[list[web.AppRunner], DebugBuild]:
    """Start v1a, v1b, v2 and debug on ``ports`` (in that order)."""
    debug = DebugBuild()
    apps = [(reviews_app("v1", "a", 0.003), ports[0]),
            (reviews_app("v1", "b", 0.030), ports[1]),
            (reviews_app("v2", "c", 0.003), ports[2]),
            (debug.app(), ports[3])]
    runners = []
    for app, port in apps:
        r = web.AppRunner(app, access_log=None, handle_signals=False)
        await r.setup()
        await web.TCPSite(r, "127.0.0.1", port, reuse_address=True).start()
        runners.append(r)
    return runners, debug


async def _main(args) -> None:
    b = args.base_port
    runners, _ = await start((b, b + 1, b + 2, b + 3))
    print(f"reviews-v1 on 127.0.0.1:{b} (fast) and :{b + 1} (slow), reviews-v2 on :{b + 2}, "
          f"reviews-debug on :{b + 3} (GET /__shadow for what it saw)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for r in runners:
            await r.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="the canary example's demo services")
    p.add_argument("--base-port", type=int, default=18090)
    try:
        asyncio.run(_main(p.parse_args()))
    except KeyboardInterrupt:
        pass
