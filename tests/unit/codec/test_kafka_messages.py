"""Message edits: error answers, topic splits, broker address rewriting, version caps."""

from __future__ import annotations

import dataclasses
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st
from kafka_wire import record_batch
from kio.schema.errors import ErrorCode
from kio.static.primitive import Records, i16, i32

from sidecar.codec.kafka import messages as m
from sidecar.codec.kafka.schema import api_schema, version_range

DENIED = ErrorCode.topic_authorization_failed


def sibling(schema, name):
    return m._sibling(schema.response.entity_type, name)


def ref_for(version: int, name: str) -> m.TopicRef:
    return uuid.uuid5(uuid.NAMESPACE_DNS, name) if version >= 13 else name


def round_trip(schema, body):
    header = m.response_header_bytes(schema, 9)
    frame = m.encode_frame(header, schema, body, is_request=False)
    back, trailing = m.decode_body(frame[4:], len(header), schema, is_request=False)
    assert trailing == 0
    return back


def test_produce_error_answer_for_every_version() -> None:
    lo, hi = version_range(m.PRODUCE)
    for version in range(lo, hi + 1):
        schema = api_schema(m.PRODUCE, version)
        denied = (m.TopicPartitions(ref_for(version, "a"), (0, 2)),
                  m.TopicPartitions(ref_for(version, "b"), (1,)))
        body = m.produce_error_response(schema, denied, DENIED)
        back = round_trip(schema, body)
        assert back == body
        assert list(m.error_codes(back)) == [29, 29, 29]
        assert [m.topic_ref(t) for t in back.responses] == [d.topic for d in denied]
        assert all(p.base_offset == -1 for t in back.responses for p in t.partition_responses)


def test_fetch_error_answer_for_every_version() -> None:
    lo, hi = version_range(m.FETCH)
    for version in range(lo, hi + 1):
        schema = api_schema(m.FETCH, version)
        denied = (m.TopicPartitions(ref_for(version, "a"), (0, 1)),)
        body = m.fetch_error_response(schema, denied, DENIED)
        back = round_trip(schema, body)
        assert back == body
        assert list(m.error_codes(back)) == [29, 29]
        if "session_id" in m._field_names(type(back)):
            assert back.session_id == 0   # sessionless: the client starts a new session


def produce_request(version: int, topics: dict[str, list[int]]):
    schema = api_schema(m.PRODUCE, version)
    req = schema.request.entity_type
    topic_type = m._sibling(req, "TopicProduceData")
    part_type = m._sibling(req, "PartitionProduceData")
    return req(transactional_id=None, acks=i16(-1), timeout=m._ZERO_THROTTLE, topic_data=tuple(
        topic_type(name=name, partition_data=tuple(
            part_type(index=i32(p), records=Records(record_batch([b"x", b"y"])))
            for p in parts))
        for name, parts in topics.items()))


def test_split_produce_keeps_allowed_topics_and_merges_errors_into_the_answer() -> None:
    schema = api_schema(m.PRODUCE, 9)
    body = produce_request(9, {"ok": [0, 1], "secret": [3]})
    kept, denied = m.split_produce_request(body, lambda ref: ref == "secret")
    assert [t.name for t in kept.topic_data] == ["ok"]
    assert denied == (m.TopicPartitions("secret", (3,)),)
    # the broker answers for "ok"; the filter adds "secret"
    resp_type = schema.response.entity_type
    broker_answer = resp_type(responses=(sibling(schema, "TopicProduceResponse")(
        name="ok", partition_responses=tuple(
            sibling(schema, "PartitionProduceResponse")(
                index=i32(p), error_code=ErrorCode.none, base_offset=5, record_errors=())
            for p in (0, 1))),))
    merged = round_trip(schema, m.add_produce_errors(broker_answer, denied, DENIED))
    by_topic = {t.name: [(int(p.index), int(p.error_code)) for p in t.partition_responses]
                for t in merged.responses}
    assert by_topic == {"ok": [(0, 0), (1, 0)], "secret": [(3, 29)]}


def metadata_body(version: int, brokers: list[tuple[int, str, int]]):
    schema = api_schema(m.METADATA, version)
    broker_type = sibling(schema, "MetadataResponseBroker")
    values = {"brokers": tuple(m._build(broker_type, node_id=i32(b), host=h, port=i32(p),
                                       rack=None)
                               for b, h, p in brokers),
              "topics": (), "controller_id": i32(1), "cluster_id": "c",
              "error_code": ErrorCode.none, "cluster_authorized_operations": i32(0)}
    return m._build(schema.response.entity_type, **values)


def test_metadata_broker_rewrite_every_version() -> None:
    rules = {1: ("proxy", 9001), 2: ("proxy", 9002)}
    lo, hi = version_range(m.METADATA)
    for version in range(lo, hi + 1):
        schema = api_schema(m.METADATA, version)
        body = metadata_body(version, [(1, "b1", 1), (2, "b2", 2), (3, "b3", 3)])
        result = m.rewrite_broker_addresses(m.METADATA, body, rules.get)
        assert (result.rewritten, result.unmatched) == (2, 1)
        back = round_trip(schema, result.body)
        assert [(b.node_id, b.host, b.port) for b in back.brokers] == \
            [(1, "proxy", 9001), (2, "proxy", 9002), (3, "b3", 3)]


def test_rewrite_that_changes_nothing_returns_the_same_body() -> None:
    body = metadata_body(12, [(1, "proxy", 9001)])
    result = m.rewrite_broker_addresses(m.METADATA, body, {1: ("proxy", 9001)}.get)
    assert result.rewritten == 0 and result.body is body


def test_find_coordinator_rewrite_old_and_batched_shapes() -> None:
    lookup = {7: ("proxy", 9007)}.get
    for version in range(*version_range(m.FIND_COORDINATOR)):
        schema = api_schema(m.FIND_COORDINATOR, version)
        resp = schema.response.entity_type
        if "coordinators" in m._field_names(resp):
            coord = sibling(schema, "Coordinator")
            body = m._build(resp, coordinators=(
                coord(key="g", node_id=i32(7), host="b", port=i32(1), error_code=ErrorCode.none,
                      error_message=None),
                coord(key="h", node_id=i32(-1), host="", port=i32(-1),
                      error_code=ErrorCode.coordinator_not_available, error_message=None)))
            back = round_trip(schema, m.rewrite_broker_addresses(
                m.FIND_COORDINATOR, body, lookup).body)
            assert [(c.host, c.port) for c in back.coordinators] == [("proxy", 9007), ("", -1)]
        else:
            body = m._build(resp, error_code=ErrorCode.none, error_message=None,
                            node_id=i32(7), host="b", port=i32(1))
            back = round_trip(schema, m.rewrite_broker_addresses(
                m.FIND_COORDINATOR, body, lookup).body)
            assert (back.host, back.port) == ("proxy", 9007)


def test_describe_cluster_and_produce_node_endpoints() -> None:
    lookup = {1: ("proxy", 9001)}.get
    for version in range(*version_range(m.DESCRIBE_CLUSTER)):
        schema = api_schema(m.DESCRIBE_CLUSTER, version)
        broker = sibling(schema, "DescribeClusterBroker")
        body = m._build(schema.response.entity_type, error_code=ErrorCode.none,
                        error_message=None, cluster_id="c", controller_id=i32(1),
                        brokers=(broker(broker_id=i32(1), host="b", port=i32(1), rack=None),),
                        cluster_authorized_operations=i32(0))
        back = round_trip(schema, m.rewrite_broker_addresses(m.DESCRIBE_CLUSTER, body,
                                                             lookup).body)
        assert (back.brokers[0].host, back.brokers[0].port) == ("proxy", 9001)
    schema = api_schema(m.PRODUCE, 10)
    node = sibling(schema, "NodeEndpoint")
    body = m._build(schema.response.entity_type, responses=(),
                    node_endpoints=(node(node_id=i32(1), host="b", port=i32(1), rack=None),))
    back = round_trip(schema, m.rewrite_broker_addresses(m.PRODUCE, body, lookup).body)
    assert (back.node_endpoints[0].host, back.node_endpoints[0].port) == ("proxy", 9001)


def test_cap_api_versions() -> None:
    schema = api_schema(m.API_VERSIONS, 0)
    entry = sibling(schema, "ApiVersion")
    body = schema.response.entity_type(error_code=ErrorCode.none, api_keys=(
        entry(api_key=i16(0), min_version=i16(0), max_version=i16(10)),
        entry(api_key=i16(1), min_version=i16(13), max_version=i16(16)),
        entry(api_key=i16(3), min_version=i16(0), max_version=i16(12))))
    capped = m.cap_api_versions(body, lambda k, lo, hi: (lo, min(hi, 12)) if k in (0, 1)
                                else (lo, hi))
    assert [(e.api_key, e.min_version, e.max_version) for e in capped.api_keys] == \
        [(0, 0, 10), (3, 0, 12)]   # Fetch 13..12 is empty: removed
    assert m.cap_api_versions(body, lambda k, lo, hi: (lo, hi)) is None


def test_error_codes_walks_nested_entities() -> None:
    schema = api_schema(m.METADATA, 12)
    topic = sibling(schema, "MetadataResponseTopic")
    part = sibling(schema, "MetadataResponsePartition")
    body = dataclasses.replace(metadata_body(12, []), topics=(
        topic(error_code=ErrorCode.unknown_topic_or_partition, name="x", topic_id=None,
              is_internal=False, partitions=(), topic_authorized_operations=i32(0)),
        topic(error_code=ErrorCode.none, name="y", topic_id=None, is_internal=False,
              topic_authorized_operations=i32(0), partitions=(part(
                  error_code=ErrorCode.leader_not_available, partition_index=i32(0),
                  leader_id=i32(1), leader_epoch=i32(0), replica_nodes=(), isr_nodes=(),
                  offline_replicas=()),))))
    assert sorted(m.error_codes(body)) == [3, 5]


def test_trailing_bytes_are_reported_not_fatal() -> None:
    schema = api_schema(m.METADATA, 12)
    body = metadata_body(12, [(1, "b", 1)])
    header = m.response_header_bytes(schema, 1)
    frame = m.encode_frame(header, schema, body, is_request=False) + b"\x00"
    back, trailing = m.decode_body(frame[4:], len(header), schema, is_request=False)
    assert back == body and trailing == 1


@settings(max_examples=100, deadline=None)
@given(version=st.integers(min_value=0, max_value=13),
       brokers=st.dictionaries(st.integers(min_value=0, max_value=50),
                               st.tuples(st.text(min_size=1, max_size=20),
                                         st.integers(min_value=0, max_value=65535)),
                               max_size=6),
       rules=st.dictionaries(st.integers(min_value=0, max_value=50),
                             st.tuples(st.text(min_size=1, max_size=20),
                                       st.integers(min_value=0, max_value=65535)),
                             max_size=6))
def test_metadata_rewrite_round_trip(version, brokers, rules) -> None:
    schema = api_schema(m.METADATA, version)
    body = metadata_body(version, [(b, h, p) for b, (h, p) in brokers.items()])
    result = m.rewrite_broker_addresses(m.METADATA, body, rules.get)
    back = round_trip(schema, result.body)
    for b in back.brokers:
        expected = rules.get(b.node_id, brokers[b.node_id])
        assert (b.host, b.port) == expected
    assert result.unmatched == sum(1 for b in brokers if b not in rules)
    assert result.rewritten == sum(1 for b in brokers if b in rules and rules[b] != brokers[b])
