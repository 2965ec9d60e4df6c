"""Auto mode and the hand-off between the poll path and the stream (issue: poll path, item 4-5)."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from cdc import Consumer, store
from cdc.embedded import embedded_cluster

from .support import Collector, committed_seqs, drop_slot_while_running, write_concurrently


def _assert_exactly_once(col: Collector, committed: set[int]) -> None:
    seqs = col.seqs
    assert len(seqs) == len(set(seqs)), "an event was delivered twice"
    assert set(seqs) == committed
    last: dict[str, int] = {}
    for tx in col.transactions:
        for e in tx.events:
            assert e.version == last.get(e.stream_id, 0) + 1, (e.stream_id, e.version)
            last[e.stream_id] = e.version


def test_new_consumer_joins_the_live_stream_under_writers_exactly_once(dsn):
    # History first, then a consumer starts (poller replay under the slot's snapshot) while
    # writers keep appending: it must join the stream with nothing missed, nothing twice.
    write_concurrently(dsn, writers=4, seconds=1.5, max_events=20, rollback=0.2, hold=0.0, seed=3)
    done = threading.Event()
    writer = threading.Thread(target=lambda: (write_concurrently(dsn, writers=4, seconds=4, max_events=20,
                                                                  rollback=0.2, hold=0.1, seed=4), done.set()))
    writer.start()
    time.sleep(0.3)
    col = Collector(Consumer(dsn, consumer="newcomer", mode="auto"))
    writer.join()
    committed = committed_seqs(dsn)
    col.wait_for(committed, timeout=60)
    time.sleep(0.5)
    col.stop()
    sources = {tx.source for tx in col.transactions}
    assert sources == {"poll", "stream"}, sources
    _assert_exactly_once(col, committed)


def test_rebuild_from_seq_0_replays_history_then_streams(dsn):
    write_concurrently(dsn, writers=2, seconds=1, max_events=10, rollback=0.3, hold=0.0, seed=5)
    first = Collector(Consumer(dsn, consumer="p1"))
    first.wait_for(committed_seqs(dsn))
    first.stop()
    # A second projection started later sees the whole history too, through its own slot.
    col = Collector(Consumer(dsn, consumer="p2", slot="p2"))
    write_concurrently(dsn, writers=2, seconds=1, max_events=10, rollback=0.3, hold=0.0, seed=6)
    committed = committed_seqs(dsn)
    col.wait_for(committed)
    col.stop()
    _assert_exactly_once(col, committed)


def test_slot_dropped_mid_run_loses_nothing_and_duplicates_nothing(dsn):
    col = Collector(Consumer(dsn, consumer="d", backoff_max=0.5))

    def dropper() -> None:
        time.sleep(1.0)
        drop_slot_while_running(dsn, "cdc_d")

    t = threading.Thread(target=dropper)
    t.start()
    write_concurrently(dsn, writers=4, seconds=4, max_events=20, rollback=0.2, hold=0.05, seed=7)
    t.join()
    committed = committed_seqs(dsn)
    col.wait_for(committed, timeout=60)
    time.sleep(0.5)
    col.stop()
    _assert_exactly_once(col, committed)


def test_advanced_slot_is_detected_and_repaired_from_the_seq_position(dsn, conn):
    col = Collector(Consumer(dsn, consumer="adv"))
    conn.execute("INSERT INTO cdc.events(stream_id, version, type, data) VALUES ('s', 1, 'E', '{}')")
    col.wait_for({1})
    col.stop()
    for v in range(2, 6):
        conn.execute("INSERT INTO cdc.events(stream_id, version, type, data) VALUES ('s', %s, 'E', '{}')", (v,))
    # Someone moves the slot past events the consumer never saw.
    conn.execute("SELECT pg_replication_slot_advance('cdc_adv', pg_current_wal_insert_lsn())")
    col = Collector(Consumer(dsn, consumer="adv"))
    col.wait_for({2, 3, 4, 5})
    col.stop()
    assert col.seqs == [2, 3, 4, 5]


@pytest.fixture(scope="module")
def replica_cluster():
    with embedded_cluster(settings={"wal_level": "replica"}, fast=True) as cluster:
        with psycopg.connect(cluster.dsn, autocommit=True) as c:
            store.setup(c)
        yield cluster


def test_auto_mode_without_logical_decoding_polls_and_delivers_everything(replica_cluster, caplog):
    dsn = replica_cluster.dsn
    col = Collector(Consumer(dsn, consumer="auto", mode="auto"))
    write_concurrently(dsn, writers=4, seconds=2, max_events=10, rollback=0.2, hold=0.1, seed=8)
    committed = committed_seqs(dsn)
    col.wait_for(committed)
    col.stop()
    _assert_exactly_once(col, committed)
    assert {tx.source for tx in col.transactions} == {"poll"}
    assert any("wal_level" in r.getMessage() for r in caplog.records)


def test_stream_mode_without_logical_decoding_says_how_to_fix(replica_cluster):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "cdc", "run", "--mode", "stream", "--dsn", replica_cluster.dsn],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert "wal_level" in last and "logical" in last and "Traceback" not in out.stderr


def test_snapshot_lost_before_the_replay_restarts_the_hand_off(dsn, conn, monkeypatch):
    # The walsender that exported the new slot's snapshot dies (a restart, pg_terminate_backend)
    # before the replay imports it: the hand-off starts again, and nothing is lost or repeated.
    from cdc.replication import ReplicationStream

    write_concurrently(dsn, writers=2, seconds=1, max_events=5, rollback=0.0, hold=0.0, seed=4)
    original = ReplicationStream.create_slot
    killed: list[int] = []

    def create_then_lose_the_exporter(self, **kw):  # type: ignore[no-untyped-def]
        created = original(self, **kw)
        if not killed:
            killed.append(self.walsender_pid)
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("SELECT pg_terminate_backend(%s)", (self.walsender_pid,))
        return created

    monkeypatch.setattr(ReplicationStream, "create_slot", create_then_lose_the_exporter)
    col = Collector(Consumer(dsn, consumer="lost", backoff_max=0.5))
    committed = committed_seqs(dsn)
    col.wait_for(committed, timeout=60)
    col.stop()
    assert killed
    _assert_exactly_once(col, committed)
