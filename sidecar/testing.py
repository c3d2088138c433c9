"""Test helpers shipped with the package (mitmproxy's ``test/tflow.py`` idea).

Real sockets on 127.0.0.1 only:

    async with Upstream(handler) as up:                  # a real HTTP server (aiohttp)
        cfg = native_config(clusters={"svc": [up.address]}, routes=[{"match": {"prefix": "/"},
                                                                      "cluster": "svc"}])
        async with running_proxy(cfg) as proxy:          # the real sidecar, in this event loop
            async with aiohttp.ClientSession() as s:
                r = await s.get(proxy.url("/x"))
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import yaml
from aiohttp import web
from multidict import MultiDict

from filters import python as user_filters
from sidecar.admin.server import start_admin
from sidecar.cluster.manager import ClusterManager
from sidecar.config.native.cluster import cluster_from_native
from sidecar.config.snapshot import Snapshot
from sidecar.config.stores import StoresConfig
from sidecar.core.body import BodyStream
from sidecar.core.context import RequestContext
from sidecar.core.filter import FilterSpec, GrpcClient, UpstreamClient
from sidecar.core.grpc import EnvoyGrpcService
from sidecar.core.limits import (
    NO_RATE_LIMITS,
    FailurePolicy,
    RateLimitService,
    RemoteBuckets,
    RemoteReplayCache,
    ReplayCache,
    RouteRateLimits,
    TokenBuckets,
)
from sidecar.core.message import Request, Response
from sidecar.observability.metrics import Metrics
from sidecar.observability.stats import StatsCache
from sidecar.runtime.app import App
from sidecar.runtime.filter_env import ProxyFilterEnv
from sidecar.runtime.loader import snapshot_from_doc
from sidecar.runtime.stores import StoreRuntime
from sidecar.runtime.watchdog import DEFAULT_THRESHOLD_S
from sidecar.sdk import UserFilter
from sidecar.shared.api import SharedState
from sidecar.shared.local import LocalState
from sidecar.shared.testing import free_port as free_port  # re-exported: the tests take it from here


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict
    body: bytes
    time: float


class Upstream:
    """A real aiohttp upstream on 127.0.0.1 that records what it receives.

    ``handler(request) -> web.StreamResponse`` (async); default: 200 with a JSON echo of the
    request. With a custom handler the body is recorded only if the handler read it.
    """

    def __init__(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
                 name: str = "upstream", port: int = 0):
        self.handler = handler
        self.name = name
        self.port = port
        self.requests: list[Recorded] = []
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.handler is not None:
            # a custom handler reads the body itself (it may stream it), so record it unread;
            # the body is recorded only if the handler has read it by the time it returns
            rec = Recorded(request.method, request.path_qs, dict(request.headers), b"", time.monotonic())
            self.requests.append(rec)
            resp = await self.handler(request)
            read = getattr(request, "_read_bytes", None)   # aiohttp's cache of read()
            if read:
                rec.body = read
            return resp
        body = await request.read()
        self.requests.append(Recorded(request.method, request.path_qs, dict(request.headers), body,
                                      time.monotonic()))
        return web.json_response({"upstream": self.name, "method": request.method,
                                  "path": request.path_qs,
                                  "headers": {k.lower(): v for k, v in request.headers.items()},
                                  "body": body.decode("utf-8", "replace")})

    async def start(self) -> "Upstream":
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "Upstream":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


class TcpServer:
    """A real TCP server on 127.0.0.1 in the current event loop (the TCP proxy's upstream).

    Default: echo every byte; on the client's FIN, send ``farewell`` (if any) and close (so a
    test sees half-close pass both ways). ``greeting`` is sent first on every connection.
    ``source=N``: send N bytes as fast as the connection takes them (ignoring the client),
    counting what was written in ``sent``. ``ssl``: serve TLS.
    """

    def __init__(self, *, greeting: bytes = b"", farewell: bytes = b"", source: int = 0,
                 ssl: Any = None, name: str = "tcp"):
        self.greeting = greeting
        self.farewell = farewell
        self.source = source
        self.ssl = ssl
        self.name = name
        self.port = 0
        self.connections = 0
        self.open = 0
        self.received = bytearray()
        self.sent = 0
        self.peers: list[tuple[str, int]] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self._writers.add(w)
        self.peers.append(w.get_extra_info("peername"))
        try:
            if self.greeting:
                w.write(self.greeting)
            if self.source:
                chunk = b"x" * 65536
                left = self.source
                while left > 0:
                    n = min(left, len(chunk))
                    w.write(chunk[:n])
                    await w.drain()
                    self.sent += n
                    left -= n
                if w.can_write_eof():
                    w.write_eof()
                await r.read()
                return
            while True:
                data = await r.read(65536)
                if not data:
                    break
                self.received += data
                w.write(data)
                await w.drain()
            if self.farewell:
                w.write(self.farewell)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.open -= 1
            self._writers.discard(w)
            w.close()

    async def __aenter__(self) -> "TcpServer":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port or 0,
                                                  ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            self._server = None


def native_config(*, clusters: dict[str, Any] | None = None, routes: list | None = None,
                  listener: dict | None = None, filters: list | None = None,
                  extra_listeners: list | None = None, **top: Any) -> dict:
    """A native config dict with one listener on an ephemeral port (port 0).

    ``clusters``: name -> list of "host:port" (or a full cluster dict).
    """
    cl = []
    for name, v in (clusters or {}).items():
        if isinstance(v, dict):
            cl.append({"name": name, **v})
        else:
            cl.append({"name": name, "endpoints": list(v)})
    lst = {"name": "test", "address": "127.0.0.1", "port": 0, "routes": routes or []}
    if filters:
        lst["filters"] = filters
    if listener:
        lst.update(listener)
    cfg = {"admin": {"address": "127.0.0.1", "port": 0}, "listeners": [lst] + (extra_listeners or []),
           "clusters": cl}
    cfg.update(top)
    return cfg


class RunningProxy:
    def __init__(self, app: App):
        self.app = app

    def port(self, listener: str | None = None) -> int:
        lrs = self.app.store.listeners
        if listener is None:
            return next(iter(lrs.values())).bound_port
        return lrs[listener].bound_port

    def url(self, path: str = "/", listener: str | None = None) -> str:
        return f"http://127.0.0.1:{self.port(listener)}{path}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.app.admin_port}"

    async def apply(self, cfg: dict | Snapshot) -> None:
        await self.app.store.apply(to_snapshot(cfg))


def to_snapshot(cfg: dict | Snapshot) -> Snapshot:
    if isinstance(cfg, Snapshot):
        return cfg
    return snapshot_from_doc(copy.deepcopy(cfg))


@contextlib.asynccontextmanager
async def running_proxy(cfg: dict | Snapshot, *, admin: bool = True, config_path: str | None = None,
                        metrics: bool = True, loop_lag_threshold: float | None = None):
    """Start the real sidecar in the current event loop; stop it on exit."""
    app = App(to_snapshot(cfg), config_path=config_path, metrics_enabled=metrics,
              watch_config=config_path is not None, admin=start_admin,
              loop_lag_threshold_s=DEFAULT_THRESHOLD_S if loop_lag_threshold is None
              else loop_lag_threshold)
    await app.start(admin=admin)
    try:
        yield RunningProxy(app)
    finally:
        await app.close()


class ProxyProcess:
    """The sidecar as a real child process (``python -m sidecar run -c FILE``): for lifecycle
    tests (signals, drain, reload) and anything that must not share the test's event loop."""

    def __init__(self, config: dict | str, tmpdir: str, args: tuple[str, ...] = (),
                 env: dict | None = None):
        self.tmpdir = tmpdir
        if isinstance(config, dict):
            self.config_path = os.path.join(tmpdir, "sidecar.yaml")
            with open(self.config_path, "w") as f:
                yaml.safe_dump(config, f)
        else:
            self.config_path = config
        self.args = args
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(tmpdir, "sidecar.log")

    def start(self, wait_port: int | None = None, timeout: float = 15.0) -> "ProxyProcess":
        self._log = open(self.log_path, "w")
        env = dict(os.environ)
        env.update(self.env or {})
        args = list(self.args)
        if "--concurrency" not in args:
            args += ["--concurrency", "1"]     # one process unless a test asks for workers
        self.proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", self.config_path,
                                      *args], stdout=self._log, stderr=subprocess.STDOUT, env=env)
        if wait_port is not None:
            wait_for_port(wait_port, timeout, self)
        return self

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self, sig: int = 15, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        rc = stop_process(self.proc, sig, timeout)
        self._log.close()
        return rc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    """Signal a child, wait up to ``timeout``, then kill it; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_for_port(port: int, timeout: float = 15.0, proc=None) -> None:
    """Wait until 127.0.0.1:port accepts. ``proc`` (a ProxyProcess or a Popen) failing
    first raises at once, with its log when it has one."""
    popen = getattr(proc, "proc", proc)
    log = proc.log if hasattr(proc, "log") else (lambda: "")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if popen is not None and popen.poll() is not None:
            raise RuntimeError(f"child exited with {popen.returncode}:\n{log()}")
        with socket.socket() as s:
            s.settimeout(0.2)
            try:
                s.connect(("127.0.0.1", port))
                return
            except OSError:
                time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s\n{log()}")


async def raw_request(port: int, data: bytes, *, read_timeout: float = 5.0,
                      until_close: bool = False) -> bytes:
    """Send raw bytes, return what comes back (one response, or everything until close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if until_close:
            return await asyncio.wait_for(reader.read(-1), read_timeout)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), read_timeout)
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip())
            if k.strip().lower() == b"transfer-encoding" and b"chunked" in v.lower():
                chunked = True
        if chunked:
            body = b""
            while True:
                size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), read_timeout)
                n = int(size_line.strip().split(b";")[0], 16)
                chunk = await asyncio.wait_for(reader.readexactly(n + 2), read_timeout)
                if n == 0:
                    break
                body += chunk[:-2]
            return head + body
        body = await asyncio.wait_for(reader.readexactly(length), read_timeout) if length else b""
        return head + body
    finally:
        writer.close()


# ---- filter test helpers (no sockets): part of the SDK (docs/filters.md) ---------------------
#
# ``make_request`` builds a request as a filter sees it, ``RecordingNext`` is a fake ``next``,
# ``FilterTestEnv`` stands in for the proxy (metrics, and clusters answered by functions),
# ``build_user_filter`` builds a user filter exactly as a route does (config validation, the
# 500-on-exception guard), ``build_filter`` does the same for a built-in ``FilterSpec``.

Upstream_ = Callable[[Request], Awaitable[Response]]


class FakeCluster:
    """``env.upstream(name)`` in tests: requests are answered by ``handler`` in-process."""

    def __init__(self, name: str, handler: Upstream_):
        self._name = name
        self.handler = handler
        self.requests: list[Request] = []

    @property
    def name(self) -> str:
        return self._name

    async def send(self, request: Request) -> Response:
        self.requests.append(request)
        return await self.handler(request)


class FilterTestEnv:
    """A ``FilterEnv`` for building filters in tests, with its own metrics registry; the
    filters' states persist across builds made with the same object (as across reloads).

    ``clusters`` (name -> list of "host:port", or a native cluster dict) are real clusters
    (``ClusterManager``, ``Cluster.send``: balancer, breakers, pools) a filter reaches through
    ``upstream(name)``; ``close()`` closes their connections. ``upstreams`` (name ->
    ``async (Request) -> Response``) answer a filter's calls in-process instead, recording
    them (``env.upstreams[name].requests``)."""

    def __init__(self, metrics: Metrics | None = None,
                 clusters: dict[str, Any] | None = None,
                 upstreams: dict[str, Upstream_] | None = None,
                 stores: StoresConfig | None = None, shared: SharedState | None = None,
                 local_cluster: str = ""):
        self.metrics = metrics or Metrics()
        self.local_cluster = local_cluster
        self._states: dict[str, object] = {}
        self.shared = shared if shared is not None else LocalState()
        self.clusters = ClusterManager(StatsCache(self.metrics), shared=self.shared)
        self.clusters.apply(tuple(
            cluster_from_native({"name": name, **(v if isinstance(v, dict) else {"endpoints": list(v)})},
                                f"clusters.{name}")
            for name, v in (clusters or {}).items()))
        self.stores = StoreRuntime(stores or StoresConfig(), self.metrics)
        self._env = ProxyFilterEnv(self.metrics, self.clusters, self.shared, self.stores,
                                   local_cluster)
        self.upstreams = {name: FakeCluster(name, h) for name, h in (upstreams or {}).items()}

    def upstream(self, cluster: str) -> UpstreamClient:
        fake = self.upstreams.get(cluster)
        if fake is not None:
            return fake
        return self._env.upstream(cluster)

    def token_buckets(self) -> TokenBuckets:
        return self._env.token_buckets()

    def replay_cache(self) -> ReplayCache:
        return self._env.replay_cache()

    def replay_store(self, store: str, policy: FailurePolicy) -> RemoteReplayCache:
        return self._env.replay_store(store, policy)

    def remote_buckets(self, store: str, policy: FailurePolicy) -> RemoteBuckets:
        return self._env.remote_buckets(store, policy)

    def grpc_client(self, service: EnvoyGrpcService) -> GrpcClient:
        return self._env.grpc_client(service)

    def rate_limit_service(self, service: EnvoyGrpcService) -> RateLimitService:
        return self._env.rate_limit_service(service)

    def close(self) -> None:
        self.clusters.close()

    async def aclose(self) -> None:
        self.clusters.close()
        await self.stores.close()

    def state_for(self, spec: FilterSpec) -> object:
        if spec.name not in self._states:
            self._states[spec.name] = spec.new_state(self)
        return self._states[spec.name]

    def metric(self, name: str, **labels: str) -> float:
        v = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v


class FakeRoute:
    """Stands in for the compiled route a filter is built for."""

    def __init__(self, name: str = "r1", clusters: tuple[str, ...] = ("svc",),
                 pick: Callable[[Request], str] | None = None,
                 rate_limits: RouteRateLimits = NO_RATE_LIMITS):
        self.name = name
        self.stat_name = name
        self.vhost_name = "vh"
        self.cluster_names = clusters
        self._pick = pick
        self.rate_limits = rate_limits

    def pick_cluster(self, req: Request) -> str:
        if self._pick is not None:
            return self._pick(req)
        return self.cluster_names[0] if self.cluster_names else ""


def build_filter(spec: FilterSpec, config: Any, per_route: Any = None,
                 env: FilterTestEnv | None = None, route: FakeRoute | None = None) -> Any:
    """``spec.build`` as the route stack calls it, with a test environment."""
    env = env if env is not None else FilterTestEnv()
    return spec.build(config, per_route, env.state_for(spec), env, route or FakeRoute())


def build_user_filter(cls: type[UserFilter], config: Any = None, *, per_route: Any = None,
                      name: str | None = None, env: FilterTestEnv | None = None,
                      route: FakeRoute | None = None) -> Any:
    """A ``sdk.UserFilter`` subclass built as the proxy builds it for one route: ``config``
    and ``per_route`` (raw mappings, as in YAML) go through the class's parsers (a bad value
    raises ``ConfigError`` with its path), and the instance is wrapped so an exception answers
    500 with flag ``FE`` and counts ``sidecar_filter_errors_total``."""
    name = name or cls.__name__
    cfg = user_filters.UserFilterConfig(
        name=name, module=cls.__module__, class_name=cls.__name__,
        source_file=getattr(sys.modules.get(cls.__module__), "__file__", "") or "", cls=cls,
        config=cls.parse_config(config, "config"), path=name)
    override = None if per_route is None else user_filters.UserPerRoute(per_route, "per_route")
    return build_filter(user_filters.SPEC, cfg, override, env, route)


def make_request(method: str = "GET", path: str = "/", *, query: str = "",
                 headers: dict[str, str] | list[tuple[str, str]] | None = None,
                 body: bytes | list[bytes] = b"", route: FakeRoute | None = None,
                 peer_identity: str | None = None,
                 jwt: dict[str, dict[str, Any]] | None = None,
                 remote_ip: str = "127.0.0.1", request_id: str = "test-request-id") -> Request:
    """A request as a filter sees it. ``body`` as a list of chunks is a streamed body (a
    ``BodyStream`` fed those chunks); ``jwt``: provider -> verified claims (as ``jwt_authn``
    leaves them); ``route`` is the route it matched (a ``FakeRoute`` by default)."""
    h: MultiDict[str] = MultiDict()
    for k, v in (headers.items() if isinstance(headers, dict) else headers or []):
        h.add(k.lower(), v)
    if "host" not in h:
        h["host"] = "example.com"
    ctx = RequestContext("test", (remote_ip, 40000), time.perf_counter(), 8080)
    ctx.request_id = request_id
    ctx.route = route or FakeRoute()
    ctx.peer_identity = peer_identity
    ctx.tls = peer_identity is not None
    if jwt:
        ctx.jwt_payloads.update(jwt)
    req_body: Any = body
    if isinstance(body, list):
        stream = BodyStream()
        for chunk in body:
            stream.feed(chunk)
        stream.feed_eof()
        req_body = stream
    return Request(method.upper(), path, query, h, req_body, ctx)


class RecordingNext:
    """A fake ``next``: records the requests that reached it and answers ``status`` / ``headers``
    / ``body`` (or whatever ``handler(request)`` returns)."""

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None,
                 body: bytes | list[bytes] = b"ok",
                 handler: Callable[[Request], Awaitable[Response]] | None = None):
        self.status = status
        self.headers = headers or {}
        self.body = body
        self.handler = handler
        self.requests: list[Request] = []

    @property
    def called(self) -> bool:
        return bool(self.requests)

    @property
    def last(self) -> Request:
        return self.requests[-1]

    async def __call__(self, req: Request) -> Response:
        self.requests.append(req)
        if self.handler is not None:
            return await self.handler(req)
        body: Any = self.body
        if isinstance(body, list):
            stream = BodyStream()
            for chunk in body:
                stream.feed(chunk)
            stream.feed_eof()
            body = stream
        return Response(self.status, MultiDict(self.headers), body)
