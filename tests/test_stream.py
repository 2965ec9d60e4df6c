"""The stream path against a real cluster: completeness, commit order, acknowledgement, restarts."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import orjson
import psycopg
import pytest

from cdc import Consumer, Lsn
from cdc.embedded import restart, wait_for
from cdc.errors import EventsTableMissingError

from .support import Collector, committed_seqs, prime, write_concurrently

OPTS = ("'format-version','2','include-xids','1','include-timestamp','1','include-lsn','1',"
        "'add-tables','cdc.events','actions','insert'")


def reference_slot(conn: psycopg.Connection, name: str = "ref") -> None:
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (name,))


def reference_commit_order(conn: psycopg.Connection, name: str = "ref") -> list[tuple[int, str, str, list[int]]]:
    """An independent reader of the same WAL (SQL interface, no cdc code): (xid, commit LSN,
    end LSN, seqs) per commit."""
    out: list[tuple[int, str, str, list[int]]] = []
    current: list[int] = []
    for (data,) in conn.execute(f"SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, {OPTS})", (name,)):
        msg = orjson.loads(data)
        if msg["action"] == "B":
            current = []
        elif msg["action"] == "I":
            current.append(next(c["value"] for c in msg["columns"] if c["name"] == "seq"))
        elif msg["action"] == "C" and current:
            out.append((msg["xid"], msg["lsn"], msg["nextlsn"], current))
    return out


def test_concurrent_writers_rollbacks_and_held_transactions_deliver_committed_set_in_commit_order(dsn, conn):
    prime(dsn, "c1")
    reference_slot(conn)
    consumer = Consumer(dsn, consumer="c1", mode="stream")
    col = Collector(consumer)
    stats = write_concurrently(dsn, writers=8, seconds=6, max_events=50, rollback=0.1, hold=0.05)
    assert stats["rolled_back_tx"] > 0 and stats["held_tx"] > 0
    committed = committed_seqs(dsn)
    col.wait_for(committed)
    col.stop()
    seqs = col.seqs
    assert len(seqs) == len(set(seqs)), "an event was delivered twice"
    assert set(seqs) == committed
    # Commit order, checked against an independent reader of the same WAL.
    reference = reference_commit_order(conn)
    assert all(tx.source == "stream" for tx in col.transactions)
    assert [(tx.xid, str(tx.commit_lsn), str(tx.end_lsn), [e.seq for e in tx.events])
            for tx in col.transactions if tx.events] == reference
    # It really is commit order and not seq order: held transactions committed late.
    assert any(b < a for a, b in zip(seqs, seqs[1:]))
    # Per stream, versions arrive 1, 2, 3, ...
    last: dict[str, int] = {}
    for tx in col.transactions:
        for e in tx.events:
            assert e.version == last.get(e.stream_id, 0) + 1, (e.stream_id, e.version)
            last[e.stream_id] = e.version


def _insert(conn, n, stream="s", start=1):
    with conn.transaction():
        for v in range(start, start + n):
            conn.execute("INSERT INTO cdc.events(stream_id, version, type, data) VALUES (%s, %s, 'E', '{}')", (stream, v))


def test_clean_stop_then_restart_re_emits_nothing(dsn, conn):
    _insert(conn, 5)
    col = Collector(Consumer(dsn, consumer="c"))
    col.wait_for(committed_seqs(dsn))
    col.stop()
    _insert(conn, 3, start=6)
    col2 = Collector(Consumer(dsn, consumer="c"))
    col2.wait_for({6, 7, 8})
    time.sleep(0.5)
    col2.stop()
    assert col2.seqs == [6, 7, 8]


def test_slot_is_acknowledged_only_up_to_the_handled_transaction(dsn, conn):
    prime(dsn, "c")
    _insert(conn, 1)
    _insert(conn, 1, start=2)
    consumer = Consumer(dsn, consumer="c", auto_ack=False, checkpoint_interval=0.01)
    it = iter(consumer)
    first = next(it)
    consumer.ack(first)
    second = next(it)  # handed over, never acknowledged
    consumer._checkpoint(force=True)

    def flushed() -> Lsn:
        row = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name='cdc_c'").fetchone()
        return Lsn.parse(row[0])

    # The status update is asynchronous: wait for the server to apply it, then hold it there.
    wait_for(lambda: flushed() == first.end_lsn, timeout=5)
    time.sleep(0.3)
    assert flushed() == first.end_lsn < second.end_lsn
    saved = conn.execute("SELECT lsn::text FROM cdc.checkpoints WHERE consumer='c'").fetchone()[0]
    assert Lsn.parse(saved) == first.end_lsn
    consumer.close()
    # The unacknowledged transaction comes again.
    col = Collector(Consumer(dsn, consumer="c"))
    col.wait_for({2})
    col.stop()
    assert col.seqs == [2]


def test_endpos_stops_after_the_last_transaction_ending_before_it(dsn, conn):
    prime(dsn, "e")
    _insert(conn, 2)
    endpos = Lsn.parse(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
    _insert(conn, 2, start=3)
    consumer = Consumer(dsn, consumer="e", endpos=endpos)
    got = [e.seq for tx in consumer for e in tx.events]
    consumer.close()
    assert got == [1, 2]


def test_server_restart_mid_stream_loses_nothing(dsn, conn, server):
    if server.cluster is None:
        pytest.skip("needs the embedded cluster to restart")
    col = Collector(Consumer(dsn, consumer="r", backoff_max=1.0))
    _insert(conn, 10)
    col.wait_for(set(range(1, 11)))
    restart(server.cluster, "immediate")
    with psycopg.connect(dsn, autocommit=True) as c2:
        _insert(c2, 10, start=11)
    committed = committed_seqs(dsn)  # an immediate restart makes the sequence jump ahead
    assert len(committed) == 20
    col.wait_for(committed, timeout=60)
    col.stop()
    assert set(col.seqs) == committed


def test_walsender_terminated_reconnects_and_loses_nothing(dsn, conn):
    col = Collector(Consumer(dsn, consumer="t", backoff_max=0.5))
    _insert(conn, 3)
    col.wait_for({1, 2, 3})
    conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name='cdc_t'")
    _insert(conn, 3, start=4)
    col.wait_for(set(range(1, 7)), timeout=30)
    col.stop()
    assert sorted(set(col.seqs)) == list(range(1, 7))


def _run_cli(dsn, *args, **kw):
    return subprocess.Popen([sys.executable, "-m", "cdc", "run", "--dsn", dsn, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_kill_9_mid_stream_then_restart_loses_nothing(dsn, conn, tmp_path):
    out = tmp_path / "events.jsonl"
    proc = _run_cli(dsn, "--mode", "stream", "--sink", f"jsonl:{out}", "--checkpoint-interval", "0.2")
    try:
        for k in range(20):
            _insert(conn, 5, stream=f"s{k}")
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for k in range(20, 30):
        _insert(conn, 5, stream=f"s{k}")
    proc = _run_cli(dsn, "--mode", "stream", "--sink", f"jsonl:{out}", "--endpos",
                    conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
    assert proc.wait(60) == 0, proc.stderr.read().decode()
    seqs = [orjson.loads(line)["seq"] for line in out.read_bytes().splitlines()]
    assert set(seqs) == committed_seqs(dsn)


def test_sigterm_acknowledges_what_was_written_and_exits_0(dsn, conn, tmp_path):
    out = tmp_path / "e.jsonl"
    proc = _run_cli(dsn, "--mode", "stream", "--sink", f"jsonl:{out}")
    _insert(conn, 4)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 4):
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert time.monotonic() - t0 < 5
    proc = _run_cli(dsn, "--mode", "stream", "--sink", "stdout", "--endpos",
                    conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr.decode()
    assert stdout == b"", "a clean stop must not re-emit anything"


def test_stdout_records_have_exactly_the_contract_keys(dsn, conn):
    prime(dsn, "default")
    _insert(conn, 1)
    endpos = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
    proc = _run_cli(dsn, "--mode", "stream", "--endpos", endpos)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr.decode()
    rec = orjson.loads(stdout.splitlines()[0])
    assert list(rec) == ["seq", "stream_id", "version", "type", "data", "metadata", "created_at", "xid", "commit_lsn", "source"]
    assert rec["source"] == "stream" and rec["seq"] == 1 and "/" in rec["commit_lsn"]


def test_slot_held_by_another_process_is_a_clear_error(dsn, conn):
    col = Collector(Consumer(dsn, consumer="a"))
    _insert(conn, 1)
    col.wait_for({1})
    proc = _run_cli(dsn, "--mode", "stream", "--consumer", "a")
    _, stderr = proc.communicate(timeout=30)
    col.stop()
    assert proc.returncode == 1
    line = stderr.decode().strip().splitlines()[-1]
    assert "in use by another process" in line and "Traceback" not in stderr.decode()


def test_missing_events_table_names_cdc_setup(empty_dsn):
    with pytest.raises(EventsTableMissingError, match="cdc setup"):
        Consumer(empty_dsn)


def test_one_million_row_transaction_is_consumed_in_bounded_memory(dsn, conn, tmp_path):
    prime(dsn, "big")  # the slot exists: the transaction comes from the stream, in chunks
    conn.execute("INSERT INTO cdc.events(stream_id, version, type, data) "
                 "SELECT 's', g, 'E', '{\"k\": 1}' FROM generate_series(1, 1000000) g")
    endpos = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
    script = (
        "import resource, sys\n"
        "from cdc import Consumer, Lsn\n"
        f"c = Consumer({dsn!r}, consumer='big', endpos=Lsn.parse({endpos!r}))\n"
        "n = sum(len(tx.events) for tx in c)\n"
        "c.close()\n"
        "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    n, rss_mb = map(int, out.stdout.split())
    assert n == 1_000_000
    print(f"peak RSS {rss_mb} MB")
    # 58 MB alone, ~300 MB inside the full suite (not understood yet: see the notes).
    assert rss_mb < 500, f"peak RSS {rss_mb} MB"
