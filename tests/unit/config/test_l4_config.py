"""L4 config in both formats: what is honoured, and what is refused by name with its path."""

from __future__ import annotations

import ipaddress

import pytest

from control_plane_client.translate.bootstrap import bootstrap
from control_plane_client.translate.cluster import cluster
from filters import CATALOG
from sidecar.config.errors import ConfigError, ConfigErrors
from sidecar.config.native.document import snapshot

TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
TLS_INSPECTOR = ("type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3."
                 "TlsInspector")
HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def tcp_filter(**extra) -> dict:
    return {"name": "envoy.filters.network.tcp_proxy",
            "typed_config": {"@type": TCP, "stat_prefix": "t", "cluster": "up", **extra}}


def hcm_filter() -> dict:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": HCM, "stat_prefix": "h",
        "route_config": {"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "up"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}


def envoy(listener_extra=None, chains=None) -> dict:
    lst = {"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
           "filter_chains": chains if chains is not None else [{"filters": [tcp_filter()]}]}
    lst.update(listener_extra or {})
    return {"static_resources": {"listeners": [lst], "clusters": [
        {"name": "up", "load_assignment": {"cluster_name": "up", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": 2}}}}]}]}}]}}


def refused(doc: dict, native: bool = False) -> str:
    with pytest.raises((ConfigError, ConfigErrors)) as e:
        snapshot(doc, CATALOG) if native else bootstrap(doc)
    return str(e.value)


# ---- Envoy: honoured ------------------------------------------------------------------------

def test_tcp_proxy_listener_with_every_honoured_field():
    doc = envoy(chains=[{"filters": [tcp_filter(
        idle_timeout="30s", max_connect_attempts=3, max_downstream_connection_duration="1h",
        hash_policy=[{"source_ip": {}}],
        access_log=[{"name": "f", "typed_config": {"@type": FILE_LOG, "path": "/dev/null",
                                                    "log_format": {"text_format_source": {
                                                        "inline_string": "%BYTES_SENT%\n"}}}}])]}],
        listener_extra={"per_connection_buffer_limit_bytes": 65536})
    lst = bootstrap(doc).listeners[0]
    assert lst.l4 and lst.buffer_limit_bytes == 65536
    tcp = lst.filter_chains[0].tcp
    assert (tcp.cluster, tcp.idle_timeout_s, tcp.max_connect_attempts, tcp.hash_source_ip,
            tcp.max_downstream_connection_duration_s) == ("up", 30.0, 3, True, 3600.0)
    assert tcp.access_log[0].path == "/dev/null"


def test_one_plain_http_chain_stays_an_http_listener():
    lst = bootstrap(envoy(chains=[{"filters": [hcm_filter()]}])).listeners[0]
    assert not lst.l4 and lst.route_config is not None


def test_filter_chain_match_and_listener_filters():
    chains = [{"name": "a", "filter_chain_match": {
        "destination_port": 443, "server_names": ["*.Example.com", "a.test"],
        "prefix_ranges": [{"address_prefix": "10.1.2.3", "prefix_len": 8}],
        "source_prefix_ranges": [{"address_prefix": "::1"}], "source_ports": [1234],
        "transport_protocol": "tls", "application_protocols": ["h2"],
        "source_type": "EXTERNAL"}, "filters": [tcp_filter()]},
        {"name": "b", "filters": [hcm_filter()]}]
    lst = bootstrap(envoy({"listener_filters": [
        {"name": "tls", "typed_config": {"@type": TLS_INSPECTOR}}],
        "listener_filters_timeout": "2s", "continue_on_listener_filters_timeout": True},
        chains)).listeners[0]
    m = lst.filter_chains[0].match
    assert m.server_names == ("*.example.com", "a.test")
    assert m.prefix_ranges == (ipaddress.ip_network("10.0.0.0/8"),)
    assert m.source_prefix_ranges == (ipaddress.ip_network("::1/128"),)
    assert (m.destination_port, m.source_ports, m.source_type) == (443, (1234,), "EXTERNAL")
    assert lst.listener_filters.filters == ("tls_inspector",)
    assert lst.listener_filters.timeout_s == 2.0 and lst.listener_filters.continue_on_timeout
    assert lst.filter_chains[1].http is not None and lst.filter_chains[1].http.name == "l"


def test_original_dst_cluster():
    c = cluster({"name": "pass", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                 "cleanup_interval": "10s", "original_dst_lb_config": {"upstream_port_override": 80},
                 "upstream_bind_config": {"source_address": {"address": "127.0.0.6",
                                                             "port_value": 0}}}, "c")
    assert (c.type, c.cleanup_interval_s, c.upstream_port_override, c.bind_address) == \
        ("original_dst", 10.0, 80, "127.0.0.6")


# ---- Envoy: refused by path -----------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("on_demand", {}), ("metadata_match", {}), ("tunneling_config", {"hostname": "x"}),
    ("backoff_options", {"base_interval": "1s"}), ("access_log_options", {}),
    ("proxy_protocol_tlvs", []), ("upstream_connect_mode", "ON_DOWNSTREAM_DATA"),
    ("max_early_data_bytes", 1), ("check_drain_close", True), ("upstream_idle_timeout", "1s"),
    ("flush_access_log_on_connected", True), ("bogus", 1),
])
def test_tcp_proxy_fields_refused(field, value):
    msg = refused(envoy(chains=[{"filters": [tcp_filter(**{field: value})]}]))
    assert f"static_resources.listeners[0].filter_chains[0].filters[0].typed_config.{field}" in msg


@pytest.mark.parametrize("chains,where", [
    ([{"filters": [tcp_filter(), tcp_filter()]}], "filter_chains[0].filters[0]"),
    ([{"filters": [{"name": "envoy.filters.network.rbac", "typed_config": {}}, tcp_filter()]}],
     "filter_chains[0].filters[0].name"),
    ([{"filters": [hcm_filter(), tcp_filter()]}], "filter_chains[0].filters"),
    ([{"filters": []}], "filter_chains[0].filters"),
    ([{"filters": [tcp_filter()]}, {"filters": [tcp_filter()]}], "filter_chains[1]"),
    ([{"filter_chain_match": {"address_suffix": "x"}, "filters": [tcp_filter()]}],
     "filter_chains[0].filter_chain_match.address_suffix"),
    ([{"filter_chain_match": {"server_names": ["a.*.com"]}, "filters": [tcp_filter()]}],
     "filter_chains[0].filter_chain_match.server_names[0]"),
    ([{"filter_chain_match": {"source_ports": [0]}, "filters": [tcp_filter()]}],
     "filter_chains[0].filter_chain_match.source_ports[0]"),
    ([{"filters": [tcp_filter(cluster="nope")]}],
     "filter_chains[0].filters[0].typed_config.cluster"),
    ([{"filters": [{"name": "envoy.filters.network.kafka_broker", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.kafka_broker.v3."
                 "KafkaBroker", "stat_prefix": "k"}}]}], "filter_chains[0].filters[0]"),
])
def test_chain_errors_have_paths(chains, where):
    assert f"static_resources.listeners[0].{where}" in refused(envoy(chains=chains))


@pytest.mark.parametrize("extra,where", [
    ({"listener_filters": [{"name": "x", "typed_config": {"@type": "type.googleapis.com/"
                                                                   "envoy.extensions.filters."
                                                                   "listener.proxy_protocol.v3."
                                                                   "ProxyProtocol"}}]},
     "listener_filters[0].typed_config.@type"),
    ({"listener_filters": [{"name": "x", "typed_config": {"@type": TLS_INSPECTOR},
                            "filter_disabled": {"any_match": True}}]},
     "listener_filters[0].filter_disabled"),
    ({"listener_filters": [{"name": "x", "typed_config": {"@type": TLS_INSPECTOR,
                                                          "enable_ja3_fingerprinting": True}}]},
     "listener_filters[0].typed_config.enable_ja3_fingerprinting"),
    ({"access_log": [{"name": "f", "typed_config": {"@type": FILE_LOG, "path": "/dev/null",
                                                    "log_format": {"text_format": "%NOPE%"}}}]},
     "access_log[0].typed_config.log_format.text_format"),
    ({"access_log": [{"name": "f", "filter": {"status_code_filter": {}}, "typed_config": {
        "@type": FILE_LOG, "path": "/dev/null"}}]}, "access_log[0].filter"),
    ({"use_original_dst": True}, "use_original_dst"),
    ({"default_filter_chain": {"filter_chain_match": {}, "filters": [tcp_filter()]}},
     "default_filter_chain.filter_chain_match"),
])
def test_listener_errors_have_paths(extra, where):
    assert f"static_resources.listeners[0].{where}" in refused(envoy(extra))


@pytest.mark.parametrize("d,where", [
    ({"type": "ORIGINAL_DST", "lb_policy": "ROUND_ROBIN"}, "c.lb_policy"),
    ({"type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
      "load_assignment": {"cluster_name": "x"}}, "c.load_assignment"),
    ({"type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
      "original_dst_lb_config": {"use_http_header": True}}, "c.original_dst_lb_config.use_http_header"),
    ({"type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
      "outlier_detection": {"consecutive_5xx": 1}}, "c.outlier_detection"),
    ({"type": "STATIC", "cleanup_interval": "1s", "load_assignment": {"cluster_name": "x"}},
     "c.cleanup_interval"),
    ({"type": "STATIC", "load_assignment": {"cluster_name": "x"},
      "upstream_bind_config": {"source_address": {"address": "127.0.0.6", "port_value": 9}}},
     "c.upstream_bind_config.source_address.port_value"),
])
def test_cluster_errors_have_paths(d, where):
    with pytest.raises(ConfigError) as e:
        cluster({"name": "x", **d}, "c")
    assert e.value.path == where, str(e.value)


# ---- native ---------------------------------------------------------------------------------

def native(listener: dict, clusters=None) -> dict:
    return {"listeners": [{"name": "l", "port": 1, **listener}],
            "clusters": clusters or [{"name": "up", "endpoints": ["127.0.0.1:2"]}]}


def test_native_tcp_listener_and_chains():
    snap = snapshot(native({
        "listener_filters": ["tls_inspector", "original_dst"],
        "connection_log": {"path": "stderr", "json": {"c": "%UPSTREAM_CLUSTER%"}},
        "filter_chains": [
            {"name": "t", "match": {"server_names": ["a.test"], "destination_prefixes": ["10.0.0.0/8"],
                                    "source_type": "same_ip_or_loopback"},
             "tcp_proxy": {"cluster": "up", "access_log": "stdout", "hash": "source_ip"}},
            {"name": "h", "routes": [{"match": {"prefix": "/"}, "cluster": "up"}]}]}), CATALOG)
    lst = snap.listeners[0]
    assert [c.name for c in lst.filter_chains] == ["t", "h"]
    assert lst.filter_chains[0].match.source_type == "SAME_IP_OR_LOOPBACK"
    assert lst.filter_chains[0].tcp.stat_prefix == "t" and lst.filter_chains[0].tcp.hash_source_ip
    assert lst.connection_log[0].path == "/dev/stderr"
    assert lst.filter_chains[1].http.route_config is not None


@pytest.mark.parametrize("listener,where", [
    ({"tcp_proxy": {"cluster": "nope"}}, "listeners[0].tcp_proxy.cluster"),
    ({"tcp_proxy": {"cluster": "up", "tunnel": 1}}, "listeners[0].tcp_proxy.tunnel"),
    ({"tcp_proxy": {"cluster": "up"}, "routes": []}, "listeners[0].routes"),
    ({"kafka_broker": {"stat_prefix": "k"}}, "listeners[0].tcp_proxy"),
    ({"filter_chains": [{"tcp_proxy": {"cluster": "up"}, "filters": []}]},
     "listeners[0].filter_chains[0].filters"),
    ({"filter_chains": [{"name": "x"}]}, "listeners[0].filter_chains[0]"),
    ({"filter_chains": [{"tcp_proxy": {"cluster": "up"}}, {"tcp_proxy": {"cluster": "up"}}]},
     "listeners[0].filter_chains[1]"),
    ({"filter_chains": [{"match": {"source_prefixes": ["x"]}, "tcp_proxy": {"cluster": "up"}}]},
     "listeners[0].filter_chains[0].match.source_prefixes[0]"),
    ({"listener_filters": ["proxy_protocol"], "tcp_proxy": {"cluster": "up"}},
     "listeners[0].listener_filters[0]"),
    ({"filter_chains": [{"tcp_proxy": {"weighted_clusters": [{"name": "up", "weight": 1},
                                                             {"name": "nope", "weight": 1}]}}]},
     "listeners[0].filter_chains[0].tcp_proxy.weighted_clusters[1].name"),
    ({"tcp_proxy": {"cluster": "up", "access_log": {"format": "%UPSTREAM_PEER_SUBJECT%"}}},
     "listeners[0].tcp_proxy.access_log.format"),
])
def test_native_errors_have_paths(listener, where):
    msg = refused(native(listener), native=True)
    assert where in msg, msg


def test_http_routes_to_an_original_dst_cluster_are_refused():
    msg = refused(native({"routes": [{"match": {"prefix": "/"}, "cluster": "pass"}]},
                         [{"name": "pass", "type": "original_dst"}]), native=True)
    assert "listeners[0].routes[0]: cluster 'pass' is ORIGINAL_DST" in msg


def test_native_original_dst_cluster_refuses_endpoints():
    msg = refused(native({"tcp_proxy": {"cluster": "up"}},
                         [{"name": "up", "type": "original_dst", "endpoints": ["1.2.3.4:5"]}]),
                  native=True)
    assert "clusters[0].endpoints" in msg



def test_tcp_health_check_payloads():
    from control_plane_client.translate.cluster import health_check_from_envoy
    hc = health_check_from_envoy({"timeout": "1s", "interval": "1s", "healthy_threshold": 1,
                                  "unhealthy_threshold": 1, "tcp_health_check": {
                                      "send": {"text": "50494E47"},
                                      "receive": [{"binary": "UE9ORw=="}, {"text": "21"}]}}, "hc")
    assert hc.tcp.send == b"PING" and hc.tcp.receive == (b"PONG", b"!")
    with pytest.raises(ConfigError) as e:
        health_check_from_envoy({"timeout": "1s", "interval": "1s", "healthy_threshold": 1,
                                 "unhealthy_threshold": 1,
                                 "tcp_health_check": {"receive": [{"binary": "%%"}]}}, "hc")
    assert e.value.path == "hc.tcp_health_check.receive[0].binary"
