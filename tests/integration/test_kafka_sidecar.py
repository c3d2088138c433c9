"""Kafka through the real sidecar (``sidecar run``, a child process): one listener per broker of
a librdkafka mock cluster (three brokers), each ``kafka_broker`` in front of ``tcp_proxy``,
with mTLS from the clients and the topic ACL keyed by their SPIFFE IDs.

Clients (librdkafka through confluent-kafka, and aiokafka) bootstrap from one listener only:
they reach the other brokers through the sidecar because every broker address they learn
was rewritten to a sidecar listener.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.request

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from confluent_kafka import Consumer, KafkaError, Producer
from kafka_relay import MockCluster

from sidecar.cli.certs import DevCA
from sidecar.testing import ProxyProcess, free_port

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


def sidecar_config(brokers: MockCluster, pki, ports: dict[int, int], admin: int,
                   tls: bool) -> dict:
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

    def start(tls: bool = True) -> tuple[dict[int, int], int]:
        ports = {b: free_port() for b in brokers.brokers}
        admin = free_port()
        p = ProxyProcess(sidecar_config(brokers, pki, ports, admin, tls), str(tmp_path),
                         args=("--log-level", "warning"))
        p.start(wait_port=ports[min(ports)], timeout=30)
        procs.append(p)
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
