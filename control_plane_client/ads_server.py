"""A small state-of-the-world xDS management server (ADS and per-type gRPC streams).

For tests and local experiments, built on the same package as the client (envoy-data-plane +
grpclib), and checked against a real Envoy in the tests. Resources are Envoy-JSON dicts with
their ``@type``; ``set()`` replaces one type's resources and pushes them to every subscriber::

    server = AdsServer()
    await server.start("127.0.0.1", 18000)
    server.set(CLUSTER, [{"@type": CLUSTER, "name": "svc", ...}])

Every request is recorded (``server.requests``), so a test can see ACKs (version + nonce) and
NACKs (``error_detail``) from each node. After a NACK the server does not resend the rejected
version (as go-control-plane); it sends again when the resources change or the names asked for
change.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from control_plane_client.resources import ADS_METHOD, ADS_TYPES, GRPC_METHOD, NAMED, resource_name
from control_plane_client.sources.ads import api, dict_to_any

log = logging.getLogger("sidecar.xds.server")


@dataclass
class Seen:
    """One DiscoveryRequest as the server received it."""
    node_id: str
    type_url: str
    version_info: str
    response_nonce: str
    resource_names: tuple[str, ...]
    error: str | None
    at: float = field(default_factory=time.time)
    acked_version: str | None = None     # the version of the response this nonce answered

    @property
    def is_nack(self) -> bool:
        return self.error is not None

    @property
    def is_ack(self) -> bool:
        return self.error is None and bool(self.response_nonce)


class _Stream:
    def __init__(self, server: "AdsServer", stream, types: tuple[str, ...]):
        self.server = server
        self.stream = stream
        self.types = types
        self.node_id = ""
        self.names: dict[str, frozenset | None] = {}
        self.sent_version: dict[str, str] = {}
        self.sent_names: dict[str, frozenset | None] = {}
        self.nonce_version: dict[str, str] = {}
        self.queue: asyncio.Queue = asyncio.Queue()

    def maybe_send(self, type_url: str, force: bool = False) -> None:
        if type_url not in self.names:
            return
        names = self.names[type_url]
        version = self.server.version(type_url, self.node_id)
        if not force and self.sent_version.get(type_url) == version and \
                self.sent_names.get(type_url) == names:
            return
        A = api()
        items = self.server.current(type_url, self.node_id)
        if type_url in NAMED and names is not None:
            items = {n: r for n, r in items.items() if n in names}
        nonce = str(next(self.server._nonces))
        resp = A.DiscoveryResponse(version_info=version, type_url=type_url, nonce=nonce,
                                   resources=[dict_to_any(r) for r in items.values()])
        self.sent_version[type_url] = version
        self.sent_names[type_url] = names
        self.nonce_version[nonce] = version
        self.queue.put_nowait(resp)

    async def writer(self) -> None:
        while True:
            resp = await self.queue.get()
            await self.stream.send_message(resp)

    async def handle(self) -> None:
        w = asyncio.get_running_loop().create_task(self.writer())
        try:
            async for req in self.stream:
                if req.node is not None and req.node.id:
                    self.node_id = req.node.id
                t = req.type_url
                if t not in self.types:
                    continue
                err = req.error_detail.message if req.error_detail is not None and \
                    (req.error_detail.code or req.error_detail.message) else None
                seen = Seen(self.node_id, t, req.version_info, req.response_nonce,
                            tuple(req.resource_names), err,
                            acked_version=self.nonce_version.get(req.response_nonce))
                self.server.requests.append(seen)
                self.server._changed.set()
                names: frozenset[str] | None = frozenset(req.resource_names) \
                    if req.resource_names or t not in NAMED else frozenset()
                if t not in NAMED and not req.resource_names:
                    names = None            # wildcard
                self.names[t] = names
                first = t not in self.sent_version
                # a (re)connecting client tells its version: resend only if it is not current
                if first and req.version_info and req.version_info == self.server.version(t, self.node_id) \
                        and not req.response_nonce:
                    self.sent_version[t] = req.version_info
                    self.sent_names[t] = names
                    if t in NAMED and names:
                        # names matter: send them anyway (the client may have lost them)
                        self.maybe_send(t, force=True)
                    continue
                self.maybe_send(t)
        finally:
            w.cancel()
            self.server._streams.discard(self)


class AdsServer:
    def __init__(self) -> None:
        # (node id or None for every node, type url) -> {name: resource}
        self.resources: dict[tuple, dict[str, dict]] = {}
        self._versions: dict[tuple, int] = {}
        self.requests: list[Seen] = []
        self._streams: set[_Stream] = set()
        self._nonces = itertools.count(1)
        self._server: Any = None      # grpclib's Server (optional dependency, imported in start)
        self._protocols: list[Any] = []
        self.port = 0
        self._changed = asyncio.Event()
        self.port = 0

    # ---- resources --------------------------------------------------------------------------
    def _key(self, type_url: str, node_id: str | None) -> tuple:
        return (node_id, type_url) if (node_id, type_url) in self.resources else (None, type_url)

    def version(self, type_url: str, node_id: str | None = None) -> str:
        return f"v{self._versions.get(self._key(type_url, node_id), 0)}"

    def current(self, type_url: str, node_id: str | None = None) -> dict[str, dict]:
        return self.resources.get(self._key(type_url, node_id), {})

    def set(self, type_url: str, resources: list[dict], node_id: str | None = None) -> str:
        """Replace every resource of one type (state of the world), for every node or for one
        node (``node_id``: that node's own set), and push them to the subscribers."""
        for r in resources:
            dict_to_any(r)           # fail here, in the test, on a resource that cannot encode
        key = (node_id, type_url)
        self.resources[key] = {resource_name(type_url, r): r for r in resources}
        self._versions[key] = self._versions.get(key, 0) + 1
        for s in list(self._streams):
            if node_id is None or s.node_id == node_id:
                s.maybe_send(type_url)
        return self.version(type_url, node_id)

    # ---- gRPC ------------------------------------------------------------------------------
    def __mapping__(self):
        # lazy: grpclib comes with the optional ``ads`` extra
        from grpclib.const import Cardinality, Handler
        A = api()
        out = {ADS_METHOD: Handler(self._ads, Cardinality.STREAM_STREAM, A.DiscoveryRequest,
                                   A.DiscoveryResponse)}
        for t, m in GRPC_METHOD.items():
            out[m] = Handler(self._per_type(t), Cardinality.STREAM_STREAM, A.DiscoveryRequest,
                             A.DiscoveryResponse)
        return out

    async def _ads(self, stream) -> None:
        s = _Stream(self, stream, ADS_TYPES)
        self._streams.add(s)
        await s.handle()

    def _per_type(self, type_url: str):
        async def handler(stream) -> None:
            s = _Stream(self, stream, (type_url,))
            self._streams.add(s)
            await s.handle()
        return handler

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> "AdsServer":
        # lazy: grpclib comes with the optional ``ads`` extra
        from grpclib.server import Server
        self._server = Server([self])
        self._protocols = []
        make = self._server._protocol_factory

        def factory():
            p = make()
            self._protocols.append(p)
            return p
        self._server._protocol_factory = factory
        await self._server.start(host, port)
        self.port = self._server._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop like a killed process: listening socket and every connection closed at once."""
        if self._server is not None:
            self._server.close()
            for p in self._protocols:
                conn = getattr(p, "connection", None)
                tr = getattr(conn, "_transport", None)
                if tr is not None:
                    tr.abort()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except TimeoutError:
                pass
            self._server = None

    # ---- what the clients said -------------------------------------------------------------
    def seen(self, *, node_id: str | None = None, type_url: str | None = None) -> list[Seen]:
        return [s for s in self.requests if (node_id is None or s.node_id == node_id)
                and (type_url is None or s.type_url == type_url)]

    def acked(self, node_id: str, type_url: str) -> str | None:
        """The last version this node ACKed for the type."""
        for s in reversed(self.seen(node_id=node_id, type_url=type_url)):
            if s.is_ack:
                return s.acked_version
        return None

    def nacks(self, node_id: str | None = None, type_url: str | None = None) -> list[Seen]:
        return [s for s in self.seen(node_id=node_id, type_url=type_url) if s.is_nack]

    async def wait(self, predicate, timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` is true (checked as requests arrive)."""
        end = asyncio.get_running_loop().time() + timeout
        while not predicate():
            left = end - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError("condition not met in time")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.2))
            except TimeoutError:
                pass
