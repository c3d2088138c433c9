"""Active HTTP health-check config (cluster ``health_checks``); the checker is
``sidecar.health_checker``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str = "/healthz"
    host: str = ""                       # Host header; "" = the cluster name (as Envoy)
    interval_s: float = 5.0
    interval_jitter_s: float = 0.0       # + uniform [0, jitter) on every interval
    interval_jitter_percent: float = 0.0  # + uniform [0, interval x percent / 100)
    initial_jitter_s: float = 0.0        # the first check waits uniform [0, initial_jitter)
    timeout_s: float = 1.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 3
    expected_statuses: tuple[tuple[int, int], ...] = ((200, 201),)   # [start, end) ranges
    # statuses that count toward unhealthy_threshold instead of failing the host at once
    retriable_statuses: tuple[tuple[int, int], ...] = ()
    unhealthy_interval_s: Optional[float] = None       # while unhealthy (default: interval)
    unhealthy_edge_interval_s: Optional[float] = None  # right after turning unhealthy
    healthy_edge_interval_s: Optional[float] = None    # right after turning healthy
    no_traffic_interval_s: Optional[float] = None      # until the cluster has seen traffic

    def status_ok(self, status: int) -> bool:
        for s, e in self.expected_statuses:
            if s <= status < e:
                return True
        return False

    def status_retriable(self, status: int) -> bool:
        for s, e in self.retriable_statuses:
            if s <= status < e:
                return True
        return False


def _statuses(v, path):
    from sidecar.config import wire as w
    from sidecar.config.errors import ConfigError
    if not isinstance(v, list):
        raise ConfigError(path, "must be a list of status codes or {start, end} ranges")
    out = []
    for i, r in enumerate(v):
        rp = w.join(path, i)
        if isinstance(r, int) and not isinstance(r, bool):
            if not 100 <= r <= 599:
                raise ConfigError(rp, "must be 100..599")
            out.append((r, r + 1))
            continue
        w.check_keys(r, ("start", "end"), rp)
        s, e = w.integer(r, "start", rp, lo=100, hi=599), w.integer(r, "end", rp, lo=101, hi=600)
        if e <= s:
            raise ConfigError(rp, "end must be greater than start (the range is [start, end))")
        out.append((s, e))
    return tuple(out)


def _positive(v: float, path: str) -> float:
    from sidecar.config.errors import ConfigError
    if v <= 0:
        raise ConfigError(path, "must be greater than zero")
    return v


def health_check_from_envoy(d: dict, path: str) -> HealthCheck:
    from sidecar.config import wire as w
    from sidecar.config.errors import ConfigError
    w.check_keys(d, ("timeout", "interval", "interval_jitter", "interval_jitter_percent",
                     "healthy_threshold", "unhealthy_threshold", "http_health_check",
                     "no_traffic_interval", "unhealthy_interval", "healthy_edge_interval",
                     "unhealthy_edge_interval", "initial_jitter", "reuse_connection"), path)
    if "http_health_check" not in d:
        raise ConfigError(path, "only http_health_check is supported")
    hp = w.join(path, "http_health_check")
    h = w.check_keys(d["http_health_check"], ("path", "host", "expected_statuses",
                                              "retriable_statuses", "codec_client_type"), hp)
    w.string(h, "codec_client_type", hp, "HTTP1", choices=("HTTP1",))
    # reuse_connection: each check opens a fresh connection (so a check also proves the host
    # accepts connections); the Envoy switch is accepted, its value does not change that
    w.boolean(d, "reuse_connection", path, True)
    opt = lambda k: w.duration(d, k, path, None)  # noqa: E731
    return HealthCheck(
        path=w.string(h, "path", hp, nonempty=True), host=w.string(h, "host", hp, ""),
        interval_s=_positive(w.duration(d, "interval", path), w.join(path, "interval")),
        timeout_s=_positive(w.duration(d, "timeout", path), w.join(path, "timeout")),
        interval_jitter_s=w.duration(d, "interval_jitter", path, 0.0),
        interval_jitter_percent=float(w.integer(d, "interval_jitter_percent", path, 0, lo=0, hi=100)),
        initial_jitter_s=w.duration(d, "initial_jitter", path, 0.0),
        healthy_threshold=w.integer(d, "healthy_threshold", path, lo=1),
        unhealthy_threshold=w.integer(d, "unhealthy_threshold", path, lo=1),
        expected_statuses=_statuses(h["expected_statuses"], w.join(hp, "expected_statuses"))
        if "expected_statuses" in h else ((200, 201),),
        retriable_statuses=_statuses(h["retriable_statuses"], w.join(hp, "retriable_statuses"))
        if "retriable_statuses" in h else (),
        unhealthy_interval_s=opt("unhealthy_interval"),
        unhealthy_edge_interval_s=opt("unhealthy_edge_interval"),
        healthy_edge_interval_s=opt("healthy_edge_interval"),
        # Envoy: 60 s until the cluster has carried traffic
        no_traffic_interval_s=w.duration(d, "no_traffic_interval", path, 60.0),
    )


def health_check_from_native(d: dict, path: str) -> HealthCheck:
    from sidecar.config import wire as w
    w.check_keys(d, ("path", "host", "interval", "jitter", "initial_jitter", "timeout",
                     "healthy_threshold", "unhealthy_threshold", "expected_statuses",
                     "retriable_statuses", "unhealthy_interval", "no_traffic_interval"), path)
    return HealthCheck(
        path=w.string(d, "path", path, "/healthz", nonempty=True), host=w.string(d, "host", path, ""),
        interval_s=_positive(w.duration(d, "interval", path, 5.0), w.join(path, "interval")),
        interval_jitter_s=w.duration(d, "jitter", path, 0.0),
        initial_jitter_s=w.duration(d, "initial_jitter", path, 0.0),
        timeout_s=_positive(w.duration(d, "timeout", path, 1.0), w.join(path, "timeout")),
        healthy_threshold=w.integer(d, "healthy_threshold", path, 1, lo=1),
        unhealthy_threshold=w.integer(d, "unhealthy_threshold", path, 3, lo=1),
        expected_statuses=_statuses(w.seq(d, "expected_statuses", path, [200]),
                                    w.join(path, "expected_statuses")),
        retriable_statuses=_statuses(w.seq(d, "retriable_statuses", path, []),
                                     w.join(path, "retriable_statuses")),
        unhealthy_interval_s=w.duration(d, "unhealthy_interval", path, None),
        # native: checks run at `interval` from the start unless this is set
        no_traffic_interval_s=w.duration(d, "no_traffic_interval", path, None),
    )
