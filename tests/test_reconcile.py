"""The reconciler against a real cluster: agreement under concurrency, and each fault it must name."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator

import orjson
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from cdc import checkpoint, store
from cdc.decoders import new_decoder, start_options
from cdc.deliveries import DeliveryLog, take_fence
from cdc.events import Lsn, Transaction
from cdc.metrics import RECONCILE_FINDINGS
from cdc.reconcile import ShadowReconciler, reconcile, run_cli
from cdc.replication import ReplicationStream

from .support import PLUGIN

OPTIONS = start_options(PLUGIN, store.DEFAULT_TABLE)  # type: ignore[arg-type]
SECRET = "do-not-log-this-payload"


class StreamConsumer:
    """Just enough of a stream consumer for these tests: slot → decoder → DeliveryLog → checkpoint."""

    def __init__(self, dsn: str, pool: ConnectionPool, consumer: str = "c", slot: str = "s", *,
                 fence_interval: float = 1.0):
        self.dsn, self.pool, self.consumer, self.slot = dsn, pool, consumer, slot
        self.checkpoints = checkpoint.Checkpoints(pool, consumer)
        self.log = DeliveryLog(pool, consumer, fence_interval=fence_interval)

    def create_slot(self) -> None:
        stream = ReplicationStream(self.dsn, self.slot, plugin=PLUGIN)
        stream.open()
        try:
            stream.create_slot()
        finally:
            stream.close()

    def heartbeat(self) -> Lsn:
        """A fence, then a message in the WAL after it: draining to the message passes the fence."""
        with psycopg.connect(self.dsn, autocommit=True) as c:
            take_fence(c, self.consumer)
            row = c.execute("SELECT pg_logical_emit_message(false, 'cdc', 'hb')::text").fetchone()
            assert row is not None
            return Lsn.parse(row[0])

    def drain(self, *, stop: threading.Event | None = None, acknowledge: bool = True,
              timeout: float = 30.0) -> list[Transaction]:
        """A new run; consume until `stop` is set and then until a heartbeat sent after it."""
        self.log.start_run()
        position = self.checkpoints.load()
        stream = ReplicationStream(self.dsn, self.slot, plugin=PLUGIN)
        stream.open()
        decoder = new_decoder(PLUGIN, store.DEFAULT_TABLE)  # type: ignore[arg-type]
        handled: list[Transaction] = []
        until: Lsn | None = None if stop is not None else self.heartbeat()
        deadline = time.monotonic() + timeout
        try:
            stream.start(position.lsn if position and position.lsn else Lsn(0), OPTIONS)
            while time.monotonic() < deadline:
                if until is None and stop is not None and stop.is_set():
                    until = self.heartbeat()
                out: list[memoryview] = []
                stream.read(0.1, out)
                txs: list[Transaction] = []
                decoder.decode(out, txs)
                if not txs:
                    continue
                self.log.record(txs)  # before the checkpoint, as the run loop does
                handled += txs
                end = max(tx.end_lsn for tx in txs if tx.end_lsn is not None)
                if acknowledge:
                    self.checkpoints.save(checkpoint.Position(lsn=end))
                    stream.acknowledge(end)
                if until is not None and end >= until:
                    return handled
            raise AssertionError("the stream did not reach the heartbeat in time")
        finally:
            stream.close()


@pytest.fixture
def pool(dsn: str) -> Iterator[ConnectionPool]:
    with ConnectionPool(dsn, min_size=1, max_size=4, open=True) as p:
        yield p


def append(conn: psycopg.Connection, stream_id: str, n: int = 1) -> list[int]:
    return store.append(conn, stream_id, [store.NewEvent("T", {"secret": SECRET}) for _ in range(n)],
                        expected_version=None)


def seqs_of(items) -> list[int]:  # type: ignore[no-untyped-def]
    return sorted(i.seq for i in items)


# -- agreement --------------------------------------------------------------------------------


def test_paths_agree_under_concurrent_writers_rollbacks_and_long_transactions(dsn, pool, conn):
    consumer = StreamConsumer(dsn, pool, fence_interval=0.05)
    consumer.create_slot()
    done = threading.Event()
    errors: list[BaseException] = []
    rolled_back: list[int] = []

    def writer(n: int) -> None:
        rnd = random.Random(n)
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                for i in range(60):
                    stream_id = f"w{n}-{rnd.randrange(8)}"
                    roll = rnd.random()
                    if roll < 0.15:  # rolled back: its seqs become holes for ever
                        try:
                            with c.transaction():
                                rolled_back.extend(append(c, stream_id, rnd.randint(1, 3)))
                                raise RuntimeError("rollback")
                        except RuntimeError:
                            pass
                    elif roll < 0.22 or (i == 5 and n == 0):  # a long transaction: lower seqs commit late
                        # One writer holds 1.3 s while the others go on committing higher seqs:
                        # were all four to hold at once, nobody would overtake anybody.
                        with c.transaction():
                            append(c, stream_id, rnd.randint(1, 3))
                            time.sleep(1.3 if (i == 5 and n == 0) else rnd.uniform(0.05, 0.4))
                    else:
                        append(c, stream_id, rnd.randint(1, 4))
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in writers:
        t.start()
    drained: list[Transaction] = []
    drainer = threading.Thread(target=lambda: drained.extend(consumer.drain(stop=done)))
    drainer.start()
    for t in writers:
        t.join(60)
    done.set()
    drainer.join(60)
    assert not errors

    report = reconcile(pool, consumer="c", stale_threshold=1.0)
    total = conn.execute("SELECT count(*) FROM cdc.events").fetchone()[0]
    assert (report.counts["missing"], report.counts["duplicates"], report.counts["order_violations"]) == (0, 0, 0)
    assert report.agrees
    # Meaningful only if every event was expected: the fences put all of them behind the checkpoint.
    assert report.counts["expected"] == report.counts["delivered"] == total
    assert rolled_back and not set(rolled_back) & {e.seq for tx in drained for e in tx.events}
    assert report.inversions, "long transactions must make seq order and commit order differ"
    for inv in report.inversions:
        assert inv.seq < inv.overtaken_by_seq
        assert inv.commit_lsn is not None and inv.overtaken_by_commit_lsn is not None
        assert inv.commit_lsn > inv.overtaken_by_commit_lsn  # the lower seq committed later
        assert inv.delay_seconds is not None and inv.delay_seconds >= 0
        assert "the lower seq committed later" in inv.explanation
    assert any(i.skipped_by_stale_poller for i in report.inversions)  # the 1.3 s transactions


# -- faults ----------------------------------------------------------------------------------


def test_slot_advanced_past_committed_events_is_named_seq_by_seq(dsn, pool, conn):
    consumer = StreamConsumer(dsn, pool)
    consumer.create_slot()
    for i in range(5):
        append(conn, f"a{i}")
    consumer.drain()
    assert reconcile(pool, consumer="c").agrees
    # The consumer is stopped; events commit (flushed: the test cluster runs synchronous_commit
    # off, and a slot cannot be advanced past the flushed WAL); someone moves the slot past them.
    conn.execute("SET synchronous_commit = on")
    skipped = [s for i in range(5) for s in append(conn, f"b{i}", 2)]
    conn.execute("SELECT pg_replication_slot_advance('s', pg_current_wal_lsn())")
    after = append(conn, "a0") + append(conn, "c0")
    got = consumer.drain()
    assert {e.seq for tx in got for e in tx.events} == set(after)

    code, out = run_cli(dsn, "c", json=True)
    doc = orjson.loads(out)
    assert code == 1 and doc["agrees"] is False
    assert sorted(m["seq"] for m in doc["missing"]) == sorted(skipped)
    first = next(m for m in doc["missing"] if m["seq"] == skipped[0])
    assert first["stream_id"] == "b0" and first["version"] == 1 and first["xid"] is not None
    assert first["side"] == "stream"
    code, text = run_cli(dsn, "c", json=False)
    assert code == 1 and "DISAGREE" in text and f"seq {skipped[0]}" in text


def test_duplicated_delivery_record_in_one_run_is_a_duplicate(dsn, pool, conn):
    consumer = StreamConsumer(dsn, pool)
    consumer.create_slot()
    append(conn, "s", 3)
    consumer.drain()
    conn.execute(
        "INSERT INTO cdc.deliveries (consumer, run, xid, commit_lsn, source, delivery, seq) "
        "SELECT consumer, run, xid, commit_lsn, source, (SELECT max(delivery) + 1 FROM cdc.deliveries), seq "
        "FROM cdc.deliveries WHERE seq = 2")
    report = reconcile(pool, consumer="c")
    assert not report.agrees
    assert [(d.seq, d.stream_id, d.version) for d in report.duplicates] == [(2, "s", 2)]
    assert "same run" in report.duplicates[0].reason
    assert report.to_json()["duplicates"][0]["commit_lsn"] == str(report.duplicates[0].commit_lsn)


def test_redelivery_of_acknowledged_event_in_a_later_run_is_a_duplicate(dsn, pool, conn):
    consumer = StreamConsumer(dsn, pool)
    consumer.create_slot()
    append(conn, "s", 2)
    first = consumer.drain()
    consumer.log.start_run()  # restarted from a checkpoint past those events, yet delivers one again
    consumer.log.record([tx for tx in first if tx.events][:1])
    report = reconcile(pool, consumer="c")
    assert seqs_of(report.duplicates) == [1, 2] and not report.crash_replays  # one transaction
    assert "already covered" in report.duplicates[0].reason


def test_redelivery_after_a_crash_before_the_checkpoint_is_a_crash_replay(dsn, pool, conn):
    consumer = StreamConsumer(dsn, pool)
    consumer.create_slot()
    append(conn, "s", 2)
    consumer.drain(acknowledge=False)  # handled and recorded, then the process died
    consumer.drain()  # the server sends them again
    report = reconcile(pool, consumer="c")
    assert report.agrees
    assert seqs_of(report.crash_replays) == [1, 2] and not report.duplicates


def test_reordered_stream_is_an_order_violation(dsn, pool, conn):
    consumer = StreamConsumer(dsn, pool)
    consumer.create_slot()
    append(conn, "s", 3)
    consumer.drain()
    conn.execute("UPDATE cdc.deliveries SET delivery = CASE seq WHEN 2 THEN 3 WHEN 3 THEN 2 END WHERE seq IN (2, 3)")
    report = reconcile(pool, consumer="c")
    assert not report.agrees
    kinds = {(o.stream_id, o.seq, o.previous_seq, o.kind) for o in report.order_violations}
    assert ("s", 3, 1, "skipped") in kinds and ("s", 2, 3, "out_of_order") in kinds
    assert report.to_json()["order_violations"]


def test_delivery_absent_from_the_table_is_missing_on_the_table_side(dsn, pool, conn):
    consumer = StreamConsumer(dsn, pool)
    consumer.create_slot()
    append(conn, "s", 1)
    consumer.drain()
    conn.execute("INSERT INTO cdc.deliveries (consumer, run, xid, commit_lsn, source, delivery, seq) "
                 "VALUES ('c', 1, 4242, '0/1234', 'stream', 99, 777)")
    report = reconcile(pool, consumer="c")
    assert [(m.seq, m.side, m.xid, str(m.commit_lsn)) for m in report.missing] == [(777, "table", 4242, "0/1234")]


def test_inversion_is_explained_and_flagged_past_the_stale_threshold(dsn, pool):
    consumer = StreamConsumer(dsn, pool)
    consumer.create_slot()
    with psycopg.connect(dsn) as slow, psycopg.connect(dsn, autocommit=True) as fast:
        low = [slow.execute("INSERT INTO cdc.events (stream_id, version, type) VALUES ('slow', 1, 'T') "
                            "RETURNING seq").fetchone()[0]]  # takes seq 1, commits late
        high = append(fast, "fast")
        time.sleep(0.4)
        slow.commit()
    consumer.drain()
    report = reconcile(pool, consumer="c", stale_threshold=0.2)
    assert report.agrees
    [inv] = report.inversions
    assert (inv.seq, inv.overtaken_by_seq, inv.stream_id) == (low[0], high[0], "slow")
    assert inv.delay_seconds is not None and inv.delay_seconds >= 0.35 and inv.skipped_by_stale_poller
    assert not reconcile(pool, consumer="c").inversions[0].skipped_by_stale_poller  # 3 s default


def test_cli_exit_codes(dsn, pool, conn):
    consumer = StreamConsumer(dsn, pool)
    consumer.create_slot()
    append(conn, "s", 2)
    consumer.drain()
    code, out = run_cli(dsn, "c", json=True)
    doc = orjson.loads(out)
    assert code == 0 and doc["agrees"] and doc["missing"] == [] and doc["counts"]["delivered"] == 2
    assert {"missing", "duplicates", "order_violations", "inversions", "window", "counts"} <= set(doc)
    code, out = run_cli(dsn, "c", json=True, since="10m")
    assert code == 0 and orjson.loads(out)["counts"]["delivered"] == 2
    code, out = run_cli(dsn, "c", json=False, since="yesterday-ish")
    assert code == 2 and "--since" in out
    code, out = run_cli("host=/nonexistent port=1 dbname=x connect_timeout=1", "c", json=False)
    assert code == 2 and out.startswith("cdc: error: ") and out.count("\n") == 1


def test_prune_keeps_the_record_bounded_and_the_paths_still_agree(dsn, pool, conn):
    consumer = StreamConsumer(dsn, pool)
    consumer.create_slot()
    append(conn, "s", 3)
    consumer.drain()
    take_fence(conn, "c")  # as the shadow reconciler or the next record would
    conn.execute("UPDATE cdc.delivery_fences SET taken_at = taken_at - interval '1 hour'")
    conn.execute("UPDATE cdc.delivery_runs SET started_at = started_at - interval '1 hour'")
    append(conn, "s", 2)
    consumer.drain()
    assert consumer.log.prune(600) == 3
    assert conn.execute("SELECT min(seq) FROM cdc.deliveries").fetchone()[0] == 4
    report = reconcile(pool, consumer="c")
    assert report.agrees and report.window["lo_seq"] == 4 and report.counts["delivered"] == 2


def test_shadow_reconciler_counts_and_logs_each_finding_once_without_payloads(dsn, pool, conn, caplog):
    consumer = StreamConsumer(dsn, pool)
    consumer.create_slot()
    append(conn, "s", 3)
    consumer.drain()
    before = RECONCILE_FINDINGS.labels("duplicate")._value.get()
    shadow = ShadowReconciler(pool, "c", interval=0.1)
    caplog.set_level(logging.INFO, logger="cdc.reconcile")
    shadow.start()
    try:
        conn.execute("INSERT INTO cdc.deliveries (consumer, run, xid, commit_lsn, source, delivery, seq) "
                     "SELECT consumer, run, xid, commit_lsn, source, 100, seq FROM cdc.deliveries WHERE seq = 3")
        deadline = time.monotonic() + 10
        while RECONCILE_FINDINGS.labels("duplicate")._value.get() == before and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # more rounds: the finding must not be counted again
    finally:
        shadow.stop()
    assert RECONCILE_FINDINGS.labels("duplicate")._value.get() == before + 1
    lines = [r.getMessage() for r in caplog.records if r.name == "cdc.reconcile"]
    assert sum("duplicate delivery" in line and "seq 3" in line for line in lines) == 1
    assert not any(SECRET in line for line in lines)
    assert shadow.errors == 0


# -- what reconcile knows (issue 16) ------------------------------------------------------------------

def _run_library(dsn: str, consumer: str, *, record: bool) -> int:
    """The real Consumer up to the WAL position now: returns how many events it handed over."""
    from cdc import Consumer

    n = 0
    with Consumer(dsn, consumer=consumer, endpos="now", record_deliveries=record) as c:
        for tx in c:
            n += len(tx.events)
    return n


def test_a_consumer_without_a_delivery_record_is_an_error_not_an_agreement(dsn, conn):
    code, out = run_cli(dsn, "nosuch", json=False)
    assert code == 2 and out.count("\n") == 1 and out.startswith("cdc: error: no consumer 'nosuch'"), out
    append(conn, "nr", 3)
    assert _run_library(dsn, "never_recorded", record=False) >= 3
    code, out = run_cli(dsn, "never_recorded", json=False)
    assert code == 2 and out.count("\n") == 1, out
    assert "has no delivery record" in out and "--record-deliveries" in out, out
    code, out = run_cli(dsn, "never_recorded", json=True)
    assert code == 2 and "no delivery record" in orjson.loads(out)["error"]


def test_a_window_run_without_recording_is_reported_as_not_recorded_never_as_missing(dsn, conn):
    name = "windows"
    append(conn, "w", 4)
    assert _run_library(dsn, name, record=True) >= 4
    append(conn, "w", 8)  # delivered by a run that does not record
    assert _run_library(dsn, name, record=False) == 8
    code, out = run_cli(dsn, name, json=True)
    doc = orjson.loads(out)
    assert code == 0 and doc["agrees"], out
    assert doc["counts"]["missing"] == 0 and doc["counts"]["not_recorded"] == 8, doc["counts"]
    windows = [w for w in doc["unrecorded"] if not w["before_recording"]]
    assert len(windows) == 1 and windows[0]["open"] and windows[0]["started_at"], windows
    assert len(doc["runs"]) == 1 and doc["runs"][0]["deliveries"] >= 4
    code, text = run_cli(dsn, name, json=False)
    assert code == 0 and "AGREE" in text and "not recorded: 8" in text and "not recorded (still running so)" in text

    # Recording again closes the window; what it delivers is checked, and a loss inside a
    # recorded run is still found, even with an unrecorded window before it.
    append(conn, "w", 5)
    assert _run_library(dsn, name, record=True) == 5
    doc = orjson.loads(run_cli(dsn, name, json=True)[1])
    assert doc["agrees"] and doc["counts"]["not_recorded"] == 8, doc["counts"]
    windows = [w for w in doc["unrecorded"] if not w["before_recording"]]
    assert len(windows) == 1 and not windows[0]["open"] and windows[0]["ended_at"], windows
    assert len(doc["runs"]) == 2
    lost = conn.execute("SELECT max(seq) FROM cdc.deliveries WHERE consumer = %s", (name,)).fetchone()[0]
    conn.execute("DELETE FROM cdc.deliveries WHERE consumer = %s AND seq = %s", (name, lost))
    code, out = run_cli(dsn, name, json=True)
    doc = orjson.loads(out)
    assert code == 1 and [m["seq"] for m in doc["missing"]] == [lost], out
    # And one in the first recorded run, before the unrecorded window.
    first = conn.execute("SELECT min(seq) FROM cdc.deliveries WHERE consumer = %s", (name,)).fetchone()[0]
    second = conn.execute("SELECT min(seq) FROM cdc.deliveries WHERE consumer = %s AND seq > %s",
                          (name, first)).fetchone()[0]
    conn.execute("DELETE FROM cdc.deliveries WHERE consumer = %s AND seq = %s", (name, second))
    doc = orjson.loads(run_cli(dsn, name, json=True)[1])
    assert sorted(m["seq"] for m in doc["missing"]) == [second, lost], doc["missing"]
