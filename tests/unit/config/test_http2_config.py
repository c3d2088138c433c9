"""HTTP/2, gRPC and Upgrade config, both formats: every field honoured lands in the model, every
field not supported is refused by name with its path."""

from __future__ import annotations

import copy

import pytest

from control_plane_client.translate.cluster import cluster as envoy_cluster
from control_plane_client.translate.listener import listener as envoy_listener
from control_plane_client.translate.route import route_action, route_match
from filters import CATALOG
from sidecar.config.errors import ConfigError
from sidecar.config.http2 import Http2Options, UpgradeConfig
from sidecar.config.native.cluster import cluster_from_native
from sidecar.config.native.listener import listener_from_native
from sidecar.config.native.route import route_from_native
from sidecar.config.native.sidecar_mode import sidecar_from_native
from sidecar.config.route import StreamDuration

T_HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
         "HttpConnectionManager")
T_OPTS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
OPTS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def envoy_lst(**hcm) -> dict:
    tc = {"@type": T_HCM, "stat_prefix": "s",
          "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": []}]},
          "http_filters": [{"name": "envoy.filters.http.router"}], **hcm}
    return {"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": tc}]}]}


def envoy_cl(**extra) -> dict:
    return {"name": "c", "connect_timeout": "1s", "load_assignment": {"cluster_name": "c", "endpoints": [
        {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": 9}}}}]}]}, **extra}


def h2_opts(kind: str = "explicit_http_config", **inner) -> dict:
    return {"typed_extension_protocol_options": {OPTS_KEY: {"@type": T_OPTS, kind: inner}}}


HP = "l.filter_chains[0].filters[0].typed_config"


# ---- listeners -----------------------------------------------------------------------------------

def test_envoy_codec_type_and_http2_protocol_options():
    lc = envoy_listener(envoy_lst(codec_type="HTTP2", http2_protocol_options={
        "max_concurrent_streams": 7, "initial_stream_window_size": 65536,
        "initial_connection_window_size": {"value": 1048576},
        "max_outbound_control_frames": 50, "override_stream_error_on_invalid_http_message": True,
        "stream_reset_burst": {"value": 10}, "stream_reset_rate": 2}), "l")
    assert lc.codec == "http2"
    assert lc.http2 == Http2Options(max_concurrent_streams=7, initial_stream_window_size=65536,
                                    initial_connection_window_size=1048576,
                                    max_outbound_control_frames=50,
                                    override_stream_error_on_invalid_http_message=True,
                                    stream_reset_burst=10, stream_reset_rate=2)
    assert envoy_listener(envoy_lst(), "l").codec == "auto"
    assert envoy_listener(envoy_lst(), "l").http2 == Http2Options()    # Envoy's defaults


@pytest.mark.parametrize("hcm,path,msg", [
    ({"codec_type": "HTTP3"}, "codec_type", "must be one of"),
    ({"http2_protocol_options": {"allow_connect": True}}, "http2_protocol_options.allow_connect",
     "extended CONNECT"),
    ({"http2_protocol_options": {"allow_metadata": True}}, "http2_protocol_options.allow_metadata",
     "METADATA"),
    ({"http2_protocol_options": {"connection_keepalive": {"interval": "1s"}}},
     "http2_protocol_options.connection_keepalive", "keepalive"),
    ({"http2_protocol_options": {"max_concurrent_streams": 0}},
     "http2_protocol_options.max_concurrent_streams", ""),
    ({"http2_protocol_options": {"initial_stream_window_size": 100}},
     "http2_protocol_options.initial_stream_window_size", ""),
    ({"http2_protocol_options": {"hpack_table_sizes": 1}}, "http2_protocol_options.hpack_table_sizes",
     "unknown"),
    ({"http2_protocol_options": {"stream_reset_rate": -1}}, "http2_protocol_options.stream_reset_rate",
     ""),
    ({"codec_type": "HTTP1", "http2_protocol_options": {}}, "http2_protocol_options",
     "never speaks HTTP/2"),
    ({"upgrade_configs": [{"upgrade_type": "websocket", "filters": [{"name": "x"}]}]},
     "upgrade_configs[0].filters", "per-upgrade filter chains"),
    ({"upgrade_configs": [{"upgrade_type": "CONNECT"}]}, "upgrade_configs[0]", "not supported"),
    ({"upgrade_configs": [{"upgrade_type": "websocket"}, {"upgrade_type": "WebSocket"}]},
     "upgrade_configs[1]", "twice"),
])
def test_envoy_listener_refusals(hcm, path, msg):
    with pytest.raises(ConfigError) as e:
        envoy_listener(envoy_lst(**hcm), "l")
    assert e.value.path == f"{HP}.{path}" and msg in str(e.value)


def test_envoy_upgrade_configs_and_alpn():
    lc = envoy_listener(envoy_lst(upgrade_configs=[{"upgrade_type": "websocket"},
                                                   {"upgrade_type": "my-proto", "enabled": False}]),
                        "l")
    assert lc.upgrades == (UpgradeConfig("websocket"), UpgradeConfig("my-proto", False))


def test_native_listener_codec_http2_upgrades_alpn(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    d = {"name": "n", "port": 0, "routes": [], "codec": "http2",
         "http2": {"max_concurrent_streams": 9, "initial_stream_window": 65535,
                   "initial_connection_window": 131072},
         "upgrades": ["websocket", {"type": "custom", "enabled": False}],
         "tls": {"cert": str(cert), "key": str(cert), "alpn": ["h2", "http/1.1"]}}
    lc = listener_from_native(d, "listeners[0]", CATALOG)
    assert lc.codec == "http2" and lc.http2.max_concurrent_streams == 9
    assert (lc.http2.initial_stream_window_size, lc.http2.initial_connection_window_size) == (65535, 131072)
    assert lc.upgrades == (UpgradeConfig("websocket"), UpgradeConfig("custom", False))
    assert lc.tls is not None and lc.tls.alpn == ("h2", "http/1.1")
    for bad, path in (({"codec": "http3"}, "listeners[0].codec"),
                      ({"http2": {"allow_connect": True}}, "listeners[0].http2.allow_connect"),
                      ({"tls": {"cert": str(cert), "key": str(cert), "alpn": ["h3"]}},
                       "listeners[0].tls.alpn[0]")):
        with pytest.raises(ConfigError) as e:
            listener_from_native({**d, **bad}, "listeners[0]", CATALOG)
        assert e.value.path == path


# ---- clusters ------------------------------------------------------------------------------------

def test_envoy_cluster_protocols():
    assert envoy_cluster(envoy_cl(), "c").protocol == "http1"
    c = envoy_cluster(envoy_cl(**h2_opts(http2_protocol_options={"max_concurrent_streams": 50})), "c")
    assert c.protocol == "http2" and c.http2.max_concurrent_streams == 50
    c = envoy_cluster(envoy_cl(**h2_opts("use_downstream_protocol_config", http_protocol_options={},
                                         http2_protocol_options={})), "c")
    assert c.protocol == "downstream"
    assert envoy_cluster(envoy_cl(**h2_opts(http_protocol_options={})), "c").protocol == "http1"


OP = f"c.typed_extension_protocol_options.{OPTS_KEY}"


@pytest.mark.parametrize("opts,path,msg", [
    ({"auto_config": {}}, "auto_config", "ALPN"),
    ({"explicit_http_config": {"http3_protocol_options": {}}},
     "explicit_http_config.http3_protocol_options", "HTTP/3"),
    ({"explicit_http_config": {"http2_protocol_options": {"max_outbound_frames": 5}}},
     "explicit_http_config.http2_protocol_options.max_outbound_frames", "listeners only"),
    # nghttp2's RST_STREAM limiter is a server's: on a cluster's connections it would do nothing
    ({"explicit_http_config": {"http2_protocol_options": {"stream_reset_burst": 5}}},
     "explicit_http_config.http2_protocol_options.stream_reset_burst", "listeners only"),
    ({"explicit_http_config": {"http_protocol_options": {"accept_http_10": True}}},
     "explicit_http_config.http_protocol_options.accept_http_10", "unknown"),
    ({"http_filters": [{}]}, "http_filters", "upstream HTTP filters"),
])
def test_envoy_cluster_refusals(opts, path, msg):
    d = envoy_cl(typed_extension_protocol_options={OPTS_KEY: {"@type": T_OPTS, **opts}})
    with pytest.raises(ConfigError) as e:
        envoy_cluster(d, "c")
    assert e.value.path == f"{OP}.{path}" and msg in str(e.value)


def test_grpc_health_check_both_formats():
    hc = {"timeout": "1s", "interval": "2s", "unhealthy_threshold": 1, "healthy_threshold": 1,
          "grpc_health_check": {"service_name": "pkg.Svc", "authority": "svc.local"}}
    c = envoy_cluster(envoy_cl(health_checks=[hc], **h2_opts(http2_protocol_options={})), "c")
    check = c.health_checks[0]
    assert (check.grpc_service, check.grpc_authority) == ("pkg.Svc", "svc.local")
    # an HTTP/1.1 cluster: the checker speaks HTTP/2 all the same (Envoy's does)
    assert envoy_cluster(envoy_cl(health_checks=[hc]), "c").health_checks[0].grpc_service == "pkg.Svc"
    bad = copy.deepcopy(hc)
    bad["grpc_health_check"]["initial_metadata"] = [{"key": "a", "value": "b"}]
    with pytest.raises(ConfigError) as e:
        envoy_cluster(envoy_cl(health_checks=[bad], **h2_opts(http2_protocol_options={})), "c")
    assert e.value.path == "c.health_checks[0].grpc_health_check.initial_metadata"
    n = cluster_from_native({"name": "g", "endpoints": ["127.0.0.1:1"], "protocol": "http2",
                             "health_check": {"grpc": {"service": "pkg.Svc"}}}, "clusters[0]")
    assert n.health_checks[0].grpc_service == "pkg.Svc" and n.protocol == "http2"
    n = cluster_from_native({"name": "g", "endpoints": ["127.0.0.1:1"],
                             "health_check": {"grpc": True}}, "clusters[0]")
    assert n.health_checks[0].grpc_service == "" and n.protocol == "http1"


def test_native_cluster_protocol_and_http2():
    c = cluster_from_native({"name": "g", "endpoints": ["127.0.0.1:1"], "protocol": "http2",
                             "http2": {"max_concurrent_streams": 10, "initial_stream_window": 1 << 20}},
                            "clusters[0]")
    assert c.http2.max_concurrent_streams == 10 and c.http2.initial_stream_window_size == 1 << 20
    with pytest.raises(ConfigError) as e:
        cluster_from_native({"name": "g", "endpoints": ["127.0.0.1:1"], "http2": {}}, "clusters[0]")
    assert e.value.path == "clusters[0].http2"
    with pytest.raises(ConfigError) as e:
        cluster_from_native({"name": "g", "endpoints": ["127.0.0.1:1"], "protocol": "h2"}, "clusters[0]")
    assert e.value.path == "clusters[0].protocol"


def test_sidecar_app_protocol():
    cfg, _, clusters = sidecar_from_native({"app": 8080, "app_protocol": "http2"}, "sidecar", CATALOG)
    assert clusters[0].protocol == "http2"
    with pytest.raises(ConfigError) as e:
        sidecar_from_native({"app": 8080, "app_protocol": "http2", "app_health": {"path": "/h"}},
                            "sidecar", CATALOG)
    assert e.value.path == "sidecar.app_health.path"


# ---- routes --------------------------------------------------------------------------------------

def test_envoy_route_grpc_fields():
    a = route_action({"cluster": "c", "max_stream_duration": {"grpc_timeout_header_max": "5s",
                                                               "grpc_timeout_header_offset": "0.1s",
                                                               "max_stream_duration": "30s"},
                      "upgrade_configs": [{"upgrade_type": "websocket", "enabled": False}],
                      "idle_timeout": "1s"}, "r")
    assert a.max_stream_duration == StreamDuration(5.0, 0.1) and a.max_stream_duration_s == 30.0
    assert a.upgrades == (UpgradeConfig("websocket", False),) and a.idle_timeout_s == 1.0
    assert route_match({"prefix": "/", "grpc": {}}, "m").grpc is True
    for bad, path in (({"max_grpc_timeout": "1s"}, "r.max_grpc_timeout"),
                      ({"max_stream_duration": {"x": 1}}, "r.max_stream_duration.x"),
                      ({"upgrade_configs": [{"upgrade_type": "websocket",
                                             "connect_config": {}}]},
                       "r.upgrade_configs[0].connect_config")):
        with pytest.raises(ConfigError) as e:
            route_action({"cluster": "c", **bad}, "r")
        assert e.value.path == path


def test_native_route_grpc_fields():
    r = route_from_native({"match": {"prefix": "/", "grpc": True}, "cluster": "c",
                           "grpc_timeout_max": "3s", "upgrades": [{"type": "websocket", "enabled": False}],
                           "idle_timeout": "2s", "retry": {"retry_on": "unavailable,cancelled"}},
                          "routes[0]", CATALOG)
    assert r.match.grpc and r.action.max_stream_duration == StreamDuration(3.0, 0.0)
    assert r.action.upgrades == (UpgradeConfig("websocket", False),) and r.action.idle_timeout_s == 2.0
    assert r.action.retry_policy.retry_on == frozenset({"unavailable", "cancelled"})
