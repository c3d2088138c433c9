"""Active HTTP health checking at run time (config: ``sidecar.health_check.HealthCheck``).

Per cluster with ``health_checks``, one asyncio task per (check, host) sends
``GET <path>`` over a fresh HTTP/1.1 connection (TLS when the cluster uses it) every interval
plus jitter, with a timeout, and never blocks the loop. Verdicts follow Envoy:

* a response with an expected status is a success; ``healthy_threshold`` successes in a row
  bring an unhealthy host back;
* a response with any other status fails the host at once, unless the status is one of
  ``retriable_statuses``, which (like timeouts and connection failures) count toward
  ``unhealthy_threshold`` failures in a row;
* hosts start healthy (so a restarted sidecar does not black-hole traffic) and the first check
  runs at once (after ``initial_jitter``); the first check's failure marks the host unhealthy
  at once, as Envoy's hosts start "pending the first check".

A host is in the load-balancing set only while every check passes (and it is not ejected by
outlier detection); ``ClusterState.rebuild`` applies the panic threshold. New endpoints (EDS,
DNS) are picked up within a second. Install once per App with ``install(app)``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from typing import Optional

from sidecar.config.health_check import HealthCheck

log = logging.getLogger("sidecar.health_check")

OUTCOMES = ("success", "failure", "timeout", "network_failure")
_MAX_DRAIN = 64 * 1024


async def probe(host: str, port: int, check: HealthCheck, host_header: str,
                ssl_context: Optional[ssl.SSLContext] = None, server_hostname: str = "") -> tuple[str, int]:
    """One HTTP/1.1 health check. Returns (outcome, status): outcome is one of OUTCOMES."""
    writer = None
    try:
        async with asyncio.timeout(check.timeout_s):
            kw = {}
            if ssl_context is not None:
                kw = {"ssl": ssl_context, "server_hostname": server_hostname or host}
            reader, writer = await asyncio.open_connection(host, port, **kw)
            writer.write((f"GET {check.path} HTTP/1.1\r\nhost: {host_header}\r\n"
                          f"user-agent: Envoy/HC\r\nconnection: close\r\n\r\n").encode("latin-1"))
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            parts = lines[0].split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                return "network_failure", 0
            status = int(parts[1])
            # read a small body so the server sees an orderly close, not a reset
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length" and v.strip().isdigit():
                    n = int(v.strip())
                    if 0 < n <= _MAX_DRAIN:
                        await reader.readexactly(n)
                    break
    except TimeoutError:
        return "timeout", 0
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        return "network_failure", 0
    finally:
        if writer is not None:
            writer.close()
    return ("success" if check.status_ok(status) else "failure"), status


class _HostState:
    __slots__ = ("healthy", "ok", "fail", "checked", "edge")

    def __init__(self):
        self.healthy = True
        self.ok = 0
        self.fail = 0
        self.checked = False
        self.edge = ""        # "healthy" / "unhealthy" right after a transition


class _Stats:
    __slots__ = ("outcome", "to_healthy", "to_unhealthy")

    def __init__(self, app, cluster: str):
        from sidecar.observability.stats import NULL
        m = app.metrics
        if not m.enabled:
            self.outcome = {o: NULL for o in OUTCOMES}
            self.to_healthy = self.to_unhealthy = NULL
            return
        cst = app.stats.cluster(cluster)
        fam = m.counter("sidecar_upstream_health_check_total", "Active health checks by result",
                        ("cluster", "result"))
        self.outcome = {"success": cst.hc_success, "failure": cst.hc_failure,
                        "timeout": fam.labels(cluster, "timeout"),
                        "network_failure": fam.labels(cluster, "network_failure")}
        tr = m.counter("sidecar_upstream_health_check_transitions_total",
                       "Hosts changing active health-check verdict", ("cluster", "to"))
        self.to_healthy = tr.labels(cluster, "healthy")
        self.to_unhealthy = tr.labels(cluster, "unhealthy")


class ClusterChecker:
    """The health checks of one cluster: a task per (check, host), and a supervisor that
    follows the endpoint set."""

    def __init__(self, cs, checks: tuple[HealthCheck, ...], app):
        self.cs = cs
        self.checks = checks
        self.stats = _Stats(app, cs.name)
        self.state: dict[tuple[int, str], _HostState] = {}
        self.tasks: dict[tuple[int, str], asyncio.Task] = {}
        self.closed = False
        self._had_traffic = False
        self._hosts_seen = None
        self._supervisor: Optional[asyncio.Task] = None
        self.start()

    def start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._supervisor is None:
            self._supervisor = loop.create_task(self._supervise())

    async def _supervise(self) -> None:
        while not self.closed:
            if self.cs.hosts is not self._hosts_seen:
                self._sync()
            await asyncio.sleep(1.0)

    def _sync(self) -> None:
        cs = self.cs
        self._hosts_seen = cs.hosts
        current = {h.address: h for h in cs.hosts}
        loop = asyncio.get_running_loop()
        for key in [k for k in self.tasks if k[1] not in current]:
            self.tasks.pop(key).cancel()
            self.state.pop(key, None)
        for i, check in enumerate(self.checks):
            for addr, h in current.items():
                key = (i, addr)
                t = self.tasks.get(key)
                if t is None or t.done():
                    st = self.state.setdefault(key, _HostState())
                    self.tasks[key] = loop.create_task(self._run(check, h, st))

    def close(self, restore: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        for t in self.tasks.values():
            t.cancel()
        self.tasks.clear()
        if restore:
            changed = False
            for h in self.cs.hosts:
                if not h.hc_healthy:
                    h.hc_healthy = True
                    changed = True
                h.last_hc = ""
            if changed:
                self.cs.rebuild()

    # ---- one host --------------------------------------------------------------------------
    async def _run(self, check: HealthCheck, host, st: _HostState) -> None:
        cs = self.cs
        ep = host.endpoint
        host_header = check.host or cs.name
        if check.initial_jitter_s > 0:
            await asyncio.sleep(random.random() * check.initial_jitter_s)
        while not self.closed and not host.removed:
            try:
                tls = cs.config.tls
                outcome, status = await probe(ep.host, ep.port, check, host_header, cs.ssl_context,
                                              tls.sni if tls is not None else "")
                self._apply(check, host, st, outcome, status)
            except asyncio.CancelledError:
                raise
            except Exception:      # a bug must not end health checking for the host
                log.exception("cluster %s: health check of %s failed unexpectedly",
                              cs.name, host.address)
            await asyncio.sleep(self._next_interval(check, st))

    def _next_interval(self, check: HealthCheck, st: _HostState) -> float:
        base = check.interval_s
        if check.no_traffic_interval_s is not None and not self._had_traffic:
            if any(h.rq_total for h in self.cs.hosts):
                self._had_traffic = True
            else:
                base = check.no_traffic_interval_s
        if self._had_traffic or check.no_traffic_interval_s is None:
            if st.edge == "unhealthy" and check.unhealthy_edge_interval_s is not None:
                base = check.unhealthy_edge_interval_s
            elif st.edge == "healthy" and check.healthy_edge_interval_s is not None:
                base = check.healthy_edge_interval_s
            elif not st.healthy and check.unhealthy_interval_s is not None:
                base = check.unhealthy_interval_s
        j = 0.0
        if check.interval_jitter_s > 0:
            j += random.random() * check.interval_jitter_s
        if check.interval_jitter_percent > 0:
            j += random.random() * base * check.interval_jitter_percent / 100.0
        return base + j

    def _apply(self, check: HealthCheck, host, st: _HostState, outcome: str, status: int) -> None:
        self.stats.outcome[outcome].inc()
        first = not st.checked
        st.checked = True
        st.edge = ""
        was = st.healthy
        if outcome == "success":
            st.fail = 0
            st.ok += 1
            if not st.healthy and st.ok >= check.healthy_threshold:
                st.healthy = True
        else:
            st.ok = 0
            st.fail += 1
            immediate = outcome == "failure" and not check.status_retriable(status)
            if st.healthy and (first or immediate or st.fail >= check.unhealthy_threshold):
                st.healthy = False
        host.last_hc = f"{outcome} {status}" if status else outcome
        if st.healthy != was:
            st.edge = "healthy" if st.healthy else "unhealthy"
            (self.stats.to_healthy if st.healthy else self.stats.to_unhealthy).inc()
            log.warning("cluster %s: %s is now %s (active health check: %s)", self.cs.name,
                        host.address, "healthy" if st.healthy else "unhealthy", host.last_hc)
        verdict = all(s.healthy for (i, a), s in self.state.items() if a == host.address)
        if verdict != host.hc_healthy:
            host.hc_healthy = verdict
            self.cs.rebuild()


class HealthCheckRuntime:
    """Keeps one ClusterChecker per cluster that has health checks."""

    def __init__(self, app):
        self.app = app
        self.checkers: dict[int, ClusterChecker] = {}     # id(ClusterState) -> checker
        app.clusters.subscribe(self.on_cluster, self.on_removed)

    def on_cluster(self, cs) -> None:
        checks = cs.config.health_checks
        c = self.checkers.get(id(cs))
        if c is not None and c.cs is cs and c.checks == checks and not c.closed:
            c.start()
            return
        if c is not None:
            del self.checkers[id(cs)]
            c.close(restore=not checks)
        if checks:
            self.checkers[id(cs)] = ClusterChecker(cs, checks, self.app)

    def on_removed(self, cs) -> None:
        c = self.checkers.pop(id(cs), None)
        if c is not None:
            c.close(restore=False)

    def close(self) -> None:
        for c in self.checkers.values():
            c.close(restore=False)
        self.checkers.clear()
        self.app.clusters.unsubscribe(self.on_cluster, self.on_removed)


def install(app) -> HealthCheckRuntime:
    """Attach active health checking to ``app``'s cluster manager (idempotent). Call before or
    after ``App.start``; tasks start once an event loop runs. ``close()`` it on shutdown."""
    rt = app.__dict__.get("health_checks")
    if rt is None:
        rt = app.health_checks = HealthCheckRuntime(app)
    return rt
