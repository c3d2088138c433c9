"""Client of Envoy's global rate limit service:
``envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`` over gRPC.

Types and the async stub come from ``envoy-data-plane`` (betterproto2 messages, grpclib
transport); this module turns them into frozen, typed results and keeps the service's health
(``HealthTracker``: bounded calls, fail fast while down, probe and recover). What to do when
the service cannot answer (``failure_mode_deny``) is the filter's decision: it gets
``Unavailable``.

``x_ratelimit_headers`` derives Envoy's ``enable_x_ratelimit_headers: DRAFT_VERSION_03``
headers from a response: the descriptor with the least remaining quota gives
``x-ratelimit-remaining`` and ``x-ratelimit-reset``; ``x-ratelimit-limit`` is its limit
followed by every descriptor's quota policy (``, 10;w=1;name="per-ip"``).
"""

from __future__ import annotations

import asyncio

from envoy_data_plane.envoy.extensions.common.ratelimit.v3 import (
    RateLimitDescriptor,
    RateLimitDescriptorEntry,
)
from envoy_data_plane.envoy.service.ratelimit.v3 import (
    RateLimitRequest,
    RateLimitResponse,
    RateLimitServiceAsyncStub,
)
from grpclib.client import Channel
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from sidecar.config.stores import DEFAULT_BACKOFF, Backoff
from sidecar.core.limits import (
    UNIT_SECONDS,
    Descriptor,
    RlsCode,
    RlsDescriptorStatus,
    RlsLimit,
    RlsResponse,
    RlsUnit,
    x_ratelimit_headers,
)
from sidecar.shared.health import DependencyStatus, HealthTracker

__all__ = ["RateLimitClient", "RlsCode", "RlsDescriptorStatus", "RlsLimit", "RlsResponse",
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


class RateLimitClient:
    """One rate limit service at ``host:port`` (h2c). Every call is bounded by
    ``timeout_s``; a failure raises ``Unavailable`` and marks the service down (then calls
    fail fast until the backoff allows a probe)."""

    def __init__(self, name: str, host: str, port: int, timeout_s: float,
                 backoff: Backoff = DEFAULT_BACKOFF, health: HealthTracker | None = None) -> None:
        self._channel = Channel(host, port)
        self._stub = RateLimitServiceAsyncStub(self._channel)
        self.timeout_s = timeout_s
        # one tracker may stand for a whole service (several endpoints of one cluster)
        self.health = health if health is not None else \
            HealthTracker(name, f"grpc://{host}:{port}", timeout_s, backoff)

    def status(self) -> DependencyStatus:
        return self.health.status()

    async def should_rate_limit(self, domain: str, descriptors: tuple[Descriptor, ...],
                                hits_addend: int = 0, timeout_s: float | None = None
                                ) -> RlsResponse:
        health = self.health
        timeout = self.timeout_s if timeout_s is None else timeout_s
        probe = health.begin()
        try:
            msg = await asyncio.wait_for(
                self._stub.should_rate_limit(to_request(domain, descriptors, hits_addend),
                                             timeout=timeout),
                timeout)
        except TimeoutError:
            raise health.failed(None, True) from None
        except GRPCError as e:
            raise health.failed(e, e.status.name == "DEADLINE_EXCEEDED") from None
        except (OSError, StreamTerminatedError, ProtocolError) as e:
            raise health.failed(e, False) from None
        finally:
            health.end(probe)
        health.succeeded()
        return from_response(msg)

    def close(self) -> None:
        self._channel.close()
