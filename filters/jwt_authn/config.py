"""jwt_authn config: providers, requirements, rules (frozen; parsed once by ``envoy`` or
``native``). Providers are hashable by content, so their runtime state (token cache, JWKS)
survives a reload that does not change them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from filters.jwt_authn.keys import KeySet
from filters.request_headers import RequestTest
from sidecar.config.matchers import StringMatcher
from sidecar.core.limits import FailurePolicy
from sidecar.core.message import Request

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
PER_ROUTE_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig"
METADATA_NAMESPACE = "envoy.filters.http.jwt_authn"   # dynamic metadata, as Envoy names it

DEFAULT_MAX_TOKEN_BYTES = 8192
DEFAULT_CACHE_SIZE = 1000
DEFAULT_CACHE_MAX_TOKEN_BYTES = 8192
MAX_JWKS_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class TokenLocation:
    kind: str            # header | query | cookie
    name: str            # header names lower-case
    prefix: str = ""     # header value prefix, e.g. "Bearer "


DEFAULT_LOCATIONS = (TokenLocation("header", "authorization", "Bearer "),
                     TokenLocation("query", "access_token"))


@dataclass(frozen=True, slots=True)
class RemoteJwks:
    uri: str
    # Envoy http_uri.cluster: the fetch goes through this cluster (its balancer, breakers,
    # TLS) with the URI's path and Host. Empty (native jwks_uri): fetched from the URI directly.
    cluster: str = ""
    cluster_path: str = field(default="", compare=False)   # where ``cluster`` was configured
    timeout_s: float = 1.0
    cache_duration_s: float = 600.0          # Envoy's default: 10 minutes
    fetch_at_start: bool = False             # Envoy async_fetch
    failed_refetch_s: float = 1.0            # after a failed fetch, wait before the next one
    kid_refetch_interval_s: float = 30.0     # unknown kid: at most one fetch per interval
    num_retries: int = 0
    retry_base_s: float = 0.1
    retry_max_s: float = 1.0


ClaimPath = tuple[str, ...]
"""A claim name split on dots: ``realm.roles`` -> ("realm", "roles")."""


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    issuer: str = ""
    audiences: tuple[str, ...] = ()
    locations: tuple[TokenLocation, ...] = DEFAULT_LOCATIONS
    local_digest: str = ""                                    # identity of the local keys
    local_keys: KeySet | None = field(default=None, compare=False, hash=False, repr=False)
    remote: RemoteJwks | None = None
    forward: bool = False
    forward_payload_header: str = ""
    pad_forward_payload_header: bool = False
    claim_to_headers: tuple[tuple[str, ClaimPath], ...] = ()
    payload_in_metadata: str = ""
    header_in_metadata: str = ""
    failed_status_in_metadata: str = ""
    clock_skew_s: float = 60.0
    max_lifetime_s: float | None = None
    require_expiration: bool = False
    required_claims: tuple[str, ...] = ()
    subjects: StringMatcher | None = None
    cache_size: int = DEFAULT_CACHE_SIZE
    cache_max_token_bytes: int = DEFAULT_CACHE_MAX_TOKEN_BYTES
    jti_replay: bool = False
    # the replay cache: the sidecar's (shared_state.replay_entries), or a Redis store's
    replay_store: str = ""
    replay_on_store_error: FailurePolicy = FailurePolicy.FAIL_CLOSED
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES


# ---- requirements (validated against the providers at parse time) ---------------------------

@dataclass(frozen=True, slots=True)
class ReqProvider:
    name: str
    audiences: tuple[str, ...] | None = None     # None: the provider's own


@dataclass(frozen=True, slots=True)
class ReqAny:
    children: tuple[Requirement, ...]


@dataclass(frozen=True, slots=True)
class ReqAll:
    children: tuple[Requirement, ...]


@dataclass(frozen=True, slots=True)
class ReqAllowMissing:
    pass


@dataclass(frozen=True, slots=True)
class ReqAllowMissingOrFailed:
    pass


Requirement = ReqProvider | ReqAny | ReqAll | ReqAllowMissing | ReqAllowMissingOrFailed


# ---- rules ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, eq=False)
class RuleMatch:
    kind: str                     # prefix | path | regex | path_separated_prefix
    value: str = ""
    regex: re.Pattern[str] | None = None
    case_sensitive: bool = True
    headers: tuple[RequestTest, ...] = ()

    def matches(self, req: Request) -> bool:
        p = req.path
        if not self.case_sensitive:
            p = p.lower()
        k = self.kind
        if k == "prefix":
            ok = p.startswith(self.value)
        elif k == "path":
            ok = p == self.value
        elif self.regex is not None:
            ok = self.regex.fullmatch(p) is not None
        else:
            v = self.value
            ok = p == v or p.startswith(v + "/")
        if ok and self.headers:
            return all(h(req) for h in self.headers)
        return ok


@dataclass(frozen=True, slots=True, eq=False)
class Rule:
    match: RuleMatch
    requires: Requirement | None          # None: the rule lets the request through


@dataclass(frozen=True, slots=True, eq=False)
class JwtAuthnConfig:
    providers: tuple[Provider, ...]
    rules: tuple[Rule, ...] = ()
    requirement_map: tuple[tuple[str, Requirement], ...] = ()
    bypass_cors_preflight: bool = False
    strip_failure_response: bool = False
    stat_prefix: str = ""

    def provider(self, name: str) -> Provider | None:
        for p in self.providers:
            if p.name == name:
                return p
        return None


@dataclass(frozen=True, slots=True)
class PerRoute:
    disabled: bool = False
    requirement_name: str = ""
    requires: Requirement | None = None     # native only: an inline requirement
