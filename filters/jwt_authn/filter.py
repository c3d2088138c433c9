"""The jwt_authn filter and its building: state kept across reloads (provider runtimes with
their token caches, JWKS stores, replay caches), requirements compiled per route.

Failures answer as Envoy: ``401`` (``403`` for an audience mismatch) with
``www-authenticate: Bearer realm="<scheme>://<host><path>"`` (plus ``, error="invalid_token"``
unless the token was missing), body = Envoy's status text, response code details
``jwt_authn_access_denied{<text>}``. Envoy 1.40 sets no response flag for these; we record the
local flag ``JWT`` so denials show in access logs and per-flag counters (docs/security.md).
"""

from __future__ import annotations

from multidict import MultiDict

from filters.jwt_authn.checks import Check, Memo, ProviderCheck, compile_requirement
from filters.jwt_authn.config import (
    METADATA_NAMESPACE,
    JwtAuthnConfig,
    PerRoute,
    Provider,
    RemoteJwks,
    RuleMatch,
)
from filters.jwt_authn.jwks import (
    ClusterSource,
    DirectSource,
    JwksSource,
    KeyStore,
    LocalJwks,
    RemoteJwksStore,
)
from filters.jwt_authn.replay import ReplayCheck
from filters.jwt_authn.status import MISSING, Status
from filters.jwt_authn.verify import ProviderRuntime
from sidecar.config.errors import ConfigError
from sidecar.core.body import Headers
from sidecar.core.context import RouteInfo
from sidecar.core.filter import Filter, FilterEnv, Handler
from sidecar.core.limits import ReplayCache
from sidecar.core.message import Request, Response, local_reply
from sidecar.core.metrics import MetricFactory

FLAG = "JWT"
_MAX_PROVIDER_STATES = 256


class JwtAuthnFilter(Filter):
    def __init__(self, cfg: JwtAuthnConfig, rules: list[tuple[RuleMatch, Check | None]] | None,
                 fixed: Check | None, strip: tuple[str, ...], metrics: MetricFactory):
        self.rules = rules            # [(match, check or None)] when no per-route requirement
        self.fixed = fixed            # the per-route requirement's check
        self.strip = strip
        self.bypass_cors = cfg.bypass_cors_preflight
        self.strip_failure = cfg.strip_failure_response
        self.failed_status_key = {p.name: p.failed_status_in_metadata for p in cfg.providers
                                  if p.failed_status_in_metadata}
        fam = metrics.counter("sidecar_jwt_authn_requests_total",
                              "Requests seen by jwt_authn by outcome", ("stat_prefix", "outcome"))
        sp = cfg.stat_prefix
        self._allowed = fam.labels(sp, "allowed")
        self._denied = fam.labels(sp, "denied")
        self._cors = fam.labels(sp, "cors_preflight_bypassed")

    async def __call__(self, req: Request, next: Handler) -> Response:
        h = req.headers
        for name in self.strip:          # a client never gets to set our output headers
            if name in h:
                h.popall(name)
        if self.bypass_cors and req.method == "OPTIONS" and "origin" in h \
                and "access-control-request-method" in h:
            self._cors.inc()
            return await next(req)
        check = self.fixed
        if check is None:
            for m, c in self.rules or ():
                if m.matches(req):
                    check = c
                    break
            if check is None:
                return await next(req)
        st = await check.check(req, None if check.__class__ is ProviderCheck else Memo())
        if st is None:
            self._allowed.inc()
            return await next(req)
        self._denied.inc()
        return self._reject(req, st)

    def _reject(self, req: Request, st: Status) -> Response:
        ctx = req.ctx
        ctx.response_code_details = st.details
        if self.failed_status_key:
            for key in self.failed_status_key.values():
                ctx.metadata.setdefault(METADATA_NAMESPACE, {})[key] = {
                    "code": st.code, "message": st.message}
        if self.strip_failure:
            resp = local_reply(ctx, st.code, "", FLAG, MultiDict())
            resp.headers.popall("content-type", None)
            return resp
        host = req.headers.get("host", "")
        scheme = "https" if ctx.tls else "http"
        realm = _quote(f"{scheme}://{host}{req.path[:2048]}")
        www = f'Bearer realm="{realm}"'
        if st is not MISSING:
            www += ', error="invalid_token"'
        headers: Headers = MultiDict({"www-authenticate": www})
        return local_reply(ctx, st.code, st.message, FLAG, headers)


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


# ---- state kept across reloads -----------------------------------------------------------------

class JwtState:
    """Per-provider runtimes (token caches), JWKS stores; the replay cache is the sidecar's
    (``FilterEnv.replay_cache``), so it outlives reloads and is shared by every worker."""

    __slots__ = ("providers", "jwks", "replay", "metrics")

    def __init__(self, metrics: MetricFactory, replay: ReplayCache):
        self.metrics = metrics
        self.providers: dict[Provider, ProviderRuntime] = {}
        self.jwks: dict[tuple[str, RemoteJwks], RemoteJwksStore] = {}
        self.replay = replay


def new_state(env: FilterEnv) -> JwtState:
    return JwtState(env.metrics, env.replay_cache())


def close_state(state: JwtState) -> None:
    """Cancel in-flight JWKS fetches (at process shutdown)."""
    for store in state.jwks.values():
        store.close()


def jwks_source(remote: RemoteJwks, env: FilterEnv) -> JwksSource:
    """Where the remote JWKS comes from: the named cluster (which must exist, else the config
    is refused), or the URI itself (native ``jwks_uri``)."""
    if not remote.cluster:
        return DirectSource(remote)
    try:
        client = env.upstream(remote.cluster)
    except KeyError:
        raise ConfigError(remote.cluster_path or "jwt_authn.remote_jwks.http_uri.cluster",
                          f"no cluster named {remote.cluster!r} (the remote JWKS is fetched "
                          "through it)") from None
    return ClusterSource(client, remote)


def provider_runtime(p: Provider, st: JwtState, env: FilterEnv) -> ProviderRuntime:
    """Shared by every route and kept across reloads while the provider config is unchanged
    (so its token cache and JWKS survive); a changed provider gets fresh caches."""
    source = jwks_source(p.remote, env) if p.remote is not None else None
    prts = st.providers
    prt = prts.get(p)
    if prt is not None:
        prts[p] = prts.pop(p)            # LRU touch
        if source is not None and isinstance(prt.jwks, RemoteJwksStore):
            prt.jwks.source = source     # this config's cluster client
        if prt.replay is not None and p.replay_store:
            prt.replay.remote = env.replay_store(p.replay_store, p.replay_on_store_error)
        return prt
    jwks: KeyStore
    if p.remote is not None and source is not None:
        jkey = (p.name, p.remote)
        store = st.jwks.get(jkey)
        if store is None:
            store = st.jwks[jkey] = RemoteJwksStore(p.remote, p.name, st.metrics, source)
        else:
            store.source = source
        if p.remote.fetch_at_start and store.keys is None:
            store.start_fetch()
        jwks = store
    else:
        assert p.local_keys is not None      # parsers give every provider keys or a remote
        jwks = LocalJwks(p.local_keys)
    replay = None
    if p.jti_replay:
        remote = None
        if p.replay_store:
            try:
                remote = env.replay_store(p.replay_store, p.replay_on_store_error)
            except KeyError:
                raise ConfigError(f"jwt_authn.providers.{p.name}.replay_protection.store",
                                  f"no store named {p.replay_store!r} in stores:") from None
        # by issuer: a reload (or a renamed provider) must not allow replays
        replay = ReplayCheck(p.issuer or p.name, st.replay, remote)
    prt = ProviderRuntime(p, jwks, replay, st.metrics)
    prts[p] = prt
    while len(prts) > _MAX_PROVIDER_STATES:
        del prts[next(iter(prts))]
    return prt


def build(config: JwtAuthnConfig, per_route: PerRoute | None, state: JwtState,
          env: FilterEnv, route: RouteInfo) -> JwtAuthnFilter | None:
    if per_route is not None and per_route.disabled:
        return None
    prts = {p.name: provider_runtime(p, state, env) for p in config.providers}
    strip = tuple(dict.fromkeys(h for prt in prts.values() for h in prt.output_headers))
    rname = route.name or "?"
    fixed = None
    rules = None
    if per_route is not None:
        req = per_route.requires
        if per_route.requirement_name:
            req = dict(config.requirement_map).get(per_route.requirement_name)
            if req is None:
                raise ConfigError(f"route {rname}: jwt_authn.requirement_name",
                                  f"not in requirement_map: {per_route.requirement_name!r}")
        if req is None:
            raise ConfigError(f"route {rname}: jwt_authn", "needs a requirement")
        fixed = compile_requirement(req, prts, f"route {rname}: jwt_authn.requires")
    else:
        rules = [(r.match, compile_requirement(r.requires, prts, "jwt_authn.rules")
                  if r.requires is not None else None) for r in config.rules]
        if not any(c is not None for _, c in rules) and not strip:
            return None                  # nothing to verify or strip on this route
    return JwtAuthnFilter(config, rules, fixed, strip, state.metrics)
