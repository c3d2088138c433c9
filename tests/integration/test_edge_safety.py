"""Edge safety over real sockets (issue 14): path normalisation in front of RBAC and routing,
header limits and underscore handling, per-route stream timeouts, and what a stream that ends
early (client gone, timeout, upstream dead) gives back at once: the upstream connection, the
pool's and the circuit breakers' slots.
"""

from __future__ import annotations

import asyncio
import contextlib

from resilience_helpers import envoy_config, metric, prometheus, proxy

from sidecar.testing import native_config

T_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
T_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


class RawUpstream:
    """A raw HTTP/1.1 upstream: records each request line exactly as received (no URL
    normalisation by a framework), answers 200 after ``delay`` (or never, ``delay=None``),
    and counts the connections it has open."""

    def __init__(self, delay: float | None = 0.0):
        self.delay = delay
        self.lines: list[str] = []
        self.open = 0
        self.closed = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.lines.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                if self.delay is None:
                    await reader.read()          # hold the request until the proxy gives up
                    return
                await asyncio.sleep(self.delay)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            self.closed += 1
            writer.close()

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def raw(port: int, data: bytes, read_for: float = 2.0) -> bytes:
    """Send raw bytes, read until the proxy closes or ``read_for`` seconds of silence."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    await w.drain()
    out = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        while True:
            chunk = await asyncio.wait_for(r.read(65536), read_for)
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out and _complete(out):
                break
    w.close()
    return out


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


def status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1]) if resp.startswith(b"HTTP/1.1 ") else 0


def get(path: str, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: edge.test\r\n{extra}\r\n".encode("latin-1")


def rbac_deny_admin() -> dict:
    return {"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": T_RBAC, "rules": {"action": "DENY", "policies": {"no-admin": {
            "permissions": [{"url_path": {"path": {"prefix": "/admin"}}}],
            "principals": [{"any": True}]}}}}}


def edge_config(up: RawUpstream, hcm: dict) -> dict:
    cfg = envoy_config(clusters={"app": {"endpoints": [up.address]}},
                       routes=[{"match": {"prefix": "/"}, "route": {"cluster": "app"}}], hcm=hcm)
    tc = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    tc["http_filters"] = [rbac_deny_admin(), {"name": "envoy.filters.http.router",
                                              "typed_config": {"@type": T_ROUTER}}]
    return cfg


BYPASSES = ("//admin/x", "/./admin/x", "/public/../admin", "/public/%2e%2e/admin", "/%61dmin",
            "/public/..//admin")


async def test_rbac_and_routing_see_the_normalised_path():
    async with RawUpstream() as up:
        async with proxy(edge_config(up, {"normalize_path": True, "merge_slashes": True})) as p:
            for path in BYPASSES:
                resp = await raw(p.port(), get(path))
                assert status(resp) == 403, (path, resp[:80])
            assert up.lines == []                      # none of them reached the upstream
            resp = await raw(p.port(), get("/public/./a//b/../c"))
            assert status(resp) == 200
            assert up.lines == ["GET /public/a/c HTTP/1.1"]     # the upstream gets it normalised


async def test_without_normalisation_the_bypasses_reach_the_upstream():
    """The same RBAC rule, normalisation off (Envoy's default): the test above is meaningful."""
    async with RawUpstream() as up:
        async with proxy(edge_config(up, {})) as p:
            for path in ("//admin/x", "/./admin/x", "/public/../admin"):
                assert status(await raw(p.port(), get(path))) == 200, path
            assert status(await raw(p.port(), get("/admin"))) == 403
            assert up.lines == ["GET //admin/x HTTP/1.1", "GET /./admin/x HTTP/1.1",
                                "GET /public/../admin HTTP/1.1"]


async def test_escaped_slashes_rejected_or_redirected():
    async with RawUpstream() as up:
        async with proxy(edge_config(up, {"path_with_escaped_slashes_action": "REJECT_REQUEST"})) as p:
            assert status(await raw(p.port(), get("/admin%2Fx"))) == 400
        async with proxy(edge_config(up, {"normalize_path": True,
                                          "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT"})) as p:
            resp = await raw(p.port(), get("/a%2Fb?q=1"))
            assert status(resp) == 307 and b"location: /a/b?q=1\r\n" in resp.lower()
        assert up.lines == []


async def test_native_listener_normalises_and_limits():
    async with RawUpstream() as up:
        cfg = native_config(clusters={"app": [up.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "app"}],
                            listener={"normalize_path": True, "merge_slashes": True,
                                      "max_headers_count": 5,
                                      "headers_with_underscores_action": "DROP_HEADER"})
        async with proxy(cfg) as p:
            assert status(await raw(p.port(), get("//a/./b", "X_Drop: 1", "X-Keep: 1"))) == 200
            assert up.lines == ["GET /a/b HTTP/1.1"]
            many = [f"X-H{i}: v" for i in range(5)]
            assert status(await raw(p.port(), get("/", *many))) == 431     # 6 with Host


async def test_underscore_headers_rejected_when_configured():
    async with RawUpstream() as up:
        cho = {"common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"}}
        async with proxy(edge_config(up, cho)) as p:
            resp = await raw(p.port(), get("/", "X_Under: 1"))
            assert status(resp) == 400 and b"connection: close" in resp
            assert status(await raw(p.port(), get("/", "X-Dash: 1"))) == 200
            assert up.lines == ["GET / HTTP/1.1"]


async def test_route_idle_timeout_overrides_the_listener():
    async with RawUpstream(delay=1.5) as up:
        cfg = envoy_config(clusters={"app": {"endpoints": [up.address]}}, routes=[
            {"match": {"prefix": "/short"}, "route": {"cluster": "app", "idle_timeout": "0.3s"}},
            {"match": {"prefix": "/"}, "route": {"cluster": "app"}}])
        async with proxy(cfg) as p:
            resp = await raw(p.port(), get("/short"), read_for=3.0)
            assert status(resp) == 504 and b"stream timeout" in resp
            assert status(await raw(p.port(), get("/long"), read_for=3.0)) == 200


# ---- what a stream that ends early gives back -------------------------------------------------

def _cluster(p):
    return p.app.clusters.get("app")


async def _settle(cond, limit: float = 2.0) -> bool:
    for _ in range(int(limit / 0.02)):
        if cond():
            return True
        await asyncio.sleep(0.02)
    return cond()


async def test_client_gone_while_waiting_releases_upstream_at_once():
    async with RawUpstream(delay=None) as up:
        cfg = envoy_config(clusters={"app": {"endpoints": [up.address], "circuit_breakers": {
            "thresholds": [{"max_requests": 1, "max_connections": 1, "max_pending_requests": 0}]}}},
            routes=[{"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "0s"}}])
        async with proxy(cfg) as p:
            c = _cluster(p)
            for _ in range(3):     # each time the slot comes back: the next request is admitted
                r, w = await asyncio.open_connection("127.0.0.1", p.port())
                w.write(get("/hold"))
                await w.drain()
                assert await _settle(lambda: c.state.breakers.active_requests == 1)
                w.transport.abort()                  # the client is gone (RST)
                assert await _settle(lambda: up.open == 0 and c.state.breakers.active_requests == 0
                                     and c.hosts[0].pool.active == 0), (
                    up.open, c.state.breakers.active_requests, c.hosts[0].pool.active)
            assert up.closed == 3


async def test_client_gone_mid_body_closes_the_upstream_connection():
    async with RawUpstream(delay=None) as up:
        cfg = envoy_config(clusters={"app": {"endpoints": [up.address]}},
                           routes=[{"match": {"prefix": "/"}, "route": {"cluster": "app"}}])
        async with proxy(cfg) as p:
            c = _cluster(p)
            r, w = await asyncio.open_connection("127.0.0.1", p.port())
            w.write(b"POST /up HTTP/1.1\r\nHost: e\r\nContent-Length: 100000\r\n\r\n" + b"x" * 70000)
            await w.drain()
            assert await _settle(lambda: up.open == 1)
            w.close()                                # FIN with 30 000 bytes still owed
            assert await _settle(lambda: up.open == 0 and c.hosts[0].pool.active == 0
                                 and c.state.breakers.active_requests == 0)


async def test_request_timeout_releases_what_the_stream_held():
    async with RawUpstream(delay=None) as up:
        cfg = envoy_config(clusters={"app": {"endpoints": [up.address]}},
                           routes=[{"match": {"prefix": "/"}, "route": {"cluster": "app"}}],
                           hcm={"request_timeout": "0.5s"})
        async with proxy(cfg) as p:
            c = _cluster(p)
            r, w = await asyncio.open_connection("127.0.0.1", p.port())
            w.write(b"POST /up HTTP/1.1\r\nHost: e\r\nContent-Length: 10\r\n\r\nabc")
            await w.drain()
            resp = await asyncio.wait_for(r.read(), 5.0)      # the proxy answers and closes
            assert status(resp) == 408
            assert await _settle(lambda: up.open == 0 and c.hosts[0].pool.active == 0
                                 and c.state.breakers.active_requests == 0)
            w.close()


async def test_upstream_dead_mid_response_frees_the_pool_and_closes_the_client():
    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"y" * 1000)
        await writer.drain()
        writer.transport.abort()                    # dies mid-body
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cfg = envoy_config(clusters={"app": {"endpoints": [f"127.0.0.1:{port}"]}},
                           routes=[{"match": {"prefix": "/"}, "route": {"cluster": "app"}}])
        async with proxy(cfg) as p:
            c = _cluster(p)
            r, w = await asyncio.open_connection("127.0.0.1", p.port())
            w.write(get("/"))
            await w.drain()
            got = await asyncio.wait_for(r.read(), 5.0)     # the client connection is closed
            assert got.startswith(b"HTTP/1.1 200") and len(got.partition(b"\r\n\r\n")[2]) < 100000
            assert await _settle(lambda: c.hosts[0].pool.active == 0
                                 and c.state.breakers.active_requests == 0)
            w.close()
    finally:
        server.close()


# ---- dns_lookup_family ---------------------------------------------------------------------------

async def test_dns_lookup_family_picks_the_address_family():
    """``localhost`` has only an IPv4 address here: V4_ONLY and AUTO (IPv6 preferred, IPv4 when
    there is none) reach the upstream; V6_ONLY finds no address, so no host (503)."""
    async with RawUpstream() as up:
        for family, expected in (("V4_ONLY", 200), ("AUTO", 200), ("V6_ONLY", 503)):
            cfg = envoy_config(clusters={"app": {"endpoints": [f"127.0.0.1:{up.port}"]}},
                               routes=[{"match": {"prefix": "/"}, "route": {"cluster": "app"}}])
            c = cfg["static_resources"]["clusters"][0]
            c.update({"type": "STRICT_DNS", "dns_lookup_family": family, "dns_refresh_rate": "0.2s"})
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
                "socket_address"]["address"] = "localhost"
            async with proxy(cfg) as p:
                got = 0
                for _ in range(25):
                    got = status(await raw(p.port(), get("/")))
                    if got == expected:
                        break
                    await asyncio.sleep(0.1)
                assert got == expected, family


# ---- circuit breakers and per-code counters ----------------------------------------------------

async def _concurrent(port: int, n: int) -> list[bytes]:
    return await asyncio.gather(*(raw(port, get("/"), read_for=3.0) for _ in range(n)))


async def test_every_breaker_503_carries_x_envoy_overloaded():
    """max_requests, and max_connections with no room to wait (max_pending_requests 0) or a
    full pending queue: each refusal is 503 UO with x-envoy-overloaded: true (as Envoy)."""
    breakers = {
        "max_requests": {"max_requests": 1},
        "pending_zero": {"max_connections": 1, "max_pending_requests": 0},
        "pending_full": {"max_connections": 1, "max_pending_requests": 1},
    }
    for name, th in breakers.items():
        async with RawUpstream(delay=0.5) as up:
            cfg = envoy_config(clusters={"app": {"endpoints": [up.address], "circuit_breakers": {
                "thresholds": [th]}}}, routes=[{"match": {"prefix": "/"}, "route": {"cluster": "app"}}])
            async with proxy(cfg) as p:
                got = await _concurrent(p.port(), 4)
                refused = [r for r in got if status(r) == 503]
                assert refused, (name, [status(r) for r in got])
                for r in refused:
                    assert b"x-envoy-overloaded: true\r\n" in r, (name, r[:200])
                assert any(status(r) == 200 for r in got), name


async def test_suppress_envoy_headers_drops_x_envoy_overloaded():
    async with RawUpstream(delay=0.5) as up:
        cfg = envoy_config(clusters={"app": {"endpoints": [up.address], "circuit_breakers": {
            "thresholds": [{"max_requests": 1}]}}},
            routes=[{"match": {"prefix": "/"}, "route": {"cluster": "app"}}])
        tc = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        tc["http_filters"][-1]["typed_config"]["suppress_envoy_headers"] = True
        async with proxy(cfg) as p:
            got = await _concurrent(p.port(), 3)
            refused = [r for r in got if status(r) == 503]
            assert refused and all(b"x-envoy-overloaded" not in r for r in refused)
            ok = [r for r in got if status(r) == 200]
            assert ok and all(b"x-envoy-upstream-service-time" not in r for r in ok)


async def test_upstream_counters_per_response_code():
    async def serve(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            code = head.split(b" ")[1].strip(b"/") or b"200"
            writer.write(b"HTTP/1.1 %s X\r\ncontent-length: 0\r\n\r\n" % code)
            await writer.drain()
        writer.close()
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cfg = envoy_config(clusters={"app": {"endpoints": [f"127.0.0.1:{port}"]}},
                           routes=[{"match": {"prefix": "/"}, "route": {"cluster": "app"}}])
        async with proxy(cfg) as p:
            for code, n in (("200", 3), ("404", 2), ("503", 1), ("201", 1)):
                for _ in range(n):
                    assert status(await raw(p.port(), get("/" + code))) == int(code)
            text = await prometheus(p)
            for code, n in (("200", 3), ("404", 2), ("503", 1), ("201", 1)):
                assert metric(text, "sidecar_upstream_rq_code_total", cluster="app",
                              envoy_response_code=code) == n, code
            # beside the status class
            assert metric(text, "sidecar_upstream_rq_total", cluster="app", status_class="2xx") == 4
    finally:
        server.close()


async def test_upstream_response_header_limits_both_formats():
    """A response with more header lines (or bytes) than the cluster allows is a 502 and its
    connection is closed; one within the limits goes through."""
    async def serve(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            n = int(head.split(b" ")[1].strip(b"/") or b"1")
            extra = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 130) for i in range(n))
            writer.write(b"HTTP/1.1 200 OK\r\n" + extra + b"content-length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    up = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        envoy_cfg = envoy_config(clusters={"app": {"endpoints": [up], "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "common_http_protocol_options": {"max_headers_count": 10,
                                                 "max_response_headers_kb": 1}}}}},
            routes=[{"match": {"prefix": "/"}, "route": {"cluster": "app"}}])
        native_cfg = native_config(clusters={"app": {"endpoints": [up], "max_response_headers_count": 10,
                                                     "max_response_headers_kb": 1}},
                                   routes=[{"match": {"prefix": "/"}, "cluster": "app"}])
        for cfg in (envoy_cfg, native_cfg):
            async with proxy(cfg) as p:
                assert status(await raw(p.port(), get("/5"))) == 200          # 6 lines, ~0.7 KiB
                assert status(await raw(p.port(), get("/10"))) == 502         # 11 lines
                assert status(await raw(p.port(), get("/8"))) == 502          # 9 lines, > 1 KiB
    finally:
        server.close()
