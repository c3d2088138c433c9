"""The compression libraries (gzip via zlib; brotli and zstd when their packages are installed)
and their Envoy and native settings."""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sidecar.sdk import ConfigError, wire

ENVOY_EXTENSIONS = "type.googleapis.com/envoy.extensions."
T_GZIP = ENVOY_EXTENSIONS + "compression.gzip.compressor.v3.Gzip"


T_BROTLI = ENVOY_EXTENSIONS + "compression.brotli.compressor.v3.Brotli"


T_ZSTD = ENVOY_EXTENSIONS + "compression.zstd.compressor.v3.Zstd"


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


def library_from_native(m: dict[str, object], path: str) -> Library:
    algo = wire.string(m, "algorithm", path, "gzip", choices=("gzip", "br", "zstd"))
    lo, hi, default = _NATIVE_LEVELS[algo]
    level = wire.integer(m, "level", path, default, lo=lo, hi=hi)
    if algo == "gzip":
        return gzip_library(level=level)
    if algo == "br":
        return brotli_library(wire.join(path, "algorithm"), quality=level)
    return zstd_library(wire.join(path, "algorithm"), level=level)


_GZIP_LEVELS = {"DEFAULT_COMPRESSION": 6, "BEST_SPEED": 1, "BEST_COMPRESSION": 9,
                **{f"COMPRESSION_LEVEL_{i}": i for i in range(1, 10)}}


_GZIP_STRATEGIES = {"DEFAULT_STRATEGY": zlib.Z_DEFAULT_STRATEGY, "FILTERED": zlib.Z_FILTERED,
                    "HUFFMAN_ONLY": zlib.Z_HUFFMAN_ONLY, "RLE": zlib.Z_RLE,
                    "FIXED": zlib.Z_FIXED}


_ZSTD_STRATEGIES = ("DEFAULT", "FAST", "DFAST", "GREEDY", "LAZY", "LAZY2", "BTLAZY2", "BTOPT",
                    "BTULTRA", "BTULTRA2")


_NATIVE_LEVELS = {"gzip": (1, 9, 6), "br": (0, 11, 3), "zstd": (1, 22, 3)}
