"""Admin server (``runtime.local_http``: the proxy's own HTTP/1.1 codec), on its own port,
loopback by default.

GET /ready, /stats/prometheus, /config_dump, /clusters, /stats.json, / (dashboard);
POST /healthcheck/fail, /healthcheck/ok, /drain_listeners, /quitquitquit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from sidecar import __version__
from sidecar.admin.config_dump import clusters_view, config_dump
from sidecar.admin.dashboard import add_dashboard_routes
from sidecar.runtime.local_http import LocalServer, Router, json_response, respond, text

log = logging.getLogger("sidecar.admin")


def make_admin_app(app) -> Router:
    routes = Router()

    async def ready(request):
        reason = app.not_ready_reason()
        if reason is None:
            return text("LIVE\n" + app.ready_notes_text())
        return text(f"{reason}\n", 503)

    async def prometheus(request):
        body, ctype = app.metrics.render(request.headers.get("Accept", ""))
        return respond(body, ctype)

    async def dump(request):
        return json_response(config_dump(app), dumps=lambda o: json.dumps(o, indent=2, default=str))

    async def clusters(request):
        view = clusters_view(app)
        if request.query.get("format") == "json":
            return json_response(view)
        lines = []
        for c in view["clusters"]:
            for h in c["hosts"]:
                pre = f"{c['name']}::{h['address']}"
                lines += [f"{pre}::health_flags::{h['health_flags']}", f"{pre}::weight::{h['weight']}",
                          f"{pre}::rq_active::{h['rq_active']}", f"{pre}::rq_total::{h['rq_total']}",
                          f"{pre}::rq_error::{h['rq_error']}", f"{pre}::cx_active::{h['cx_active']}",
                          f"{pre}::cx_connect_fail::{h['cx_connect_fail']}"]
        return text("\n".join(lines) + "\n")

    async def server_info(request):
        return json_response({"version": __version__, "state": "DRAINING" if app.draining else "LIVE",
                              "uptime_s": round(time.time() - app.started_at, 1),
                              "config_version": app.store.snapshot.version if app.store.snapshot else None})

    async def hc_fail(request):
        app.healthy = False
        return text("OK\n")

    async def hc_ok(request):
        app.healthy = True
        return text("OK\n")

    async def drain(request):
        asyncio.get_running_loop().create_task(app.drain())
        return text("OK\n")

    async def quit(request):
        asyncio.get_running_loop().call_later(0.05, app.request_stop)
        return text("OK\n")

    for path, handler in (("/ready", ready), ("/stats/prometheus", prometheus),
                          ("/config_dump", dump), ("/clusters", clusters),
                          ("/server_info", server_info)):
        routes.get(path, handler)
    for path, handler in (("/healthcheck/fail", hc_fail), ("/healthcheck/ok", hc_ok),
                          ("/drain_listeners", drain), ("/quitquitquit", quit)):
        routes.post(path, handler)
    add_dashboard_routes(routes, app)
    return routes


async def start_admin(app, host: str, port: int) -> tuple[LocalServer, int]:
    server = LocalServer(make_admin_app(app))
    bound = await server.start_tcp(host, port)
    return server, bound
