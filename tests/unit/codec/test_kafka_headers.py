"""Request/response header parsing against headers written by kio (Kafka's definitions)."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.codec.kafka.errors import KafkaDecodeError
from sidecar.codec.kafka.headers import (
    parse_request_header,
    peek_correlation_id,
    peek_request_head,
    response_header_size,
)
from sidecar.codec.kafka.schema import (
    REQUEST_HEADERS,
    RESPONSE_HEADERS,
    api_schema,
    known_api_keys,
    version_range,
)

KNOWN = [(k, v) for k in known_api_keys()
         for v in range(version_range(k)[0], version_range(k)[1] + 1)]


@settings(max_examples=300)
@given(key_version=st.sampled_from(KNOWN),
       correlation_id=st.integers(min_value=-2**31, max_value=2**31 - 1),
       client_id=st.one_of(st.none(), st.text(max_size=40)),
       body=st.binary(max_size=20))
def test_request_header_round_trip(key_version: tuple[int, int], correlation_id: int,
                                   client_id: str | None, body: bytes) -> None:
    api_key, version = key_version
    schema = api_schema(api_key, version)
    assert schema is not None
    codec = REQUEST_HEADERS[schema.request_header_version]
    out = io.BytesIO()
    codec.write(out, codec.entity_type(request_api_key=api_key, request_api_version=version,
                                       correlation_id=correlation_id, client_id=client_id))
    header_len = out.tell()
    header = parse_request_header(out.getvalue() + body)
    assert (header.api_key, header.api_version, header.correlation_id, header.client_id) == \
        (api_key, version, correlation_id, client_id)
    assert header.size == header_len
    assert header.schema is schema


def test_flexible_header_has_tagged_fields_after_client_id() -> None:
    # Metadata v9+ is flexible: header v2 ends with an (empty) tagged-field count
    v8 = parse_request_header(struct.pack(">hhih", 3, 8, 1, 1) + b"c")
    v9 = parse_request_header(struct.pack(">hhih", 3, 9, 1, 1) + b"c" + b"\x00")
    assert (v8.size, v9.size) == (11, 12)


def test_unknown_version_still_yields_key_version_and_correlation() -> None:
    # Produce v2 was removed from Kafka's definitions (KIP-896): no schema, body offset unknown
    header = parse_request_header(struct.pack(">hhih", 0, 2, 77, 2) + b"ab" + b"rest")
    assert (header.api_key, header.api_version, header.correlation_id) == (0, 2, 77)
    assert header.client_id == "ab"
    assert header.schema is None and header.size is None
    assert peek_request_head(struct.pack(">hhi", 999, 1, 5)) == (999, 1, 5)


def test_short_or_bad_headers() -> None:
    with pytest.raises(KafkaDecodeError):
        peek_request_head(b"\x00\x00\x00")
    with pytest.raises(KafkaDecodeError):   # client_id length past the end
        parse_request_header(struct.pack(">hhih", 3, 1, 1, 50) + b"ab")
    with pytest.raises(KafkaDecodeError):
        peek_correlation_id(b"\x00")


@given(correlation_id=st.integers(min_value=-2**31, max_value=2**31 - 1))
def test_response_headers(correlation_id: int) -> None:
    for version in (0, 1):
        codec = RESPONSE_HEADERS[version]
        out = io.BytesIO()
        codec.write(out, codec.entity_type(correlation_id=correlation_id))
        raw = out.getvalue()
        assert peek_correlation_id(raw) == correlation_id
        assert response_header_size(raw, version) == 4 + version
