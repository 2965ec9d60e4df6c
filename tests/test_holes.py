"""The hole state machine, without a database: dead, wait, or warn."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.holes import HoleTracker, StaleHole, describe_stale


def test_contiguous_seqs_are_all_ready():
    t = HoleTracker()
    scan = t.scan(0, [1, 2, 3])
    assert (scan.ready, scan.high_water_mark, scan.new_gaps) == (3, 3, [])


def test_new_hole_stops_the_prefix_and_asks_for_holders():
    t = HoleTracker()
    scan = t.scan(0, [1, 2, 4, 7])
    assert scan.ready == 2 and scan.high_water_mark == 2
    assert scan.new_gaps == [(3, 3), (5, 6)]


def test_hole_with_a_live_holder_is_never_passed_however_old():
    t = HoleTracker(stale_after=3.0)
    t.scan(0, [1, 3])
    t.add([(2, 2)], {"3/7": 111}, now=0.0)
    for _ in range(100):
        t.check({"3/7": 111})
        scan = t.scan(1, [3])
        assert scan.high_water_mark == 1 and scan.ready == 0
    assert t.oldest(1000.0) == (1000.0, 111)


def test_hole_is_dead_only_when_absent_after_its_holders_ended():
    t = HoleTracker()
    t.scan(0, [1, 3])
    t.add([(2, 2)], {"3/7": 111}, now=0.0)
    # Holder gone at the check; the next snapshot still lacks 2: dead.
    t.check({})
    scan = t.scan(1, [3])
    assert scan.high_water_mark == 3 and scan.ready == 1 and scan.dead == [(2, 2)]
    assert len(t) == 0


def test_hole_filled_after_commit_is_delivered_not_dropped():
    t = HoleTracker()
    t.scan(0, [1, 3])
    t.add([(2, 2)], {"3/7": 111}, now=0.0)
    t.check({})
    scan = t.scan(1, [2, 3])
    assert scan.ready == 2 and scan.high_water_mark == 3 and scan.dead == []


def test_hole_without_any_holder_is_cleared_at_once():
    t = HoleTracker()
    scan = t.scan(0, [1, 3])
    t.add(scan.new_gaps, {}, now=0.0)
    assert not t.waiting()
    assert t.scan(1, [3]).high_water_mark == 3


def test_prepared_transaction_holds_every_hole():
    # PREPARE gives the transaction a new vxid: the one we saw vanishes, yet it may commit.
    t = HoleTracker()
    t.scan(0, [1, 3])
    t.add([(2, 2)], {"3/7": 111}, now=0.0)
    t.check({"-1/900": None})
    assert t.waiting()
    assert t.scan(1, [3]).high_water_mark == 1


def test_later_holes_are_resolved_in_parallel_behind_the_first():
    t = HoleTracker()
    scan = t.scan(0, [1, 3, 5])
    t.add(scan.new_gaps, {"3/7": 1, "4/9": 2}, now=0.0)
    t.check({"3/7": 1})  # 4/9 ended, 3/7 still runs: both holes share H, so both still wait
    assert t.scan(1, [3, 5]).high_water_mark == 1
    t.check({})
    scan = t.scan(1, [2, 3, 5])  # 2 committed, 4 rolled back
    assert scan.high_water_mark == 5 and scan.dead == [(4, 4)]


def test_hole_partly_filled_keeps_waiting_on_the_rest():
    t = HoleTracker()
    scan = t.scan(0, [1, 6])
    t.add(scan.new_gaps, {"3/7": 1}, now=0.0)
    t.check({"3/7": 1})
    scan = t.scan(1, [2, 4, 6])
    assert scan.ready == 1 and scan.high_water_mark == 2
    assert [(h.first, h.last) for h in t.holes] == [(3, 3), (5, 5)]
    assert scan.new_gaps == []


def test_blocked_seq_stops_the_watermark_walk():
    t = HoleTracker()
    scan = t.scan(0, [1, 2, 3, 5], complete_to=5, blocked=3)
    assert scan.high_water_mark == 2
    assert scan.new_gaps == [(4, 4)]


def test_stale_hole_warns_with_holder_pid_and_repeats_at_most_every_few_seconds():
    t = HoleTracker(stale_after=3.0, warn_every=5.0)
    t.scan(0, [1, 3])
    t.add([(2, 2)], {"3/7": 4242}, now=0.0)
    assert t.stale(2.0) == []
    first = t.stale(3.5)
    assert first == [StaleHole(2, 2, 3.5, (4242,))]
    assert t.stale(4.0) == []
    assert len(t.stale(9.0)) == 1
    line = describe_stale(first[0], {4242: 12.5})
    assert "seq 2" in line and "pid 4242" in line and "12.5 s" in line


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["commit", "rollback", "hold"]), min_size=1, max_size=30),
    st.randoms(use_true_random=False),
)
def test_tracker_never_passes_a_seq_that_later_commits(fates, rnd):
    """Model: seqs 1..n with a fate; held ones commit at the very end. However cycles and
    commits interleave, the mark never passes a seq that is (or will be) committed before it
    was seen, and finally reaches n with every committed seq delivered once, in order."""
    n = len(fates)
    committed: set[int] = set()
    running = {s for s in range(1, n + 1)}
    t = HoleTracker()
    hwm, delivered = 0, []
    for step in range(4 * n + 10):
        # Some transactions end.
        for s in sorted(running):
            if rnd.random() < 0.3 and (fates[s - 1] != "hold" or step > 3 * n):
                running.discard(s)
                if fates[s - 1] != "rollback":
                    committed.add(s)
        live = {f"v/{s}": s for s in running}
        if t.waiting():
            t.check({v: p for v, p in live.items() if v in t.watched()})
        seqs = sorted(s for s in committed if s > hwm)
        scan = t.scan(hwm, seqs)
        delivered += seqs[:scan.ready]
        hwm = scan.high_water_mark
        # Everything below the mark is committed-and-delivered or can never commit.
        assert all(s in committed or (s not in running and fates[s - 1] == "rollback")
                   for s in range(1, hwm + 1))
        if scan.new_gaps:
            t.add(scan.new_gaps, live, now=float(step))
    for s in sorted(running):
        if fates[s - 1] != "rollback":
            committed.add(s)
    running.clear()
    for _ in range(3):
        if t.waiting():
            t.check({})
        seqs = sorted(s for s in committed if s > hwm)
        scan = t.scan(hwm, seqs)
        delivered += seqs[:scan.ready]
        hwm = scan.high_water_mark
        if scan.new_gaps:
            t.add(scan.new_gaps, {}, now=0.0)
    assert delivered == sorted(committed)


def test_watermark_moves_over_contiguous_seqs_and_keeps_only_what_lies_beyond_a_gap():
    from cdc.checkpoint import Position
    from cdc.holes import SeqWatermark

    w = SeqWatermark(position=Position(None, 10, frozenset({13})))
    w.mark_handled([11])
    assert (w.seq, w.handled) == (11, {13})
    w.mark_handled([15, 9, 10, 16])  # at or below the mark: ignored
    assert (w.seq, w.handled) == (11, {13, 15, 16})
    w.mark_handled([12])  # fills the gap: the mark runs over 13
    assert (w.seq, w.handled) == (13, {15, 16})
    w.mark_handled([14, 17, 19])
    assert (w.seq, w.handled) == (17, {19})
