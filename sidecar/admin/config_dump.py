"""JSON views of the running state for the admin server: /config_dump and /clusters."""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            if f.name == "source":
                continue
            out[f.name] = to_jsonable(getattr(obj, f.name))
        return out
    if isinstance(obj, re.Pattern):
        return obj.pattern
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(x) for x in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(to_jsonable(x) for x in obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def config_dump(app) -> dict:
    snap = app.store.snapshot
    out = {
        "version": snap.version if snap else None,
        "applied_at": app.store.applied_at,
        "source_format": snap.source_format if snap else None,
        "updates": {"accepted": app.reloads_ok, "rejected": app.reloads_failed,
                    "last_error": app.last_reload_error},
        "listeners": to_jsonable(snap.listeners) if snap else [],
        "clusters": to_jsonable(snap.clusters) if snap else [],
        "tracing": to_jsonable(snap.tracing) if snap else None,
        "admin": to_jsonable(snap.admin) if snap else None,
    }
    cp = app.control_plane
    if cp is not None and hasattr(cp, "dump"):
        out["control_plane"] = cp.dump()
    return out


def clusters_view(app) -> dict:
    now = time.monotonic()
    out = []
    for cs in sorted(app.clusters.clusters(), key=lambda c: c.name):
        name = cs.name
        hosts = []
        for h in cs.hosts:
            flags = []
            if not h.hc_healthy:
                flags.append("/failed_active_hc")
            if h.ejected_until > now:
                flags.append("/failed_outlier_check")
            hosts.append({
                "address": h.address, "hostname": h.endpoint.hostname, "weight": h.endpoint.weight,
                "healthy": h.available, "health_flags": "".join(flags) or "healthy",
                "ejected": h.ejected_until > now, "ejections": h.ejections,
                "ejected_for_s": round(max(0.0, h.ejected_until - now), 3),
                "active_hc": h.last_hc or None,
                "rq_active": h.active_requests, "rq_total": h.rq_total, "rq_error": h.rq_error,
                "rq_timeout": h.rq_timeout, "cx_active": h.http_cx_active + h.cx_active, "cx_idle": len(h.pool.idle),
                "cx_connect_fail": h.cx_connect_fail, "ewma_ms": round(h.ewma * 1000, 3),
            })
        t = cs.config.circuit_breakers.default
        out.append({
            "name": name, "type": cs.config.type, "lb_policy": cs.config.lb.policy,
            "warm": cs.warm,
            "rq_active": cs.state.breakers.active_requests,
            "rq_pending": cs.state.breakers.pending_requests,
            "retries_active": cs.state.breakers.active_retries,
            "overflow": cs.state.breakers.overflow,
            "circuit_breakers": {"max_connections": t.max_connections,
                                 "max_pending_requests": t.max_pending_requests,
                                 "max_requests": t.max_requests, "max_retries": t.max_retries,
                                 "open": cs.state.breakers.active_requests >= t.max_requests},
            "hosts": hosts,
        })
    return {"clusters": out}
