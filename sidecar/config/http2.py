"""HTTP/2 settings shared by listeners (downstream codec) and clusters (upstream pools), the
upgrade types an HTTP connection manager allows, and their parsers (Envoy's
``http2_protocol_options`` field names; the native format uses the same names, shortened where
noted).

Defaults are Envoy 1.40's, as the conformance suite observed them: 1024 concurrent streams
downstream (2^31 - 1 upstream), a 16 MiB stream window and a 24 MiB connection window, and the
flood limits of ``http2_protocol_options``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sidecar.config import wire as w
from sidecar.config.errors import ConfigError

MiB = 1024 * 1024
MAX_WINDOW = 2**31 - 1
MAX_STREAMS = 2**31 - 1

CODECS = ("auto", "http1", "http2")
UPSTREAM_PROTOCOLS = ("http1", "http2", "downstream")


@dataclass(frozen=True, slots=True)
class Http2Options:
    max_concurrent_streams: int = 1024
    initial_stream_window_size: int = 16 * MiB
    initial_connection_window_size: int = 24 * MiB
    hpack_table_size: int = 4096
    # flood protections (Envoy's names and defaults)
    max_outbound_frames: int = 10000
    max_outbound_control_frames: int = 1000
    max_consecutive_inbound_frames_with_empty_payload: int = 1
    max_inbound_priority_frames_per_stream: int = 100
    max_inbound_window_update_frames_per_data_frame_sent: int = 10
    # a malformed request resets its stream instead of closing the connection
    override_stream_error_on_invalid_http_message: bool = False
    # nghttp2's RST_STREAM token bucket (server side): a client's RST_STREAM takes a token,
    # ``stream_reset_rate`` come back each second; none left: GOAWAY and close (Envoy's names
    # and defaults, the engine's own rapid-reset limit)
    stream_reset_burst: int = 1000
    stream_reset_rate: int = 33


DOWNSTREAM_DEFAULTS = Http2Options()
# fields that only the downstream codec reads (limits on what a client may do)
DOWNSTREAM_ONLY = ("max_outbound_frames", "max_outbound_control_frames",
                   "max_consecutive_inbound_frames_with_empty_payload",
                   "max_inbound_priority_frames_per_stream",
                   "max_inbound_window_update_frames_per_data_frame_sent",
                   "override_stream_error_on_invalid_http_message", "stream_reset_burst",
                   "stream_reset_rate")
UPSTREAM_DEFAULTS = Http2Options(max_concurrent_streams=MAX_STREAMS)

_INT_FIELDS = {
    # name: (lo, hi)
    "max_concurrent_streams": (1, MAX_STREAMS),
    "initial_stream_window_size": (65535, MAX_WINDOW),
    "initial_connection_window_size": (65535, MAX_WINDOW),
    "hpack_table_size": (0, 65536),
    "max_outbound_frames": (1, 2**32 - 1),
    "max_outbound_control_frames": (1, 2**32 - 1),
    "max_consecutive_inbound_frames_with_empty_payload": (0, 2**32 - 1),
    "max_inbound_priority_frames_per_stream": (0, 2**32 - 1),
    "max_inbound_window_update_frames_per_data_frame_sent": (1, 2**32 - 1),
    "stream_reset_burst": (0, 2**63 - 1),     # UInt64Value (nghttp2 takes an int64)
    "stream_reset_rate": (0, 2**63 - 1),
}

# Envoy fields refused by name: each changes behaviour this codec does not have
_REFUSED = {
    "allow_connect": "extended CONNECT (RFC 8441, WebSocket over HTTP/2) is not supported",
    "allow_metadata": "METADATA frames are not supported",
    "connection_keepalive": "HTTP/2 PING keepalive is not supported (use TCP keepalive)",
    "custom_settings_parameters": "custom SETTINGS parameters are not supported",
    "stream_error_on_invalid_http_messaging":
        "is deprecated; use override_stream_error_on_invalid_http_message",
    "max_metadata_size": "METADATA frames are not supported",
    "enable_huffman_encoding": "cannot be changed (HPACK uses Huffman coding where it is shorter)",
}

_NATIVE_ALIASES = {"initial_stream_window": "initial_stream_window_size",
                   "initial_connection_window": "initial_connection_window_size"}


def _wrapped_int(d: dict[str, Any], key: str, path: str, lo: int, hi: int) -> int:
    """An Envoy UInt32Value (``{value: n}`` in some JSON renderings, or a bare number)."""
    v = d[key]
    if isinstance(v, dict):
        w.check_keys(v, ("value",), w.join(path, key))
        return w.integer(v, "value", w.join(path, key), lo=lo, hi=hi)
    return w.integer(d, key, path, lo=lo, hi=hi)


def http2_options_from_wire(d: object, path: str, defaults: Http2Options,
                            native: bool = False) -> Http2Options:
    """``http2_protocol_options`` (Envoy) or ``http2:`` (native: the same names, and
    ``initial_stream_window`` / ``initial_connection_window`` for the window sizes)."""
    if d is None:
        return defaults
    if not isinstance(d, dict):
        raise ConfigError(path, "must be a mapping")
    if native:
        d = {_NATIVE_ALIASES.get(str(k), str(k)): v for k, v in d.items()}
    for key, why in _REFUSED.items():
        if key in d and d[key] is not None and d[key] is not False:   # false: the default
            raise ConfigError(w.join(path, key), why)
    if d.get("use_oghttp2_codec"):
        raise ConfigError(w.join(path, "use_oghttp2_codec"), "only the default codec is available")
    w.check_keys(d, (*_INT_FIELDS, *_REFUSED, "use_oghttp2_codec",
                     "override_stream_error_on_invalid_http_message"), path)
    kw: dict[str, object] = {}
    for key, (lo, hi) in _INT_FIELDS.items():
        if key in d:
            kw[key] = _wrapped_int(d, key, path, lo, hi)
    if "override_stream_error_on_invalid_http_message" in d:
        v = d["override_stream_error_on_invalid_http_message"]
        if isinstance(v, dict):
            w.check_keys(v, ("value",), w.join(path, "override_stream_error_on_invalid_http_message"))
            v = v.get("value", False)
        if not isinstance(v, bool):
            raise ConfigError(w.join(path, "override_stream_error_on_invalid_http_message"),
                              "must be true or false")
        kw["override_stream_error_on_invalid_http_message"] = v
    return replace(defaults, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class UpgradeConfig:
    """One ``upgrade_configs`` entry: an Upgrade token the connection manager tunnels."""
    upgrade_type: str          # lower-case, e.g. "websocket"
    enabled: bool = True


def upgrade_configs_from_wire(items: object, path: str, native: bool = False) -> tuple[UpgradeConfig, ...]:
    """Envoy ``upgrade_configs: [{upgrade_type, enabled}]``; native ``upgrades: [websocket,
    {type: x, enabled: false}]``."""
    if items is None:
        return ()
    if not isinstance(items, list):
        raise ConfigError(path, "must be a list")
    out: list[UpgradeConfig] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        ip = w.join(path, i)
        if native and isinstance(item, str):
            item = {"type": item}
        if native:
            w.check_keys(item, ("type", "enabled"), ip)
            name = w.string(item, "type", ip, nonempty=True)
        else:
            w.check_keys(item, ("upgrade_type", "enabled", "filters", "connect_config"), ip)
            if item.get("filters"):
                raise ConfigError(w.join(ip, "filters"), "per-upgrade filter chains are not supported")
            if "connect_config" in item:
                raise ConfigError(w.join(ip, "connect_config"), "CONNECT is not supported")
            name = w.string(item, "upgrade_type", ip, nonempty=True)
        enabled = item.get("enabled", True)
        if isinstance(enabled, dict):        # BoolValue rendered as {value: b}
            enabled = enabled.get("value", True)
        if not isinstance(enabled, bool):
            raise ConfigError(w.join(ip, "enabled"), "must be true or false")
        name = name.lower()
        if name in ("h2c", "connect"):
            raise ConfigError(ip, f"upgrade type {name!r} is not supported (h2c upgrades are "
                                  "ignored and the request is proxied as plain HTTP/1.1)")
        if name in seen:
            raise ConfigError(ip, f"upgrade type {name!r} is given twice")
        seen.add(name)
        out.append(UpgradeConfig(name, enabled))
    return tuple(out)
