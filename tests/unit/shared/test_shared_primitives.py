"""The same semantics from both implementations: ``LocalState`` (one process) and the
shared-memory ``WorkerShared`` (used here from one process as worker 0 and worker 1)."""

import time

import pytest

from sidecar.config.stores import SharedStateConfig
from sidecar.shared.api import BucketSpec, Outcome, Priority, ReplayVerdict, Resource, Streak
from sidecar.shared.host import SharedHost, TableFull
from sidecar.shared.local import LocalState

D, H = Priority.DEFAULT, Priority.HIGH
REQ, PEND, RETRY, CX = Resource.REQUESTS, Resource.PENDING, Resource.RETRIES, Resource.CONNECTIONS
SMALL = SharedStateConfig(counter_rows=16, bucket_rows=16, replay_entries=16)


@pytest.fixture(params=["local", "shm"])
def state(request):
    if request.param == "local":
        yield LocalState(SMALL)
    else:
        host = SharedHost.create(SMALL, 2)
        yield host.worker(0)
        host.close()


def test_breaker_admit_release_per_priority_and_resource(state):
    b = state.breaker("svc")
    assert [b.try_acquire(D, REQ, 2) for _ in range(3)] == [True, True, False]
    assert b.try_acquire(H, REQ, 2)                        # HIGH has its own counters
    assert b.try_acquire(D, CX, 1) and not b.try_acquire(D, CX, 1)
    snap = b.snapshot(D)
    assert (snap.requests, snap.pending, snap.retries, snap.connections) == (2, 0, 0, 1)
    b.release(D, REQ)
    assert b.try_acquire(D, REQ, 2)
    b.release(D, PEND)                                     # never below zero
    assert b.snapshot(D).pending == 0
    assert state.breaker("svc") is b                       # one handle per name


def test_retry_budget(state):
    b = state.breaker("svc")
    for _ in range(30):
        b.try_acquire(D, REQ, 100)
    for _ in range(10):
        b.try_acquire(D, PEND, 100)
    # 25 % of (30 active + 10 pending) = 10 > min_retry_concurrency 3
    assert sum(b.try_acquire_retry(D, 3, 25.0, 3) for _ in range(20)) == 10
    # without a budget: max_retries
    b2 = state.breaker("other")
    assert sum(b2.try_acquire_retry(D, 3, None, 0) for _ in range(5)) == 3
    # budget on an idle cluster: min_retry_concurrency
    b3 = state.breaker("idle")
    assert sum(b3.try_acquire_retry(D, 3, 20.0, 2) for _ in range(5)) == 2


def test_endpoint_counts_streaks_totals(state):
    e = state.endpoint("svc", "10.0.0.1:80")
    e.begin()
    e.begin()
    e.end()
    assert e.active() == 1
    for o in (Outcome.ERROR_5XX, Outcome.GATEWAY, Outcome.GATEWAY):
        e.record(o)
    assert e.streak(Streak.CONSECUTIVE_5XX)[0] == 3
    assert e.streak(Streak.CONSECUTIVE_GATEWAY)[0] == 2    # the plain 5xx reset it
    start = e.streak(Streak.CONSECUTIVE_5XX)[1]
    e.record(Outcome.LOCAL_ORIGIN)
    e.record(Outcome.LOCAL_ORIGIN)
    assert e.streak(Streak.CONSECUTIVE_LOCAL_ORIGIN)[0] == 2
    assert e.streak(Streak.CONSECUTIVE_5XX) == (3, start)  # no response: not a 5xx streak end
    e.record(Outcome.ERROR_5XX)
    assert e.streak(Streak.CONSECUTIVE_LOCAL_ORIGIN)[0] == 0   # a response came
    e.record(Outcome.SUCCESS)
    assert [e.streak(s)[0] for s in Streak] == [0, 0, 0]
    e.record(Outcome.ERROR_5XX)
    assert e.streak(Streak.CONSECUTIVE_5XX)[1] != start    # a new streak
    e.reset_streaks()
    assert e.streak(Streak.CONSECUTIVE_5XX)[0] == 0
    t = e.totals()
    assert (t.total, t.success, t.errors_5xx, t.gateway, t.local_origin) == (8, 1, 5, 2, 2)


def test_health_board(state):
    e = state.endpoint("svc", "10.0.0.1:80")
    assert e.health().healthy and e.health().available(time.monotonic())
    h = e.eject(40.0, 10.0, 300.0)
    assert h is not None and h == e.health()
    assert (h.healthy, h.ejected_until, h.ejections, h.multiplier, h.epoch) == (True, 50.0, 1, 1, 1)
    assert not h.available(49.0) and h.available(50.0)
    assert e.eject(45.0, 10.0, 300.0) is None              # already ejected: nothing written
    h = e.eject(60.0, 10.0, 300.0)                          # again: twice as long
    assert h is not None and (h.ejected_until, h.ejections, h.multiplier) == (80.0, 2, 2)
    e.decay_multiplier()
    e.set_healthy(False)
    e.uneject()
    h = e.health()
    assert (h.healthy, h.ejected_until, h.ejections, h.multiplier, h.epoch) == (False, 0.0, 2, 1, 5)
    assert state.health_epoch() == 5


def test_bucket_envoy_semantics(state):
    bk = state.buckets()
    spec = BucketSpec(max_tokens=3, tokens_per_fill=2, fill_interval_s=1.0)
    t0 = 1000.0
    got = [bk.consume("cfg", (), spec, t0) for _ in range(4)]
    assert [d.allowed for d in got] == [True, True, True, False]
    assert [d.remaining for d in got] == [2, 1, 0, 0]
    assert got[3].reset_s == 1
    assert bk.consume("cfg", (), spec, t0 + 0.99).allowed is False    # whole fills only
    # one fill: +2
    assert [bk.consume("cfg", (), spec, t0 + 1.0).allowed for _ in range(3)] == [True, True, False]
    # many fills: capped at max_tokens
    assert sum(bk.consume("cfg", (), spec, t0 + 100.0).allowed for _ in range(5)) == 3
    # descriptors and scopes are separate buckets
    assert bk.consume("cfg", (("k", "v"),), spec, t0 + 100.0).allowed
    assert bk.consume("cfg2", (), spec, t0 + 100.0).allowed


def test_bucket_table_eviction_prefers_full_buckets(state):
    bk = state.buckets()
    spec = BucketSpec(max_tokens=2, tokens_per_fill=2, fill_interval_s=60.0)
    now = time.monotonic()
    # 16 rows: one pinned bucket drained, then 15 dynamic ones, each used once
    bk.consume("cfg", (), spec, now)
    bk.consume("cfg", (), spec, now)
    for i in range(15):
        bk.consume("cfg", (("ip", str(i)),), spec, now, pinned=False)
    # every dynamic bucket has 1 token left (not full): a new one evicts the least recently
    # used dynamic bucket, never the pinned one
    assert bk.consume("cfg", (("ip", "new"),), spec, now, pinned=False).allowed
    assert bk.lossy_evictions == 1
    assert bk.consume("cfg", (), spec, now).allowed is False       # the pinned one stayed


def test_replay_fresh_replayed_expired_full(state):
    r = state.replay()
    now = 5000.0
    assert r.check_and_add("iss", "a", now + 10, now) is ReplayVerdict.FRESH
    assert r.check_and_add("iss", "a", now + 10, now) is ReplayVerdict.REPLAYED
    assert r.check_and_add("iss2", "a", now + 10, now) is ReplayVerdict.FRESH
    # after its expiry the same jti is a new token (its old use is forgotten on purpose)
    assert r.check_and_add("iss", "a", now + 30, now + 11) is ReplayVerdict.FRESH
    # fill it with live entries: it refuses rather than forget one
    verdicts = [r.check_and_add("iss", f"x{i}", now + 100, now + 12) for i in range(40)]
    assert ReplayVerdict.FULL in verdicts
    fresh = [f"x{i}" for i, v in enumerate(verdicts) if v is ReplayVerdict.FRESH]
    assert len(fresh) >= 12                  # two-choice sets fill up almost to capacity
    for j in fresh:                          # and every recorded jti is still refused
        assert r.check_and_add("iss", j, now + 100, now + 13) is ReplayVerdict.REPLAYED
    # when they expire there is room again
    assert r.check_and_add("iss", "later", now + 300, now + 200) is ReplayVerdict.FRESH


# ---- shared-memory only ---------------------------------------------------------------------

def test_counter_table_full_then_rows_reused_after_every_worker_detaches():
    host = SharedHost.create(SMALL, 2)
    w0, w1 = host.worker(0), host.worker(1)
    for i in range(16):
        w0.breaker(f"c{i}")
    with pytest.raises(TableFull):
        w0.breaker("one-too-many")
    w1.breaker("c3")                         # worker 1 attaches c3 too
    w0.forget("c3")
    with pytest.raises(TableFull):           # worker 1 still holds c3's row
        w0.breaker("one-too-many")
    w1.forget("c3")
    assert w0.breaker("one-too-many").try_acquire(D, REQ, 1)
    host.close()



def test_health_board_has_no_single_writer_and_an_ejection_lands_once():
    """docs/resilience.md: any worker may write the board (writes serialized by one mutex,
    none refused); a host already ejected is not ejected again, whichever worker asks, so two
    workers completing a streak at once eject it once."""
    host = SharedHost.create(SMALL, 2)
    w0, w1 = host.worker(0), host.worker(1)
    e0, e1 = w0.endpoint("svc", "10.0.0.1:80"), w1.endpoint("svc", "10.0.0.1:80")
    e1.set_healthy(False)                      # worker 1 writes: accepted, seen by worker 0
    assert e0.health().healthy is False and w0.health_epoch() == 1
    e0.set_healthy(True)                       # and worker 0 writes after it
    assert e1.health().healthy is True and w1.health_epoch() == 2
    h = e1.eject(40.0, 10.0, 300.0)            # worker 1's outcome completed a streak
    assert h is not None and (h.ejected_until, h.ejections, h.multiplier) == (50.0, 1, 1)
    assert e0.eject(41.0, 10.0, 300.0) is None     # worker 0's streak, same moment: refused
    assert e0.health() == h and w0.health_epoch() == 3
    h = e0.eject(60.0, 10.0, 300.0)            # once the ejection is over, any worker may
    assert h is not None and (h.ejected_until, h.ejections, h.multiplier) == (80.0, 2, 2)
    e0.decay_multiplier()                      # worker 0's interval work
    e1.uneject()
    h = e1.health()
    assert (h.ejected_until, h.ejections, h.multiplier, h.epoch) == (0.0, 2, 1, 6)
    assert w0.health_epoch() == w1.health_epoch() == 6
    host.close()


def test_names_reattach_to_their_counts_across_a_config_update():
    host = SharedHost.create(SMALL, 2)
    w0, w1 = host.worker(0), host.worker(1)
    e = w0.endpoint("svc", "10.0.0.1:80")
    e.record(Outcome.GATEWAY)
    w1.endpoint("svc", "10.0.0.1:80").begin()
    w0.forget("svc")                          # worker 0 applied a config without svc...
    again = w0.endpoint("svc", "10.0.0.1:80")  # ...and one with it back
    assert again is not e
    assert again.active() == 1 and again.totals().gateway == 1
    host.close()


def test_closing_a_handle_with_requests_in_flight_defers_the_detach():
    host = SharedHost.create(SharedStateConfig(counter_rows=16), 1)
    w0 = host.worker(0)
    b = w0.breaker("old")
    b.try_acquire(D, REQ, 5)
    for i in range(15):
        w0.breaker(f"c{i}")
    w0.forget("old")                          # removed from config, a request still runs
    with pytest.raises(TableFull):
        w0.breaker("new")
    b.release(D, REQ)                         # the last request ends: the row is free
    assert w0.breaker("new").snapshot(D).requests == 0     # reused and zeroed
    host.close()


def test_torn_bucket_row_is_sanitised():
    host = SharedHost.create(SMALL, 1)
    bk = host.worker(0).buckets()
    spec = BucketSpec(5, 5, 1.0)
    now = time.monotonic()
    bk.consume("cfg", (), spec, now)
    row = bk._rows[("cfg", ())][0]
    seg = host.segment
    base = seg.layout.buckets // 8 + row * 6
    seg.floats[base] = -3.0                    # as if a writer died mid-update
    seg.floats[base + 1] = now + 1e6           # a stamp from the future
    d = bk.consume("cfg", (), spec, now)
    assert not d.allowed and d.remaining == 0  # clamped to 0, clock restarted from now
    assert bk.consume("cfg", (), spec, now + 1.0).allowed
    host.close()


def test_worker_ids_are_checked():
    host = SharedHost.create(SMALL, 2)
    with pytest.raises(ValueError):
        host.worker(2)
    host.close()
    with pytest.raises(ValueError):
        SharedHost.create(SMALL, 65)


def test_released_scope_becomes_evictable(state):
    bk = state.buckets()
    spec = BucketSpec(max_tokens=1, tokens_per_fill=1, fill_interval_s=60.0)
    now = time.monotonic()
    for i in range(16):                       # every row pinned and drained
        bk.consume(f"cfg{i}", (), spec, now)
    bk.consume("late", (), spec, now)
    assert bk.consume("late", (), spec, now).allowed          # no row: let through, counted
    bk.release("cfg0")
    assert bk.consume("late", (), spec, now).allowed          # cfg0's row: late's first token
    assert not bk.consume("late", (), spec, now).allowed      # now tracked, and exact
