"""Shared helpers for the resilience tests (timeouts, retries, breakers, outlier detection,
health checks): Envoy-format configs, flaky raw servers on loopback, metric reading."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time

import aiohttp

from sidecar.testing import running_proxy

T_HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
         "HttpConnectionManager")
T_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def _sa(addr: str) -> dict:
    host, _, port = addr.rpartition(":")
    return {"socket_address": {"address": host, "port_value": int(port)}}


def envoy_config(*, clusters: dict[str, dict], routes: list[dict], hcm: dict | None = None) -> dict:
    """An Envoy v3 bootstrap with one listener on an ephemeral port.

    ``clusters``: name -> {"endpoints": ["127.0.0.1:port", ...], <more Envoy cluster fields>}.
    ``routes``: Envoy route dicts (``{"match": ..., "route": {...}}``)."""
    cl = []
    for name, spec in clusters.items():
        spec = dict(spec)
        eps = spec.pop("endpoints")
        cl.append({"name": name, "type": "STATIC", "connect_timeout": spec.pop("connect_timeout", "1s"),
                   "load_assignment": {"cluster_name": name, "endpoints": [
                       {"lb_endpoints": [{"endpoint": {"address": _sa(a)}} for a in eps]}]},
                   **spec})
    tc = {"@type": T_HCM, "stat_prefix": "ingress",
          "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": routes,
                                             "include_request_attempt_count": True}]},
          "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": T_ROUTER}}]}
    tc.update(hcm or {})
    return {
        "admin": {"address": _sa("127.0.0.1:0")},
        "static_resources": {
            "listeners": [{"name": "test", "address": _sa("127.0.0.1:0"), "filter_chains": [
                {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": tc}]}]}],
            "clusters": cl,
        },
    }


@contextlib.asynccontextmanager
async def proxy(cfg):
    """running_proxy (the App wires outlier detection and active health checking itself)."""
    async with running_proxy(cfg) as p:
        yield p


# ---- reading what the proxy exposes ---------------------------------------------------------

async def prometheus(p) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(p.admin_url + "/stats/prometheus") as r:
            return await r.text()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
            found = True
    if not found:
        raise KeyError(f"no sample {name}{labels}")
    return total


async def clusters_json(p) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(p.admin_url + "/clusters?format=json") as r:
            view = await r.json()
    return {c["name"]: c for c in view["clusters"]}


def host_view(view: dict, cluster: str, address: str) -> dict:
    for h in view[cluster]["hosts"]:
        if h["address"] == address:
            return h
    raise KeyError(address)


async def wait_for(cond, timeout: float = 5.0, interval: float = 0.05):
    """Poll ``cond()`` (sync or async) until truthy; returns its value or fails."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def hdr(recorded, name: str, default=None):
    """A header of a ``Recorded`` upstream request (or a dict), case-insensitively (the proxy keeps the
    client's header case on the wire)."""
    name = name.lower()
    headers = recorded if isinstance(recorded, dict) else recorded.headers
    for k, v in headers.items():
        if k.lower() == name:
            return v
    return default


async def hang(request) -> None:
    """In an aiohttp handler: wait until the client (the proxy) gives up and disconnects."""
    while request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(0.05)


# ---- raw flaky servers ----------------------------------------------------------------------

class RawServer:
    """An asyncio TCP server on 127.0.0.1 whose ``behaviour(n)`` decides, per connection
    (n counts from 1), what to do: "reset" (close at once after the request arrives),
    "hang" (never answer), or bytes to send (then keep the connection for more)."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.connections = 0
        self.requests = 0
        self.closed_by_peer = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._writers: list = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, reader, writer):
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed_by_peer += 1
                    return
                m = re.search(rb"content-length:\s*(\d+)", head, re.I)
                if m and int(m.group(1)):
                    await reader.readexactly(int(m.group(1)))
                self.requests += 1
                what = self.behaviour(self.requests)
                if what == "reset":
                    sock = writer.get_extra_info("socket")
                    if sock is not None:   # RST, not FIN
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    writer.transport.abort()
                    return
                if what == "hang":
                    await reader.read()        # until the proxy gives up
                    return
                writer.write(what)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    async def __aenter__(self) -> "RawServer":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for w in self._writers:
            w.transport.abort()


def ok_response(body: bytes = b"ok", status: int = 200) -> bytes:
    return (f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


@contextlib.contextmanager
def blackhole_listener():
    """A port whose accept queue is full, so new connections hang in SYN (a connect timeout)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.socket()
    filler.setblocking(False)
    try:
        filler.connect(srv.getsockname())
    except BlockingIOError:
        pass
    time.sleep(0.05)
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        filler.close()
        srv.close()


def dead_address() -> str:
    """A loopback port nobody listens on (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


async def fetch(session: aiohttp.ClientSession, url: str, method: str = "GET", **kw) -> tuple[int, str, dict, float]:
    t = time.monotonic()
    async with session.request(method, url, **kw) as r:
        body = await r.text()
        return r.status, body, dict(r.headers), time.monotonic() - t
