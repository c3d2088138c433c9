"""The TCP proxy (tcp_proxy) through real sockets: bytes both ways, half-close, backpressure
under a slow reader, timeouts, connect attempts, breakers, balancing, outlier detection and
health checks on TCP clusters, mTLS on both sides, access logs and metrics."""

from __future__ import annotations

import asyncio
import os
import ssl

import aiohttp
import pytest
import uvloop

from sidecar.cli.certs import DevCA
from sidecar.observability.access_log import flush_all
from sidecar.testing import TcpServer, running_proxy

TD = "l4.test"


# every test runs on both event loops: asyncio's (the tests' default) and uvloop (what
# `sidecar run` uses); they differ in how transports start reading and in TLS transports
@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request):
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


def cfg(listeners: list[dict], clusters: list[dict]) -> dict:
    for lst in listeners:
        lst.setdefault("address", "127.0.0.1")
        lst.setdefault("port", 0)
    return {"admin": {"address": "127.0.0.1", "port": 0}, "listeners": listeners,
            "clusters": clusters}


def tcp_listener(cluster: str = "up", name: str = "tcp", **proxy) -> dict:
    return {"name": name, "tcp_proxy": {"cluster": cluster, **proxy}}


async def exchange(port: int, payload: bytes, *, ssl_ctx=None, server_hostname=None,
                   local_addr=None, expect: int | None = None) -> bytes:
    """Send ``payload``, half-close, read until the proxy closes. Over TLS (no half-close in
    asyncio) read ``expect`` bytes instead."""
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx,
                                         server_hostname=server_hostname, local_addr=local_addr)
    w.write(payload)
    await w.drain()
    if expect is not None:
        data = await asyncio.wait_for(r.readexactly(expect), 10)
        w.close()
        return data
    if w.can_write_eof():
        w.write_eof()
    try:
        data = await asyncio.wait_for(r.read(), 10)
    except ConnectionResetError:
        data = b""           # closed by the proxy with our bytes unread: the kernel resets
    w.close()
    return data


async def closed_without_data(port: int, **kw) -> bool:
    r, w = await asyncio.open_connection("127.0.0.1", port, **kw)
    try:
        data = await asyncio.wait_for(r.read(), 10)
    except (ConnectionError, ssl.SSLError):
        data = b""
    w.close()
    return data == b""


def read_log(path) -> list[str]:
    flush_all()
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line for line in f.read().splitlines() if line]


async def metrics(proxy) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.admin_url + "/stats/prometheus") as r:
            return await r.text()


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---- bytes, half-close ---------------------------------------------------------------------

async def test_bytes_both_ways_and_client_half_close(tmp_path):
    log = tmp_path / "tcp.log"
    async with TcpServer(farewell=b"-bye") as up:
        lst = tcp_listener(access_log={
            "path": str(log), "format": "%UPSTREAM_CLUSTER% %UPSTREAM_HOST% %BYTES_RECEIVED% "
                                        "%BYTES_SENT% %RESPONSE_FLAGS%"})
        async with running_proxy(cfg([lst], [{"name": "up", "endpoints": [up.address]}])) as p:
            payload = os.urandom(1 << 20)
            got = await exchange(p.port(), payload)
            assert got == payload + b"-bye"
            assert bytes(up.received) == payload
            for _ in range(100):
                if read_log(log):
                    break
                await asyncio.sleep(0.05)
            assert read_log(log) == [f"up {up.address} {len(payload)} {len(payload) + 4} -"]


async def test_upstream_half_close_keeps_the_other_direction_open():
    received = bytearray()
    done = asyncio.Event()

    async def serve(r, w):
        w.write(b"hello")
        w.write_eof()                      # the server is done talking, still listening
        received.extend(await r.read())
        done.set()
        w.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    async with running_proxy(cfg([tcp_listener()],
                                 [{"name": "up", "endpoints": [f"127.0.0.1:{port}"]}])) as p:
        r, w = await asyncio.open_connection("127.0.0.1", p.port())
        assert await asyncio.wait_for(r.read(), 10) == b"hello"     # EOF passed on
        w.write(b"still talking")
        await w.drain()
        w.write_eof()
        await asyncio.wait_for(done.wait(), 10)
        assert bytes(received) == b"still talking"
        w.close()
    srv.close()


# ---- backpressure --------------------------------------------------------------------------

async def test_slow_reader_bounds_buffering_and_loses_nothing():
    total = 48 << 20
    limit = 64 * 1024
    async with TcpServer(source=total) as up:
        lst = {**tcp_listener(), "buffer_limit": limit}
        async with running_proxy(cfg([lst], [{"name": "up", "endpoints": [up.address]}])) as p:
            r, w = await asyncio.open_connection("127.0.0.1", p.port(), limit=1 << 16)
            # the client reads nothing: wait until the upstream cannot write any more
            stable = 0
            last = -1
            while stable < 5:
                await asyncio.sleep(0.1)
                stable = stable + 1 if up.sent == last else 0
                last = up.sent
            assert up.sent < total                 # backpressure reached the upstream
            lr = p.app.store.listeners["tcp"]
            (session,) = lr.sessions
            # what the proxy holds for this connection: its two write buffers
            held = session.down.get_write_buffer_size() + session.up.get_write_buffer_size()
            assert held <= limit + 512 * 1024, held
            text = await metrics(p)
            assert metric(text, "sidecar_tcp_downstream_flow_control_paused_reading_total") == 0
            # (the upstream side paused: the proxy stopped reading it, so nothing piles up)
            got = 0
            while True:
                chunk = await asyncio.wait_for(r.read(1 << 20), 10)
                if not chunk:
                    break
                got += len(chunk)
            assert got == total
            w.close()


async def test_slow_upstream_pauses_reading_the_client():
    """The other direction: a client sending faster than the upstream reads."""
    gate = asyncio.Event()
    received = 0

    async def serve(r, w):
        nonlocal received
        await gate.wait()                  # reads nothing until released
        while data := await r.read(1 << 20):
            received += len(data)
        w.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, limit=1 << 16)
    port = srv.sockets[0].getsockname()[1]
    lst = {**tcp_listener(), "buffer_limit": 64 * 1024}
    async with running_proxy(cfg([lst], [{"name": "up", "endpoints": [f"127.0.0.1:{port}"]}])) as p:
        r, w = await asyncio.open_connection("127.0.0.1", p.port())
        chunk = b"y" * (1 << 20)
        sent = 0

        async def pump():
            nonlocal sent
            for _ in range(64):
                w.write(chunk)
                await w.drain()
                sent += len(chunk)
            w.write_eof()

        task = asyncio.ensure_future(pump())
        stable, last = 0, -1
        while stable < 5:
            await asyncio.sleep(0.1)
            stable = stable + 1 if sent == last else 0
            last = sent
        assert sent < 64 << 20                 # the client is held back by the proxy
        text = await metrics(p)
        assert metric(text, "sidecar_tcp_downstream_flow_control_paused_reading_total",
                      stat_prefix="tcp") >= 1
        gate.set()
        await asyncio.wait_for(task, 20)
        for _ in range(200):
            if received == 64 << 20:
                break
            await asyncio.sleep(0.05)
        assert received == 64 << 20
        w.close()
    srv.close()


# ---- timeouts, connect attempts, breakers --------------------------------------------------

async def test_idle_timeout_closes_the_connection():
    async with TcpServer() as up:
        lst = tcp_listener(idle_timeout="1s")
        async with running_proxy(cfg([lst], [{"name": "up", "endpoints": [up.address]}])) as p:
            r, w = await asyncio.open_connection("127.0.0.1", p.port())
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"
            assert await asyncio.wait_for(r.read(), 10) == b""     # closed by the proxy
            assert metric(await metrics(p), "sidecar_tcp_idle_timeout_total") == 1
            w.close()


async def test_connect_failure_closes_and_logs_uf(tmp_path):
    log = tmp_path / "tcp.log"
    async with TcpServer() as dead:
        dead_addr = dead.address
    lst = tcp_listener(access_log={"path": str(log), "format": "%RESPONSE_FLAGS% %UPSTREAM_HOST%"})
    async with running_proxy(cfg([lst], [{"name": "up", "endpoints": [dead_addr]}])) as p:
        assert await closed_without_data(p.port())
        for _ in range(100):
            if read_log(log):
                break
            await asyncio.sleep(0.05)
        assert read_log(log) == [f"UF,URX {dead_addr}"]     # as Envoy: attempts used up
        text = await metrics(p)
        assert metric(text, "sidecar_upstream_cx_connect_fail_total", cluster="up") == 1


async def test_max_connect_attempts_tries_another_host():
    async with TcpServer() as dead:
        dead_addr = dead.address
    async with TcpServer() as live:
        lst = tcp_listener(max_connect_attempts=2)
        clusters = [{"name": "up", "endpoints": [dead_addr, live.address]}]
        async with running_proxy(cfg([lst], clusters)) as p:
            for i in range(4):
                assert await exchange(p.port(), b"n%d" % i) == b"n%d" % i


async def test_max_connections_breaker_overflows(tmp_path):
    log = tmp_path / "tcp.log"
    async with TcpServer() as up:
        lst = tcp_listener(access_log={"path": str(log), "format": "%RESPONSE_FLAGS%"})
        clusters = [{"name": "up", "endpoints": [up.address],
                     "circuit_breakers": {"max_connections": 1}}]
        async with running_proxy(cfg([lst], clusters)) as p:
            r, w = await asyncio.open_connection("127.0.0.1", p.port())
            w.write(b"a")
            assert await r.readexactly(1) == b"a"
            assert await closed_without_data(p.port())          # over max_connections
            w.close()
            await asyncio.wait_for(r.read(), 10)
            for _ in range(100):
                if len(read_log(log)) == 2:
                    break
                await asyncio.sleep(0.05)
            assert sorted(read_log(log)) == ["-", "UO"]
            text = await metrics(p)
            assert metric(text, "sidecar_upstream_cx_overflow_total", cluster="up") == 1


# ---- balancing, outlier detection, health checks -------------------------------------------

async def test_weighted_clusters_spread_connections():
    async with TcpServer(farewell=b"A") as a, TcpServer(farewell=b"B") as b:
        lst = {"name": "tcp", "tcp_proxy": {"weighted_clusters": [{"name": "a", "weight": 1},
                                                                  {"name": "b", "weight": 3}]}}
        clusters = [{"name": "a", "endpoints": [a.address]}, {"name": "b", "endpoints": [b.address]}]
        async with running_proxy(cfg([lst], clusters)) as p:
            got = [await exchange(p.port(), b"") for _ in range(60)]
    assert got.count(b"A") >= 1 and got.count(b"B") > got.count(b"A")


async def test_source_ip_hash_keeps_a_client_on_one_host():
    servers = [TcpServer(farewell=bytes([65 + i])) for i in range(3)]
    for s in servers:
        await s.__aenter__()
    try:
        lst = tcp_listener(hash="source_ip")
        clusters = [{"name": "up", "lb": "ring_hash", "endpoints": [s.address for s in servers]}]
        async with running_proxy(cfg([lst], clusters)) as p:
            for src in ("127.0.0.2", "127.0.0.3"):
                got = {await exchange(p.port(), b"", local_addr=(src, 0)) for _ in range(10)}
                assert len(got) == 1, got
    finally:
        for s in servers:
            await s.__aexit__(None, None, None)


async def test_outlier_detection_ejects_a_host_that_refuses_connections():
    async with TcpServer() as dead:
        dead_addr = dead.address
    async with TcpServer() as live:
        clusters = [{"name": "up", "endpoints": [dead_addr, live.address],
                     "outlier_detection": {"consecutive_5xx": 2, "base_ejection_time": "30s",
                                           "max_ejection_percent": 50}}]
        async with running_proxy(cfg([tcp_listener()], clusters)) as p:
            results = [await exchange(p.port(), b"x") for _ in range(8)]
            assert results.count(b"") == 2        # two refusals, then the host is out
            assert results[-4:] == [b"x"] * 4
            host = p.app.clusters.get("up").state.endpoints[dead_addr]
            assert host.ejected


async def test_tcp_health_check_takes_a_dead_host_out():
    async with TcpServer() as dead:
        dead_addr = dead.address
    async with TcpServer() as live:
        clusters = [{"name": "up", "endpoints": [dead_addr, live.address],
                     "health_check": {"tcp": {}, "interval": "0.2s", "timeout": "0.5s",
                                      "unhealthy_threshold": 1}}]
        async with running_proxy(cfg([tcp_listener()], clusters)) as p:
            host = p.app.clusters.get("up").state.endpoints[dead_addr]
            for _ in range(100):
                if not host.hc_healthy:
                    break
                await asyncio.sleep(0.05)
            assert not host.hc_healthy
            assert [await exchange(p.port(), b"z") for _ in range(6)] == [b"z"] * 6


async def test_tcp_health_check_send_and_receive():
    async with TcpServer() as echo:
        clusters = [{"name": "up", "endpoints": [echo.address],
                     "health_check": {"tcp": {"send": "50494e47", "receive": ["50", "4e47"]},
                                      "interval": "0.2s", "timeout": "1s"}}]
        async with running_proxy(cfg([tcp_listener()], clusters)) as p:
            for _ in range(100):
                if b"PING" in echo.received:
                    break
                await asyncio.sleep(0.05)
            assert b"PING" in echo.received
            host = p.app.clusters.get("up").state.endpoints[echo.address]
            for _ in range(100):       # the echo may have the bytes before the check has its answer
                if host.last_hc:
                    break
                await asyncio.sleep(0.05)
            assert host.hc_healthy and host.last_hc.startswith("success")


# ---- TLS and mTLS on either side -----------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = DevCA.create(TD)
    ca.write(str(d))
    for sa in ("client", "proxy", "backend"):
        ca.issue("shop", sa, ips=["127.0.0.1"], dns=["localhost", "backend.test"]).write(str(d), sa)
    return {"ca": str(d / "ca.pem"),
            **{sa: (str(d / f"{sa}.pem"), str(d / f"{sa}-key.pem"))
               for sa in ("client", "proxy", "backend")}}


def client_ctx(pki, who: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.check_hostname = False
    if who:
        ctx.load_cert_chain(*pki[who])
    return ctx


def server_ctx(pki, who: str, client_ca: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*pki[who])
    if client_ca:
        ctx.load_verify_locations(pki["ca"])
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def test_mtls_downstream_and_upstream(pki, tmp_path):
    log = tmp_path / "tcp.log"
    async with TcpServer(greeting=b"!", ssl=server_ctx(pki, "backend", client_ca=True)) as up:
        cert, key = pki["proxy"]
        lst = {**tcp_listener(access_log={"path": str(log),
                                          "format": "%DOWNSTREAM_PEER_URI_SAN% %DOWNSTREAM_TLS_VERSION%"}),
               "tls": {"cert": cert, "key": key, "ca": pki["ca"]}}
        clusters = [{"name": "up", "endpoints": [up.address],
                     "tls": {"ca": pki["ca"], "cert": cert, "key": key,
                             "san": [f"spiffe://{TD}/ns/shop/sa/backend"]}}]
        async with running_proxy(cfg([lst], clusters)) as p:
            got = await exchange(p.port(), b"secret", ssl_ctx=client_ctx(pki, "client"), expect=7)
            assert got == b"!secret"
            # no client certificate: the handshake fails, nothing reaches the backend
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await exchange(p.port(), b"nope", ssl_ctx=client_ctx(pki), expect=5)
            for _ in range(100):
                if read_log(log):
                    break
                await asyncio.sleep(0.05)
            lines = read_log(log)
            assert lines[0].startswith(f"spiffe://{TD}/ns/shop/sa/client TLSv1.")
            assert b"nope" not in up.received


# ---- filter chains -------------------------------------------------------------------------

async def test_chains_by_sni_terminate_passthrough_and_plain(pki, tmp_path):
    log = tmp_path / "listener.log"
    cert, key = pki["proxy"]
    async with TcpServer(greeting=b"[A]") as a, \
            TcpServer(greeting=b"[B]", ssl=server_ctx(pki, "backend")) as b, \
            TcpServer(greeting=b"[C]") as c:
        lst = {"name": "edge", "listener_filters": ["tls_inspector"],
               "connection_log": {"path": str(log),
                                  "format": "%FILTER_CHAIN_NAME% %REQUESTED_SERVER_NAME% "
                                            "%RESPONSE_FLAGS%"},
               "filter_chains": [
                   {"name": "terminate", "match": {"server_names": ["a.test"]},
                    "tls": {"cert": cert, "key": key}, "tcp_proxy": {"cluster": "a"}},
                   {"name": "passthrough", "match": {"server_names": ["*.pass.test"]},
                    "tcp_proxy": {"cluster": "b"}},
                   {"name": "plain", "match": {"transport_protocol": "raw_buffer"},
                    "tcp_proxy": {"cluster": "c"}}]}
        clusters = [{"name": n, "endpoints": [s.address]} for n, s in (("a", a), ("b", b), ("c", c))]
        async with running_proxy(cfg([lst], clusters)) as p:
            port = p.port()
            assert await exchange(port, b"1", ssl_ctx=client_ctx(pki), server_hostname="a.test",
                                  expect=4) == b"[A]1"
            # passthrough: the TLS session is with the backend itself (its certificate)
            assert await exchange(port, b"2", ssl_ctx=client_ctx(pki),
                                  server_hostname="x.pass.test", expect=4) == b"[B]2"
            assert await exchange(port, b"three") == b"[C]three"     # (a TLS record header
            # is 5 bytes: the inspector decides once it has that many)
            # TLS with an SNI no chain names: no chain (tls is not raw_buffer)
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await exchange(port, b"4", ssl_ctx=client_ctx(pki), server_hostname="other.test",
                               expect=4)
            for _ in range(100):
                if len(read_log(log)) == 4:
                    break
                await asyncio.sleep(0.05)
            assert sorted(read_log(log)) == ["- other.test NR", "passthrough x.pass.test -",
                                             "plain - -", "terminate a.test -"]
            text = await metrics(p)
            assert metric(text, "sidecar_listener_no_filter_chain_match_total", listener="edge") == 1
            assert metric(text, "sidecar_listener_filter_total", listener="edge",
                          filter="tls_inspector", outcome="sni_found") == 3


async def test_http_and_tcp_on_one_port_and_by_source():
    async with TcpServer(farewell=b"[tcp]") as t, TcpServer(farewell=b"[src]") as s2:
        lst = {"name": "mixed", "listener_filters": ["http_inspector"],
               "filter_chains": [
                   {"name": "http", "match": {"application_protocols": ["http/1.1", "http/1.0"]},
                    "routes": [{"match": {"prefix": "/"},
                                "direct_response": {"status": 200, "body": "from http"}}]},
                   {"name": "from-2", "match": {"source_prefixes": ["127.0.0.2/32"]},
                    "tcp_proxy": {"cluster": "s2"}},
                   {"name": "tcp", "tcp_proxy": {"cluster": "t"}}]}
        clusters = [{"name": "t", "endpoints": [t.address]}, {"name": "s2", "endpoints": [s2.address]}]
        async with running_proxy(cfg([lst], clusters)) as p:
            async with aiohttp.ClientSession() as s:
                async with s.get(p.url("/")) as r:
                    assert (r.status, await r.text()) == (200, "from http")
            # (not a request line: the first byte is no HTTP method character)
            assert await exchange(p.port(), b"\x00raw") == b"\x00raw[tcp]"
            assert await exchange(p.port(), b"\x00raw",
                                  local_addr=("127.0.0.2", 0)) == b"\x00raw[src]"
            # an HTTP request from 127.0.0.2 still goes to the HTTP chain: ALPN is matched
            # before the source address (Envoy's order)
            r, w = await asyncio.open_connection("127.0.0.1", p.port(),
                                                 local_addr=("127.0.0.2", 0))
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert b"from http" in await asyncio.wait_for(r.read(), 10)
            w.close()


async def test_reload_swaps_chains_and_keeps_open_connections():
    async with TcpServer(farewell=b"[old]") as old, TcpServer(farewell=b"[new]") as new:
        def conf(cluster: str) -> dict:
            return cfg([{"name": "tcp", "listener_filters": ["http_inspector"],
                         "filter_chains": [{"name": "t", "tcp_proxy": {"cluster": cluster}}]}],
                       [{"name": "old", "endpoints": [old.address]},
                        {"name": "new", "endpoints": [new.address]}])
        async with running_proxy(conf("old")) as p:
            port = p.port()
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"\x001")
            assert await r.readexactly(2) == b"\x001"
            await p.apply(conf("new"))
            assert p.port() == port                       # the socket stayed
            assert await exchange(port, b"\x002") == b"\x002[new]"
            w.write(b"3")                                 # the open connection is untouched
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 10) == b"3[old]"
            w.close()


async def test_clusters_and_metrics_show_tcp_connections():
    async with TcpServer() as up:
        async with running_proxy(cfg([tcp_listener()], [{"name": "up", "endpoints": [up.address]}])) as p:
            r, w = await asyncio.open_connection("127.0.0.1", p.port())
            w.write(b"12345")
            assert await r.readexactly(5) == b"12345"
            async with aiohttp.ClientSession() as s:
                async with s.get(p.admin_url + "/clusters") as resp:
                    text = await resp.text()
            assert f"up::{up.address}::cx_active::1" in text
            text = await metrics(p)
            assert metric(text, "sidecar_downstream_cx_active", listener="tcp") == 1
            assert metric(text, "sidecar_upstream_cx_active", cluster="up") == 1
            w.close()
            await asyncio.wait_for(r.read(), 10)
            for _ in range(100):
                text = await metrics(p)
                if metric(text, "sidecar_upstream_cx_rx_bytes_total", cluster="up") == 5:
                    break
                await asyncio.sleep(0.05)
            assert metric(text, "sidecar_upstream_cx_rx_bytes_total", cluster="up") == 5
            assert metric(text, "sidecar_upstream_cx_tx_bytes_total", cluster="up") == 5
            assert metric(text, "sidecar_tcp_downstream_cx_rx_bytes_total", stat_prefix="tcp") == 5
            assert metric(text, "sidecar_tcp_downstream_cx_total", stat_prefix="tcp") == 1
            assert metric(text, "sidecar_upstream_cx_total", cluster="up") == 1



# ---- listener filters: timeout, continue, ClientHello limit ---------------------------------

async def test_listener_filters_timeout_closes_or_continues():
    async with TcpServer(greeting=b"[G]") as up:
        def lst(name: str, cont: bool) -> dict:
            return {"name": name, "listener_filters": ["tls_inspector"],
                    "listener_filters_timeout": "0.5s",
                    "continue_on_listener_filters_timeout": cont,
                    "filter_chains": [{"match": {"server_names": ["x.test"]},
                                       "tcp_proxy": {"cluster": "up"}}],
                    "default_filter_chain": {"tcp_proxy": {"cluster": "up"}}}
        conf = cfg([lst("strict", False), lst("lenient", True)],
                   [{"name": "up", "endpoints": [up.address]}])
        async with running_proxy(conf) as p:
            # a client that says nothing (a server-first protocol): the inspector gives up
            r, w = await asyncio.open_connection("127.0.0.1", p.port("strict"))
            assert await asyncio.wait_for(r.read(), 10) == b""       # closed, never proxied
            w.close()
            r, w = await asyncio.open_connection("127.0.0.1", p.port("lenient"))
            assert await asyncio.wait_for(r.readexactly(3), 10) == b"[G]"   # default chain
            w.close()
            text = await metrics(p)
            assert metric(text, "sidecar_listener_filters_timeout_total", listener="strict") == 1
            assert metric(text, "sidecar_listener_filters_timeout_total", listener="lenient") == 1
            assert up.connections == 1


async def test_tls_inspector_max_client_hello_size(pki):
    """Envoy config: ``max_client_hello_size`` (a real ClientHello is ~500 bytes)."""
    from control_plane_client.translate.bootstrap import bootstrap

    async with TcpServer(greeting=b"[G]") as up:
        def listener(name: str, limit: int) -> dict:
            tls = {"name": "t", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector."
                         "v3.TlsInspector", "max_client_hello_size": limit}}
            return {"name": name,
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "listener_filters": [tls],
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.tcp_proxy", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                     "tcp_proxy.v3.TcpProxy", "stat_prefix": name,
                            "cluster": "up"}}]}]}
        snap = bootstrap({"admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                   "port_value": 0}}},
                          "static_resources": {"listeners": [listener("small", 100),
                                                             listener("big", 16384)],
                                               "clusters": [{"name": "up", "load_assignment": {
                                                   "cluster_name": "up", "endpoints": [{
                                                       "lb_endpoints": [{"endpoint": {"address": {
                                                           "socket_address": {
                                                               "address": "127.0.0.1",
                                                               "port_value": up.port}}}}]}]}}]}})
        async with running_proxy(snap) as p:
            # over the limit: closed without reaching the upstream (Envoy's client_hello_too_large)
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await exchange(p.port("small"), b"x", ssl_ctx=client_ctx(pki),
                               server_hostname="a.test", expect=3)
            assert up.connections == 0
            # within it: inspected and passed through (the TLS is the client's with the greeter,
            # which speaks plain TCP: the handshake fails there, after the proxy connected)
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await exchange(p.port("big"), b"x", ssl_ctx=client_ctx(pki),
                               server_hostname="a.test", expect=3)
            assert up.connections == 1
            text = await metrics(p)
            assert metric(text, "sidecar_listener_filter_total", listener="small",
                          outcome="client_hello_too_large") == 1


async def test_max_connection_duration_closes_with_dt(tmp_path):
    log = tmp_path / "tcp.log"
    async with TcpServer() as up:
        lst = tcp_listener(max_connection_duration="1s",
                           access_log={"path": str(log), "format": "%RESPONSE_FLAGS%"})
        async with running_proxy(cfg([lst], [{"name": "up", "endpoints": [up.address]}])) as p:
            r, w = await asyncio.open_connection("127.0.0.1", p.port())
            for i in range(3):                      # busy, so not an idle timeout
                w.write(b"%d" % i)
                assert await r.readexactly(1) == b"%d" % i
            assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()
            for _ in range(100):
                if read_log(log):
                    break
                await asyncio.sleep(0.05)
            assert read_log(log) == ["DT"]
            assert metric(await metrics(p),
                          "sidecar_tcp_max_downstream_connection_duration_total") == 1


async def test_original_dst_cluster_port_override_and_cleanup():
    """Without a redirect the original destination is the connection's local address (the
    listener itself); the port override sends it to the echo server instead. The host is
    made on first use and dropped ``cleanup_interval`` after its last connection."""
    async with TcpServer(farewell=b"!") as up:
        clusters = [{"name": "pass", "type": "original_dst", "port_override": up.port,
                     "cleanup_interval": "0.5s"}]
        async with running_proxy(cfg([tcp_listener("pass")], clusters)) as p:
            assert await exchange(p.port(), b"via original dst") == b"via original dst!"
            state = p.app.clusters.get("pass").state
            assert list(state.endpoints) == [up.address]
            for _ in range(100):
                if not state.endpoints:
                    break
                await asyncio.sleep(0.1)
            assert not state.endpoints          # swept once unused for cleanup_interval
            assert await exchange(p.port(), b"again") == b"again!"
