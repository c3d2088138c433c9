"""Record counts from batch headers, on batches built by aiokafka's producer code."""

from __future__ import annotations

from kafka_wire import legacy_message_set, record_batch

from sidecar.codec.kafka.records import count_records


def test_uncompressed_and_gzip_batches() -> None:
    values = [b"v%d" % i for i in range(7)]
    for compression in (0, 1):
        counts = count_records(record_batch(values, compression))
        assert (counts.records, counts.batches) == (7, 1)


def test_several_batches_and_a_truncated_tail() -> None:
    a, b = record_batch([b"x"] * 3), record_batch([b"y"] * 5, compression=1)
    assert count_records(a + b).records == 8
    # a Fetch response may end in a partial batch: only whole ones count
    assert count_records(a + b[:-3]).records == 3
    assert count_records(a[:20]).records == 0


def test_legacy_message_sets_count_each_message() -> None:
    for magic in (0, 1):
        assert count_records(legacy_message_set([b"a", b"b", b"c"], magic)).records == 3


def test_nothing() -> None:
    assert count_records(None).records == 0
    assert count_records(b"").records == 0
