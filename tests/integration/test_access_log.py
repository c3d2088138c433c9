"""Access log lines, parsed as JSON, after real requests through the proxy."""

import json
import time

import aiohttp
import pytest
from aiohttp import web

from sidecar.config.errors import ConfigError
from sidecar.config.listener import check_fields
from sidecar.observability import access_log
from sidecar.testing import Upstream, free_port, native_config, running_proxy


def read_lines(path) -> list[dict]:
    assert access_log.flush_all(5.0)
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


async def test_json_lines_have_the_documented_fields(tmp_path):
    log_path = tmp_path / "access.log"

    async def handler(request):
        await request.read()
        if request.path == "/boom":
            return web.Response(status=502, text="bad gateway")
        return web.Response(text="hello world")

    async with Upstream(handler) as up:
        dead = f"127.0.0.1:{free_port()}"
        cfg = native_config(clusters={"svc": [up.address], "dead": [dead]},
                            routes=[{"name": "dead", "match": {"prefix": "/dead"}, "cluster": "dead"},
                                    {"name": "main", "match": {"prefix": "/"}, "cluster": "svc"}],
                            listener={"access_log": {"path": str(log_path)}},
                            tracing={"exporter": "memory", "sample_percent": 100})
        async with running_proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                async with s.post(p.url("/items/1?secret=x"), data=b"abc",
                                  headers={"User-Agent": "ua/1", "x-request-id": "rid-1",
                                           "Authorization": "Bearer top-secret-token",
                                           "Cookie": "session=hunter2"}) as r:
                    assert r.status == 200
                async with s.get(p.url("/boom")) as r:
                    assert r.status == 502
                async with s.get(p.url("/dead")) as r:
                    assert r.status == 503
            spans = p.app._tracing.memory.get_finished_spans()
    lines = read_lines(log_path)
    raw = log_path.read_text()
    assert "top-secret-token" not in raw and "hunter2" not in raw and "secret=x" not in raw
    assert len(lines) == 3
    first, boom, dead_line = lines
    assert list(first) == list(access_log.DEFAULT_FIELDS)
    assert first["method"] == "POST" and first["path"] == "/items/1" and first["status"] == 200
    assert first["protocol"] == "HTTP/1.1" and first["response_flags"] == "-"
    assert first["bytes_received"] == 3 and first["bytes_sent"] == len("hello world")
    assert first["route"] == "main" and first["cluster"] == "svc" and first["upstream_host"] == up.address
    assert first["request_id"] == "rid-1" and first["user_agent"] == "ua/1"
    assert first["downstream_address"].startswith("127.0.0.1:") and first["listener"] == "test"
    assert 0 < first["upstream_duration_ms"] <= first["duration_ms"]
    assert first["start_time"].endswith("Z") and "T" in first["start_time"]
    server = next(x for x in spans if x.attributes.get("guid:x-request-id") == "rid-1")
    assert first["trace_id"] == f"{server.context.trace_id:032x}"       # the log joins the trace
    assert boom["status"] == 502 and boom["route"] == "main"
    assert dead_line["status"] == 503 and dead_line["response_flags"] == "UF"
    assert dead_line["upstream_duration_ms"] is None


async def test_configured_fields_headers_and_unsampled_trace_id(tmp_path):
    log_path = tmp_path / "access.log"
    fields = ["method", "status", "trace_id", "request_header.x-tenant", "response_header.content-type",
              "attempts", "virtual_host"]
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]},
                            routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            listener={"access_log": {"path": str(log_path), "fields": fields}})
        async with running_proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                async with s.get(p.url("/"), headers={"x-tenant": "acme", "traceparent": tp}) as r:
                    assert r.status == 200
    (line,) = read_lines(log_path)
    assert list(line) == fields
    assert line == {"method": "GET", "status": 200, "trace_id": "0af7651916cd43dd8448eb211c80319c",
                    "request_header.x-tenant": "acme", "response_header.content-type": line["response_header.content-type"],
                    "attempts": line["attempts"], "virtual_host": "default"}
    assert line["response_header.content-type"].startswith("application/json")


def test_sensitive_and_unknown_fields_are_refused():
    for bad in ("request_header.authorization", "request_header.Cookie", "response_header.set-cookie",
                "request_header.x-api-key", "request_header.x-auth-token", "request_header.x-session-id"):
        with pytest.raises(ConfigError) as e:
            check_fields(["method", bad])
        assert e.value.path == "access_log.fields[1]"
    with pytest.raises(ConfigError):
        check_fields(["nope"])
    assert check_fields(["status", "request_header.x-tenant"]) == ("status", "request_header.x-tenant")
    # and even when a loader let one through, the logger drops it
    lg = access_log.AccessLogger("/dev/null", "json", ("status", "request_header.authorization"), "l")
    assert lg.fields == ("status",)


async def test_text_format(tmp_path):
    log_path = tmp_path / "access.log"
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            listener={"access_log": {"path": str(log_path), "format": "text",
                                                     "fields": ["method", "path", "status", "upstream_host"]}})
        async with running_proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                async with s.get(p.url("/t")) as r:
                    assert r.status == 200
    access_log.flush_all()
    assert log_path.read_text() == f"GET /t 200 {up.address}\n"


def test_the_sink_never_blocks_and_drops_past_its_bound(tmp_path, monkeypatch):
    """A write is a deque append; a destination that cannot keep up loses lines, counted."""
    import threading
    sink = access_log.LogSink(str(tmp_path / "slow.log"))
    gate = threading.Event()
    real_drain = sink._drain

    def slow_drain():
        gate.wait(5)
        real_drain()
    monkeypatch.setattr(sink, "_drain", slow_drain)
    monkeypatch.setattr(access_log, "MAX_QUEUED_LINES", 1000)
    t0 = time.perf_counter()
    for i in range(5000):
        sink.write(f"line {i}")
    took = time.perf_counter() - t0
    assert took < 0.5
    assert sink.dropped == 4000
    gate.set()
    assert sink.flush(5.0)
    sink.close()
    assert len((tmp_path / "slow.log").read_text().splitlines()) == 1000


async def test_stdout_destination(capfd):
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            listener={"access_log": {"path": "stdout", "fields": ["path", "status"]}})
        async with running_proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                async with s.get(p.url("/to-stdout")) as r:
                    assert r.status == 200
    access_log.flush_all()
    out = capfd.readouterr().out
    assert json.loads([l for l in out.splitlines() if "to-stdout" in l][0]) == {"path": "/to-stdout", "status": 200}


async def test_lines_written_are_counted_in_metrics(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families
    log_path = str(tmp_path / "counted.log")
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[{"match": {"prefix": "/"}, "cluster": "svc"}],
                            listener={"access_log": {"path": log_path}})
        async with running_proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                for _ in range(4):
                    async with s.get(p.url("/")) as r:
                        assert r.status == 200
                access_log.flush_all()
                async with s.get(p.admin_url + "/stats/prometheus") as r:
                    text = await r.text()
    got = {(smp.labels["path"], smp.labels["outcome"]): smp.value
           for f in text_string_to_metric_families(text) if f.name == "sidecar_access_log_lines"
           for smp in f.samples}
    assert got[(log_path, "written")] == 4 and got[(log_path, "dropped")] == 0
