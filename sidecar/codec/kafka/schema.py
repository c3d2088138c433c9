"""Kafka message definitions by (api key, version), from the ``kio`` package.

kio's types are generated from Kafka's published JSON message definitions
(``clients/src/main/resources/common/message/*.json``), so no field layout here is written by
hand. Reading is kio's native reader; writing is kio's writer. ``ApiSchema`` bundles what one
(api key, version) needs and is built once, on first use, then cached.

The versions kio defines are those Kafka 4.x still publishes: e.g. Produce v3+ and Fetch v4+
(v0-v2 / v0-v3 were removed by KIP-896). Frames of other versions are not decodable here.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from kio.index import load_request_schema, load_response_schema
from kio.schema.index import api_key_map, schema_name_map
from kio.schema.request_header.v1.header import RequestHeader as RequestHeaderV1
from kio.schema.request_header.v2.header import RequestHeader as RequestHeaderV2
from kio.schema.response_header.v0.header import ResponseHeader as ResponseHeaderV0
from kio.schema.response_header.v1.header import ResponseHeader as ResponseHeaderV1
from kio.serial import entity_reader, entity_writer
from kio.serial.errors import SerialError
from kio.static.constants import EntityType
from kio.static.protocol import Entity

from sidecar.codec.kafka.errors import KafkaDecodeError

E = TypeVar("E", bound=Entity)

# Every exception a kio reader raises on bad input: its own, plus enum/str conversions.
DECODE_EXCEPTIONS = (SerialError, ValueError, OverflowError, IndexError, TypeError)

# api key -> (min, max) version kio has a definition for (requests and responses alike)
_VERSION_RANGES: dict[int, tuple[int, int]] = {}
for _key, _name in api_key_map.items():
    _versions = [v for v, types in schema_name_map[_name].items()
                 if EntityType.request in types and EntityType.response in types]
    if _versions:
        _VERSION_RANGES[int(_key)] = (min(_versions), max(_versions))
_API_NAMES: dict[int, str] = {int(k): v for k, v in api_key_map.items()}


def api_name(api_key: int) -> str:
    """snake_case API name (``produce``, ``find_coordinator``...), ``unknown`` if not known."""
    return _API_NAMES.get(api_key, "unknown")


def version_range(api_key: int) -> tuple[int, int] | None:
    """(min, max) versions of ``api_key`` the codec can decode, or None."""
    return _VERSION_RANGES.get(api_key)


def known_api_keys() -> tuple[int, ...]:
    return tuple(sorted(_VERSION_RANGES))


class Codec(Generic[E]):
    """Reads and writes one entity type."""

    __slots__ = ("_read", "_write", "entity_type")

    def __init__(self, entity_type: type[E]) -> None:
        self.entity_type = entity_type
        self._read = entity_reader(entity_type)
        self._write: Callable[[io.BytesIO, E], None] = entity_writer(entity_type)

    def read(self, buffer: bytes | memoryview, offset: int) -> tuple[E, int]:
        """(entity, bytes read); KafkaDecodeError if the bytes do not fit the definition."""
        try:
            return self._read(buffer, offset)
        except DECODE_EXCEPTIONS as e:
            raise KafkaDecodeError(f"{self.entity_type.__qualname__}: {e}") from None

    def write(self, out: io.BytesIO, entity: E) -> None:
        self._write(out, entity)


REQUEST_HEADERS: dict[int, Codec] = {1: Codec(RequestHeaderV1), 2: Codec(RequestHeaderV2)}
RESPONSE_HEADERS: dict[int, Codec] = {0: Codec(ResponseHeaderV0), 1: Codec(ResponseHeaderV1)}


@dataclass(frozen=True, slots=True)
class ApiSchema:
    """Everything needed to decode/encode one (api key, version)."""

    api_key: int
    version: int
    request: Codec
    response: Codec
    request_header_version: int   # 1 or 2 (2 = flexible: tagged fields after client_id)
    response_header_version: int  # 0 or 1 (ApiVersions responses are always 0)


_SCHEMAS: dict[tuple[int, int], ApiSchema] = {}


def api_schema(api_key: int, version: int) -> ApiSchema | None:
    """The schema of (api_key, version), or None when kio has no definition for it."""
    key = (api_key, version)
    schema = _SCHEMAS.get(key)
    if schema is not None:
        return schema
    rng = _VERSION_RANGES.get(api_key)
    if rng is None or not rng[0] <= version <= rng[1]:
        return None   # not cached: the key space of a hostile peer is not ours to store
    request_type = load_request_schema(api_key, version)
    response_type = load_response_schema(api_key, version)
    schema = ApiSchema(
        api_key=api_key, version=version,
        request=Codec(request_type), response=Codec(response_type),
        request_header_version=request_type.__header_schema__.__version__,
        response_header_version=response_type.__header_schema__.__version__,
    )
    _SCHEMAS[key] = schema
    return schema
