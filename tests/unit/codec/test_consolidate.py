"""Flush consolidation: a connection's output waits while reads keep coming, a bounded number
of loop passes (codec.consolidate)."""

from sidecar.codec.consolidate import MAX_PASSES, READS, Consolidation


def test_the_first_pass_always_waits_then_a_quiet_pass_flushes():
    q = Consolidation()
    q.start()
    assert q.wait_more()            # the work the queuing pass started runs first
    assert not q.wait_more()        # no read since: flush


def test_it_waits_while_reads_come_up_to_the_bound():
    q = Consolidation()
    q.start()
    waits = 0
    for _ in range(3 * MAX_PASSES):
        READS.count += 1            # a read in every pass
        if not q.wait_more():
            break
        waits += 1
    assert waits == MAX_PASSES - 1  # the output is written in pass MAX_PASSES at the latest


def test_start_begins_a_new_wait():
    q = Consolidation()
    q.start()
    READS.count += 1
    assert q.wait_more() and not q.wait_more()
    q.start()
    assert q.wait_more()
