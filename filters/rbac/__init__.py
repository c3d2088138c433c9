"""Role-based access control: Envoy's ``envoy.filters.http.rbac``.

A policy matches when ANY of its permissions matches the request AND ANY of its principals
matches the caller. The engine's action decides what a match means:

* ``ALLOW``: the request passes only if some policy matches (no policies: everything denied);
* ``DENY``: the request is refused if some policy matches (no policies: everything passes);
* ``LOG``: never refuses; the matched policy is only recorded.

``shadow_rules`` are evaluated and counted but never enforced. A refusal is Envoy's local
reply: ``403`` with body ``RBAC: access denied`` and response code details
``rbac_access_denied_matched_policy[<policy>|none]``; Envoy sets no response flag, we record
the local flag ``RBAC``.

Modules: ``config`` (engines and policies), ``engine`` (the permission and principal tests
both formats compile to), ``envoy`` and ``native`` (the two parsers), ``filter``.
"""

from __future__ import annotations

from filters.rbac.config import PER_ROUTE_TYPE_URL, TYPE_URL, RbacConfig
from filters.rbac.envoy import from_envoy, per_route_from_envoy
from filters.rbac.filter import build
from filters.rbac.native import from_native, per_route_from_native
from sidecar.core.filter import FilterSpec, no_state

SPEC: FilterSpec[RbacConfig, RbacConfig, None] = FilterSpec(
    name="envoy.filters.http.rbac",
    short="rbac",
    type_url=TYPE_URL,
    from_envoy=from_envoy,
    from_native=from_native,
    new_state=no_state,
    build=build,
    per_route_type_url=PER_ROUTE_TYPE_URL,
    per_route_from_envoy=per_route_from_envoy,
    per_route_from_native=per_route_from_native,
)

__all__ = ["SPEC"]
