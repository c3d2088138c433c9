"""Telemetry config in both formats: ``istio_metrics`` on native listeners and TCP chains, and
Istio's ``istio.stats`` filter in Envoy format, as an HTTP filter and as a network filter in
front of tcp_proxy (its supported fields honoured, the rest refused by name); the metrics
listener is in tests/integration/telemetry/test_metrics_listener.py."""

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


# ---- TCP chains: istio.stats in front of tcp_proxy / native istio_metrics -----------------------

TCP_PROXY = {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
    "stat_prefix": "db", "cluster": "db"}}
KAFKA = {"name": "envoy.filters.network.kafka_broker", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.network.kafka_broker.v3.KafkaBroker",
    "stat_prefix": "k"}}


def envoy_tcp(filters: list, direction: str = "INBOUND") -> dict:
    return {"static_resources": {
        "listeners": [{"name": "in", "traffic_direction": direction,
                       "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1000}},
                       "filter_chains": [{"filters": filters}]}],
        "clusters": [{"name": "db", "load_assignment": {"cluster_name": "db", "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": 2}}}}]}]}}]}}


def test_istio_stats_network_filter_turns_on_tcp_metrics(tmp_path):
    (lst,) = load(tmp_path, envoy_tcp([STATS, TCP_PROXY])).listeners
    assert lst.filter_chains[0].tcp.istio_metrics == IstioMetrics() and lst.direction == "inbound"
    assert load(tmp_path, envoy_tcp([TCP_PROXY])).listeners[0].filter_chains[0].tcp \
        .istio_metrics is None
    # with kafka_broker in front too (Istio puts istio.stats first), and without typed_config
    tcp = load(tmp_path, envoy_tcp([{"name": "istio.stats"}, KAFKA, TCP_PROXY])) \
        .listeners[0].filter_chains[0].tcp
    assert tcp.istio_metrics == IstioMetrics() and tcp.kafka is not None


CHAIN = "static_resources.listeners[0].filter_chains[0].filters"


@pytest.mark.parametrize("body, where", [
    ({"metrics": [{"name": "requests_total"}]}, "[0].typed_config.metrics: unknown or unsupported"),
    ({"reporter": "CLIENT"}, "[0].typed_config.reporter"),
    ({"disable_host_header_fallback": False}, "[0].typed_config.disable_host_header_fallback"),
    ({"@type": "type.googleapis.com/envoy.extensions.wasm.v3.PluginConfig"}, "[0].typed_config"),
])
def test_istio_stats_network_filter_fields_beyond_support_are_refused(tmp_path, body, where):
    f = copy.deepcopy(STATS)
    f["typed_config"].update(body)
    assert f"{CHAIN}{where}" in errors(tmp_path, envoy_tcp([f, TCP_PROXY]))


def test_istio_stats_network_filter_placement_is_checked(tmp_path):
    assert f"{CHAIN}[1]: istio.stats is already in the chain" in \
        errors(tmp_path, envoy_tcp([STATS, STATS, TCP_PROXY]))
    assert f"{CHAIN}[0]: istio.stats must be followed by envoy.filters.network.tcp_proxy" in \
        errors(tmp_path, envoy_tcp([STATS]))
    assert f"{CHAIN}[0]: envoy.filters.network.tcp_proxy is a terminal filter" in \
        errors(tmp_path, envoy_tcp([TCP_PROXY, STATS]))
    assert f"{CHAIN}[0].disabled: unknown or unsupported field" in \
        errors(tmp_path, envoy_tcp([{**STATS, "disabled": True}, TCP_PROXY]))


def native_tcp(**listener) -> dict:
    return {"clusters": [{"name": "db", "endpoints": ["127.0.0.1:2"]}],
            "listeners": [{"name": "db", "port": 1000, "direction": "inbound", **listener}]}


def test_native_istio_metrics_on_a_tcp_listener_and_chain(tmp_path):
    tcp = {"tcp_proxy": {"cluster": "db"}}
    (lst,) = load(tmp_path, native_tcp(istio_metrics=True, **tcp)).listeners
    assert lst.filter_chains[0].tcp.istio_metrics == IstioMetrics()
    got = load(tmp_path, native_tcp(istio_metrics={"service": "db.data.svc.cluster.local"}, **tcp))
    assert got.listeners[0].filter_chains[0].tcp.istio_metrics == \
        IstioMetrics("db.data.svc.cluster.local")
    assert load(tmp_path, native_tcp(istio_metrics=False, **tcp)).listeners[0] \
        .filter_chains[0].tcp.istio_metrics is None
    chains = load(tmp_path, native_tcp(filter_chains=[
        {"name": "tcp", "match": {"destination_port": 1000}, "istio_metrics": True, **tcp},
        {"name": "plain", **tcp},
        {"name": "web", "match": {"destination_port": 1001}, "istio_metrics": True,
         "routes": [{"match": {"prefix": "/"}, "cluster": "db"}]}])).listeners[0].filter_chains
    assert chains[0].tcp.istio_metrics == IstioMetrics() and chains[1].tcp.istio_metrics is None
    assert chains[2].http.istio_metrics == IstioMetrics()       # an HTTP chain's, as before


def test_native_istio_metrics_refusals(tmp_path):
    tcp = {"tcp_proxy": {"cluster": "db"}}
    assert "listeners[0].istio_metrics.reporter: unknown or unsupported field" in \
        errors(tmp_path, native_tcp(istio_metrics={"reporter": "source"}, **tcp))
    assert "listeners[0].istio_metrics: with filter_chains, each chain sets its own " \
           "istio_metrics" in errors(tmp_path, native_tcp(istio_metrics=True,
                                                          filter_chains=[{"name": "c", **tcp}]))
    assert "listeners[0].filter_chains[0].istio_metrics.peer_metadata" in errors(
        tmp_path, native_tcp(filter_chains=[{"name": "c", "istio_metrics": {
            "peer_metadata": "x"}, **tcp}]))
