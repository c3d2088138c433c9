"""Unary gRPC calls through a cluster: Envoy's ``envoy_grpc`` client (ext_authz, the rate
limit service).

A call is one HTTP/2 request sent by ``Cluster.send``, so the cluster's balancer, circuit
breakers, health and outlier state, TLS and counters apply exactly as to routed traffic:
``POST /<service>/<method>`` with ``content-type: application/grpc``, ``te: trailers``,
``grpc-timeout`` and ``x-envoy-expected-rq-timeout-ms`` (the call's timeout), the service's
``initial_metadata``, Envoy's ``x-envoy-internal`` / ``x-forwarded-for`` (unless
``skip_envoy_headers``) and one length-prefixed message. The answer is a ``GrpcReply``: the status from the trailers, or from
the headers of a trailers-only answer; what Envoy's client gives a call that failed on the way
(no cluster or healthy endpoint, connect failure, breaker overflow: UNAVAILABLE; the timeout:
DEADLINE_EXCEEDED; a non-200 answer: ``httpToGrpcStatus``; a reset or an unreadable answer:
INTERNAL).
"""

from __future__ import annotations

import asyncio

from multidict import MultiDict

from sidecar.cluster.cluster import ClusterState
from sidecar.core.body import BodyTooLarge, Headers
from sidecar.core.context import RequestContext
from sidecar.core.errors import UpstreamError
from sidecar.core.grpc import (
    GRPC_DEADLINE_EXCEEDED,
    GRPC_INTERNAL,
    GRPC_UNAVAILABLE,
    GRPC_UNKNOWN,
    EnvoyGrpcService,
    GrpcReply,
    grpc_frame,
    grpc_message_decode,
    grpc_timeout,
    grpc_unframe,
    http_to_grpc_status,
)
from sidecar.core.message import Request

# flags of failures that happened before the service could answer (Envoy: UNAVAILABLE)
_UNAVAILABLE_FLAGS = frozenset(("UF", "UH", "UO", "NC", "URX"))


def not_http2(state: ClusterState) -> str | None:
    """Why ``state``'s cluster cannot carry gRPC, or None (not configured yet, or HTTP/2)."""
    c = state.current
    if c is None or c.protocol == "http2":
        return None
    return (f"cluster {state.name!r} speaks {c.protocol}; a gRPC service needs an HTTP/2 "
            "cluster (typed_extension_protocol_options explicit http2_protocol_options, "
            "native protocol: http2)")


class ClusterGrpcClient:
    """``sidecar.core.filter.GrpcClient`` over one cluster (bound by name: a cluster added
    later, by CDS, is used once it exists)."""

    __slots__ = ("_service", "_state", "_path_cache", "_base_headers")

    def __init__(self, service: EnvoyGrpcService, state: ClusterState):
        self._service = service
        self._state = state
        self._path_cache: dict[str, str] = {}
        h: list[tuple[str, str]] = [("host", service.authority or service.cluster),
                                    ("content-type", "application/grpc"), ("te", "trailers")]
        if not service.skip_envoy_headers:
            # Envoy's async client marks its own requests internal (its local address as XFF)
            h += [("x-envoy-internal", "true"), ("x-forwarded-for", "127.0.0.1")]
        h += list(service.initial_metadata)
        self._base_headers = tuple(h)

    @property
    def service(self) -> EnvoyGrpcService:
        return self._service

    async def unary(self, method: str, message: bytes, timeout_s: float,
                    metadata: tuple[tuple[str, str], ...] = ()) -> GrpcReply:
        state = self._state
        why = not_http2(state)
        if why is not None:              # a CDS update turned the cluster into HTTP/1.1
            return GrpcReply(GRPC_UNAVAILABLE, why)
        path = self._path_cache.get(method)
        if path is None:
            path = self._path_cache[method] = "/" + method.lstrip("/")
        h: Headers = MultiDict(self._base_headers)
        h["grpc-timeout"] = grpc_timeout(timeout_s)
        # Envoy's router announces the timeout it applies (skip_envoy_headers keeps it)
        h["x-envoy-expected-rq-timeout-ms"] = str(int(timeout_s * 1000))
        for k, v in metadata:
            h.add(k, v)
        loop = asyncio.get_running_loop()
        ctx = RequestContext(f"grpc:{state.name}", None, 0.0)
        ctx.deadline = ctx.attempt_deadline = loop.time() + timeout_s
        req = Request("POST", path, "", h, grpc_frame(message), ctx, version="2")
        resp = None
        try:
            async with asyncio.timeout(timeout_s):
                resp = await state.send(req)
                if resp.status != 200:
                    return GrpcReply(http_to_grpc_status(resp.status),
                                     f"upstream answered HTTP {resp.status}")
                status = resp.headers.get("grpc-status")
                if status is not None:              # trailers-only
                    return _reply(status, resp.headers.get("grpc-message", ""), b"")
                body = await resp.read_body(self._service.max_receive_bytes + 5)
                trailers = resp.trailers
        except TimeoutError:
            return GrpcReply(GRPC_DEADLINE_EXCEEDED, "deadline exceeded")
        except UpstreamError as e:
            if e.flag == "UT":
                return GrpcReply(GRPC_DEADLINE_EXCEEDED, e.reason)
            code = GRPC_UNAVAILABLE if e.flag in _UNAVAILABLE_FLAGS else GRPC_INTERNAL
            return GrpcReply(code, e.reason)
        except BodyTooLarge:
            return GrpcReply(GRPC_INTERNAL, "response message larger than "
                             f"max_receive_message_length ({self._service.max_receive_bytes})")
        finally:
            if resp is not None and not isinstance(resp.body, bytes):
                resp.discard()               # not read to its end: reset the stream
        if trailers is None or "grpc-status" not in trailers:
            return GrpcReply(GRPC_UNKNOWN, "no grpc-status in the response")
        return _reply(trailers["grpc-status"], trailers.get("grpc-message", ""), body)


def _reply(status: str, message: str, body: bytes) -> GrpcReply:
    if not status.isdigit():
        return GrpcReply(GRPC_UNKNOWN, f"bad grpc-status {status[:20]!r}")
    code = int(status)
    if code != 0:
        return GrpcReply(code, grpc_message_decode(message))
    payload = grpc_unframe(body)
    if payload is None:
        return GrpcReply(GRPC_INTERNAL, "the response is not one uncompressed gRPC message")
    return GrpcReply(0, "", payload)
