"""Response compression: Envoy's ``envoy.filters.http.compressor`` (gzip, brotli, zstd).

A response is compressed with this filter's algorithm when all hold (Envoy's rules):
the client accepts the encoding (``Accept-Encoding`` with q-values; ``*``; ``q=0`` refuses;
with several compressor filters in the chain the client's preferred one among those whose
content types match wins, ties going to ``choose_first``, then to the order in the header),
the response has a body of at least ``min_content_length`` bytes (by ``content-length``; a
streamed body of unknown length qualifies), its ``content-type`` is in the list (Envoy's
default list of text types), it is not already encoded (``content-encoding``, or gzip/deflate
in ``transfer-encoding``), ``cache-control`` has no ``no-transform``, its status is not in
``uncompressible_response_codes``, and (with ``disable_on_etag_header``) it has no ``etag``.

A compressed response loses ``content-length``, gets ``content-encoding`` and ``vary:
Accept-Encoding`` (added to every response that could have been compressed, whatever the
client accepts, as Envoy does); a strong ``etag`` is removed (or weakened, ``weaken_etag_on_compress``).
A complete body is compressed in one go; a streamed body is compressed chunk by chunk, each
chunk flushed as it passes (server-sent events and long polls keep flowing), in bounded
memory.

Envoy config: ``Compressor {response_direction_config {common_config {enabled,
min_content_length, content_type}, disable_on_etag_header, remove_accept_encoding_header,
weaken_etag_on_compress, uncompressible_response_codes}, compressor_library, choose_first}``
(and the deprecated top-level ``content_length``, ``content_type``, ``disable_on_etag_header``,
``remove_accept_encoding_header``, ``runtime_enabled``); libraries ``...gzip.compressor.v3.Gzip``,
``...brotli.compressor.v3.Brotli``, ``...zstd.compressor.v3.Zstd``. Per route
``CompressorPerRoute {disabled | overrides {response_direction_config
{remove_accept_encoding_header}, compressor_library}}``. Refused by name:
``request_direction_config`` (request compression), ``status_header_enabled``, a runtime
``runtime_key``, zstd ``dictionary``, brotli ``disable_literal_context_modeling``.
``chunk_size`` is accepted (Envoy's internal buffer size; ours compresses each chunk as it
comes and has no such buffer).

Native::

    filters:
      - compressor: {algorithm: br, level: 5, min_length: 256, content_types: [text/html]}
      - compressor: {algorithm: gzip}

brotli and zstd need the ``brotli`` / ``zstandard`` packages (``pip install
pysidecar[compression]``); a config naming one that is missing is refused.

Metrics: ``sidecar_compressor_responses_total{encoding, result}``
(``compressed``, ``not_compressed``), ``sidecar_compressor_bytes_total{encoding, stage}``
(``uncompressed``, ``compressed``).
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sidecar import sdk
from sidecar.sdk import ConfigError, wire

_T = "type.googleapis.com/envoy.extensions."
TYPE_URL = _T + "filters.http.compressor.v3.Compressor"
PER_ROUTE_TYPE_URL = _T + "filters.http.compressor.v3.CompressorPerRoute"
T_GZIP = _T + "compression.gzip.compressor.v3.Gzip"
T_BROTLI = _T + "compression.brotli.compressor.v3.Brotli"
T_ZSTD = _T + "compression.zstd.compressor.v3.Zstd"

DEFAULT_MIN_LENGTH = 30
DEFAULT_CONTENT_TYPES = frozenset((
    "text/html", "text/plain", "text/css", "application/javascript", "application/x-javascript",
    "text/javascript", "text/x-javascript", "text/ecmascript", "text/js", "text/jscript",
    "text/x-js", "application/ecmascript", "application/x-json", "application/xml",
    "application/json", "image/svg+xml", "text/xml", "application/xhtml+xml"))
_BODYLESS = frozenset((204, 304))


# =============================================================================================
# compression libraries
# =============================================================================================

class Stream(Protocol):
    def compress(self, data: bytes) -> bytes:
        """Compress and flush: every byte given so far can be decoded by the client."""
        ...

    def finish(self) -> bytes: ...

    def whole(self, data: bytes) -> bytes:
        """A complete body in one go (no intermediate flush)."""
        ...


class _Zlib:
    __slots__ = ("c",)

    def __init__(self, level: int, window_bits: int, mem_level: int, strategy: int):
        self.c = zlib.compressobj(level, zlib.DEFLATED, 16 + window_bits, mem_level, strategy)

    def compress(self, data: bytes) -> bytes:
        return self.c.compress(data) + self.c.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self.c.flush(zlib.Z_FINISH)

    def whole(self, data: bytes) -> bytes:
        return self.c.compress(data) + self.c.flush(zlib.Z_FINISH)


class _Brotli:
    __slots__ = ("c",)

    def __init__(self, module: object, quality: int, window_bits: int, block_bits: int,
                 mode: str):
        b = module
        self.c = b.Compressor(mode=getattr(b, f"MODE_{mode}"), quality=quality,  # type: ignore[attr-defined]
                              lgwin=window_bits, lgblock=block_bits)

    def compress(self, data: bytes) -> bytes:
        return bytes(self.c.process(data)) + bytes(self.c.flush())

    def finish(self) -> bytes:
        return bytes(self.c.finish())

    def whole(self, data: bytes) -> bytes:
        return bytes(self.c.process(data)) + bytes(self.c.finish())


class _Zstd:
    __slots__ = ("c", "flush_block")

    def __init__(self, module: object, level: int, checksum: bool, strategy: str):
        z = module
        if strategy == "DEFAULT":
            params = z.ZstdCompressionParameters.from_level(  # type: ignore[attr-defined]
                level, write_checksum=int(checksum))
        else:
            params = z.ZstdCompressionParameters.from_level(  # type: ignore[attr-defined]
                level, write_checksum=int(checksum),
                strategy=getattr(z, f"STRATEGY_{strategy}"))
        self.c = z.ZstdCompressor(compression_params=params).compressobj()  # type: ignore[attr-defined]
        self.flush_block = z.COMPRESSOBJ_FLUSH_BLOCK  # type: ignore[attr-defined]

    def compress(self, data: bytes) -> bytes:
        return bytes(self.c.compress(data)) + bytes(self.c.flush(self.flush_block))

    def finish(self) -> bytes:
        return bytes(self.c.flush())

    def whole(self, data: bytes) -> bytes:
        return bytes(self.c.compress(data)) + bytes(self.c.flush())


@dataclass(frozen=True, slots=True)
class Library:
    encoding: str                         # the content-encoding token: gzip | br | zstd
    new: Callable[[], Stream]             # a compressor for one response


def _optional_module(name: str, encoding: str, path: str) -> object:
    try:
        # brotli and zstandard are optional dependencies: imported only when configured
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(path, f"{encoding} compression needs the {name!r} package "
                          "(pip install 'pysidecar[compression]')") from None


def gzip_library(level: int = 6, window_bits: int = 12, mem_level: int = 5,
                 strategy: int = zlib.Z_DEFAULT_STRATEGY) -> Library:
    return Library("gzip", lambda: _Zlib(level, window_bits, mem_level, strategy))


def brotli_library(path: str, quality: int = 3, window_bits: int = 18, block_bits: int = 24,
                   mode: str = "GENERIC") -> Library:
    mod = _optional_module("brotli", "brotli", path)
    return Library("br", lambda: _Brotli(mod, quality, window_bits, block_bits, mode))


def zstd_library(path: str, level: int = 3, checksum: bool = False,
                 strategy: str = "DEFAULT") -> Library:
    mod = _optional_module("zstandard", "zstd", path)
    return Library("zstd", lambda: _Zstd(mod, level, checksum, strategy))


_GZIP_LEVELS = {"DEFAULT_COMPRESSION": 6, "BEST_SPEED": 1, "BEST_COMPRESSION": 9,
                **{f"COMPRESSION_LEVEL_{i}": i for i in range(1, 10)}}
_GZIP_STRATEGIES = {"DEFAULT_STRATEGY": zlib.Z_DEFAULT_STRATEGY, "FILTERED": zlib.Z_FILTERED,
                    "HUFFMAN_ONLY": zlib.Z_HUFFMAN_ONLY, "RLE": zlib.Z_RLE,
                    "FIXED": zlib.Z_FIXED}
_ZSTD_STRATEGIES = ("DEFAULT", "FAST", "DFAST", "GREEDY", "LAZY", "LAZY2", "BTLAZY2", "BTOPT",
                    "BTULTRA", "BTULTRA2")


def library_from_envoy(d: object, path: str) -> Library:
    """``compressor_library``: a TypedExtensionConfig naming gzip, brotli or zstd."""
    m = wire.check_keys(d, ("name", "typed_config"), path)
    tp = wire.join(path, "typed_config")
    tc = wire.mapping(m, "typed_config", path)
    t = tc.get("@type")
    body = {k: v for k, v in tc.items() if k != "@type"}
    if t == T_GZIP:
        g = wire.check_keys(body, ("memory_level", "compression_level", "compression_strategy",
                                   "window_bits", "chunk_size"), tp)
        wire.integer(g, "chunk_size", tp, 4096, lo=4096, hi=65536)
        return gzip_library(
            level=_GZIP_LEVELS[wire.string(g, "compression_level", tp, "DEFAULT_COMPRESSION",
                                           choices=tuple(_GZIP_LEVELS))],
            window_bits=wire.integer(g, "window_bits", tp, 12, lo=9, hi=15),
            mem_level=wire.integer(g, "memory_level", tp, 5, lo=1, hi=9),
            strategy=_GZIP_STRATEGIES[wire.string(g, "compression_strategy", tp,
                                                  "DEFAULT_STRATEGY",
                                                  choices=tuple(_GZIP_STRATEGIES))])
    if t == T_BROTLI:
        b = wire.check_keys(body, ("quality", "encoder_mode", "window_bits", "input_block_bits",
                                   "chunk_size", "disable_literal_context_modeling"), tp)
        if wire.boolean(b, "disable_literal_context_modeling", tp, False):
            raise ConfigError(wire.join(tp, "disable_literal_context_modeling"),
                              "is not supported (the brotli binding has no such option)")
        wire.integer(b, "chunk_size", tp, 4096, lo=4096, hi=65536)
        mode = wire.string(b, "encoder_mode", tp, "DEFAULT",
                           choices=("DEFAULT", "GENERIC", "TEXT", "FONT"))
        return brotli_library(tp, quality=wire.integer(b, "quality", tp, 3, lo=0, hi=11),
                              window_bits=wire.integer(b, "window_bits", tp, 18, lo=10, hi=24),
                              block_bits=wire.integer(b, "input_block_bits", tp, 24, lo=16,
                                                      hi=24),
                              mode="GENERIC" if mode == "DEFAULT" else mode)
    if t == T_ZSTD:
        z = wire.check_keys(body, ("compression_level", "enable_checksum", "strategy",
                                   "dictionary", "chunk_size"), tp)
        if z.get("dictionary") is not None:
            raise ConfigError(wire.join(tp, "dictionary"), "is not supported")
        wire.integer(z, "chunk_size", tp, 4096, lo=4096, hi=65536)
        return zstd_library(tp, level=wire.integer(z, "compression_level", tp, 3, lo=1, hi=22),
                            checksum=wire.boolean(z, "enable_checksum", tp, False),
                            strategy=wire.string(z, "strategy", tp, "DEFAULT",
                                                 choices=_ZSTD_STRATEGIES))
    raise ConfigError(wire.join(tp, "@type"), f"unsupported compressor library {t!r}; expected "
                      f"{T_GZIP}, {T_BROTLI} or {T_ZSTD}")


# =============================================================================================
# config
# =============================================================================================

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


_NATIVE_LEVELS = {"gzip": (1, 9, 6), "br": (0, 11, 3), "zstd": (1, 22, 3)}


def _native_library(m: dict[str, object], path: str) -> Library:
    algo = wire.string(m, "algorithm", path, "gzip", choices=("gzip", "br", "zstd"))
    lo, hi, default = _NATIVE_LEVELS[algo]
    level = wire.integer(m, "level", path, default, lo=lo, hi=hi)
    if algo == "gzip":
        return gzip_library(level=level)
    if algo == "br":
        return brotli_library(wire.join(path, "algorithm"), quality=level)
    return zstd_library(wire.join(path, "algorithm"), level=level)


def from_native(d: object, path: str) -> CompressorConfig:
    m = wire.check_keys(d or {}, ("algorithm", "level", "min_length", "content_types",
                                  "disable_on_etag", "weaken_etag", "remove_accept_encoding",
                                  "uncompressible_status", "choose_first"), path)
    sp = wire.join(path, "uncompressible_status")
    codes = frozenset(wire.integer({"c": c}, "c", wire.join(sp, i), lo=200, hi=599)
                      for i, c in enumerate(wire.seq(m, "uncompressible_status", path, [])))
    return CompressorConfig(
        library=_native_library(m, path),
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
    library = _native_library(m, path) if "algorithm" in m or "level" in m else None
    return CompressorPerRoute(wire.boolean(m, "remove_accept_encoding", path, None), library)


# =============================================================================================
# the filter
# =============================================================================================

class _Chain:
    """The compressor filters one request went through (outermost first) and the encoding
    chosen for its response, decided once for all of them (Envoy's filter-state registry)."""

    __slots__ = ("filters", "decision")

    def __init__(self) -> None:
        self.filters: list[CompressorFilter] = []
        self.decision: str | None = None


class CompressorState:
    __slots__ = ("chains", "responses", "bytes")

    def __init__(self, env: sdk.FilterEnv):
        self.chains: dict[int, _Chain] = {}      # id(request context) -> its chain, in flight
        self.responses = sdk.counter(env.metrics, "sidecar_compressor_responses_total",
                                     "Responses seen by compressor filters, by outcome",
                                     ("encoding", "result"))
        self.bytes = sdk.counter(env.metrics, "sidecar_compressor_bytes_total",
                                 "Body bytes through compressor filters, before and after",
                                 ("encoding", "stage"))


def _parse_accept(value: str) -> list[tuple[str, float]]:
    out = []
    for token in value.split(","):
        name, _, params = token.partition(";")
        name = name.strip().lower()
        if not name:
            continue
        q = 1.0
        if params:
            k, eq, v = params.partition("=")
            if eq and k.strip().lower() == "q":
                try:
                    q = float(v.strip())
                except ValueError:
                    continue              # an unparseable q-value: the token is skipped
        out.append((name, q))
    return out


def _media_type(headers: sdk.Headers) -> str:
    ct = headers.get("content-type")
    return ct.split(";")[0].strip().lower() if ct else ""


def choose_encoding(accept: str, filters: list[CompressorFilter], media_type: str) -> str:
    """The encoding for a response: Envoy's ``chooseEncoding`` ("identity" for none)."""
    allowed: dict[str, CompressorFilter] = {}
    for f in filters:
        if media_type and media_type not in f.content_types:
            continue
        allowed.setdefault(f.encoding, f)
    pairs = _parse_accept(accept)
    for name, q in pairs:
        if q == 0.0:
            allowed.pop(name, None)
    if not pairs or not allowed:
        return "identity"
    choice, best = "identity", 0.0
    for name, q in pairs:
        if name not in allowed and name not in ("identity", "*"):
            continue
        if q > best or (q == best and name in allowed and allowed[name].choose_first
                        and not (choice in allowed and allowed[choice].choose_first)):
            choice, best = name, q
    if best == 0.0 or choice == "identity":
        return "identity"
    if choice == "*":
        return next(iter(allowed))
    return choice


class CompressorFilter(sdk.Filter):
    __slots__ = ("config", "library", "encoding", "content_types", "choose_first",
                 "remove_accept", "state", "compressed", "skipped", "bytes_in", "bytes_out")

    def __init__(self, config: CompressorConfig, per_route: CompressorPerRoute | None,
                 state: CompressorState):
        self.config = config
        self.library = per_route.library if per_route and per_route.library else config.library
        self.encoding = self.library.encoding
        self.content_types = config.content_types
        self.choose_first = config.choose_first
        self.remove_accept = config.remove_accept_encoding if per_route is None \
            or per_route.remove_accept_encoding is None else per_route.remove_accept_encoding
        self.state = state
        self.compressed = state.responses.labels(self.encoding, "compressed")
        self.skipped = state.responses.labels(self.encoding, "not_compressed")
        self.bytes_in = state.bytes.labels(self.encoding, "uncompressed")
        self.bytes_out = state.bytes.labels(self.encoding, "compressed")

    async def __call__(self, req: sdk.Request, next: sdk.Handler) -> sdk.Response:
        accept = req.headers.get("accept-encoding")
        if self.remove_accept:
            req.headers.popall("accept-encoding", None)
        chains = self.state.chains
        key = id(req.ctx)
        chain = chains.get(key)
        owner = chain is None
        if chain is None:
            chain = chains[key] = _Chain()
        chain.filters.append(self)
        try:
            resp = await next(req)
        finally:
            if owner:
                del chains[key]
        if self._should_compress(req, resp, accept, chain):
            self._compress(resp)
            self.compressed.inc()
        else:
            self.skipped.inc()
        return resp

    def _should_compress(self, req: sdk.Request, resp: sdk.Response, accept: str | None,
                         chain: _Chain) -> bool:
        """Envoy's order: a response that could be compressed gets ``Vary: Accept-Encoding``
        whatever the client accepts; then the client's choice decides."""
        h = resp.headers
        status = resp.status
        if (req.method == "HEAD" or status < 200 or status in _BODYLESS
                or status in self.config.uncompressible_codes or "content-encoding" in h):
            return False
        body = resp.body
        length = h.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) < self.config.min_length or int(length) == 0:
                return False
        elif isinstance(body, bytes) and len(body) < max(self.config.min_length, 1):
            return False
        media = _media_type(h)
        if media and media not in self.content_types:
            return False
        cc = h.get("cache-control")
        if cc and any(t.strip().lower() == "no-transform" for t in cc.split(",")):
            return False
        if self.config.disable_on_etag and "etag" in h:
            return False
        te = h.get("transfer-encoding")
        if te and any(t.strip().lower() in (self.encoding, "gzip", "deflate")
                      for t in te.split(",")):
            return False
        _add_vary(h)
        if accept is None:
            return False
        if chain.decision is None:
            chain.decision = choose_encoding(accept, chain.filters, media)
        return chain.decision == self.encoding

    def _compress(self, resp: sdk.Response) -> None:
        h = resp.headers
        etag = h.get("etag")
        if etag is not None and len(etag) > 2 and etag[:2] not in ("W/", "w/"):
            if self.config.weaken_etag:
                h["etag"] = "W/" + etag
            else:
                h.popall("etag")
        h.popall("content-length", None)
        h["content-encoding"] = self.encoding
        stream = self.library.new()
        body = resp.body
        if isinstance(body, bytes):
            out = stream.whole(body)
            self.bytes_in.inc(len(body))
            self.bytes_out.inc(len(out))
            resp.body = out
            return
        bytes_in, bytes_out = self.bytes_in, self.bytes_out

        def transform(chunk: bytes) -> bytes:
            out = stream.compress(chunk)
            bytes_in.inc(len(chunk))
            bytes_out.inc(len(out))
            return out

        def finish() -> bytes:
            out = stream.finish()
            bytes_out.inc(len(out))
            return out

        resp.body = sdk.TransformedBody(body, transform, finish)


def _add_vary(h: sdk.Headers) -> None:
    vary = h.get("vary")
    if vary is None:
        h["vary"] = "Accept-Encoding"            # Envoy's spelling
    elif not any(t.strip().lower() == "accept-encoding" for t in vary.split(",")):
        h["vary"] = vary + ", Accept-Encoding"


def new_state(env: sdk.FilterEnv) -> CompressorState:
    return CompressorState(env)


def build(config: CompressorConfig, per_route: CompressorPerRoute | None,
          state: CompressorState, env: sdk.FilterEnv,
          route: sdk.RouteInfo) -> CompressorFilter | None:
    if not config.enabled:
        return None
    return CompressorFilter(config, per_route, state)


SPEC = sdk.FilterSpec(
    name="envoy.filters.http.compressor",
    short="compressor",
    type_url=TYPE_URL,
    from_envoy=from_envoy,
    from_native=from_native,
    new_state=new_state,
    build=build,
    per_route_type_url=PER_ROUTE_TYPE_URL,
    per_route_from_envoy=per_route_from_envoy,
    per_route_from_native=per_route_from_native,
)
