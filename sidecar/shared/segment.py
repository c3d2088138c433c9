"""The shared-memory segment of one sidecar: made by the supervisor before it forks the
workers, inherited by every worker (and by a restarted one), never resized.

Mechanism, and why:

* Memory: one ``memfd`` (an anonymous tmpfs file) mapped ``MAP_SHARED``. No name in /dev/shm
  to clean up, no file a crash leaves behind; a forked worker inherits the descriptor and the
  mapping.
* Counters that only need a sum (breaker gauges, in-flight requests, outcome counts) are
  *single-writer*: each worker owns one slab of the table (worker-major layout, so no two
  workers ever write the same cache line) and readers add the slabs up. No lock, no atomic
  instruction: an aligned 8-byte store is indivisible on every 64-bit CPU Python runs on.
* Read-modify-write that must be exact across workers (a token bucket, a jti insert-if-absent,
  naming a row) happens under a robust process-shared mutex in the segment (``mutex.py``), one
  per bucket row, per table, per directory. When a worker dies holding one, the kernel releases
  it and the next locker repairs what it may have left half-done (``_owner_died``), so a
  worker killed inside a critical section cannot wedge the others. Critical sections never
  await, so a lock is held for a few microseconds.
* A worker that dies leaves gauges counted and names attached: ``reclaim(worker)``, called by
  the supervisor before it forks the replacement, zeroes its gauges and detaches its names.

Layout (byte offsets, all 64-aligned): header | mutexes | breaker directory | endpoint
directory | bucket directory | breaker counters | endpoint counters | health board | bucket
states | replay sets. See ``Layout``.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass

from sidecar.config.stores import MAX_WORKERS, SharedStateConfig
from sidecar.shared.api import BucketSpec, refill
from sidecar.shared.mutex import RobustMutexes

MAGIC = b"PYSCSHM1"
HEADER = 4096
# header words (int64 slots after the 8-byte magic)
H_WORKERS, H_EPOCH = 1, 3

BREAKER_WORDS = 8                # [priority][resource]
ENDPOINT_WORDS = 9               # see counters.py
BOARD_WORDS = 6                  # seq, healthy, ejected_until (f64), ejections, multiplier, epoch
BUCKET_FIELDS = 6                # tokens, last, interval, max_tokens, tokens_per_fill, touched
REPLAY_WAYS = 8

# mutex indexes (mutex.py): the tables', then one per bucket row
LOCK_BREAKER_DIR = 0
LOCK_ENDPOINT_DIR = 1
LOCK_BUCKET_DIR = 2
LOCK_WRITER = 3                  # the health board (serializes its writers)
LOCK_REPLAY = 4
LOCK_BUCKET_BASE = 5


_MASK64 = (1 << 64) - 1
_DIGEST = struct.Struct("<QQ")


def _align(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True, slots=True)
class Directory:
    """Where one name directory lives: ``rows`` digests (16 bytes), attach masks (int64, one
    bit per worker), then one int64: how many rows were ever used."""
    offset: int
    rows: int
    lock: int

    @property
    def digests(self) -> int:
        return self.offset

    @property
    def masks(self) -> int:
        return self.offset + self.rows * 16

    @property
    def used(self) -> int:
        return self.masks + self.rows * 8

    @property
    def size(self) -> int:
        return _align(self.rows * 24 + 8)


@dataclass(frozen=True, slots=True)
class Layout:
    workers: int
    counter_rows: int
    bucket_rows: int
    replay_sets: int
    locks: int               # offset of the mutexes (LOCK_BUCKET_BASE + bucket_rows of them)
    breaker_dir: Directory
    endpoint_dir: Directory
    bucket_dir: Directory
    breakers: int            # offset of worker-major int64 [worker][row][BREAKER_WORDS]
    endpoints: int           # offset of worker-major int64 [worker][row][ENDPOINT_WORDS]
    board: int               # offset of [row][BOARD_WORDS]
    buckets: int             # offset of f64 [row][BUCKET_FIELDS]
    replay_digests: int      # offset of [set][way] 16-byte digests
    replay_expiry: int       # offset of f64 [set][way]
    size: int

    @staticmethod
    def of(cfg: SharedStateConfig, workers: int) -> "Layout":
        rows, brows = cfg.counter_rows, cfg.bucket_rows
        # 2-choice placement into 8-way sets: 25 % headroom keeps a full set (a refusal) out
        # of reach until the table is ~all live entries (see replay.py)
        sets = max(2, -(-cfg.replay_entries * 5 // 4) // REPLAY_WAYS)
        locks = HEADER
        at = locks + _align(RobustMutexes.size(LOCK_BUCKET_BASE + brows))
        dirs = []
        for n, lock in ((rows, LOCK_BREAKER_DIR), (rows, LOCK_ENDPOINT_DIR),
                        (brows, LOCK_BUCKET_DIR)):
            d = Directory(at, n, lock)
            dirs.append(d)
            at += d.size
        breakers = at
        at += _align(workers * rows * BREAKER_WORDS * 8)
        endpoints = at
        at += _align(workers * rows * ENDPOINT_WORDS * 8)
        board = at
        at += _align(rows * BOARD_WORDS * 8)
        buckets = at
        at += _align(brows * BUCKET_FIELDS * 8)
        rdig = at
        at += _align(sets * REPLAY_WAYS * 16)
        rexp = at
        at += _align(sets * REPLAY_WAYS * 8)
        return Layout(workers, rows, brows, sets, locks, dirs[0], dirs[1], dirs[2], breakers,
                      endpoints, board, buckets, rdig, rexp, _align(at, mmap.PAGESIZE))


class SharedSegment:
    """The mapping plus its locks. Create it in the supervisor (``create``) before forking;
    every process then uses the same object (``worker_view`` in a worker)."""

    def __init__(self, fd: int, layout: Layout, mm: mmap.mmap) -> None:
        self.fd = fd
        self.layout = layout
        self.mm = mm
        self.words = memoryview(mm).cast("q")        # int64 view of the whole segment
        self.floats = memoryview(mm).cast("d")       # float64 view of the whole segment
        self.lossy_evictions = 0      # this process's bucket evictions that forgot a debt
        self.mutexes = RobustMutexes(mm, layout.locks, LOCK_BUCKET_BASE + layout.bucket_rows,
                                     self._owner_died)
        self.lock = self.mutexes.lock                # lock(index), unlock(index)
        self.unlock = self.mutexes.unlock

    @classmethod
    def create(cls, cfg: SharedStateConfig, workers: int) -> "SharedSegment":
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1..{MAX_WORKERS}")
        layout = Layout.of(cfg, workers)
        fd = os.memfd_create("pysidecar-shared", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, layout.size)         # tmpfs: zero-filled, pages allocated on use
            mm = mmap.mmap(fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        mm[0:8] = MAGIC
        struct.pack_into("<q", mm, H_WORKERS * 8, workers)
        seg = cls(fd, layout, mm)
        seg.mutexes.initialise()
        return seg

    # ---- locks ---------------------------------------------------------------------------
    def _owner_died(self, lock: int) -> None:
        """A worker died holding ``lock`` (now ours): repair what it may have left half-done.
        Only a board write needs it (an odd sequence would make readers spin: seal it). A
        directory's worst case is a row counted as used whose name was not written yet (a
        row the table does without); a bucket row may be torn, which ``refill`` clamps (at
        most one fill interval of accuracy); a replay slot is written digest first, expiry
        second, so a cut-short write looks expired (see replay.py)."""
        if lock == LOCK_WRITER:
            self._seal_board()

    def _seal_board(self) -> None:
        """Under LOCK_WRITER: close any publication a dead writer left open (odd sequence)."""
        words, lay = self.words, self.layout
        b = lay.board // 8
        for row in range(lay.counter_rows):
            if words[b + row * BOARD_WORDS] & 1:
                words[b + row * BOARD_WORDS] += 1
                words[H_EPOCH] += 1

    # ---- hashing -------------------------------------------------------------------------
    def digest(self, *parts: str) -> bytes:
        """16 bytes naming a row or a jti: two 64-bit hashes of the parts with the
        interpreter's keyed SipHash. Its key is random per supervisor and inherited by every
        forked worker (and by a restarted one), so every worker computes the same digest and
        nobody outside can aim many names at one set. Cheaper than BLAKE2b by 1 us a call;
        2^-64 odds that a new jti meets one live digest (a needless refusal, never a
        forgotten jti)."""
        return _DIGEST.pack(hash(parts) & _MASK64, hash((parts, 1)) & _MASK64 | 1)

    # ---- directories ---------------------------------------------------------------------
    def attach(self, d: Directory, digest: bytes, worker: int, pin: bool = True) -> int:
        """Row named ``digest`` in directory ``d``, made if needed (its counters zeroed);
        with ``pin`` the worker's bit is set so the row is not reused while attached.
        Returns -1 when every row is attached (the table is too small for the config)."""
        self.lock(d.lock)
        try:
            row, fresh = self._find_or_take(d, digest)
            if row < 0:
                return -1
            if fresh:
                self._name_row(d, row, digest)
            if pin:
                self.words[d.masks // 8 + row] |= 1 << worker
            return row
        finally:
            self.unlock(d.lock)

    def detach(self, d: Directory, row: int, worker: int) -> None:
        self.lock(d.lock)
        try:
            self.words[d.masks // 8 + row] &= ~(1 << worker)
        finally:
            self.unlock(d.lock)

    def row_digest(self, d: Directory, row: int) -> bytes:
        a = d.digests + row * 16
        return self.mm[a:a + 16]

    def _find_or_take(self, d: Directory, digest: bytes) -> tuple[int, bool]:
        mm, words = self.mm, self.words
        used = words[d.used // 8]
        start, end = d.digests, d.digests + used * 16
        at = mm.find(digest, start, end)
        while at >= 0:
            if (at - start) % 16 == 0:
                return (at - start) // 16, False
            at = mm.find(digest, at + 1, end)
        if used < d.rows:
            words[d.used // 8] = used + 1
            return used, True
        row = self._reusable(d)
        return row, row >= 0

    def _reusable(self, d: Directory) -> int:
        """A row no worker has attached: the least recently touched one for buckets, the
        first one for counter tables."""
        masks = self.words[d.masks // 8:d.masks // 8 + d.rows].tolist()
        free = [i for i, m in enumerate(masks) if m == 0]
        if not free:
            return -1
        if d.lock != LOCK_BUCKET_DIR:
            return free[0]
        return self._bucket_victim(free)

    def _bucket_victim(self, free: list[int]) -> int:
        """Prefer a bucket back to max_tokens (a fresh one is identical: nothing is lost),
        else the least recently used. Read without the row locks: only a choice."""
        lay, fl = self.layout, self.floats
        base = lay.buckets // 8
        best, best_touch = free[0], float("inf")
        now = time.monotonic()
        for row in free:
            tokens, last, interval, mx, per, touched = fl[base + row * BUCKET_FIELDS:
                                                          base + row * BUCKET_FIELDS + 6].tolist()
            if interval > 0 and refill(tokens, last, BucketSpec(int(mx), int(per), interval),
                                       now)[0] >= mx:
                return row
            if touched < best_touch:
                best, best_touch = row, touched
        self.lossy_evictions += 1
        return best

    def _name_row(self, d: Directory, row: int, digest: bytes) -> None:
        """Give ``row`` its new name and zero what the previous name left in it."""
        lay, words, mm = self.layout, self.words, self.mm
        at = d.digests + row * 16
        if d == lay.bucket_dir:
            # under the row lock: a worker may be inside this row for the old bucket
            lock = LOCK_BUCKET_BASE + row
            self.lock(lock)
            try:
                mm[at:at + 16] = digest
                b = lay.buckets // 8 + row * BUCKET_FIELDS
                self.floats[b:b + BUCKET_FIELDS] = _fzeros(BUCKET_FIELDS)
            finally:
                self.unlock(lock)
            return
        mm[at:at + 16] = digest
        if d == lay.breaker_dir:
            for w in range(lay.workers):
                a = lay.breakers // 8 + (w * lay.counter_rows + row) * BREAKER_WORDS
                words[a:a + BREAKER_WORDS] = _zeros(BREAKER_WORDS)
        else:
            for w in range(lay.workers):
                a = lay.endpoints // 8 + (w * lay.counter_rows + row) * ENDPOINT_WORDS
                words[a:a + ENDPOINT_WORDS] = _zeros(ENDPOINT_WORDS)
            self._reset_board_row(row)

    def _reset_board_row(self, row: int) -> None:
        a = self.layout.board // 8 + row * BOARD_WORDS
        self.words[a:a + BOARD_WORDS] = _zeros(BOARD_WORDS)
        self.words[a + 1] = 1                         # healthy until a prober says otherwise

    # ---- crash recovery ------------------------------------------------------------------
    def reclaim(self, worker: int) -> None:
        """Give back everything a dead worker held. The supervisor calls it after reaping
        the worker and before forking its replacement (nothing writes the slab meanwhile)."""
        lay, words = self.layout, self.words
        n = lay.counter_rows
        a = lay.breakers // 8 + worker * n * BREAKER_WORDS
        words[a:a + n * BREAKER_WORDS] = _zeros(n * BREAKER_WORDS)      # all gauges
        base = lay.endpoints // 8 + worker * n * ENDPOINT_WORDS
        for row in range(n):
            words[base + row * ENDPOINT_WORDS] = 0        # in-flight; outcome counts stay
        bit = ~(1 << worker)
        for d in (lay.breaker_dir, lay.endpoint_dir, lay.bucket_dir):
            self.lock(d.lock)
            try:
                m = d.masks // 8
                for row in range(d.rows):
                    if words[m + row]:
                        words[m + row] &= bit
            finally:
                self.unlock(d.lock)
        self.lock(LOCK_WRITER)
        try:
            self._seal_board()                    # a board write cut short by the death
        finally:
            self.unlock(LOCK_WRITER)

    def close(self) -> None:
        self.words.release()
        self.floats.release()
        self.mm.close()
        os.close(self.fd)


_ZEROS: dict[int, "memoryview[int]"] = {}


def _fzeros(n: int) -> "memoryview[float]":
    return memoryview(bytes(n * 8)).cast("d")


def _zeros(n: int) -> "memoryview[int]":
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = memoryview(bytes(n * 8)).cast("q")
    return z
