"""Telemetry config in both formats: ``istio_metrics`` on native listeners and Istio's
``istio.stats`` HTTP filter in Envoy format (its supported fields honoured, the rest refused by
name); the metrics listener is in tests/integration/telemetry/test_metrics_listener.py."""

from __future__ import annotations

import copy

import pytest
import yaml

from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.config.telemetry import IstioMetrics
from sidecar.runtime.loader import load_file

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def envoy(filters: list, direction: str = "INBOUND") -> dict:
    return {"static_resources": {
        "listeners": [{"name": "in", "traffic_direction": direction,
                       "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1000}},
                       "filter_chains": [{"filters": [{
                           "name": "envoy.filters.network.http_connection_manager",
                           "typed_config": {"@type": HCM, "stat_prefix": "in",
                                            "route_config": {"virtual_hosts": []},
                                            "http_filters": filters + [ROUTER]}}]}]}],
        "clusters": []}}


def load(tmp_path, cfg: dict):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return load_file(str(p))


def errors(tmp_path, cfg: dict) -> str:
    with pytest.raises((ConfigError, ConfigErrors)) as e:
        load(tmp_path, cfg)
    errs = e.value.errors if isinstance(e.value, ConfigErrors) else [e.value]
    return "\n".join(str(x) for x in errs)


STATS = {"name": "istio.stats", "typed_config": {"@type": "type.googleapis.com/stats.PluginConfig"}}


def test_istio_stats_filter_turns_on_istio_metrics(tmp_path):
    snap = load(tmp_path, envoy([STATS]))
    (lst,) = snap.listeners
    assert lst.istio_metrics == IstioMetrics() and lst.direction == "inbound"
    assert lst.http_filters == ()            # not a request filter
    cfg = envoy([{"name": "istio.stats", "typed_config": {
        "@type": "type.googleapis.com/stats.PluginConfig", "reporter": "UNSPECIFIED",
        "disable_host_header_fallback": True}}])
    assert load(tmp_path, cfg).listeners[0].istio_metrics == IstioMetrics()
    assert load(tmp_path, envoy([])).listeners[0].istio_metrics is None


FILTER = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0]"


@pytest.mark.parametrize("body, where", [
    ({"metrics": [{"name": "requests_total"}]}, "typed_config.metrics: unknown or unsupported"),
    ({"definitions": []}, "typed_config.definitions"),
    ({"reporter": "SERVER_GATEWAY"}, "typed_config.reporter"),
    ({"disable_host_header_fallback": False}, "typed_config.disable_host_header_fallback"),
    ({"rotation_interval": "60s"}, "typed_config.rotation_interval"),
])
def test_istio_stats_fields_beyond_support_are_refused_by_name(tmp_path, body, where):
    f = copy.deepcopy(STATS)
    f["typed_config"].update(body)
    assert f"{FILTER}.{where}" in errors(tmp_path, envoy([f]))


def test_istio_stats_twice_or_disabled_is_refused(tmp_path):
    assert "http_filters[1]: istio.stats is already in the chain" in errors(tmp_path, envoy([STATS, STATS]))
    assert f"{FILTER}.disabled" in errors(tmp_path, envoy([{**STATS, "disabled": True}]))


def test_native_istio_metrics(tmp_path):
    def cfg(v):
        return {"listeners": [{"name": "l", "port": 1000, "istio_metrics": v,
                               "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]}
    assert load(tmp_path, cfg(True)).listeners[0].istio_metrics == IstioMetrics()
    assert load(tmp_path, cfg(False)).listeners[0].istio_metrics is None
    got = load(tmp_path, cfg({"service": "web.shop.svc.cluster.local", "peer_metadata": False}))
    assert got.listeners[0].istio_metrics == IstioMetrics("web.shop.svc.cluster.local", False)
    assert "listeners[0].istio_metrics.reporter: unknown or unsupported field" in \
        errors(tmp_path, cfg({"reporter": "source"}))
    assert "listeners[0].istio_metrics" in errors(tmp_path, cfg("yes"))
