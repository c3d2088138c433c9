"""Kafka: produce throughput through the Kafka broker filter, and its decode cost per frame.

    python -m bench.kafka_decode                  # 1M x 200 B messages per target
    python -m bench.kafka_decode --messages 50000 --size 1000 --json out.json

One run, three targets, side by side, against librdkafka's in-process mock cluster (3 brokers):
  direct         confluent-kafka producer straight to the mock brokers
  filter         tests/kafka_relay.py's relay running the Kafka broker filter (rewrite rules
                 for every broker)
  sidecar+kafka  the real sidecar (`sidecar run`, one worker): one listener per broker,
                 kafka_broker in front of tcp_proxy
The relay runs in a child process on uvloop (one event loop, as a sidecar worker); relay and
sidecar CPU time is reported per MB.

There is no "plain proxy" baseline: without the filter's broker address rewriting, clients
learn the brokers' own addresses from the first Metadata answer and connect to them directly,
so a plain TCP proxy carries only the bootstrap exchange (measured: the sidecar without
kafka_broker used no CPU during the produce run). The filter's cost is therefore shown as the
throughput ratio to direct and as CPU per MB. Then frames captured from a real produce + consume run through the
filter are replayed into fresh sessions to time the filter per frame, by API and direction.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
# the imports below need the repository root and tests/ (kafka_relay) on sys.path first

import yaml  # noqa: E402
from confluent_kafka import Consumer, Producer  # noqa: E402
from kafka_relay import KafkaRelay, MockCluster  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from bench.procs import tree_cpu_seconds  # noqa: E402
from sidecar.codec.kafka.framing import Frame, FrameSplitter  # noqa: E402
from sidecar.codec.kafka.headers import peek_correlation_id, peek_request_head  # noqa: E402
from sidecar.codec.kafka.schema import api_name  # noqa: E402
from sidecar.config.kafka import (  # noqa: E402
    BrokerAddressRewriteRule,
    KafkaBrokerConfig,
)
from sidecar.l4.kafka_broker import KafkaBrokerFilter  # noqa: E402
from sidecar.l4.kafka_metrics import RegistryFamilies  # noqa: E402
from sidecar.testing import free_port, stop_process, wait_for_port  # noqa: E402


def make_filter(ports: dict[int, int]) -> KafkaBrokerFilter:
    config = KafkaBrokerConfig(stat_prefix="bench", broker_address_rewrite_rules=tuple(
        BrokerAddressRewriteRule(b, "127.0.0.1", p) for b, p in ports.items()))
    return KafkaBrokerFilter(config, RegistryFamilies(CollectorRegistry()))


def relay_child(brokers: dict[int, tuple[str, int]], with_filter: bool, conn) -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    relay = KafkaRelay(brokers, make_filter if with_filter else None).start()
    t0 = os.times()         # after start-up: only the relaying is counted
    conn.send(relay.ports)
    conn.recv()   # stop
    t = os.times()
    conn.send(t.user + t.system - t0.user - t0.system)
    relay.stop()


def produce(bootstrap: str, topic: str, messages: int, size: int) -> float:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 2,
                         "queue.buffering.max.messages": messages + 10})
    producer.list_topics(topic, timeout=10)   # topic and connections ready before timing
    payload = b"x" * size
    start = time.perf_counter()
    for i in range(messages):
        while True:
            try:
                producer.produce(topic, payload)
                break
            except BufferError:
                producer.poll(0.01)
        if i % 10000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    elapsed = time.perf_counter() - start
    if left:
        raise RuntimeError(f"{left} messages not delivered")
    return elapsed


def sidecar_config(brokers: dict[int, tuple[str, int]], ports: dict[int, int],
                   kafka: bool) -> dict:
    """The real sidecar: one listener per broker, tcp_proxy (+ kafka_broker)."""
    rules = [{"id": b, "host": "127.0.0.1", "port": p} for b, p in ports.items()]
    listeners = []
    for b, port in ports.items():
        lst: dict = {"name": f"kafka-{b}", "address": "127.0.0.1", "port": port,
                     "tcp_proxy": {"cluster": f"broker-{b}"}}
        if kafka:
            lst["kafka_broker"] = {"stat_prefix": "bench",
                                   "id_based_broker_address_rewrite_spec": {"rules": rules}}
        listeners.append(lst)
    return {"admin": {"address": "127.0.0.1", "port": free_port()}, "listeners": listeners,
            "clusters": [{"name": f"broker-{b}", "endpoints": [f"{h}:{p}"]}
                         for b, (h, p) in brokers.items()]}


def run_sidecar(cluster: MockCluster, kafka: bool, topic: str, messages: int,
                size: int) -> tuple[float, float]:
    """(seconds, sidecar CPU seconds) of one produce run through `sidecar run`."""
    ports = {b: free_port() for b in cluster.brokers}
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "sidecar.yaml"
        cfg.write_text(yaml.safe_dump(sidecar_config(cluster.brokers, ports, kafka)))
        proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(cfg),
                                 "--concurrency", "1", "--log-level", "warning"],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            wait_for_port(ports[min(ports)], 30)
            cpu0 = tree_cpu_seconds(proc.pid)
            bootstrap = ",".join(f"127.0.0.1:{p}" for p in ports.values())
            seconds = produce(bootstrap, topic, messages, size)
            return seconds, tree_cpu_seconds(proc.pid) - cpu0
        finally:
            stop_process(proc)


def throughput(cluster: MockCluster, messages: int, size: int) -> dict[str, dict]:
    results: dict[str, dict] = {}
    ctx = multiprocessing.get_context("spawn")   # the parent runs librdkafka threads
    mb = messages * size / 1e6
    for target in ("direct", "filter", "sidecar+kafka"):
        cpu: float | None = None
        if target == "direct":
            seconds = produce(cluster.bootstrap, f"bench-{target}", messages, size)
        elif target == "sidecar+kafka":
            seconds, cpu = run_sidecar(cluster, True, "bench-sidecar-kafka", messages, size)
        else:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=relay_child, args=(cluster.brokers, target == "filter",
                                                         child), daemon=True)
            proc.start()
            ports = parent.recv()
            t0 = None
            try:
                bootstrap = ",".join(f"127.0.0.1:{p}" for p in ports.values())
                seconds = produce(bootstrap, f"bench-{target}", messages, size)
            finally:
                parent.send("stop")
                cpu = parent.recv()
                proc.join(10)
            del t0
        results[target] = {"seconds": seconds, "msgs_per_s": messages / seconds,
                           "mb_per_s": mb / seconds,
                           "relay_cpu_s_per_mb": (cpu / mb) if cpu is not None else None}
        print(f"  {target:13s} {messages / seconds:10.0f} msg/s {mb / seconds:8.1f} MB/s"
              + (f"  proxy CPU {cpu / mb * 1000:.2f} ms/MB" if cpu is not None else ""),
              flush=True)
    return results


def capture(cluster: MockCluster, messages: int, size: int) -> list:
    """Taps of a real produce + consume conversation through the filter."""
    relay = KafkaRelay(cluster.brokers, make_filter, tap=True).start()
    try:
        produce(relay.bootstrap(), "bench-capture", messages, size)
        consumer = Consumer({"bootstrap.servers": relay.bootstrap(), "group.id": "bench",
                             "auto.offset.reset": "earliest", "log_level": 2})
        consumer.subscribe(["bench-capture"])
        got, deadline = 0, time.monotonic() + 60
        while got < messages and time.monotonic() < deadline:
            batch = consumer.consume(1000, 0.5)
            got += sum(1 for m in batch if m.error() is None)
        consumer.close()
        return list(relay.taps or [])
    finally:
        relay.stop()


def split(stream: bytes) -> list[bytes]:
    return [e.raw for e in FrameSplitter().feed(stream) if type(e) is Frame]


def decode_cost(taps: list, repeat: int) -> dict[str, dict]:
    """Replay each captured connection into fresh sessions, timing every call."""
    filt = make_filter({1: 1, 2: 2, 3: 3})
    costs: dict[tuple[str, str], list[float]] = defaultdict(list)
    sizes: dict[tuple[str, str], int] = defaultdict(int)
    split_ns = 0.0
    split_frames = 0
    for tap in taps:
        requests, responses = split(bytes(tap.from_client)), split(bytes(tap.from_broker))
        if not requests:
            continue
        api_of: dict[int, str] = {}
        for frame in requests:
            key, _, cid = peek_request_head(frame[4:])
            api_of[cid] = api_name(key)
        for _ in range(repeat):
            session = filt.session(None)
            for frame in requests:
                key = (api_name(peek_request_head(frame[4:])[0]), "request")
                t = time.perf_counter_ns()
                session.on_downstream_bytes(frame)
                costs[key].append(time.perf_counter_ns() - t)
                sizes[key] += len(frame)
            for frame in responses:
                key = (api_of.get(peek_correlation_id(frame[4:]), "unknown"), "response")
                t = time.perf_counter_ns()
                session.on_upstream_bytes(frame)
                costs[key].append(time.perf_counter_ns() - t)
                sizes[key] += len(frame)
            session.on_close()
            t = time.perf_counter_ns()
            FrameSplitter().feed(bytes(tap.from_client))
            FrameSplitter().feed(bytes(tap.from_broker))
            split_ns += time.perf_counter_ns() - t
            split_frames += len(requests) + len(responses)
    table = {}
    for (api, direction), samples in sorted(costs.items()):
        samples.sort()
        table[f"{api} {direction}"] = {
            "frames": len(samples), "mean_bytes": sizes[(api, direction)] / len(samples),
            "mean_us": sum(samples) / len(samples) / 1000,
            "p50_us": samples[len(samples) // 2] / 1000,
        }
    table["framing only"] = {"frames": split_frames, "mean_bytes": 0,
                             "mean_us": split_ns / max(split_frames, 1) / 1000,
                             "p50_us": None}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--capture-messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    cluster = MockCluster(brokers=3)
    print(f"produce {args.messages} x {args.size} B (confluent-kafka, linger.ms=5, acks=all)")
    tp = throughput(cluster, args.messages, args.size)
    direct = tp["direct"]["msgs_per_s"]
    print(f"  ratios: filter/direct {tp['filter']['msgs_per_s'] / direct:.2f}  "
          f"sidecar+kafka/direct {tp['sidecar+kafka']['msgs_per_s'] / direct:.2f}")

    taps = capture(cluster, args.capture_messages, args.size)
    costs = decode_cost(taps, args.repeat)
    print(f"\nfilter cost per frame (frames of a real produce + group consume of "
          f"{args.capture_messages} x {args.size} B, replayed {args.repeat}x)")
    print(f"  {'frame':28s} {'frames':>7s} {'bytes':>9s} {'mean us':>8s} {'p50 us':>7s}")
    for name, row in costs.items():
        p50 = f"{row['p50_us']:7.1f}" if row["p50_us"] is not None else "      -"
        print(f"  {name:28s} {row['frames']:7d} {row['mean_bytes']:9.0f} "
              f"{row['mean_us']:8.1f} {p50}")
    if args.json:
        args.json.write_text(json.dumps({"throughput": tp, "per_frame": costs}, indent=2))
    cluster.close()


if __name__ == "__main__":
    main()
