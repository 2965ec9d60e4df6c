"""--workers N: each stream on one worker in version order, a low-watermark acknowledgement,
per-partition exactly-once projections, back-pressure. Real cluster except the first tests."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime

import orjson
import psycopg
import pytest
from prometheus_client import generate_latest

from cdc import Consumer, Event, Lsn, ParallelDispatcher, Transaction
from cdc.errors import ConfigError
from cdc.metrics import REGISTRY
from cdc.partitions import Partitions
from cdc.workers import worker_of

from .support import committed_seqs, drop_slot_while_running, prime, write_concurrently

# -- the dispatcher's bookkeeping, on a fake feed ----------------------------------------------------

class FakeFeed:
    """A Consumer's surface as the dispatcher uses it: iterate, ack, stop."""

    auto_ack = False
    on_checkpoint = None
    checkpoints = None

    def __init__(self, txs: list[Transaction]):
        self.txs = txs
        self.acked: list[Transaction] = []
        self._stop = False

    def __iter__(self):
        for tx in self.txs:
            if self._stop:
                return
            yield tx

    def ack(self, tx: Transaction) -> None:
        self.acked.append(tx)

    def stop(self) -> None:
        self._stop = True


def _tx(n: int, *streams: str, part: int = 0, final: bool = True) -> Transaction:
    events = [Event(n * 100 + i, s, 1, "E", "{}", None, None) for i, s in enumerate(streams)]
    return Transaction(n, Lsn(n * 10), Lsn(n * 10 + 1), datetime.now(UTC), events, "stream", part, final)


def _streams_on_distinct_workers(workers: int, count: int) -> list[str]:
    out: dict[int, str] = {}
    for i in range(1000):
        out.setdefault(worker_of(f"s{i}", workers), f"s{i}")
        if len(out) == count:
            break
    return list(out.values())


def test_acknowledgement_is_the_low_watermark_and_waits_for_the_slowest_slice():
    a, slow = _streams_on_distinct_workers(2, 2)
    release = threading.Event()
    handled: list[int] = []

    def handle(tx: Transaction) -> None:
        if tx.events and tx.events[0].stream_id == slow:
            release.wait(10)
        handled.append(tx.xid)

    txs = [_tx(1, a), _tx(2, a, slow), _tx(3, a), _tx(4, a), Transaction(5, Lsn(50), Lsn(51), None, [], "stream")]
    feed = FakeFeed(txs)
    d = ParallelDispatcher(feed, handle, workers=2)
    t = threading.Thread(target=lambda: d.__enter__().run())
    t.start()
    deadline = time.monotonic() + 10
    while handled.count(1) + handled.count(3) + handled.count(4) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    # tx 3 and 4 are handled, but tx 2's slow slice is not: nothing past tx 1 is acknowledged.
    assert [tx.xid for tx in feed.acked] == [1]
    release.set()
    t.join(10)
    d.close()
    assert feed.acked[-1].xid == 5 and d.outstanding == 0


def test_huge_transaction_is_acknowledged_after_its_final_part_and_every_part_holder_sees_it():
    a, b = _streams_on_distinct_workers(2, 2)
    seen: list[tuple[str, int, bool, int]] = []
    lock = threading.Lock()

    def handle(tx: Transaction) -> None:
        with lock:
            seen.append((threading.current_thread().name, tx.part, tx.final, len(tx.events)))

    parts = [_tx(7, a, b, part=0, final=False), _tx(7, a, part=1, final=False), _tx(7, a, part=2, final=True)]
    feed = FakeFeed(parts)
    with ParallelDispatcher(feed, handle, workers=2) as d:
        d.run()
    assert feed.acked[-1] is parts[-1]
    # The worker that had b's part 0 gets the final part too, with no events of its own.
    finals = sorted((n, k) for n, _, f, k in seen if f)
    assert len(finals) == 2 and sorted(k for _, k in finals) == [0, 1]


def test_handler_error_stops_everything_and_acknowledges_nothing_past_it():
    streams = _streams_on_distinct_workers(4, 4)

    def handle(tx: Transaction) -> None:
        if tx.xid == 3:
            raise ValueError("bad event")
        time.sleep(0.01)

    feed = FakeFeed([_tx(n, streams[n % 4]) for n in range(1, 40)])
    with pytest.raises(ValueError, match="bad event"), ParallelDispatcher(feed, handle, workers=4) as d:
        d.run()
    assert all(tx.xid < 3 for tx in feed.acked)


# -- against the cluster --------------------------------------------------------------------------------

def _slot_flush(conn: psycopg.Connection, slot: str) -> Lsn:
    return Lsn.parse(conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name=%s",
                                  (slot,)).fetchone()[0])


def _saved_lsn(conn: psycopg.Connection, consumer: str) -> Lsn:
    return Lsn.parse(conn.execute("SELECT lsn::text FROM cdc.checkpoints WHERE consumer=%s", (consumer,)).fetchone()[0])


def _in_thread(d: ParallelDispatcher) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def go() -> None:
        try:
            with d:
                d.run()
        except BaseException as err:  # noqa: BLE001 - surfaced by the test
            errors.append(err)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, errors


def _assert_per_stream_order(records: list[tuple[str, int]], first_run: int | None = None) -> None:
    """Per stream, versions come 1, 2, 3, ...: a version may go back (a replay after a crash)
    but never skip ahead; in the first `first_run` records, not even back."""
    last: dict[str, int] = {}
    for i, (stream, version) in enumerate(records):
        prev = last.get(stream, 0)
        if first_run is not None and i < first_run:
            assert version == prev + 1, (stream, prev, version, "before the crash")
        else:
            assert version <= prev + 1, (stream, prev, version, "a gap or a reorder")
        last[stream] = version


def _multi_stream_transactions(conn: psycopg.Connection, streams: int = 12, rounds: int = 3) -> None:
    for v in range(1, rounds + 1):
        with conn.transaction():
            for i in range(streams):
                conn.execute("INSERT INTO cdc.events(stream_id, version, type, data) VALUES (%s, %s, 'E', '{}')",
                             (f"multi-{i}", v))


def test_eight_workers_handle_every_committed_event_in_per_stream_version_order(dsn, conn):
    prime(dsn, "pw")
    consumer = Consumer(dsn, consumer="pw", auto_ack=False, checkpoint_interval=0.2)
    seen: list[tuple[str, int, int, str]] = []
    lock = threading.Lock()

    def handle(tx: Transaction) -> None:
        for e in tx.events:
            time.sleep(random.uniform(0, 0.005))
            with lock:
                seen.append((e.stream_id, e.version, e.seq, threading.current_thread().name))

    d = ParallelDispatcher(consumer, handle, workers=8)
    t, errors = _in_thread(d)
    _multi_stream_transactions(conn)
    stats = write_concurrently(dsn, writers=4, seconds=2.5, max_events=5, rollback=0.1, hold=0.05, streams=25)
    assert stats["rolled_back_tx"] > 0 and stats["held_tx"] > 0
    committed = committed_seqs(dsn)
    deadline = time.monotonic() + 60
    while {s for _, _, s, _ in seen} != committed and time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    consumer.stop()
    t.join(30)
    assert not errors, errors
    consumer.close()
    seqs = [s for _, _, s, _ in seen]
    assert len(seqs) == len(set(seqs)) and set(seqs) == committed, "lost or duplicated events"
    _assert_per_stream_order([(stream, v) for stream, v, _, _ in seen], first_run=len(seen))
    workers_of: dict[str, set[str]] = defaultdict(set)
    for stream, _, _, name in seen:
        workers_of[stream].add(name)
    assert all(len(w) == 1 for w in workers_of.values()), "a stream moved between workers"
    assert len({name for _, _, _, name in seen}) == 8
    # Everything handled: the checkpoint and the slot stand at the last transaction.
    assert d.outstanding == 0 and d.acknowledged is not None
    assert _saved_lsn(conn, "pw") == d.acknowledged.end_lsn == _slot_flush(conn, "cdc_pw")


def _run_cli(dsn: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cdc", "run", "--dsn", dsn, "--mode", "stream", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _current_lsn(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]


def _kill_mid_stream(proc: subprocess.Popen, dsn: str, *, after: float, streams: int = 20) -> None:
    writers = threading.Thread(target=write_concurrently, args=(dsn,),
                               kwargs={"writers": 4, "seconds": after + 1.5, "max_events": 5, "rollback": 0.1,
                                       "hold": 0.05, "streams": streams})
    writers.start()
    try:
        time.sleep(after)
        assert proc.poll() is None, proc.stderr.read().decode()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        writers.join()


def test_kill_9_with_eight_workers_loses_nothing_and_never_breaks_per_stream_order(dsn, conn, tmp_path):
    out = tmp_path / "events.jsonl"
    prime(dsn, "default")  # the slot exists: creating it would wait for the writers' open transactions
    proc = _run_cli(dsn, "--sink", f"jsonl:{out}", "--workers", "8", "--checkpoint-interval", "0.2")
    _multi_stream_transactions(conn)
    _kill_mid_stream(proc, dsn, after=2.0)
    # A record being written at the kill may be cut short; it was never acknowledged, so a
    # reader drops the torn line and the restart writes it again.
    data = out.read_bytes()
    out.write_bytes(data[: data.rfind(b"\n") + 1])
    first_run = len(out.read_bytes().splitlines())
    proc = _run_cli(dsn, "--sink", f"jsonl:{out}", "--workers", "8", "--endpos", _current_lsn(conn))
    assert proc.wait(60) == 0, proc.stderr.read().decode()
    records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert 0 < first_run < len(records), "the kill should land mid-stream"
    assert {r["seq"] for r in records} == committed_seqs(dsn)
    _assert_per_stream_order([(r["stream_id"], r["version"]) for r in records], first_run=first_run)


PROJECTION = '''
import random, time

def project(conn, tx):
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO proj(seq, stream_id, version) VALUES (%s, %s, %s)",
                        [(e.seq, e.stream_id, e.version) for e in tx.events])
    time.sleep(random.uniform(0, 0.002) * len(tx.events))
'''


def _projection_killed_then_drained(dsn, conn, tmp_path, *, workers: str, checkpoint_interval: str,
                                    after_kill=lambda: None):
    """`cdc run` with the PROJECTION handler on N workers, kill -9 mid-stream, `after_kill()`,
    then a run to the current WAL end: (rows applied before the restart, every row, committed)."""
    conn.execute("CREATE TABLE proj (id bigserial PRIMARY KEY, seq bigint, stream_id text, version int)")
    (tmp_path / "projmod.py").write_text(PROJECTION)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    args = ("--sink", "python:projmod:project", "--workers", workers)
    prime(dsn, "default")
    proc = _run_cli(dsn, *args, "--checkpoint-interval", checkpoint_interval, env=env)
    _multi_stream_transactions(conn)
    _kill_mid_stream(proc, dsn, after=2.5)
    applied_before = conn.execute("SELECT count(*) FROM proj").fetchone()[0]
    after_kill()
    proc = _run_cli(dsn, *args, "--endpos", _current_lsn(conn), env=env)
    assert proc.wait(60) == 0, proc.stderr.read().decode()
    rows = conn.execute("SELECT seq, stream_id, version FROM proj ORDER BY id").fetchall()
    return applied_before, rows, committed_seqs(dsn)


def test_parallel_projection_is_exactly_once_across_kill_9(dsn, conn, tmp_path):
    applied_before, rows, committed = _projection_killed_then_drained(dsn, conn, tmp_path, workers="8",
                                                                      checkpoint_interval="0.2")
    assert 0 < applied_before < len(rows), "the kill should land mid-stream"
    assert len(rows) == len(committed) and {r[0] for r in rows} == committed, "not exactly the committed events"
    _assert_per_stream_order([(r[1], r[2]) for r in rows], first_run=len(rows))
    names = {r[0] for r in conn.execute("SELECT consumer FROM cdc.checkpoints")}
    assert {f"default#w{i}of8" for i in range(8)} <= names


def test_parallel_projection_is_exactly_once_when_a_kill_9_is_followed_by_a_hand_off(dsn, conn, tmp_path):
    # The partitions commit far past the consumer's checkpoint (saved every 30 s), then the
    # process dies and the slot is dropped: the restart replays by seq from that old position,
    # and every partition must know, by seq, what it applied from the stream.
    applied_before, rows, committed = _projection_killed_then_drained(
        dsn, conn, tmp_path, workers="4", checkpoint_interval="30",
        after_kill=lambda: drop_slot_while_running(dsn, "cdc"))
    assert 0 < applied_before < len(rows), "the kill should land mid-stream"
    dup = len(rows) - len({r[0] for r in rows})
    assert dup == 0, f"{dup} events applied twice"
    assert {r[0] for r in rows} == committed, "not exactly the committed events"
    _assert_per_stream_order([(r[1], r[2]) for r in rows], first_run=len(rows))


def test_a_stuck_worker_stalls_the_feed_in_bounded_memory_and_shows_in_metrics(dsn, conn):
    prime(dsn, "st")
    workers, queue_size = 4, 4
    gate = threading.Event()
    handled: list[int] = []

    def handle(tx: Transaction) -> None:
        if tx.events[0].stream_id == "stuck":
            gate.wait(60)
        handled.extend(e.seq for e in tx.events)

    consumer = Consumer(dsn, consumer="st", auto_ack=False, checkpoint_interval=0.1)
    d = ParallelDispatcher(consumer, handle, workers=workers, queue_size=queue_size)
    t, errors = _in_thread(d)
    others = [s for s in (f"o{i}" for i in range(100)) if worker_of(s, workers) != worker_of("stuck", workers)][:6]
    version: dict[str, int] = defaultdict(int)
    for n in range(60):  # stuck, other, other, stuck, ...
        stream = "stuck" if n % 3 == 0 else others[n % len(others)]
        version[stream] += 1
        conn.execute("INSERT INTO cdc.events(stream_id, version, type, data) VALUES (%s, %s, 'E', '{}')",
                     (stream, version[stream]))
    first_stuck = conn.execute("SELECT min(seq) FROM cdc.events WHERE stream_id='stuck'").fetchone()[0]
    time.sleep(1.5)
    w = str(worker_of("stuck", workers))
    dispatched = d.dispatched_transactions
    time.sleep(0.5)
    try:
        # Stalled: nothing more handed over, the stuck worker's queue full, the others empty.
        assert d.dispatched_transactions == dispatched < 60
        assert d.queue_depths()[int(w)] == queue_size and sum(d.queue_depths()) == queue_size
        assert d.outstanding <= workers * queue_size
        assert REGISTRY.get_sample_value("cdc_worker_queue_depth", {"worker": w}) == queue_size
        assert REGISTRY.get_sample_value("cdc_worker_oldest_age_seconds", {"worker": w}) > 1.0
        assert f'cdc_worker_queue_depth{{worker="{w}"}} {float(queue_size)}' in generate_latest(REGISTRY).decode()
        # Nothing at or past the stuck transaction is acknowledged.
        saved = conn.execute("SELECT seq FROM cdc.checkpoints WHERE consumer='st'").fetchone()[0]
        assert saved < first_stuck
    finally:
        gate.set()
    deadline = time.monotonic() + 20
    while len(handled) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    consumer.stop()
    t.join(20)
    assert not errors, errors
    consumer.close()
    assert sorted(handled) == sorted(committed_seqs(dsn))


def test_handler_error_at_endpos_saves_no_position_past_the_failed_slice(dsn, conn):
    prime(dsn, "fe")
    for k in range(6):
        conn.execute("INSERT INTO cdc.events(stream_id, version, type, data) VALUES (%s, 1, 'E', '{}')", (f"s{k}",))
    endpos = Lsn.parse(_current_lsn(conn))
    failing = conn.execute("SELECT seq FROM cdc.events WHERE stream_id='s2'").fetchone()[0]

    def handle(tx: Transaction) -> None:
        if tx.events[0].seq == failing:
            time.sleep(0.3)  # the consumer reaches endpos, and acknowledges all, meanwhile
            raise RuntimeError("projection failed")

    consumer = Consumer(dsn, consumer="fe", auto_ack=False, endpos=endpos)
    before = _saved_lsn(conn, "fe")
    with pytest.raises(RuntimeError, match="projection failed"), ParallelDispatcher(consumer, handle, workers=4) as d:
        d.run()
    consumer.close()  # saves what was acknowledged: the consumer never moves past the failed slice itself
    saved = _saved_lsn(conn, "fe")
    assert before <= saved < endpos and _slot_flush(conn, "cdc_fe") <= saved
    # The failed transaction comes again.
    again = Consumer(dsn, consumer="fe", endpos=endpos)
    assert failing in [e.seq for tx in again for e in tx.events]
    again.close()


def test_changing_the_worker_count_is_refused_while_a_partition_is_ahead(dsn, conn):
    conn.execute("INSERT INTO cdc.checkpoints(consumer, lsn) VALUES ('p', '0/100'), ('p#w0of4', '0/200'), "
                 "('p#w1of4', '0/100')")

    def project(conn, tx):
        pass

    with pytest.raises(ConfigError, match="last ran with 4 workers.*--workers 4"):
        Partitions(project, dsn, consumer="p", workers=8)
    conn.execute("UPDATE cdc.checkpoints SET lsn = '0/300' WHERE consumer = 'p'")
    Partitions(project, dsn, consumer="p", workers=8).close()
    names = {r[0] for r in conn.execute("SELECT consumer FROM cdc.checkpoints")}
    assert names == {"p"}, "the old partitioning's rows are retired once covered"


def test_run_help_says_what_workers_give_up(dsn):
    out = subprocess.run([sys.executable, "-m", "cdc", "run", "--help"], capture_output=True, text=True, check=True).stdout
    out = " ".join(out.split())
    assert "no longer applied atomically by one handler call" in out
    assert "--workers 1 (default) keeps whole transactions" in out
    proc = _run_cli(dsn, "--workers", "0")
    assert proc.wait(30) == 2 and b"workers" in proc.stderr.read()
