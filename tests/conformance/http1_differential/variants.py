"""Envoy configuration variants, for documenting which settings change an outcome.

``python -m tests.conformance.http1_differential --envoy-variants`` runs the corpus through
Envoy with its defaults and through Envoy with each variant (Envoy against Envoy; the sidecar
is not involved) and lists the cases whose outcome changes. Each variant sets one field away
from its default, on the HTTP connection manager (downstream codec) and, where the field also
exists there, on the cluster (upstream codec).
"""

from __future__ import annotations

from dataclasses import dataclass

UPSTREAM_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _cluster(common: dict | None = None, http1: dict | None = None) -> dict:
    body: dict = {"@type": f"type.googleapis.com/{UPSTREAM_OPTIONS}",
                  "explicit_http_config": {"http_protocol_options": http1 or {}}}
    if common:
        body["common_http_protocol_options"] = common
    return {"typed_extension_protocol_options": {UPSTREAM_OPTIONS: body}}


@dataclass(frozen=True)
class Variant:
    name: str
    field: str            # the field(s), as a path
    default: str          # Envoy's default
    hcm: dict | None = None
    cluster: dict | None = None


VARIANTS = (
    Variant("allow_chunked_length", "http_protocol_options.allow_chunked_length", "false",
            {"http_protocol_options": {"allow_chunked_length": True}},
            _cluster(http1={"allow_chunked_length": True})),
    Variant("accept_http_10", "http_protocol_options.accept_http_10", "false",
            {"http_protocol_options": {"accept_http_10": True}}),
    Variant("allow_absolute_url_false", "http_protocol_options.allow_absolute_url", "true",
            {"http_protocol_options": {"allow_absolute_url": False}}),
    Variant("allow_custom_methods", "http_protocol_options.allow_custom_methods", "false",
            {"http_protocol_options": {"allow_custom_methods": True}}),
    Variant("enable_trailers", "http_protocol_options.enable_trailers (HCM and cluster)", "false",
            {"http_protocol_options": {"enable_trailers": True}},
            _cluster(http1={"enable_trailers": True})),
    Variant("legacy_http_parser", "http_protocol_options.use_balsa_parser: false (HCM and "
            "cluster)", "unset: BalsaParser (runtime envoy.reloadable_features.http1_use_balsa_parser)",
            {"http_protocol_options": {"use_balsa_parser": False}},
            _cluster(http1={"use_balsa_parser": False})),
    Variant("stream_error_on_invalid_http_message",
            "stream_error_on_invalid_http_message", "false for HTTP/1 (the connection is closed)",
            {"stream_error_on_invalid_http_message": True}),
    Variant("max_headers_count_200", "common_http_protocol_options.max_headers_count (HCM and "
            "cluster)", "100",
            {"common_http_protocol_options": {"max_headers_count": 200}},
            _cluster(common={"max_headers_count": 200})),
    Variant("max_request_headers_kb_96", "max_request_headers_kb", "60",
            {"max_request_headers_kb": 96}),
    Variant("underscores_reject", "common_http_protocol_options.headers_with_underscores_action",
            "ALLOW", {"common_http_protocol_options": {
                "headers_with_underscores_action": "REJECT_REQUEST"}}),
)
