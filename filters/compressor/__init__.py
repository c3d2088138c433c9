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

from filters.compressor.config import (
    PER_ROUTE_TYPE_URL,
    TYPE_URL,
    from_envoy,
    from_native,
    per_route_from_envoy,
    per_route_from_native,
)
from filters.compressor.filter import build, new_state
from sidecar import sdk

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

__all__ = ["SPEC"]
