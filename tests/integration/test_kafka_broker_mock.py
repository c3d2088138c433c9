"""The Kafka broker filter between real clients (aiokafka, confluent-kafka/librdkafka) and real
Kafka-protocol brokers (librdkafka's in-process mock cluster, three brokers).

The filter runs in tests/kafka_relay.py's relay (one port per broker, as the TCP proxy will
run it); clients bootstrap from one relay port only, so reaching the other brokers at all
proves the Metadata / FindCoordinator rewriting end to end.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import TopicAuthorizationFailedError
from aiokafka.protocol.api import RequestHeader_v1
from aiokafka.protocol.produce import ProduceRequest_v2, ProduceResponse_v2
from aiokafka.record.legacy_records import LegacyRecordBatchBuilder
from aiokafka.structs import TopicPartition as AioTopicPartition
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from kafka_relay import KafkaRelay, MockCluster
from prometheus_client import CollectorRegistry

from sidecar.config.kafka import (
    BrokerAddressRewriteRule,
    KafkaBrokerConfig,
    TopicAclConfig,
    topic_acl_from_native,
)
from sidecar.l4.kafka_broker import KafkaBrokerFilter
from sidecar.l4.kafka_metrics import RegistryFamilies

SHOP = "spiffe://cluster.local/ns/shop/sa/orders"
ACL = topic_acl_from_native({"default_action": "DENY", "rules": [
    {"action": "ALLOW", "principals": [{"exact": SHOP}], "topics": [{"prefix": "orders"}],
     "operations": ["PRODUCE", "FETCH"]}]}, "topic_acl")
WAIT = 30.0   # upper bound for anything a client does here; never a speed assertion


@pytest.fixture(scope="module")
def cluster():
    c = MockCluster(brokers=3)
    yield c
    c.close()


MakeRelay = Callable[..., tuple[KafkaRelay, CollectorRegistry]]


@pytest.fixture
def make_relay(cluster) -> MakeRelay:
    relays: list[KafkaRelay] = []

    def make(acl: TopicAclConfig | None = None, principal: str | None = None,
             tap: bool = False) -> tuple[KafkaRelay, CollectorRegistry]:
        registry = CollectorRegistry()

        def build(ports: dict[int, int]) -> KafkaBrokerFilter:
            config = KafkaBrokerConfig(
                stat_prefix="kafka",
                broker_address_rewrite_rules=tuple(
                    BrokerAddressRewriteRule(b, "127.0.0.1", p) for b, p in ports.items()),
                topic_acl=acl)
            return KafkaBrokerFilter(config, RegistryFamilies(registry))

        relay = KafkaRelay(cluster.brokers, build, principal=principal, tap=tap).start()
        relays.append(relay)
        return relay, registry

    yield make
    for relay in relays:
        relay.stop()


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"stat_prefix": "kafka", **labels}) or 0.0


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def quiet(config: dict) -> dict:
    return {"log_level": 2, **config}


# ---- aiokafka -------------------------------------------------------------------------------

async def test_aiokafka_produce_and_group_consume(make_relay: MakeRelay) -> None:
    relay, registry = make_relay()
    bootstrap = relay.bootstrap([1])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for("orders-aio"))
        leaders = {producer.client.cluster.leader_for_partition(
            AioTopicPartition("orders-aio", p)) for p in partitions}
        # every broker the client knows of is the relay: nothing leaked from the mock
        assert {(b.host, b.port) for b in producer.client.cluster.brokers()} == \
            {("127.0.0.1", p) for p in relay.ports.values()}
        for i in range(20):
            await asyncio.wait_for(producer.send_and_wait(
                "orders-aio", b"m%d" % i, partition=partitions[i % len(partitions)]), WAIT)
        await producer.client.force_metadata_update()   # a refresh keeps the rewrite
        assert {b.port for b in producer.client.cluster.brokers()} == set(relay.ports.values())
    finally:
        await asyncio.wait_for(producer.stop(), WAIT)

    consumer = AIOKafkaConsumer("orders-aio", bootstrap_servers=bootstrap, group_id="g-aio",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        got: list[bytes] = []
        deadline = time.monotonic() + WAIT
        while len(got) < 20 and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            got += [r.value for records in batches.values() for r in records]
        await consumer.commit()
        committed = {p: await consumer.committed(AioTopicPartition("orders-aio", p))
                     for p in partitions}
    finally:
        await asyncio.wait_for(consumer.stop(), WAIT)

    assert sorted(got) == sorted(b"m%d" % i for i in range(20))
    assert sum(committed.values()) == 20
    # the partition leaders were reached through their relay ports, and so was at least one
    # broker other than the bootstrap one: only the rewritten metadata names those ports
    assert all(relay.connections[b] > 0 for b in leaders)
    assert any(relay.connections[b] > 0 for b in relay.ports if b != 1)
    assert relay.close_reasons == []
    m = metric
    assert m(registry, "sidecar_kafka_topic_records_total", api="produce", topic="orders-aio") == 20
    assert m(registry, "sidecar_kafka_topic_records_total", api="fetch", topic="orders-aio") == 20
    produced = m(registry, "sidecar_kafka_topic_bytes_total", api="produce", topic="orders-aio")
    assert produced > 0
    assert m(registry, "sidecar_kafka_topic_bytes_total", api="fetch",
             topic="orders-aio") == produced
    for api in ("find_coordinator", "join_group", "sync_group", "offset_commit", "offset_fetch"):
        assert m(registry, "sidecar_kafka_responses_total", api=api) >= 1, api
    assert m(registry, "sidecar_kafka_requests_total", api="produce") == 20
    assert m(registry, "sidecar_kafka_responses_total", api="produce") == 20
    assert m(registry, "sidecar_kafka_response_duration_seconds_count", api="produce") == 20
    assert m(registry, "sidecar_kafka_rewritten_responses_total", api="find_coordinator",
             reason="broker_address") >= 1
    assert m(registry, "sidecar_kafka_unrewritten_brokers_total", api="metadata") == 0
    assert m(registry, "sidecar_kafka_undecoded_frames_total", direction="request",
             reason="decode_error") == 0


async def test_aiokafka_partial_produce_denial_in_one_request(make_relay: MakeRelay) -> None:
    relay, registry = make_relay(acl=ACL, principal=SHOP)
    producer = AIOKafkaProducer(bootstrap_servers=relay.bootstrap([2]), linger_ms=300)
    await producer.start()
    try:
        cluster = producer.client.cluster
        # two partitions with the same leader go out in one ProduceRequest; the mock places
        # leaders at random, so take topic pairs until one has a leader in common
        pair = None
        for i in range(20):
            allowed_t, denied_t = f"orders-mix-{i}", f"payroll-mix-{i}"
            await producer.partitions_for(allowed_t)
            await producer.partitions_for(denied_t)
            leaders = {}
            for p in cluster.partitions_for_topic(denied_t):
                leaders.setdefault(cluster.leader_for_partition(AioTopicPartition(denied_t, p)), p)
            pair = next(((p, leaders[cluster.leader_for_partition(AioTopicPartition(allowed_t, p))])
                         for p in cluster.partitions_for_topic(allowed_t)
                         if cluster.leader_for_partition(AioTopicPartition(allowed_t, p)) in leaders),
                        None)
            if pair is not None:
                break
        assert pair is not None, "no two topics with a leader in common"
        allowed_p, denied_p = pair
        ok = await producer.send(allowed_t, b"fine", partition=allowed_p)
        denied = await producer.send(denied_t, b"secret", partition=denied_p)
        metadata = await asyncio.wait_for(ok, WAIT)
        with pytest.raises(TopicAuthorizationFailedError):
            await asyncio.wait_for(denied, WAIT)
        assert metadata.partition == allowed_p
        # the connection stays up and usable
        await asyncio.wait_for(
            producer.send_and_wait(allowed_t, b"after", partition=allowed_p), WAIT)
    finally:
        await asyncio.wait_for(producer.stop(), WAIT)
    assert relay.close_reasons == []
    assert metric(registry, "sidecar_kafka_rewritten_responses_total", api="produce",
                  reason="topic_acl") >= 1
    assert metric(registry, "sidecar_kafka_acl_denied_total", api="produce",
                  topic=denied_t) >= 1
    assert metric(registry, "sidecar_kafka_topic_records_total", api="produce",
                  topic=denied_t) == 0

    consumer = AIOKafkaConsumer(bootstrap_servers=relay.bootstrap([2]), group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([AioTopicPartition(denied_t, denied_p)])
        with pytest.raises(TopicAuthorizationFailedError):
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                await consumer.getmany(timeout_ms=500)
    finally:
        await asyncio.wait_for(consumer.stop(), WAIT)
    assert metric(registry, "sidecar_kafka_acl_denied_total", api="fetch",
                  topic=denied_t) >= 1


# ---- confluent-kafka (librdkafka) -----------------------------------------------------------

def consume_confluent(bootstrap: str, topic: str, count: int, group: str) -> list[bytes]:
    consumer = Consumer(quiet({"bootstrap.servers": bootstrap, "group.id": group,
                               "auto.offset.reset": "earliest",
                               "enable.auto.commit": False}))
    consumer.subscribe([topic])
    got: list[bytes] = []
    deadline = time.monotonic() + WAIT
    try:
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                got.append(msg.value())
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return got


def test_confluent_kafka_produce_and_group_consume(make_relay: MakeRelay) -> None:
    relay, registry = make_relay()
    bootstrap = relay.bootstrap([3])
    producer = Producer(quiet({"bootstrap.servers": bootstrap, "linger.ms": 5}))
    metadata = producer.list_topics("orders-ck", timeout=10)
    leaders = {p.leader for p in metadata.topics["orders-ck"].partitions.values()}
    assert {(b.host, b.port) for b in metadata.brokers.values()} == \
        {("127.0.0.1", p) for p in relay.ports.values()}
    for i in range(30):
        producer.produce("orders-ck", b"c%d" % i, partition=i % 4)
    assert producer.flush(WAIT) == 0
    got = consume_confluent(bootstrap, "orders-ck", 30, "g-ck")
    assert sorted(got) == sorted(b"c%d" % i for i in range(30))
    assert relay.close_reasons == []
    assert all(relay.connections[b] > 0 for b in leaders)
    assert any(relay.connections[b] > 0 for b in relay.ports if b != 3)   # not the bootstrap
    assert metric(registry, "sidecar_kafka_topic_records_total", api="produce",
                  topic="orders-ck") == 30
    assert metric(registry, "sidecar_kafka_topic_records_total", api="fetch",
                  topic="orders-ck") == 30
    # librdkafka asks ApiVersions v3+; the capped answer is what it negotiates with
    assert metric(registry, "sidecar_kafka_rewritten_responses_total", api="api_versions",
                  reason="api_versions") >= 1
    assert metric(registry, "sidecar_kafka_responses_total", api="join_group") >= 1


def test_metadata_refresh_keeps_clients_on_the_proxy(make_relay: MakeRelay) -> None:
    relay, registry = make_relay()
    producer = Producer(quiet({"bootstrap.servers": relay.bootstrap([1]),
                               "topic.metadata.refresh.interval.ms": 200}))
    producer.produce("orders-refresh", b"first")
    assert producer.flush(WAIT) == 0
    before = metric(registry, "sidecar_kafka_responses_total", api="metadata")
    wait_for(lambda: (producer.poll(0.05) or True) and
             metric(registry, "sidecar_kafka_responses_total", api="metadata") >= before + 3,
             "periodic metadata refreshes")
    producer.produce("orders-refresh", b"second")
    assert producer.flush(WAIT) == 0
    responses = metric(registry, "sidecar_kafka_responses_total", api="metadata")
    # every Metadata answer named the brokers, and every one was pointed at the relay
    assert metric(registry, "sidecar_kafka_rewritten_responses_total", api="metadata",
                  reason="broker_address") == responses
    got = consume_confluent(relay.bootstrap([1]), "orders-refresh", 2, "g-refresh")
    assert sorted(got) == [b"first", b"second"]


def test_broker_going_away_and_coming_back(make_relay: MakeRelay) -> None:
    relay, registry = make_relay()
    bootstrap = relay.bootstrap([1])
    results: list[KafkaError | None] = []
    producer = Producer(quiet({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                               "message.timeout.ms": 60000, "reconnect.backoff.ms": 50,
                               "reconnect.backoff.max.ms": 200}))
    leaders = {p.id: p.leader for p in
               producer.list_topics("orders-gone", timeout=10).topics["orders-gone"]
               .partitions.values()}
    gone = leaders[0]
    for i in range(8):
        producer.produce("orders-gone", b"before-%d" % i, partition=i % 4,
                         on_delivery=lambda err, msg: results.append(err))
    assert producer.flush(WAIT) == 0
    closed_before = metric(registry, "sidecar_kafka_unanswered_requests_total",
                           reason="connection_closed")
    connections_before = relay.connections[gone]

    relay.stop_broker(gone)   # its port stops listening, its connections drop
    for i in range(8):
        producer.produce("orders-gone", b"during-%d" % i, partition=i % 4,
                         on_delivery=lambda err, msg: results.append(err))
    # the partitions the other brokers lead still work while one is away
    wait_for(lambda: producer.poll(0.05) is not None and
             sum(1 for r in results if r is None) >= 8 + sum(
                 1 for i in range(8) if leaders[i % 4] != gone),
             "deliveries to the brokers still up")
    assert len(results) < 16   # the away broker's partitions are still pending
    relay.restart_broker(gone)
    assert producer.flush(WAIT) == 0
    assert results == [None] * 16
    assert relay.connections[gone] > connections_before   # the client reconnected
    assert metric(registry, "sidecar_kafka_unanswered_requests_total",
                  reason="connection_closed") >= closed_before

    got = consume_confluent(bootstrap, "orders-gone", 16, "g-gone")
    assert sorted(set(got)) == sorted([b"before-%d" % i for i in range(8)] +
                                      [b"during-%d" % i for i in range(8)])


def test_topic_acl_denial_seen_by_librdkafka(make_relay: MakeRelay) -> None:
    relay, registry = make_relay(acl=ACL, principal=SHOP)
    bootstrap = relay.bootstrap([1])
    errors: dict[str, list[int | None]] = {"orders-ck-acl": [], "payroll": []}
    producer = Producer(quiet({"bootstrap.servers": bootstrap, "linger.ms": 1}))

    def report(err, msg) -> None:
        errors[msg.topic()].append(err.code() if err else None)

    producer.produce("payroll", b"salary", partition=0, on_delivery=report)
    producer.produce("orders-ck-acl", b"order", partition=0, on_delivery=report)
    assert producer.flush(WAIT) == 0
    assert errors["payroll"] == [KafkaError.TOPIC_AUTHORIZATION_FAILED]
    assert errors["orders-ck-acl"] == [None]
    producer.produce("orders-ck-acl", b"again", partition=0, on_delivery=report)
    assert producer.flush(WAIT) == 0
    assert errors["orders-ck-acl"] == [None, None]   # same connections, still working

    consumer = Consumer(quiet({"bootstrap.servers": bootstrap, "group.id": "g-acl",
                               "enable.auto.commit": False}))
    consumer.assign([TopicPartition("payroll", 0, 0)])
    seen: int | None = None
    deadline = time.monotonic() + WAIT
    try:
        while seen is None and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is not None:
                seen = msg.error().code()
    finally:
        consumer.close()
    assert seen == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert relay.close_reasons == []
    assert metric(registry, "sidecar_kafka_acl_denied_total", api="produce", topic="payroll") >= 1
    assert metric(registry, "sidecar_kafka_acl_denied_total", api="fetch", topic="payroll") >= 1
    assert metric(registry, "sidecar_kafka_response_errors_total", api="produce",
                  error_code="29", error="TOPIC_AUTHORIZATION_FAILED") >= 1


def test_another_identity_is_denied_what_the_owner_may_do(make_relay: MakeRelay) -> None:
    relay, _ = make_relay(acl=ACL, principal="spiffe://cluster.local/ns/web/sa/frontend")
    errors: list[int | None] = []
    producer = Producer(quiet({"bootstrap.servers": relay.bootstrap([1])}))
    producer.produce("orders-other", b"x", partition=0,
                     on_delivery=lambda err, msg: errors.append(err.code() if err else None))
    assert producer.flush(WAIT) == 0
    assert errors == [KafkaError.TOPIC_AUTHORIZATION_FAILED]


# ---- frames the codec cannot decode ---------------------------------------------------------

def read_frame(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data
    size = struct.unpack(">i", exactly(4))[0]
    return exactly(size)


async def test_undecodable_frames_pass_through_byte_identical(make_relay: MakeRelay) -> None:
    relay, registry = make_relay(tap=True)
    # make sure the topic exists and find partition 0's leader, through the relay
    probe = Producer(quiet({"bootstrap.servers": relay.bootstrap([1])}))
    leader = probe.list_topics("orders-legacy", timeout=10).topics["orders-legacy"] \
        .partitions[0].leader
    del probe
    taps_before = len(relay.taps)
    # Produce v2 with a magic-1 message set, written by aiokafka's protocol code: Kafka 4
    # dropped v0-v2 from its published definitions, so the codec cannot decode it
    builder = LegacyRecordBatchBuilder(magic=1, compression_type=0, batch_size=1 << 20)
    for i in range(3):
        builder.append(i, timestamp=1_700_000_000_000, key=None, value=b"legacy-%d" % i)
    request = ProduceRequest_v2(required_acks=1, timeout=5000,
                                topics=[("orders-legacy", [(0, bytes(builder.build()))])])
    payload = RequestHeader_v1(request, correlation_id=41, client_id="raw").encode() + \
        request.encode()
    frame = struct.pack(">i", len(payload)) + payload
    with socket.create_connection(("127.0.0.1", relay.ports[leader]), timeout=WAIT) as sock:
        sock.sendall(frame)
        answer = read_frame(sock)
    assert struct.unpack(">i", answer[:4])[0] == 41
    response = ProduceResponse_v2.decode(answer[4:])
    assert response.topics[0][1][0][1] == 0   # error_code: the broker took it
    tap = relay.taps[taps_before]
    assert bytes(tap.to_broker) == bytes(tap.from_client) == frame
    assert bytes(tap.to_client) == bytes(tap.from_broker)
    assert metric(registry, "sidecar_kafka_undecoded_frames_total", direction="request",
                  reason="unknown_version") == 1
    assert metric(registry, "sidecar_kafka_undecoded_frames_total", direction="response",
                  reason="unknown_version") == 1
    assert metric(registry, "sidecar_kafka_responses_total", api="produce") == 1

    # and the records are really there, read back by a modern client through the filter
    consumer = AIOKafkaConsumer(bootstrap_servers=relay.bootstrap([1]), group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([AioTopicPartition("orders-legacy", 0)])
        got: list[bytes] = []
        deadline = time.monotonic() + WAIT
        while len(got) < 3 and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            got += [r.value for records in batches.values() for r in records]
    finally:
        await asyncio.wait_for(consumer.stop(), WAIT)
    assert got == [b"legacy-0", b"legacy-1", b"legacy-2"]
