"""Distributed tracing with OpenTelemetry: one server span per downstream request, one client
span per upstream attempt (retries and shadow requests each get their own).

Cheap by construction:

* The sampling decision is made here, before the OpenTelemetry SDK is touched: a few header
  lookups and, for new traces, one random draw. An unsampled request creates no span, no
  object; its incoming trace context (W3C or B3) passes to the upstream untouched, so the
  trace continues through us. A new trace we decide not to record gets a ``traceparent`` with
  the sampled flag off, so the hops after us follow the same decision. Sampling is parent-based: a sampled (unsampled) parent
  is followed; a new trace (or a B3 parent that defers the decision) is sampled with
  probability ``sample_percent``.
* Sampled spans go to a ``BatchSpanProcessor`` whose worker thread exports them (OTLP/HTTP
  protobuf, or the console). A collector that is down only costs that thread its retries;
  when its queue is full, spans are dropped. Requests never wait for it.

Propagation: the incoming ``traceparent``/``tracestate`` (W3C), ``b3`` (B3 single) or
``x-b3-*`` (B3 multi) context is extracted, in that order. Each upstream attempt gets a
``traceparent`` naming its client span (and ``tracestate`` passed on); when the request came
in with B3, the B3 headers are rewritten in the same style too, so B3-only services keep
their traces.

The server span ends when the response has been written (``ListenerSnapshot.observe_end``),
so it covers streaming bodies and carries the final status and response flags.
"""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

from sidecar import __version__
from sidecar.core.metrics import NULL
from sidecar.observability.flags import flags_text

log = logging.getLogger("sidecar.tracing")

TRACE_HEADERS = frozenset(("traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid",
                           "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags"))
"""Headers that carry trace context: a copy of a request that gets its own span (a shadow)
must drop these and add ``ClientSpan.headers()`` instead."""

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_HEX = re.compile(r"[0-9a-f]+")
_W3C, _B3, _B3_MULTI = 1, 2, 3

EXPORT_TIMEOUT_S = 5.0          # one OTLP POST (with its retries) may take this long
SHUTDOWN_TIMEOUT_S = 2.0        # at exit, pending spans get this long to leave


# ---- extraction ---------------------------------------------------------------------------

class Incoming:
    """A parent context taken from request headers."""

    __slots__ = ("trace_id", "span_id", "sampled", "tracestate", "fmt", "b3_short", "debug")

    def __init__(self, trace_id: int, span_id: int, sampled: bool | None, tracestate: str,
                 fmt: int, b3_short: bool = False, debug: bool = False):
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled          # None: the parent defers the decision (B3)
        self.tracestate = tracestate
        self.fmt = fmt
        self.b3_short = b3_short        # a 64-bit B3 trace id: answer in the same width
        self.debug = debug


def parse_traceparent(value: str) -> tuple[int, int, bool] | None:
    """W3C trace-context ``traceparent`` -> (trace id, span id, sampled), None if invalid."""
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version = m.group(1)
    if version == "ff" or (version == "00" and m.group(5) is not None):
        return None
    trace_id = int(m.group(2), 16)
    span_id = int(m.group(3), 16)
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, bool(int(m.group(4), 16) & 1)


def _hex_id(v: str, lengths: tuple[int, ...]) -> int | None:
    v = v.strip().lower()
    if len(v) not in lengths or _HEX.fullmatch(v) is None:
        return None
    n = int(v, 16)
    return n or None


def _b3_sampled(v: str | None) -> tuple[bool | None, bool]:
    """B3 sampling state -> (sampled or None to defer, debug)."""
    if v is None:
        return None, False
    v = v.strip().lower()
    if v in ("1", "true"):
        return True, False
    if v == "d":
        return True, True
    if v in ("0", "false"):
        return False, False
    return None, False


def parse_b3_single(value: str) -> Incoming | None:
    """``b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]`` or just ``b3: {0|1|d}``.

    A sampling-only header ("0") yields an Incoming with trace id 0 (a decision, no parent)."""
    parts = value.strip().split("-")
    if len(parts) == 1:
        sampled, debug = _b3_sampled(parts[0])
        if sampled is None:
            return None
        return Incoming(0, 0, sampled, "", _B3, debug=debug)
    if len(parts) > 4:
        return None
    trace_id = _hex_id(parts[0], (16, 32))
    span_id = _hex_id(parts[1], (16,))
    if trace_id is None or span_id is None:
        return None
    sampled, debug = _b3_sampled(parts[2]) if len(parts) >= 3 else (None, False)
    return Incoming(trace_id, span_id, sampled, "", _B3, b3_short=len(parts[0].strip()) == 16,
                    debug=debug)


def parse_b3_multi(headers) -> Incoming | None:
    tid = headers.get("x-b3-traceid")
    flags = headers.get("x-b3-flags")
    sampled, debug = _b3_sampled(headers.get("x-b3-sampled"))
    if flags is not None and flags.strip() == "1":
        sampled, debug = True, True
    if tid is None:
        if sampled is None:
            return None
        return Incoming(0, 0, sampled, "", _B3_MULTI, debug=debug)
    trace_id = _hex_id(tid, (16, 32))
    sid = headers.get("x-b3-spanid")
    span_id = _hex_id(sid, (16,)) if sid is not None else None
    if trace_id is None or span_id is None:
        return None
    return Incoming(trace_id, span_id, sampled, "", _B3_MULTI, b3_short=len(tid.strip()) == 16,
                    debug=debug)


def extract(headers) -> Incoming | None:
    """The parent context of a request: W3C first, then B3 single, then B3 multi."""
    tp = headers.get("traceparent")
    if tp is not None:
        parsed = parse_traceparent(tp)
        if parsed is not None:
            ts = headers.getall("tracestate", ())
            return Incoming(parsed[0], parsed[1], parsed[2], ",".join(ts), _W3C)
    b3 = headers.get("b3")
    if b3 is not None:
        inc = parse_b3_single(b3)
        if inc is not None:
            return inc
    if "x-b3-traceid" in headers or "x-b3-sampled" in headers or "x-b3-flags" in headers:
        return parse_b3_multi(headers)
    return None


# ---- spans ----------------------------------------------------------------------------------

def _route_template(route) -> str:
    """A low-cardinality ``http.route`` from the route's match (never the request path)."""
    m = getattr(route, "match", None)
    if m is None:
        return ""
    if m.path is not None:
        return m.path
    if m.prefix is not None:
        return m.prefix if m.prefix.endswith("*") else m.prefix + "*"
    if m.path_separated_prefix is not None:
        return m.path_separated_prefix + "/*"
    if m.regex is not None:
        return m.regex.pattern
    return ""


def _split_host(value: str) -> tuple[str, int | None]:
    if not value:
        return "", None
    if value.startswith("["):
        end = value.find("]")
        host = value[1:end] if end > 0 else value
        rest = value[end + 1:] if end > 0 else ""
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
        if not host:
            host, port = value, ""
    return host, int(port) if port.isdigit() else None


class ServerSpan:
    """The sampled server span of one downstream request (``req.ctx.span``)."""

    __slots__ = ("otel", "tracer", "trace_id", "span_id", "incoming", "start_ns", "_ctx",
                 "_ended")

    def __init__(self, otel_span, tracer: "ListenerTracer", incoming: Incoming | None,
                 start_ns: int):
        self.otel = otel_span
        self.tracer = tracer
        sc = otel_span.get_span_context()
        self.trace_id = sc.trace_id
        self.span_id = sc.span_id
        self.incoming = incoming
        self.start_ns = start_ns
        self._ctx = None
        self._ended = False

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"

    @property
    def span_id_hex(self) -> str:
        return f"{self.span_id:016x}"

    def _context(self):
        c = self._ctx
        if c is None:
            c = self._ctx = set_span_in_context(self.otel)
        return c

    def start_client(self, req, host, attempt_no: int = 1, shadow: bool = False,
                     cluster: str | None = None) -> "ClientSpan":
        """A client span for one upstream attempt on ``host`` (an EndpointState or
        "host:port"); sets the propagation headers on ``req.headers``."""
        span = self.new_client(req.method, host, req.ctx.cluster if cluster is None else cluster,
                               req.path, attempt_no, shadow)
        span.inject(req.headers)
        return span

    def new_client(self, method: str, host, cluster: str, path: str = "", attempt_no: int = 1,
                   shadow: bool = False) -> "ClientSpan":
        if isinstance(host, str):
            address = host
        else:
            address = getattr(host, "address", "") or ""
        h, port = _split_host(address)
        attrs: dict[str, Any] = {"http.request.method": method, "sidecar.upstream.cluster": cluster}
        if h:
            attrs["server.address"] = h
            attrs["network.peer.address"] = h
        if port is not None:
            attrs["server.port"] = port
            attrs["network.peer.port"] = port
        if address:
            attrs["url.full"] = f"http://{address}{path}" if path else f"http://{address}"
        if attempt_no > 1:
            attrs["http.request.resend_count"] = attempt_no - 1
        if shadow:
            attrs["sidecar.shadow"] = True
        name = f"{method} {cluster}" + (" (shadow)" if shadow else "")
        otel = self.tracer.tracing.tracer.start_span(name, context=self._context(),
                                                     kind=SpanKind.CLIENT, attributes=attrs)
        return ClientSpan(otel, self)

    def finish(self, req, resp, duration: float) -> None:
        """End the server span (called once the response has been written)."""
        if self._ended:
            return
        self._ended = True
        ctx = req.ctx
        otel = self.otel
        status = resp.status
        attrs: dict[str, Any] = {"http.response.status_code": status,
                                 "sidecar.retry_count": ctx.attempts - 1 if ctx.attempts > 1 else 0}
        if ctx.flags:
            attrs["sidecar.response_flags"] = flags_text(ctx.flags)
        if ctx.cluster:
            attrs["sidecar.upstream.cluster"] = ctx.cluster
        if ctx.upstream_host:
            attrs["sidecar.upstream.address"] = ctx.upstream_host
        if ctx.bytes_sent:
            attrs["http.response.body.size"] = ctx.bytes_sent
        if ctx.bytes_received:
            attrs["http.request.body.size"] = ctx.bytes_received
        if status >= 500:
            attrs["error.type"] = str(status)
            otel.set_status(Status(StatusCode.ERROR))
        otel.set_attributes(attrs)
        otel.end(end_time=self.start_ns + int(duration * 1e9))


class ClientSpan:
    """One upstream attempt (or shadow request): ``end(status_or_None, flag_or_None)``."""

    __slots__ = ("otel", "parent", "span_id", "_ended")

    def __init__(self, otel_span, parent: ServerSpan):
        self.otel = otel_span
        self.parent = parent
        self.span_id = otel_span.get_span_context().span_id
        self._ended = False

    def headers(self) -> list[tuple[str, str]]:
        """The propagation headers naming this span as the upstream's parent."""
        p = self.parent
        inc = p.incoming
        tid = p.trace_id
        out = [("traceparent", f"00-{tid:032x}-{self.span_id:016x}-01")]
        if inc is not None:
            if inc.tracestate:
                out.append(("tracestate", inc.tracestate))
            if inc.fmt != _W3C:
                t = f"{tid & 0xFFFFFFFFFFFFFFFF:016x}" if inc.b3_short else f"{tid:032x}"
                s = f"{self.span_id:016x}"
                if inc.fmt == _B3:
                    out.append(("b3", f"{t}-{s}-{'d' if inc.debug else '1'}-{p.span_id:016x}"))
                else:
                    out += [("x-b3-traceid", t), ("x-b3-spanid", s),
                            ("x-b3-parentspanid", f"{p.span_id:016x}"), ("x-b3-sampled", "1")]
        return out

    def inject(self, headers) -> None:
        for k, v in self.headers():
            headers[k] = v

    def end(self, status: int | None, flag: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        otel = self.otel
        if status is not None:
            otel.set_attribute("http.response.status_code", status)
            if status >= 400:
                otel.set_attribute("error.type", str(status))
                otel.set_status(Status(StatusCode.ERROR))
        if flag:
            otel.set_attribute("sidecar.response_flags", flag)
            if status is None:
                otel.set_attribute("error.type", flag)
                otel.set_status(Status(StatusCode.ERROR, flag))
        otel.end()


class ShadowParent:
    """Stands for the server span in a shadow copy's context: the copy's client span is the
    server span's child, marked as a shadow, named for the shadow cluster."""

    __slots__ = ("parent", "cluster")

    def __init__(self, parent: ServerSpan, cluster: str):
        self.parent = parent
        self.cluster = cluster

    @property
    def trace_id_hex(self) -> str:
        return self.parent.trace_id_hex

    @property
    def span_id_hex(self) -> str:
        return self.parent.span_id_hex

    def start_client(self, req, host, attempt_no: int = 1) -> "ClientSpan":
        return self.parent.start_client(req, host, attempt_no, shadow=True, cluster=self.cluster)


# ---- per listener ---------------------------------------------------------------------------

class ListenerTracer:
    """The tracer of one listener under one config snapshot (``ListenerSnapshot.tracer``)."""

    __slots__ = ("tracing", "listener", "ratio", "_routes", "_rand", "_randbits")

    def __init__(self, tracing: "Tracing", listener_config):
        self.tracing = tracing
        self.listener = listener_config.name
        self.ratio = tracing.ratio
        self._routes: dict[Any, tuple[str, str]] = {}
        self._rand = random.random
        self._randbits = random.getrandbits

    def decide(self, headers) -> tuple[bool, Incoming | None]:
        """(sampled, parent context): the cheap part, no SDK involved."""
        inc = None
        if "traceparent" in headers or "b3" in headers or "x-b3-traceid" in headers \
                or "x-b3-sampled" in headers or "x-b3-flags" in headers:
            inc = extract(headers)
        if inc is not None and inc.sampled is not None:
            if inc.trace_id == 0:        # a B3 decision without ids: a new trace, decided
                return inc.sampled, None
            return inc.sampled, inc
        ratio = self.ratio
        sampled = ratio >= 1.0 or (ratio > 0.0 and self._rand() < ratio)
        return sampled, inc

    def begin(self, req) -> None:
        """Called by the route's observe layer: decide sampling, start the server span when
        sampled (``req.ctx.span``), or mark a new unsampled trace for the next hops."""
        headers = req.headers
        sampled, inc = self.decide(headers)
        if sampled:
            try:
                req.ctx.span = self._start(req, inc)
            except Exception:   # tracing must never fail a request
                log.exception("could not start a span")
        elif inc is None and "b3" not in headers:
            # a new trace we decided not to record: tell the next hops, so the whole trace
            # is consistently unsampled instead of each sidecar rolling its own dice
            rb = self._randbits
            headers["traceparent"] = f"00-{rb(128) or 1:032x}-{rb(64) or 1:016x}-00"

    def _start(self, req, inc: Incoming | None) -> ServerSpan:
        ctx = req.ctx
        route = ctx.route
        info = self._routes.get(route)
        if info is None:
            template = _route_template(route)
            info = self._routes[route] = (template, getattr(route, "name", "") or "")
        template, route_name = info
        headers = req.headers
        start_ns = time.time_ns() - int((time.perf_counter() - ctx.start) * 1e9)
        host, port = _split_host(req.authority)
        attrs: dict[str, Any] = {
            "http.request.method": req.method,
            "url.path": req.path,
            "url.scheme": "https" if ctx.tls else "http",
            "network.protocol.version": req.version,
            "sidecar.listener": self.listener,
        }
        if template:
            attrs["http.route"] = template
        if route_name:
            attrs["sidecar.route.name"] = route_name
        if host:
            attrs["server.address"] = host
        if port is not None:
            attrs["server.port"] = port
        peer = ctx.downstream_addr
        if peer:
            attrs["client.address"] = peer[0]
            attrs["network.peer.address"] = peer[0]
            attrs["network.peer.port"] = peer[1]
        ua = headers.get("user-agent")
        if ua:
            attrs["user_agent.original"] = ua
        rid = ctx.request_id
        if rid:
            attrs["guid:x-request-id"] = rid                 # Envoy's tag name
            attrs["http.request.header.x-request-id"] = (rid,)   # OTel semconv form
        parent_ctx = None
        if inc is not None:
            parent_ctx = self.tracing.parent_context(inc)
        name = f"{req.method} {template}" if template else req.method
        otel = self.tracing.tracer.start_span(name, context=parent_ctx, kind=SpanKind.SERVER,
                                              attributes=attrs, start_time=start_ns)
        return ServerSpan(otel, self, inc, start_ns)


# ---- process-wide ---------------------------------------------------------------------------

class _CountingExporter:
    """Wraps an exporter to count exported / failed spans (runs on the export thread)."""

    def __init__(self, inner, ok, failed):
        self.inner = inner
        self._ok = ok
        self._failed = failed

    def export(self, spans):
        # lazy, as the SDK above: loaded only when a tracer is configured
        from opentelemetry.sdk.trace.export import SpanExportResult
        try:
            r = self.inner.export(spans)
        except Exception:
            r = SpanExportResult.FAILURE
        (self._ok if r == SpanExportResult.SUCCESS else self._failed).inc(len(spans))
        return r

    def shutdown(self):
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        f = getattr(self.inner, "force_flush", None)
        return f(timeout_millis) if f is not None else True


def otlp_traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: a bare collector address gets ``/v1/traces``."""
    if not endpoint:
        return "http://127.0.0.1:4318/v1/traces"
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    u = urlsplit(endpoint)
    if u.path in ("", "/"):
        u = u._replace(path="/v1/traces")
    return urlunsplit(u)


class Tracing:
    """One per process: the OpenTelemetry provider, exporter and sampling ratio."""

    def __init__(self, config, metrics=None):
        # The OpenTelemetry SDK (and an exporter) load only when tracing is configured: a proxy
        # without tracing does not carry them in memory (the idle-RSS target).
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        self.config = config
        self.ratio = max(0.0, min(config.sample_percent, 100.0)) / 100.0
        self.exporter = None
        self.memory = None            # the InMemorySpanExporter (exporter: memory)
        ok = failed = NULL
        if metrics is not None and metrics.enabled:
            fam = metrics.counter("sidecar_tracing_spans_exported_total",
                                  "Spans handed to the trace exporter, by outcome", ("outcome",))
            ok, failed = fam.labels("success"), fam.labels("failure")
        resource = Resource.create({"service.name": config.service_name,
                                    "service.version": __version__})
        # sampling is decided before the SDK is called, so the SDK records what it is given
        self.provider = TracerProvider(resource=resource, sampler=ALWAYS_ON, shutdown_on_exit=False)
        kind = config.exporter
        if kind == "memory":
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
            self.memory = self.exporter = InMemorySpanExporter()
            self.processor = SimpleSpanProcessor(_CountingExporter(self.memory, ok, failed))
        else:
            if kind == "console":
                import sys

                from opentelemetry.sdk.trace.export import ConsoleSpanExporter
                self.exporter = ConsoleSpanExporter(service_name=config.service_name, out=sys.stdout)
            elif kind == "otlp_http":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
                self.exporter = OTLPSpanExporter(endpoint=otlp_traces_url(config.endpoint),
                                                 timeout=EXPORT_TIMEOUT_S)
            else:
                raise ValueError(f"unknown trace exporter {kind!r}")
            self.processor = BatchSpanProcessor(_CountingExporter(self.exporter, ok, failed),
                                                max_queue_size=4096, schedule_delay_millis=500,
                                                max_export_batch_size=512,
                                                export_timeout_millis=EXPORT_TIMEOUT_S * 1000)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("sidecar", __version__)
        self._closed = False

    def for_listener(self, listener_config) -> ListenerTracer:
        return ListenerTracer(self, listener_config)

    @staticmethod
    def parent_context(inc: Incoming):
        # lazy: the OpenTelemetry API is loaded only when a tracer is configured
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context
        from opentelemetry.trace.span import TraceState
        ts = None
        if inc.tracestate:
            try:
                ts = TraceState.from_header([inc.tracestate])
            except Exception:
                ts = None
        sc = SpanContext(inc.trace_id, inc.span_id, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED), trace_state=ts)
        return set_span_in_context(NonRecordingSpan(sc))

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Flush what is queued (bounded: a down collector cannot hold the exit up)."""
        if self._closed:
            return
        self._closed = True
        try:
            if hasattr(self.processor, "_batch_processor"):
                self.processor._batch_processor.shutdown(timeout_millis=int(timeout_s * 1000))
            else:
                self.processor.shutdown()
        except Exception:  # pragma: no cover
            log.debug("trace processor shutdown failed", exc_info=True)
