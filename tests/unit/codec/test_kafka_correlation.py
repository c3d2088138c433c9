"""Correlation tracking keeps the client's response order."""

from __future__ import annotations

from sidecar.codec.kafka.correlation import CorrelationTracker, InFlight


def entry(cid: int, local: bytes | None = None) -> InFlight:
    return InFlight(cid, 3, 12, started_ns=0, local_response=local)


def test_match_pops_by_correlation_id() -> None:
    t: CorrelationTracker = CorrelationTracker()
    assert t.track(entry(1)) and t.track(entry(2))
    m = t.match(1)
    assert m.request is not None and m.request.correlation_id == 1
    assert (m.send_before, m.dropped) == ([], 0)
    assert t.match(1).request is None   # answered once only
    assert len(t) == 1


def test_local_answers_wait_for_earlier_broker_answers() -> None:
    t: CorrelationTracker = CorrelationTracker()
    t.track(entry(1))
    t.track(entry(2, local=b"L2"))
    t.track(entry(3))
    assert t.take_ready() == []          # 1 is still owed by the broker
    assert t.match(1).send_before == []
    assert t.take_ready() == [b"L2"]     # now it is at the head
    assert t.match(3).request is not None


def test_a_later_answer_drops_skipped_requests_and_releases_local_ones() -> None:
    t: CorrelationTracker = CorrelationTracker()
    t.track(entry(1))
    t.track(entry(2, local=b"L2"))
    t.track(entry(3))
    m = t.match(3)                       # Kafka answers in order: 1 will never come
    assert (m.send_before, m.dropped) == ([b"L2"], 1)
    assert len(t) == 0


def test_full_and_duplicate() -> None:
    t: CorrelationTracker = CorrelationTracker(max_in_flight=2)
    assert t.track(entry(1))
    assert not t.track(entry(1))
    assert t.track(entry(2))
    assert not t.track(entry(3))
    assert t.clear() == 2
