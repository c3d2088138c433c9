"""The RBAC filter: shadow engine (counted, never enforced), then the enforced engine."""

from __future__ import annotations

import logging

from multidict import MultiDict

from filters.rbac.config import METADATA_NAMESPACE, Engine, RbacConfig
from sidecar.core.context import RouteInfo
from sidecar.core.filter import Filter, FilterEnv, Handler
from sidecar.core.message import Request, Response, local_reply
from sidecar.core.metrics import CounterChild, MetricFactory

log = logging.getLogger("sidecar.filters.rbac")

DENIED_BODY = "RBAC: access denied"
# Envoy 1.40 logs no response flag for an RBAC denial (only response code details); this local
# flag makes denials visible in our access log and per-flag counters (see docs/security.md).
FLAG = "RBAC"


class _Counters:
    """Pre-bound metric children for one engine."""

    __slots__ = ("allowed", "denied", "policy")

    def __init__(self, metrics: MetricFactory, engine: Engine, mode: str, prefix: str):
        dec = metrics.counter("sidecar_rbac_decisions_total",
                              "RBAC decisions by mode (enforced|shadow) and result",
                              ("stat_prefix", "mode", "result"))
        pol = metrics.counter("sidecar_rbac_policy_matches_total",
                              "Requests matched by each RBAC policy",
                              ("stat_prefix", "mode", "policy"))
        self.allowed = dec.labels(prefix, mode, "allowed")
        self.denied = dec.labels(prefix, mode, "denied")
        self.policy: dict[str, CounterChild] = {
            p.name: pol.labels(prefix, mode, p.name) for p in engine.policies}


class RbacFilter(Filter):
    __slots__ = ("rules", "shadow", "_c", "_sc")

    def __init__(self, cfg: RbacConfig, metrics: MetricFactory):
        self.rules = cfg.rules
        self.shadow = cfg.shadow
        self._c = (_Counters(metrics, cfg.rules, "enforced", cfg.stat_prefix)
                   if cfg.rules is not None else None)
        self._sc = (_Counters(metrics, cfg.shadow, "shadow", cfg.shadow_stat_prefix)
                    if cfg.shadow is not None else None)

    async def __call__(self, req: Request, next: Handler) -> Response:
        shadow, sc = self.shadow, self._sc
        if shadow is not None and sc is not None:
            ok, name = shadow.evaluate(req)
            (sc.allowed if ok else sc.denied).inc()
            if name is not None:
                sc.policy[name].inc()
            info = req.ctx.metadata.setdefault(METADATA_NAMESPACE, {})
            info["shadow_engine_result"] = "allowed" if ok else "denied"
            if name is not None:
                info["shadow_effective_policy_id"] = name
        rules, c = self.rules, self._c
        if rules is not None and c is not None:
            ok, name = rules.evaluate(req)
            if name is not None:
                c.policy[name].inc()
                if rules.action == "LOG":
                    req.ctx.metadata.setdefault(METADATA_NAMESPACE, {})["log_policy_id"] = name
            if not ok:
                c.denied.inc()
                req.ctx.response_code_details = (
                    f"rbac_access_denied_matched_policy[{name or 'none'}]")
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("rbac denied %s %s (policy %s)", req.method, req.path, name)
                return local_reply(req.ctx, 403, DENIED_BODY, FLAG, MultiDict())
            c.allowed.inc()
        return await next(req)


def build(config: RbacConfig, per_route: RbacConfig | None, state: None, env: FilterEnv,
          route: RouteInfo) -> RbacFilter | None:
    cfg = per_route if per_route is not None else config
    if cfg.rules is None and cfg.shadow is None:
        return None
    return RbacFilter(cfg, env.metrics)
