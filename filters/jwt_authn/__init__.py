"""JWT authentication: Envoy's ``envoy.filters.http.jwt_authn``.

What a request goes through (cheapest first; the first failure answers, see docs/security.md):

1. strip client-sent copies of every header this filter produces (payload and claim headers);
2. CORS preflight bypass (when configured); pick the requirement: the per-route one, else the
   first rule whose match fits the path (no rule, or a rule without ``requires``: pass through);
3. per provider: extract tokens (header with prefix, query parameter, cookie), size limit;
4. the token checks of ``verify`` (cache, structure, claims, keys, signature, replay);
5. outputs: payloads for later filters (``ctx.jwt_payloads``), metadata, forwarded headers.

Modules, one concern each: ``status`` (outcomes), ``keys`` (key parsing; the algorithm comes
from the key), ``config`` (frozen config), ``envoy`` and ``native`` (the two parsers, with
``parsing`` for what they share), ``jwks`` (local and remote key stores: fetch through the
named cluster, refresh), ``extract`` (token locations), ``verify`` (token checks),
``replay`` (the ``jti`` cache), ``checks`` (requirements), ``filter`` (the filter, its state
and building).

No token or secret is ever logged: log lines name the provider and the outcome only.
"""

from __future__ import annotations

from filters.jwt_authn.config import PER_ROUTE_TYPE_URL, TYPE_URL, JwtAuthnConfig, PerRoute
from filters.jwt_authn.envoy import from_envoy, per_route_from_envoy
from filters.jwt_authn.filter import JwtState, build, close_state, new_state
from filters.jwt_authn.native import from_native, per_route_from_native
from sidecar.core.filter import FilterSpec

SPEC: FilterSpec[JwtAuthnConfig, PerRoute, JwtState] = FilterSpec(
    name="envoy.filters.http.jwt_authn",
    short="jwt_authn",
    type_url=TYPE_URL,
    from_envoy=from_envoy,
    from_native=from_native,
    new_state=new_state,
    build=build,
    per_route_type_url=PER_ROUTE_TYPE_URL,
    per_route_from_envoy=per_route_from_envoy,
    per_route_from_native=per_route_from_native,
    close_state=close_state,
)

__all__ = ["SPEC"]
