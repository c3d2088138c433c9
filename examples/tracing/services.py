"""The example's backends: ``orders`` (fails the first attempt of every request with 503, so
retries show up in the trace) and ``orders-canary`` (the shadow target).

    python examples/tracing/services.py [--orders-port 18080] [--canary-port 18081]
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web


def orders_app() -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        if request.headers.get("x-envoy-attempt-count", "1") == "1":
            return web.Response(status=503, text="orders: warming up, try again\n")
        return web.json_response({"order": request.path.rsplit("/", 1)[-1], "status": "shipped",
                                  "traceparent": request.headers.get("traceparent")})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def canary_app() -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"canary": True, "host": request.headers.get("host")})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def start(orders_port: int = 18080, canary_port: int = 18081) -> list[web.AppRunner]:
    runners = []
    for app, port in ((orders_app(), orders_port), (canary_app(), canary_port)):
        r = web.AppRunner(app, access_log=None, handle_signals=False)
        await r.setup()
        await web.TCPSite(r, "127.0.0.1", port, reuse_address=True).start()
        runners.append(r)
    return runners


async def _main(args) -> None:
    runners = await start(args.orders_port, args.canary_port)
    print(f"orders on 127.0.0.1:{args.orders_port}, orders-canary on 127.0.0.1:{args.canary_port}",
          flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for r in runners:
            await r.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--orders-port", type=int, default=18080)
    p.add_argument("--canary-port", type=int, default=18081)
    try:
        asyncio.run(_main(p.parse_args()))
    except KeyboardInterrupt:
        pass
