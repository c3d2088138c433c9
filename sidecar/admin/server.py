"""Admin server (aiohttp), on its own port, loopback by default.

GET /ready, /stats/prometheus, /config_dump, /clusters, /stats.json, / (dashboard);
POST /healthcheck/fail, /healthcheck/ok, /drain_listeners, /quitquitquit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web

from sidecar import __version__
from sidecar.admin.config_dump import clusters_view, config_dump
from sidecar.admin.dashboard import add_dashboard_routes

log = logging.getLogger("sidecar.admin")


def make_admin_app(app) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/ready")
    async def ready(request):
        reason = app.not_ready_reason()
        if reason is None:
            return web.Response(text="LIVE\n" + app.ready_notes_text())
        return web.Response(status=503, text=f"{reason}\n")

    @routes.get("/stats/prometheus")
    async def prometheus(request):
        body, ctype = app.metrics.render(request.headers.get("Accept", ""))
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = ctype
        return resp

    @routes.get("/config_dump")
    async def dump(request):
        return web.json_response(config_dump(app), dumps=lambda o: json.dumps(o, indent=2, default=str))

    @routes.get("/clusters")
    async def clusters(request):
        view = clusters_view(app)
        if request.query.get("format") == "json":
            return web.json_response(view)
        lines = []
        for c in view["clusters"]:
            for h in c["hosts"]:
                pre = f"{c['name']}::{h['address']}"
                lines += [f"{pre}::health_flags::{h['health_flags']}", f"{pre}::weight::{h['weight']}",
                          f"{pre}::rq_active::{h['rq_active']}", f"{pre}::rq_total::{h['rq_total']}",
                          f"{pre}::rq_error::{h['rq_error']}", f"{pre}::cx_active::{h['cx_active']}",
                          f"{pre}::cx_connect_fail::{h['cx_connect_fail']}"]
        return web.Response(text="\n".join(lines) + "\n")

    @routes.get("/server_info")
    async def server_info(request):
        return web.json_response({"version": __version__, "state": "DRAINING" if app.draining else "LIVE",
                                  "uptime_s": round(time.time() - app.started_at, 1),
                                  "config_version": app.store.snapshot.version if app.store.snapshot else None})

    @routes.post("/healthcheck/fail")
    async def hc_fail(request):
        app.healthy = False
        return web.Response(text="OK\n")

    @routes.post("/healthcheck/ok")
    async def hc_ok(request):
        app.healthy = True
        return web.Response(text="OK\n")

    @routes.post("/drain_listeners")
    async def drain(request):
        asyncio.get_running_loop().create_task(app.drain())
        return web.Response(text="OK\n")

    @routes.post("/quitquitquit")
    async def quit(request):
        asyncio.get_running_loop().call_later(0.05, app.request_stop)
        return web.Response(text="OK\n")

    web_app = web.Application()
    web_app.add_routes(routes)
    add_dashboard_routes(web_app, app)
    return web_app


async def start_admin(app, host: str, port: int):
    runner = web.AppRunner(make_admin_app(app), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, bound
