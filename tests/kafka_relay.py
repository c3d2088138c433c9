"""Test-only pieces for Kafka: librdkafka mock brokers (``ControlledMockCluster``: brokers a
test can take down and bring back), and an asyncio TCP relay that runs the Kafka broker filter
between real clients and those brokers.

The relay stands in for the TCP proxy (not built yet): one listening port per broker, each
accepted connection paired with one to its broker, bytes of both directions fed through a
``KafkaBrokerSession`` exactly as the TCP proxy will. It runs its own event loop in a thread,
so blocking clients (confluent-kafka) and asyncio ones (aiokafka) can both use it.
"""

from __future__ import annotations

import asyncio
import ctypes
import glob
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import confluent_kafka
from confluent_kafka import Producer

from sidecar.l4.kafka_broker import KafkaBrokerFilter

READ_CHUNK = 65536


class MockCluster:
    """librdkafka's in-process mock brokers, alive as long as the client that owns them."""

    def __init__(self, brokers: int = 3, partitions: int = 4) -> None:
        self._owner = Producer({
            "test.mock.num.brokers": brokers,
            "bootstrap.servers": "",
            "log_level": 3,
        })
        metadata = self._owner.list_topics(timeout=10)
        self.brokers: dict[int, tuple[str, int]] = {
            b.id: (b.host, b.port) for b in metadata.brokers.values()}
        self.partitions = partitions

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.brokers.values())

    def close(self) -> None:
        self._owner.flush(1)
        del self._owner


def _librdkafka() -> ctypes.CDLL:
    """The librdkafka inside the confluent-kafka wheel (the same file its extension loaded):
    its mock cluster API (rdkafka_mock.h) is exported but not wrapped by confluent-kafka."""
    libs = os.path.join(os.path.dirname(os.path.dirname(confluent_kafka.__file__)),
                        "confluent_kafka.libs")
    (path,) = glob.glob(os.path.join(libs, "librdkafka*.so*"))
    lib = ctypes.CDLL(path)
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_conf_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                      ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
    lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_mock_cluster_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
    lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
    for name in ("rd_kafka_mock_broker_set_down", "rd_kafka_mock_broker_set_up"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.rd_kafka_mock_topic_create.restype = ctypes.c_int
    lib.rd_kafka_mock_topic_create.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                               ctypes.c_int]
    lib.rd_kafka_mock_partition_set_leader.restype = ctypes.c_int
    lib.rd_kafka_mock_partition_set_leader.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                                       ctypes.c_int32, ctypes.c_int32]
    return lib


class ControlledMockCluster:
    """librdkafka mock brokers whose brokers can be taken down and brought back
    (``rd_kafka_mock_broker_set_down`` / ``_set_up``): down, a broker drops its connections
    and refuses new ones on the same port; partition leadership does not move. Made through
    the C API, with a handle of its own, since confluent-kafka does not expose it."""

    def __init__(self, brokers: int = 3) -> None:
        lib = self._lib = _librdkafka()
        err = ctypes.create_string_buffer(512)
        conf = lib.rd_kafka_conf_new()
        for k, v in ((b"log_level", b"2"), (b"bootstrap.servers", b"")):
            if lib.rd_kafka_conf_set(conf, k, v, err, len(err)) != 0:
                raise RuntimeError(err.value.decode())
        self._rk = lib.rd_kafka_new(0, conf, err, len(err))     # 0: RD_KAFKA_PRODUCER
        if not self._rk:
            raise RuntimeError(err.value.decode())
        self._mcluster = lib.rd_kafka_mock_cluster_new(self._rk, brokers)
        if not self._mcluster:
            lib.rd_kafka_destroy(self._rk)
            raise RuntimeError("rd_kafka_mock_cluster_new failed")
        # broker ids and addresses, as a client learns them
        probe = Producer({"bootstrap.servers": self.bootstrap, "log_level": 2})
        metadata = probe.list_topics(timeout=10)
        self.brokers: dict[int, tuple[str, int]] = {
            b.id: (b.host, b.port) for b in metadata.brokers.values()}
        del probe

    @property
    def bootstrap(self) -> str:
        return self._lib.rd_kafka_mock_cluster_bootstraps(self._mcluster).decode()

    def create_topic(self, topic: str, leaders: dict[int, int]) -> None:
        """A topic with ``{partition: leader broker id}`` (replicated on every broker; the
        mock would otherwise pick leaders at random)."""
        lib, name = self._lib, topic.encode()
        if lib.rd_kafka_mock_topic_create(self._mcluster, name, len(leaders),
                                          len(self.brokers)) != 0:
            raise RuntimeError(f"{topic}: topic_create failed")
        for partition, broker_id in leaders.items():
            if lib.rd_kafka_mock_partition_set_leader(self._mcluster, name, partition,
                                                      broker_id) != 0:
                raise RuntimeError(f"{topic} [{partition}]: set_leader failed")

    def set_down(self, broker_id: int) -> None:
        if self._lib.rd_kafka_mock_broker_set_down(self._mcluster, broker_id) != 0:
            raise RuntimeError(f"broker {broker_id}: set_down failed")

    def set_up(self, broker_id: int) -> None:
        if self._lib.rd_kafka_mock_broker_set_up(self._mcluster, broker_id) != 0:
            raise RuntimeError(f"broker {broker_id}: set_up failed")

    def close(self) -> None:
        self._lib.rd_kafka_mock_cluster_destroy(self._mcluster)
        self._lib.rd_kafka_destroy(self._rk)


@dataclass
class Tap:
    """Every byte of one relayed connection, by direction (for byte-identity checks)."""

    from_client: bytearray = field(default_factory=bytearray)
    to_broker: bytearray = field(default_factory=bytearray)
    from_broker: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)


@dataclass
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)


class KafkaRelay:
    """One relay port per broker. ``make_filter`` gets {broker id: relay port} (so it can
    write rewrite rules pointing at the relay) and returns the filter, or None for a plain
    byte relay (the benchmark's baseline)."""

    def __init__(self, brokers: dict[int, tuple[str, int]],
                 make_filter: Callable[[dict[int, int]], KafkaBrokerFilter | None] | None,
                 principal: str | None = None, tap: bool = False) -> None:
        self.brokers = brokers
        self.principal = principal
        self.taps: list[Tap] | None = [] if tap else None
        self._make_filter = make_filter
        self.filter: KafkaBrokerFilter | None = None
        self.ports: dict[int, int] = {}
        self.close_reasons: list[str] = []
        self.connections: dict[int, int] = {b: 0 for b in brokers}
        self._servers: dict[int, asyncio.base_events.Server] = {}
        self._links: dict[int, list[_Link]] = {b: [] for b in brokers}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="kafka-relay")

    # ---- lifecycle (called from the test's thread) -------------------------------------------

    def start(self) -> KafkaRelay:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        for broker_id in list(self._servers):
            self._call(self._stop_broker(broker_id))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def stop_broker(self, broker_id: int) -> None:
        """The broker goes away: its port stops listening and its connections drop."""
        self._call(self._stop_broker(broker_id))

    def restart_broker(self, broker_id: int) -> None:
        self._call(self._listen(broker_id, self.ports[broker_id]))

    def bootstrap(self, broker_ids: list[int] | None = None) -> str:
        ids = broker_ids or sorted(self.ports)
        return ",".join(f"127.0.0.1:{self.ports[b]}" for b in ids)

    def _call(self, coro) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # ---- the relay (on its own loop) ---------------------------------------------------------

    async def _start(self) -> None:
        for broker_id in self.brokers:
            await self._listen(broker_id, 0)
        if self._make_filter is not None:
            self.filter = self._make_filter(dict(self.ports))

    async def _listen(self, broker_id: int, port: int) -> None:
        server = await asyncio.start_server(
            lambda r, w: self._serve(broker_id, r, w), "127.0.0.1", port)
        self._servers[broker_id] = server
        self.ports[broker_id] = server.sockets[0].getsockname()[1]

    async def _stop_broker(self, broker_id: int) -> None:
        server = self._servers.pop(broker_id, None)
        if server is not None:
            server.close()
        for link in self._links[broker_id]:
            for task in link.tasks:
                task.cancel()
            link.client.close()
            if link.upstream is not None:
                link.upstream.close()
        self._links[broker_id].clear()
        if server is not None:
            await server.wait_closed()

    async def _serve(self, broker_id: int, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        link = _Link(client_w)
        self._links[broker_id].append(link)
        self.connections[broker_id] += 1
        host, port = self.brokers[broker_id]
        tap = Tap()
        if self.taps is not None:
            self.taps.append(tap)
        try:
            upstream_r, upstream_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        link.upstream = upstream_w
        session = self.filter.session(self.principal) if self.filter is not None else None

        def close_both(reason: str) -> None:
            self.close_reasons.append(reason)
            client_w.close()
            upstream_w.close()

        def to_broker(data: bytes) -> None:
            if self.taps is not None:
                tap.to_broker += data
            upstream_w.write(data)

        def to_client(data: bytes) -> None:
            if self.taps is not None:
                tap.to_client += data
            client_w.write(data)

        async def client_to_broker() -> None:
            while data := await client_r.read(READ_CHUNK):
                if self.taps is not None:
                    tap.from_client += data
                if session is None:
                    to_broker(data)
                else:
                    out = session.on_downstream_bytes(data)
                    if out.to_upstream:
                        to_broker(out.to_upstream)
                    if out.to_downstream:
                        to_client(out.to_downstream)
                    if out.close:
                        close_both(out.close_reason)
                        return
                await upstream_w.drain()
            upstream_w.close()

        async def broker_to_client() -> None:
            while data := await upstream_r.read(READ_CHUNK):
                if self.taps is not None:
                    tap.from_broker += data
                if session is None:
                    to_client(data)
                else:
                    out = session.on_upstream_bytes(data)
                    if out.to_downstream:
                        to_client(out.to_downstream)
                    if out.close:
                        close_both(out.close_reason)
                        return
                await client_w.drain()
            client_w.close()

        link.tasks = [asyncio.ensure_future(client_to_broker()),
                      asyncio.ensure_future(broker_to_client())]
        try:
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in link.tasks:
                task.cancel()
            client_w.close()
            upstream_w.close()
            if session is not None:
                session.on_close()
            if link in self._links[broker_id]:
                self._links[broker_id].remove(link)
