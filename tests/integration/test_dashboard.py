"""The live admin dashboard: its JSON feed after real traffic, and the page itself rendered by
headless Chromium (Debian package ``chromium``), checked through the DOM and a screenshot."""

import asyncio
import os
import re
import shutil
import struct
import tempfile
import time
import zlib

import aiohttp
import pytest
from aiohttp import web
from h2_helpers import H2Client, H2Request, H2Upstream

from sidecar.admin.dashboard import STATIC_DIR, quantile
from sidecar.shared.testing import RedisServer, free_port
from sidecar.testing import Upstream, native_config, running_proxy

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium)")

OK_GREEN = (0x3f, 0xb9, 0x50)     # --ok in dashboard.css: "live", healthy endpoints, closed breaker
WARN_AMBER = (0xd2, 0x99, 0x22)   # --warn: an ejected endpoint


def dashboard_config(up_a, up_b):
    return native_config(
        clusters={"orders": {"endpoints": [up_a.address, up_b.address], "lb": "peak_ewma"},
                  "users": [up_a.address]},
        routes=[{"name": "orders", "match": {"prefix": "/orders"}, "cluster": "orders"},
                {"name": "users", "match": {"prefix": "/users"}, "cluster": "users"}],
        version="dash-v7")


async def traffic(p, stop: asyncio.Event, errors_every: int = 0):
    n = 1
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            n += 1
            path = "/users/1" if n % 3 == 0 else "/orders/1"
            if errors_every and n % errors_every == 0:
                path = "/users/fail"
            async with s.get(p.url(path)) as r:
                await r.read()
            await asyncio.sleep(0.005)


async def handler(request):
    if request.path.endswith("/fail"):
        return web.Response(status=500, text="fail")
    await asyncio.sleep(0.002)
    return web.Response(text="ok")


async def test_dashboard_json_after_traffic():
    async with Upstream(handler) as a, Upstream(handler) as b:
        async with running_proxy(dashboard_config(a, b)) as p:
            async with aiohttp.ClientSession() as s:
                async with s.get(p.admin_url + "/dashboard.json") as r:   # starts the sampler
                    assert (await r.json())["totals"]["requests"] == 0
                await asyncio.sleep(0.3)     # one sample before the traffic
                for i in range(30):
                    async with s.get(p.url("/orders/fail" if i % 10 == 0 else "/orders/1")) as r:
                        await r.read()
                for _ in range(5):
                    async with s.get(p.url("/users/1")) as r:
                        await r.read()
                async with s.get(p.admin_url + "/dashboard.json") as r:
                    assert r.status == 200
                    d = await r.json()
    assert d["config"]["version"] == "dash-v7" and d["config"]["accepted"] == 1
    routes = {r["route"]: r for r in d["routes"]}
    assert set(routes) == {"orders", "users"}           # no "(no route)" row without traffic there
    o = routes["orders"]
    assert o["requests"] == 30 and o["errors_5xx"] == 3 and o["by_class"]["5xx"] == 3
    assert o["rps"] > 0 and o["success_rate"] == pytest.approx(0.9)
    assert o["p50_ms"] is not None and 0 < o["p50_ms"] < o["p99_ms"] < 1000
    assert routes["users"]["success_rate"] == 1.0
    clusters = {c["name"]: c for c in d["clusters"]}
    oc = clusters["orders"]
    assert oc["attempts"] == 30 and oc["errors"] == 3 and oc["success_rate"] == pytest.approx(0.9)
    assert {e["address"] for e in oc["endpoints"]} == {a.address, b.address}
    assert all(e["health"] == "healthy" and e["ewma_ms"] > 0 for e in oc["endpoints"])
    assert sum(e["rq_total"] for e in oc["endpoints"]) == 30
    assert oc["breaker"]["open"] == [] and oc["breaker"]["max_requests"] == 1024
    assert d["totals"]["requests"] == 35 and d["listeners"][0]["routes"] == 2


async def test_dashboard_page_is_self_contained():
    async with Upstream(handler) as a, Upstream(handler) as b:
        async with running_proxy(dashboard_config(a, b)) as p:
            async with aiohttp.ClientSession() as s:
                async with s.get(p.admin_url + "/") as r:
                    assert r.status == 200 and r.content_type == "text/html"
                    html = await r.text()
                for asset in ("dashboard.js", "dashboard.css"):
                    async with s.get(p.admin_url + "/static/" + asset) as r:
                        assert r.status == 200
                async with s.get(p.admin_url + "/static/..%2Fdashboard.py") as r:
                    assert r.status == 404
    assert 'src="/static/dashboard.js"' in html
    for name in os.listdir(STATIC_DIR):     # no CDN, no external fonts: works offline
        text = open(os.path.join(STATIC_DIR, name), encoding="utf-8").read()
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), name
        assert "@import" not in text and "url(http" not in text, name


def test_quantile_interpolates_like_promql():
    buckets = ((0.01, 0.0), (0.1, 50.0), (1.0, 100.0), (float("inf"), 100.0))
    assert quantile(0.5, (buckets, 0, 100), None) == pytest.approx(0.1)
    assert quantile(0.25, (buckets, 0, 100), None) == pytest.approx(0.055)
    older = (((0.01, 0.0), (0.1, 50.0), (1.0, 50.0), (float("inf"), 50.0)), 0, 50)
    assert quantile(0.5, (buckets, 0, 100), older) == pytest.approx(0.55)    # only the last 50
    assert quantile(0.5, (buckets, 0, 100), (buckets, 0, 100)) is None       # nothing new


# ---- headless Chromium ---------------------------------------------------------------------

def chromium_args(profile: str) -> list[str]:
    return [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}"]


async def run_chromium(*args: str, timeout: float = 60.0) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        proc = await asyncio.create_subprocess_exec(*chromium_args(profile), *args,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


def png_pixels(path: str) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) to rows of raw pixels."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, ul = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + left) & 0xFF
            elif f == 2:
                line[i] = (line[i] + up) & 0xFF
            elif f == 3:
                line[i] = (line[i] + ((left + up) >> 1)) & 0xFF
            elif f == 4:
                pa, pb, pc = abs(up - ul), abs(left - ul), abs(left + up - 2 * ul)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else ul)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, bpp, rows


def count_colour(rows: list[bytes], bpp: int, rgb: tuple[int, int, int], tol: int = 6) -> int:
    n = 0
    for row in rows:
        for i in range(0, len(row), bpp):
            if abs(row[i] - rgb[0]) <= tol and abs(row[i + 1] - rgb[1]) <= tol and abs(row[i + 2] - rgb[2]) <= tol:
                n += 1
    return n


async def render_dashboard(screenshot: str | None = None) -> str:
    """Run real traffic through a proxy, eject one endpoint, and let Chromium render the page.
    Returns the DOM (and writes the screenshot when asked)."""
    async with Upstream(handler) as a, Upstream(handler) as b:
        async with running_proxy(dashboard_config(a, b)) as p:
            stop = asyncio.Event()
            load = asyncio.ensure_future(traffic(p, stop, errors_every=50))
            try:
                async with aiohttp.ClientSession() as s:     # start sampling, as a viewer would
                    async with s.get(p.admin_url + "/dashboard.json") as r:
                        assert r.status == 200
                await asyncio.sleep(2.5)      # a few samples with traffic in them
                cs = p.app.clusters.get("orders")
                ejected = cs.state.endpoints[b.address]
                ejected.ejected_until = time.monotonic() + 60     # as outlier detection would
                ejected.ejections = 1
                url = p.admin_url + "/"
                dom = await run_chromium("--dump-dom", "--virtual-time-budget=3000", url)
                if screenshot:
                    await run_chromium(f"--screenshot={screenshot}", "--window-size=1280,900",
                                       "--virtual-time-budget=3000", url)
            finally:
                stop.set()
                await load
    return dom, a.address, b.address


@needs_chromium
async def test_dashboard_in_headless_chromium(tmp_path):
    shot = str(tmp_path / "dashboard.png")
    dom, a_addr, b_addr = await render_dashboard(shot)
    # the DOM after the scripts ran: data from /dashboard.json is on the page
    assert 'id="status" class="pill ok">live<' in dom
    assert 'id="config-version">dash-v7<' in dom
    rows = dict(re.findall(r'<tr data-route="([^"]+)">(.*?)</tr>', dom))
    assert set(rows) == {"orders", "users"}
    for name, row in rows.items():
        rps = float(re.search(r'class="num route-rps">([0-9.]+)<', row).group(1))
        assert rps > 1, (name, row)
        assert re.search(r'class="num route-p99">[0-9.]+ ms<', row), row
    pct = float(re.search(r'route-success (?:good|meh|poor)">([0-9.]+)%<', rows["users"]).group(1))
    assert 80 < pct < 100
    assert 'route-success good">100%<' in rows["orders"]
    assert 'data-cluster="orders"' in dom and 'data-cluster="users"' in dom
    assert f'data-endpoint="{a_addr}"' in dom and f'data-endpoint="{b_addr}"' in dom
    ep_b = re.search(rf'<tr data-endpoint="{re.escape(b_addr)}">(.*?)</tr>', dom).group(1)
    assert 'data-health="ejected"' in ep_b
    ep_a = re.search(rf'<tr data-endpoint="{re.escape(a_addr)}">(.*?)</tr>', dom).group(1)
    assert 'data-health="healthy"' in ep_a and re.search(r'ep-ewma">[0-9.]+ ms<', ep_a)
    assert dom.count('data-breaker="closed"') == 2
    assert "<polyline" in dom            # request-rate sparklines drawn
    # the screenshot shows it: the green "live"/healthy pills and the amber ejected one are
    # painted only once the JSON has been fetched and rendered
    assert os.path.getsize(shot) > 20_000
    width, bpp, pixels = png_pixels(shot)
    assert width == 1280
    assert count_colour(pixels, bpp, OK_GREEN) > 200
    assert count_colour(pixels, bpp, WARN_AMBER) > 50
    if os.environ.get("SIDECAR_DASHBOARD_SCREENSHOT"):
        shutil.copy(shot, os.environ["SIDECAR_DASHBOARD_SCREENSHOT"])


# ---- dependencies: Redis stores and rate limit services -------------------------------------

def dependencies_config(up, redis_address: str, closed_port: int) -> dict:
    return native_config(
        clusters={"svc": [up.address], "rls": {"endpoints": [f"127.0.0.1:{closed_port}"],
                                                "protocol": "http2"}},
        routes=[{"match": {"prefix": "/limited"}, "cluster": "svc",
                 "filters": {"local_ratelimit": {"max_tokens": 100, "fill_interval": "1h",
                                                 "store": "main"}}},
                {"match": {"prefix": "/global"}, "cluster": "svc",
                 "rate_limits": [{"actions": [{"remote_address": {}}]}]},
                {"match": {"prefix": "/"}, "cluster": "svc"}],
        filters=[{"local_ratelimit": {"disabled": True}},
                 {"ratelimit": {"domain": "edge", "cluster": "rls", "timeout": "200ms"}}],
        stores={"main": {"redis": {"address": redis_address, "timeout": "500ms"}}})


async def test_dependencies_in_the_feed_and_on_the_page():
    """A real Redis store that answers and a rate limit service that does not (nothing
    listens): /dashboard.json lists both with their state and counts, and the page (headless
    Chromium, when installed) draws them: "up", and "down" with the error and the fail-open
    decision."""
    redis = RedisServer().start()
    try:
        async with Upstream(handler) as up:
            async with running_proxy(dependencies_config(up, redis.address, free_port())) as p:
                async with aiohttp.ClientSession() as s:
                    for path in ("/limited", "/global"):
                        async with s.get(p.url(path)) as r:
                            assert r.status == 200          # the service down: fail open
                    async with s.get(p.admin_url + "/dashboard.json") as r:
                        deps = {d["name"]: d for d in (await r.json())["dependencies"]}
                assert set(deps) == {"main", "ratelimit_service:rls"}
                assert deps["main"]["up"] and deps["main"]["calls"] >= 1
                rls = deps["ratelimit_service:rls"]
                assert not rls["up"] and rls["last_error"] and rls["fail_open"] == 1
                if CHROMIUM is None:
                    return                                  # the feed is checked; no browser
                dom = await run_chromium("--dump-dom", "--virtual-time-budget=3000",
                                         p.admin_url + "/")
    finally:
        redis.stop()
    assert '<section id="dependencies-section">' in dom       # shown: it has rows
    rows = dict(re.findall(r'<tr data-dependency="([^"]+)">(.*?)</tr>', dom))
    assert set(rows) == {"main", "ratelimit_service:rls"}
    assert 'data-state="up"' in rows["main"]
    assert 'data-state="down"' in rows["ratelimit_service:rls"]
    assert re.search(r'dep-fail-open">1<', rows["ratelimit_service:rls"])
    assert re.search(r'dep-error">[^<]+', rows["ratelimit_service:rls"])


async def test_dashboard_json_over_http2():
    """The same feed when clients and upstreams speak HTTP/2: streams multiplexed on one client
    connection, a cluster with ``protocol: http2``; every stream counts as one request."""
    async def h2_handler(req: H2Request) -> tuple[int, list, bytes, list]:
        if req.path.endswith("/fail"):
            return 500, [("content-type", "text/plain")], b"fail", []
        return 200, [("content-type", "text/plain")], b"ok", []

    async with H2Upstream(h2_handler) as up:
        cfg = native_config(
            clusters={"orders": {"endpoints": [up.address], "protocol": "http2"}},
            routes=[{"name": "orders", "match": {"prefix": "/orders"}, "cluster": "orders"}],
            version="dash-h2")
        async with running_proxy(cfg) as p, aiohttp.ClientSession() as s:
            async with s.get(p.admin_url + "/dashboard.json") as r:   # starts the sampler
                assert (await r.json())["totals"]["requests"] == 0
            await asyncio.sleep(0.3)
            async with H2Client(p.port()) as c:
                # 20 concurrent streams on one connection, 2 of them failing upstream
                sids = [await c.start("GET", "/orders/fail" if i % 10 == 0 else "/orders/1")
                        for i in range(20)]
                statuses = [(await c.response(sid)).status for sid in sids]
            assert sorted(statuses) == [200] * 18 + [500] * 2
            async with s.get(p.admin_url + "/dashboard.json") as r:
                d = await r.json()
    assert len(up.requests) == 20 and up.connections >= 1
    o = {r["route"]: r for r in d["routes"]}["orders"]
    assert o["requests"] == 20 and o["errors_5xx"] == 2 and o["success_rate"] == pytest.approx(0.9)
    assert o["p50_ms"] is not None
    oc = {c["name"]: c for c in d["clusters"]}["orders"]
    assert oc["attempts"] == 20 and oc["errors"] == 2
    assert [e["rq_total"] for e in oc["endpoints"]] == [20]
    assert d["totals"]["requests"] == 20
