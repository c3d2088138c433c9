"""The Kafka broker network filter (Envoy's ``envoy.filters.network.kafka_broker``), plus a
topic ACL by the client's mTLS identity, as a transport-agnostic two-direction processor.

``KafkaBrokerFilter`` is built once per filter chain (config, metrics, the topic-id names
learnt from Metadata). For each downstream connection the TCP proxy makes a
``KafkaBrokerSession`` with the client's SPIFFE ID and feeds it the bytes of both directions:

    session = kafka_filter.session(principal="spiffe://td/ns/app/sa/orders")
    out = session.on_downstream_bytes(data)   # client -> proxy
    out = session.on_upstream_bytes(data)     # broker -> proxy
    # write out.to_upstream to the broker and out.to_downstream to the client, in that
    # call's order with other calls; if out.close, close both sides after writing
    session.on_close()                        # when the connection ends, either way

What it does to the stream:
* every frame is split out and its header read (api key, version, correlation id); requests
  and responses are counted per API, responses timed and their error codes counted;
* responses name brokers the client must reach through the proxy: Metadata,
  FindCoordinator, DescribeCluster (and KIP-951 ``node_endpoints`` of Produce/Fetch) get
  their host/port replaced per ``id_based_broker_address_rewrite_spec``;
* the ApiVersions answer is capped so a client only picks versions the filter can decode,
  and Produce/Fetch versions that name topics (v12 at most; v13+ carry topic ids only);
* Produce requests and Fetch responses are counted per topic (records, bytes);
* with a topic ACL, a Produce/Fetch topic the client's identity may not use is removed from
  the request and answered with TOPIC_AUTHORIZATION_FAILED (29) in the response, of the
  version asked; a request with nothing left is answered by the filter itself, in order;
* anything else passes byte-identical; frames that do not decode pass through and are
  counted (except Produce/Fetch under an ACL: a request the filter cannot read is never
  forwarded; the connection is closed, as a broker closes on a malformed request).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kio.schema.errors import ErrorCode

from sidecar.codec.kafka import messages as msg
from sidecar.codec.kafka.correlation import (
    DEFAULT_MAX_IN_FLIGHT,
    CorrelationTracker,
    InFlight,
)
from sidecar.codec.kafka.errors import KafkaDecodeError, KafkaFramingError
from sidecar.codec.kafka.framing import (
    LENGTH_PREFIX_BYTES,
    Frame,
    FrameSplitter,
    OversizedFrameStart,
    PassThroughBytes,
)
from sidecar.codec.kafka.headers import (
    RequestHeader,
    parse_request_header,
    peek_correlation_id,
    peek_request_head,
    response_header_size,
)
from sidecar.codec.kafka.records import count_records
from sidecar.codec.kafka.schema import ApiSchema, api_schema, version_range
from sidecar.config.kafka import AclAction, KafkaBrokerConfig, TopicOperation
from sidecar.l4.kafka_metrics import KafkaMetrics, MetricFamilies

# Produce/Fetch v13+ name topics only by id (KIP-516); capping at 12 keeps names on the wire,
# so ACL and per-topic metrics need no state shared across connections or workers
MAX_NAMED_TOPIC_VERSION = 12
# frames above this stream through undecoded (counted) instead of being buffered; covers the
# clients' default fetch.max.bytes (50 MiB) with room to spare
DEFAULT_MAX_DECODED_FRAME_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_TOPIC_IDS = 100_000
_ACL_CACHE_ENTRIES = 4096
_UNSUPPORTED_VERSION = int(ErrorCode.unsupported_version)
_DENIED = ErrorCode.topic_authorization_failed
_ADDRESS_APIS = frozenset((msg.METADATA, msg.FIND_COORDINATOR, msg.DESCRIBE_CLUSTER,
                           msg.PRODUCE, msg.FETCH))
_ACL_APIS = {msg.PRODUCE: TopicOperation.PRODUCE, msg.FETCH: TopicOperation.FETCH}
# read records of a topic without Fetch (KIP-932 share groups): the ACL cannot check them,
# so under an ACL they are not offered (removed from ApiVersions) and never forwarded
_SHARE_FETCH, _SHARE_ACKNOWLEDGE = 78, 79
_OUTSIDE_ACL = frozenset((_SHARE_FETCH, _SHARE_ACKNOWLEDGE))
_NIL_UUID = uuid.UUID(int=0)


@dataclass(frozen=True, slots=True)
class FilterOutput:
    """What one call produced; write both sides, then close both if ``close``."""

    to_upstream: bytes = b""
    to_downstream: bytes = b""
    close: bool = False
    close_reason: str = ""


@dataclass(frozen=True, slots=True)
class _DeniedTopics:
    """Context of a request forwarded without some of its topics: they are added to the
    response with TOPIC_AUTHORIZATION_FAILED."""

    api_key: int
    topics: tuple[msg.TopicPartitions, ...]


class _Close(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class TopicNames:
    """Topic id -> name, learnt from Metadata responses (v10+), for the rare client that
    sends Produce/Fetch by topic id despite the capped ApiVersions answer."""

    def __init__(self, max_entries: int = DEFAULT_MAX_TOPIC_IDS) -> None:
        self._names: dict[uuid.UUID, str] = {}
        self._max = max_entries

    def learn(self, topic_id: uuid.UUID | None, name: str | None) -> None:
        if topic_id is None or name is None or topic_id == _NIL_UUID:
            return
        if topic_id in self._names or len(self._names) < self._max:
            self._names[topic_id] = name

    def name(self, ref: msg.TopicRef) -> str | None:
        if isinstance(ref, str):
            return ref
        return self._names.get(ref)


class KafkaBrokerFilter:
    """Per filter chain: config, metrics and topic names shared by its sessions."""

    def __init__(self, config: KafkaBrokerConfig, families: MetricFamilies, *,
                 max_decoded_frame_bytes: int = DEFAULT_MAX_DECODED_FRAME_BYTES,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.config = config
        self.metrics = KafkaMetrics(families, config.stat_prefix)
        self.topic_names = TopicNames()
        self.max_decoded_frame_bytes = max_decoded_frame_bytes
        self.max_in_flight = max_in_flight
        self.clock = clock
        # a response that cannot be matched to its request cannot be edited
        self.needs_responses = (config.rewrites_broker_addresses or config.force_response_rewrite
                                or config.topic_acl is not None)

    def session(self, principal: str | None) -> KafkaBrokerSession:
        """A processor for one downstream connection; ``principal`` is the client
        certificate's SPIFFE ID (None without one)."""
        return KafkaBrokerSession(self, principal)

    def cap_versions(self, api_key: int, lo: int, hi: int) -> tuple[int, int]:
        """The version range advertised to clients for one ApiVersions entry."""
        if api_key in _OUTSIDE_ACL and self.config.topic_acl is not None:
            return 1, 0     # an empty range: the entry is removed
        rng = version_range(api_key)
        if rng is None:
            return lo, hi   # unknown to the codec: its frames pass through undecoded
        hi = min(hi, rng[1])
        if api_key in _ACL_APIS:
            hi = min(hi, MAX_NAMED_TOPIC_VERSION)
            if self.config.topic_acl is not None:
                lo = max(lo, rng[0])   # never let a client pick a version the ACL can't read
        return lo, hi


class KafkaBrokerSession:
    """The filter on one connection. Not thread-safe: call from the connection's loop."""

    def __init__(self, owner: KafkaBrokerFilter, principal: str | None) -> None:
        self._owner = owner
        self._config = owner.config
        self._metrics = owner.metrics
        self._clock = owner.clock
        self._acl = owner.config.topic_acl
        self.principal = principal
        self._requests = FrameSplitter(owner.max_decoded_frame_bytes)
        self._responses = FrameSplitter(owner.max_decoded_frame_bytes)
        self._tracker: CorrelationTracker[_DeniedTopics] = CorrelationTracker(owner.max_in_flight)
        self._decisions: dict[tuple[TopicOperation, str], bool] = {}
        self._closed = False

    # ---- the interface -----------------------------------------------------------------------

    def on_downstream_bytes(self, data: bytes) -> FilterOutput:
        up: list[bytes] = []
        down: list[bytes] = []
        try:
            for event in self._requests.feed(data):
                if type(event) is Frame:
                    self._on_request(event, up, down)
                elif type(event) is PassThroughBytes:
                    up.append(event.data)
                else:
                    assert isinstance(event, OversizedFrameStart)
                    self._on_oversized_request(event, up)
        except KafkaFramingError:
            return self._close(up, down, "request_framing")
        except _Close as e:
            return self._close(up, down, e.reason)
        return FilterOutput(b"".join(up), b"".join(down))

    def on_upstream_bytes(self, data: bytes) -> FilterOutput:
        down: list[bytes] = []
        try:
            events = self._responses.feed(data)
        except KafkaFramingError:
            return self._close([], down, "response_framing")
        for event in events:
            if type(event) is Frame:
                self._on_response(event, down)
                down.extend(self._tracker.take_ready())
            elif type(event) is PassThroughBytes:
                down.append(event.data)
            else:
                assert isinstance(event, OversizedFrameStart)
                self._on_oversized_response(event, down)
        if not self._responses.in_oversized_frame:
            down.extend(self._tracker.take_ready())
        return FilterOutput(b"", b"".join(down))

    def on_close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pending = self._tracker.clear()
        if pending:
            self._metrics.unanswered("connection_closed", pending)

    # ---- requests ----------------------------------------------------------------------------

    def _on_request(self, frame: Frame, up: list[bytes], down: list[bytes]) -> None:
        payload = frame.payload
        try:
            header = parse_request_header(payload)
        except KafkaDecodeError:
            self._metrics.undecoded("request", "decode_error")
            if self._acl is not None and self._may_be_acl_api(payload):
                raise _Close("undecodable_request") from None
            up.append(frame.raw)
            return
        self._metrics.request(header.api_key)
        if self._acl is not None and header.api_key in _OUTSIDE_ACL:
            raise _Close("api_outside_topic_acl")
        if header.schema is None:
            self._metrics.undecoded("request", "unknown_version")
            if self._acl is not None and header.api_key in _ACL_APIS:
                raise _Close("unsupported_version")
            self._track(header)
            up.append(frame.raw)
            return
        if header.api_key == msg.PRODUCE:
            self._on_produce(frame, header, header.schema, up, down)
        elif header.api_key == msg.FETCH and self._acl is not None:
            self._on_fetch(frame, header, header.schema, up, down)
        else:
            self._track(header)
            up.append(frame.raw)

    def _on_produce(self, frame: Frame, header: RequestHeader, schema: ApiSchema,
                    up: list[bytes], down: list[bytes]) -> None:
        body = self._decode_request(frame, header, schema, up)
        if body is None:
            return
        acks = msg.produce_acks(body)
        kept = body
        denied: tuple[msg.TopicPartitions, ...] = ()
        if self._acl is not None:
            kept, denied = msg.split_produce_request(
                body, lambda ref: self._is_denied(TopicOperation.PRODUCE, ref))
        names = self._owner.topic_names
        denied_refs = {d.topic for d in denied}
        for ref, partitions in msg.produce_topic_data(body):
            if ref in denied_refs:
                continue
            records = size = 0
            for p in partitions:
                if p.records:
                    records += count_records(p.records).records
                    size += len(p.records)
            self._metrics.topic_traffic("produce", names.name(ref) or str(ref), records, size)
        if not denied:
            if acks != 0:
                self._track(header)
            up.append(frame.raw)
            return
        self._count_denied("produce", denied)
        if kept.topic_data:
            if acks != 0:
                self._track(header, context=_DeniedTopics(msg.PRODUCE, denied))
            up.append(msg.encode_frame(frame.payload[:header.size], schema, kept, True))
        elif acks != 0:   # acks=0 expects no answer: a fully denied one just goes nowhere
            self._answer_locally(header, schema,
                                 msg.produce_error_response(schema, denied, _DENIED), down)

    def _on_fetch(self, frame: Frame, header: RequestHeader, schema: ApiSchema,
                  up: list[bytes], down: list[bytes]) -> None:
        body = self._decode_request(frame, header, schema, up)
        if body is None:
            return
        kept, denied = msg.split_fetch_request(
            body, lambda ref: self._is_denied(TopicOperation.FETCH, ref))
        if not denied:
            self._track(header)
            up.append(frame.raw)
            return
        self._count_denied("fetch", denied)
        if kept.topics:
            self._track(header, context=_DeniedTopics(msg.FETCH, denied))
            up.append(msg.encode_frame(frame.payload[:header.size], schema, kept, True))
        else:
            self._answer_locally(header, schema,
                                 msg.fetch_error_response(schema, denied, _DENIED), down)

    def _decode_request(self, frame: Frame, header: RequestHeader, schema: ApiSchema,
                        up: list[bytes]) -> Any | None:
        assert header.size is not None
        try:
            body, trailing = msg.decode_body(frame.payload, header.size, schema, True)
            if trailing:
                self._metrics.trailing_bytes("request")
            return body
        except KafkaDecodeError:
            self._metrics.undecoded("request", "decode_error")
            if self._acl is not None:
                raise _Close("undecodable_request") from None
            self._track(header)
            up.append(frame.raw)
            return None

    def _on_oversized_request(self, event: OversizedFrameStart, up: list[bytes]) -> None:
        api_key, version, correlation_id = peek_request_head(
            memoryview(event.head)[LENGTH_PREFIX_BYTES:])
        self._metrics.request(api_key)
        self._metrics.undecoded("request", "oversized")
        if self._acl is not None and api_key in _ACL_APIS:
            raise _Close("oversized_request")
        self._track_ids(correlation_id, api_key, version, None)
        up.append(event.head)

    def _may_be_acl_api(self, payload: memoryview) -> bool:
        try:
            api_key, _, _ = peek_request_head(payload)
        except KafkaDecodeError:
            return False   # not even a header: the broker cannot read it either
        return api_key in _ACL_APIS

    def _is_denied(self, operation: TopicOperation, ref: msg.TopicRef) -> bool:
        assert self._acl is not None
        name = self._owner.topic_names.name(ref)
        if name is None:
            return True   # a topic id never seen in Metadata: fail closed
        key = (operation, name)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._acl.decide(self.principal, name, operation) is AclAction.DENY
            if len(self._decisions) >= _ACL_CACHE_ENTRIES:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    def _count_denied(self, api: str, denied: tuple[msg.TopicPartitions, ...]) -> None:
        names = self._owner.topic_names
        for d in denied:
            self._metrics.acl_denied(api, names.name(d.topic) or str(d.topic))

    def _track(self, header: RequestHeader, context: _DeniedTopics | None = None) -> None:
        self._track_ids(header.correlation_id, header.api_key, header.api_version, context)

    def _track_ids(self, correlation_id: int, api_key: int, version: int,
                   context: _DeniedTopics | None) -> None:
        entry: InFlight[_DeniedTopics] = InFlight(correlation_id, api_key, version,
                                                  self._clock(), context)
        if not self._tracker.track(entry):
            # its response could not be matched: it would pass unrewritten (leaking broker
            # addresses) or without the denied topics; never guess, close instead
            if context is not None or self._owner.needs_responses:
                raise _Close("untrackable_request")
            self._metrics.unanswered("untracked", 1)

    def _answer_locally(self, header: RequestHeader, schema: ApiSchema, body: Any,
                        down: list[bytes]) -> None:
        frame = msg.encode_frame(msg.response_header_bytes(schema, header.correlation_id),
                                 schema, body, False)
        entry: InFlight[_DeniedTopics] = InFlight(header.correlation_id, header.api_key,
                                                  header.api_version, self._clock(),
                                                  local_response=frame)
        if not self._tracker.track(entry):
            raise _Close("untrackable_request")
        self._metrics.response(header.api_key, 0.0)
        for code in msg.error_codes(body):
            self._metrics.response_error(header.api_key, code)
        if not self._responses.in_oversized_frame:   # never inside a frame being streamed
            down.extend(self._tracker.take_ready())

    # ---- responses ---------------------------------------------------------------------------

    def _on_response(self, frame: Frame, down: list[bytes]) -> None:
        payload = frame.payload
        try:
            correlation_id = peek_correlation_id(payload)
        except KafkaDecodeError:
            self._metrics.undecoded("response", "decode_error")
            down.append(frame.raw)
            return
        request = self._match(correlation_id, down)
        if request is None:
            down.append(frame.raw)
            return
        schema = api_schema(request.api_key, request.api_version)
        if schema is None:
            self._metrics.undecoded("response", "unknown_version")
            down.append(frame.raw)
            return
        if request.api_key == msg.API_VERSIONS:
            schema = _api_versions_schema(payload, schema)
        try:
            header_size = response_header_size(payload, schema.response_header_version)
            body, trailing = msg.decode_body(payload, header_size, schema, False)
        except KafkaDecodeError:
            self._metrics.undecoded("response", "decode_error")
            if request.context is not None:
                self._metrics.unanswered("denied_topics_not_merged", 1)
            down.append(frame.raw)
            return
        if trailing:
            self._metrics.trailing_bytes("response")
        edited = self._inspect_response(request, body)
        if edited is None:
            down.append(frame.raw)
        else:
            down.append(msg.encode_frame(payload[:header_size], schema, edited, False))

    def _match(self, correlation_id: int, down: list[bytes]) -> InFlight[_DeniedTopics] | None:
        match = self._tracker.match(correlation_id)
        down.extend(match.send_before)
        if match.dropped:
            self._metrics.unanswered("skipped_by_broker", match.dropped)
        request = match.request
        if request is None:
            self._metrics.undecoded("response", "unknown_correlation")
            return None
        self._metrics.response(request.api_key, (self._clock() - request.started_ns) / 1e9)
        return request

    def _inspect_response(self, request: InFlight[_DeniedTopics], body: Any) -> Any | None:
        """Count what the response says; return the edited body, or None to pass it as is."""
        api_key = request.api_key
        metrics = self._metrics
        for code in msg.error_codes(body):
            metrics.response_error(api_key, code)
        if api_key == msg.FETCH:
            self._count_fetched(body)
        elif api_key == msg.METADATA:
            names = self._owner.topic_names
            for topic in body.topics:
                names.learn(getattr(topic, "topic_id", None), topic.name)
        edited: Any | None = None
        if api_key == msg.API_VERSIONS:
            edited = msg.cap_api_versions(body, self._owner.cap_versions)
            if edited is not None:
                metrics.rewritten(api_key, "api_versions")
        if api_key in _ADDRESS_APIS and self._config.rewrites_broker_addresses:
            result = msg.rewrite_broker_addresses(api_key, body, self._config.broker_address)
            if result.unmatched:
                metrics.unrewritten_brokers(api_key, result.unmatched)
            if result.rewritten:
                edited = result.body
                metrics.rewritten(api_key, "broker_address")
        denied = request.context
        if denied is not None:
            base = edited if edited is not None else body
            if denied.api_key == msg.PRODUCE:
                edited = msg.add_produce_errors(base, denied.topics, _DENIED)
            else:
                edited = msg.add_fetch_errors(base, denied.topics, _DENIED)
            for _ in range(sum(len(t.partitions) for t in denied.topics)):
                metrics.response_error(api_key, int(_DENIED))
            metrics.rewritten(api_key, "topic_acl")
        if edited is None and self._config.force_response_rewrite:
            edited = body
            metrics.rewritten(api_key, "forced")
        return edited

    def _count_fetched(self, body: Any) -> None:
        names = self._owner.topic_names
        for ref, records in msg.fetch_response_records(body):
            if records:
                counts = count_records(records)
                self._metrics.topic_traffic("fetch", names.name(ref) or str(ref),
                                            counts.records, len(records))

    def _on_oversized_response(self, event: OversizedFrameStart, down: list[bytes]) -> None:
        correlation_id = peek_correlation_id(memoryview(event.head)[LENGTH_PREFIX_BYTES:])
        request = self._match(correlation_id, down)
        self._metrics.undecoded("response", "oversized")
        if request is not None and request.context is not None:
            self._metrics.unanswered("denied_topics_not_merged", 1)
        down.append(event.head)

    # ---- closing -----------------------------------------------------------------------------

    def _close(self, up: list[bytes], down: list[bytes], reason: str) -> FilterOutput:
        self._metrics.closed(reason)
        self.on_close()
        return FilterOutput(b"".join(up), b"".join(down), close=True, close_reason=reason)


def _api_versions_schema(payload: memoryview, schema: ApiSchema) -> ApiSchema:
    """A broker that does not support the ApiVersions version asked answers in v0 with
    UNSUPPORTED_VERSION (KIP-511), so the client can retry with one it supports."""
    if schema.version > 0 and len(payload) >= 6 \
            and int.from_bytes(payload[4:6], "big", signed=True) == _UNSUPPORTED_VERSION:
        v0 = api_schema(msg.API_VERSIONS, 0)
        assert v0 is not None
        return v0
    return schema
