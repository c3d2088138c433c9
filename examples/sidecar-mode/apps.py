"""The three demo apps of the sidecar-mode example (each only talks to its own sidecar).

    python apps.py            # orders on :8080, web on :8081, payments on :8090
"""

from __future__ import annotations

import asyncio
import os
import sys

import aiohttp
from aiohttp import web

PORTS = {"orders": int(os.environ.get("ORDERS_PORT", 8080)), "web": int(os.environ.get("WEB_PORT", 8081)),
         "payments": int(os.environ.get("PAYMENTS_PORT", 8090))}
WEB_OUTBOUND = os.environ.get("WEB_OUTBOUND", "http://127.0.0.1:15101")
ORDERS_OUTBOUND = os.environ.get("ORDERS_OUTBOUND", "http://127.0.0.1:15001")


async def call(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return r.status, await r.text()


def orders_app() -> web.Application:
    async def order(request):
        oid = request.match_info["id"]
        status, text = await call(f"{ORDERS_OUTBOUND}/pay/{oid}")     # via our sidecar
        return web.json_response({"order": oid, "payment": text if status == 200 else f"failed ({status})"})

    async def healthz(request):
        return web.Response(text="ok")

    a = web.Application()
    a.router.add_get("/healthz", healthz)
    a.router.add_get("/orders/{id}", order)
    return a


def web_app() -> web.Application:
    async def checkout(request):
        status, text = await call(f"{WEB_OUTBOUND}/orders/{request.match_info['id']}")
        return web.Response(status=status, text=text, content_type="application/json")

    a = web.Application()
    a.router.add_get("/checkout/{id}", checkout)
    return a


def payments_app() -> web.Application:
    async def pay(request):
        return web.Response(text=f"paid {request.match_info['id']}")

    a = web.Application()
    a.router.add_get("/pay/{id}", pay)
    return a


async def main(names) -> None:
    runners = []
    for name in names:
        r = web.AppRunner({"orders": orders_app, "web": web_app, "payments": payments_app}[name](),
                          access_log=None)
        await r.setup()
        await web.TCPSite(r, "127.0.0.1", PORTS[name]).start()
        runners.append(r)
        print(f"{name} app on 127.0.0.1:{PORTS[name]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1:] or ["orders", "web", "payments"]))
    except KeyboardInterrupt:
        pass
