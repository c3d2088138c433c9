"""Prometheus metrics: scraped over HTTP from the admin port after real traffic on loopback,
parsed with prometheus_client's own parser."""

import asyncio
import time

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families

from sidecar.observability.metrics import LATENCY_BUCKETS, Metrics
from sidecar.observability.stats import NULL, RouteStats, StatsCache
from sidecar.testing import Upstream, free_port, native_config, running_proxy


async def scrape(p, accept: str = "") -> tuple[dict, str, str]:
    """{(sample name, frozenset(labels)): value}, raw text, content type."""
    async with aiohttp.ClientSession() as s:
        async with s.get(p.admin_url + "/stats/prometheus", headers={"Accept": accept} if accept else {}) as r:
            assert r.status == 200
            text = await r.text()
            ctype = r.headers["Content-Type"]
    parse = om_parse if "openmetrics" in ctype else text_string_to_metric_families
    out = {}
    for fam in parse(text):
        for smp in fam.samples:
            out[(smp.name, frozenset(smp.labels.items()))] = smp.value
    return out, text, ctype


def val(samples: dict, name: str, **labels) -> float:
    key = (name, frozenset(labels.items()))
    if key not in samples:
        have = sorted(str(dict(k[1])) for k in samples if k[0] == name)
        raise AssertionError(f"no sample {name}{labels}; have {have}")
    return samples[key]


def series(samples: dict, name: str) -> list[dict]:
    return [dict(k[1]) for k in samples if k[0] == name]


async def test_downstream_and_upstream_counts_latency_and_bytes():
    async def handler(request):
        body = await request.read()
        if request.path.startswith("/fail"):
            return web.Response(status=500, text="boom")
        return web.Response(text="x" * 100 + str(len(body)))

    async with Upstream(handler) as up:
        dead = f"127.0.0.1:{free_port()}"
        cfg = native_config(
            clusters={"svc": [up.address], "dead": [dead]},
            routes=[{"name": "fail", "match": {"prefix": "/fail"}, "cluster": "svc"},
                    {"name": "dead", "match": {"prefix": "/dead"}, "cluster": "dead"},
                    {"name": "ok", "match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg) as p:
            sent_bytes = 0
            got_bytes = 0
            t0 = time.perf_counter()
            async with aiohttp.ClientSession() as s:
                for i in range(20):
                    body = b"y" * (i * 10)
                    sent_bytes += len(body)
                    async with s.post(p.url(f"/ok/{i}"), data=body) as r:
                        assert r.status == 200
                        got_bytes += len(await r.read())
                for i in range(7):
                    async with s.get(p.url(f"/fail/{i}")) as r:
                        assert r.status == 500
                async with s.get(p.url("/dead"), ) as r:
                    assert r.status == 503
                async with s.get(p.url("/x"), headers={"Host": "nope.example"}) as r:
                    assert r.status == 200  # the default virtual host matches any authority
                elapsed = time.perf_counter() - t0
                m, _, ctype = await scrape(p)
                assert ctype.startswith("text/plain")
                # a connection is still open while we scrape
                assert val(m, "sidecar_downstream_cx_active", listener="test") >= 1

    L = dict(listener="test", virtual_host="default")
    assert val(m, "sidecar_http_downstream_rq_total", route="ok", status_class="2xx", **L) == 21
    assert val(m, "sidecar_http_downstream_rq_total", route="fail", status_class="5xx", **L) == 7
    assert val(m, "sidecar_http_downstream_rq_total", route="fail", status_class="2xx", **L) == 0
    assert val(m, "sidecar_http_downstream_rq_total", route="dead", status_class="5xx", **L) == 1
    assert val(m, "sidecar_http_downstream_rq_flag_total", route="dead", flag="UF", **L) == 1
    # latency histogram: count, +Inf bucket and a sum bounded by the wall time we measured
    count = val(m, "sidecar_http_downstream_rq_time_seconds_count", route="ok", **L)
    total = val(m, "sidecar_http_downstream_rq_time_seconds_sum", route="ok", **L)
    assert count == 21
    assert val(m, "sidecar_http_downstream_rq_time_seconds_bucket", route="ok", le="+Inf", **L) == 21
    assert 0 < total < elapsed
    les = sorted(float(x["le"]) for x in series(m, "sidecar_http_downstream_rq_time_seconds_bucket")
                 if x.get("route") == "ok")
    assert les[:-1] == list(LATENCY_BUCKETS) and les[0] < 0.001 and les[-2] >= 30
    # bytes: request bodies received, response bodies sent (for the 20 POSTs + the 1 GET)
    assert val(m, "sidecar_http_downstream_rq_bytes_total", route="ok", **L) == sent_bytes
    assert val(m, "sidecar_http_downstream_rs_bytes_total", route="ok", **L) >= got_bytes
    # upstream side, per cluster and per endpoint (scrape-time state)
    assert val(m, "sidecar_upstream_rq_total", cluster="svc", status_class="2xx") == 21
    assert val(m, "sidecar_upstream_rq_total", cluster="svc", status_class="5xx") == 7
    assert val(m, "sidecar_upstream_rq_time_seconds_count", cluster="svc") == 28
    assert val(m, "sidecar_upstream_cx_connect_fail_total", cluster="dead") == 1
    ep = dict(cluster="svc", endpoint=up.address)
    assert val(m, "sidecar_upstream_endpoint_rq_total", **ep) == 28
    assert val(m, "sidecar_upstream_endpoint_rq_error_total", **ep) == 7
    assert val(m, "sidecar_upstream_endpoint_available", **ep) == 1
    assert not series(m, "sidecar_upstream_endpoint_ewma_seconds")    # round robin keeps no EWMA
    assert val(m, "sidecar_upstream_endpoint_cx_connect_fail_total", cluster="dead", endpoint=dead) == 1
    assert val(m, "sidecar_upstream_endpoints", cluster="svc", state="available") == 1
    assert val(m, "sidecar_upstream_circuit_breaker_open", cluster="svc", breaker="max_requests") == 0
    # control plane
    assert val(m, "sidecar_config_info", version="0") == 1
    assert val(m, "sidecar_config_updates_total", source="initial", outcome="accepted") == 1
    assert val(m, "sidecar_config_last_update_timestamp_seconds") > 1e9
    assert val(m, "sidecar_config_resources", type="cluster") == 2


async def test_no_route_flags_and_bounded_labels():
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=[{"match": {"prefix": "/api"}, "cluster": "svc"}])
        async with running_proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                for i in range(30):   # 30 distinct paths, query strings and user agents
                    async with s.get(p.url(f"/api/user/{i}?token=secret{i}"),
                                     headers={"User-Agent": f"agent-{i}"}) as r:
                        assert r.status == 200
                for i in range(3):
                    async with s.get(p.url(f"/other/{i}")) as r:
                        assert r.status == 404
            m, text, _ = await scrape(p)
    assert "secret" not in text and "/api/user" not in text and "agent-" not in text
    # the unnamed route is labelled by its virtual host, a config value
    assert val(m, "sidecar_http_downstream_rq_total", listener="test", virtual_host="default",
               route="default", status_class="2xx") == 30
    assert val(m, "sidecar_http_downstream_rq_total", listener="test", virtual_host="", route="",
               status_class="4xx") == 3
    assert val(m, "sidecar_http_downstream_rq_flag_total", listener="test", virtual_host="", route="",
               flag="NR") == 3
    assert val(m, "sidecar_http_downstream_rq_no_route_total", listener="test") == 3
    assert len(series(m, "sidecar_http_downstream_rq_total")) == 10   # 2 routes x 5 classes


async def test_retries_timeouts_and_breaker_overflow():
    release = asyncio.Event()
    calls = {"n": 0}

    async def handler(request):
        if request.path.startswith("/flaky"):
            calls["n"] += 1
            if request.headers.get("x-envoy-attempt-count") == "1":
                return web.Response(status=503)
            return web.Response(text="ok")
        if request.path.startswith("/slow"):
            await asyncio.sleep(1.0)
            return web.Response(text="late")
        await release.wait()
        return web.Response(text="held")

    async with Upstream(handler) as up:
        cfg = native_config(
            clusters={"svc": [up.address],
                      "narrow": {"endpoints": [up.address], "circuit_breakers": {"max_requests": 1}}},
            routes=[{"name": "flaky", "match": {"prefix": "/flaky"}, "cluster": "svc",
                     "retry": {"retry_on": "5xx", "retries": 2, "backoff": "1ms"}},
                    {"name": "slow", "match": {"prefix": "/slow"}, "cluster": "svc", "timeout": "50ms"},
                    {"name": "held", "match": {"prefix": "/held"}, "cluster": "narrow"}])
        async with running_proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                for _ in range(4):
                    async with s.get(p.url("/flaky")) as r:
                        assert r.status == 200
                async with s.get(p.url("/slow")) as r:
                    assert r.status == 504
                first = asyncio.ensure_future(s.get(p.url("/held")))
                for _ in range(100):      # until the first request is in flight upstream
                    if p.app.clusters.get("narrow").state.breakers.active_requests == 1:
                        break
                    await asyncio.sleep(0.01)
                async with s.get(p.url("/held")) as r:
                    assert r.status == 503      # max_requests=1: overflow
                during, _, _ = await scrape(p)
                release.set()
                r1 = await first
                assert r1.status == 200
                r1.release()
            m, _, _ = await scrape(p)
    assert val(m, "sidecar_upstream_rq_retry_total", cluster="svc", outcome="attempted") == 4
    assert val(m, "sidecar_upstream_rq_retry_total", cluster="svc", outcome="success") == 4
    assert val(m, "sidecar_upstream_rq_total", cluster="svc", status_class="5xx") == 4
    assert val(m, "sidecar_http_downstream_rq_total", listener="test", virtual_host="default",
               route="flaky", status_class="2xx") == 4
    assert val(m, "sidecar_upstream_rq_timeout_total", cluster="svc") == 1
    assert val(m, "sidecar_http_downstream_rq_flag_total", listener="test", virtual_host="default",
               route="slow", flag="UT") == 1
    assert val(m, "sidecar_upstream_rq_overflow_total", cluster="narrow", breaker="max_requests") == 1
    assert val(m, "sidecar_http_downstream_rq_flag_total", listener="test", virtual_host="default",
               route="held", flag="UO") == 1
    # while the first request was held: the breaker was full and one request was in flight
    assert val(during, "sidecar_upstream_circuit_breaker_open", cluster="narrow", breaker="max_requests") == 1
    assert val(during, "sidecar_upstream_rq_active", cluster="narrow") == 1
    assert val(during, "sidecar_downstream_rq_active", listener="test") >= 1
    assert val(m, "sidecar_upstream_circuit_breaker_open", cluster="narrow", breaker="max_requests") == 0


async def test_endpoint_ejection_and_health_state_are_read_at_scrape_time():
    """The collector reports what outlier detection / health checking put in endpoint state."""
    async with Upstream() as a, Upstream() as b:
        cfg = native_config(clusters={"svc": [a.address, b.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg) as p:
            cs = p.app.clusters.get("svc")
            ha, hb = cs.state.endpoints[a.address], cs.state.endpoints[b.address]
            # written on the health board, as outlier detection and the prober do
            now = time.monotonic()
            ha.counters.eject(now - 100, 1.0, 1.0)       # an old ejection, long over
            ha.counters.eject(now, 30.0, 30.0)
            hb.counters.set_healthy(False)
            m, _, _ = await scrape(p)
    assert val(m, "sidecar_upstream_endpoint_ejected", cluster="svc", endpoint=a.address) == 1
    assert val(m, "sidecar_upstream_endpoint_ejections_total", cluster="svc", endpoint=a.address) == 2
    assert val(m, "sidecar_upstream_endpoint_available", cluster="svc", endpoint=a.address) == 0
    assert val(m, "sidecar_upstream_endpoint_health_check_healthy", cluster="svc", endpoint=b.address) == 0
    assert val(m, "sidecar_upstream_endpoint_health_check_healthy", cluster="svc", endpoint=a.address) == 1
    assert val(m, "sidecar_upstream_outlier_ejections_active", cluster="svc") == 1
    assert val(m, "sidecar_upstream_endpoints", cluster="svc", state="total") == 2
    assert val(m, "sidecar_upstream_endpoints", cluster="svc", state="available") == 0
    assert val(m, "sidecar_upstream_endpoints", cluster="svc", state="health_check_failed") == 1


async def test_openmetrics_when_asked():
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                async with s.get(p.url("/")) as r:
                    assert r.status == 200
            m, text, ctype = await scrape(p, accept="application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert val(m, "sidecar_http_downstream_rq_total", listener="test", virtual_host="default",
               route="default", status_class="2xx") == 1


async def test_config_updates_accepted_and_rejected(tmp_path):
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            version="v1")
        path = tmp_path / "sidecar.yaml"
        path.write_text(yaml.safe_dump(cfg))
        async with running_proxy(cfg, config_path=str(path)) as p:
            p.app.watch_config = False
            cfg["version"] = "v2"
            path.write_text(yaml.safe_dump(cfg))
            assert await p.app.reload("file")
            path.write_text("listeners: [{name: x, bogus: 1}]\n")
            assert not await p.app.reload("file")
            m, _, _ = await scrape(p)
    assert val(m, "sidecar_config_info", version="v2") == 1
    assert ("sidecar_config_info", frozenset({("version", "v1")})) not in m
    assert val(m, "sidecar_config_updates_total", source="file", outcome="accepted") == 1
    assert val(m, "sidecar_config_updates_total", source="file", outcome="rejected") == 1


async def test_metrics_off_records_nothing_and_still_proxies():
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        async with running_proxy(cfg, metrics=False) as p:
            async with aiohttp.ClientSession() as s:
                async with s.get(p.url("/")) as r:
                    assert r.status == 200
            m, _, _ = await scrape(p)
    assert not [k for k in m if k[0].startswith("sidecar_")]


def test_stats_objects_are_null_when_off_and_flags_are_bounded():
    off = StatsCache(Metrics(enabled=False))
    rs = off.route("l", "v", "r")
    assert rs.latency is NULL and rs.flag("UF") is NULL and off.cluster("c").rq_retry is NULL
    on = Metrics(enabled=True)
    r = RouteStats(on, "l", "v", "r")
    r.flag("UF").inc()
    r.flag("made-up-by-a-bug").inc()
    r.flag("another-one").inc()
    fam = on.family("sidecar_http_downstream_rq_flag_total")
    flags = {s.labels["flag"]: s.value for m in fam.collect() for s in m.samples
             if s.name.endswith("_total")}
    assert flags == {"UF": 1.0, "other": 2.0}


async def test_peak_ewma_estimate_and_cost_per_endpoint():
    async def slow_handler(request):
        await asyncio.sleep(0.03)
        return web.Response(text="slow")

    ewma = {"lb": "peak_ewma", "ewma": {"default_rtt": "5ms", "decay": "10s"}}
    async with Upstream(slow_handler) as slow, Upstream() as fast:
        cfg = native_config(clusters={"slow": {"endpoints": [slow.address], **ewma},
                                      "fast": {"endpoints": [fast.address], **ewma}},
                            routes=[{"match": {"prefix": "/slow"}, "cluster": "slow"},
                                    {"name": "fast", "match": {"prefix": "/"}, "cluster": "fast"}])
        async with running_proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                for path in ("/slow", "/fast") * 5:
                    async with s.get(p.url(path)) as r:
                        assert r.status == 200
            m, _, _ = await scrape(p)
    e_slow = val(m, "sidecar_upstream_endpoint_ewma_seconds", cluster="slow", endpoint=slow.address)
    e_fast = val(m, "sidecar_upstream_endpoint_ewma_seconds", cluster="fast", endpoint=fast.address)
    assert 0.025 < e_slow < 1.0 and e_fast < 0.02
    cost = val(m, "sidecar_upstream_endpoint_ewma_cost_seconds", cluster="slow", endpoint=slow.address)
    assert cost == pytest.approx(e_slow, rel=0.05)      # nothing in flight: cost = estimate
