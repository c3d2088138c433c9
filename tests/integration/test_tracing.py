"""Tracing: W3C / B3 extraction and propagation, sampling, spans per attempt; checked with the
SDK's in-memory exporter and end to end with a real OTLP/HTTP receiver on loopback that
decodes the protobuf (opentelemetry-proto)."""

import socket
import time

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.trace import SpanKind, StatusCode

from examples.tracing.otlp_receiver import Receiver
from sidecar.config.listener import TracingConfig
from sidecar.observability.tracing import (
    ListenerTracer,
    Tracing,
    extract,
    otlp_traces_url,
    parse_b3_multi,
    parse_b3_single,
    parse_traceparent,
)
from sidecar.testing import Upstream, free_port, native_config, running_proxy
from tests.paths import REPO

TID = "0af7651916cd43dd8448eb211c80319c"
PSID = "b7ad6b7169203331"


def tracing_cfg(exporter="memory", sample=100.0, endpoint=""):
    return {"exporter": exporter, "sample_percent": sample, "endpoint": endpoint,
            "service_name": "test-sidecar"}


def flaky_handler():
    """503 on the first attempt of each request, 200 on the next (a retried request)."""
    async def handler(request):
        if request.headers.get("x-envoy-attempt-count", "1") == "1" and request.path.startswith("/flaky"):
            return web.Response(status=503, text="try again")
        return web.json_response({"ok": True})
    return handler


def retry_route(name="r", prefix="/"):
    return {"name": name, "match": {"prefix": prefix}, "cluster": "svc",
            "retry": {"retry_on": "5xx,connect-failure", "retries": 2, "backoff": "1ms"}}


# ---- parsing ---------------------------------------------------------------------------------

def test_traceparent_parsing():
    assert parse_traceparent(f"00-{TID}-{PSID}-01") == (int(TID, 16), int(PSID, 16), True)
    assert parse_traceparent(f"00-{TID}-{PSID}-00")[2] is False
    # a future version may append fields; version 00 may not
    assert parse_traceparent(f"01-{TID}-{PSID}-01-extra") is not None
    for bad in (f"00-{TID}-{PSID}-01-extra", f"ff-{TID}-{PSID}-01", f"00-{'0' * 32}-{PSID}-01",
                f"00-{TID}-{'0' * 16}-01", f"00-{TID.upper()}-{PSID}-01", f"00-{TID[:-1]}-{PSID}-01",
                "garbage", f"00-{TID}-{PSID}"):
        assert parse_traceparent(bad) is None, bad


def test_b3_parsing():
    inc = parse_b3_single(f"{TID}-{PSID}-1-05e3ac9a4f6e3b90")
    assert (inc.trace_id, inc.span_id, inc.sampled) == (int(TID, 16), int(PSID, 16), True)
    short = parse_b3_single(f"{TID[16:]}-{PSID}")
    assert short.b3_short and short.sampled is None           # deferred decision
    assert parse_b3_single("0").sampled is False and parse_b3_single("0").trace_id == 0
    assert parse_b3_single(f"{TID}-{PSID}-d").debug
    assert parse_b3_single("zz-yy") is None and parse_b3_single(f"{TID}-{PSID}-1-a-b") is None
    from multidict import MultiDict
    multi = parse_b3_multi(MultiDict({"x-b3-traceid": TID, "x-b3-spanid": PSID, "x-b3-sampled": "0"}))
    assert multi.trace_id == int(TID, 16) and multi.sampled is False
    assert parse_b3_multi(MultiDict({"x-b3-traceid": TID})) is None   # no span id
    # W3C wins over B3 when both are present
    both = extract(MultiDict({"traceparent": f"00-{TID}-{PSID}-01", "b3": "0"}))
    assert both.sampled is True and both.fmt == 1


def test_otlp_url():
    assert otlp_traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert otlp_traces_url("collector:4318/") == "http://collector:4318/v1/traces"
    assert otlp_traces_url("https://x/otlp/v1/traces") == "https://x/otlp/v1/traces"


def test_parent_based_ratio_sampling_decision():
    from multidict import MultiDict

    class L:
        name = "l"
    t = Tracing(TracingConfig(sample_percent=25.0, exporter="memory"))
    lt = ListenerTracer(t, L())
    n = sum(lt.decide(MultiDict())[0] for _ in range(8000))
    assert 1700 < n < 2300                                   # 25 % of new traces
    assert lt.decide(MultiDict({"traceparent": f"00-{TID}-{PSID}-01"}))[0]   # sampled parent
    never = ListenerTracer(Tracing(TracingConfig(sample_percent=0.0, exporter="memory")), L())
    assert never.decide(MultiDict({"traceparent": f"00-{TID}-{PSID}-01"}))[0]
    assert not never.decide(MultiDict())[0]
    always = ListenerTracer(Tracing(TracingConfig(sample_percent=100.0, exporter="memory")), L())
    assert not always.decide(MultiDict({"traceparent": f"00-{TID}-{PSID}-00"}))[0]   # unsampled parent
    assert not always.decide(MultiDict({"b3": "0"}))[0]
    assert always.decide(MultiDict({"b3": f"{TID}-{PSID}"}))[0]        # deferred: our ratio


# ---- in-memory exporter --------------------------------------------------------------------

async def test_retried_request_spans_in_memory():
    async with Upstream(flaky_handler()) as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[retry_route("orders", "/flaky")],
                            tracing=tracing_cfg())
        async with running_proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                async with s.get(p.url("/flaky/1"), headers={"traceparent": f"00-{TID}-{PSID}-01",
                                                              "tracestate": "vendor=abc",
                                                              "x-request-id": "req-42"}) as r:
                    assert r.status == 200
            spans = p.app._tracing.memory.get_finished_spans()
    server = [x for x in spans if x.kind == SpanKind.SERVER]
    clients = sorted((x for x in spans if x.kind == SpanKind.CLIENT), key=lambda x: x.start_time)
    assert len(server) == 1 and len(clients) == 2
    sv = server[0]
    assert f"{sv.context.trace_id:032x}" == TID
    assert f"{sv.parent.span_id:016x}" == PSID and sv.parent.is_remote
    a = sv.attributes
    assert a["http.request.method"] == "GET" and a["http.route"] == "/flaky*"
    assert a["http.response.status_code"] == 200 and a["url.path"] == "/flaky/1"
    assert a["server.address"] == "127.0.0.1" and a["client.address"] == "127.0.0.1"
    assert a["sidecar.retry_count"] == 1 and a["sidecar.route.name"] == "orders"
    assert a["guid:x-request-id"] == "req-42"
    assert tuple(a["http.request.header.x-request-id"]) == ("req-42",)
    assert sv.resource.attributes["service.name"] == "test-sidecar"
    for c in clients:
        assert c.parent.span_id == sv.context.span_id and c.context.trace_id == sv.context.trace_id
        assert c.attributes["server.port"] == up.port and c.attributes["sidecar.upstream.cluster"] == "svc"
    assert clients[0].attributes["http.response.status_code"] == 503
    assert clients[0].status.status_code == StatusCode.ERROR
    assert "http.request.resend_count" not in clients[0].attributes
    assert clients[1].attributes["http.request.resend_count"] == 1
    assert clients[1].attributes["http.response.status_code"] == 200
    # each attempt told the upstream its own client span as the parent, tracestate passed on
    seen = [rq.headers for rq in up.requests]
    assert [h["traceparent"] for h in seen] == [f"00-{TID}-{c.context.span_id:016x}-01" for c in clients]
    assert all(h["tracestate"] == "vendor=abc" for h in seen)
    assert sv.start_time <= clients[0].start_time and clients[1].end_time <= sv.end_time


async def test_connect_failure_attempt_span_carries_the_flag():
    async with Upstream() as up:
        dead = f"127.0.0.1:{free_port()}"
        cfg = native_config(clusters={"svc": [dead, up.address]}, routes=[retry_route()],
                            tracing=tracing_cfg())
        async with running_proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                for i in range(4):    # some of them try the dead endpoint first
                    async with s.get(p.url(f"/{i}")) as r:
                        assert r.status == 200
            spans = p.app._tracing.memory.get_finished_spans()
    failed = [x for x in spans if x.kind == SpanKind.CLIENT and x.attributes.get("sidecar.response_flags") == "UF"]
    assert len(failed) >= 1
    for f in failed:
        assert f.attributes["error.type"] == "UF" and f.status.status_code == StatusCode.ERROR
        assert "http.response.status_code" not in f.attributes
    servers = [x for x in spans if x.kind == SpanKind.SERVER]
    assert sum(x.attributes["sidecar.retry_count"] for x in servers) == len(failed)
    for sv in servers:    # a retried request: the UF attempt, then a 200 attempt, both its children
        kids = sorted((x for x in spans if x.parent is not None and x.parent.span_id == sv.context.span_id),
                      key=lambda x: x.start_time)
        assert len(kids) == 1 + sv.attributes["sidecar.retry_count"]
        assert kids[-1].attributes["http.response.status_code"] == 200


async def test_unsampled_requests_make_no_spans_and_pass_context_through():
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[retry_route()],
                            tracing=tracing_cfg(sample=0.0))
        async with running_proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                async with s.get(p.url("/a")) as r:
                    assert r.status == 200
                unsampled = f"00-{TID}-{PSID}-00"
                async with s.get(p.url("/b"), headers={"traceparent": unsampled}) as r:
                    assert r.status == 200
                async with s.get(p.url("/c"), headers={"traceparent": f"00-{TID}-{PSID}-01"}) as r:
                    assert r.status == 200    # a sampled parent is followed even at 0 %
            spans = p.app._tracing.memory.get_finished_spans()
    # a new trace we did not sample: the decision goes downstream (flags 00) so later hops agree
    new_tp = up.requests[0].headers["traceparent"]
    parsed = parse_traceparent(new_tp)
    assert parsed is not None and parsed[2] is False and new_tp.endswith("-00")
    assert up.requests[1].headers["traceparent"] == unsampled          # untouched
    assert {x.kind for x in spans} == {SpanKind.SERVER, SpanKind.CLIENT} and len(spans) == 2
    assert all(f"{x.context.trace_id:032x}" == TID for x in spans)


async def test_b3_propagation_single_and_multi():
    async with Upstream() as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[retry_route()], tracing=tracing_cfg())
        async with running_proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                async with s.get(p.url("/multi"), headers={"X-B3-TraceId": TID, "X-B3-SpanId": PSID,
                                                            "X-B3-Sampled": "1"}) as r:
                    assert r.status == 200
                short = TID[16:]
                async with s.get(p.url("/single"), headers={"b3": f"{short}-{PSID}-1"}) as r:
                    assert r.status == 200
            spans = p.app._tracing.memory.get_finished_spans()
    servers = {x.attributes["url.path"]: x for x in spans if x.kind == SpanKind.SERVER}
    clients = {x.parent.span_id: x for x in spans if x.kind == SpanKind.CLIENT}
    h = {k.lower(): v for k, v in up.requests[0].headers.items()}
    sv = servers["/multi"]
    cl = clients[sv.context.span_id]
    assert f"{sv.context.trace_id:032x}" == TID and f"{sv.parent.span_id:016x}" == PSID
    assert h["x-b3-traceid"] == TID and h["x-b3-spanid"] == f"{cl.context.span_id:016x}"
    assert h["x-b3-parentspanid"] == f"{sv.context.span_id:016x}" and h["x-b3-sampled"] == "1"
    assert h["traceparent"] == f"00-{TID}-{cl.context.span_id:016x}-01"
    h2 = {k.lower(): v for k, v in up.requests[1].headers.items()}
    sv2 = servers["/single"]
    cl2 = clients[sv2.context.span_id]
    assert f"{sv2.context.trace_id:032x}" == "0" * 16 + short
    # a 64-bit B3 trace id is answered in the same width
    assert h2["b3"] == f"{short}-{cl2.context.span_id:016x}-1-{sv2.context.span_id:016x}"


def test_console_exporter_writes_spans(capfd):
    t = Tracing(TracingConfig(sample_percent=100.0, exporter="console", service_name="console-test"))
    span = t.tracer.start_span("hello")
    span.end()
    assert t.force_flush(5.0)
    t.shutdown()
    out = capfd.readouterr().out
    assert '"name": "hello"' in out and "console-test" in out


# ---- end to end over OTLP/HTTP ----------------------------------------------------------------

async def test_otlp_http_export_to_a_real_receiver():
    async with Receiver(port=0) as rx, Upstream(flaky_handler()) as up:
        cfg = native_config(clusters={"svc": [up.address]}, routes=[retry_route("orders", "/flaky")],
                            tracing=tracing_cfg("otlp_http", endpoint=rx.url))
        async with running_proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                async with s.get(p.url("/flaky/7"), headers={"traceparent": f"00-{TID}-{PSID}-01"}) as r:
                    assert r.status == 200
                    rid = {k.lower(): v for k, v in up.requests[0].headers.items()}["x-request-id"]
                async with s.get(p.url("/flaky/8")) as r:      # a new trace
                    assert r.status == 200
            ok = await rx.wait_for(lambda sp: len(sp) >= 6, timeout=10)
            assert ok, f"only {len(rx.spans)} spans arrived"
    spans = [s for s in rx.spans if s.trace_id == TID]
    assert len(spans) == 3
    server = next(s for s in spans if s.kind == "SERVER")
    clients = sorted((s for s in spans if s.kind == "CLIENT"), key=lambda s: s.start_ns)
    assert server.parent_span_id == PSID and server.service == "test-sidecar"
    assert server.attributes["guid:x-request-id"] == rid
    assert server.attributes["sidecar.retry_count"] == 1
    assert [c.parent_span_id for c in clients] == [server.span_id] * 2
    assert [c.attributes["http.response.status_code"] for c in clients] == [503, 200]
    assert clients[0].status == "ERROR" and clients[1].attributes["http.request.resend_count"] == 1
    assert clients[0].start_ns >= server.start_ns and clients[1].end_ns <= server.end_ns
    other = [s for s in rx.spans if s.trace_id != TID]
    assert len(other) == 3 and len({s.trace_id for s in other}) == 1
    root = next(s for s in other if s.kind == "SERVER")
    assert root.parent_span_id == ""
    assert all(s.parent_span_id == root.span_id for s in other if s.kind == "CLIENT")


@pytest.mark.parametrize("collector", ["refused", "black_hole"])
async def test_a_down_collector_never_slows_requests(collector):
    hole = None
    if collector == "refused":
        endpoint = f"http://127.0.0.1:{free_port()}"
    else:   # accepts connections (kernel backlog) and never answers
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        endpoint = f"http://127.0.0.1:{hole.getsockname()[1]}"
    try:
        async with Upstream() as up:
            cfg = native_config(clusters={"svc": [up.address]}, routes=[retry_route()],
                                tracing=tracing_cfg("otlp_http", endpoint=endpoint))
            async with running_proxy(cfg) as p:
                worst = 0.0
                t0 = time.perf_counter()
                async with aiohttp.ClientSession() as s:
                    for i in range(300):
                        t = time.perf_counter()
                        async with s.get(p.url(f"/{i}")) as r:
                            assert r.status == 200
                            await r.read()
                        worst = max(worst, time.perf_counter() - t)
                total = time.perf_counter() - t0
                closing = time.perf_counter()
            closed_in = time.perf_counter() - closing
    finally:
        if hole is not None:
            hole.close()
    assert worst < 0.5, f"slowest request {worst:.3f}s"
    assert total < 10
    assert closed_in < 5, f"shutdown took {closed_in:.1f}s"


def test_shadow_copy_gets_its_own_client_span():
    """A mirrored copy's client span is a child of the server span, marked as a shadow and
    named for the shadow cluster; its trace headers name that span."""
    from multidict import MultiDict

    from sidecar.core.context import RequestContext
    from sidecar.core.message import Request
    from sidecar.observability.tracing import TRACE_HEADERS, ShadowParent

    class Listener:
        name = "l"
    t = Tracing(TracingConfig(sample_percent=100.0, exporter="memory"))
    lt = t.for_listener(Listener())
    ctx = RequestContext("l", ("127.0.0.1", 5), time.perf_counter())
    req = Request("POST", "/orders", "", MultiDict({"host": "shop", "traceparent": f"00-{TID}-{PSID}-01"}), b"", ctx)
    lt.begin(req)
    copy = Request("POST", "/orders", "", MultiDict({"host": "shop-shadow"}), b"",
                   RequestContext("l", None, 0.0))
    span = ShadowParent(ctx.span, "canary").start_client(copy, "10.0.0.9:8080")
    assert copy.headers["traceparent"] == f"00-{TID}-{span.span_id:016x}-01"
    assert set(copy.headers) - {"host"} <= TRACE_HEADERS
    span.end(None, "UT")

    class Resp:
        status = 200
    ctx.span.finish(req, Resp(), 0.01)
    spans = {x.kind: x for x in t.memory.get_finished_spans()}
    sh, sv = spans[SpanKind.CLIENT], spans[SpanKind.SERVER]
    assert sh.parent.span_id == sv.context.span_id and sh.name == "POST canary (shadow)"
    assert sh.attributes["sidecar.shadow"] is True and sh.attributes["server.port"] == 8080
    assert sh.attributes["error.type"] == "UT" and sh.status.status_code == StatusCode.ERROR


def test_tracing_example_runs_in_one_command():
    """examples/tracing/run.py: receiver + backends + a real `sidecar run` process; retries and
    the shadow copy each show up as their own span in every trace."""
    import subprocess
    import sys
    root = str(REPO)
    r = subprocess.run([sys.executable, "examples/tracing/run.py", "--free-ports"], cwd=root,
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "received 12 spans" in out, out
    assert f"trace {TID}" not in out       # the example uses its own ids
    assert "trace 4bf92f3577b34da6a3ce929d0e0e4736  (continues the W3C caller's trace)" in out
    assert "trace 80f198ee56343ba864fe8b2a57d3eff7  (continues the B3 caller's trace)" in out
    assert out.count("resend=1") == 3 and out.count("(shadow)") == 3 and out.count("status=503") == 3


async def test_tracing_config_change_applies_on_reload(tmp_path):
    """A reload that changes `tracing:` swaps the tracer; the old one is shut down."""
    import yaml

    from sidecar.testing import Upstream, native_config, running_proxy

    async with Upstream() as up:
        base = native_config(clusters={"svc": [up.address]},
                             routes=[{"match": {"prefix": "/"}, "cluster": "svc"}])
        path = tmp_path / "sidecar.yaml"
        path.write_text(yaml.safe_dump(base))
        async with running_proxy(base, config_path=str(path)) as p:
            assert p.app._tracing is None
            lr = next(iter(p.app.store.listeners.values()))
            assert lr.hcm.tracer is None
            path.write_text(yaml.safe_dump({**base, "tracing": {"exporter": "memory",
                                                                 "sample_percent": 100}}))
            assert await p.app.reload("test")
            assert p.app._tracing is not None
            assert lr.hcm.tracer is not None
            old = p.app._tracing
            path.write_text(yaml.safe_dump(base))
            assert await p.app.reload("test")
            assert p.app._tracing is None and lr.hcm.tracer is None
            assert old is not None


async def test_envoy_format_hcm_tracing_exports_over_otlp_http():
    """Envoy's HCM `tracing` with the OpenTelemetry tracer (http_service) drives the same
    tracer: the same file Envoy 1.40 accepts (checked with `envoy --mode validate`)."""
    import shutil
    import subprocess

    import yaml

    async with Receiver(port=0) as rx, Upstream() as up:
        uhost, uport = up.address.split(":")

        def sa(port):
            return {"socket_address": {"address": "127.0.0.1", "port_value": port}}

        def static(name, port):
            return {"name": name, "type": "STATIC", "connect_timeout": "0.25s",
                    "load_assignment": {"cluster_name": name, "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": sa(port)}}]}]}}
        hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
               "stat_prefix": "l",
               "tracing": {"random_sampling": {"value": 100},
                           "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {
                               "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                               "service_name": "envoy-format",
                               "http_service": {"http_uri": {"uri": rx.url, "cluster": "otel",
                                                             "timeout": "0.25s"}}}}},
               "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
                   {"match": {"prefix": "/"}, "route": {"cluster": "svc"}}]}]},
               "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
        doc = {"admin": {"address": sa(0)},
               "static_resources": {
                   "listeners": [{"name": "l", "address": sa(0), "filter_chains": [{"filters": [
                       {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
                   "clusters": [static("svc", int(uport)), static("otel", rx.port)]}}
        if shutil.which("envoy"):
            import tempfile
            with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
                yaml.safe_dump(doc, f)
                f.flush()
                v = subprocess.run(["envoy", "--mode", "validate", "-c", f.name],
                                   capture_output=True, text=True)
                assert v.returncode == 0, v.stdout + v.stderr
        async with running_proxy(doc) as p:
            assert p.app.store.snapshot.tracing.exporter == "otlp_http"
            async with aiohttp.ClientSession() as s:
                async with s.get(p.url("/x"), headers={"traceparent": f"00-{TID}-{PSID}-01"}) as r:
                    assert r.status == 200
            assert await rx.wait_for(lambda sp: len(sp) >= 2, timeout=10)
    spans = [s for s in rx.spans if s.trace_id == TID]
    assert {s.kind for s in spans} == {"SERVER", "CLIENT"}
    assert all(s.service == "envoy-format" for s in spans)
