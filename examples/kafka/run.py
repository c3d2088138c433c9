"""Kafka through two sidecars with mTLS, in one command.

    python examples/kafka/run.py                 # fixed ports (19092-19094 for the apps,
                                                 # admins on 9901 and 9902)
    python examples/kafka/run.py --free-ports    # any free ports (CI)
    python examples/kafka/run.py --keep          # leave everything running: open the dashboards

What runs (all on 127.0.0.1):

* a Kafka cluster of three brokers: librdkafka's mock brokers (inside the confluent-kafka
  wheel), a real Kafka wire-protocol implementation;
* the brokers' sidecar (``sidecar-broker.yaml``): mTLS listeners, one per broker, with the
  Kafka filter in front of tcp_proxy (metrics per API and topic, broker address rewriting,
  topic ACL by SPIFFE ID);
* the apps' sidecar (``sidecar-client.yaml``): plain listeners on loopback for the apps, mTLS
  to the brokers' sidecar with its own workload certificate;
* a producer and a consumer (confluent-kafka) that only know ``127.0.0.1:19092``.

The producer sends orders, the consumer (a consumer group) reads them back, and a write to
``payroll`` is refused by the ACL with Kafka's own TOPIC_AUTHORIZATION_FAILED. Then the
report: what each side saw, and the per-topic numbers from the brokers' sidecar dashboard
(``/dashboard.json``, the data behind its live page). Exits 1 if anything is not as promised.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from confluent_kafka import Consumer, KafkaError, Producer  # noqa: E402

from sidecar.cli.certs import DevCA  # noqa: E402
from sidecar.shared.testing import free_port  # noqa: E402
from sidecar.testing import stop_process  # noqa: E402

APPS = "spiffe://cluster.local/ns/shop/sa/apps-sidecar"
FIXED = {"CLIENT_PORT_1": 19092, "CLIENT_PORT_2": 19093, "CLIENT_PORT_3": 19094,
         "BROKER_PORT_1": 29092, "BROKER_PORT_2": 29093, "BROKER_PORT_3": 29094,
         "CLIENT_ADMIN": 9901, "BROKER_ADMIN": 9902}
WAIT = 30.0




class MockKafka:
    """librdkafka's in-process mock cluster, alive while its owning client is."""

    def __init__(self, brokers: int = 3):
        self._owner = Producer({"test.mock.num.brokers": brokers, "bootstrap.servers": "",
                                "log_level": 3})
        md = self._owner.list_topics(timeout=10)
        self.brokers = {b.id: f"{b.host}:{b.port}" for b in md.brokers.values()}


def render(template: str, values: dict[str, object], out: str) -> str:
    with open(os.path.join(HERE, template)) as f:
        text = f.read()
    for k, v in values.items():
        text = text.replace(f"__{k}__", str(v))
    assert "__" not in text.split("\nadmin:", 1)[1], f"{template}: unfilled placeholder"
    with open(out, "w") as f:
        f.write(text)
    return out


def start_sidecar(config: str, log: str, port: int) -> subprocess.Popen[bytes]:
    out = open(log, "w")
    p = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", config,
                          "--concurrency", "1", "--log-level", "warning"],
                         stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        if p.poll() is not None:
            raise RuntimeError(f"sidecar {config} exited:\n{open(log).read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return p
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"sidecar {config} did not start")


def dashboard(admin: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/dashboard.json", timeout=10) as r:
        return json.load(r)


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)
        if not ok:
            self.failures.append(what)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--free-ports", action="store_true")
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--keep", action="store_true", help="keep running until Ctrl-C")
    args = ap.parse_args()
    ports = {k: (free_port() if args.free_ports else v) for k, v in FIXED.items()}
    tmp = tempfile.mkdtemp(prefix="kafka-example-")
    report = Report()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        print("kafka: starting 3 mock brokers (librdkafka)", flush=True)
        kafka = MockKafka()
        ids = sorted(kafka.brokers)
        ca = DevCA.create("cluster.local")
        ca.write(tmp)
        ca.issue("shop", "apps-sidecar", ips=["127.0.0.1"]).write(tmp, "client")
        ca.issue("kafka", "broker-sidecar", ips=["127.0.0.1"]).write(tmp, "broker")
        values: dict[str, object] = {
            **ports, "CA": os.path.join(tmp, "ca.pem"),
            "CLIENT_CERT": os.path.join(tmp, "client.pem"),
            "CLIENT_KEY": os.path.join(tmp, "client-key.pem"),
            "BROKER_CERT": os.path.join(tmp, "broker.pem"),
            "BROKER_KEY": os.path.join(tmp, "broker-key.pem"),
            **{f"ID_{i + 1}": b for i, b in enumerate(ids)},
            **{f"MOCK_BROKER_{i + 1}": kafka.brokers[b] for i, b in enumerate(ids)}}
        broker_cfg = render("sidecar-broker.yaml", values, os.path.join(tmp, "broker.yaml"))
        client_cfg = render("sidecar-client.yaml", values, os.path.join(tmp, "client.yaml"))
        procs.append(start_sidecar(broker_cfg, os.path.join(tmp, "broker.log"),
                                   ports["BROKER_PORT_1"]))
        procs.append(start_sidecar(client_cfg, os.path.join(tmp, "client.log"),
                                   ports["CLIENT_PORT_1"]))
        bootstrap = f"127.0.0.1:{ports['CLIENT_PORT_1']}"
        print(f"sidecars up: apps -> {bootstrap} (admin :{ports['CLIENT_ADMIN']}) == mTLS ==> "
              f"brokers' sidecar (admin :{ports['BROKER_ADMIN']}) -> mock brokers", flush=True)

        print(f"producer: {args.messages} orders to topic 'orders'", flush=True)
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 2})
        md = producer.list_topics("orders", timeout=WAIT)
        seen = sorted(f"{b.host}:{b.port}" for b in md.brokers.values())
        delivered: list[object] = []
        for i in range(args.messages):
            producer.produce("orders", json.dumps({"order": i}).encode(), key=str(i).encode(),
                             on_delivery=lambda err, msg: delivered.append(err))
        producer.flush(WAIT)
        denied: list[object] = []
        producer.produce("payroll", b"salaries", partition=0,
                         on_delivery=lambda err, msg: denied.append(err.code() if err else None))
        producer.flush(WAIT)

        print("consumer: group 'billing' reads 'orders'", flush=True)
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "billing",
                             "auto.offset.reset": "earliest", "log_level": 2})
        consumer.subscribe(["orders"])
        got = 0
        end = time.monotonic() + WAIT
        while got < args.messages and time.monotonic() < end:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                got += 1
        consumer.close()

        time.sleep(1.5)      # the dashboard samples once a second
        dashboard(ports["BROKER_ADMIN"])
        time.sleep(1.2)
        board = dashboard(ports["BROKER_ADMIN"])
        k = next((x for x in board["kafka"] if x["stat_prefix"] == "kafka"), None)
        topics = {t["topic"]: t for t in (k or {}).get("topics", [])}
        orders = topics.get("orders", {})

        print("\nreport")
        report.check(seen == sorted(f"127.0.0.1:{ports[f'CLIENT_PORT_{i}']}" for i in (1, 2, 3)),
                     f"the producer only ever saw the apps' sidecar: {', '.join(seen)}")
        report.check(delivered == [None] * args.messages,
                     f"{delivered.count(None)}/{args.messages} orders delivered")
        report.check(got == args.messages, f"{got}/{args.messages} orders consumed by the group")
        report.check(denied == [KafkaError.TOPIC_AUTHORIZATION_FAILED],
                     "payroll refused by the topic ACL with TOPIC_AUTHORIZATION_FAILED")
        report.check(orders.get("produce_records") == args.messages and
                     orders.get("fetch_records", 0) >= args.messages,
                     f"brokers' sidecar dashboard, topic orders: produced "
                     f"{orders.get('produce_records')} records "
                     f"({orders.get('produce_bytes')} bytes), fetched "
                     f"{orders.get('fetch_records')}")
        report.check(topics.get("payroll", {}).get("produce_denied") == 1,
                     "dashboard: payroll denied once")
        if k is not None:
            print("  requests by API: " + ", ".join(f"{a['api']} {a['requests']}"
                                                    for a in k["apis"][:10]))
        tcp = {t["stat_prefix"]: t for t in board["tcp"]}
        print("  TCP per broker listener: " + ", ".join(
            f"{p} {t['cx_total']} conns {t['rx_bytes']}B in/{t['tx_bytes']}B out"
            for p, t in sorted(tcp.items())))
        print(f"\ndashboards: http://127.0.0.1:{ports['BROKER_ADMIN']}/ (brokers' sidecar), "
              f"http://127.0.0.1:{ports['CLIENT_ADMIN']}/ (apps' sidecar)")
        if args.keep:
            print("running; Ctrl-C to stop", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        for p in reversed(procs):
            stop_process(p, timeout=10)
    if report.failures:
        print(f"\n{len(report.failures)} check(s) failed; sidecar logs in {tmp}")
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
