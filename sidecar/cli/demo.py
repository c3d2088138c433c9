"""The embedded demo for ``sidecar run`` with no config: two small services behind the proxy."""

from __future__ import annotations

import os

import yaml
from aiohttp import web

from sidecar.runtime.loader import snapshot_from_doc

DEMO_LISTEN_PORT = int(os.environ.get("SIDECAR_DEMO_PORT", "10000"))
DEMO_ADMIN_PORT = int(os.environ.get("SIDECAR_DEMO_ADMIN_PORT", "9901"))

DEMO_CONFIG = """
# The embedded demo config (native format). Print it with: sidecar demo-config
admin: {address: 127.0.0.1, port: @ADMIN@}
listeners:
  - name: demo
    address: 127.0.0.1
    port: @PORT@
    access_log: {path: stdout, format: dev}
    routes:
      - name: hello
        match: {prefix: /hello}
        cluster: hello
        retry: {retry_on: "5xx,reset,connect-failure", retries: 2}
        timeout: 5s
      - name: echo
        match: {prefix: /echo}
        cluster: echo
        response_headers: {set: {x-served-by: sidecar-demo}}
      - name: home
        match: {path: /}
        direct_response: {status: 200, body: "sidecar demo: try /hello and /echo\\n"}
clusters:
  - name: hello
    lb: least_request
    endpoints: ["127.0.0.1:@HELLO1@", "127.0.0.1:@HELLO2@"]
  - name: echo
    endpoints: ["127.0.0.1:@ECHO@"]
"""


def demo_config_text(ports: dict[str, int]) -> str:
    text = DEMO_CONFIG
    for k, v in ports.items():
        text = text.replace(f"@{k}@", str(v))
    return text


def demo_snapshot(ports: dict[str, int]):
    return snapshot_from_doc(yaml.safe_load(demo_config_text(ports)))


def _hello_app(name: str) -> web.Application:
    async def hello(request):
        return web.Response(text=f"hello from {name}\n")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


def _echo_app() -> web.Application:
    async def echo(request):
        body = await request.read()
        return web.json_response({"method": request.method, "path": request.path_qs,
                                  "headers": dict(request.headers),
                                  "body": body.decode("utf-8", "replace")})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def start_demo_services() -> tuple[list[web.AppRunner], dict[str, int]]:
    runners, ports = [], {}
    for key, app in (("HELLO1", _hello_app("hello-1")), ("HELLO2", _hello_app("hello-2")),
                     ("ECHO", _echo_app())):
        r = web.AppRunner(app, access_log=None, handle_signals=False)
        await r.setup()
        site = web.TCPSite(r, "127.0.0.1", 0)
        await site.start()
        ports[key] = r.addresses[0][1]
        runners.append(r)
    ports["PORT"] = DEMO_LISTEN_PORT
    ports["ADMIN"] = DEMO_ADMIN_PORT
    return runners, ports


def print_banner(app) -> None:
    lr = next(iter(app.store.listeners.values()))
    base = f"http://127.0.0.1:{lr.bound_port}"
    print(f"""
  sidecar demo is running (Ctrl-C to stop)

    curl {base}/hello        # two 'hello' instances, least-request balanced, with retries
    curl {base}/echo         # shows the headers the proxy adds (x-request-id, x-forwarded-*)
    curl {base}/nope         # 404 (no route)

    admin:      http://127.0.0.1:{app.admin_port}/          (dashboard)
    metrics:    http://127.0.0.1:{app.admin_port}/stats/prometheus
    config:     http://127.0.0.1:{app.admin_port}/config_dump
""", flush=True)
