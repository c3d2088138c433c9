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
import enum
from dataclasses import dataclass

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
from sidecar.shared.health import DependencyStatus, HealthTracker

Descriptor = tuple[tuple[str, str], ...]          # (key, value) entries, in order


class RlsCode(enum.IntEnum):
    UNKNOWN = 0
    OK = 1
    OVER_LIMIT = 2


class RlsUnit(enum.IntEnum):
    UNKNOWN = 0
    SECOND = 1
    MINUTE = 2
    HOUR = 3
    DAY = 4
    MONTH = 5
    YEAR = 6
    WEEK = 7


UNIT_SECONDS = {RlsUnit.SECOND: 1, RlsUnit.MINUTE: 60, RlsUnit.HOUR: 3600,
                RlsUnit.DAY: 86400, RlsUnit.WEEK: 7 * 86400, RlsUnit.MONTH: 30 * 86400,
                RlsUnit.YEAR: 365 * 86400}


@dataclass(frozen=True, slots=True)
class RlsLimit:
    requests_per_unit: int
    unit: RlsUnit
    name: str = ""

    @property
    def window_s(self) -> int:
        return UNIT_SECONDS.get(self.unit, 0)


@dataclass(frozen=True, slots=True)
class RlsDescriptorStatus:
    code: RlsCode
    limit: RlsLimit | None
    remaining: int
    reset_s: int | None          # duration_until_reset, whole seconds (None: not given)


@dataclass(frozen=True, slots=True)
class RlsResponse:
    code: RlsCode
    statuses: tuple[RlsDescriptorStatus, ...]
    response_headers_to_add: tuple[tuple[str, str], ...] = ()
    request_headers_to_add: tuple[tuple[str, str], ...] = ()
    raw_body: bytes = b""

    @property
    def over_limit(self) -> bool:
        return self.code is RlsCode.OVER_LIMIT


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
        raw_body=msg.raw_body)


def x_ratelimit_headers(resp: RlsResponse) -> tuple[tuple[str, str], ...]:
    """Envoy's DRAFT_VERSION_03 headers for ``resp`` (none when no status has a limit)."""
    least: RlsDescriptorStatus | None = None
    policy = []
    for s in resp.statuses:
        if s.limit is None:
            continue
        if least is None or s.remaining < least.remaining:
            least = s
        w = s.limit.window_s
        if w:
            item = f", {s.limit.requests_per_unit};w={w}"
            if s.limit.name:
                item += f';name="{s.limit.name}"'
            policy.append(item)
    if least is None or least.limit is None:
        return ()
    return (("x-ratelimit-limit", f"{least.limit.requests_per_unit}{''.join(policy)}"),
            ("x-ratelimit-remaining", str(least.remaining)),
            ("x-ratelimit-reset", str(least.reset_s or 0)))


class RateLimitClient:
    """One rate limit service at ``host:port`` (h2c). Every call is bounded by
    ``timeout_s``; a failure raises ``Unavailable`` and marks the service down (then calls
    fail fast until the backoff allows a probe)."""

    def __init__(self, name: str, host: str, port: int, timeout_s: float,
                 backoff: Backoff = DEFAULT_BACKOFF) -> None:
        self._channel = Channel(host, port)
        self._stub = RateLimitServiceAsyncStub(self._channel)
        self.timeout_s = timeout_s
        self.health = HealthTracker(name, f"grpc://{host}:{port}", timeout_s, backoff)

    def status(self) -> DependencyStatus:
        return self.health.status()

    async def should_rate_limit(self, domain: str, descriptors: tuple[Descriptor, ...],
                                hits_addend: int = 0) -> RlsResponse:
        health = self.health
        probe = health.begin()
        try:
            msg = await asyncio.wait_for(
                self._stub.should_rate_limit(to_request(domain, descriptors, hits_addend),
                                             timeout=self.timeout_s),
                self.timeout_s)
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
