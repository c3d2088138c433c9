"""A tiny OTLP/HTTP trace receiver: decodes the protobuf with opentelemetry-proto and prints
each span (or keeps them for a test). A stand-in for an OpenTelemetry Collector or Jaeger.

    python examples/tracing/otlp_receiver.py            # listens on 127.0.0.1:4318
    python examples/tracing/otlp_receiver.py --port 14318

Point the sidecar at it with ``tracing: {exporter: otlp_http, endpoint: http://127.0.0.1:4318}``.
Accepts ``POST /v1/traces`` with ``Content-Type: application/x-protobuf`` (gzip or not), as the
OTLP/HTTP spec says, and answers an empty ``ExportTraceServiceResponse``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def any_value(v: AnyValue):
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str          # "" for a root span
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict
    status: str
    service: str
    scope: str = ""

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def decode(body: bytes) -> list[Span]:
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        res = {kv.key: any_value(kv.value) for kv in rs.resource.attributes}
        service = res.get("service.name", "")
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(Span(
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(), name=s.name,
                    kind=KINDS.get(s.kind, str(s.kind)), start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano,
                    attributes={kv.key: any_value(kv.value) for kv in s.attributes},
                    status=STATUS.get(s.status.code, str(s.status.code)), service=service,
                    scope=ss.scope.name))
    return out


@dataclass
class Receiver:
    """The receiver as an object, for tests and the example runner."""
    host: str = "127.0.0.1"
    port: int = 4318
    on_spans: Callable[[list[Span]], None] | None = None
    spans: list[Span] = field(default_factory=list)
    requests: int = 0
    _runner: web.AppRunner | None = None
    _event: asyncio.Event | None = None

    async def _traces(self, request: web.Request) -> web.Response:
        ctype = request.headers.get("Content-Type", "")
        if "protobuf" not in ctype:
            return web.Response(status=415, text="only application/x-protobuf is supported")
        body = await request.read()
        enc = request.headers.get("Content-Encoding", "")
        if enc == "gzip":
            body = gzip.decompress(body)
        elif enc == "deflate":
            body = zlib.decompress(body)
        try:
            spans = decode(body)
        except Exception as e:  # a malformed payload is the sender's bug: say so
            return web.Response(status=400, text=f"cannot decode ExportTraceServiceRequest: {e}")
        self.requests += 1
        self.spans.extend(spans)
        if self.on_spans is not None:
            self.on_spans(spans)
        if self._event is not None:
            self._event.set()
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def start(self) -> "Receiver":
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._event = asyncio.Event()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def wait_for(self, predicate: Callable[[list[Span]], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate(all spans so far)`` holds."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not predicate(self.spans):
            remaining = end - loop.time()
            if remaining <= 0:
                return False
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), min(remaining, 0.2))
            except TimeoutError:
                pass
        return True

    async def __aenter__(self) -> "Receiver":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


def format_trace(spans: list[Span]) -> str:
    """One trace as an indented tree (children under their parent, by start time)."""
    by_parent: dict[str, list[Span]] = {}
    ids = {s.span_id for s in spans}
    for s in spans:
        key = s.parent_span_id if s.parent_span_id in ids else ""
        by_parent.setdefault(key, []).append(s)
    lines = []

    def walk(parent: str, depth: int) -> None:
        for s in sorted(by_parent.get(parent, []), key=lambda x: x.start_ns):
            a = s.attributes
            bits = [f"{s.kind.lower()}", f"{s.duration_ms:.2f} ms"]
            if "http.response.status_code" in a:
                bits.append(f"status={a['http.response.status_code']}")
            if "http.request.resend_count" in a:
                bits.append(f"resend={a['http.request.resend_count']}")
            if a.get("sidecar.response_flags"):
                bits.append(f"flags={a['sidecar.response_flags']}")
            if "server.address" in a and s.kind == "CLIENT":
                bits.append(f"peer={a['server.address']}:{a.get('server.port', '')}")
            if "guid:x-request-id" in a:
                bits.append(f"x-request-id={a['guid:x-request-id']}")
            if s.status == "ERROR":
                bits.append("ERROR")
            lines.append(f"{'  ' * depth}- {s.name} [{s.service}] " + " ".join(bits))
            walk(s.span_id, depth + 1)

    walk("", 1)
    return "\n".join(lines)


def print_spans(spans: list[Span]) -> None:
    by_trace: dict[str, list[Span]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s)
    for tid, ss in by_trace.items():
        print(f"trace {tid} ({len(ss)} span{'s' if len(ss) != 1 else ''})")
        print(format_trace(ss))
    sys.stdout.flush()


async def _main(host: str, port: int) -> None:
    r = Receiver(host, port, on_spans=print_spans)
    await r.start()
    print(f"OTLP/HTTP receiver on http://{host}:{r.port}/v1/traces (Ctrl-C to stop)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await r.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4318)
    args = p.parse_args(argv)
    try:
        asyncio.run(_main(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
