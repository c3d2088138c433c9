"""Client of Envoy's global rate limit service:
``envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`` over gRPC.

The messages come from ``envoy-data-plane`` (betterproto2); the call goes through the
service's cluster (``sidecar.core.filter.GrpcClient``). This module turns the messages into
frozen, typed results and records the service's health (``HealthTracker``). What to do when
the service cannot answer (``failure_mode_deny``) is the filter's decision: it gets
``Unavailable``.

``x_ratelimit_headers`` derives Envoy's ``enable_x_ratelimit_headers: DRAFT_VERSION_03``
headers from a response: the descriptor with the least remaining quota gives
``x-ratelimit-remaining`` and ``x-ratelimit-reset``; ``x-ratelimit-limit`` is its limit
followed by every descriptor's quota policy (``, 10;w=1;name="per-ip"``).
"""

from __future__ import annotations

from envoy_data_plane.envoy.extensions.common.ratelimit.v3 import (
    RateLimitDescriptor,
    RateLimitDescriptorEntry,
)
from envoy_data_plane.envoy.service.ratelimit.v3 import (
    RateLimitRequest,
    RateLimitResponse,
)

from sidecar.core.filter import GrpcClient
from sidecar.core.grpc import GRPC_DEADLINE_EXCEEDED
from sidecar.core.limits import (
    UNIT_SECONDS,
    Descriptor,
    FailurePolicy,
    RlsCode,
    RlsDescriptorStatus,
    RlsLimit,
    RlsResponse,
    RlsUnit,
    x_ratelimit_headers,
)
from sidecar.shared.health import DependencyStatus, HealthTracker

__all__ = ["GrpcRateLimitService", "RlsCode", "RlsDescriptorStatus", "RlsLimit", "RlsResponse",
           "RlsUnit", "UNIT_SECONDS", "from_response", "to_request", "x_ratelimit_headers"]


def to_request(domain: str, descriptors: tuple[Descriptor, ...], hits_addend: int = 0
               ) -> RateLimitRequest:
    return RateLimitRequest(
        domain=domain, hits_addend=hits_addend,
        descriptors=[RateLimitDescriptor(entries=[RateLimitDescriptorEntry(key=k, value=v)
                                                  for k, v in d]) for d in descriptors])


def from_response(msg: RateLimitResponse) -> RlsResponse:
    statuses = []
    for s in msg.statuses:
        limit = None
        if s.current_limit is not None:
            cl = s.current_limit
            limit = RlsLimit(cl.requests_per_unit, RlsUnit(int(cl.unit)), cl.name)
        reset = None
        if s.duration_until_reset is not None:
            reset = int(s.duration_until_reset.total_seconds())
        statuses.append(RlsDescriptorStatus(RlsCode(int(s.code)), limit, s.limit_remaining,
                                            reset))
    return RlsResponse(
        code=RlsCode(int(msg.overall_code)), statuses=tuple(statuses),
        response_headers_to_add=tuple((h.key.lower(), h.value)
                                      for h in msg.response_headers_to_add),
        request_headers_to_add=tuple((h.key.lower(), h.value)
                                     for h in msg.request_headers_to_add),
        raw_body=msg.raw_body,
        dynamic_metadata=msg.dynamic_metadata.to_dict() if msg.dynamic_metadata is not None
        else None)


METHOD = "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"


class GrpcRateLimitService:
    """``RateLimitService`` over a unary gRPC client (``sidecar.cluster.grpc``: through the
    service's cluster, as Envoy's ``envoy_grpc``). Every call is made (the cluster's health
    checks and outlier detection decide which endpoint, as in Envoy); a call that does not
    answer OK within ``timeout_s`` raises ``Unavailable``. ``health`` records the calls and
    the last error for ``/ready``, the metrics and the dashboard."""

    def __init__(self, client: GrpcClient, health: HealthTracker) -> None:
        self.client = client
        self.health = health

    async def should_rate_limit(self, domain: str, descriptors: tuple[Descriptor, ...],
                                hits_addend: int, timeout_s: float) -> RlsResponse:
        health = self.health
        health.timeout_s = timeout_s
        health.attempt()
        reply = await self.client.unary(
            METHOD, bytes(to_request(domain, descriptors, hits_addend)), timeout_s)
        if not reply.ok:
            raise health.failed(GrpcStatusError(reply.status, reply.message),
                                reply.status == GRPC_DEADLINE_EXCEEDED)
        try:
            answer = from_response(RateLimitResponse.parse(reply.payload))
        except Exception as e:     # noqa: BLE001 - any malformed message is the service's error
            raise health.failed(e, False) from None
        health.succeeded()
        return answer

    def count_failure_mode(self, denied: bool) -> None:
        self.health.count_policy(FailurePolicy.FAIL_CLOSED if denied else FailurePolicy.FAIL_OPEN)

    def status(self) -> DependencyStatus:
        return self.health.status()


class GrpcStatusError(Exception):
    """A call that ended with a gRPC status other than OK (its text is what /ready shows)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"grpc-status {status}: {message}" if message else f"grpc-status {status}")
        self.status = status
