"""Outlier detection (passive health) config, Envoy ``outlier_detection`` semantics.

The detector that acts on it is ``sidecar.outlier_detector``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    consecutive_local_origin_failure: int = 5
    split_external_local_origin_errors: bool = False
    interval_s: float = 10.0
    base_ejection_time_s: float = 30.0
    max_ejection_time_s: float = 300.0
    max_ejection_percent: float = 10.0
    enforcing_consecutive_5xx: float = 100.0
    enforcing_consecutive_gateway_failure: float = 0.0
    enforcing_consecutive_local_origin_failure: float = 100.0
    enforcing_success_rate: float = 100.0
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: float = 1.9


_FIELDS_DURATION = {"interval": "interval_s", "base_ejection_time": "base_ejection_time_s",
                    "max_ejection_time": "max_ejection_time_s"}
_FIELDS_INT = ("consecutive_5xx", "consecutive_gateway_failure",
               "consecutive_local_origin_failure", "success_rate_minimum_hosts",
               "success_rate_request_volume")
_FIELDS_PERCENT = ("max_ejection_percent", "enforcing_consecutive_5xx",
                   "enforcing_consecutive_gateway_failure",
                   "enforcing_consecutive_local_origin_failure", "enforcing_success_rate")


def outlier_detection_from_wire(d: dict, path: str) -> OutlierDetection:
    """Envoy ``outlier_detection``; the native format uses the same field names."""
    from sidecar.config import wire as w
    w.check_keys(d, (*_FIELDS_DURATION, *_FIELDS_INT, *_FIELDS_PERCENT,
                     "split_external_local_origin_errors", "success_rate_stdev_factor"), path)
    kw: dict = {}
    for k, attr in _FIELDS_DURATION.items():
        if k in d:
            kw[attr] = w.duration(d, k, path)
            if kw[attr] <= 0 and k != "max_ejection_time":
                from sidecar.config.errors import ConfigError
                raise ConfigError(w.join(path, k), "must be greater than zero")
    for k in _FIELDS_INT:
        if k in d:
            kw[k] = w.integer(d, k, path, lo=0)
    for k in _FIELDS_PERCENT:
        if k in d:
            kw[k] = float(w.integer(d, k, path, lo=0, hi=100))
    if "split_external_local_origin_errors" in d:
        kw["split_external_local_origin_errors"] = w.boolean(d, "split_external_local_origin_errors", path)
    if "success_rate_stdev_factor" in d:
        # Envoy: the factor is given multiplied by 1000
        kw["success_rate_stdev_factor"] = w.integer(d, "success_rate_stdev_factor", path, lo=0) / 1000.0
    return OutlierDetection(**kw)
