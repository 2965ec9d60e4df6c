"""--endpos on every path (issue 15): the stream stops at the LSN exactly; a new consumer's
hand-off and the poll path stop at the first point past it they can prove, and never before
every transaction committed by it is delivered; an LSN a hand-off cannot honour is refused."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg

from cdc import Consumer

from .support import append_events as _append
from .support import committed_seqs, wal_now
from .support import jsonl_seqs as _seqs
from .test_mistakes import cdc, slots


def test_a_new_consumer_refuses_an_endpos_already_past_and_leaves_nothing(dsn: str, conn: psycopg.Connection) -> None:
    # The finding: a new consumer with --endpos 0/1 replayed every event and exited 0.
    _append(conn, "a", 5)
    past = wal_now(conn)
    for k in range(2):  # more than a WAL segment on: too far back to be "a moment before the run"
        _append(conn, f"b{k}", 5)
        conn.execute("SELECT pg_switch_wal()")
    _append(conn, "c", 5)
    for end in ("0/1", str(past)):
        proc = cdc("run", "--dsn", dsn, "--consumer", "late", "--slot", "late", "--endpos", end)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == "", "nothing may be delivered past the endpos"
        lines = proc.stderr.strip().splitlines()
        assert "Traceback" not in proc.stderr and lines[-1].startswith("cdc: error: "), proc.stderr
        assert f"--endpos {end} is more than" in lines[-1] and "--endpos now" in lines[-1], lines[-1]
    assert "late" not in slots(dsn), "a refused hand-off left its slot behind"
    assert conn.execute("SELECT count(*) FROM cdc.checkpoints WHERE consumer = 'late'").fetchone()[0] == 0


def test_an_endpos_read_just_before_a_new_consumer_runs_is_its_hand_off(dsn: str, conn: psycopg.Connection) -> None:
    # What a script does: read the WAL position, then start the run. Reads, the server and cdc
    # itself write WAL in between; the run still ends, having delivered everything before.
    _append(conn, "a", 5)
    end = wal_now(conn)
    conn.execute("SELECT pg_logical_emit_message(false, 'other', repeat('x', 100000))")  # WAL, no events
    proc = cdc("run", "--dsn", dsn, "--consumer", "script", "--endpos", str(end))
    assert proc.returncode == 0, proc.stderr
    assert sorted(_seqs(proc.stdout)) == sorted(committed_seqs(dsn))


def test_endpos_now_catches_up_then_exits_on_the_hand_off_and_on_the_stream(dsn: str, conn: psycopg.Connection) -> None:
    _append(conn, "a", 7)
    first = cdc("run", "--dsn", dsn, "--consumer", "now", "--slot", "now", "--endpos", "now")
    assert first.returncode == 0, first.stderr
    assert sorted(_seqs(first.stdout)) == sorted(committed_seqs(dsn))
    _append(conn, "b", 3)
    second = cdc("run", "--dsn", dsn, "--consumer", "now", "--slot", "now", "--mode", "stream", "--endpos", "now")
    assert second.returncode == 0, second.stderr
    assert len(_seqs(second.stdout)) == 3 and not set(_seqs(second.stdout)) & set(_seqs(first.stdout))


def test_poll_endpos_waits_for_a_transaction_holding_a_seq_then_stops(dsn: str, conn: psycopg.Connection,
                                                                    tmp_path: Path) -> None:
    # A writer took its seq before the WAL reached endpos and commits after: the poll path cannot
    # tell when it commits, so it waits for it and delivers it (a few after are allowed, never
    # one before missing). The run ends by itself, exit 0.
    _append(conn, "a", 4)
    held = psycopg.connect(dsn)
    held.execute("INSERT INTO cdc.events (stream_id, version, type) VALUES ('held', 1, 'E')")  # open: holds its seq
    _append(conn, "b", 4)
    end = wal_now(conn)
    out = tmp_path / "poll.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdc", "run", "--dsn", dsn, "--mode", "poll", "--consumer", "p", "--sink", f"jsonl:{out}",
         "--endpos", str(end)], stderr=subprocess.PIPE, text=True)
    try:
        # The four below the held seq arrive (however long a loaded machine takes to start the
        # run); then, a while later, the run is still waiting and has delivered nothing more.
        deadline = time.monotonic() + 30
        while len(_seqs(out)) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(1.0)
        assert proc.poll() is None, f"stopped before the held transaction ended: {proc.stderr.read() if proc.stderr else ''}"
        assert len(_seqs(out)) == 4, "only the events below the held seq are deliverable yet"
        held.commit()
        _, err = proc.communicate(timeout=30)
    finally:
        held.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "endpos" in err and "reached" in err, err
    assert sorted(_seqs(out)) == sorted(committed_seqs(dsn))  # the held one included


def test_poll_endpos_stops_while_writers_go_on(dsn: str, conn: psycopg.Connection) -> None:
    # Library mode, auto/poll path: everything committed by the end LSN, and the iteration ends
    # although writers keep committing after it.
    for k in range(5):
        _append(conn, f"before-{k}", 3)
    before = committed_seqs(dsn)
    end = wal_now(conn)
    stop = threading.Event()

    def write() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            k = 0
            while not stop.is_set():
                _append(c, f"after-{k}", 2)
                k += 1
                time.sleep(0.01)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        started = time.monotonic()
        with Consumer(dsn, consumer="pl", mode="poll", endpos=end) as feed:
            got = [e.seq for tx in feed for e in tx.events]
        assert time.monotonic() - started < 30
    finally:
        stop.set()
        writer.join()
    assert before <= set(got), f"missing {sorted(before - set(got))[:10]}"
    assert got == sorted(got) and len(got) == len(set(got))
