"""Request ids: version-4 UUID shape, unique across the counter's byte and word wraps, and a new
prefix in a forked worker."""

import os
import uuid

from sidecar.listener.edge import RequestIds


def _ids_from(start: int, count: int) -> list[str]:
    ids = RequestIds()
    ids.start_at(start)
    return [ids.next() for _ in range(count)]


def test_ids_are_version_4_uuids():
    for rid in _ids_from(0, 600):
        u = uuid.UUID(rid)
        assert u.version == 4 and u.variant == uuid.RFC_4122
        assert str(u) == rid


def test_counter_carries_across_the_low_byte_and_wraps_at_32_bits():
    ids = _ids_from(0xFFFFFEFD, 260)
    suffixes = [int(r[-8:], 16) for r in ids]
    # counter values follow each other, the low byte's wrap carries into the head
    assert suffixes[:4] == [0xFFFFFEFE, 0xFFFFFEFF, 0xFFFFFF00, 0xFFFFFF01]
    assert suffixes[-3:] == [0xFFFFFFFF, 0x00000000, 0x00000001]
    assert len(set(ids)) == len(ids)


def test_forked_worker_draws_a_new_prefix():
    from sidecar.listener import edge

    parent = edge.new_request_id()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # child: report its first id, exit at once
        try:
            os.write(w, edge.new_request_id().encode())
        finally:
            os._exit(0)
    os.close(w)
    child = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert child[:28] != parent[:28]
