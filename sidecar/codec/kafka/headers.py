"""Request and response headers (RequestHeader.json v1/v2, ResponseHeader.json v0/v1).

A request header starts with api_key (int16), api_version (int16), correlation_id (int32) in
every version, so those are read even for an (api key, version) the codec has no definition
for; only then is the header's length (v2 adds tagged fields) unknown, and the body with it.
A response header is the correlation_id (int32), plus tagged fields in v1.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sidecar.codec.kafka.errors import KafkaDecodeError
from sidecar.codec.kafka.schema import (
    REQUEST_HEADERS,
    RESPONSE_HEADERS,
    ApiSchema,
    api_schema,
)

_FIXED_REQUEST_HEAD = struct.Struct(">hhi")
_CORRELATION_ID = struct.Struct(">i")


@dataclass(frozen=True, slots=True)
class RequestHeader:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    # payload bytes the header takes (body starts there); None when the version is unknown
    size: int | None
    schema: ApiSchema | None


def peek_request_head(payload: bytes | memoryview) -> tuple[int, int, int]:
    """(api_key, api_version, correlation_id) from a payload's first 8 bytes."""
    if len(payload) < _FIXED_REQUEST_HEAD.size:
        raise KafkaDecodeError(f"request of {len(payload)} bytes is shorter than a header")
    return _FIXED_REQUEST_HEAD.unpack_from(payload, 0)


def parse_request_header(payload: bytes | memoryview) -> RequestHeader:
    """Parse a request frame's header (payload = the frame without its length prefix)."""
    api_key, api_version, correlation_id = peek_request_head(payload)
    schema = api_schema(api_key, api_version)
    # an unknown version still has v1's leading fields (v2 only appends tagged fields)
    header_version = schema.request_header_version if schema is not None else 1
    header, size = REQUEST_HEADERS[header_version].read(payload, 0)
    return RequestHeader(api_key=api_key, api_version=api_version, correlation_id=correlation_id,
                         client_id=header.client_id,
                         size=size if schema is not None else None, schema=schema)


def peek_correlation_id(payload: bytes | memoryview) -> int:
    """A response's correlation id (its first 4 bytes in every header version)."""
    if len(payload) < _CORRELATION_ID.size:
        raise KafkaDecodeError(f"response of {len(payload)} bytes is shorter than a header")
    return _CORRELATION_ID.unpack_from(payload, 0)[0]


def response_header_size(payload: bytes | memoryview, header_version: int) -> int:
    """Bytes the response header takes, validating its tagged fields in v1."""
    _, size = RESPONSE_HEADERS[header_version].read(payload, 0)
    return size
