"""DNS clusters against a real DNS server on loopback (dnslib): ``respect_dns_ttl`` follows the
records' TTL (not the much longer ``dns_refresh_rate``), and ``typed_dns_resolver_config`` /
``dns_resolvers`` name the resolver the cluster asks."""

from __future__ import annotations

import asyncio
import socket

import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer
from resilience_helpers import envoy_config, proxy

from sidecar.testing import native_config

T_CARES = "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig"


class Zone(BaseResolver):
    """svc.test -> ``address`` (A) with a 1 s TTL; nothing for AAAA."""

    def __init__(self, address: str):
        self.address = address
        self.queries = 0

    def resolve(self, request, handler):
        reply = request.reply()
        q = request.q
        if str(q.qname).rstrip(".") == "svc.test":
            self.queries += 1
            if QTYPE[q.qtype] == "A":
                reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(self.address), ttl=1))
        return reply


@pytest.fixture
def dns():
    zone = Zone("127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = DNSServer(zone, port=port, address="127.0.0.1", logger=DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data"))
    server.start_thread()
    yield zone, port
    server.stop()


async def _upstream(host: str, text: bytes):
    async def serve(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(text), text))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()
    return await asyncio.start_server(serve, host, 0)


async def _body(port: int) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET / HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    return data.partition(b"\r\n\r\n")[2]


def _envoy(dns_port: int, app_port: int, respect: bool) -> dict:
    cfg = envoy_config(clusters={"app": {"endpoints": [f"127.0.0.1:{app_port}"]}},
                       routes=[{"match": {"prefix": "/"}, "route": {"cluster": "app"}}])
    c = cfg["static_resources"]["clusters"][0]
    c.update({"type": "STRICT_DNS", "dns_refresh_rate": "60s", "respect_dns_ttl": respect,
              "dns_lookup_family": "V4_ONLY",
              "typed_dns_resolver_config": {"name": "envoy.network.dns_resolver.cares",
                                            "typed_config": {"@type": T_CARES, "resolvers": [
                                                {"socket_address": {"address": "127.0.0.1",
                                                                    "port_value": dns_port}}]}}})
    c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"]["address"] = "svc.test"
    return cfg


async def _first_answer(p, want: bytes) -> bytes:
    """The first resolution happens in the background: wait for it."""
    got = b""
    for _ in range(50):
        got = await _body(p.port())
        if got == want:
            break
        await asyncio.sleep(0.1)
    return got


async def _switch_and_watch(p, zone: Zone, until: float) -> bytes:
    zone.address = "127.0.0.2"           # the name now points at the second upstream
    got = b""
    for _ in range(int(until / 0.1)):
        got = await _body(p.port())
        if got == b"second":
            break
        await asyncio.sleep(0.1)
    return got


async def test_respect_dns_ttl_follows_the_record_ttl(dns):
    zone, dns_port = dns
    first = await _upstream("127.0.0.1", b"first")
    port = first.sockets[0].getsockname()[1]
    second = await _upstream_on("127.0.0.2", port, b"second")   # same port: the name picks
    try:
        async with proxy(_envoy(dns_port, port, respect=True)) as p:
            assert await _first_answer(p, b"first") == b"first"
            assert await _switch_and_watch(p, zone, 4.0) == b"second"   # TTL 1 s, not 60 s
        zone.address = "127.0.0.1"
        async with proxy(_envoy(dns_port, port, respect=False)) as p:
            assert await _first_answer(p, b"first") == b"first"
            # without respect_dns_ttl the 60 s dns_refresh_rate holds the old address
            assert await _switch_and_watch(p, zone, 2.0) == b"first"
    finally:
        first.close()
        second.close()


async def _upstream_on(host: str, port: int, text: bytes):
    async def serve(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(text), text))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()
    return await asyncio.start_server(serve, host, port)


async def test_native_dns_resolvers(dns):
    zone, dns_port = dns
    up = await _upstream("127.0.0.1", b"native")
    port = up.sockets[0].getsockname()[1]
    try:
        cfg = native_config(clusters={"app": {"type": "strict_dns", "endpoints": [f"svc.test:{port}"],
                                              "dns_resolvers": [f"127.0.0.1:{dns_port}"],
                                              "dns_lookup_family": "V4_ONLY"}},
                            routes=[{"match": {"prefix": "/"}, "cluster": "app"}])
        async with proxy(cfg) as p:
            for _ in range(30):
                if await _body(p.port()) == b"native":
                    break
                await asyncio.sleep(0.1)
            assert await _body(p.port()) == b"native"
            assert zone.queries >= 1            # it asked our server, not the system's
    finally:
        up.close()
