"""Limits the sidecar keeps for filters, typed: token buckets shared by every worker, the
``jti`` replay cache (every worker, or every replica through a store), Envoy's rate limit
service. Filters get them from their ``FilterEnv``; the implementations live in
``sidecar.shared`` and ``sidecar.runtime.filter_env``.

Every synchronous call here is bounded work on memory (no I/O). The asynchronous ones talk to a
remote store or service; they never wait longer than their timeout and raise
``DependencyUnavailable`` when the remote cannot answer, so the caller applies its failure
policy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


class FailurePolicy(enum.Enum):
    FAIL_OPEN = "fail_open"        # the store cannot answer: let the request through
    FAIL_CLOSED = "fail_closed"    # the store cannot answer: refuse the request


class DependencyUnavailable(Exception):
    """A remote store or service could not answer in time (down, timed out, refused)."""


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """Envoy token bucket: holds up to max_tokens, gains tokens_per_fill every fill_interval."""
    max_tokens: int
    tokens_per_fill: int
    fill_interval_s: float


@dataclass(frozen=True, slots=True)
class BucketDecision:
    allowed: bool
    remaining: int          # whole tokens left after this request
    reset_s: int            # whole seconds until the next fill (x-ratelimit-reset)


Descriptor = tuple[tuple[str, str], ...]
"""Descriptor entries (key, value), in order; () names a config's default bucket."""


class TokenBuckets(Protocol):
    """Token buckets keyed by ``scope`` (one filter config) and ``descriptor``. ``pinned``
    buckets (a config's own) are never evicted; dynamic ones (one per header value, client
    address...) may be. Shared by every worker of the sidecar."""

    def consume(self, scope: str, descriptor: Descriptor, spec: BucketSpec, now: float,
                pinned: bool = True) -> BucketDecision: ...

    def release(self, scope: str) -> None: ...


class RemoteBuckets(Protocol):
    """Token buckets in a store shared by several sidecars (Redis), with the failure policy
    the filter chose. ``consume_all`` takes one token from each bucket in order and stops at
    the first empty one, in one round trip; it returns that bucket's index and decision (or
    the last bucket's when all allowed). Never raises: when the store cannot answer in time
    the index is -1 and the decision is the policy's (allowed for fail_open)."""

    async def consume_all(self, buckets: tuple[tuple[str, BucketSpec], ...]
                          ) -> tuple[int, BucketDecision]: ...


class ReplayVerdict(enum.Enum):
    FRESH = "fresh"          # first use: recorded until its expiry
    REPLAYED = "replayed"    # seen before and not yet expired: refuse
    FULL = "full"            # no room without forgetting a live jti: refuse (fail closed)
    UNAVAILABLE = "store_unavailable"   # the cross-replica store could not answer: refuse


class ReplayCache(Protocol):
    """jti values seen until their expiry; insert-if-absent is one atomic step."""

    def check_and_add(self, namespace: str, jti: str, until: float,
                      now: float) -> ReplayVerdict: ...


class RemoteReplayCache(Protocol):
    """The same, in a store shared by several sidecars. Never raises: a store that cannot
    answer gives UNAVAILABLE (fail closed) or the sidecar's own verdict (fail open)."""

    async def check_and_add(self, namespace: str, jti: str, until: float,
                            now: float) -> ReplayVerdict: ...


# ---- Envoy's rate limit service --------------------------------------------------------------

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
    # the service's ``dynamic_metadata`` (a JSON-like mapping), None when absent
    dynamic_metadata: dict[str, object] | None = field(default=None, compare=False)

    @property
    def over_limit(self) -> bool:
        return self.code is RlsCode.OVER_LIMIT


class RateLimitService(Protocol):
    """``envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`` on one cluster. Raises
    ``DependencyUnavailable`` when the service cannot answer within ``timeout_s``."""

    async def should_rate_limit(self, domain: str, descriptors: tuple[Descriptor, ...],
                                hits_addend: int, timeout_s: float) -> RlsResponse: ...

    def count_failure_mode(self, denied: bool) -> None:
        """Count one request answered by ``failure_mode_deny`` (metrics, /ready)."""
        ...


def x_ratelimit_headers(resp: RlsResponse) -> tuple[tuple[str, str], ...]:
    """Envoy's DRAFT_VERSION_03 headers for ``resp`` (none when no status has a limit): the
    descriptor with the least remaining quota gives ``x-ratelimit-remaining`` and
    ``x-ratelimit-reset``; ``x-ratelimit-limit`` is its limit followed by every descriptor's
    quota policy (``, 10;w=1;name="per-ip"``)."""
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


# ---- route rate limit policies (Envoy route/virtual host ``rate_limits``) --------------------
# The config model (``sidecar.config.route``) holds them; ``descriptor_for`` turns one into a
# descriptor for one request (the global rate limit filter calls it).

class HeaderTest(Protocol):
    """A header condition (``sidecar.config.matchers.HeaderMatcher``)."""

    @property
    def name(self) -> str: ...

    def matches_value(self, value: str | None) -> bool:
        """Whether the header's value (None: absent) satisfies the condition."""
        ...


@dataclass(frozen=True, slots=True)
class RequestHeadersAction:
    header_name: str                        # lower case; ":path", ":authority"... allowed
    descriptor_key: str
    skip_if_absent: bool = False


@dataclass(frozen=True, slots=True)
class RemoteAddressAction:
    """("remote_address", the trusted client address: XFF-derived when configured)."""


@dataclass(frozen=True, slots=True)
class GenericKeyAction:
    descriptor_value: str
    descriptor_key: str = "generic_key"


@dataclass(frozen=True, slots=True)
class DestinationClusterAction:
    """("destination_cluster", the cluster the request is routed to)."""


@dataclass(frozen=True, slots=True)
class SourceClusterAction:
    """("source_cluster", the local service cluster: the bootstrap's ``node.cluster``)."""


@dataclass(frozen=True, slots=True)
class HeaderValueMatchAction:
    descriptor_value: str
    headers: tuple[HeaderTest, ...]
    descriptor_key: str = "header_match"
    expect_match: bool = True               # False: the entry when the headers do NOT match


@dataclass(frozen=True, slots=True)
class JwtClaimAction:
    """Envoy's ``metadata`` action on ``envoy.filters.http.jwt_authn`` metadata: a claim of a
    verified JWT (``provider`` "" : any provider's)."""
    descriptor_key: str
    provider: str
    claim: tuple[str, ...]
    default_value: str = ""                 # when the claim is absent ("" : no default)
    skip_if_absent: bool = False


RateLimitAction = (RequestHeadersAction | RemoteAddressAction | GenericKeyAction
                   | DestinationClusterAction | SourceClusterAction | HeaderValueMatchAction
                   | JwtClaimAction)


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """One entry of a route's (or virtual host's) ``rate_limits``: makes one descriptor."""
    actions: tuple[RateLimitAction, ...]
    stage: int = 0                          # applies to rate limit filters of this stage


@dataclass(frozen=True, slots=True)
class RouteRateLimits:
    """The rate limit policies a route carries: its own, its virtual host's, and whether the
    route asks for both (``include_vh_rate_limits``)."""
    route: tuple[RateLimitPolicy, ...] = ()
    vhost: tuple[RateLimitPolicy, ...] = ()
    include_vhost: bool = False


NO_RATE_LIMITS = RouteRateLimits()


class DescriptorSource(Protocol):
    """What actions read of one request."""

    def header(self, name: str) -> str | None:
        """The first value of a request header (pseudo-headers ``:path``, ``:method``,
        ``:authority``, ``:scheme`` included), or None."""
        ...

    def joined_header(self, name: str) -> str | None:
        """Every value of a request header joined with "," (what header matchers see)."""
        ...

    @property
    def remote_address(self) -> str: ...

    def jwt_claim(self, provider: str, claim: tuple[str, ...]) -> str | None:
        """A string or integer claim of a verified JWT (``jwt_authn``), or None."""
        ...

    @property
    def destination_cluster(self) -> str: ...

    @property
    def source_cluster(self) -> str: ...


def descriptor_for(policy: RateLimitPolicy, src: DescriptorSource) -> Descriptor | None:
    """Envoy's ``RateLimitPolicyEntry::populateDescriptors``: every action must produce its
    entry or the whole descriptor is dropped (None); a ``request_headers`` action with
    ``skip_if_absent`` only drops its own entry. No entries at all: None."""
    entries: list[tuple[str, str]] = []
    for a in policy.actions:
        if isinstance(a, RequestHeadersAction):
            v = src.header(a.header_name)
            if v is None:
                if a.skip_if_absent:
                    continue
                return None
            entries.append((a.descriptor_key, v))
        elif isinstance(a, GenericKeyAction):
            entries.append((a.descriptor_key, a.descriptor_value))
        elif isinstance(a, RemoteAddressAction):
            ip = src.remote_address
            if not ip:
                return None
            entries.append(("remote_address", ip))
        elif isinstance(a, HeaderValueMatchAction):
            if all(t.matches_value(src.joined_header(t.name)) for t in a.headers) \
                    != a.expect_match:
                return None
            entries.append((a.descriptor_key, a.descriptor_value))
        elif isinstance(a, JwtClaimAction):
            v = src.jwt_claim(a.provider, a.claim)
            if v is None:
                if a.default_value:
                    v = a.default_value
                elif a.skip_if_absent:
                    continue
                else:
                    return None
            entries.append((a.descriptor_key, v))
        elif isinstance(a, DestinationClusterAction):
            entries.append(("destination_cluster", src.destination_cluster))
        else:
            entries.append(("source_cluster", src.source_cluster))
    return tuple(entries) if entries else None


# ---- token bucket arithmetic (Envoy's whole fills), shared by every bucket implementation -----

def refill(tokens: float, last: float, spec: BucketSpec, now: float) -> tuple[float, float]:
    """Whole fills since ``last`` (Envoy refills in steps, not continuously)."""
    interval = spec.fill_interval_s
    elapsed = now - last
    if elapsed >= interval:
        n = int(elapsed // interval)
        tokens = min(float(spec.max_tokens), tokens + n * spec.tokens_per_fill)
        last += n * interval
    elif elapsed < 0:            # a torn or future stamp (see sidecar/shared/segment.py): restart
        last = now
    return tokens, last


def reset_after(last: float, spec: BucketSpec, now: float) -> int:
    left = spec.fill_interval_s - (now - last)
    return max(0, int(-(-left // 1)))      # ceil without importing math on the hot path
