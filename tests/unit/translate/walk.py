"""The walk of every Envoy message the translator accepts, from the real API definitions.

Starting at the bootstrap (and at each ``Any`` target the translator accepts: the HTTP
connection manager, each HTTP filter, the TLS contexts...), every field of a message is looked
up in the decision table (``control_plane_client.translate.coverage``); the walk goes on into
the message type of every honoured field. Each message is probed in place: ``at`` is where an
instance lives in ``probe.probe_bootstrap()`` once ``setup`` has been applied.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from tests.unit.translate.probe import (
    CLUSTER_AT,
    HCM_AT,
    ROUTE_AT,
    child_at,
    fields_of,
    get,
    probe_bootstrap,
    put,
    sample,
    set_field,
    submessage,
)

T = "type.googleapis.com/"
LISTENER_AT = "static_resources.listeners[0]"
FILTERS_AT = HCM_AT + ".http_filters"
CERT = {"certificate_chain": {"filename": "/certs/cert.pem"}, "private_key": {"filename": "/certs/key.pem"}}
OTEL = T + "envoy.config.trace.v3.OpenTelemetryConfig"
UPSTREAM_HTTP = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

Setup = tuple[tuple[str, object], ...]
TRACING = {"provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {
    "@type": OTEL, "http_service": {"http_uri": {
        "uri": "http://127.0.0.1:4318/v1/traces", "cluster": "c0", "timeout": "1s"}}}}}

# Any targets: (message, where its instance is, what to put there first)
TCP_PROXY = {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
    "@type": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "t",
    "cluster": "c0"}}
TLS_INSPECTOR = {"name": "tls", "typed_config": {
    "@type": T + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}
ORIGINAL_DST = {"name": "pass", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                "original_dst_lb_config": {}}
TCP_CHECK = [{"timeout": "1s", "interval": "1s", "healthy_threshold": 1,
              "unhealthy_threshold": 1, "tcp_health_check": {}}]

ROOTS: list[tuple[str, str, Setup]] = [
    ("envoy.config.bootstrap.v3.Bootstrap", "", ()),
    ("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", HCM_AT, ()),
    ("envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication", FILTERS_AT + "[0].typed_config", ()),
    ("envoy.extensions.filters.http.rbac.v3.Rbac", FILTERS_AT + "[1].typed_config", ()),
    ("envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit", FILTERS_AT + "[2].typed_config", ()),
    ("envoy.extensions.filters.http.fault.v3.HttpFault", FILTERS_AT + "[3].typed_config", ()),
    ("envoy.extensions.filters.http.router.v3.Router", FILTERS_AT + "[4].typed_config", ()),
    ("envoy.extensions.filters.http.buffer.v3.Buffer", FILTERS_AT + "[3].typed_config",
     ((FILTERS_AT + "[3]", {"name": "envoy.filters.http.buffer", "typed_config": {
         "@type": T + "envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": 1000}}),)),
    ("envoy.extensions.filters.http.cors.v3.Cors", FILTERS_AT + "[3].typed_config",
     ((FILTERS_AT + "[3]", {"name": "envoy.filters.http.cors", "typed_config": {
         "@type": T + "envoy.extensions.filters.http.cors.v3.Cors"}}),)),
    ("envoy.extensions.filters.http.compressor.v3.Compressor", FILTERS_AT + "[3].typed_config",
     ((FILTERS_AT + "[3]", {"name": "gzip", "typed_config": {
         "@type": T + "envoy.extensions.filters.http.compressor.v3.Compressor",
         "compressor_library": {"name": "gzip", "typed_config": {
             "@type": T + "envoy.extensions.compression.gzip.compressor.v3.Gzip"}}}}),)),
    ("envoy.extensions.compression.gzip.compressor.v3.Gzip",
     FILTERS_AT + "[3].typed_config.compressor_library.typed_config",
     ((FILTERS_AT + "[3]", {"name": "gzip", "typed_config": {
         "@type": T + "envoy.extensions.filters.http.compressor.v3.Compressor",
         "compressor_library": {"name": "gzip", "typed_config": {
             "@type": T + "envoy.extensions.compression.gzip.compressor.v3.Gzip"}}}}),)),
    ("envoy.extensions.filters.http.ext_authz.v3.ExtAuthz", FILTERS_AT + "[3].typed_config",
     ((FILTERS_AT + "[3]", {"name": "envoy.filters.http.ext_authz", "typed_config": {
         "@type": T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
         "http_service": {"server_uri": {"uri": "http://authz", "cluster": "c0",
                                         "timeout": "0.5s"}}}}),)),
    ("envoy.extensions.filters.http.header_to_metadata.v3.Config", FILTERS_AT + "[3].typed_config",
     ((FILTERS_AT + "[3]", {"name": "envoy.filters.http.header_to_metadata", "typed_config": {
         "@type": T + "envoy.extensions.filters.http.header_to_metadata.v3.Config",
         "request_rules": [{"header": "x-tenant", "on_header_present": {
             "metadata_namespace": "tenancy", "key": "tenant"}}]}}),)),
    ("envoy.extensions.access_loggers.file.v3.FileAccessLog", HCM_AT + ".access_log[0].typed_config", ()),
    ("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", HCM_AT + ".access_log[0].typed_config",
     ((HCM_AT + ".access_log[0].typed_config",
       {"@type": T + "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"}),)),
    ("envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
     LISTENER_AT + ".filter_chains[0].transport_socket.typed_config",
     ((LISTENER_AT + ".filter_chains[0].transport_socket", {"name": "tls", "typed_config": {
         "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
         "common_tls_context": {"tls_certificates": [CERT]}}}),)),
    ("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
     CLUSTER_AT + ".transport_socket.typed_config",
     ((CLUSTER_AT + ".transport_socket", {"name": "tls", "typed_config": {
         "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"}}),)),
    ("envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
     CLUSTER_AT + ".typed_extension_protocol_options.{" + UPSTREAM_HTTP + "}",
     ((CLUSTER_AT + ".typed_extension_protocol_options", {UPSTREAM_HTTP: {
         "@type": T + UPSTREAM_HTTP, "explicit_http_config": {"http_protocol_options": {}}}}),)),
    ("envoy.config.trace.v3.OpenTelemetryConfig", HCM_AT + ".tracing.provider.typed_config",
     ((HCM_AT + ".tracing", TRACING),)),
    # L4: tcp_proxy as a chain's network filter, tls_inspector as a listener filter, an
    # ORIGINAL_DST cluster beside the probe's, a TCP health check instead of the HTTP one
    ("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
     LISTENER_AT + ".filter_chains[0].filters[0].typed_config",
     ((LISTENER_AT + ".filter_chains[0].filters", [TCP_PROXY]),)),
    ("envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
     LISTENER_AT + ".listener_filters[0].typed_config",
     ((LISTENER_AT + ".listener_filters", [TLS_INSPECTOR]),)),
    ("envoy.config.cluster.v3.ClusterOriginalDstLbConfig",
     "static_resources.clusters[1].original_dst_lb_config",
     (("static_resources.clusters",
       [probe_bootstrap()["static_resources"]["clusters"][0], ORIGINAL_DST]),)),
    ("envoy.config.core.v3.HealthCheckTcpHealthCheck",
     CLUSTER_AT + ".health_checks[0].tcp_health_check",
     ((CLUSTER_AT + ".health_checks", TCP_CHECK),)),
    ("envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
     CLUSTER_AT + ".typed_dns_resolver_config.typed_config",
     ((CLUSTER_AT + ".typed_dns_resolver_config", {"name": "cares", "typed_config": {
         "@type": T + "envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
         "resolvers": [{"socket_address": {"address": "127.0.0.1", "port_value": 53}}]}}),)),
    ("envoy.config.cluster.v3.ClusterEdsClusterConfig", CLUSTER_AT + ".eds_cluster_config",
     ((CLUSTER_AT + ".type", "EDS"), (CLUSTER_AT + ".eds_cluster_config", {"service_name": "c0"}))),
    ("envoy.extensions.filters.http.ratelimit.v3.RateLimit", FILTERS_AT + "[3].typed_config",
     ((FILTERS_AT + "[3]", {"name": "envoy.filters.http.ratelimit", "typed_config": {
         "@type": T + "envoy.extensions.filters.http.ratelimit.v3.RateLimit", "domain": "d",
         "rate_limit_service": {"transport_api_version": "V3", "grpc_service": {
             "envoy_grpc": {"cluster_name": "c0"}}}}}),)),
    ("envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute",
     ROUTE_AT + ".typed_per_filter_config.{envoy.filters.http.ratelimit}",
     ((ROUTE_AT + ".typed_per_filter_config", {"envoy.filters.http.ratelimit": {
         "@type": T + "envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute"}}),)),
    ("envoy.extensions.filters.http.rbac.v3.RbacPerRoute",
     ROUTE_AT + ".typed_per_filter_config.{envoy.filters.http.rbac}",
     ((ROUTE_AT + ".typed_per_filter_config", {"envoy.filters.http.rbac": {
         "@type": T + "envoy.extensions.filters.http.rbac.v3.RBACPerRoute"}}),)),
    ("envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig",
     ROUTE_AT + ".typed_per_filter_config.{envoy.filters.http.jwt_authn}",
     ((ROUTE_AT + ".typed_per_filter_config", {"envoy.filters.http.jwt_authn": {
         "@type": T + "envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig",
         "disabled": True}}),)),
    ("envoy.config.route.v3.FilterConfig",
     ROUTE_AT + ".typed_per_filter_config.{envoy.filters.http.fault}",
     ((ROUTE_AT + ".typed_per_filter_config", {"envoy.filters.http.fault": {
         "@type": T + "envoy.config.route.v3.FilterConfig", "disabled": True}}),)),
]

# valid instances of messages the probe bootstrap does not already hold, by (message, field)
PROBES: dict[tuple[str, str], object] = {
    ("envoy.config.listener.v3.Listener", "listener_filters"): [TLS_INSPECTOR],
    ("envoy.config.listener.v3.Listener", "default_filter_chain"): {"filters": [TCP_PROXY]},
    ("envoy.config.listener.v3.Listener", "access_log"): [{"name": "f", "typed_config": {
        "@type": T + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": "/dev/null"}}],
    ("envoy.config.listener.v3.FilterChain", "filter_chain_match"): {"destination_port": 10000},
    ("envoy.config.listener.v3.FilterChainMatch", "prefix_ranges"):
        [{"address_prefix": "127.0.0.0", "prefix_len": 8}],
    ("envoy.config.cluster.v3.Cluster", "upstream_bind_config"):
        {"source_address": {"address": "127.0.0.6", "port_value": 0}},
    ("envoy.config.core.v3.HealthCheckTcpHealthCheck", "send"): {"text": "50494e47"},
    ("envoy.config.core.v3.HealthCheckTcpHealthCheck", "receive"): [{"text": "50"}],
    ("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "weighted_clusters"):
        {"clusters": [{"name": "c0", "weight": 1}]},
    ("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "hash_policy"):
        [{"source_ip": {}}],
    ("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "access_log"):
        [{"name": "f", "typed_config": {
            "@type": T + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": "/dev/null"}}],
    ("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxyWeightedCluster", "clusters"):
        [{"name": "c0", "weight": 1}],
    ("envoy.config.bootstrap.v3.BootstrapStaticResources", "secrets"):
        [{"name": "s", "tls_certificate": CERT}],
    ("envoy.config.bootstrap.v3.Bootstrap", "dynamic_resources"):
        {"ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                        "grpc_services": [{"envoy_grpc": {"cluster_name": "c0"}}]},
         "cds_config": {"ads": {}, "resource_api_version": "V3"}},
    ("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", "rds"):
        {"route_config_name": "r", "config_source": {"ads": {}}},
    ("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", "tracing"):
        TRACING,
    ("envoy.config.route.v3.RouteMatch", "safe_regex"): {"regex": "/.*"},
    ("envoy.config.route.v3.RouteMatch", "headers"): [{"name": "x-h", "exact_match": "v"}],
    ("envoy.config.route.v3.RouteMatch", "query_parameters"): [{"name": "q", "present_match": True}],
    ("envoy.config.route.v3.RouteMatch", "runtime_fraction"): {"default_value": {"numerator": 50}},
    ("envoy.config.route.v3.Route", "redirect"): {"path_redirect": "/x"},
    ("envoy.config.route.v3.Route", "direct_response"): {"status": 200},
    ("envoy.config.route.v3.RouteAction", "weighted_clusters"):
        {"clusters": [{"name": "c0", "weight": 1}]},
    ("envoy.config.route.v3.RouteAction", "retry_policy"): {"retry_on": "5xx"},
    ("envoy.config.route.v3.RouteAction", "regex_rewrite"):
        {"pattern": {"regex": "^/a"}, "substitution": "/b"},
    ("envoy.config.route.v3.RouteAction", "hash_policy"): [{"header": {"header_name": "x"}}],
    ("envoy.config.route.v3.RouteAction", "request_mirror_policies"): [{"cluster": "c0"}],
    ("envoy.config.route.v3.RouteAction", "max_stream_duration"): {"max_stream_duration": "1s"},
    ("envoy.config.route.v3.RouteAction", "upgrade_configs"): [{"upgrade_type": "websocket"}],
    ("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
     "upgrade_configs"): [{"upgrade_type": "websocket"}],
    ("envoy.extensions.upstreams.http.v3.HttpProtocolOptions", "use_downstream_protocol_config"):
        {"http_protocol_options": {}},
    ("envoy.config.route.v3.VirtualHost", "retry_policy"): {"retry_on": "5xx"},
    ("envoy.config.route.v3.VirtualHost", "rate_limits"):
        [{"actions": [{"generic_key": {"descriptor_value": "vh"}}]}],
    ("envoy.config.route.v3.RouteAction", "rate_limits"):
        [{"actions": [{"request_headers": {"header_name": "x-k", "descriptor_key": "k"}}]}],
    ("envoy.config.route.v3.RateLimit", "actions"):
        [{"request_headers": {"header_name": "x-k", "descriptor_key": "k"}}],
    ("envoy.config.route.v3.RateLimitAction", "request_headers"):
        {"header_name": "x-k", "descriptor_key": "k"},
    ("envoy.extensions.filters.http.ratelimit.v3.RateLimit", "rate_limits"):
        [{"actions": [{"remote_address": {}}]}],
    ("envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute", "rate_limits"):
        [{"actions": [{"remote_address": {}}]}],
    ("envoy.extensions.filters.http.ratelimit.v3.RateLimit", "response_headers_to_add"):
        [{"header": {"key": "x-k", "value": "v"}}],
    ("envoy.extensions.filters.http.ratelimit.v3.RateLimit", "filter_enabled"):
        {"default_value": {"numerator": 100}},
    ("envoy.extensions.filters.http.ratelimit.v3.RateLimit", "filter_enforced"):
        {"default_value": {"numerator": 100}},
    ("envoy.extensions.filters.http.ratelimit.v3.RateLimit", "failure_mode_deny_percent"):
        {"default_value": {"numerator": 100}},
    ("envoy.config.route.v3.RetryPolicy", "retry_back_off"): {"base_interval": "0.1s"},
    ("envoy.config.route.v3.RetryPolicy", "retry_host_predicate"):
        [{"name": "envoy.retry_host_predicates.previous_hosts"}],
    ("envoy.config.route.v3.WeightedCluster", "clusters"): [{"name": "c0", "weight": 1}],
    ("envoy.config.cluster.v3.Cluster", "circuit_breakers"): {"thresholds": [{"max_requests": 5}]},
    ("envoy.config.cluster.v3.Cluster", "health_checks"):
        [{"timeout": "1s", "interval": "1s", "healthy_threshold": 1, "unhealthy_threshold": 1,
          "http_health_check": {"path": "/h"}}],
    ("envoy.config.cluster.v3.Cluster", "eds_cluster_config"): {"service_name": "c0"},
    ("envoy.config.cluster.v3.ClusterEdsClusterConfig", "eds_config"): {"ads": {}},
    ("envoy.extensions.transport_sockets.tls.v3.Secret", "tls_certificate"): CERT,
    ("envoy.extensions.transport_sockets.tls.v3.CommonTlsContext", "combined_validation_context"):
        {"default_validation_context": {}, "validation_context_sds_secret_config": {"name": "v"}},
    ("envoy.config.route.v3.RouteActionHashPolicy", "connection_properties"): {"source_ip": True},
    ("envoy.config.route.v3.RouteActionHashPolicy", "cookie"): {"name": "session"},
    ("envoy.config.route.v3.RouteActionHashPolicy", "query_parameter"): {"name": "id"},
    ("envoy.config.route.v3.RouteActionHashPolicy", "header"): {"header_name": "x-user"},
    ("envoy.config.core.v3.HealthCheckHttpHealthCheck", "expected_statuses"):
        [{"start": 200, "end": 300}],
    ("envoy.config.core.v3.GrpcService", "initial_metadata"): [{"key": "x-k", "value": "v"}],
    ("envoy.config.route.v3.WeightedClusterClusterWeight", "request_headers_to_add"):
        [{"header": {"key": "x-k", "value": "v"}}],
    ("envoy.config.route.v3.RouteConfiguration", "request_headers_to_add"):
        [{"header": {"key": "x-k", "value": "v"}}],
    ("envoy.extensions.filters.http.jwt_authn.v3.JwtProvider", "from_headers"): [{"name": "x-jwt"}],
    ("envoy.extensions.filters.http.jwt_authn.v3.JwtProvider", "claim_to_headers"):
        [{"header_name": "x-sub", "claim_name": "sub"}],
    ("envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit", "descriptors"):
        [{"entries": [{"key": "k", "value": "v"}],
          "token_bucket": {"max_tokens": 1, "fill_interval": "60s"}}],
    ("envoy.extensions.common.ratelimit.v3.LocalRateLimitDescriptor", "entries"):
        [{"key": "k", "value": "v"}],
    ("envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit", "rate_limits"):
        [{"actions": [{"request_headers": {"header_name": "x-k", "descriptor_key": "k"}}]}],
    ("envoy.extensions.filters.http.compressor.v3.Compressor", "runtime_enabled"):
        {"default_value": True},
    ("envoy.config.route.v3.RateLimitAction", "generic_key"): {"descriptor_value": "all"},
    ("envoy.config.route.v3.RateLimitAction", "header_value_match"):
        {"descriptor_value": "beta", "headers": [{"name": "x-beta", "present_match": True}]},
    ("envoy.config.route.v3.RateLimitAction", "metadata"):
        {"descriptor_key": "sub", "metadata_key": {"key": "envoy.filters.http.jwt_authn",
                                                   "path": [{"key": "p"}, {"key": "sub"}]}},
    ("envoy.extensions.filters.http.ext_authz.v3.ExtAuthz", "filter_enabled"):
        {"default_value": {"numerator": 100}},
    ("envoy.extensions.filters.http.ext_authz.v3.ExtAuthz", "with_request_body"):
        {"max_request_bytes": 100},
    ("envoy.extensions.filters.http.ext_authz.v3.AuthorizationRequest", "allowed_headers"):
        {"patterns": [{"exact": "x-k"}]},
    ("envoy.extensions.filters.http.ext_authz.v3.AuthorizationResponse", "allowed_upstream_headers"):
        {"patterns": [{"exact": "x-k"}]},
    ("envoy.config.cluster.v3.Cluster", "typed_dns_resolver_config"): {"name": "cares", "typed_config": {
        "@type": T + "envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
        "resolvers": [{"socket_address": {"address": "127.0.0.1", "port_value": 53}}]}},
    ("envoy.config.core.v3.ConfigSource", "api_config_source"):
        {"api_type": "GRPC", "transport_api_version": "V3",
         "grpc_services": [{"envoy_grpc": {"cluster_name": "c0"}}]},
    ("envoy.config.core.v3.ConfigSource", "path_config_source"): {"path": "/etc/xds/cds.yaml"},
    ("envoy.config.core.v3.PathConfigSource", "watched_directory"): {"path": "/etc/xds"},
    ("envoy.config.core.v3.ApiConfigSource", "grpc_services"): [{"envoy_grpc": {"cluster_name": "c0"}}],
    ("envoy.config.core.v3.GrpcService", "envoy_grpc"): {"cluster_name": "c0"},
    ("envoy.config.core.v3.ApiConfigSource", "api_type"): "GRPC",
    ("envoy.extensions.filters.http.jwt_authn.v3.RemoteJwks", "retry_policy"): {"num_retries": 1},
    ("envoy.config.cluster.v3.Cluster", "outlier_detection"): {"consecutive_5xx": 3},
    ("envoy.config.cluster.v3.Cluster", "common_lb_config"):
        {"healthy_panic_threshold": {"value": 40}},
    ("envoy.config.cluster.v3.CircuitBreakersThresholds", "retry_budget"): {"budget_percent": {"value": 20}},
    ("envoy.extensions.transport_sockets.tls.v3.CommonTlsContext", "validation_context"):
        {"trusted_ca": {"filename": "/certs/ca.pem"}},
    ("envoy.extensions.transport_sockets.tls.v3.CommonTlsContext", "tls_params"):
        {"tls_minimum_protocol_version": "TLSv1_2"},
    ("envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
     "match_typed_subject_alt_names"): [{"san_type": "URI", "matcher": {"exact": "spiffe://x"}}],
    ("envoy.extensions.upstreams.http.v3.HttpProtocolOptions", "common_http_protocol_options"):
        {"idle_timeout": "1s"},
    ("envoy.extensions.access_loggers.file.v3.FileAccessLog", "log_format"):
        {"text_format_source": {"inline_string": "%RESPONSE_CODE%"}},
    ("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", "log_format"):
        {"text_format_source": {"inline_string": "%RESPONSE_CODE%"}},
    ("envoy.config.core.v3.SubstitutionFormatString", "json_format"): {"code": "%RESPONSE_CODE%"},
    ("envoy.config.core.v3.SubstitutionFormatString", "text_format_source"):
        {"inline_string": "%RESPONSE_CODE%"},
    ("envoy.config.cluster.v3.Cluster", "load_balancing_policy"): {"policies": [{
        "typed_extension_config": {"name": "x", "typed_config": {
            "@type": T + "envoy.extensions.load_balancing_policies.peak_ewma.v3alpha.PeakEwma"}}}]},
    ("envoy.config.cluster.v3.Cluster", "transport_socket"): {"name": "tls", "typed_config": {
        "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"}},
    ("envoy.config.listener.v3.FilterChain", "transport_socket"): {"name": "tls", "typed_config": {
        "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": {"tls_certificates": [CERT]}}},
    ("envoy.config.cluster.v3.Cluster", "typed_extension_protocol_options"): {UPSTREAM_HTTP: {
        "@type": T + UPSTREAM_HTTP, "explicit_http_config": {"http_protocol_options": {}}}},
    ("envoy.config.route.v3.VirtualHost", "typed_per_filter_config"): {"envoy.filters.http.rbac": {
        "@type": T + "envoy.extensions.filters.http.rbac.v3.RBACPerRoute"}},
    ("envoy.config.route.v3.Route", "typed_per_filter_config"): {"envoy.filters.http.rbac": {
        "@type": T + "envoy.extensions.filters.http.rbac.v3.RBACPerRoute"}},
    ("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManagerTracing",
     "random_sampling"): {"value": 50},
    ("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManagerTracing",
     "overall_sampling"): {"value": 50},
    ("envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication", "requirement_map"):
        {"r": {"provider_name": "p"}},
    ("envoy.extensions.filters.http.jwt_authn.v3.JwtRequirement", "provider_and_audiences"):
        {"provider_name": "p", "audiences": ["a"]},
    ("envoy.extensions.filters.http.jwt_authn.v3.JwtRequirement", "requires_any"):
        {"requirements": [{"provider_name": "p"}, {"allow_missing": {}}]},
    ("envoy.extensions.filters.http.jwt_authn.v3.JwtRequirement", "requires_all"):
        {"requirements": [{"provider_name": "p"}, {"allow_missing": {}}]},
    ("envoy.config.rbac.v3.Permission", "and_rules"): {"rules": [{"any": True}]},
    ("envoy.config.rbac.v3.Permission", "or_rules"): {"rules": [{"any": True}]},
    ("envoy.config.rbac.v3.Permission", "header"): {"name": "x-h", "present_match": True},
    ("envoy.config.rbac.v3.Permission", "url_path"): {"path": {"prefix": "/"}},
    ("envoy.config.rbac.v3.Permission", "destination_port_range"): {"start": 1, "end": 2},
    ("envoy.config.rbac.v3.Permission", "metadata"):
        {"filter": "envoy.filters.http.jwt_authn", "path": [{"key": "k"}],
         "value": {"present_match": True}},
    ("envoy.config.rbac.v3.Permission", "not_rule"): {"any": True},
    ("envoy.config.rbac.v3.Principal", "and_ids"): {"ids": [{"any": True}]},
    ("envoy.config.rbac.v3.Principal", "or_ids"): {"ids": [{"any": True}]},
    ("envoy.config.rbac.v3.Principal", "source_ip"): {"address_prefix": "10.0.0.0", "prefix_len": 8},
    ("envoy.config.rbac.v3.Principal", "direct_remote_ip"): {"address_prefix": "10.0.0.0", "prefix_len": 8},
    ("envoy.config.rbac.v3.Principal", "remote_ip"): {"address_prefix": "10.0.0.0", "prefix_len": 8},
    ("envoy.config.rbac.v3.Principal", "header"): {"name": "x-h", "present_match": True},
    ("envoy.config.rbac.v3.Principal", "url_path"): {"path": {"prefix": "/"}},
    ("envoy.config.rbac.v3.Principal", "metadata"):
        {"filter": "envoy.filters.http.jwt_authn", "path": [{"key": "k"}],
         "value": {"present_match": True}},
    ("envoy.config.rbac.v3.Principal", "not_id"): {"any": True},
    ("envoy.config.rbac.v3.Principal", "authenticated"): {"principal_name": {"exact": "x"}},
    ("envoy.config.route.v3.HeaderMatcher", "string_match"): {"exact": "v"},
    ("envoy.config.route.v3.HeaderMatcher", "range_match"): {"start": 1, "end": 2},
    ("envoy.config.route.v3.HeaderMatcher", "safe_regex_match"): {"regex": "v"},
    ("envoy.type.matcher.v3.StringMatcher", "safe_regex"): {"regex": "v"},
    ("envoy.type.matcher.v3.MetadataMatcher", "value"): {"present_match": True},
    ("envoy.type.matcher.v3.ValueMatcher", "double_match"): {"exact": 1.5},
    ("envoy.type.matcher.v3.ValueMatcher", "string_match"): {"exact": "v"},
    ("envoy.type.matcher.v3.ValueMatcher", "list_match"): {"one_of": {"present_match": True}},
    ("envoy.type.matcher.v3.ValueMatcher", "or_match"): {"value_matchers": [{"present_match": True}]},
    ("envoy.type.matcher.v3.DoubleMatcher", "range"): {"start": 1, "end": 2},
    ("envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit", "status"): {"code": 429},
    ("envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit", "filter_enabled"):
        {"default_value": {"numerator": 100}},
    ("envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit", "filter_enforced"):
        {"default_value": {"numerator": 100}},
    ("envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
     "tls_certificate_sds_secret_configs"): [{"name": "s"}],
    ("envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
     "validation_context_sds_secret_config"): {"name": "v"},
}


@dataclass(frozen=True)
class Instance:
    message: str
    at: str
    setup: Setup


def base_doc(setup: Setup) -> dict:
    doc = probe_bootstrap()
    for path, value in setup:
        put(doc, path, copy.deepcopy(value))
    return doc


def walk(descend) -> list[Instance]:
    """Every message instance reached from ROOTS. ``descend(message, field, instance, doc)``
    says whether to go into a message-typed field."""
    seen: dict[str, Instance] = {}
    order: list[Instance] = []

    def visit(inst: Instance) -> None:
        if inst.message in seen:
            return
        seen[inst.message] = inst
        order.append(inst)
        for f in fields_of(inst.message):
            sub = submessage(inst.message, f)
            if not sub:
                continue
            doc = base_doc(inst.setup)
            fp = f"{inst.at}.{f}" if inst.at else f
            try:
                value = get(doc, fp)
                setup = inst.setup
            except (KeyError, IndexError, TypeError):
                value = PROBES.get((inst.message, f), sample(inst.message, f))
                set_field(doc, inst.at, inst.message, f, copy.deepcopy(value))
                # the whole parent is put back (a oneof sibling the base had is gone)
                setup = inst.setup + (((inst.at, copy.deepcopy(get(doc, inst.at))),) if inst.at
                                      else ((fp, value),))
            if not descend(inst.message, f, inst, doc):
                continue
            visit(Instance(sub, child_at(inst.message, f, fp, value), setup))

    for message, at, setup in ROOTS:
        visit(Instance(message, at, setup))
    return order
