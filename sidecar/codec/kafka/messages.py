"""Decode and encode whole frames, and the few message edits a broker filter needs.

Bodies are kio entities (frozen dataclasses generated from Kafka's JSON definitions). Edits
build new entities with ``dataclasses.replace`` and the classes of the same generated module,
so a built response is of exactly the version the client asked for. Header bytes are always
kept as received: only bodies are re-encoded.

Note: kio skips tagged fields it has no definition for, so a re-encoded body loses them; only
frames that are edited are re-encoded, everything else passes byte-identical.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import sys
import typing
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kio.schema.errors import ErrorCode
from kio.static.primitive import Records, i16, i32, i32Timedelta, i64

from sidecar.codec.kafka.framing import LENGTH_PREFIX_BYTES
from sidecar.codec.kafka.schema import RESPONSE_HEADERS, ApiSchema

PRODUCE = 0
FETCH = 1
METADATA = 3
FIND_COORDINATOR = 10
API_VERSIONS = 18
DESCRIBE_CLUSTER = 60

# Produce v13+ and Fetch v13+ name topics by id (KIP-516), earlier versions by name
TopicRef = str | uuid.UUID


# ---- whole frames --------------------------------------------------------------------------

def decode_body(payload: bytes | memoryview, offset: int, schema: ApiSchema,
                is_request: bool) -> tuple[Any, int]:
    """Decode the body that starts at ``offset``: (body, bytes left after it).

    Bytes after the body are tolerated, as Kafka's own clients and brokers do (librdkafka's
    mock broker, for one, ends Metadata v12+ responses with a spare byte); the caller counts
    them. A re-encoded frame does not carry them.
    """
    codec = schema.request if is_request else schema.response
    body, size = codec.read(payload, offset)
    return body, len(payload) - offset - size


def encode_frame(header: bytes | memoryview, schema: ApiSchema, body: Any,
                 is_request: bool) -> bytes:
    """A frame (length prefix included) of the given header bytes and a re-encoded body."""
    out = io.BytesIO()
    out.write(b"\0\0\0\0")
    out.write(header)
    (schema.request if is_request else schema.response).write(out, body)
    frame = out.getbuffer()
    frame[:LENGTH_PREFIX_BYTES] = (len(frame) - LENGTH_PREFIX_BYTES).to_bytes(4, "big")
    del frame
    return out.getvalue()


def response_header_bytes(schema: ApiSchema, correlation_id: int) -> bytes:
    """The header of a response the proxy writes itself (no tagged fields)."""
    out = io.BytesIO()
    codec = RESPONSE_HEADERS[schema.response_header_version]
    codec.write(out, codec.entity_type(correlation_id=i32(correlation_id)))
    return out.getvalue()


# ---- building entities of a given generated module -----------------------------------------

def _sibling(entity_type: type, name: str) -> type:
    """A class of the same generated module (e.g. PartitionData next to FetchResponse)."""
    return getattr(sys.modules[entity_type.__module__], name)


_FIELD_NAMES: dict[type, frozenset[str]] = {}


def _field_names(entity_type: type) -> frozenset[str]:
    names = _FIELD_NAMES.get(entity_type)
    if names is None:   # one entry per generated class: bounded by kio's schemas
        names = _FIELD_NAMES[entity_type] = frozenset(
            f.name for f in dataclasses.fields(entity_type))
    return names


_ZERO_THROTTLE = i32Timedelta.parse(datetime.timedelta(0))
# values for required fields of an error answer, when a version has them (Kafka's own
# choices for an errored partition: offsets -1, no records, no nested data)
_ERROR_DEFAULTS: dict[str, Any] = {
    "base_offset": i64(-1), "log_start_offset": i64(-1), "high_watermark": i64(-1),
    "last_stable_offset": i64(-1), "record_errors": (), "aborted_transactions": None,
    "records": Records(b""), "throttle_time": _ZERO_THROTTLE, "session_id": i32(0),
}


def _build(entity_type: type, **values: Any) -> Any:
    names = _field_names(entity_type)
    for f in dataclasses.fields(entity_type):
        if f.name not in values and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING and f.name in _ERROR_DEFAULTS:
            values[f.name] = _ERROR_DEFAULTS[f.name]
    return entity_type(**{k: v for k, v in values.items() if k in names})


def topic_ref(topic_entity: Any) -> TopicRef:
    """The topic a Produce/Fetch topic entry names: its name, or its id (v13+)."""
    names = _field_names(type(topic_entity))
    if "name" in names:
        return topic_entity.name
    if "topic" in names:
        return topic_entity.topic
    return topic_entity.topic_id


def _topic_key_field(entity_type: type) -> str:
    names = _field_names(entity_type)
    for candidate in ("name", "topic", "topic_id"):
        if candidate in names:
            return candidate
    raise TypeError(f"{entity_type.__qualname__} names no topic")


# ---- Produce ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TopicPartitions:
    topic: TopicRef
    partitions: tuple[int, ...]


def produce_acks(body: Any) -> int:
    return int(body.acks)


def produce_topic_data(body: Any) -> Iterator[tuple[TopicRef, Iterable[Any]]]:
    """(topic, partition entries with ``.index`` and ``.records``) of a Produce request."""
    for t in body.topic_data:
        yield topic_ref(t), t.partition_data


def split_produce_request(body: Any, denied: Callable[[TopicRef], bool]
                          ) -> tuple[Any, tuple[TopicPartitions, ...]]:
    """(request without the denied topics, the denied topics and their partitions)."""
    kept, removed = [], []
    for t in body.topic_data:
        ref = topic_ref(t)
        if denied(ref):
            removed.append(TopicPartitions(ref, tuple(int(p.index) for p in t.partition_data)))
        else:
            kept.append(t)
    return dataclasses.replace(body, topic_data=tuple(kept)), tuple(removed)


def _produce_topic_responses(response_type: type, topics: Iterable[TopicPartitions],
                             error: ErrorCode) -> tuple[Any, ...]:
    topic_type = _sibling(response_type, "TopicProduceResponse")
    partition_type = _sibling(response_type, "PartitionProduceResponse")
    key = _topic_key_field(topic_type)
    return tuple(
        _build(topic_type, **{key: t.topic}, partition_responses=tuple(
            _build(partition_type, index=i32(p), error_code=error) for p in t.partitions))
        for t in topics)


def produce_error_response(schema: ApiSchema, topics: Iterable[TopicPartitions],
                           error: ErrorCode) -> Any:
    """A Produce response of ``schema``'s version answering every partition with ``error``."""
    response_type = schema.response.entity_type
    return _build(response_type, responses=_produce_topic_responses(response_type, topics, error))


def add_produce_errors(body: Any, topics: Iterable[TopicPartitions], error: ErrorCode) -> Any:
    extra = _produce_topic_responses(type(body), topics, error)
    return dataclasses.replace(body, responses=body.responses + extra)


# ---- Fetch -----------------------------------------------------------------------------------

def fetch_topics(body: Any) -> Iterator[TopicRef]:
    for t in body.topics:
        yield topic_ref(t)


def split_fetch_request(body: Any, denied: Callable[[TopicRef], bool]
                        ) -> tuple[Any, tuple[TopicPartitions, ...]]:
    kept, removed = [], []
    for t in body.topics:
        ref = topic_ref(t)
        if denied(ref):
            removed.append(TopicPartitions(ref, tuple(int(p.partition) for p in t.partitions)))
        else:
            kept.append(t)
    return dataclasses.replace(body, topics=tuple(kept)), tuple(removed)


def _fetch_topic_responses(response_type: type, topics: Iterable[TopicPartitions],
                           error: ErrorCode) -> tuple[Any, ...]:
    topic_type = _sibling(response_type, "FetchableTopicResponse")
    partition_type = _sibling(response_type, "PartitionData")
    key = _topic_key_field(topic_type)
    return tuple(
        _build(topic_type, **{key: t.topic}, partitions=tuple(
            _build(partition_type, partition_index=i32(p), error_code=error)
            for p in t.partitions))
        for t in topics)


def fetch_error_response(schema: ApiSchema, topics: Iterable[TopicPartitions],
                         error: ErrorCode) -> Any:
    """A Fetch response answering every partition with ``error``; no fetch session
    (session_id 0), so a client with one starts a new one (KIP-227)."""
    response_type = schema.response.entity_type
    return _build(response_type, error_code=ErrorCode.none,
                  responses=_fetch_topic_responses(response_type, topics, error))


def add_fetch_errors(body: Any, topics: Iterable[TopicPartitions], error: ErrorCode) -> Any:
    extra = _fetch_topic_responses(type(body), topics, error)
    return dataclasses.replace(body, responses=body.responses + extra)


def fetch_response_records(body: Any) -> Iterator[tuple[TopicRef, bytes | None]]:
    """(topic, records bytes) of every partition of a Fetch response."""
    for t in body.responses:
        ref = topic_ref(t)
        for p in t.partitions:
            yield ref, p.records


# ---- broker addresses ------------------------------------------------------------------------

BrokerLookup = Callable[[int], tuple[str, int] | None]


@dataclass(frozen=True, slots=True)
class RewriteResult:
    body: Any          # the (maybe) edited body
    rewritten: int     # broker entries given the proxy's address
    unmatched: int     # broker entries no rule covers (their address reaches the client)


def rewrite_broker_addresses(api_key: int, body: Any, lookup: BrokerLookup) -> RewriteResult:
    """Point every broker address in a Metadata, FindCoordinator or DescribeCluster response
    (and the KIP-951 ``node_endpoints`` of Produce/Fetch responses) at the proxy."""
    counts = [0, 0]

    def fix(entity: Any, id_field: str) -> Any:
        node_id = int(getattr(entity, id_field))
        if node_id < 0:   # "no node" (e.g. a FindCoordinator error): nothing to point anywhere
            return entity
        target = lookup(node_id)
        if target is None:
            counts[1] += 1
            return entity
        host, port = target
        if entity.host == host and int(entity.port) == port:
            return entity
        counts[0] += 1
        return dataclasses.replace(entity, host=host, port=i32(port))

    def fix_all(entities: tuple, id_field: str) -> tuple:
        return tuple(fix(e, id_field) for e in entities)

    changes: dict[str, Any] = {}
    names = _field_names(type(body))
    if api_key == METADATA:
        changes["brokers"] = fix_all(body.brokers, "node_id")
    elif api_key == FIND_COORDINATOR:
        if "coordinators" in names:
            changes["coordinators"] = fix_all(body.coordinators, "node_id")
        else:
            fixed = fix(body, "node_id")
            changes.update(host=fixed.host, port=fixed.port)
    elif api_key == DESCRIBE_CLUSTER:
        changes["brokers"] = fix_all(body.brokers, "broker_id")
    if "node_endpoints" in names and body.node_endpoints:
        changes["node_endpoints"] = fix_all(body.node_endpoints, "node_id")
    if counts[0]:
        body = dataclasses.replace(body, **changes)
    return RewriteResult(body, counts[0], counts[1])


# ---- ApiVersions -----------------------------------------------------------------------------

def cap_api_versions(body: Any, caps: Callable[[int, int, int], tuple[int, int]]) -> Any | None:
    """Apply ``caps(api_key, min, max) -> (min, max)`` to an ApiVersions response's list;
    None when nothing changed. An API left with no version (min > max) is removed."""
    changed = False
    kept = []
    for entry in body.api_keys:
        lo, hi = caps(int(entry.api_key), int(entry.min_version), int(entry.max_version))
        if lo > hi:
            changed = True
            continue
        if lo != entry.min_version or hi != entry.max_version:
            changed = True
            entry = dataclasses.replace(entry, min_version=i16(lo), max_version=i16(hi))
        kept.append(entry)
    return dataclasses.replace(body, api_keys=tuple(kept)) if changed else None


# ---- error codes -----------------------------------------------------------------------------

_WalkPlan = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
_WALK_PLANS: dict[type, _WalkPlan] = {}


def _walk_plan(entity_type: type) -> _WalkPlan:
    """(ErrorCode fields, nested-entity fields, tuple-of-entities fields) of a class."""
    plan = _WALK_PLANS.get(entity_type)
    if plan is None:
        plan = _WALK_PLANS[entity_type] = _make_walk_plan(entity_type)
    return plan


def _make_walk_plan(entity_type: type) -> _WalkPlan:
    errors: list[str] = []
    nested: list[str] = []
    arrays: list[str] = []
    for f in dataclasses.fields(entity_type):
        t = f.type
        if t is ErrorCode:
            errors.append(f.name)
            continue
        origin = typing.get_origin(t)
        args = typing.get_args(t)
        if origin is tuple and args and dataclasses.is_dataclass(args[0]):
            arrays.append(f.name)
        elif dataclasses.is_dataclass(t) or (args and any(dataclasses.is_dataclass(a) for a in args)):
            nested.append(f.name)
    return tuple(errors), tuple(nested), tuple(arrays)


def error_codes(body: Any) -> Iterator[int]:
    """Every non-zero error code anywhere in a decoded body (top level and nested)."""
    errors, nested, arrays = _walk_plan(type(body))
    for name in errors:
        code = getattr(body, name)
        if code:
            yield int(code)
    for name in nested:
        value = getattr(body, name)
        if value is not None:
            yield from error_codes(value)
    for name in arrays:
        for item in getattr(body, name):
            yield from error_codes(item)
