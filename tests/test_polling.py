"""The poll path against a real cluster: nothing that commits is skipped, nothing twice, seq order."""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from cdc.checkpoint import Position
from cdc.errors import ConfigError
from cdc.events import Transaction
from cdc.holes import SeqWatermark, sequence_oid
from cdc.polling import Poller, read_snapshot, replay
from cdc.replication import ReplicationStream
from cdc.sinks import CallbackSink, NullSink
from cdc.store import EventTable

from .support import PLUGIN

INSERT = """
INSERT INTO cdc.events (stream_id, version, type, data)
SELECT %s, v, 'Happened', jsonb_build_object('v', v) FROM generate_series(1, %s) v
RETURNING seq
"""


def insert(conn: psycopg.Connection, n: int = 1) -> list[int]:
    return sorted(r[0] for r in conn.execute(INSERT, (uuid.uuid4().hex, n)).fetchall())


def committed_seqs(conn: psycopg.Connection) -> list[int]:
    return [r[0] for r in conn.execute("SELECT seq FROM cdc.events ORDER BY seq").fetchall()]


@pytest.fixture
def pool(dsn: str) -> Iterator[ConnectionPool]:
    with ConnectionPool(dsn, min_size=1, max_size=4, kwargs={"autocommit": True}, open=True) as p:
        yield p


class Collector:
    """Runs a poller in a thread, recording each delivered event with the time it arrived."""

    def __init__(self, poller: Poller):
        self.poller = poller
        self.txs: list[Transaction] = []
        self.arrived: dict[int, float] = {}
        self.seqs: list[int] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                for tx in self.poller.poll(0.2):
                    self.txs.append(tx)
                    now = time.monotonic()
                    for e in tx.events:
                        self.seqs.append(e.seq)
                        self.arrived[e.seq] = now
        except BaseException as err:  # surfaced by close()
            self.error = err

    def wait_for(self, seq: int, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while seq not in self.arrived:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"seq {seq} not delivered; got {self.seqs[-5:]}"
            time.sleep(0.005)
        return self.arrived[seq]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.poller.close()
        assert self.error is None, self.error


def test_held_sequence_is_not_skipped_by_poller(dsn, conn, pool, caplog):
    caplog.set_level(logging.WARNING, logger="cdc.poll")
    c = Collector(Poller(pool=pool, interval=0.05, stale_after=3.0))
    try:
        first = insert(conn, 3)
        c.wait_for(first[-1])

        # A transaction that rolls back: its hole is passed within one interval of the rollback.
        rolled = psycopg.connect(dsn)
        [dead] = insert(rolled)
        after_dead = insert(conn, 2)
        time.sleep(0.5)
        assert after_dead[0] not in c.arrived
        rolled.rollback()
        rolled_back_at = time.monotonic()
        passed_in = c.wait_for(after_dead[0]) - rolled_back_at
        assert passed_in < 1.0, passed_in

        # A transaction holding its seq for 10 s, past the 3 s stale threshold, while later ones
        # commit and another rolls back behind it.
        holder = psycopg.connect(dsn)
        holder_pid = holder.info.backend_pid
        [held] = insert(holder)
        later = insert(conn, 5)
        behind = psycopg.connect(dsn)
        [dead_behind] = insert(behind)
        behind.rollback()
        behind.close()
        last = insert(conn, 2)
        time.sleep(10)
        assert held not in c.arrived and later[0] not in c.arrived
        holder.commit()
        committed_at = time.monotonic()
        c.wait_for(last[-1])
        assert c.arrived[held] >= committed_at
        assert c.arrived[held] - committed_at < 1.0
        rolled.close()
        holder.close()
    finally:
        c.close()
    expected = committed_seqs(conn)
    assert c.seqs == expected
    assert dead not in expected and dead_behind not in expected and held in expected
    warnings = [r.getMessage() for r in caplog.records if r.name == "cdc.poll" and r.levelno == logging.WARNING]
    assert any(f"seq {held}" in w and f"pid {holder_pid}" in w for w in warnings), warnings
    # Warned again while it stayed open, but not on every cycle.
    assert 2 <= len(warnings) <= 4, warnings


def test_hole_between_nextval_and_insert_is_not_skipped(dsn, conn, pool):
    c = Collector(Poller(pool=pool, interval=0.05))
    try:
        taker = psycopg.connect(dsn)
        [[taken]] = taker.execute("SELECT nextval('cdc.events_seq')").fetchall()
        later = insert(conn, 3)
        time.sleep(0.5)
        assert later[0] not in c.arrived
        taker.execute("INSERT INTO cdc.events (seq, stream_id, version, type) VALUES (%s, 'late', 1, 'T')",
                      (taken,))
        taker.commit()
        taker.close()
        c.wait_for(later[-1])
    finally:
        c.close()
    assert c.seqs == [taken, *later] == committed_seqs(conn)


def test_concurrent_writers_deliver_exactly_the_committed_set_in_seq_order(dsn, conn, pool):
    c = Collector(Poller(pool=pool, interval=0.05, page_size=200))
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            with psycopg.connect(dsn) as w:
                while not stop.is_set():
                    insert(w, rnd.choice([1, 1, 2, 5, 20]))
                    if rnd.random() < 0.2:
                        time.sleep(rnd.random() * 0.2)  # inside the transaction
                    if rnd.random() < 0.25:
                        w.rollback()
                    else:
                        w.commit()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    try:
        expected = committed_seqs(conn)
        c.wait_for(expected[-1], timeout=20)
    finally:
        c.close()
    assert c.seqs == expected
    assert len(expected) > 1000
    assert all(tx.source == "poll" for tx in c.txs)
    # Rows of one transaction that are consecutive in seq order come as one transaction.
    assert all(len({e.seq for e in tx.events}) == len(tx.events) for tx in c.txs)


def test_poller_resumes_from_its_position_without_loss_or_repeats(conn, pool):
    first = insert(conn, 30)
    p1 = Poller(pool=pool, listen=False, page_size=7)
    got: list[int] = []
    while len(got) < 20:
        got += [e.seq for tx in p1.poll(1.0) for e in tx.events]
    position = p1.position
    p1.close()
    assert position.seq == got[-1] and position.seqs_above == frozenset()
    second = insert(conn, 5)
    p2 = Poller(pool=pool, listen=False, position=position)
    while len(got) < 35:
        got += [e.seq for tx in p2.poll(1.0) for e in tx.events]
    assert p2.poll(0.2) == []
    p2.close()
    assert got == first + second


def test_poller_skips_seqs_the_stream_already_handled(conn, pool):
    seqs = insert(conn, 10)
    start = Position(None, seqs[2], frozenset({seqs[5], seqs[7]}))
    p = Poller(pool=pool, listen=False, position=start)
    got = [e.seq for tx in p.poll(1.0) for e in tx.events]
    assert got == [s for s in seqs[3:] if s not in (seqs[5], seqs[7])]
    assert p.position == Position(None, seqs[-1], frozenset())
    p.close()


def test_big_transaction_across_pages_comes_in_parts_of_one_xid(conn, pool):
    big = insert(conn, 25)
    small = insert(conn, 3)
    p = Poller(pool=pool, listen=False, page_size=10)
    txs: list[Transaction] = []
    deadline = time.monotonic() + 5
    while sum(len(t.events) for t in txs) < 28 and time.monotonic() < deadline:
        txs += p.poll(0.5)
    p.close()
    assert [e.seq for t in txs for e in t.events] == big + small
    parts = [t for t in txs if t.xid == txs[0].xid]
    assert [t.part for t in parts] == list(range(len(parts)))
    assert [t.final for t in parts] == [False] * (len(parts) - 1) + [True]
    assert txs[-1].events and [e.seq for e in txs[-1].events] == small


def test_seq_watermark_advances_exactly_as_far_as_proven(dsn, conn):
    a = insert(conn, 2)  # handled
    rolled = psycopg.connect(dsn)
    [dead] = insert(rolled)
    rolled.rollback()
    held_conn = psycopg.connect(dsn)
    [held] = insert(held_conn)
    b = insert(conn, 2)
    unhandled = insert(conn, 1)
    c = insert(conn, 1)
    w = SeqWatermark(stale_after=3.0)
    # Commit order: a, b, c handled; `unhandled` committed but not yet handed over.
    w.mark_handled(a)
    w.mark_handled(b)
    w.mark_handled(c)
    pos = w.advance(conn)
    # Past a; the rolled-back seq waits too: the held transaction holds the sequence lock, and
    # the lock is per sequence, not per number (a delay, never a loss).
    assert pos.seq == a[-1] and dead == a[-1] + 1 and held == dead + 1
    assert pos.seqs_above == frozenset(b + c)
    assert w.advance(conn).seq == a[-1]
    held_conn.commit()
    held_conn.close()
    rolled.close()
    # The rolled-back seq is passed; the held one committed but is not handled yet: stop there.
    assert w.advance(conn).seq == dead
    w.mark_handled([held])
    pos = w.advance(conn)
    assert pos.seq == unhandled[0] - 1 and pos.seqs_above == frozenset(c)
    w.mark_handled(unhandled)
    assert w.advance(conn) == Position(None, c[0], frozenset())


def test_replay_hands_over_history_in_seq_order_up_to_the_bound(conn, pool, capsys):
    seqs = insert(conn, 500) + insert(conn, 1) + insert(conn, 300)
    got: list[Transaction] = []
    summary = replay(pool, from_seq=seqs[9], to_seq=seqs[700], sink=CallbackSink(got.append), progress=True)
    events = [e.seq for tx in got for e in tx.events]
    assert events == seqs[10:701]
    assert summary.events == 691 and summary.transactions == 3
    assert "replayed 691 events" in capsys.readouterr().err
    assert replay(pool, sink=NullSink(), progress=False).events == 801


def test_read_snapshot_sees_exactly_what_the_slot_snapshot_saw(dsn, conn):
    before = insert(conn, 5)
    stream = ReplicationStream(dsn, "snap_test", plugin=PLUGIN)
    stream.open()
    try:
        created = stream.create_slot(export_snapshot=True)
        assert created.snapshot
        after_slot = insert(conn, 3)  # committed after the snapshot: the stream's, not ours
        txs = list(read_snapshot(dsn, created.snapshot, after=Position(None, before[0], frozenset({before[2]})),
                                 batch=2))
    finally:
        stream.close()
    assert [e.seq for tx in txs for e in tx.events] == [before[1], before[3], before[4]]
    assert after_slot[0] > before[-1]
    assert all(tx.source == "poll" and tx.commit_lsn is None for tx in txs)


def test_cached_sequence_is_refused_with_the_fix(conn):
    conn.execute("ALTER SEQUENCE cdc.events_seq CACHE 20")
    with pytest.raises(ConfigError, match=r"ALTER SEQUENCE cdc\.events_seq CACHE 1"):
        sequence_oid(conn)


def test_sequence_found_from_a_plain_default_and_missing_one_is_a_config_error(conn):
    conn.execute("CREATE SEQUENCE public.my_seq")
    conn.execute("CREATE TABLE public.evs (id bigint DEFAULT nextval('public.my_seq'), sid text, nodefault bigint)")
    oid = conn.execute("SELECT 'public.my_seq'::regclass::oid").fetchone()[0]
    assert sequence_oid(conn, EventTable(schema="public", name="evs", seq="id")) == oid
    with pytest.raises(ConfigError, match="cannot find the sequence"):
        sequence_oid(conn, EventTable(schema="public", name="evs", seq="nodefault"))


def test_replay_decodes_escapes_nulls_and_json_exactly_like_the_poller(conn, pool):
    conn.execute(
        "INSERT INTO cdc.events (stream_id, version, type, data, metadata) VALUES "
        "(%s, 1, %s, %s::jsonb, 'null'::jsonb)",
        ("tab\there\\back\nline", "T\\y", '{"s": "quote\\" back\\\\ nl\\n tab\\t", "n": [1, 2.5, null]}'),
    )
    insert(conn, 2)
    got: list[Transaction] = []
    replay(pool, sink=CallbackSink(got.append), progress=False)
    polled = Poller(pool=pool, listen=False).poll(1.0)
    assert [e for t in got for e in t.events] == [e for t in polled for e in t.events]
