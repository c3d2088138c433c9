"""Active HTTP health-check config (cluster ``health_checks``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str = "/healthz"
    host: str = ""
    interval_s: float = 5.0
    interval_jitter_s: float = 0.0
    timeout_s: float = 1.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 3
    expected_statuses: tuple[tuple[int, int], ...] = ((200, 201),)   # [start, end) ranges


def _statuses(v, path):
    from sidecar import wire as w
    from sidecar.errors import ConfigError
    out = []
    for i, r in enumerate(v):
        rp = w.join(path, i)
        if isinstance(r, int):
            out.append((r, r + 1))
            continue
        w.check_keys(r, ("start", "end"), rp)
        s, e = w.integer(r, "start", rp, lo=100, hi=599), w.integer(r, "end", rp, lo=101, hi=600)
        if e <= s:
            raise ConfigError(rp, "end must be greater than start")
        out.append((s, e))
    return tuple(out)


def health_check_from_envoy(d: dict, path: str) -> HealthCheck:
    from sidecar import wire as w
    from sidecar.errors import ConfigError
    w.check_keys(d, ("timeout", "interval", "interval_jitter", "healthy_threshold",
                     "unhealthy_threshold", "http_health_check", "no_traffic_interval",
                     "unhealthy_interval", "healthy_edge_interval", "unhealthy_edge_interval",
                     "initial_jitter"), path)
    if "http_health_check" not in d:
        raise ConfigError(path, "only http_health_check is supported")
    hp = w.join(path, "http_health_check")
    h = w.check_keys(d["http_health_check"], ("path", "host", "expected_statuses", "codec_client_type"), hp)
    return HealthCheck(
        path=w.string(h, "path", hp, nonempty=True), host=w.string(h, "host", hp, ""),
        interval_s=w.duration(d, "interval", path), timeout_s=w.duration(d, "timeout", path),
        interval_jitter_s=w.duration(d, "interval_jitter", path, 0.0),
        healthy_threshold=w.integer(d, "healthy_threshold", path, lo=1),
        unhealthy_threshold=w.integer(d, "unhealthy_threshold", path, lo=1),
        expected_statuses=_statuses(h["expected_statuses"], w.join(hp, "expected_statuses"))
        if "expected_statuses" in h else ((200, 201),),
    )


def health_check_from_native(d: dict, path: str) -> HealthCheck:
    from sidecar import wire as w
    w.check_keys(d, ("path", "host", "interval", "jitter", "timeout", "healthy_threshold",
                     "unhealthy_threshold", "expected_statuses"), path)
    return HealthCheck(
        path=w.string(d, "path", path, "/healthz"), host=w.string(d, "host", path, ""),
        interval_s=w.duration(d, "interval", path, 5.0),
        interval_jitter_s=w.duration(d, "jitter", path, 0.0),
        timeout_s=w.duration(d, "timeout", path, 1.0),
        healthy_threshold=w.integer(d, "healthy_threshold", path, 1, lo=1),
        unhealthy_threshold=w.integer(d, "unhealthy_threshold", path, 3, lo=1),
        expected_statuses=_statuses(w.seq(d, "expected_statuses", path, [200]),
                                    w.join(path, "expected_statuses")),
    )
