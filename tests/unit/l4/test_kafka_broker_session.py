"""The Kafka broker filter as a pure two-direction processor: bytes in, bytes out.

Frames are written with kio (Kafka's published definitions); the real-client behaviour is in
tests/integration/test_kafka_broker_mock.py.
"""

from __future__ import annotations

import struct
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st
from kafka_wire import (
    decode_request,
    decode_response,
    record_batch,
    request_frame,
    response_frame,
)
from kio.schema.errors import ErrorCode
from kio.static.primitive import Records, i16, i32, i64
from prometheus_client import CollectorRegistry

from sidecar.codec.kafka import messages as m
from sidecar.codec.kafka.schema import api_schema
from sidecar.config.kafka import (
    BrokerAddressRewriteRule,
    KafkaBrokerConfig,
    topic_acl_from_native,
)
from sidecar.l4.kafka_broker import FilterOutput, KafkaBrokerFilter
from sidecar.l4.kafka_metrics import RegistryFamilies

SHOP = "spiffe://td/ns/shop/sa/api"
ACL = topic_acl_from_native({"default_action": "DENY", "rules": [
    {"action": "ALLOW", "principals": [{"exact": SHOP}], "topics": [{"prefix": "orders"}],
     "operations": ["PRODUCE", "FETCH"]}]}, "acl")


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        self.now += 1_000_000   # 1 ms per reading
        return self.now


def make(acl=None, rules=(), force=False, max_frame=1 << 20):
    registry = CollectorRegistry()
    config = KafkaBrokerConfig(stat_prefix="k", force_response_rewrite=force,
                               broker_address_rewrite_rules=tuple(rules), topic_acl=acl)
    filt = KafkaBrokerFilter(config, RegistryFamilies(registry), clock=Clock(),
                             max_decoded_frame_bytes=max_frame)
    return filt, registry


def value(registry, name, **labels) -> float:
    return registry.get_sample_value(name, {"stat_prefix": "k", **labels}) or 0.0


def sibling(api_key, version, name, response=True):
    schema = api_schema(api_key, version)
    codec = schema.response if response else schema.request
    return m._sibling(codec.entity_type, name)


def produce(version, cid, topics, acks=-1):
    req = api_schema(m.PRODUCE, version).request.entity_type
    topic_type = m._sibling(req, "TopicProduceData")
    part_type = m._sibling(req, "PartitionProduceData")
    body = req(transactional_id=None, acks=i16(acks), timeout=m._ZERO_THROTTLE, topic_data=tuple(
        topic_type(name=name, partition_data=tuple(
            part_type(index=i32(p), records=Records(record_batch([b"a", b"bb", b"ccc"])))
            for p in parts))
        for name, parts in topics.items()))
    return request_frame(m.PRODUCE, version, cid, body)


def produce_ok(version, cid, topics):
    resp = api_schema(m.PRODUCE, version).response.entity_type
    topic_type = m._sibling(resp, "TopicProduceResponse")
    part_type = m._sibling(resp, "PartitionProduceResponse")
    body = m._build(resp, responses=tuple(
        topic_type(name=name, partition_responses=tuple(
            m._build(part_type, index=i32(p), error_code=ErrorCode.none, base_offset=i64(10))
            for p in parts))
        for name, parts in topics.items()))
    return response_frame(m.PRODUCE, version, cid, body)


def fetch(version, cid, topics, session_id=0):
    req = api_schema(m.FETCH, version).request.entity_type
    topic_type = m._sibling(req, "FetchTopic")
    part_type = m._sibling(req, "FetchPartition")
    key = m._topic_key_field(topic_type)
    body = m._build(req, replica_id=i32(-1), max_wait=m._ZERO_THROTTLE, min_bytes=i32(1),
                    max_bytes=i32(1 << 20), isolation_level=0, session_id=i32(session_id),
                    session_epoch=i32(0), forgotten_topics_data=(), rack_id="",
                    topics=tuple(topic_type(**{key: ref}, partitions=tuple(
                        m._build(part_type, partition=i32(p), fetch_offset=i64(0),
                                 partition_max_bytes=i32(1 << 20), current_leader_epoch=i32(-1),
                                 log_start_offset=i64(-1), last_fetched_epoch=i32(-1))
                        for p in parts)) for ref, parts in topics.items()))
    return request_frame(m.FETCH, version, cid, body)


def fetch_ok(version, cid, topics):
    resp = api_schema(m.FETCH, version).response.entity_type
    topic_type = m._sibling(resp, "FetchableTopicResponse")
    part_type = m._sibling(resp, "PartitionData")
    key = m._topic_key_field(topic_type)
    body = m._build(resp, error_code=ErrorCode.none, session_id=i32(5), responses=tuple(
        topic_type(**{key: ref}, partitions=tuple(
            m._build(part_type, partition_index=i32(p), error_code=ErrorCode.none,
                     high_watermark=i64(3), records=Records(record_batch([b"r1", b"r2"])))
            for p in parts)) for ref, parts in topics.items()))
    return response_frame(m.FETCH, version, cid, body)


def metadata_request(version, cid):
    req = api_schema(m.METADATA, version).request.entity_type
    return request_frame(m.METADATA, version, cid, m._build(
        req, topics=None, allow_auto_topic_creation=True,
        include_topic_authorized_operations=False, include_cluster_authorized_operations=False))


def metadata_response(version, cid, brokers, topics=()):
    resp = api_schema(m.METADATA, version).response.entity_type
    broker_type = m._sibling(resp, "MetadataResponseBroker")
    topic_type = m._sibling(resp, "MetadataResponseTopic")
    body = m._build(resp, error_code=ErrorCode.none, cluster_id="c", controller_id=i32(1),
                    cluster_authorized_operations=i32(0),
                    brokers=tuple(m._build(broker_type, node_id=i32(b), host=h, port=i32(p),
                                           rack=None) for b, h, p in brokers),
                    topics=tuple(m._build(topic_type, error_code=ErrorCode.none, name=name,
                                          topic_id=tid, is_internal=False, partitions=(),
                                          topic_authorized_operations=i32(0))
                                 for name, tid in topics))
    return response_frame(m.METADATA, version, cid, body)


def run(session, chunks_down=(), chunks_up=()) -> tuple[bytes, bytes]:
    up, down = b"", b""
    for c in chunks_down:
        out = session.on_downstream_bytes(c)
        assert not out.close, out.close_reason
        up += out.to_upstream
        down += out.to_downstream
    for c in chunks_up:
        out = session.on_upstream_bytes(c)
        assert not out.close and out.to_upstream == b""
        down += out.to_downstream
    return up, down


# ---- pass-through ------------------------------------------------------------------------------

REQUESTS = [metadata_request(12, 1), produce(9, 2, {"orders": [0, 1]}),
            fetch(11, 3, {"orders": [0]}), produce(7, 4, {"logs": [2]})]
RESPONSES = [metadata_response(12, 1, [(1, "b1", 9092)]), produce_ok(9, 2, {"orders": [0, 1]}),
             fetch_ok(11, 3, {"orders": [0]}), produce_ok(7, 4, {"logs": [2]})]


@settings(max_examples=60, deadline=None)
@given(cuts_down=st.lists(st.integers(min_value=1, max_value=400), max_size=10),
       cuts_up=st.lists(st.integers(min_value=1, max_value=400), max_size=10))
def test_frames_that_need_no_change_pass_byte_identical(cuts_down, cuts_up) -> None:
    def chop(data: bytes, cuts: list[int]) -> list[bytes]:
        out, pos = [], 0
        for c in cuts:
            out.append(data[pos:pos + c])
            pos += c
        return [x for x in out + [data[pos:]] if x]

    filt, registry = make()
    session = filt.session(None)
    requests, responses = b"".join(REQUESTS), b"".join(RESPONSES)
    up, down = run(session, chop(requests, cuts_down), chop(responses, cuts_up))
    assert up == requests and down == responses
    assert value(registry, "sidecar_kafka_requests_total", api="produce") == 2
    assert value(registry, "sidecar_kafka_responses_total", api="fetch") == 1
    assert value(registry, "sidecar_kafka_topic_records_total", api="produce",
                 topic="orders") == 6   # 2 partitions x 3 records
    assert value(registry, "sidecar_kafka_topic_records_total", api="fetch",
                 topic="orders") == 2
    batch = len(record_batch([b"a", b"bb", b"ccc"]))
    assert value(registry, "sidecar_kafka_topic_bytes_total", api="produce",
                 topic="logs") == batch
    assert value(registry, "sidecar_kafka_response_duration_seconds_count", api="metadata") == 1


def test_unknown_correlation_and_unknown_versions_pass_through_counted() -> None:
    filt, registry = make()
    session = filt.session(None)
    stray = metadata_response(12, 99, [(1, "b1", 1)])
    # Produce v2 has no published definition any more (KIP-896): header only
    old_produce = struct.pack(">hhih", 0, 2, 5, 1) + b"c" + b"\x00\x01opaque-body"
    old_frame = struct.pack(">i", len(old_produce)) + old_produce
    up, down = run(session, [old_frame], [stray])
    assert up == old_frame and down == stray
    assert value(registry, "sidecar_kafka_undecoded_frames_total", direction="response",
                 reason="unknown_correlation") == 1
    assert value(registry, "sidecar_kafka_undecoded_frames_total", direction="request",
                 reason="unknown_version") == 1


def test_garbage_frame_passes_through_counted() -> None:
    filt, registry = make()
    session = filt.session(None)
    garbage = struct.pack(">i", 3) + b"xyz"
    bad_body = request_frame(m.METADATA, 12, 1, m._build(
        api_schema(m.METADATA, 12).request.entity_type, topics=None,
        allow_auto_topic_creation=True, include_topic_authorized_operations=False))[:-1]
    bad_body = struct.pack(">i", len(bad_body) - 4) + bad_body[4:]
    up, _ = run(session, [garbage, bad_body])
    assert up == garbage + bad_body   # a Metadata body is not decoded on the request side
    assert value(registry, "sidecar_kafka_undecoded_frames_total", direction="request",
                 reason="decode_error") == 1


# ---- rewriting -------------------------------------------------------------------------------

def test_broker_addresses_rewritten_only_where_a_rule_matches() -> None:
    filt, registry = make(rules=[BrokerAddressRewriteRule(1, "proxy", 19092)])
    session = filt.session(None)
    run(session, [metadata_request(12, 1)])
    _, down = run(session, chunks_up=[metadata_response(12, 1, [(1, "b1", 9092),
                                                                (2, "b2", 9093)])])
    cid, body = decode_response(m.METADATA, 12, down)
    assert cid == 1
    assert [(b.host, b.port) for b in body.brokers] == [("proxy", 19092), ("b2", 9093)]
    assert value(registry, "sidecar_kafka_rewritten_responses_total", api="metadata",
                 reason="broker_address") == 1
    assert value(registry, "sidecar_kafka_unrewritten_brokers_total", api="metadata") == 1


def test_force_response_rewrite_re_encodes_every_decoded_response() -> None:
    filt, registry = make(force=True)
    session = filt.session(None)
    run(session, [metadata_request(12, 1)])
    resp = metadata_response(12, 1, [(1, "b1", 9092)])
    _, down = run(session, chunks_up=[resp])
    assert down == resp   # kio re-encodes a kio-written frame to the same bytes
    assert value(registry, "sidecar_kafka_rewritten_responses_total", api="metadata",
                 reason="forced") == 1


def api_versions_response(version, cid, entries, error=ErrorCode.none):
    resp = api_schema(m.API_VERSIONS, version).response.entity_type
    entry = m._sibling(resp, "ApiVersion")
    return response_frame(m.API_VERSIONS, version, cid, m._build(
        resp, error_code=error, api_keys=tuple(
            entry(api_key=i16(k), min_version=i16(lo), max_version=i16(hi))
            for k, lo, hi in entries)))


def test_api_versions_capped_to_named_topic_versions_and_decodable_ones() -> None:
    broker = [(0, 0, 13), (1, 0, 17), (3, 0, 13), (18, 0, 4), (12345, 0, 1)]
    for acl, produce_min, fetch_min in ((None, 0, 0), (ACL, 3, 4)):
        filt, _ = make(acl=acl)
        session = filt.session(SHOP)
        run(session, [request_frame(m.API_VERSIONS, 3, 1, api_schema(
            m.API_VERSIONS, 3).request.entity_type(client_software_name="t",
                                                   client_software_version="1"))])
        _, down = run(session, chunks_up=[api_versions_response(3, 1, broker)])
        _, body = decode_response(m.API_VERSIONS, 3, down)
        assert [(e.api_key, e.min_version, e.max_version) for e in body.api_keys] == [
            (0, produce_min, 12), (1, fetch_min, 12), (3, 0, 13), (18, 0, 4), (12345, 0, 1)]


def test_api_versions_unsupported_version_answer_is_read_as_v0() -> None:
    filt, _ = make()
    session = filt.session(None)
    run(session, [request_frame(m.API_VERSIONS, 4, 1, api_schema(
        m.API_VERSIONS, 4).request.entity_type(client_software_name="t",
                                               client_software_version="1"))])
    # KIP-511: the broker answers a version it lacks in v0, with UNSUPPORTED_VERSION
    answer = api_versions_response(0, 1, [(1, 0, 16), (18, 0, 3)],
                                   error=ErrorCode.unsupported_version)
    _, down = run(session, chunks_up=[answer])
    _, body = decode_response(m.API_VERSIONS, 0, down)
    assert body.error_code == ErrorCode.unsupported_version
    assert [(e.api_key, e.max_version) for e in body.api_keys] == [(1, 12), (18, 3)]


# ---- topic ACL -------------------------------------------------------------------------------

def test_partial_produce_denial_forwards_allowed_topics_and_merges_the_answer() -> None:
    filt, registry = make(acl=ACL)
    session = filt.session(SHOP)
    up, down = run(session, [produce(9, 7, {"orders": [0], "payroll": [1, 2]})])
    assert down == b""
    forwarded = decode_request(m.PRODUCE, 9, up)
    assert [t.name for t in forwarded.topic_data] == ["orders"]
    _, down = run(session, chunks_up=[produce_ok(9, 7, {"orders": [0]})])
    cid, body = decode_response(m.PRODUCE, 9, down)
    assert cid == 7
    assert {t.name: [(int(p.index), int(p.error_code)) for p in t.partition_responses]
            for t in body.responses} == {"orders": [(0, 0)], "payroll": [(1, 29), (2, 29)]}
    assert value(registry, "sidecar_kafka_acl_denied_total", api="produce", topic="payroll") == 1
    assert value(registry, "sidecar_kafka_topic_records_total", api="produce",
                 topic="payroll") == 0
    assert value(registry, "sidecar_kafka_response_errors_total", api="produce",
                 error_code="29", error="TOPIC_AUTHORIZATION_FAILED") == 2


def test_fully_denied_request_is_answered_locally_in_request_order() -> None:
    filt, registry = make(acl=ACL)
    session = filt.session("spiffe://td/ns/other/sa/x")
    up, down = run(session, [metadata_request(12, 1), produce(9, 2, {"orders": [0]}),
                             fetch(11, 3, {"orders": [0, 1]}, session_id=44)])
    assert up == metadata_request(12, 1)   # nothing denied goes upstream
    assert down == b""                     # held: the Metadata answer must come first
    metadata = metadata_response(12, 1, [(1, "b1", 1)])
    _, down = run(session, chunks_up=[metadata])
    assert down.startswith(metadata)
    rest = down[len(metadata):]
    produce_len = struct.unpack(">i", rest[:4])[0] + 4
    cid, produce_body = decode_response(m.PRODUCE, 9, rest[:produce_len])
    assert cid == 2 and list(m.error_codes(produce_body)) == [29]
    cid, fetch_body = decode_response(m.FETCH, 11, rest[produce_len:])
    assert cid == 3 and list(m.error_codes(fetch_body)) == [29, 29]
    assert fetch_body.session_id == 0
    assert value(registry, "sidecar_kafka_acl_denied_total", api="fetch", topic="orders") == 1


def test_denied_request_with_nothing_pending_is_answered_at_once() -> None:
    filt, _ = make(acl=ACL)
    session = filt.session(None)   # no client certificate: only "any" rules match
    up, down = run(session, [fetch(12, 9, {"orders": [0]})])
    assert up == b""
    cid, body = decode_response(m.FETCH, 12, down)
    assert cid == 9 and [int(p.error_code) for p in body.responses[0].partitions] == [29]


def test_acks_zero_denied_produce_goes_nowhere() -> None:
    filt, _ = make(acl=ACL)
    session = filt.session(None)
    up, down = run(session, [produce(9, 1, {"orders": [0]}, acks=0)])
    assert (up, down) == (b"", b"")
    # and an allowed acks=0 produce is forwarded but not tracked (no answer will come)
    session = filt.session(SHOP)
    frame = produce(9, 2, {"orders": [0]}, acks=0)
    up, _ = run(session, [frame, metadata_request(12, 3)])
    _, down = run(session, chunks_up=[metadata_response(12, 3, [])])
    assert up.startswith(frame) and down == metadata_response(12, 3, [])


def test_fetch_by_topic_id_resolves_names_from_metadata_and_fails_closed() -> None:
    filt, registry = make(acl=ACL)
    session = filt.session(SHOP)
    known, unknown = uuid.uuid4(), uuid.uuid4()
    run(session, [metadata_request(12, 1)],
        [metadata_response(12, 1, [], topics=[("orders", known)])])
    up, down = run(session, [fetch(13, 2, {known: [0], unknown: [0]})])
    forwarded = decode_request(m.FETCH, 13, up)
    assert [t.topic_id for t in forwarded.topics] == [known]
    _, down = run(session, chunks_up=[fetch_ok(13, 2, {known: [0]})])
    _, body = decode_response(m.FETCH, 13, down)
    assert {t.topic_id: int(t.partitions[0].error_code) for t in body.responses} == \
        {known: 0, unknown: 29}
    assert value(registry, "sidecar_kafka_topic_records_total", api="fetch",
                 topic="orders") == 2


def close_of(session, data: bytes) -> FilterOutput:
    return session.on_downstream_bytes(data)


def test_under_an_acl_unreadable_produce_or_fetch_closes_the_connection() -> None:
    filt, registry = make(acl=ACL)
    old = struct.pack(">hhih", 0, 2, 5, 1) + b"c" + b"\x00\x01body"
    out = close_of(filt.session(SHOP), struct.pack(">i", len(old)) + old)
    assert out.close and out.close_reason == "unsupported_version" and out.to_upstream == b""
    broken = produce(9, 1, {"orders": [0]})[:-5]
    broken = struct.pack(">i", len(broken) - 4) + broken[4:]
    out = close_of(filt.session(SHOP), metadata_request(12, 1) + broken)
    assert out.close and out.close_reason == "undecodable_request"
    assert out.to_upstream == metadata_request(12, 1)   # what came before still goes
    assert value(registry, "sidecar_kafka_closed_connections_total",
                 reason="undecodable_request") == 1
    # without an ACL the same frame just passes, counted
    plain, _ = make()
    up, _ = run(plain.session(None), [broken])
    assert up == broken


def test_oversized_frames_stream_through_undecoded() -> None:
    filt, registry = make(max_frame=64)
    session = filt.session(None)
    big = produce(9, 1, {"orders": [0, 1, 2]})
    assert len(big) > 68
    up, _ = run(session, [big[:30], big[30:]])
    assert up == big
    resp = produce_ok(9, 1, {"orders": [0, 1, 2]})
    _, down = run(session, chunks_up=[resp[:20], resp[20:]])
    assert down == resp
    assert value(registry, "sidecar_kafka_undecoded_frames_total", direction="request",
                 reason="oversized") == 1
    assert value(registry, "sidecar_kafka_responses_total", api="produce") == 1
    acl_filter, _ = make(acl=ACL, max_frame=64)
    out = close_of(acl_filter.session(SHOP), big)
    assert out.close and out.close_reason == "oversized_request"


def test_local_answer_waits_while_an_oversized_response_streams() -> None:
    filt, _ = make(acl=ACL, max_frame=120)
    session = filt.session(SHOP)
    run(session, [fetch(11, 1, {"orders": [0]})])
    big = fetch_ok(11, 1, {"orders": [0, 1, 2]})
    assert len(big) > 124
    _, down = run(session, chunks_up=[big[:30]])       # mid-frame toward the client
    _, local = run(session, [fetch(11, 2, {"secret": [0]})])
    assert local == b""                                 # must not cut into that frame
    _, rest = run(session, chunks_up=[big[30:]])
    assert down + rest[:len(big) - 30] == big
    cid, body = decode_response(m.FETCH, 11, rest[len(big) - 30:])
    assert cid == 2 and int(body.responses[0].partitions[0].error_code) == 29


def test_negative_length_closes() -> None:
    filt, _registry = make()
    out = close_of(filt.session(None), struct.pack(">i", -1))
    assert out.close and out.close_reason == "request_framing"


def test_on_close_counts_unanswered() -> None:
    filt, registry = make()
    session = filt.session(None)
    run(session, [metadata_request(12, 1), metadata_request(12, 2)])
    session.on_close()
    assert value(registry, "sidecar_kafka_unanswered_requests_total",
                 reason="connection_closed") == 2


def test_share_fetch_is_not_offered_nor_forwarded_under_an_acl() -> None:
    filt, _ = make(acl=ACL)
    session = filt.session(SHOP)
    run(session, [request_frame(m.API_VERSIONS, 0, 1, api_schema(
        m.API_VERSIONS, 0).request.entity_type())])
    _, down = run(session, chunks_up=[api_versions_response(0, 1, [(1, 0, 16), (78, 1, 1),
                                                                   (79, 1, 1)])])
    _, body = decode_response(m.API_VERSIONS, 0, down)
    assert [e.api_key for e in body.api_keys] == [1]
    share_fetch = struct.pack(">hhih", 78, 1, 2, 1) + b"c" + b"\x00" + b"opaque"
    out = close_of(session, struct.pack(">i", len(share_fetch)) + share_fetch)
    assert out.close and out.close_reason == "api_outside_topic_acl" and out.to_upstream == b""


def test_an_unmatchable_response_closes_rather_than_leaking_addresses() -> None:
    registry = CollectorRegistry()
    config = KafkaBrokerConfig(stat_prefix="k", broker_address_rewrite_rules=(
        BrokerAddressRewriteRule(1, "proxy", 1),))
    filt = KafkaBrokerFilter(config, RegistryFamilies(registry), max_in_flight=1)
    session = filt.session(None)
    out = close_of(session, metadata_request(12, 1) + metadata_request(12, 2))
    assert out.close and out.close_reason == "untrackable_request"
    assert out.to_upstream == metadata_request(12, 1)
    # with nothing to edit, the same just passes (and is counted)
    plain = KafkaBrokerFilter(KafkaBrokerConfig(stat_prefix="k"),
                              RegistryFamilies(CollectorRegistry()), max_in_flight=1)
    up, _ = run(plain.session(None), [metadata_request(12, 1) + metadata_request(12, 1)])
    assert up == metadata_request(12, 1) * 2
