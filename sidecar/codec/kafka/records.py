"""Record counts of a ``records`` field (Produce request, Fetch response) from batch headers.

Only batch headers are read, never the records themselves (which may be compressed): the
layout is the published one (https://kafka.apache.org/documentation/#recordbatch):
baseOffset int64, batchLength int32, partitionLeaderEpoch int32, magic int8, crc uint32,
attributes int16, lastOffsetDelta int32, baseTimestamp int64, maxTimestamp int64,
producerId int64, producerEpoch int16, baseSequence int32, recordsCount int32 (offset 57).
The legacy message sets (magic 0 and 1) share the first 12 bytes (offset, size) and keep magic
at offset 16 too; each of their entries counts as one record (a compressed legacy wrapper is
not opened). A Fetch response may end with a partial batch: it is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

_LOG_OVERHEAD = 12          # offset int64 + size int32, before every batch / legacy message
_MAGIC_OFFSET = 16
_RECORDS_COUNT_OFFSET = 57
_BATCH_V2_HEADER = 61


@dataclass(frozen=True, slots=True)
class RecordCounts:
    records: int
    batches: int


def count_records(data: bytes | memoryview | None) -> RecordCounts:
    if not data:
        return RecordCounts(0, 0)
    records = 0
    batches = 0
    pos = 0
    end = len(data)
    while end - pos > _MAGIC_OFFSET:
        size = int.from_bytes(data[pos + 8:pos + 12], "big", signed=True)
        if size < 0 or pos + _LOG_OVERHEAD + size > end:
            break
        if data[pos + _MAGIC_OFFSET] >= 2:
            if size + _LOG_OVERHEAD < _BATCH_V2_HEADER:
                break
            count = int.from_bytes(
                data[pos + _RECORDS_COUNT_OFFSET:pos + _BATCH_V2_HEADER], "big", signed=True)
            records += max(count, 0)
        else:
            records += 1
        batches += 1
        pos += _LOG_OVERHEAD + size
    return RecordCounts(records, batches)
