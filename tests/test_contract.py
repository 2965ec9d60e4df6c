"""One contract, every decoder: the stream's guarantees asserted once, run for each plugin.

`StreamContract` holds the assertions; each concrete class names a plugin (as the eventsourcing
library tests its recorders). wal2json runs where the server has it (PostgreSQL 15 here);
pgoutput everywhere, and `scripts/test` runs this file again on PostgreSQL 18 (CDC_PG_VERSION=18).
A guarantee that held for one decoder and silently not for the other fails here.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from decimal import Decimal
from pathlib import Path

import orjson
import psycopg
import pytest

from cdc import Consumer, Lsn, store
from cdc.checkpoint import default_slot
from cdc.embedded import restart
from cdc.errors import ConfigError, PublicationError, UnsupportedChangeError
from cdc.events import wire_records

from .faults import (
    Writers,
    cdc_run,
    check_delivery,
    check_projection,
    committed_by_xid,
    read_jsonl,
    sql,
    tail,
    wait_delivered,
    wait_log,
)
from .support import Collector, committed_seqs

FAST = ["--mode", "stream", "--checkpoint-interval", "0.1", "--heartbeat-interval", "0"]

# Values users store, as PostgreSQL holds them: exact numbers past every float and int64, deep
# nesting, every escape, astral characters, empty keys.
PAYLOADS = [
    '{"amount": 123456789012345678901234567890.123456789, "big": 1e400, "tiny": 0.1e-999}',
    '{"id": -237462374673276894279832749832423479823246327846, "e": 1E22, "z": -0.0}',
    '{"": "", "esc": "\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u0001 \\u001f", "astral": "\U0001f600 \\ud834\\udd1e"}',
    "[" * 300 + "]" * 300,
    '{"k": [' + ", ".join(f'{{"n{i}": {i}}}' for i in range(500)) + "]}",
]


def _server_has(dsn: str, plugin: str) -> bool:
    """Whether the server can decode with `plugin` (pgoutput: always; wal2json: if installed
    and allowed), by making a temporary slot with it."""
    if plugin == "pgoutput":
        return True
    if plugin not in _HAS:  # once per session: the server does not change under the suite
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_create_logical_replication_slot('cdc_probe_' || pg_backend_pid(), %s, true)",
                             (plugin,))
            _HAS[plugin] = True
        except psycopg.Error:
            _HAS[plugin] = False
    return _HAS[plugin]


_HAS: dict[str, bool] = {}


def _append(conn: psycopg.Connection, stream: str, n: int) -> None:
    store.append(conn, stream, [store.NewEvent("E", {"i": i}) for i in range(n)], expected_version=0)


def _lines(txs) -> list[bytes]:
    return [orjson.dumps(r) for tx in txs for r in wire_records(tx)]


class StreamContract:
    """The stream's guarantees. Subclasses set `plugin`."""

    plugin: str

    @pytest.fixture
    def pdsn(self, dsn: str) -> str:
        if not _server_has(dsn, self.plugin):
            pytest.skip(f"the server has no {self.plugin}")
        return dsn

    def consumer(self, dsn: str, name: str, **kw) -> Consumer:
        return Consumer(dsn, consumer=name, plugin=self.plugin, **kw)  # type: ignore[arg-type]

    def prime(self, dsn: str, name: str) -> None:
        with self.consumer(dsn, name, endpos="now") as feed:
            assert list(feed) == []

    def run(self, dsn: str, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return cdc_run(dsn, *FAST, "--plugin", self.plugin, *args, log=log, env=env)

    # -- ordering ---------------------------------------------------------------------------------

    def test_concurrent_writers_committed_only_in_commit_order_each_once(self, pdsn):
        self.prime(pdsn, "order")
        feed = Collector(self.consumer(pdsn, "order", chunk_events=100))
        with Writers(pdsn, writers=4, big=0.05, big_events=350, rollback=0.25, hold=0.1,
                     hold_seconds=(0.2, 0.8), pause=0.005):
            time.sleep(4)
        committed = committed_by_xid(pdsn)
        feed.wait_for({s for seqs in committed.values() for s in seqs}, timeout=60)
        feed.stop()
        assert committed and len(feed.seqs) == len(set(feed.seqs)), "an event delivered twice"
        # Whole transactions (their parts in order), in commit order, only committed ones.
        got: dict[int, list[int]] = {}
        order: list[Lsn] = []
        for tx in feed.transactions:
            assert tx.source == "stream"
            got.setdefault(tx.xid & 0xFFFFFFFF, []).extend(e.seq for e in tx.events)
            if tx.part == 0:
                order.append(tx.commit_lsn)
            assert tx.commit_lsn < tx.end_lsn
        assert order == sorted(order), "transactions out of commit order"
        assert got == committed

    # -- acknowledgement and restart --------------------------------------------------------------

    def test_restart_resumes_after_what_was_acknowledged(self, pdsn, conn):
        self.prime(pdsn, "ack")
        for i in range(5):
            _append(conn, f"a{i}", 3)
        with self.consumer(pdsn, "ack", endpos="now") as feed:
            first = [e.seq for tx in feed for e in tx.events]
        for i in range(5, 8):
            _append(conn, f"a{i}", 3)
        with self.consumer(pdsn, "ack", endpos="now") as feed:
            second = [e.seq for tx in feed for e in tx.events]
        assert first == list(range(1, 16)) and second == list(range(16, 25))
        # The slot itself is acknowledged to the end of the last transaction handled.
        flush = Lsn.parse(sql(pdsn, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                                    "WHERE slot_name = %s", (default_slot("ack"),))[0][0])
        last_commit = Lsn.parse(sql(pdsn, "SELECT lsn::text FROM cdc.checkpoints WHERE consumer = 'ack'")[0][0])
        assert flush >= last_commit > 0

    def test_unacknowledged_transaction_is_delivered_again(self, pdsn, conn):
        self.prime(pdsn, "unacked")
        _append(conn, "u1", 2)
        _append(conn, "u2", 2)
        with self.consumer(pdsn, "unacked", auto_ack=False, endpos="now") as feed:
            txs = list(feed)
            feed.ack(txs[0])  # the second one is never acknowledged
        with self.consumer(pdsn, "unacked", endpos="now") as feed:
            again = [e.seq for tx in feed for e in tx.events]
        assert [e.seq for e in txs[1].events] == again == [3, 4]

    def test_aborted_transactions_and_rolled_back_savepoints_are_never_handed_over(self, pdsn, conn):
        self.prime(pdsn, "abort")
        try:
            with conn.transaction():  # a huge one, decoded by the server (spilled to disk), then aborted
                conn.execute("INSERT INTO cdc.events (stream_id, version, type, data) "
                             "SELECT 'gone', g, 'E', '{}' FROM generate_series(1, 20000) g")
                raise RuntimeError("abort")
        except RuntimeError:
            pass
        with conn.transaction():
            conn.execute("INSERT INTO cdc.events (stream_id, version, type, data) VALUES ('kept', 1, 'E', '{}')")
            try:
                with conn.transaction():  # a savepoint, rolled back inside a committed transaction
                    conn.execute("INSERT INTO cdc.events (stream_id, version, type, data) VALUES ('sp', 1, 'E', '{}')")
                    raise RuntimeError("rollback to savepoint")
            except RuntimeError:
                pass
            conn.execute("INSERT INTO cdc.events (stream_id, version, type, data) VALUES ('kept', 2, 'E', '{}')")
        with self.consumer(pdsn, "abort", endpos="now") as feed:
            got = [(e.stream_id, e.version) for tx in feed for e in tx.events]
        assert got == [("kept", 1), ("kept", 2)]

    # -- huge transactions ------------------------------------------------------------------------

    def test_huge_transaction_in_parts_acknowledged_only_at_its_end(self, pdsn, conn):
        self.prime(pdsn, "huge")
        conn.execute("INSERT INTO cdc.events (stream_id, version, type, data) "
                     "SELECT 'h', g, 'E', jsonb_build_object('g', g) FROM generate_series(1, 5500) g")
        _append(conn, "after", 1)
        with self.consumer(pdsn, "huge", auto_ack=False, chunk_events=1000, endpos="now") as feed:
            parts = []
            for tx in feed:
                parts.append(tx)
                if len(parts) == 3:
                    break  # killed mid-transaction: nothing acknowledged
        assert [(p.part, p.final, len(p.events)) for p in parts] == [(0, False, 1000), (1, False, 1000), (2, False, 1000)]
        assert len({(p.xid, p.commit_lsn) for p in parts}) == 1
        with self.consumer(pdsn, "huge", chunk_events=1000, endpos="now") as feed:
            txs = list(feed)
        assert [(p.part, p.final, len(p.events)) for p in txs[:6]] == [
            (0, False, 1000), (1, False, 1000), (2, False, 1000), (3, False, 1000), (4, False, 1000), (5, True, 500)]
        assert [e.seq for tx in txs for e in tx.events] == list(range(1, 5502))
        final = txs[5]
        assert all(p.commit_lsn == final.commit_lsn and p.end_lsn <= final.end_lsn for p in txs[:5])

    # -- faults -----------------------------------------------------------------------------------

    def test_killed_mid_stream_then_restarted_loses_nothing(self, pdsn, tmp_path):
        self.prime(pdsn, "kill")
        out, log = tmp_path / "events.jsonl", tmp_path / "run.log"
        with Writers(pdsn, writers=3, big=0.05, big_events=400, rollback=0.2, pause=0.01):
            for _ in range(3):
                proc = self.run(pdsn, "--consumer", "kill", "--sink", f"jsonl:{out}", "--chunk-events", "100", log=log)
                time.sleep(1.5)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            proc = self.run(pdsn, "--consumer", "kill", "--sink", f"jsonl:{out}", "--chunk-events", "100", log=log)
            time.sleep(1)
        try:
            wait_delivered([out], committed_seqs(pdsn), timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, tail(log)
        torn: list[str] = []
        check_delivery(pdsn, read_jsonl(out, torn=torn))  # lost: none; again: whole transactions only

    @pytest.mark.parametrize("workers", ["1", "3"])
    def test_projection_is_exact_through_kills_inside_huge_transactions(self, pdsn, conn, tmp_path, workers):
        # Parts of one transaction are one database transaction in the projection; a kill
        # between them rolls them back, and the transaction comes again from its first part.
        conn.execute("CREATE TABLE fault_projection (seq bigint NOT NULL, xid bigint)")
        self.prime(pdsn, "proj")
        log = tmp_path / "run.log"
        args = ["--consumer", "proj", "--sink", "python:tests.fault_projection:project", "--chunk-events", "100",
                "--workers", workers]
        with Writers(pdsn, writers=3, big=0.15, big_events=450, rollback=0.2, pause=0.01):
            for _ in range(2):
                proc = self.run(pdsn, *args, log=log)
                time.sleep(1.8)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        proc = self.run(pdsn, *args, "--endpos", "now", log=log)
        assert proc.wait(120) == 0, tail(log)
        check_projection(pdsn)
        assert sql(pdsn, "SELECT count(DISTINCT xid) FROM fault_projection")[0][0] > 10

    @pytest.mark.parametrize("workers", ["1", "3"])
    def test_a_checkpoint_inside_a_huge_transaction_claims_none_of_its_events(self, pdsn, conn, tmp_path, workers):
        """Checkpoints are saved while a huge transaction's parts are handled (every 0.1 s here);
        its events are durable only with its final part, so no checkpoint may count them as
        handled. One that did, killed then, made the restarted partitions skip those events
        (they skip what the consumer's seq mark covers): the projection lacked whole parts."""
        conn.execute("CREATE TABLE fault_projection (seq bigint NOT NULL, xid bigint)")
        self.prime(pdsn, "midtx")
        conn.execute("INSERT INTO cdc.events (stream_id, version, type, data) "
                     "SELECT 'huge-' || (g % 7), g, 'E', '{}' FROM generate_series(1, 3000) g")
        log = tmp_path / "run.log"
        args = ["--consumer", "midtx", "--sink", "python:tests.fault_projection:project", "--chunk-events", "100",
                "--workers", workers]
        # Slow slices, and a kill -9 in the middle of the transaction's 30 parts.
        proc = self.run(pdsn, *args, log=log, env={"CDC_FAULT_SLEEP": "0.02",
                                                     "CDC_FAULT_KILL_AT": "15" if workers == "1" else "45"})
        assert proc.wait(60) == -signal.SIGKILL, tail(log)
        assert sql(pdsn, "SELECT count(*) FROM fault_projection")[0][0] == 0  # one transaction: all or nothing
        saved = sql(pdsn, "SELECT seq FROM cdc.checkpoints WHERE consumer = 'midtx'")
        assert not saved or saved[0][0] == 0, f"a checkpoint counts events of an unfinished transaction: {saved}"
        proc = self.run(pdsn, *args, "--endpos", "now", log=log)
        assert proc.wait(120) == 0, tail(log)
        check_projection(pdsn)

    def test_server_restart_mid_stream_reconnects_and_loses_nothing(self, pdsn, server, tmp_path):
        if server.cluster is None:
            pytest.skip("needs the embedded cluster to restart")
        self.prime(pdsn, "restart")
        out, log = tmp_path / "events.jsonl", tmp_path / "run.log"
        proc = self.run(pdsn, "--consumer", "restart", "--sink", f"jsonl:{out}", log=log)
        try:
            wait_log(log, "streaming from slot", proc, timeout=30)
            with Writers(pdsn, writers=3, rollback=0.2, pause=0.02):
                time.sleep(1.5)
                restart(server.cluster, "immediate")
                time.sleep(1.5)
            wait_delivered([out], committed_seqs(pdsn), timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, tail(log)
        stats = check_delivery(pdsn, read_jsonl(out))
        assert stats["duplicates"] == 0, stats
        assert "reconnecting" in log.read_text()

    # -- hand-off ---------------------------------------------------------------------------------

    def test_new_consumer_hands_over_from_replay_to_stream_under_writers(self, pdsn, conn):
        for i in range(40):
            _append(conn, f"old{i}", 5)
        feed = Collector(self.consumer(pdsn, "handoff"))
        with Writers(pdsn, writers=3, rollback=0.2, hold=0.1, hold_seconds=(0.2, 0.6), pause=0.01):
            time.sleep(3)
        feed.wait_for(committed_seqs(pdsn), timeout=60)
        feed.stop()
        assert sorted(feed.seqs) == sorted(committed_seqs(pdsn)) and len(feed.seqs) == len(set(feed.seqs))
        sources = [tx.source for tx in feed.transactions if tx.events]
        assert sources[0] == "poll" and sources[-1] == "stream" and sources == sorted(sources, key=lambda s: s == "stream")

    def test_dropped_slot_is_recreated_and_nothing_is_missed(self, pdsn, conn):
        self.prime(pdsn, "dropped")
        _append(conn, "d1", 3)
        with self.consumer(pdsn, "dropped", endpos="now") as feed:
            assert [e.seq for tx in feed for e in tx.events] == [1, 2, 3]
        conn.execute("SELECT pg_drop_replication_slot(%s)", (default_slot("dropped"),))
        _append(conn, "d2", 3)  # written while there is no slot
        with self.consumer(pdsn, "dropped", endpos="now") as feed:
            got = [(e.seq, tx.source) for tx in feed for e in tx.events]
        assert got == [(4, "poll"), (5, "poll"), (6, "poll")]
        _append(conn, "d3", 1)
        with self.consumer(pdsn, "dropped", endpos="now") as feed:
            assert [(e.seq, tx.source) for tx in feed for e in tx.events] == [(7, "stream")]

    # -- payloads ---------------------------------------------------------------------------------

    def test_payloads_arrive_exactly_as_postgres_holds_them_and_as_the_poll_path_writes_them(self, pdsn, conn):
        self.prime(pdsn, "exact")
        for i, text in enumerate(PAYLOADS):
            conn.execute("INSERT INTO cdc.events (stream_id, version, type, data, metadata) "
                         "VALUES (%s, 1, 'E', %s::jsonb, %s::jsonb)", (f"x{i}", text, text))
        conn.execute("INSERT INTO cdc.events (stream_id, version, type, data) "
                     "VALUES ('big', 1, 'E', jsonb_build_object('blob', repeat('x\u00e9\"', 700000)))")
        with self.consumer(pdsn, "exact", endpos="now") as feed:
            streamed = [tx for tx in feed]
        held = dict(sql(pdsn, "SELECT seq, data::text FROM cdc.events"))
        events = [e for tx in streamed for e in tx.events]
        assert len(events) == len(PAYLOADS) + 1
        for e in events:
            assert e.data_json == e.metadata_json == held[e.seq] or e.stream_id == "big"
            assert e.data_json == held[e.seq]
        # Any exact parser reading a line gets the value PostgreSQL holds.
        for line in _lines(streamed)[: len(PAYLOADS)]:
            record = json.loads(line, parse_float=Decimal)
            assert record["data"] == record["metadata"] == json.loads(held[record["seq"]], parse_float=Decimal)
        # The poll path writes the very same bytes, but for where they came from.
        with self.consumer(pdsn, "exact-poll", mode="poll", endpos="now") as feed:
            polled = [tx for tx in feed]
        def head(line: bytes) -> bytes:  # up to the keys only the stream knows (xid, commit_lsn, source)
            return line[:line.rindex(b',"xid":')]

        assert [head(line) for line in _lines(streamed)] == [head(line) for line in _lines(polled)]

    # -- what breaks the contract stops the feed -------------------------------------------------

    def test_truncate_stops_the_feed_with_one_line_and_is_not_acknowledged(self, pdsn, conn):
        self.prime(pdsn, "trunc")
        _append(conn, "t1", 2)
        conn.execute("TRUNCATE cdc.events")
        with pytest.raises(UnsupportedChangeError, match="TRUNCATE of cdc.events"):
            with self.consumer(pdsn, "trunc", endpos="now") as feed:
                for _ in feed:
                    pass
        # The events before it were handled and acknowledged; the truncate itself never is.
        with pytest.raises(UnsupportedChangeError, match="TRUNCATE"):
            with self.consumer(pdsn, "trunc", endpos="now") as feed:
                assert [e.seq for tx in feed for e in tx.events] == []

    def test_altered_table_stops_the_feed_with_one_line(self, pdsn, conn):
        self.prime(pdsn, "alter")
        _append(conn, "b1", 1)
        conn.execute("ALTER TABLE cdc.events ADD COLUMN tenant text")
        conn.execute("INSERT INTO cdc.events (stream_id, version, type, data, tenant) VALUES ('b2', 1, 'E', '{}', 't')")
        seen = []
        with pytest.raises(UnsupportedChangeError, match=r"cdc.events has columns cdc does not know \(tenant\)"):
            with self.consumer(pdsn, "alter", endpos="now") as feed:
                for tx in feed:
                    seen.extend(e.seq for e in tx.events)
        assert seen == [1]

    def test_a_slot_made_by_the_other_plugin_is_refused_in_one_line(self, pdsn):
        other = "wal2json" if self.plugin == "pgoutput" else "pgoutput"
        if not _server_has(pdsn, other):
            pytest.skip(f"the server has no {other}")
        with Consumer(pdsn, consumer="mixed", plugin=other, endpos="now") as feed:  # type: ignore[arg-type]
            assert list(feed) == []
        with pytest.raises(ConfigError, match=f"made by the {other} plugin and this run reads with {self.plugin}"):
            with self.consumer(pdsn, "mixed", endpos="now") as feed:
                list(feed)

    def test_heartbeats_move_an_idle_slot(self, pdsn, tmp_path):
        self.prime(pdsn, "beat")
        slot = default_slot("beat")
        log = tmp_path / "run.log"
        before = sql(pdsn, "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s", (slot,))[0][0]
        proc = cdc_run(pdsn, "--mode", "stream", "--plugin", self.plugin, "--consumer", "beat", "--sink", "null",
                       "--heartbeat-interval", "0.3", "--status-interval", "0.2", log=log)
        try:
            deadline = time.monotonic() + 30
            while True:
                now = sql(pdsn, "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s", (slot,))[0][0]
                if now is not None and Lsn.parse(str(now)) > Lsn.parse(str(before)):
                    break
                assert time.monotonic() < deadline and proc.poll() is None, tail(log)
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, tail(log)

    def test_a_steady_feed_saves_its_checkpoint_at_the_interval_not_at_every_keepalive(self, pdsn, conn):
        """Under steady load the walsender sends a keepalive each time it has sent more than
        we confirmed, so after nearly every transaction; a read woken by one is not an idle
        feed. Saved at each, the checkpoint was written ~100 times a second at 500 commits/s
        (each save's confirmation prompting the next keepalive), a write on the primary and
        ~1.5 ms of waiting for the commits that arrived meanwhile."""
        import threading

        self.prime(pdsn, "steady")
        conn.execute("CREATE TABLE public.saves (n bigint NOT NULL)")
        conn.execute("INSERT INTO public.saves VALUES (0)")
        conn.execute("CREATE FUNCTION public.count_save() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN UPDATE public.saves SET n = n + 1; RETURN NULL; END $$")
        conn.execute("CREATE TRIGGER count_save AFTER INSERT OR UPDATE ON cdc.checkpoints "
                     "FOR EACH ROW WHEN (NEW.consumer = 'steady') EXECUTE FUNCTION public.count_save()")
        feed = self.consumer(pdsn, "steady", checkpoint_interval=1.0)
        col = Collector(feed)
        stop = threading.Event()

        def write() -> None:  # ~200 single-event transactions a second, each flushed at commit
            # (the suite's cluster runs synchronous_commit=off: WAL would reach the walsender in
            # bursts at the WAL writer's rounds, with idle reads between them)
            with psycopg.connect(pdsn, autocommit=True, options="-c synchronous_commit=on") as c:
                i = 0
                while not stop.is_set():
                    _append(c, f"steady-{i}", 1)
                    i += 1
                    time.sleep(0.005)

        writer = threading.Thread(target=write)
        time.sleep(0.5)
        (start,), = sql(pdsn, "SELECT n FROM public.saves")
        writer.start()
        time.sleep(4)
        (end,), = sql(pdsn, "SELECT n FROM public.saves")
        stop.set()
        writer.join()
        col.wait_for(committed_seqs(pdsn))
        col.stop()
        assert len(col.seqs) > 300  # the feed was steady: hundreds of transactions in those 4 s
        assert end - start <= 8, f"{end - start} checkpoint saves in 4 s with a 1 s interval"


class TestWal2json(StreamContract):
    plugin = "wal2json"


class TestPgoutput(StreamContract):
    plugin = "pgoutput"


def test_both_plugins_write_identical_lines_for_the_same_wal(dsn, conn):
    """Same WAL, two slots, two plugins: the same bytes in every sink."""
    if not _server_has(dsn, "wal2json"):
        pytest.skip("the server has no wal2json")
    for name in ("same-w", "same-p"):
        with Consumer(dsn, consumer=name, plugin="pgoutput" if name == "same-p" else "wal2json",
                      endpos="now") as feed:
            assert list(feed) == []
    for i, text in enumerate(PAYLOADS):
        conn.execute("INSERT INTO cdc.events (stream_id, version, type, data, metadata) "
                     "VALUES (%s, 1, 'E', %s::jsonb, %s::jsonb)", (f"s{i}", text, text))
    conn.execute("INSERT INTO cdc.events (stream_id, version, type, data) "
                 "SELECT 'many', g, 'E', jsonb_build_object('g', g) FROM generate_series(1, 2500) g")
    lines = {}
    for name, plugin in (("same-w", "wal2json"), ("same-p", "pgoutput")):
        with Consumer(dsn, consumer=name, plugin=plugin, chunk_events=1000, endpos="now") as feed:  # type: ignore[arg-type]
            lines[plugin] = _lines(list(feed))
    assert len(lines["wal2json"]) == len(PAYLOADS) + 2500
    assert lines["wal2json"] == lines["pgoutput"]


def test_pgoutput_makes_a_missing_publication_or_says_which_statement_to_run(server, dsn, conn):
    conn.execute("DROP PUBLICATION cdc_events")
    role = "publess"
    conn.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
    try:
        conn.execute(f"GRANT USAGE ON SCHEMA cdc TO {role}; GRANT SELECT ON cdc.events TO {role}; "
                     f"GRANT SELECT, INSERT, UPDATE, DELETE ON cdc.checkpoints TO {role}")
        as_role = psycopg.conninfo.make_conninfo(dsn, user=role)
        with pytest.raises(PublicationError, match=r"publication 'cdc_events' does not exist and this role may not "
                                                   r"create it .*CREATE PUBLICATION \"cdc_events\" FOR TABLE"):
            with Consumer(as_role, consumer="pub", plugin="pgoutput", endpos="now") as feed:
                list(feed)
        assert sql(dsn, "SELECT count(*) FROM pg_replication_slots")[0][0] == 0, "a slot was left behind"
        # The table's owner may: the run makes it, and streams.
        _append(conn, "p1", 2)
        with Consumer(dsn, consumer="pub", plugin="pgoutput", endpos="now") as feed:
            assert [e.seq for tx in feed for e in tx.events] == [1, 2]
        assert sql(dsn, "SELECT pubinsert, pubtruncate FROM pg_publication WHERE pubname = 'cdc_events'") == [(True, True)]
    finally:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")
