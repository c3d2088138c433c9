"""The compressor's config: Envoy ``Compressor``/``CompressorPerRoute`` and the native shape."""

from __future__ import annotations

from dataclasses import dataclass

from filters.compressor.libraries import ENVOY_EXTENSIONS, Library, library_from_envoy, library_from_native
from sidecar.sdk import ConfigError, wire

TYPE_URL = ENVOY_EXTENSIONS + "filters.http.compressor.v3.Compressor"


PER_ROUTE_TYPE_URL = ENVOY_EXTENSIONS + "filters.http.compressor.v3.CompressorPerRoute"


DEFAULT_MIN_LENGTH = 30


DEFAULT_CONTENT_TYPES = frozenset((
    "text/html", "text/plain", "text/css", "application/javascript", "application/x-javascript",
    "text/javascript", "text/x-javascript", "text/ecmascript", "text/js", "text/jscript",
    "text/x-js", "application/ecmascript", "application/x-json", "application/xml",
    "application/json", "image/svg+xml", "text/xml", "application/xhtml+xml"))


@dataclass(frozen=True, slots=True)
class CompressorConfig:
    library: Library
    enabled: bool = True
    min_length: int = DEFAULT_MIN_LENGTH
    content_types: frozenset[str] = DEFAULT_CONTENT_TYPES
    disable_on_etag: bool = False
    weaken_etag: bool = False
    remove_accept_encoding: bool = False
    uncompressible_codes: frozenset[int] = frozenset()
    choose_first: bool = False


@dataclass(frozen=True, slots=True)
class CompressorPerRoute:
    remove_accept_encoding: bool | None = None
    library: Library | None = None


def _feature_flag(d: dict[str, object], key: str, path: str) -> bool:
    if d.get(key) is None:
        return True
    p = wire.join(path, key)
    f = wire.check_keys(d[key], ("default_value", "runtime_key"), p)
    if f.get("runtime_key"):
        raise ConfigError(wire.join(p, "runtime_key"), "runtime overrides are not supported "
                          "(there is no runtime layer); set default_value")
    return wire.boolean(f, "default_value", p)


def _content_types(items: list[object], path: str) -> frozenset[str]:
    out = []
    for i, t in enumerate(items):
        if not isinstance(t, str) or not t:
            raise ConfigError(wire.join(path, i), "must be a content type")
        out.append(t.split(";")[0].strip().lower())
    return frozenset(out) if out else DEFAULT_CONTENT_TYPES


def from_envoy(d: object, path: str) -> CompressorConfig:
    m = wire.check_keys(d, ("content_length", "content_type", "disable_on_etag_header",
                            "remove_accept_encoding_header", "runtime_enabled",
                            "compressor_library", "request_direction_config",
                            "response_direction_config", "choose_first"), path)
    if m.get("request_direction_config") is not None:
        raise ConfigError(wire.join(path, "request_direction_config"),
                          "request compression is not supported")
    library = library_from_envoy(wire.mapping(m, "compressor_library", path),
                                 wire.join(path, "compressor_library"))
    # the deprecated top-level fields, then response_direction_config over them
    enabled = _feature_flag(m, "runtime_enabled", path)
    min_length = wire.integer(m, "content_length", path, DEFAULT_MIN_LENGTH, lo=0) \
        or DEFAULT_MIN_LENGTH
    types = _content_types(wire.seq(m, "content_type", path, []), wire.join(path, "content_type"))
    etag = wire.boolean(m, "disable_on_etag_header", path, False)
    remove = wire.boolean(m, "remove_accept_encoding_header", path, False)
    weaken = False
    codes: frozenset[int] = frozenset()
    if m.get("response_direction_config") is not None:
        rp = wire.join(path, "response_direction_config")
        r = wire.check_keys(m["response_direction_config"], (
            "common_config", "disable_on_etag_header", "remove_accept_encoding_header",
            "weaken_etag_on_compress", "uncompressible_response_codes", "status_header_enabled"),
            rp)
        if wire.boolean(r, "status_header_enabled", rp, False):
            raise ConfigError(wire.join(rp, "status_header_enabled"), "is not supported")
        if r.get("common_config") is not None:
            cp = wire.join(rp, "common_config")
            c = wire.check_keys(r["common_config"], ("enabled", "min_content_length",
                                                     "content_type"), cp)
            enabled = _feature_flag(c, "enabled", cp)
            min_length = wire.integer(c, "min_content_length", cp, min_length, lo=0)
            if c.get("content_type"):
                types = _content_types(wire.seq(c, "content_type", cp),
                                       wire.join(cp, "content_type"))
        etag = wire.boolean(r, "disable_on_etag_header", rp, etag)
        remove = wire.boolean(r, "remove_accept_encoding_header", rp, remove)
        weaken = wire.boolean(r, "weaken_etag_on_compress", rp, False)
        cop = wire.join(rp, "uncompressible_response_codes")
        code_list = []
        for i, code in enumerate(wire.seq(r, "uncompressible_response_codes", rp, [])):
            code_list.append(wire.integer({"c": code}, "c", wire.join(cop, i), lo=200, hi=599))
        codes = frozenset(code_list)
    return CompressorConfig(library=library, enabled=enabled, min_length=min_length,
                            content_types=types, disable_on_etag=etag, weaken_etag=weaken,
                            remove_accept_encoding=remove, uncompressible_codes=codes,
                            choose_first=wire.boolean(m, "choose_first", path, False))


def per_route_from_envoy(d: object, path: str) -> CompressorPerRoute | None:
    m = wire.check_keys(d, ("disabled", "overrides"), path)
    kind = wire.one_of(m, ("disabled", "overrides"), path)
    if kind == "disabled":
        if not wire.boolean(m, "disabled", path):
            raise ConfigError(wire.join(path, "disabled"), "must be true (or set overrides)")
        return None
    op = wire.join(path, "overrides")
    o = wire.check_keys(m["overrides"], ("response_direction_config", "compressor_library"), op)
    remove = None
    if o.get("response_direction_config") is not None:
        rp = wire.join(op, "response_direction_config")
        r = wire.check_keys(o["response_direction_config"], ("remove_accept_encoding_header",), rp)
        remove = wire.boolean(r, "remove_accept_encoding_header", rp, None)
    library = None
    if o.get("compressor_library") is not None:
        library = library_from_envoy(o["compressor_library"], wire.join(op, "compressor_library"))
    return CompressorPerRoute(remove_accept_encoding=remove, library=library)


def from_native(d: object, path: str) -> CompressorConfig:
    m = wire.check_keys(d or {}, ("algorithm", "level", "min_length", "content_types",
                                  "disable_on_etag", "weaken_etag", "remove_accept_encoding",
                                  "uncompressible_status", "choose_first"), path)
    sp = wire.join(path, "uncompressible_status")
    codes = frozenset(wire.integer({"c": c}, "c", wire.join(sp, i), lo=200, hi=599)
                      for i, c in enumerate(wire.seq(m, "uncompressible_status", path, [])))
    return CompressorConfig(
        library=library_from_native(m, path),
        min_length=wire.integer(m, "min_length", path, DEFAULT_MIN_LENGTH, lo=0),
        content_types=_content_types(wire.seq(m, "content_types", path, []),
                                     wire.join(path, "content_types")),
        disable_on_etag=wire.boolean(m, "disable_on_etag", path, False),
        weaken_etag=wire.boolean(m, "weaken_etag", path, False),
        remove_accept_encoding=wire.boolean(m, "remove_accept_encoding", path, False),
        uncompressible_codes=codes,
        choose_first=wire.boolean(m, "choose_first", path, False))


def per_route_from_native(d: object, path: str) -> CompressorPerRoute:
    m = wire.check_keys(d, ("algorithm", "level", "remove_accept_encoding"), path)
    library = library_from_native(m, path) if "algorithm" in m or "level" in m else None
    return CompressorPerRoute(wire.boolean(m, "remove_accept_encoding", path, None), library)


