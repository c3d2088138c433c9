"""Active HTTP, gRPC and TCP (``tcp_probe``) health checking at run time (config:
``sidecar.config.cluster.HealthCheck``).

Per cluster with ``health_checks``, one asyncio task per (check, host) sends ``GET <path>``
through the upstream HTTP/1.1 codec, or a ``grpc.health.v1.Health/Check`` call through the
upstream HTTP/2 codec (``grpc_health_check``: healthy when the call answers SERVING), TLS when
the cluster uses it, every interval plus jitter,
with a timeout, on the checker's own connection (kept between checks with Envoy's default
``reuse_connection: true``, a fresh one each time with false), and never blocks the loop. Verdicts follow Envoy:

* a response with an expected status is a success; ``healthy_threshold`` successes in a row
  bring an unhealthy host back;
* a response with any other status fails the host at once, unless the status is one of
  ``retriable_statuses``, which (like timeouts and connection failures) count toward
  ``unhealthy_threshold`` failures in a row;
* hosts start healthy (so a restarted sidecar does not black-hole traffic) and the first check
  runs at once (after ``initial_jitter``); the first check's failure marks the host unhealthy
  at once, as Envoy's hosts start "pending the first check".

A host is in the load-balancing set only while every check passes (and it is not ejected by
outlier detection); ``Cluster.rebuild`` applies the panic threshold. New endpoints (EDS, DNS)
are picked up within a second.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from typing import TYPE_CHECKING

from multidict import MultiDict

from sidecar.cluster.cluster import ClusterState
from sidecar.cluster.endpoint import EndpointState
from sidecar.cluster.manager import ClusterManager
from sidecar.config.cluster import HealthCheck
from sidecar.config.http2 import UPSTREAM_DEFAULTS
from sidecar.core.body import BodyTooLarge, Headers
from sidecar.core.context import RequestContext
from sidecar.core.errors import UpstreamError
from sidecar.core.message import Request
from sidecar.core.metrics import NULL, CounterChild
from sidecar.observability.metrics import Metrics
from sidecar.observability.stats import ClusterStats
from sidecar.upstream.http1 import ConnectionPool

if TYPE_CHECKING:
    from sidecar.upstream.http2_pool import Http2Pool  # HTTP/2 (ngh2) is loaded only for gRPC health checks

log = logging.getLogger("sidecar.health_check")

OUTCOMES = ("success", "failure", "timeout", "network_failure")
_MAX_DRAIN = 64 * 1024


async def probe(pool: ConnectionPool, check: HealthCheck, host_header: str) -> tuple[str, int]:
    """One HTTP health check over the upstream codec (TLS when the cluster uses it), on the
    checker's own connection to the host (not the traffic pool: checks never count against
    circuit breakers, as in Envoy). Returns (outcome, status): outcome is one of OUTCOMES."""
    reuse = check.reuse_connection
    headers: Headers = MultiDict((("host", host_header), ("user-agent", "Envoy/HC")))
    if not reuse:
        headers["connection"] = "close"
    req = Request("GET", check.path, "", headers, b"", RequestContext("health_check", None, 0.0))
    loop = asyncio.get_running_loop()
    conn = None
    try:
        async with asyncio.timeout(check.timeout_s):
            conn = pool.take_idle() if reuse else None
            if conn is None:
                conn = await pool.connect()
            resp = await conn.send(req, None, loop.time() + check.timeout_s)
            body = resp.body
            if not isinstance(body, bytes):
                await body.read_all(_MAX_DRAIN)     # let the connection be reused
    except TimeoutError:
        if conn is not None:
            conn.close()
        return "timeout", 0
    except (UpstreamError, BodyTooLarge, OSError):
        if conn is not None:
            conn.close()
        return "network_failure", 0
    if not reuse and conn is not None:
        conn.close()
    status = resp.status
    return ("success" if check.status_ok(status) else "failure"), status


# grpc.health.v1 (grpc/health/v1/health.proto): HealthCheckRequest {string service = 1;} and
# HealthCheckResponse {ServingStatus status = 1;}, SERVING = 1. Two one-field messages, encoded
# and read here rather than pulling in a protobuf runtime for them.
GRPC_SERVING = 1


def health_check_request(service: str) -> bytes:
    """The gRPC message (5-byte prefix + protobuf) asking about ``service``."""
    name = service.encode()
    msg = b""
    if name:
        n = len(name)
        varint = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            if n:
                varint.append(b | 0x80)
            else:
                varint.append(b)
                break
        msg = b"\x0a" + bytes(varint) + name
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


def serving_status(body: bytes) -> int | None:
    """``status`` of a HealthCheckResponse in a gRPC body (None if unreadable)."""
    if len(body) < 5 or body[0] != 0:
        return None
    msg = body[5:5 + int.from_bytes(body[1:5], "big")]
    i = 0
    status = 0               # proto3: an absent field is its default (UNKNOWN)
    while i < len(msg):
        key = msg[i]
        i += 1
        if key == 0x08:          # field 1, varint
            v = shift = 0
            while i < len(msg):
                b = msg[i]
                i += 1
                v |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            status = v
        elif key & 7 == 2:       # any length-delimited field: skip it
            if i >= len(msg):
                return None
            n = msg[i]
            i += 1 + n
        else:
            return None
    return status


async def probe_grpc(pool: Http2Pool, check: HealthCheck, authority: str) -> tuple[str, int]:
    """One ``grpc.health.v1.Health/Check`` call on the checker's own HTTP/2 connection.
    Returns (outcome, grpc-status or -1 when the call answered but not SERVING)."""
    headers: Headers = MultiDict((("host", authority), ("content-type", "application/grpc"),
                                  ("te", "trailers"), ("user-agent", "Envoy/HC")))
    req = Request("POST", check.path, "", headers, health_check_request(check.grpc_service or ""),
                  RequestContext("health_check", None, 0.0))
    req.version = "2"
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(check.timeout_s):
            conn = pool.acquire() if check.reuse_connection else None
            if conn is None:
                conn = await pool.connect()
                conn.used += 1
            resp = await conn.send(req, authority, loop.time() + check.timeout_s)
            body = resp.body
            data = body if isinstance(body, bytes) else await body.read_all(_MAX_DRAIN)
            trailers = resp.trailers if isinstance(body, bytes) else body.trailers
    except TimeoutError:
        return "timeout", 0
    except (UpstreamError, BodyTooLarge, OSError):
        return "network_failure", 0
    finally:
        if not check.reuse_connection:
            pool.close_all()
    gs = resp.headers.get("grpc-status")
    if gs is None and trailers is not None:
        gs = trailers.get("grpc-status")
    if resp.status != 200 or gs != "0":
        return "failure", int(gs) if gs is not None and gs.isdigit() else 2
    return ("success", 0) if serving_status(data) == GRPC_SERVING else ("failure", -1)


async def tcp_probe(host: EndpointState, check: HealthCheck, ssl_ctx: ssl.SSLContext | None,
                    sni: str) -> tuple[str, int]:
    """One TCP health check (Envoy ``tcp_health_check``): connect (with the cluster's TLS),
    send ``check.tcp.send``, pass once every ``receive`` block was seen in order."""
    tcp = check.tcp
    assert tcp is not None
    ep = host.endpoint
    w: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(check.timeout_s):
            r, w = await asyncio.open_connection(
                ep.host, ep.port, ssl=ssl_ctx,
                server_hostname=(sni or ep.hostname or ep.host) if ssl_ctx is not None else None)
            if tcp.send:
                w.write(tcp.send)
                await w.drain()
            got = b""
            pos = 0
            for block in tcp.receive:
                while True:
                    i = got.find(block, pos)
                    if i >= 0:
                        pos = i + len(block)
                        break
                    data = await r.read(65536)
                    if not data:
                        return "failure", 0
                    got += data
                    if len(got) > _MAX_DRAIN:
                        return "failure", 0
        return "success", 0
    except TimeoutError:
        return "timeout", 0
    except (OSError, ssl.SSLError):
        return "network_failure", 0
    finally:
        if w is not None:
            w.close()


class _HostState:
    __slots__ = ("healthy", "ok", "fail", "checked", "edge")

    def __init__(self) -> None:
        self.healthy = True
        self.ok = 0
        self.fail = 0
        self.checked = False
        self.edge = ""        # "healthy" / "unhealthy" right after a transition


class _Stats:
    __slots__ = ("outcome", "to_healthy", "to_unhealthy")

    def __init__(self, m: Metrics, cst: ClusterStats, cluster: str):
        if not m.enabled:
            self.outcome: dict[str, CounterChild] = {o: NULL for o in OUTCOMES}
            self.to_healthy: CounterChild = NULL
            self.to_unhealthy: CounterChild = NULL
            return
        fam = m.counter("sidecar_upstream_health_check_total", "Active health checks by result",
                        ("cluster", "result"))
        self.outcome = {"success": cst.hc_success, "failure": cst.hc_failure,
                        "timeout": fam.labels(cluster, "timeout"),
                        "network_failure": fam.labels(cluster, "network_failure")}
        tr = m.counter("sidecar_upstream_health_check_transitions_total",
                       "Hosts changing active health-check verdict", ("cluster", "to"))
        self.to_healthy = tr.labels(cluster, "healthy")
        self.to_unhealthy = tr.labels(cluster, "unhealthy")


# Verdicts of probes that ran together are applied together, so that requests never see the
# moment between two hosts swapping health (one marked down, the other not yet up); a verdict
# waits at most this long for the probes still running beside it.
ROUND_GRACE_S = 0.05

_Verdict = tuple[HealthCheck, EndpointState, "_HostState", str, int, "asyncio.Future[None]"]


class ClusterChecker:
    """The health checks of one cluster: a task per (check, host), and a supervisor that
    follows the endpoint set of the cluster's current version. A host's checks start on a
    fixed beat (``interval`` from the previous start), so the hosts of a check stay in step and
    their verdicts are applied in rounds (``ROUND_GRACE_S``)."""

    def __init__(self, state: ClusterState, checks: tuple[HealthCheck, ...], metrics: Metrics):
        self.state = state
        self.checks = checks
        self.stats = _Stats(metrics, state.stats, state.name)
        # (check, address) -> the checker's own connections to the host
        self.pools: dict[tuple[int, str], ConnectionPool | Http2Pool] = {}
        self.host_state: dict[tuple[int, str], _HostState] = {}
        self.tasks: dict[tuple[int, str], asyncio.Task[None]] = {}
        self.closed = False
        self._had_traffic = False
        self._in_flight = [0] * len(checks)           # probes running, per check
        self._round: list[list[_Verdict]] = [[] for _ in checks]
        self._round_timer: list[asyncio.TimerHandle | None] = [None] * len(checks)
        self._hosts_seen: list[EndpointState] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.start()

    @property
    def hosts(self) -> list[EndpointState]:
        c = self.state.current
        return c.hosts if c is not None else []

    def start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return                      # started again once the loop runs (App.start)
        if self._supervisor is None:
            self._supervisor = loop.create_task(self._supervise())

    async def _supervise(self) -> None:
        while not self.closed:
            if self.hosts is not self._hosts_seen:
                self._sync()
            await asyncio.sleep(1.0)

    def _sync(self) -> None:
        hosts = self.hosts
        self._hosts_seen = hosts
        current = {h.address: h for h in hosts}
        loop = asyncio.get_running_loop()
        for key in [k for k in self.tasks if k[1] not in current]:
            self.tasks.pop(key).cancel()
            self.host_state.pop(key, None)
        for key in [k for k in self.pools if k[1] not in current]:
            self.pools.pop(key).close_all()
        beat = loop.time()
        for i, check in enumerate(self.checks):
            for addr, h in current.items():
                key = (i, addr)
                t = self.tasks.get(key)
                if t is None or t.done():
                    st = self.host_state.setdefault(key, _HostState())
                    self.tasks[key] = loop.create_task(self._run(i, check, h, st, beat))

    def _pool(self, i: int, host: EndpointState) -> ConnectionPool | Http2Pool:
        pool = self.pools.get((i, host.address))
        if pool is None:
            c = self.state.current
            ep = host.endpoint
            tls = c.config.tls if c is not None else None
            if self.checks[i].grpc_service is not None:
                from sidecar.upstream.http2_pool import Http2Pool  # lazy: HTTP/2 only for gRPC checks
                pool = self.pools[(i, host.address)] = Http2Pool(
                    ep.host, ep.port, c.config.connect_timeout_s if c is not None else 5.0,
                    c.config.http2 if c is not None else UPSTREAM_DEFAULTS,
                    c.ssl_context_h2 if c is not None else None, tls.sni if tls is not None else "")
                return pool
            pool = self.pools[(i, host.address)] = ConnectionPool(
                ep.host, ep.port, c.config.connect_timeout_s if c is not None else 5.0,
                max_idle=1, ssl_context=c.ssl_context if c is not None else None,
                server_hostname=tls.sni if tls is not None else "")
        return pool

    def close(self, restore: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        for t in self.tasks.values():
            t.cancel()
        self.tasks.clear()
        for i, timer in enumerate(self._round_timer):
            if timer is not None:
                timer.cancel()
                self._round_timer[i] = None
        for pool in self.pools.values():
            pool.close_all()
        self.pools.clear()
        c = self.state.current
        if restore and c is not None:
            for h in c.hosts:
                c.set_health(h, True, "")

    # ---- one host --------------------------------------------------------------------------
    async def _run(self, i: int, check: HealthCheck, host: EndpointState, st: _HostState,
                   beat: float) -> None:
        """``beat``: when the first check is due (the same for the hosts synced together, so
        they stay in step); then an interval after the previous check started."""
        host_header = check.host or self.state.name
        loop = asyncio.get_running_loop()
        if check.initial_jitter_s > 0:
            await asyncio.sleep(random.random() * check.initial_jitter_s)
        due = max(beat, loop.time())
        while not self.closed and not host.removed:
            verdict: tuple[str, int] | None = None
            self._in_flight[i] += 1
            try:
                if check.tcp is not None:
                    c = self.state.current
                    tls = c.config.tls if c is not None else None
                    outcome, status = await tcp_probe(
                        host, check, (c.ssl_context or c.ssl_context_h2) if c is not None else None,
                        tls.sni if tls is not None else "")
                else:
                    pool = self._pool(i, host)
                    if isinstance(pool, ConnectionPool):
                        outcome, status = await probe(pool, check, host_header)
                    else:
                        outcome, status = await probe_grpc(pool, check,
                                                           check.grpc_authority or host_header)
                verdict = (outcome, status)
            except asyncio.CancelledError:
                raise
            except Exception:      # a bug must not end health checking for the host
                log.exception("cluster %s: health check of %s failed unexpectedly",
                              self.state.name, host.address)
            finally:
                self._in_flight[i] -= 1
            if verdict is not None:
                await self._in_round(i, check, host, st, verdict[0], verdict[1])
            now = loop.time()
            due = max(due + self._next_interval(check, st), now)
            await asyncio.sleep(due - now)

    async def _in_round(self, i: int, check: HealthCheck, host: EndpointState, st: _HostState,
                        outcome: str, status: int) -> None:
        """Queue a verdict; the round is applied when no probe of the check is running (or
        after ``ROUND_GRACE_S``)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._round[i].append((check, host, st, outcome, status, done))
        if self._in_flight[i] == 0:
            self._apply_round(i)
        elif self._round_timer[i] is None:
            self._round_timer[i] = loop.call_later(ROUND_GRACE_S, self._apply_round, i)
        await done

    def _apply_round(self, i: int) -> None:
        timer = self._round_timer[i]
        if timer is not None:
            timer.cancel()
            self._round_timer[i] = None
        verdicts, self._round[i] = self._round[i], []
        for check, host, st, outcome, status, done in verdicts:
            try:
                self._apply(check, host, st, outcome, status)
            except Exception:
                log.exception("cluster %s: applying the health check of %s failed",
                              self.state.name, host.address)
            if not done.done():
                done.set_result(None)

    def _next_interval(self, check: HealthCheck, st: _HostState) -> float:
        base = check.interval_s
        if check.no_traffic_interval_s is not None and not self._had_traffic:
            if any(h.rq_total for h in self.hosts):
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

    def _apply(self, check: HealthCheck, host: EndpointState, st: _HostState, outcome: str,
               status: int) -> None:
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
        detail = f"{outcome} {status}" if status else outcome
        if st.healthy != was:
            st.edge = "healthy" if st.healthy else "unhealthy"
            (self.stats.to_healthy if st.healthy else self.stats.to_unhealthy).inc()
            log.warning("cluster %s: %s is now %s (active health check: %s)", self.state.name,
                        host.address, "healthy" if st.healthy else "unhealthy", detail)
        verdict = all(s.healthy for (i, a), s in self.host_state.items() if a == host.address)
        c = self.state.current
        if c is not None:
            c.set_health(host, verdict, detail)


def follow(clusters: ClusterManager, metrics: Metrics) -> None:
    """Give every cluster whose config has health checks one ClusterChecker (replaced when
    the checks change, closed when they go or the cluster goes)."""

    def on_activated(state: ClusterState) -> None:
        c = state.current
        checks = c.config.health_checks if c is not None else ()
        old = state.health
        if isinstance(old, ClusterChecker) and not old.closed and old.checks == checks:
            old.start()
            return
        if isinstance(old, ClusterChecker):
            state.health = None
            old.close(restore=not checks)
        if checks:
            state.health = ClusterChecker(state, checks, metrics)

    def on_removed(state: ClusterState) -> None:
        old = state.health
        if isinstance(old, ClusterChecker):
            state.health = None
            old.close(restore=False)

    clusters.subscribe(on_activated, on_removed)
