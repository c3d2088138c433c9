"""The sidecar's probe port (15020 in injected pods): the kubelet's probes land here.

* ``GET /app-health/<container>/<livez|readyz|startupz>``: the app's original probe (carried by
  ``SIDECAR_APP_PROBERS``, see ``probe_rewrite``) run against the app now: an HTTP GET (2xx/3xx
  is success, as the kubelet counts it; redirects are not followed; the body is not read) or
  a TCP connect, to 127.0.0.1 unless the probe names a host. 200 on success, 503 with the
  reason otherwise, 404 for a path no probe was carried for.
* ``GET /healthz/live``: 200 while the process serves (the injected startup/liveness probe).
* ``GET /healthz/ready``: the admin port's ``/ready`` (the injected readiness probe), so the
  admin port itself (which has ``POST /quitquitquit``) stays on loopback.

Cheap and bounded: each attempt is limited by the probe's ``timeoutSeconds``; at most
``MAX_IN_FLIGHT`` attempts per path run at once (more answer 503 at once), so a flood of
requests on the probe port cannot turn into a flood on the app. Nothing here follows a
target given by the request: only the carried probes are run.

The sidecar process starts this server when ``SIDECAR_PROBE_PORT`` is set (``start_from_env``,
called by the App on worker 0).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
from aiohttp import web

from sidecar.config.errors import ConfigError
from sidecar.k8s.probe_rewrite import (
    ENV_APP_PROBERS,
    ENV_PROBE_PORT,
    AppProber,
    HttpProbe,
    parse_probers,
)

log = logging.getLogger("sidecar.k8s.probes")

ENV_PROBE_ADDRESS = "SIDECAR_PROBE_ADDRESS"     # default 0.0.0.0: the kubelet calls the pod IP
MAX_IN_FLIGHT = 4
READY_TIMEOUT_S = 2.0
DEFAULT_USER_AGENT = "kube-probe/pysidecar"

ReadyCheck = Callable[[], Awaitable[str | None]]     # -> None when ready, else the reason


def _url_host(host: str) -> str:
    host = host or "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class AppProbeRunner:
    """Runs the carried probes; one HTTP client session for all of them."""

    def __init__(self, probers: Mapping[str, AppProber]):
        self.probers = dict(probers)
        self._in_flight = {path: 0 for path in self.probers}
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # a fresh connection per probe (as the kubelet does): no idle sockets held open
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def run(self, path: str, user_agent: str = "") -> str | None:
        """None when the probe succeeds, else why not. KeyError for an unknown path."""
        prober = self.probers[path]
        if self._in_flight[path] >= MAX_IN_FLIGHT:
            return f"{MAX_IN_FLIGHT} probes of {path} already in flight"
        self._in_flight[path] += 1
        try:
            async with asyncio.timeout(prober.timeout_s):
                if isinstance(prober.action, HttpProbe):
                    return await self._http(prober.action, user_agent)
                host = prober.action.host or "127.0.0.1"
                _, writer = await asyncio.open_connection(host, prober.action.port)
                writer.close()
                return None
        except TimeoutError:
            return f"no answer within {prober.timeout_s:g}s"
        except (OSError, aiohttp.ClientError) as e:
            return f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"
        finally:
            self._in_flight[path] -= 1

    async def _http(self, p: HttpProbe, user_agent: str) -> str | None:
        url = f"{p.scheme.lower()}://{_url_host(p.host)}:{p.port}{p.path}"
        headers = {"User-Agent": user_agent or DEFAULT_USER_AGENT}
        for name, value in p.headers:
            headers[name] = value
        async with self.session().get(url, headers=headers, allow_redirects=False,
                                      ssl=p.scheme != "HTTPS") as resp:
            if 200 <= resp.status < 400:
                return None
            return f"{url} answered {resp.status}"


def make_app(runner: AppProbeRunner, ready: ReadyCheck) -> web.Application:
    async def app_health(request: web.Request) -> web.Response:
        path = request.path
        if path not in runner.probers:
            return web.Response(status=404, text=f"no probe for {path}\n")
        ua = request.headers.get("User-Agent", "")
        reason = await runner.run(path, ua if ua.startswith("kube-probe/") else "")
        if reason is None:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"{reason}\n")

    async def live(request: web.Request) -> web.Response:
        return web.Response(text="live\n")

    async def readyz(request: web.Request) -> web.Response:
        reason = await ready()
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"{reason}\n")

    async def closing(app: web.Application) -> None:
        await runner.close()

    app = web.Application()
    app.router.add_get("/app-health/{container}/{kind}", app_health)
    app.router.add_get("/healthz/live", live)
    app.router.add_get("/healthz/ready", readyz)
    app.on_cleanup.append(closing)
    return app


async def start_prober(probers: Mapping[str, AppProber], ready: ReadyCheck, host: str,
                       port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(make_app(AppProbeRunner(probers), ready), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


def admin_ready_check(app) -> ReadyCheck:
    """The App's readiness as its admin port reports it (with several workers that is the
    whole group's), asked over loopback; in-process when there is no admin port."""
    async def check() -> str | None:
        port = app.admin_port
        if port is None:
            return app.not_ready_reason()
        host = app.initial.admin.host
        host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(b"GET /ready HTTP/1.1\r\nhost: localhost\r\n"
                                 b"connection: close\r\n\r\n")
                    data = await reader.read(4096)
                finally:
                    writer.close()
        except (OSError, TimeoutError) as e:
            return f"admin port {port}: {e}"
        head, _, body = data.partition(b"\r\n\r\n")
        parts = head.split(b" ", 2)
        if len(parts) >= 2 and parts[1] == b"200":
            return None
        return body.decode("utf-8", "replace").strip() or "not ready"
    return check


async def start_from_env(app, environ: Mapping[str, str] = os.environ
                         ) -> web.AppRunner | None:
    """Start the probe port if ``SIDECAR_PROBE_PORT`` is set (injected pods); else None.
    A malformed ``SIDECAR_APP_PROBERS`` is a ConfigError: the sidecar refuses to start."""
    raw_port = environ.get(ENV_PROBE_PORT)
    if not raw_port:
        return None
    if not raw_port.isdigit() or not 1 <= int(raw_port) <= 65535:
        raise ConfigError(ENV_PROBE_PORT, f"{raw_port!r} is not a port")
    probers = parse_probers(environ[ENV_APP_PROBERS]) if environ.get(ENV_APP_PROBERS) else {}
    host = environ.get(ENV_PROBE_ADDRESS, "0.0.0.0")
    runner, port = await start_prober(probers, admin_ready_check(app), host, int(raw_port))
    log.info("probe port %s:%s (%d app probe(s))", host, port, len(probers))
    return runner
