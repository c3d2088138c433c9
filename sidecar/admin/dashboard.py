"""The live admin dashboard: ``GET /`` on the admin port, fed by ``GET /dashboard.json``.

A small self-contained page (``sidecar/static/``: no CDN, works offline) polls the JSON once a
second. The JSON is computed here from two sources:

* the metric families (request counts by status class and latency histograms, per route and
  per cluster), sampled once a second into a one-minute ring while someone is looking (the
  sampler starts with the first ``/dashboard.json`` request and stops after
  ``IDLE_STOP_S`` without one), so rates, success rates and latency percentiles are over the
  last ``WINDOW_S`` seconds, the same for every viewer;
* the live state of the cluster manager (endpoint health, ejection, peak-EWMA estimate,
  requests in flight, breaker occupancy) and of the config store (version, updates).

Success rate follows Linkerd's golden metrics: the share of responses that are not 5xx (for a
cluster: attempts that got a non-5xx answer, so connect failures, resets and timeouts count
as failures).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import time
from typing import Any

from sidecar.admin import dashboard_l4
from sidecar.core.message import Response
from sidecar.runtime.collector import breaker_open, endpoint_ewma, install_state_collector
from sidecar.runtime.local_http import LocalRequest, Router, json_response, respond, text

log = logging.getLogger("sidecar.dashboard")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
SAMPLE_INTERVAL_S = 1.0
KEEP_SAMPLES = 61            # one minute of history
WINDOW_S = 10.0              # rates and percentiles over this window
MAX_ROUTES = 50
MAX_CLUSTERS = 100
MAX_ENDPOINTS = 50
IDLE_STOP_S = 120.0          # stop sampling when nobody asked for the dashboard this long

_STATIC_TYPES = {".js": "application/javascript", ".css": "text/css", ".html": "text/html",
                 ".svg": "image/svg+xml", ".png": "image/png"}


# ---- reading metric families ---------------------------------------------------------------

def _counter_by(metrics, name: str, keys: tuple[str, ...]) -> dict[tuple, dict[str, float]]:
    """{label values of ``keys``: {status_class: value}} from a counter family."""
    fam = metrics.family(name)
    out: dict[tuple, dict[str, float]] = {}
    if fam is None:
        return out
    for m in fam.collect():
        for s in m.samples:
            if not s.name.endswith("_total"):
                continue
            k = tuple(s.labels.get(x, "") for x in keys)
            d = out.get(k)
            if d is None:
                d = out[k] = {}
            sc = s.labels.get("status_class", s.labels.get("outcome", ""))
            d[sc] = d.get(sc, 0.0) + s.value
    return out


def _histogram_by(metrics, name: str, keys: tuple[str, ...]) -> dict[tuple, tuple]:
    """{label values: ((bound, cumulative count)..., sum, count)} from a histogram family."""
    fam = metrics.family(name)
    out: dict[tuple, Any] = {}
    if fam is None:
        return out
    buckets: dict[tuple, list] = {}
    sums: dict[tuple, float] = {}
    counts: dict[tuple, float] = {}
    for m in fam.collect():
        for s in m.samples:
            k = tuple(s.labels.get(x, "") for x in keys)
            if s.name.endswith("_bucket"):
                le = s.labels.get("le", "+Inf")
                buckets.setdefault(k, []).append((float("inf") if le == "+Inf" else float(le), s.value))
            elif s.name.endswith("_sum"):
                sums[k] = s.value
            elif s.name.endswith("_count"):
                counts[k] = s.value
    for k, b in buckets.items():
        b.sort()
        out[k] = (tuple(b), sums.get(k, 0.0), counts.get(k, 0.0))
    return out


def quantile(q: float, new: tuple, old: tuple | None) -> float | None:
    """Estimate a quantile (seconds) of the observations between two histogram samples,
    interpolating linearly inside the bucket (as PromQL's histogram_quantile does)."""
    nb = new[0]
    ob = old[0] if old is not None else None
    deltas = []
    for i, (bound, c) in enumerate(nb):
        prev = ob[i][1] if ob is not None and i < len(ob) else 0.0
        deltas.append((bound, c - prev))
    total = deltas[-1][1] if deltas else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, lower_count = 0.0, 0.0
    for bound, cum in deltas:
        if cum >= rank:
            if bound == float("inf"):
                return lower
            span = cum - lower_count
            frac = (rank - lower_count) / span if span > 0 else 1.0
            return lower + (bound - lower) * frac
        lower, lower_count = bound, cum
    return lower


class _Sample:
    __slots__ = ("t", "routes", "route_hist", "clusters", "cluster_hist", "endpoints",
                 "cluster_events", "l4")

    def __init__(self, t: float):
        self.t = t
        self.routes: dict = {}
        self.route_hist: dict = {}
        self.clusters: dict = {}
        self.cluster_hist: dict = {}
        self.endpoints: dict = {}         # cluster -> (attempts, errors) from endpoint state
        self.cluster_events: dict = {}    # cluster -> {retries, timeouts, overflow}
        self.l4 = dashboard_l4.L4Sample()  # TCP proxy and Kafka counters


class Sampler:
    """Cumulative counts once a second; rates are differences between samples."""

    def __init__(self, app, interval: float = SAMPLE_INTERVAL_S, keep: int = KEEP_SAMPLES):
        self.app = app
        self.interval = interval
        self.samples: collections.deque[_Sample] = collections.deque(maxlen=keep)
        self._task: asyncio.Task | None = None
        self._last_view = 0.0

    def read(self) -> _Sample:
        """Cumulative counts right now (not stored)."""
        app = self.app
        m = app.metrics
        s = _Sample(time.monotonic())
        if m.enabled:
            s.routes = _counter_by(m, "sidecar_http_downstream_rq_total",
                                   ("listener", "virtual_host", "route"))
            s.route_hist = _histogram_by(m, "sidecar_http_downstream_rq_time_seconds",
                                         ("listener", "virtual_host", "route"))
            s.clusters = _counter_by(m, "sidecar_upstream_rq_total", ("cluster",))
            s.cluster_hist = _histogram_by(m, "sidecar_upstream_rq_time_seconds", ("cluster",))
            retries = _counter_by(m, "sidecar_upstream_rq_retry_total", ("cluster",))
            timeouts = _counter_by(m, "sidecar_upstream_rq_timeout_total", ("cluster",))
            overflow = _counter_by(m, "sidecar_upstream_rq_overflow_total", ("cluster",))
            for (name,), d in retries.items():
                s.cluster_events.setdefault(name, {})["retries"] = d.get("attempted", 0.0)
            for (name,), d in timeouts.items():
                s.cluster_events.setdefault(name, {})["timeouts"] = sum(d.values())
            for (name,), d in overflow.items():
                s.cluster_events.setdefault(name, {})["overflow"] = sum(d.values())
            s.l4 = dashboard_l4.sample(m)
        for cs in app.clusters.clusters():
            name = cs.name
            tot = err = 0
            for h in cs.hosts:
                tot += h.rq_total
                err += h.rq_error
            s.endpoints[name] = (tot, err)
        return s

    def take(self) -> _Sample:
        s = self.read()
        self.samples.append(s)
        return s

    async def run(self) -> None:
        try:
            while time.monotonic() - self._last_view < IDLE_STOP_S:
                try:
                    self.take()
                except Exception:  # pragma: no cover  (never let the sampler die)
                    log.exception("dashboard sampler failed")
                await asyncio.sleep(self.interval)
        finally:
            self._task = None

    def start(self) -> None:
        """Sample while someone is looking (costs nothing when nobody opens the dashboard)."""
        self._last_view = time.monotonic()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        t = self._task
        if t is not None:
            t.cancel()
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    # ---- the view ------------------------------------------------------------------------
    def _window(self) -> tuple[_Sample, _Sample | None]:
        """(now, the sample about WINDOW_S ago, or the oldest one we have)."""
        new = self.read()
        old = None
        for s in reversed(self.samples):
            if new.t - s.t < 0.2:
                continue
            old = s
            if new.t - s.t >= WINDOW_S:
                break
        return new, old

    def history(self, get) -> list[float]:
        """Per-interval rate over the ring (oldest first): ``get(sample) -> cumulative``."""
        out = []
        prev = None
        for s in self.samples:
            v = get(s)
            if prev is not None:
                dt = s.t - prev[0]
                out.append(round(max(0.0, v - prev[1]) / dt, 3) if dt > 0 else 0.0)
            prev = (s.t, v)
        return out[-(KEEP_SAMPLES - 1):]

    def view(self) -> dict:
        app = self.app
        new, old = self._window()
        dt = (new.t - old.t) if old is not None else 0.0

        def rate(a: float, b: float) -> float:
            return round(max(0.0, a - b) / dt, 3) if dt > 0 else 0.0

        def ms(v: float | None) -> float | None:
            return round(v * 1000, 3) if v is not None else None

        # routes
        routes = []
        all_total = all_5xx = all_total_old = all_5xx_old = 0.0
        for key, d in new.routes.items():
            od = old.routes.get(key, {}) if old is not None else {}
            total, total_old = sum(d.values()), sum(od.values())
            if not key[2] and not total:
                continue     # the listener's "no route" series, while nothing went there
            e5, e5_old = d.get("5xx", 0.0), od.get("5xx", 0.0)
            all_total += total
            all_5xx += e5
            all_total_old += total_old
            all_5xx_old += e5_old
            n = total - total_old
            h = new.route_hist.get(key)
            oh = old.route_hist.get(key) if old is not None else None
            listener, vhost, route = key
            routes.append({
                "listener": listener, "virtual_host": vhost or None,
                "route": route or "(no route)",
                "rps": rate(total, total_old),
                "success_rate": round(1.0 - (e5 - e5_old) / n, 4) if n > 0 else None,
                "p50_ms": ms(quantile(0.5, h, oh)) if h else None,
                "p99_ms": ms(quantile(0.99, h, oh)) if h else None,
                "requests": int(total), "errors_5xx": int(e5),
                "by_class": {k: int(v) for k, v in sorted(d.items())},
                "history": self.history(lambda s, k=key: sum(s.routes.get(k, {}).values())),
            })
        routes.sort(key=lambda r: (-r["rps"], -r["requests"], r["route"]))
        n_all = all_total - all_total_old

        # clusters
        clusters = []
        now = time.monotonic()
        for cs in sorted(app.clusters.clusters(), key=lambda c: c.name)[:MAX_CLUSTERS]:
            name = cs.name
            tot, err = new.endpoints.get(name, (0, 0))
            otot, oerr = old.endpoints.get(name, (0, 0)) if old is not None else (0, 0)
            n = tot - otot
            h = new.cluster_hist.get((name,))
            oh = old.cluster_hist.get((name,)) if old is not None else None
            ev = new.cluster_events.get(name, {})
            t = cs.config.circuit_breakers.default
            open_ = breaker_open(cs)
            eps = []
            for host in list(cs.hosts)[:MAX_ENDPOINTS]:
                ejected = host.ejected_until > now
                try:
                    ew = endpoint_ewma(cs, host, now)
                except Exception:
                    ew = None
                if not host.hc_healthy:
                    health = "unhealthy"
                elif ejected:
                    health = "ejected"
                else:
                    health = "healthy"
                eps.append({
                    "address": host.address, "hostname": host.endpoint.hostname or None,
                    "weight": host.endpoint.weight, "health": health,
                    "available": bool(host.hc_healthy and not ejected and not host.removed),
                    "active_hc": host.last_hc or None, "ejected": ejected,
                    "ejected_for_s": round(max(0.0, host.ejected_until - now), 1),
                    "ejections": host.ejections,
                    "ewma_ms": round(ew[0] * 1000, 3) if ew is not None else None,
                    "cost": round(ew[1] * 1000, 3) if ew is not None else None,
                    "rq_active": host.active_requests,
                    "rq_total": host.rq_total, "rq_error": host.rq_error,
                    "cx_active": host.http_cx_active + host.cx_active,
                })
            clusters.append({
                "name": name, "type": cs.config.type, "lb_policy": cs.config.lb.policy,
                "rps": rate(tot, otot),
                "success_rate": round(1.0 - (err - oerr) / n, 4) if n > 0 else None,
                "p50_ms": ms(quantile(0.5, h, oh)) if h else None,
                "p99_ms": ms(quantile(0.99, h, oh)) if h else None,
                "attempts": tot, "errors": err,
                "retries": int(ev.get("retries", 0)), "timeouts": int(ev.get("timeouts", 0)),
                "overflow": int(ev.get("overflow", cs.state.breakers.overflow)),
                "rq_active": cs.state.breakers.active_requests,
            "rq_pending": cs.state.breakers.pending_requests,
                "retries_active": cs.state.breakers.active_retries,
                "breaker": {"open": [k for k, v in open_.items() if v],
                            "max_connections": t.max_connections,
                            "max_pending_requests": t.max_pending_requests,
                            "max_requests": t.max_requests, "max_retries": t.max_retries},
                "endpoints_total": len(cs.hosts),
                "endpoints_available": sum(1 for x in cs.hosts if x.available),
                "endpoints": eps,
                "history": self.history(lambda s, k=name: s.endpoints.get(k, (0, 0))[0]),
            })

        # listeners, config, tracing
        listeners = []
        sessions: dict[str, int] = {}
        for name, lr in list(app.store.listeners.items()):
            chains = lr.chains.chains if lr.chains is not None else []
            listeners.append({"name": name, "address": f"{lr.config.host}:{lr.bound_port}",
                              "cx_active": len(lr.connections) + len(lr.sessions),
                              "rq_active": lr.active_requests(),
                              "routes": _route_count(lr),
                              "kind": "l4" if lr.config.l4 else "http",
                              "chains": [{"name": c.name or (c.tcp.config.stat_prefix
                                                             if c.tcp is not None else "http"),
                                          "kind": "http" if c.http is not None else
                                          "kafka" if c.tcp is not None and c.tcp.kafka is not None
                                          else "tcp"} for c in chains]})
            for sess in list(lr.sessions):
                prefix = sess.f.config.stat_prefix
                sessions[prefix] = sessions.get(prefix, 0) + 1
        l4 = dashboard_l4.view(new.l4, old.l4 if old is not None else None, rate, sessions)
        snap = app.store.snapshot
        tr = snap.tracing if snap is not None else None
        cp = getattr(app, "control_plane", None)
        return {
            "time": time.time(),
            "uptime_s": round(time.time() - app.started_at, 1),
            "metrics_enabled": app.metrics.enabled,
            "window_s": round(dt, 2),
            "config": {
                "version": snap.version if snap is not None else None,
                "source_format": snap.source_format if snap is not None else None,
                "applied_at": app.store.applied_at or None,
                "accepted": app.reloads_ok, "rejected": app.reloads_failed,
                "last_error": app.last_reload_error or None,
                "dynamic": cp is not None,
            },
            "tracing": {"exporter": tr.exporter, "sample_percent": tr.sample_percent,
                        "active": getattr(app, "_tracing", None) is not None} if tr is not None else None,
            "totals": {"rps": rate(all_total, all_total_old),
                       "success_rate": round(1.0 - (all_5xx - all_5xx_old) / n_all, 4) if n_all > 0 else None,
                       "requests": int(all_total)},
            "listeners": listeners,
            "routes": routes[:MAX_ROUTES],
            "routes_total": len(routes),
            "clusters": clusters,
            "tcp": l4["tcp"],
            "kafka": l4["kafka"],
            # Redis stores and rate limit services: up/down, last error, failure-policy decisions
            "dependencies": [dataclasses.asdict(d) for d in app.stores.statuses()]
            if getattr(app, "stores", None) is not None else [],
        }


def _route_count(lr) -> int:
    table = lr.hcm.table if lr.hcm is not None else None
    return sum(1 for _ in table.all_routes()) if table is not None else 0


# ---- routes -------------------------------------------------------------------------------

def _static(name: str) -> Response:
    path = os.path.join(STATIC_DIR, name)
    if "/" in name or os.path.dirname(os.path.abspath(path)) != STATIC_DIR or \
            not os.path.isfile(path):
        return text("404: Not Found", 404)
    with open(path, "rb") as f:
        body = f.read()
    ctype = _STATIC_TYPES.get(os.path.splitext(name)[1], "application/octet-stream")
    return respond(body, ctype, headers=(("cache-control", "no-cache"),))


def add_dashboard_routes(router: Router, app) -> None:
    install_state_collector(app)
    sampler = Sampler(app)

    async def index(request: LocalRequest) -> Response:
        return _static("dashboard.html")

    async def static(request: LocalRequest) -> Response:
        return _static(request.tail)

    async def data(request: LocalRequest) -> Response:
        sampler.start()
        return json_response(sampler.view(), headers=(("cache-control", "no-store"),))

    router.get("/", index)
    router.get("/dashboard", index)
    router.get("/dashboard.json", data)
    router.prefix("GET", "/static/", static)
    router.on_cleanup.append(sampler.stop)
