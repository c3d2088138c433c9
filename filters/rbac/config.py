"""RBAC config: policies compiled to request tests, engines, the filter config.

Both parsers (``envoy``, ``native``) compile every permission and principal into one
``fn(req) -> bool`` (``RequestTest``, built from ``engine``), once per config; nothing is
parsed or looked up by name per request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from filters.rbac.engine import any_of
from filters.request_headers import RequestTest
from sidecar.config import wire as w
from sidecar.config.errors import ConfigError
from sidecar.core.message import Request

TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
PER_ROUTE_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
METADATA_NAMESPACE = "envoy.filters.http.rbac"   # dynamic metadata, as Envoy names it
JWT_FILTER = "envoy.filters.http.jwt_authn"      # whose metadata (verified payloads) we can read
ACTIONS = ("ALLOW", "DENY", "LOG")


@dataclass(frozen=True, slots=True, eq=False)
class Policy:
    name: str
    permission: RequestTest     # any of the permissions
    principal: RequestTest      # any of the principals

    def matches(self, req: Request) -> bool:
        return self.permission(req) and self.principal(req)


@dataclass(frozen=True, slots=True, eq=False)
class Engine:
    action: str                         # ALLOW | DENY | LOG
    policies: tuple[Policy, ...]

    def evaluate(self, req: Request) -> tuple[bool, str | None]:
        """(allowed, matched policy name or None)."""
        for p in self.policies:
            if p.matches(req):
                return self.action != "DENY", p.name
        return self.action != "ALLOW", None


@dataclass(frozen=True, slots=True, eq=False)
class RbacConfig:
    rules: Engine | None = None         # None (and no shadow): the filter is off
    shadow: Engine | None = None
    stat_prefix: str = ""
    shadow_stat_prefix: str = ""


TestParser = Callable[[object, str], RequestTest]


def each(d: dict[str, object], key: str, path: str, parse: TestParser) -> list[RequestTest]:
    """A non-empty list of permissions or principals."""
    kp = w.join(path, key)
    items = w.seq(d, key, path)
    if not items:
        raise ConfigError(kp, "needs at least one entry")
    return [parse(x, w.join(kp, i)) for i, x in enumerate(items)]


def policy(name: str, d: dict[str, object], path: str, permission: TestParser,
           principal: TestParser) -> Policy:
    """A policy matches when any of its permissions and any of its principals match."""
    return Policy(name=name, permission=any_of(each(d, "permissions", path, permission)),
                  principal=any_of(each(d, "principals", path, principal)))
