"""Sidecar mode: one proxy next to one app, sharing its lifecycle.

Configured with a compact ``sidecar:`` section of the native YAML (or with explicit listeners
marked ``direction: inbound|outbound``)::

    sidecar:
      service: orders                 # label for sidecar_app_up (default: app)
      app: 8080                       # the local app: a port on 127.0.0.1, or "host:port"
      app_health: {path: /healthz, interval: 1s, timeout: 1s}   # optional; default: TCP connect
      inbound:                        # traffic to the app (listener fields; defaults below)
        address: 0.0.0.0
        port: 15006
        tls: {cert: ..., key: ..., ca: ...}          # mTLS from peers' sidecars
        filters: [{jwt_authn: ...}, {rbac: ...}, {local_ratelimit: ...}]
        # routes: default is everything to the app (cluster "local_app")
      outbound:                       # the app's calls to other services
        address: 127.0.0.1
        port: 15001
        routes: [{match: {prefix: /}, cluster: payments, retry: {...}}]
    clusters: [...]                   # what outbound routes point at

becomes two listeners named ``inbound`` and ``outbound`` and a cluster ``local_app``.

At runtime (``attach(app)``):

* the app is probed (TCP connect, or an HTTP GET of ``app_health.path`` expecting 2xx/3xx);
  until it answers, ``/ready`` is 503 with the reason and the inbound listener answers 503
  ``no healthy upstream`` (the ``local_app`` endpoint is marked unhealthy and that cluster has no
  panic mode), so the app may start before or after the sidecar;
* on SIGTERM (or ``POST /drain_listeners``) ``/ready`` turns 503 at once, inbound listeners stop
  accepting and finish their requests in flight, while the outbound listener keeps serving the
  app (which is finishing its own work) until the app stops or the outbound listener's
  ``drain_timeout`` has passed; then it drains too and the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sidecar.config.listener import SidecarConfig

log = logging.getLogger("sidecar.sidecar_mode")


# ---- runtime ------------------------------------------------------------------------------------

class SidecarRuntime:
    """App probe, readiness, and the inbound-first drain, for one App."""

    def __init__(self, app):
        self.app = app
        self.config: SidecarConfig | None = None
        self.app_up: bool | None = None      # None: not probed yet
        self.app_reason = "app not probed yet"
        self.last_probe = 0.0
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._gauge = None
        if app.metrics.enabled:
            self._gauge = app.metrics.gauge("sidecar_app_up",
                                            "Whether the local app answers its probe (sidecar mode)",
                                            ("service",))

    # ---- config ----------------------------------------------------------------------------
    def on_snapshot(self, snap) -> None:
        cfg = snap.sidecar if snap is not None else None
        if cfg == self.config:
            self._mark()          # a new local_app cluster state starts healthy: re-apply
            return
        self.config = cfg
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if cfg is None:
            return
        self.app_up = None
        self.app_reason = "app not probed yet"
        self._task = asyncio.get_running_loop().create_task(self._probe_loop())
        self.app._tasks.append(self._task)

    # ---- readiness -------------------------------------------------------------------------
    def not_ready_reason(self) -> str | None:
        if self.config is None or self.app_up:
            return None
        return self.app_reason

    async def probe_once(self) -> str | None:
        cfg = self.config
        if cfg is None:
            return None           # sidecar mode switched off meanwhile: nothing to probe
        where = f"{cfg.app_host}:{cfg.app_port}"
        try:
            async with asyncio.timeout(cfg.probe_timeout_s):
                reader, writer = await asyncio.open_connection(cfg.app_host, cfg.app_port)
                try:
                    if cfg.health_path:
                        writer.write(f"GET {cfg.health_path} HTTP/1.1\r\nhost: {where}\r\n"
                                     f"user-agent: sidecar-app-probe\r\nconnection: close\r\n\r\n"
                                     .encode("latin-1"))
                        line = await reader.readline()
                        parts = line.split()
                        if len(parts) < 2 or not parts[1].isdigit():
                            return f"app {where}{cfg.health_path}: not an HTTP response"
                        status = int(parts[1])
                        if not 200 <= status < 400:
                            return f"app {where}{cfg.health_path} answered {status}"
                finally:
                    writer.close()
        except TimeoutError:
            return f"app {where} did not answer within {cfg.probe_timeout_s:g}s"
        except OSError as e:
            return f"app {where} not reachable: {e.strerror or e}"
        return None

    async def _probe_loop(self) -> None:
        while self.config is not None:      # a new config cancels this task and starts another
            interval = self.config.probe_interval_s
            reason = await self.probe_once()
            self._set(reason)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                pass

    def _set(self, reason: str | None) -> None:
        up = reason is None
        changed = up != self.app_up
        self.app_up = up
        self.app_reason = reason or ""
        self.last_probe = time.monotonic()
        cfg = self.config
        if changed and cfg is not None:
            if up:
                log.info("app %s is up (%s:%s)", cfg.service, cfg.app_host, cfg.app_port)
            else:
                log.warning("app %s is not ready: %s", cfg.service, reason)
            if self._gauge is not None:
                self._gauge.labels(cfg.service).set(1 if up else 0)
        self._mark()

    def _mark(self) -> None:
        """Reflect the probe on the local_app endpoint: unhealthy means inbound answers 503."""
        cfg = self.config
        if cfg is None or self.app_up is None:
            return
        c = self.app.clusters.get(cfg.app_cluster)
        if c is None:
            return
        for h in c.hosts:
            c.set_health(h, self.app_up, "app probe")

    # ---- drain -------------------------------------------------------------------------------
    async def wait_for_app_exit(self, deadline: float) -> None:
        """App.drain's gate between inbound and outbound: keep serving the app's outbound
        calls while it is still up (it may be finishing its own in-flight work)."""
        if self.config is None:
            return     # explicit inbound/outbound listeners, no sidecar section: app unknown
        while time.monotonic() < deadline:
            if await self.probe_once() is not None:
                log.info("app stopped: draining outbound listeners")
                return
            await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def attach(app) -> SidecarRuntime:
    """Wire sidecar mode into a started App (idempotent; harmless without a ``sidecar:``
    section: it follows config updates that add or remove one)."""
    rt = getattr(app, "sidecar_mode", None)
    if rt is not None:
        return rt
    rt = SidecarRuntime(app)
    app.sidecar_mode = rt
    app.snapshot_listeners.append(rt.on_snapshot)
    app.ready_checks.append(rt.not_ready_reason)
    app.outbound_drain_gate = rt.wait_for_app_exit
    rt.on_snapshot(app.store.snapshot)
    return rt
