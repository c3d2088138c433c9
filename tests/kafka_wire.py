"""Test helpers that write Kafka frames with kio (Kafka's published definitions) and record
batches with aiokafka's builders (a real client's encoder)."""

from __future__ import annotations

import io
import struct
from typing import Any

from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.legacy_records import LegacyRecordBatchBuilder

from sidecar.codec.kafka.schema import REQUEST_HEADERS, RESPONSE_HEADERS, api_schema


def request_frame(api_key: int, version: int, correlation_id: int, body: Any,
                  client_id: str | None = "test-client") -> bytes:
    schema = api_schema(api_key, version)
    assert schema is not None
    out = io.BytesIO()
    header = REQUEST_HEADERS[schema.request_header_version]
    header.write(out, header.entity_type(request_api_key=api_key, request_api_version=version,
                                         correlation_id=correlation_id, client_id=client_id))
    schema.request.write(out, body)
    return struct.pack(">i", out.tell()) + out.getvalue()


def response_frame(api_key: int, version: int, correlation_id: int, body: Any) -> bytes:
    schema = api_schema(api_key, version)
    assert schema is not None
    out = io.BytesIO()
    header = RESPONSE_HEADERS[schema.response_header_version]
    header.write(out, header.entity_type(correlation_id=correlation_id))
    schema.response.write(out, body)
    return struct.pack(">i", out.tell()) + out.getvalue()


def decode_response(api_key: int, version: int, frame: bytes) -> tuple[int, Any]:
    """(correlation id, body) of a whole response frame; every byte must be used."""
    schema = api_schema(api_key, version)
    assert schema is not None
    payload = frame[4:]
    assert struct.unpack(">i", frame[:4])[0] == len(payload)
    header_codec = RESPONSE_HEADERS[schema.response_header_version]
    header, hsize = header_codec.read(payload, 0)
    body, size = schema.response.read(payload, hsize)
    assert hsize + size == len(payload)
    return header.correlation_id, body


def decode_request(api_key: int, version: int, frame: bytes) -> Any:
    schema = api_schema(api_key, version)
    assert schema is not None
    payload = frame[4:]
    _, hsize = REQUEST_HEADERS[schema.request_header_version].read(payload, 0)
    body, size = schema.request.read(payload, hsize)
    assert hsize + size == len(payload)
    return body


def record_batch(values: list[bytes], compression: int = 0) -> bytes:
    """A magic-2 record batch as aiokafka's producer builds it (compression 1 = gzip)."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=compression,
                                        is_transactional=0, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1,
                                        batch_size=1 << 20)
    for i, value in enumerate(values):
        builder.append(i, timestamp=1_700_000_000_000 + i, key=None, value=value, headers=[])
    return bytes(builder.build())


def legacy_message_set(values: list[bytes], magic: int = 1) -> bytes:
    builder = LegacyRecordBatchBuilder(magic=magic, compression_type=0, batch_size=1 << 20)
    for i, value in enumerate(values):
        builder.append(i, timestamp=1_700_000_000_000 + i if magic else None, key=None,
                       value=value)
    return bytes(builder.build())
