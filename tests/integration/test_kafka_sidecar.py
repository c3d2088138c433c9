"""Kafka through the real sidecar (``sidecar run``, a child process): one listener per broker of
a librdkafka mock cluster (three brokers), each ``kafka_broker`` in front of ``tcp_proxy``,
with mTLS from the clients and the topic ACL keyed by their SPIFFE IDs.

A broker going away is played on a mock cluster of its own whose broker is taken down for real
(``ControlledMockCluster``), directly and through the sidecar, and the two compared.

Clients (librdkafka through confluent-kafka, and aiokafka) bootstrap from one listener only:
they reach the other brokers through the sidecar because every broker address they learn
was rewritten to a sidecar listener.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
import time
import urllib.request
from dataclasses import dataclass

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.protocol.admin import ApiVersionRequest_v0, ApiVersionResponse_v0
from aiokafka.protocol.api import RequestHeader_v1
from confluent_kafka import Consumer, KafkaError, Producer
from kafka_relay import ControlledMockCluster, MockCluster

from sidecar.cli.certs import DevCA
from sidecar.testing import ProxyProcess, free_port, wait_for_port

TD = "cluster.local"
ORDERS = f"spiffe://{TD}/ns/shop/sa/orders"
WEB = f"spiffe://{TD}/ns/shop/sa/web"
WAIT = 30.0    # bound for what a client does here; never a speed assertion


@pytest.fixture(scope="module")
def brokers():
    c = MockCluster(brokers=3)
    yield c
    c.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("kafka-pki")
    ca = DevCA.create(TD)
    ca.write(str(d))
    for sa in ("orders", "web", "sidecar"):
        ca.issue("shop", sa, ips=["127.0.0.1"], dns=["localhost"]).write(str(d), sa)
    return {"dir": d, "ca": str(d / "ca.pem"),
            **{sa: (str(d / f"{sa}.pem"), str(d / f"{sa}-key.pem")) for sa in ("orders", "web",
                                                                                 "sidecar")}}


def sidecar_config(brokers: MockCluster | ControlledMockCluster, pki, ports: dict[int, int],
                   admin: int, tls: bool) -> dict:
    rules = [{"id": b, "host": "127.0.0.1", "port": p} for b, p in ports.items()]
    cert, key = pki["sidecar"]
    listeners = []
    for b, port in ports.items():
        lst: dict = {
            "name": f"kafka-{b}", "address": "127.0.0.1", "port": port,
            "kafka_broker": {
                "stat_prefix": "kafka", "id_based_broker_address_rewrite_spec": {"rules": rules},
                "topic_acl": {"default_action": "DENY", "rules": [
                    {"action": "ALLOW", "principals": [{"exact": ORDERS}],
                     "topics": [{"prefix": "orders"}], "operations": ["PRODUCE", "FETCH"]}]}},
            "tcp_proxy": {"cluster": f"broker-{b}", "stat_prefix": f"kafka-{b}"},
        }
        if tls:
            lst["tls"] = {"cert": cert, "key": key, "ca": pki["ca"]}
        else:
            del lst["kafka_broker"]["topic_acl"]
        listeners.append(lst)
    clusters = [{"name": f"broker-{b}", "endpoints": [f"{h}:{p}"]}
                for b, (h, p) in brokers.brokers.items()]
    return {"admin": {"address": "127.0.0.1", "port": admin}, "listeners": listeners,
            "clusters": clusters}


@pytest.fixture
def sidecar(brokers, pki, tmp_path):
    procs = []

    def start(tls: bool = True, cluster: ControlledMockCluster | None = None
              ) -> tuple[dict[int, int], int]:
        c = cluster if cluster is not None else brokers
        ports = {b: free_port() for b in c.brokers}
        admin = free_port()
        p = ProxyProcess(sidecar_config(c, pki, ports, admin, tls), str(tmp_path),
                         args=("--log-level", "warning"))
        p.start(wait_port=ports[min(ports)], timeout=30)
        procs.append(p)
        # every broker's listener, not only the first: a client may bootstrap from any (a CI
        # run was refused on the last one, bound a moment after the first)
        for port in ports.values():
            wait_for_port(port, 30, p)
        return ports, admin

    yield start
    for p in procs:
        p.stop()


def client_tls(pki, who: str) -> dict:
    cert, key = pki[who]
    return {"security.protocol": "SSL", "ssl.ca.location": pki["ca"],
            "ssl.certificate.location": cert, "ssl.key.location": key,
            "ssl.endpoint.identification.algorithm": "none"}


def quiet(config: dict) -> dict:
    return {"log_level": 2, **config}


def scrape(admin: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_librdkafka_produce_and_group_consume_over_mtls_with_topic_acl(sidecar, pki) -> None:
    ports, admin = sidecar(tls=True)
    bootstrap = f"127.0.0.1:{ports[min(ports)]}"
    producer = Producer(quiet({"bootstrap.servers": bootstrap, "linger.ms": 5,
                               **client_tls(pki, "orders")}))
    md = producer.list_topics("orders-l4", timeout=WAIT)
    # every broker the client knows is a sidecar listener
    assert {(b.host, b.port) for b in md.brokers.values()} == \
        {("127.0.0.1", p) for p in ports.values()}
    for i in range(30):
        producer.produce("orders-l4", b"o%d" % i, partition=i % 4)
    assert producer.flush(WAIT) == 0

    consumer = Consumer(quiet({"bootstrap.servers": bootstrap, "group.id": "g-l4",
                               "auto.offset.reset": "earliest", "enable.auto.commit": False,
                               **client_tls(pki, "orders")}))
    consumer.subscribe(["orders-l4"])
    got: list[bytes] = []
    deadline = time.monotonic() + WAIT
    try:
        while len(got) < 30 and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                got.append(msg.value())
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    assert sorted(got) == sorted(b"o%d" % i for i in range(30))

    # another workload identity: Kafka's own authorization error, connection kept
    errors: list[int | None] = []
    web = Producer(quiet({"bootstrap.servers": bootstrap, **client_tls(pki, "web")}))
    web.produce("orders-l4", b"forged", partition=0,
                on_delivery=lambda err, msg: errors.append(err.code() if err else None))
    assert web.flush(WAIT) == 0
    assert errors == [KafkaError.TOPIC_AUTHORIZATION_FAILED]

    text = scrape(admin)
    assert metric(text, "sidecar_kafka_topic_records_total", stat_prefix="kafka", api="produce",
                  topic="orders-l4") == 30
    assert metric(text, "sidecar_kafka_topic_records_total", stat_prefix="kafka", api="fetch",
                  topic="orders-l4") == 30
    assert metric(text, "sidecar_kafka_acl_denied_total", stat_prefix="kafka", api="produce",
                  topic="orders-l4") == 1
    assert metric(text, "sidecar_kafka_requests_total", stat_prefix="kafka", api="join_group") >= 1
    # the TCP side: connections and bytes per broker listener and per broker cluster
    assert sum(metric(text, "sidecar_tcp_downstream_cx_total", stat_prefix=f"kafka-{b}")
               for b in ports) >= 3
    assert sum(metric(text, "sidecar_upstream_cx_tx_bytes_total", cluster=f"broker-{b}")
               for b in ports) > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/clusters", timeout=10) as r:
        clusters = r.read().decode()
    assert "broker-1::" in clusters and "::cx_active::" in clusters
    # the dashboard's data: per-topic Kafka numbers and per-listener TCP numbers
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/dashboard.json", timeout=10) as r:
        board = json.load(r)
    (kafka,) = board["kafka"]
    topics = {t["topic"]: t for t in kafka["topics"]}
    assert topics["orders-l4"]["produce_records"] == 30
    assert topics["orders-l4"]["fetch_records"] == 30
    assert topics["orders-l4"]["produce_denied"] == 1
    assert "TOPIC_AUTHORIZATION_FAILED" in kafka["errors"]
    assert {a["api"] for a in kafka["apis"]} >= {"produce", "fetch", "metadata"}
    assert {t["stat_prefix"] for t in board["tcp"]} == {f"kafka-{b}" for b in ports}


def test_a_client_without_a_certificate_gets_nothing(sidecar, pki) -> None:
    ports, _ = sidecar(tls=True)
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.check_hostname = False

    async def attempt() -> bytes:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", ports[min(ports)], ssl=ctx)
            w.write(b"\x00\x00\x00\x00")
            try:
                return await asyncio.wait_for(r.read(), WAIT)
            finally:
                w.close()
        except (ssl.SSLError, ConnectionError):
            return b""          # TLS 1.2: the handshake fails at once

    # TLS 1.3: the client's handshake completes, then the server refuses the missing
    # certificate and closes without a byte
    assert asyncio.run(attempt()) == b""


async def test_aiokafka_through_the_sidecar_in_plaintext(sidecar) -> None:
    ports, admin = sidecar(tls=False)
    bootstrap = f"127.0.0.1:{ports[max(ports)]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(10):
            await asyncio.wait_for(producer.send_and_wait("orders-aio-l4", b"a%d" % i,
                                                          partition=i % 4), WAIT)
        assert {b.port for b in producer.client.cluster.brokers()} == set(ports.values())
    finally:
        await asyncio.wait_for(producer.stop(), WAIT)
    consumer = AIOKafkaConsumer("orders-aio-l4", bootstrap_servers=bootstrap,
                                group_id="g-aio-l4", auto_offset_reset="earliest")
    await consumer.start()
    got: list[bytes] = []
    try:
        deadline = time.monotonic() + WAIT
        while len(got) < 10 and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                got += [m.value for m in msgs]
    finally:
        await asyncio.wait_for(consumer.stop(), WAIT)
    assert sorted(got) == sorted(b"a%d" % i for i in range(10))
    text = await asyncio.get_running_loop().run_in_executor(None, scrape, admin)
    assert metric(text, "sidecar_kafka_topic_records_total", stat_prefix="kafka", api="produce",
                  topic="orders-aio-l4") == 10


# ---- a broker going away ----------------------------------------------------------------------

@pytest.fixture
def away_cluster():
    """Mock brokers of this test's own: one of them is taken down (the module's stay whole)."""
    c = ControlledMockCluster(brokers=3)
    yield c
    c.close()


def api_versions(sock: socket.socket, correlation_id: int) -> int:
    """One ApiVersions v0 exchange on an open connection; the error code of the answer."""
    request = ApiVersionRequest_v0()
    payload = RequestHeader_v1(request, correlation_id=correlation_id,
                               client_id="bystander").encode() + request.encode()
    sock.sendall(struct.pack(">i", len(payload)) + payload)

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data
    frame = exactly(struct.unpack(">i", exactly(4))[0])
    assert struct.unpack(">i", frame[:4])[0] == correlation_id
    return ApiVersionResponse_v0.decode(frame[4:]).error_code


def new_connection_to(address: tuple[str, int]) -> str:
    """What a new connection to ``address`` gets: "refused", "closed" (accepted, then closed
    without an answer to ApiVersions) or "answered"."""
    try:
        sock = socket.create_connection(address, timeout=WAIT)
    except ConnectionRefusedError:
        return "refused"
    with sock:
        try:
            api_versions(sock, 1)
        except (AssertionError, ConnectionError):
            return "closed"
    return "answered"


GONE = 2          # the broker that goes away: it leads partitions 1 and 3; 1 is the bootstrap


@dataclass
class AwayStory:
    deliveries: list[int | None]       # every message's delivery report (error code or None)
    pending_while_away: int            # messages waiting while it was down
    for_away_partitions: int           # messages produced to the partitions it leads
    new_connection_while_away: str
    bystander_while_away: int          # ApiVersions error code on a connection opened before
    impatient: dict[int, int | None]   # a producer with a short message timeout, by partition
    consumed: list[bytes]


def broker_goes_away(cluster: ControlledMockCluster, addresses: dict[int, tuple[str, int]],
                     topic: str) -> AwayStory:
    """A librdkafka producer (idempotent) bootstrapped from broker 1's address in
    ``addresses`` (the brokers themselves, or the sidecar's listeners for them) produces to
    every partition of ``topic``; broker GONE, leader of two of them, goes away and comes
    back."""
    reports: list[int | None] = []

    def report(err, msg) -> None:
        reports.append(err.code() if err else None)

    leaders = {0: 1, 1: GONE, 2: 3, 3: GONE}
    cluster.create_topic(topic, leaders)
    bootstrap = "{}:{}".format(*addresses[1])
    producer = Producer(quiet({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                               "message.timeout.ms": 60000, "reconnect.backoff.ms": 50,
                               "reconnect.backoff.max.ms": 200}))
    metadata = producer.list_topics(topic, timeout=WAIT)
    assert {p.id: p.leader for p in metadata.topics[topic].partitions.values()} == leaders
    assert {(b.host, b.port) for b in metadata.brokers.values()} == set(addresses.values())
    for i in range(8):
        producer.produce(topic, b"before-%d" % i, partition=i % 4, on_delivery=report)
    assert producer.flush(WAIT) == 0
    bystander = socket.create_connection(addresses[1], timeout=WAIT)   # another connection
    try:
        assert api_versions(bystander, 100) == 0

        cluster.set_down(GONE)        # its connections drop, its port refuses new ones
        for i in range(8):
            producer.produce(topic, b"during-%d" % i, partition=i % 4, on_delivery=report)
        for_away = sum(1 for i in range(8) if leaders[i % 4] == GONE)
        deadline = time.monotonic() + WAIT
        while len(reports) < 16 - for_away and time.monotonic() < deadline:
            producer.poll(0.05)   # the partitions the other brokers lead still take messages
        producer.poll(0.5)        # (and the away broker's do not, however long one waits)
        pending = 16 - len(reports)
        new_connection = new_connection_to(addresses[GONE])
        bystander_error = api_versions(bystander, 101)
        impatient = impatient_producer(bootstrap, topic)
    finally:
        cluster.set_up(GONE)
        bystander.close()
    assert producer.flush(WAIT) == 0
    consumer = Consumer(quiet({"bootstrap.servers": bootstrap, "group.id": f"g-{topic}",
                               "auto.offset.reset": "earliest", "enable.auto.commit": False}))
    consumer.subscribe([topic])
    got: list[bytes] = []
    deadline = time.monotonic() + WAIT
    try:
        while len(got) < 17 and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                got.append(msg.value())
    finally:
        consumer.close()
    return AwayStory(reports, pending, for_away, new_connection, bystander_error, impatient,
                     sorted(got))


def impatient_producer(bootstrap: str, topic: str) -> dict[int, int | None]:
    """A new producer, started while GONE is down, that will not wait long: one message to
    partition 0 (broker 1) and one to partition 1 (GONE). What each delivery report says."""
    reports: dict[int, int | None] = {}
    producer = Producer(quiet({"bootstrap.servers": bootstrap, "message.timeout.ms": 1500}))
    for partition in (0, 1):
        producer.produce(topic, b"impatient", partition=partition, on_delivery=lambda err, msg:
                         reports.__setitem__(msg.partition(), err.code() if err else None))
    producer.flush(WAIT)
    return reports


def test_a_broker_going_away_and_coming_back_through_the_sidecar(sidecar, away_cluster) -> None:
    """The same story directly against the mock brokers and through ``sidecar run`` (one
    kafka_broker + tcp_proxy listener per broker): while the broker leading some partitions
    is down, the other partitions keep taking messages and a connection opened before to
    another broker keeps working; the away broker's messages wait, and are delivered exactly
    once when it is back; a producer with a short message timeout gets the same
    error for the away broker's partition only. The one difference is where a new connection
    to the away broker fails: the broker's port refuses it, while the sidecar's listener
    accepts it and closes it when its upstream connect is refused (librdkafka retries either
    way)."""
    direct = broker_goes_away(away_cluster, away_cluster.brokers, "orders-away-direct")
    ports, admin = sidecar(tls=False, cluster=away_cluster)
    proxied = broker_goes_away(away_cluster, {b: ("127.0.0.1", p) for b, p in ports.items()},
                               "orders-away-proxied")
    print(f"direct: {direct}\nproxied: {proxied}")
    for story in (direct, proxied):
        assert story.deliveries == [None] * 16, story              # every message, no error
        assert story.pending_while_away == story.for_away_partitions == 4, story
        assert story.bystander_while_away == 0, story              # other connections unharmed
        # the error a client with a short message timeout gets, and only for the away broker
        assert story.impatient == {0: None, 1: KafkaError._MSG_TIMED_OUT}, story
        assert story.consumed == sorted([b"before-%d" % i for i in range(8)] +
                                        [b"during-%d" % i for i in range(8)] +
                                        [b"impatient"]), story  # once each
    assert direct.new_connection_while_away == "refused"
    assert proxied.new_connection_while_away == "closed"

    text = scrape(admin)
    assert metric(text, "sidecar_upstream_cx_connect_fail_total", cluster=f"broker-{GONE}") >= 1
    assert all(metric(text, "sidecar_upstream_cx_connect_fail_total", cluster=f"broker-{b}") == 0
               for b in ports if b != GONE)
    assert metric(text, "sidecar_kafka_topic_records_total", stat_prefix="kafka",
                  api="produce", topic="orders-away-proxied") >= 16
