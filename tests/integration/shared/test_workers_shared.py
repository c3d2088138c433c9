"""Shared state across real forked worker processes: the segment is made before the fork,
as the supervisor does, and every child takes its own ``WorkerShared``."""

import asyncio
import json
import os
import random
import signal
import time

import aiohttp
from aiohttp import web

from sidecar.config.stores import SharedStateConfig
from sidecar.shared.api import BucketSpec, Outcome, Priority, ReplayVerdict, Resource, Streak
from sidecar.shared.host import SharedHost
from sidecar.shared.segment import LOCK_BUCKET_BASE, LOCK_WRITER
from sidecar.shared.testing import free_port

D, REQ = Priority.DEFAULT, Resource.REQUESTS


class Forked:
    """A child process running ``fn(state) -> json-able``; it starts when ``go()`` is called
    (so siblings really race) and sends its result back through a pipe."""

    def __init__(self, host: SharedHost, worker: int, fn):
        self.go_r, self.go_w = os.pipe()
        self.res_r, self.res_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:                             # the worker
            code = 1
            try:
                os.close(self.go_w)
                os.close(self.res_r)
                state = host.worker(worker)
                os.read(self.go_r, 1)
                out = json.dumps(fn(state)).encode()
                with os.fdopen(self.res_w, "wb") as f:
                    f.write(out)
                code = 0
            except BaseException as e:                # noqa: BLE001 - report, then leave
                try:
                    os.write(self.res_w, json.dumps({"error": repr(e)}).encode())
                except OSError:
                    pass
            finally:
                os._exit(code)
        os.close(self.go_r)
        os.close(self.res_w)

    def go(self) -> None:
        os.write(self.go_w, b"g")
        os.close(self.go_w)

    def result(self, timeout: float = 60.0):
        chunks = []
        while True:
            b = os.read(self.res_r, 65536)
            if not b:
                break
            chunks.append(b)
        os.close(self.res_r)
        _, status = os.waitpid(self.pid, 0)
        out = json.loads(b"".join(chunks) or b"null")
        assert os.waitstatus_to_exitcode(status) == 0, out
        return out

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def run_workers(host: SharedHost, fns) -> list:
    kids = [Forked(host, i, fn) for i, fn in enumerate(fns)]
    for k in kids:
        k.go()
    return [k.result() for k in kids]


def new_host(workers=2, **kw) -> SharedHost:
    return SharedHost.create(SharedStateConfig(**kw), workers)


# ---- breakers ------------------------------------------------------------------------------

def test_breaker_limit_is_the_sidecars_not_the_workers():
    host = new_host()
    main = host.worker(0)

    def holder(state):                                 # worker 1 takes both units
        b = state.breaker("svc")
        return [b.try_acquire(D, REQ, 2), b.try_acquire(D, REQ, 2)]

    assert run_workers(host, [lambda s: None, holder])[1] == [True, True]
    b = main.breaker("svc")
    # worker 1's units still count (it did not release them): nothing left here
    assert b.try_acquire(D, REQ, 2) is False
    assert b.snapshot(D).requests == 2
    host.reclaim(1)                                     # it is gone: its share comes back
    assert b.try_acquire(D, REQ, 2) is True
    host.close()


def _upstream_process(port: int, hold_s: float) -> Forked:
    """A real HTTP upstream in its own process that records its peak concurrency."""
    def serve(_state):
        peak = [0, 0]

        async def handle(request):
            peak[0] += 1
            peak[1] = max(peak[1], peak[0])
            await asyncio.sleep(hold_s)
            peak[0] -= 1
            return web.Response(text="ok")

        async def stats(request):
            return web.json_response({"peak": peak[1]})

        async def main():
            app = web.Application()
            app.router.add_get("/work", handle)
            app.router.add_get("/stats", stats)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            await asyncio.sleep(3600)
        asyncio.run(main())
    return serve


def test_max_requests_2_holds_across_2_workers_at_a_real_upstream():
    """Each worker runs 8 clients of 5 requests at a slow upstream through the shared
    breaker (max_requests: 2). The upstream, in its own process, counts its peak concurrency.
    Per-worker breakers would let it reach 4."""
    host = new_host(workers=3)      # slot 2: the upstream (it never touches the breaker)
    port = free_port()
    up = Forked(host, 2, _upstream_process(port, 0.02))
    up.go()

    def worker(state):
        b = state.breaker("svc")
        rng = random.Random(os.getpid())

        async def client(session):
            """Up to 5 requests, each tried until the breaker admits it (bounded)."""
            admitted = refused = 0
            while admitted < 5 and refused < 5000:
                if not b.try_acquire(D, REQ, 2):
                    refused += 1
                    await asyncio.sleep(rng.random() * 0.004)
                    continue
                try:
                    async with session.get(f"http://127.0.0.1:{port}/work") as r:
                        await r.read()
                finally:
                    b.release(D, REQ)
                admitted += 1
            return admitted, refused

        async def main():
            async with aiohttp.ClientSession() as s:
                for _ in range(100):                    # wait for the upstream
                    try:
                        async with s.get(f"http://127.0.0.1:{port}/stats"):
                            break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.05)
                res = await asyncio.gather(*(client(s) for _ in range(8)))
                return [sum(a for a, _ in res), sum(r for _, r in res)]
        return asyncio.run(main())

    admitted = run_workers(host, [worker, worker])

    async def peak():
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/stats") as r:
                return (await r.json())["peak"]
    observed = asyncio.run(peak())
    up.kill()
    print(f"[admitted, refused] per worker {admitted}, upstream peak concurrency {observed}")
    assert [a for a, _ in admitted] == [40, 40]         # both workers got all theirs through
    assert all(r > 0 for _, r in admitted)              # ...and both were held back at times
    # the guaranteed bound is max + (workers - 1): see counters.py
    assert 1 <= observed <= 2 + 1
    assert host.worker(0).breaker("svc").snapshot(D).requests == 0     # all released
    host.close()


def test_retry_budget_reads_the_sidecar_wide_active_requests():
    host = new_host()

    def busy(state):
        b = state.breaker("svc")
        return sum(b.try_acquire(D, REQ, 1000) for _ in range(50))

    assert run_workers(host, [lambda s: None, busy])[1] == 50
    b = host.worker(0).breaker("svc")
    # budget 20 % of 50 active requests (worker 1's) = 10 retries, not max(3, 0) = 3
    got = sum(b.try_acquire_retry(D, 3, 20.0, 3) for _ in range(20))
    assert got == 10
    host.close()


# ---- endpoints -----------------------------------------------------------------------------

def test_active_requests_and_streaks_seen_by_every_worker():
    host = new_host()

    def busy(state):
        e = state.endpoint("svc", "10.0.0.1:80")
        for _ in range(5):
            e.begin()
        e.record(Outcome.GATEWAY)
        e.record(Outcome.GATEWAY)
        return e.active()

    assert run_workers(host, [lambda s: None, busy])[1] == 5
    e = host.worker(0).endpoint("svc", "10.0.0.1:80")
    other = host.worker(0).endpoint("svc", "10.0.0.2:80")
    assert (e.active(), other.active()) == (5, 0)       # least-request sees the busy host
    e.record(Outcome.GATEWAY)
    assert e.streak(Streak.CONSECUTIVE_GATEWAY)[0] == 3    # 2 over there + 1 here
    e.record(Outcome.SUCCESS)
    assert e.streak(Streak.CONSECUTIVE_GATEWAY)[0] == 0
    assert e.totals().total == 4
    host.reclaim(1)
    assert e.active() == 0                              # the dead worker's in-flight: gone
    assert e.totals().gateway == 3                      # history stays
    host.close()


# ---- token bucket --------------------------------------------------------------------------

def test_rate_limit_holds_across_workers():
    """10 tokens, refilled once a minute: whatever the interleaving, exactly 10 of the 2 x 300
    attempts are allowed (per-worker buckets would allow 20)."""
    host = new_host()
    spec = BucketSpec(max_tokens=10, tokens_per_fill=10, fill_interval_s=60.0)

    def hammer(state):
        bk = state.buckets()
        return sum(bk.consume("rl-config", (), spec, time.monotonic()).allowed
                   for _ in range(300))

    counts = run_workers(host, [hammer, hammer])
    assert sum(counts) == 10, counts
    host.close()


def test_rate_limit_per_descriptor_and_refill():
    host = new_host()
    spec = BucketSpec(max_tokens=3, tokens_per_fill=3, fill_interval_s=0.2)
    desc_a = (("remote_address", "10.0.0.1"),)
    desc_b = (("remote_address", "10.0.0.2"),)

    def use(state):
        bk = state.buckets()
        now = time.monotonic()
        return [bk.consume("cfg", desc_a, spec, now, pinned=False).allowed for _ in range(2)]

    assert run_workers(host, [use, lambda s: None])[0] == [True, True]
    bk = host.worker(1).buckets()
    now = time.monotonic()
    assert bk.consume("cfg", desc_a, spec, now, pinned=False).allowed       # the 3rd
    d = bk.consume("cfg", desc_a, spec, now, pinned=False)
    assert not d.allowed and d.remaining == 0 and d.reset_s == 1
    assert bk.consume("cfg", desc_b, spec, now, pinned=False).allowed       # its own bucket
    later = now + 0.25                                   # one fill later (clock passed in)
    assert bk.consume("cfg", desc_a, spec, later, pinned=False).allowed
    host.close()


# ---- replay --------------------------------------------------------------------------------

def test_replayed_jti_refused_on_the_other_worker():
    host = new_host()
    exp = time.time() + 300

    def first(state):
        return [state.replay().check_and_add("iss", f"j{i}", exp, time.time()).value
                for i in range(100)]

    assert set(run_workers(host, [first, lambda s: None])[0]) == {"fresh"}
    again = host.worker(1).replay()
    assert {again.check_and_add("iss", f"j{i}", exp, time.time()) for i in range(100)} == \
        {ReplayVerdict.REPLAYED}
    host.close()


def test_same_jti_raced_by_two_workers_is_fresh_exactly_once():
    host = new_host()
    exp = time.time() + 300

    def race(state):
        r = state.replay()
        return [r.check_and_add("iss", f"t{i}", exp, time.time()).value for i in range(2000)]

    a, b = run_workers(host, [race, race])
    for i in range(2000):
        assert sorted((a[i], b[i])) == ["fresh", "replayed"], i
    host.close()


# ---- crash safety --------------------------------------------------------------------------

def test_killed_worker_slots_reclaimed_and_locks_released():
    host = new_host()
    seg = host.segment
    ready_r, ready_w = os.pipe()

    def hold_everything(state):
        b = state.breaker("svc")
        b.try_acquire(D, REQ, 10)
        b.try_acquire(D, Resource.CONNECTIONS, 10)
        state.endpoint("svc", "10.0.0.1:80").begin()
        state.endpoint("svc", "10.0.0.1:80").set_healthy(False)
        seg.lock(LOCK_BUCKET_BASE + 7)                 # dies holding a bucket row's mutex
        os.write(ready_w, b"r")
        time.sleep(3600)

    child = Forked(host, 1, hold_everything)
    child.go()
    assert os.read(ready_r, 1) == b"r"
    child.kill()                                       # SIGKILL, as the OOM killer would

    w0 = host.worker(0)
    b = w0.breaker("svc")
    e = w0.endpoint("svc", "10.0.0.1:80")
    assert b.snapshot(D).requests == 1 and e.active() == 1      # leaked until reclaimed
    seg.lock(LOCK_BUCKET_BASE + 7)                     # the kernel released it (EOWNERDEAD)
    seg.unlock(LOCK_BUCKET_BASE + 7)
    assert seg.mutexes.owner_died == 1
    seg.lock(LOCK_BUCKET_BASE + 7)                     # consistent again: an ordinary lock
    seg.unlock(LOCK_BUCKET_BASE + 7)
    assert seg.mutexes.owner_died == 1
    host.reclaim(1)                                    # what the supervisor does on restart
    snap = b.snapshot(D)
    assert (snap.requests, snap.connections, e.active()) == (0, 0, 0)
    assert e.health().healthy is False                 # its last publication stays...

    def new_writer(state):                             # ...and its replacement writes again
        state.endpoint("svc", "10.0.0.1:80").set_healthy(True)
        return True

    assert run_workers(host, [lambda s: None, new_writer])[1] is True
    assert e.health().healthy is True
    host.close()


def test_board_writer_killed_mid_publication_is_sealed_by_the_next_writer():
    """A writer dies inside a board publication, holding the writers' mutex: the next writer
    gets the mutex (EOWNERDEAD), seals the open publication and writes; readers never spin on
    an odd sequence. No reclaim needed first."""
    host = new_host()
    seg = host.segment
    ready_r, ready_w = os.pipe()
    w0 = host.worker(0)
    e = w0.endpoint("svc", "10.0.0.1:80")
    board = e._board // 8

    def die_mid_write(state):
        state.endpoint("svc", "10.0.0.1:80")
        seg.lock(LOCK_WRITER)
        seg.words[board] += 1                          # odd: a publication begun...
        os.write(ready_w, b"r")
        time.sleep(3600)                               # ...and never finished

    child = Forked(host, 1, die_mid_write)
    child.go()
    assert os.read(ready_r, 1) == b"r"
    child.kill()
    assert seg.words[board] & 1                        # left open by the dead writer
    e.set_healthy(False)                               # the next writer: repairs, then writes
    assert seg.mutexes.owner_died == 1
    assert seg.words[board] % 2 == 0
    assert e.health().healthy is False
    host.close()


# ---- health board --------------------------------------------------------------------------

def test_health_board_writers_serialized_readers_never_torn():
    host = new_host(workers=3)

    def writer(state):
        e = state.endpoint("svc", "10.0.0.1:80")
        for i in range(50):
            e.set_healthy(i % 2 == 0)
            e.eject(1000.0 * (i + 1), 1.0, 1.0)     # ends at 1000(i+1)+1: never overlaps
        return state.health_epoch()

    def reader(state):
        e = state.endpoint("svc", "10.0.0.1:80")
        torn = 0
        for _ in range(5000):       # a torn read would mix fields of two publications
            h = e.health()
            if h.ejections and h.ejected_until != 1000.0 * h.ejections + 1.0:
                torn += 1
        return torn == 0

    def second_writer(state):
        e = state.endpoint("svc", "10.0.0.2:80")
        for _ in range(50):
            e.eject(5.0, 1.0, 1.0)
            e.uneject()
        return True

    epoch, consistent, wrote = run_workers(host, [writer, reader, second_writer])
    assert consistent is True and wrote is True
    r = host.worker(1)
    assert r.health_epoch() == 199      # 49 verdict changes + 50 ejections, 100 over there: none lost
    h = r.endpoint("svc", "10.0.0.1:80").health()
    assert (h.ejections, h.ejected_until) == (50, 50001.0)
    h2 = r.endpoint("svc", "10.0.0.2:80").health()
    assert (h2.ejections, h2.ejected_until) == (50, 0.0)
    host.close()
