"""Fault injection (issue #8): every test is checked against the committed content of cdc.events,
never against the consumer's own bookkeeping."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from cdc import Consumer, metrics, store
from cdc.checkpoint import default_slot
from cdc.embedded import embedded_cluster, restart, run_as_server_user

from .faults import (
    ROOT,
    Writers,
    cdc_run,
    check_delivery,
    check_projection,
    current_lsn,
    drain,
    drop_slot_while_running,
    one_line_error,
    prime,
    read_jsonl,
    run_to_exit,
    slot_row,
    sql,
    tail,
    terminate_walsender,
    wait_delivered,
    wait_log,
    wait_slot_free,
)
from .support import Collector, committed_seqs, write_concurrently

FAST = ["--mode", "stream", "--checkpoint-interval", "0.1", "--heartbeat-interval", "0"]
PROJECT = "python:tests.fault_projection:project"


def _projection_table(conn: psycopg.Connection) -> None:
    # No key on purpose: a duplicate must show up as a second row, not as an error and a retry.
    conn.execute("CREATE TABLE fault_projection (seq bigint NOT NULL, xid bigint)")


def _jsonl_size(path) -> int:
    return path.stat().st_size if path.exists() else 0


def _projection_rows(dsn: str) -> int:
    return sql(dsn, "SELECT count(*) FROM fault_projection")[0][0]


def _wait_progress(done, proc: subprocess.Popen[bytes], log, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"cdc run exited {proc.returncode}: {tail(log)}"
        assert time.monotonic() < deadline, f"cdc run delivered nothing within {timeout} s: {tail(log)}"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("cdc run did not stop on SIGTERM") from None


# -- 1. consumer crashes ----------------------------------------------------------------------------

def test_kill_9_twenty_times_loses_nothing_and_the_projection_is_exact(dsn, conn, tmp_path):
    """kill -9 at random points (before handling, inside a transaction handed over in parts,
    after handling but before the checkpoint) of a jsonl consumer and of an exactly-once
    projection, while 4 writers append big and small transactions with rollbacks."""
    _projection_table(conn)
    out, log = tmp_path / "events.jsonl", tmp_path / "run.log"
    jsonl = [*FAST, "--chunk-events", "50", "--slot", "fj", "--consumer", "fj", "--sink", f"jsonl:{out}"]
    proj = [*FAST, "--chunk-events", "50", "--slot", "fp", "--consumer", "fp", "--sink", PROJECT]
    rng = random.Random(8)
    sizes = []
    with Writers(dsn, writers=4, max_events=10, big=0.1, big_events=200, rollback=0.2, pause=0.05, seed=8) as writers:
        for round_ in range(20):
            before = (_jsonl_size(out), _projection_rows(dsn))
            procs = [cdc_run(dsn, *jsonl, log=log), cdc_run(dsn, *proj, log=log)]
            for i, p in enumerate(procs):
                if round_ % 2:
                    # Every other round kills a process that has delivered in this run: the start
                    # takes longer than the random delay on a slow machine, and rounds that only
                    # ever kill a starting process would test nothing else.
                    _wait_progress(lambda: (_jsonl_size(out), _projection_rows(dsn))[i] > before[i], p, log)
                    time.sleep(rng.uniform(0.0, 0.6))
                else:
                    time.sleep(rng.uniform(0.2, 1.2))
                p.send_signal(signal.SIGKILL)
            for p in procs:
                p.wait()
                assert p.returncode == -signal.SIGKILL, f"died on its own ({p.returncode}): {tail(log)}"
            sizes.append(len(read_jsonl(out, torn=[])))
            wait_slot_free(dsn, "fj")
            wait_slot_free(dsn, "fp")
    assert writers.stats["big_tx"] and writers.stats["rolled_back_tx"]
    assert sizes[-1] > sizes[0], "the consumer never delivered between kills"
    drain(dsn, *jsonl, log=log)
    drain(dsn, *proj, log=log)
    check_projection(dsn)
    torn: list[str] = []
    stats = check_delivery(dsn, read_jsonl(out, torn=torn))
    print("kill -9 x20:", stats, writers.stats)
    # The jsonl sink must never leave a partial record that a later run appends to.
    assert not torn, f"{len(torn)} torn records in the jsonl file, e.g. {torn[0]}"


# -- 2. server faults ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["terminate_walsender", "restart_fast", "restart_immediate"])
def test_server_fault_mid_stream_reconnects_and_loses_nothing(dsn, server, tmp_path, fault):
    if fault.startswith("restart") and server.cluster is None:
        pytest.skip("needs the embedded cluster to restart")
    out, log = tmp_path / "events.jsonl", tmp_path / "run.log"
    prime(dsn, "srv")
    proc = cdc_run(dsn, *FAST, "--consumer", "srv", "--sink", f"jsonl:{out}", log=log)
    try:
        # A run that meets a missing server while it is still starting fails at once, by design
        # (a wrong DSN must not be retried for minutes): the faults come once it streams.
        wait_log(log, "streaming from slot", proc, timeout=30)
        with Writers(dsn, writers=4, big=0.05, rollback=0.2, pause=0.02):
            for _ in range(2):
                time.sleep(1.5)
                if fault == "terminate_walsender":
                    assert terminate_walsender(dsn, default_slot("srv")) or True
                else:
                    restart(server.cluster, fault.removeprefix("restart_"))
            time.sleep(1.5)
        # After an immediate restart the sequence jumps ahead: compare with what committed.
        wait_delivered([out], committed_seqs(dsn), timeout=60)
    finally:
        assert _stop(proc) == 0, tail(log)
    stats = check_delivery(dsn, read_jsonl(out))
    assert stats["duplicates"] == 0, stats  # the consumer never crashed: it skips what it handled
    assert "reconnecting" in log.read_text(), tail(log)


@pytest.mark.parametrize("workers", ["1", "3"])
def test_server_down_for_seconds_mid_projection_is_waited_out_not_poison(dsn, conn, server, tmp_path, workers):
    # The handler is inside a transaction when the server goes down for longer than the sink's
    # retries (max attempts 2): a broken connection is an outage to wait out, not poison; the
    # stream is released so the shutdown does not wait for us; then everything, exactly once.
    if server.cluster is None:
        pytest.skip("needs the embedded cluster to stop and start")
    _projection_table(conn)
    log = tmp_path / "run.log"
    prime(dsn, "down", "down")
    args = [*FAST, "--consumer", "down", "--slot", "down", "--sink", PROJECT, "--max-attempts", "2",
            "--workers", workers]
    proc = cdc_run(dsn, *args, log=log, env={"CDC_FAULT_SLEEP": "0.3"})
    pg_ctl = [f"{server.cluster.bin_dir}/pg_ctl", "-D", server.cluster.data_dir, "-l", server.cluster.log_file]
    try:
        for stream in range(6):
            store.append(conn, f"down-{stream}", [store.NewEvent("E", {"i": i}) for i in range(3)],
                         expected_version=0)
        # The run has connected and committed its first transaction (a process still starting
        # would meet a missing server, which fails at once by design): the handler is in the next.
        wait_delivered_projection(dsn, 1, timeout=30)
        conn.close()
        started = time.monotonic()
        stopped = run_as_server_user(server.cluster, [*pg_ctl, "-m", "fast", "-w", "-t", "60", "stop"])
        assert stopped.returncode == 0, stopped.stderr
        assert time.monotonic() - started < 20, "the shutdown waited for the stuck consumer"
        time.sleep(4)  # longer than two attempts' backoff
        assert proc.poll() is None, f"cdc run exited {proc.returncode} during the outage: {tail(log)}"
        up = run_as_server_user(server.cluster, [*pg_ctl, "-w", "-t", "60", "start"])
        assert up.returncode == 0, up.stderr
        wait_delivered_projection(dsn, 18, timeout=60)
    finally:
        assert _stop(proc) == 0, tail(log)
    check_projection(dsn)
    text = log.read_text()
    assert "connection broke" in text and "giving up" not in text, tail(log, 20)


def test_server_restart_between_parts_of_a_huge_transaction_redelivers_it_from_its_start(dsn, conn, server,
                                                                                          tmp_path):
    # The projection holds one database transaction across the parts of a huge one; a restart
    # between parts takes the earlier parts with it. The transaction is delivered again from its
    # first part, in the same run, and the projection ends exact.
    if server.cluster is None:
        pytest.skip("needs the embedded cluster to restart")
    _projection_table(conn)
    log = tmp_path / "run.log"
    prime(dsn, "parts", "parts")
    args = [*FAST, "--consumer", "parts", "--slot", "parts", "--sink", PROJECT, "--chunk-events", "5"]
    proc = cdc_run(dsn, *args, log=log, env={"CDC_FAULT_SLEEP": "0.25"})
    try:
        # Connected first: a restart while the run is still starting would test nothing.
        wait_log(log, "streaming from slot parts", proc)
        store.append(conn, "huge", [store.NewEvent("E", {"i": i}) for i in range(60)], expected_version=0)
        time.sleep(1.2)  # a few of its 12 parts applied, uncommitted
        conn.close()
        restart(server.cluster, "fast")
        wait_delivered_projection(dsn, 60, timeout=90)
        assert proc.poll() is None, tail(log)
    finally:
        assert _stop(proc) == 0, tail(log, 20)
    check_projection(dsn)
    text = log.read_text()
    assert "resuming from the position saved with its effects" in text, tail(log, 20)


def wait_delivered_projection(dsn: str, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sql(dsn, "SELECT count(*) FROM fault_projection")[0][0] >= n:
                return
        except psycopg.OperationalError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the projection did not reach {n} rows within {timeout} s")


# -- 3. slot faults -------------------------------------------------------------------------------------

def test_slot_dropped_while_running_is_recreated_with_a_snapshot_hand_off(dsn, tmp_path):
    out, log = tmp_path / "events.jsonl", tmp_path / "run.log"
    prime(dsn, "drop")
    proc = cdc_run(dsn, *FAST, "--consumer", "drop", "--sink", f"jsonl:{out}", log=log)
    try:
        with Writers(dsn, writers=4, big=0.05, rollback=0.2, pause=0.02):
            time.sleep(1.5)
            drop_slot_while_running(dsn, default_slot("drop"))
            time.sleep(2.0)
        wait_delivered([out], committed_seqs(dsn), timeout=60)
    finally:
        assert _stop(proc) == 0, tail(log)
    check_delivery(dsn, read_jsonl(out))
    text = log.read_text()
    assert "slot does not exist" in text and "hand-off" in text, tail(log)


def test_invalidated_slot_is_detected_and_replayed_through_the_hand_off(tmp_path):
    """A consumer paused in its handler while max_slot_wal_keep_size is exceeded: the server
    invalidates the slot (wal_status 'lost'); once released, the consumer recreates it and
    replays, under its snapshot, what it had not handled."""
    settings = {"max_slot_wal_keep_size": "'1MB'", "wal_keep_size": "0", "checkpoint_timeout": "'1h'"}
    with embedded_cluster(settings=settings, fast=True) as cluster:
        dsn = cluster.dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            store.setup(conn)
            conn.execute("CREATE TABLE filler (pad text)")
        prime(dsn, "inv")
        paused, entered = threading.Event(), threading.Event()
        release = threading.Event()

        def handler(tx):
            if paused.is_set() and not release.is_set():
                entered.set()
                release.wait(60)

        col = Collector(Consumer(dsn, consumer="inv", backoff_max=0.5, checkpoint_interval=0.1), on_tx=handler)
        write_concurrently(dsn, writers=2, seconds=1, rollback=0.2, hold=0)
        col.wait_for(committed_seqs(dsn))
        paused.set()
        with psycopg.connect(dsn, autocommit=True) as conn:
            # A few small transactions: enough to pause the handler, too few to fill the socket.
            # (A walsender blocked writing to a client that does not read cannot act on the
            # SIGTERM that invalidation sends it, and CHECKPOINT waits for it to let go.)
            for v in range(1, 6):
                conn.execute("INSERT INTO cdc.events (stream_id, version, type) VALUES ('paused', %s, 'E')", (v,))
            assert entered.wait(10)
            for _ in range(20):
                conn.execute("INSERT INTO filler SELECT repeat(md5(g::text), 32) FROM generate_series(1, 20000) g")
                conn.execute("SELECT pg_switch_wal()")
                conn.execute("CHECKPOINT")
                if slot_row(dsn, default_slot("inv"))[2] == "lost":
                    break
            assert slot_row(dsn, default_slot("inv"))[2] == "lost"
        release.set()
        write_concurrently(dsn, writers=2, seconds=1, rollback=0.2, hold=0, seed=3)
        col.wait_for(committed_seqs(dsn), timeout=60)
        col.stop()
        committed = committed_seqs(dsn)
        assert set(col.seqs) == committed
        # Replays are whole transactions from the poll path, never invented events.
        assert {tx.source for tx in col.transactions} >= {"stream", "poll"}
        assert slot_row(dsn, default_slot("inv"))[2] != "lost"


# -- 4. contention --------------------------------------------------------------------------------------

def test_standby_takes_over_within_10_s_after_kill_9_and_never_two_are_active(dsn, tmp_path):
    prime(dsn, "hot")
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    args = [*FAST, "--consumer", "hot", "--standby"]
    streaming_max = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal streaming_max
        with psycopg.connect(dsn, autocommit=True) as c:
            while not sampling.is_set():
                n = c.execute("SELECT count(*) FROM pg_stat_replication WHERE state IN ('streaming', 'catchup')").fetchone()[0]
                streaming_max = max(streaming_max, n)
                time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with Writers(dsn, writers=4, rollback=0.2, pause=0.02):
        a = cdc_run(dsn, *args, "--sink", f"jsonl:{outs[0]}", log=logs[0])
        deadline = time.monotonic() + 15
        while (slot_row(dsn, default_slot("hot")) or (None,))[0] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        b = cdc_run(dsn, *args, "--sink", f"jsonl:{outs[1]}", log=logs[1])
        deadline = time.monotonic() + 15
        while "standing by" not in logs[1].read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "standing by" in logs[1].read_text(), tail(logs[1])
        time.sleep(1.0)
        a.send_signal(signal.SIGKILL)
        a.wait()
        killed = time.monotonic()
        while "taking over" not in logs[1].read_text() and time.monotonic() - killed < 15:
            time.sleep(0.05)
        took = time.monotonic() - killed
        assert "taking over" in logs[1].read_text(), tail(logs[1])
        assert took < 10, f"standby took {took:.1f} s"
        time.sleep(1.0)
    try:
        wait_delivered(outs, committed_seqs(dsn), timeout=60)
    finally:
        sampling.set()
        sampler.join()
        assert _stop(b) == 0, tail(logs[1])
    check_delivery(dsn, read_jsonl(*outs))
    assert streaming_max == 1, "two consumers streamed at once"
    print(f"standby took over {took:.1f} s after kill -9")


@pytest.mark.parametrize("kill_after", [0.5, 2.0, 5.0, 8.0])
def test_a_standby_takes_over_from_the_checkpoint_as_it_is_at_takeover(dsn, tmp_path, kill_after):
    """Killed while the standby still waits for the slot's release (or once it stands by), the
    active instance's acknowledged transactions are never delivered again by the standby, and
    nothing is lost; the standby says from its first second which process it waits for."""
    consumer = f"tk{int(kill_after * 10)}"
    prime(dsn, consumer)
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    args = [*FAST, "--consumer", consumer, "--standby"]
    slot = default_slot(consumer)
    with Writers(dsn, writers=4, rollback=0.2, pause=0.02):
        a = cdc_run(dsn, *args, "--sink", f"jsonl:{outs[0]}", log=logs[0])
        _wait_progress(lambda: _jsonl_size(outs[0]) > 0 and (slot_row(dsn, slot) or (None,))[0] is not None,
                       a, logs[0])
        b = cdc_run(dsn, *args, "--sink", f"jsonl:{outs[1]}", log=logs[1])
        started = time.monotonic()
        try:
            if kill_after >= 2:  # a loaded machine can take longer than that to start the standby
                wait_log(logs[1], f"slot {slot} is held by pid", b, timeout=30)
            time.sleep(max(0.0, kill_after - (time.monotonic() - started)))
            assert a.poll() is None, tail(logs[0])
            a.send_signal(signal.SIGKILL)
            a.wait()
            # What the killed instance had acknowledged: its checkpoint once it is dead.
            seq, above = sql(dsn, "SELECT seq, seqs_above FROM cdc.checkpoints WHERE consumer = %s", (consumer,))[0]
            acknowledged = {r["seq"] for r in read_jsonl(outs[0], torn=[]) if r["seq"] <= seq or r["seq"] in above}
            wait_log(logs[1], "streaming from slot", b, timeout=30)
            time.sleep(0.5)
        except BaseException:
            if b.poll() is None:
                b.kill()
            raise
    try:
        wait_delivered(outs, committed_seqs(dsn), timeout=60)
    finally:
        assert _stop(b) == 0, tail(logs[1])
    again = acknowledged & {r["seq"] for r in read_jsonl(outs[1])}
    assert not again, f"{len(again)} acknowledged events delivered again by the standby, first {sorted(again)[:5]}"
    check_delivery(dsn, read_jsonl(outs[0], torn=[]) + read_jsonl(outs[1]))
    if kill_after >= 2:  # the standby is up and has found the slot held
        text = logs[1].read_text()
        assert f"slot {slot} is held by pid" in text, tail(logs[1])
    print(f"killed {kill_after} s after the standby started ({time.monotonic() - started:.1f} s in all); "
          f"{len(acknowledged)} acknowledged events, none delivered again")


def test_two_standbys_started_together_on_a_fresh_database_agree_on_one_active(dsn, tmp_path):
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [cdc_run(dsn, *FAST, "--standby", "--sink", "null", log=log) for log in logs]
    try:
        time.sleep(4)
        assert all(p.poll() is None for p in procs), [tail(log) for log in logs]
    finally:
        for p in procs:
            if p.poll() is None:
                _stop(p)


# -- 5. sequence holes --------------------------------------------------------------------------------

def test_held_and_idle_in_transaction_sequences_past_the_stale_threshold_poll_and_stream_exact(dsn):
    prime(dsn, "holes-stream")
    stream = Collector(Consumer(dsn, consumer="holes-stream", mode="stream"))
    poll = Collector(Consumer(dsn, consumer="holes-poll", mode="poll", stale_after=3.0))
    idle_commit = psycopg.connect(dsn)  # idle in transaction, holding seqs past the threshold
    idle_rollback = psycopg.connect(dsn)
    try:
        idle_commit.execute("INSERT INTO cdc.events (stream_id, version, type) VALUES ('idle-c', 1, 'E')")
        idle_rollback.execute("INSERT INTO cdc.events (stream_id, version, type) VALUES ('idle-r', 1, 'E')")
        stats = write_concurrently(dsn, writers=4, seconds=4, max_events=10, rollback=0.3, hold=0.05,
                                   hold_seconds=(3.5, 4.5))
        time.sleep(0.5)
        idle_commit.commit()
        idle_rollback.rollback()
    finally:
        idle_commit.close()
        idle_rollback.close()
    assert stats["held_tx"] and stats["rolled_back_tx"]
    committed = committed_seqs(dsn)
    stream.wait_for(committed, timeout=60)
    poll.wait_for(committed, timeout=60)
    time.sleep(0.5)
    stream.stop()
    poll.stop()
    for col in (stream, poll):
        assert len(col.seqs) == len(set(col.seqs)), "delivered twice"
        assert set(col.seqs) == committed


# -- 6. slow consumer -----------------------------------------------------------------------------------

def test_handler_slower_than_wal_sender_timeout_keeps_the_connection(dsn, conn):
    slow_dsn = psycopg.conninfo.make_conninfo(dsn, options="-c wal_sender_timeout=2s")
    prime(dsn, "slow")
    before = metrics.RECONNECTS._value.get()
    slept = []

    def handler(tx):
        if not slept:
            slept.append(tx)
            time.sleep(5)

    col = Collector(Consumer(slow_dsn, consumer="slow", reconnect=True, backoff_max=0.5), on_tx=handler)
    conn.execute("INSERT INTO cdc.events (stream_id, version, type) VALUES ('s', 1, 'E')")
    time.sleep(0.5)
    walsender = slot_row(dsn, default_slot("slow"))[0]
    assert walsender is not None
    for v in range(2, 6):
        conn.execute("INSERT INTO cdc.events (stream_id, version, type) VALUES ('s', %s, 'E')", (v,))
        time.sleep(0.3)
    col.wait_for(committed_seqs(dsn), timeout=30)
    assert slot_row(dsn, default_slot("slow"))[0] == walsender, "the walsender was replaced: the connection dropped"
    col.stop()
    assert metrics.RECONNECTS._value.get() == before
    assert col.seqs == sorted(committed_seqs(dsn))


# -- 7. size ----------------------------------------------------------------------------------------------

def test_fifty_megabyte_event_is_delivered_in_bounded_memory(dsn, conn, tmp_path):
    prime(dsn, "big")
    conn.execute("INSERT INTO cdc.events (stream_id, version, type, data) "
                 "VALUES ('big', 1, 'E', jsonb_build_object('blob', repeat('abcdefghij', 5000000)))")
    out, log = tmp_path / "big.jsonl", tmp_path / "run.log"
    proc = cdc_run(dsn, "--mode", "stream", "--consumer", "big", "--sink", f"jsonl:{out}",
                   "--endpos", current_lsn(dsn), log=log)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, tail(log)
    (record,) = read_jsonl(out)
    assert len(record["data"]["blob"]) == 50_000_000
    rss_mb = usage.ru_maxrss // 1024
    print(f"50 MB event: peak RSS {rss_mb} MB")
    assert rss_mb < 500, f"peak RSS {rss_mb} MB"


# -- 8. bad input -------------------------------------------------------------------------------------------

def _lsn(text: str) -> int:
    hi, _, lo = text.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


@pytest.mark.parametrize("change", ["add_column", "truncate"])
def test_unknown_column_or_truncate_stops_with_one_line_and_the_slot_is_not_advanced(dsn, conn, change):
    prime(dsn, "bad")
    conn.execute("INSERT INTO cdc.events (stream_id, version, type) VALUES ('ok', 1, 'E')")
    if change == "add_column":
        conn.execute("ALTER TABLE cdc.events ADD COLUMN tenant text")
    # The ALTER's own (empty) transaction may be acknowledged; the change after it may not.
    before = current_lsn(dsn)
    if change == "add_column":
        conn.execute("INSERT INTO cdc.events (stream_id, version, type, tenant) VALUES ('t', 1, 'E', 'acme')")
    else:
        conn.execute("TRUNCATE cdc.events")
    conn.execute("INSERT INTO cdc.events (stream_id, version, type) VALUES ('after', 1, 'E')")
    out = run_to_exit(dsn, "--mode", "stream", "--consumer", "bad", "--sink", "null", "--checkpoint-interval", "0.01")
    assert out.returncode != 0
    line = one_line_error(out.stderr)
    assert ("tenant" in line) if change == "add_column" else ("TRUNCATE" in line), line
    flushed = slot_row(dsn, default_slot("bad"))[1]
    assert _lsn(flushed) <= _lsn(before), f"slot advanced to {flushed}, past the bad transaction at {before}"
    saved = sql(dsn, "SELECT lsn::text FROM cdc.checkpoints WHERE consumer = 'bad'")[0][0]
    assert _lsn(saved) <= _lsn(before)
    # And it keeps refusing: a restart stops at the same place.
    again = run_to_exit(dsn, "--mode", "stream", "--consumer", "bad", "--sink", "null")
    assert again.returncode != 0
    assert (("tenant" in one_line_error(again.stderr)) if change == "add_column"
            else ("TRUNCATE" in one_line_error(again.stderr)))
    assert _lsn(slot_row(dsn, default_slot("bad"))[1]) <= _lsn(before)


@pytest.mark.parametrize("args, named", [
    (["--poll-interval", "-1"], "poll_interval"),
    (["--slot", "Bad Name"], "slot"),
    (["--endpos", "not-an-lsn"], "endpos"),
    (["--checkpoint-interval", "0"], "checkpoint_interval"),
    (["--config", "{toml}"], "frobnicate"),
])
def test_invalid_settings_exit_2_with_one_line(dsn, tmp_path, args, named):
    toml = tmp_path / "cdc.toml"
    toml.write_text('sink = "null"\nfrobnicate = 1\n')
    out = run_to_exit(dsn, *[a.format(toml=toml) for a in args])
    assert out.returncode == 2, out.stderr
    assert named in one_line_error(out.stderr)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("bad_dsn", ["host=localhost port=", "this is not a dsn", "postgresql://u@127.0.0.1:{port}/x"])
def test_wrong_dsn_or_unreachable_host_is_one_line_without_traceback(bad_dsn):
    out = run_to_exit(bad_dsn.format(port=_free_port()), "--mode", "stream", timeout=30)
    assert out.returncode not in (0, None)
    one_line_error(out.stderr)


def test_failing_sink_is_not_acknowledged(dsn, conn, tmp_path):
    """A sink that gives up (--max-attempts) stops the run with nothing acknowledged: the
    transaction comes again once the sink is fixed."""
    _projection_table(conn)
    prime(dsn, "poison")
    before = current_lsn(dsn)
    conn.execute("INSERT INTO cdc.events (stream_id, version, type) VALUES ('p', 1, 'E')")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CDC_FAULT_FAIL": "1"}
    out = subprocess.run([sys.executable, "-m", "cdc", "run", "--dsn", dsn, "--mode", "stream", "--consumer", "poison",
                          "--sink", PROJECT, "--max-attempts", "1"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env=env)
    assert out.returncode == 1
    assert "giving up" in one_line_error(out.stderr)
    assert _lsn(slot_row(dsn, default_slot("poison"))[1]) <= _lsn(before), "the slot was acknowledged past the failed transaction"
    assert _lsn(sql(dsn, "SELECT lsn::text FROM cdc.checkpoints WHERE consumer = 'poison'")[0][0]) <= _lsn(before)
    log = tmp_path / "run.log"
    drain(dsn, "--mode", "stream", "--consumer", "poison", "--sink", PROJECT, log=log)
    check_projection(dsn)


def test_transaction_of_exactly_n_chunks_is_committed_by_the_projection(dsn, conn, tmp_path):
    """A transaction of 100 events with --chunk-events 50 ends with an empty final part: the
    projection must see it and commit, before the position moves past the transaction."""
    _projection_table(conn)
    prime(dsn, "chunks")
    log = tmp_path / "run.log"
    args = [*FAST, "--consumer", "chunks", "--chunk-events", "50", "--status-interval", "0.1", "--sink", PROJECT]
    # The handler kills the process when it starts on its 3rd call: the next transaction.
    proc = cdc_run(dsn, *args, log=log, env={"CDC_FAULT_KILL_AT": "3"})
    time.sleep(1.5)
    conn.execute("INSERT INTO cdc.events (stream_id, version, type) SELECT 'x', g, 'E' FROM generate_series(1, 100) g")
    time.sleep(1.5)
    conn.execute("INSERT INTO cdc.events (stream_id, version, type) VALUES ('y', 1, 'E')")
    assert proc.wait(30) == -signal.SIGKILL, tail(log)
    wait_slot_free(dsn, default_slot("chunks"))
    drain(dsn, *args, log=log)
    check_projection(dsn)


def test_cdc_run_waits_for_a_server_not_accepting_connections_yet_and_gives_up_with_one_line(tmp_path):
    # A standby with hot_standby off answers every connection "the database system is not
    # accepting connections", as a server starting, stopping or restarting does: cdc run waits
    # (logging each attempt) up to --startup-wait, stops at once on SIGTERM, and then fails with
    # one line. An unreachable host still fails at once (test above).
    with embedded_cluster(fast=True) as cluster:
        pg_ctl = [f"{cluster.bin_dir}/pg_ctl", "-D", cluster.data_dir, "-l", cluster.log_file]
        assert run_as_server_user(cluster, [*pg_ctl, "-m", "fast", "-w", "stop"]).returncode == 0
        run_as_server_user(cluster, ["sh", "-c", f"touch {cluster.data_dir}/standby.signal && "
                                                 f"echo 'hot_standby = off' >> {cluster.data_dir}/postgresql.conf"])
        up = run_as_server_user(cluster, [*pg_ctl, "-w", "-t", "30", "start"])
        assert up.returncode == 0, up.stderr
        log = tmp_path / "run.log"
        proc = cdc_run(cluster.dsn, "--mode", "stream", "--startup-wait", "60", log=log)
        deadline = time.monotonic() + 20
        while "not accepting connections yet" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, tail(log)
            time.sleep(0.2)
        assert "retrying" in log.read_text(), tail(log)
        t0 = time.monotonic()
        assert _stop(proc) == 0, tail(log)
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "cdc", "run", "--dsn", cluster.dsn, "--mode", "stream",
                              "--startup-wait", "2"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 1 and time.monotonic() - t0 >= 2, out.stderr
        assert "not accepting connections" in out.stderr.strip().splitlines()[-1]
        assert "Traceback" not in out.stderr
