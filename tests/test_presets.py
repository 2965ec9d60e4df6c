"""Other event stores' tables: Marten's mt_events and eventsourcing's stored_events, created from
their published DDL and appended to the way those libraries append, read by every path."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from cdc import Consumer, EventTable, Lsn, store
from cdc.cli import build_parser, main
from cdc.config import load
from cdc.errors import ConfigError
from cdc.presets import EVENTSOURCING, MARTEN, parse_table_name, table_for
from cdc.runner import table_for as settings_table
from cdc.sinks import open_sink

from .support import Collector

# Marten 7 as Weasel generates it for the default schema and Guid stream ids (functions and
# the progression table left out: cdc reads only these).
MARTEN_DDL = """
CREATE TABLE public.mt_streams (
    id uuid NOT NULL,
    type varchar NULL,
    version bigint NULL,
    timestamp timestamptz DEFAULT (now()) NOT NULL,
    snapshot jsonb NULL,
    snapshot_version integer NULL,
    created timestamptz DEFAULT (now()) NOT NULL,
    tenant_id varchar DEFAULT '*DEFAULT*' NULL,
    is_archived bool DEFAULT FALSE NULL,
    CONSTRAINT pkey_mt_streams_id PRIMARY KEY (id)
);
CREATE TABLE public.mt_events (
    seq_id bigint NOT NULL,
    id uuid NOT NULL,
    stream_id uuid NULL,
    version bigint NOT NULL,
    data jsonb NOT NULL,
    type varchar(500) NOT NULL,
    timestamp timestamptz DEFAULT (now()) NOT NULL,
    tenant_id varchar DEFAULT '*DEFAULT*' NULL,
    mt_dotnet_type varchar NULL,
    is_archived bool DEFAULT FALSE NULL,
    CONSTRAINT pkey_mt_events_seq_id PRIMARY KEY (seq_id)
);
ALTER TABLE public.mt_events ADD CONSTRAINT fkey_mt_events_stream_id
    FOREIGN KEY (stream_id) REFERENCES public.mt_streams (id) ON DELETE CASCADE;
CREATE UNIQUE INDEX pk_mt_events_stream_and_version ON public.mt_events (stream_id, version);
CREATE UNIQUE INDEX pk_mt_events_id_unique ON public.mt_events (id);
CREATE SEQUENCE public.mt_events_sequence;
ALTER SEQUENCE public.mt_events_sequence OWNED BY public.mt_events.seq_id;
"""

# eventsourcing 9.x PostgresApplicationRecorder, default table name and schema.
EVENTSOURCING_DDL = """
CREATE TABLE IF NOT EXISTS public.stored_events (
    originator_id uuid NOT NULL,
    originator_version bigint NOT NULL,
    topic text,
    state bytea,
    notification_id bigserial,
    PRIMARY KEY (originator_id, originator_version)
) WITH (autovacuum_enabled = true);
CREATE UNIQUE INDEX IF NOT EXISTS stored_events_notification_id_idx
    ON public.stored_events (notification_id ASC);
"""


@dataclass(frozen=True)
class Written:
    """What a writer committed for one seq: the fields an Event must carry."""

    stream_id: str
    version: int
    type: str
    data: Any


class Rollback(Exception):
    pass


def marten_append(conn: psycopg.Connection, stream: uuid.UUID, events: list[tuple[str, Any]],
                  *, hold: float = 0.0, rollback: bool = False) -> dict[int, Written]:
    """As Marten's append: the stream row locked, then per event nextval('mt_events_sequence')
    and an insert of that seq_id, all in one transaction."""
    out: dict[int, Written] = {}
    with conn.transaction():
        row = conn.execute("SELECT version FROM public.mt_streams WHERE id = %s FOR UPDATE", (stream,)).fetchone()
        version = 0
        if row is None:
            conn.execute("INSERT INTO public.mt_streams (id, type, version, timestamp, tenant_id) "
                         "VALUES (%s, 'order', 0, now(), '*DEFAULT*')", (stream,))
        else:
            version = int(row[0])
        for etype, data in events:
            seq = conn.execute("SELECT nextval('public.mt_events_sequence')").fetchone()[0]  # type: ignore[index]
            version += 1
            conn.execute(
                "INSERT INTO public.mt_events (seq_id, id, stream_id, version, data, type, tenant_id, "
                "mt_dotnet_type, is_archived) VALUES (%s, %s, %s, %s, %s::jsonb, %s, '*DEFAULT*', %s, FALSE)",
                (seq, uuid.uuid4(), stream, version, orjson.dumps(data).decode(), etype,
                 f"Shop.{etype}, Shop"),
            )
            out[int(seq)] = Written(str(stream), version, etype, data)
        conn.execute("UPDATE public.mt_streams SET version = %s, timestamp = now() WHERE id = %s", (version, stream))
        if hold:
            time.sleep(hold)
        if rollback:
            raise Rollback
    return out


def eventsourcing_append(conn: psycopg.Connection, stream: uuid.UUID, events: list[tuple[str, Any]],
                         *, hold: float = 0.0, rollback: bool = False) -> dict[int, Written]:
    """As eventsourcing's recorder: LOCK TABLE ... IN EXCLUSIVE MODE, then INSERT ... RETURNING
    notification_id; `state` is the JSON bytes of the event (the default transcoder)."""
    out: dict[int, Written] = {}
    with conn.transaction():
        conn.execute("SET LOCAL lock_timeout = '30s'")
        conn.execute("LOCK TABLE public.stored_events IN EXCLUSIVE MODE")
        row = conn.execute("SELECT max(originator_version) FROM public.stored_events WHERE originator_id = %s",
                           (stream,)).fetchone()
        version = int(row[0]) if row and row[0] is not None else 0
        for topic, data in events:
            version += 1
            state = data if isinstance(data, bytes) else orjson.dumps(data)
            seq = conn.execute(
                "INSERT INTO public.stored_events VALUES (%s, %s, %s, %s) RETURNING notification_id",
                (stream, version, topic, state),
            ).fetchone()[0]  # type: ignore[index]
            out[int(seq)] = Written(str(stream), version, topic, data)
        if hold:
            time.sleep(hold)
        if rollback:
            raise Rollback
    return out


@dataclass(frozen=True)
class Store:
    name: str
    ddl: str
    table: EventTable
    append: Callable[..., dict[int, Written]]
    event_type: str

    def expected_data(self, data: Any) -> Any:
        # eventsourcing's compressed (not JSON) states come out as hex.
        return data.hex() if isinstance(data, bytes) else data


STORES = {
    "marten": Store("marten", MARTEN_DDL, MARTEN, marten_append, "order_placed"),
    "eventsourcing": Store("eventsourcing", EVENTSOURCING_DDL, EVENTSOURCING, eventsourcing_append,
                           "shop.domain:Order.Placed"),
}


@pytest.fixture(params=sorted(STORES))
def es(request: pytest.FixtureRequest, empty_dsn: str) -> tuple[Store, str]:
    """(store, dsn): the library's tables plus cdc's bookkeeping (`cdc setup`), nothing else."""
    s = STORES[request.param]
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(s.ddl)
        store.setup(conn)
    return s, empty_dsn


def write(s: Store, dsn: str, *, writers: int = 4, seconds: float = 2.0, rollback: float = 0.1,
          hold: float = 0.08, seed: int = 7) -> dict[int, Written]:
    """Concurrent writers, each with its own streams; a share roll back, a share hold their
    transaction open. Returns what committed, by seq."""
    committed: dict[int, Written] = {}
    lock = threading.Lock()
    until = time.monotonic() + seconds

    def writer(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        streams = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(5)]
        with psycopg.connect(dsn, autocommit=True) as conn:
            i = 0
            while time.monotonic() < until:
                events: list[tuple[str, Any]] = []
                for _ in range(rng.randint(1, 5)):
                    i += 1
                    data: Any = {"writer": n, "i": i, "text": "é\"\\\n"}
                    if s.name == "eventsourcing" and i % 7 == 0:
                        data = zlib.compress(orjson.dumps(data))  # a compressed state: not JSON
                    events.append((s.event_type, data))
                try:
                    got = s.append(conn, rng.choice(streams), events,
                                   hold=rng.uniform(0.2, 0.6) if rng.random() < hold else 0.0,
                                   rollback=rng.random() < rollback)
                except Rollback:
                    continue
                with lock:
                    committed.update(got)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return committed


def wal_commit_order(conn: psycopg.Connection, table: EventTable, slot: str = "ref") -> list[list[int]]:
    """An independent reader of the same WAL (SQL interface, no cdc code): seqs per commit."""
    out: list[list[int]] = []
    current: list[int] = []
    for (data,) in conn.execute(
        "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, 'format-version', '2', "
        "'add-tables', %s, 'actions', 'insert')", (slot, table.qualified),
    ):
        msg = orjson.loads(data)
        if msg["action"] == "B":
            current = []
        elif msg["action"] == "I":
            current.append(next(c["value"] for c in msg["columns"] if c["name"] == table.seq))
        elif msg["action"] == "C" and current:
            out.append(current)
    return out


def assert_fields(s: Store, committed: dict[int, Written], events: list[Any]) -> None:
    for e in events:
        w = committed[e.seq]
        assert (e.stream_id, e.version, e.type, e.data) == (w.stream_id, w.version, w.type, s.expected_data(w.data))
        assert e.metadata is None
        if s.table.created_at:
            assert e.created_at is not None and e.created_at.tzinfo is not None
        else:
            assert e.created_at is None


def reconcile_agrees(dsn: str, consumer: str, table: EventTable) -> None:
    reconcile = pytest.importorskip("cdc.reconcile").reconcile
    with ConnectionPool(dsn, min_size=1, max_size=1, open=True) as pool:
        report = reconcile(pool, consumer=consumer, table=table)
    assert report.agrees, report.summary_lines()
    assert report.counts["delivered"] == report.counts["expected"] > 0


# -- the paths ------------------------------------------------------------------------------------


def test_stream_hands_over_history_then_streams_every_commit_once_in_commit_order(es: tuple[Store, str]) -> None:
    s, dsn = es
    history = write(s, dsn, writers=2, seconds=0.5, hold=0.0, rollback=0.2, seed=1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        lsn = Lsn.parse(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])  # type: ignore[index]
    # First run on a new slot: the rows already there come from the slot's exported snapshot.
    with Consumer(dsn, consumer="c", table=s.table, mode="stream", endpos=lsn, record_deliveries=True) as feed:
        replayed = list(feed)
    assert {tx.source for tx in replayed} == {"poll"}
    replayed_seqs = [e.seq for tx in replayed for e in tx.events]
    assert replayed_seqs == sorted(history)
    assert_fields(s, history, [e for tx in replayed for e in tx.events])

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('ref', 'wal2json')")
        col = Collector(Consumer(dsn, consumer="c", table=s.table, mode="stream", record_deliveries=True))
        live = write(s, dsn)
        col.wait_for(set(live))
        col.stop()
        reference = wal_commit_order(conn, s.table)
    assert {tx.source for tx in col.transactions} == {"stream"}
    streamed = [[e.seq for e in tx.events] for tx in col.transactions if tx.events]
    assert streamed == reference
    seqs = [q for run in streamed for q in run]
    assert len(seqs) == len(set(seqs)) and set(seqs) == set(live)
    assert any(b < a for a, b in zip(seqs, seqs[1:])) or s.name == "eventsourcing"  # LOCK TABLE: in order
    assert_fields(s, live, [e for tx in col.transactions for e in tx.events])
    reconcile_agrees(dsn, "c", s.table)


def test_poller_delivers_every_commit_once_in_seq_order_without_skipping_held_ones(es: tuple[Store, str]) -> None:
    s, dsn = es
    col = Collector(Consumer(dsn, consumer="p", table=s.table, mode="poll", poll_interval=0.05,
                             record_deliveries=True))
    committed = write(s, dsn)
    col.wait_for(set(committed))
    time.sleep(0.3)
    col.stop()
    assert {tx.source for tx in col.transactions} == {"poll"}
    assert col.seqs == sorted(committed)
    assert_fields(s, committed, [e for tx in col.transactions for e in tx.events])
    reconcile_agrees(dsn, "p", s.table)


def test_a_sink_writes_the_mapped_fields(es: tuple[Store, str], tmp_path: Any) -> None:
    s, dsn = es
    with psycopg.connect(dsn, autocommit=True) as conn:
        committed = s.append(conn, uuid.UUID(int=1), [(s.event_type, {"total": 12.5}), (s.event_type, {"n": [1]})])
    path = tmp_path / "out.jsonl"
    sink = open_sink(f"jsonl:{path}")
    with Consumer(dsn, consumer="j", table=s.table, mode="poll") as feed:
        for tx in feed:
            sink.write(tx)
            if tx.events and tx.events[-1].seq == max(committed):
                feed.stop()
    sink.flush()
    sink.close()
    records = [orjson.loads(line) for line in path.read_text().splitlines()]
    assert [(r["seq"], r["stream_id"], r["version"], r["type"], r["data"]) for r in records] == [
        (seq, str(uuid.UUID(int=1)), w.version, s.event_type, w.data) for seq, w in sorted(committed.items())
    ]


def test_eventsourcing_state_is_json_when_it_parses_else_hex_on_both_paths(empty_dsn: str) -> None:
    s = STORES["eventsourcing"]
    nan = json.dumps({"x": float("nan"), "y": float("inf")}).encode()  # what Python's json writes: not JSON
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(s.ddl)
        store.setup(conn)
        history = s.append(conn, uuid.UUID(int=5), [("t", {"a": "ü"}), ("t", b"\x00\xffnot json"), ("t", [1, 2]),
                                                   ("t", nan), ("t", b'{\n  "big": 1e400,\r\n "n": 12345678901234567890123}')])
        with Consumer(empty_dsn, consumer="s", table=s.table, mode="stream",
                      endpos=Lsn.parse(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])) as f:
            events = [e for tx in f for e in tx.events]
        assert [e.data for e in events[:4]] == [{"a": "ü"}, "00ff6e6f74206a736f6e", [1, 2], nan.hex()]
        # JSON text passes through as it is, numbers exact; its line breaks (whitespace) become spaces.
        assert events[4].data_json == '{   "big": 1e400,   "n": 12345678901234567890123}'
        assert events[4].data == {"big": Decimal("1e400"), "n": 12345678901234567890123}
        live = s.append(conn, uuid.UUID(int=5), [("t", b"\x01\x02"), ("t", {"b": None}), ("t", nan)])
        col = Collector(Consumer(empty_dsn, consumer="s", table=s.table, mode="stream"))
        col.wait_for(set(live))
        col.stop()
        assert [e.data for tx in col.transactions for e in tx.events] == ["0102", {"b": None}, nan.hex()]
        assert {tx.source for tx in col.transactions} == {"stream"}
        assert sorted(history) + sorted(live) == list(range(1, 9))
        # The poll path and the replay read the same states the same way.
        col = Collector(Consumer(empty_dsn, consumer="p", table=s.table, mode="poll"))
        col.wait_for(set(history) | set(live))
        col.stop()
        assert [e.data_json for tx in col.transactions for e in tx.events] == [e.data_json for e in events] + [
            '"0102"', '{"b":null}', '"' + nan.hex() + '"']


def test_a_text_payload_is_json_when_it_parses_else_a_json_string(empty_dsn: str, tmp_path: Any) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app; CREATE TABLE app.ev (id bigserial PRIMARY KEY, stream text NOT NULL, "
                     "body text, meta json)")
        store.setup(conn)
        table = EventTable(schema="app", name="ev", seq="id", stream_id="stream", version=None, type=None,
                           data="body", metadata="meta", created_at=None, xid=None,
                           payload_encoding={"body": "text"}, strict=False)
        rows = [("plain words", '{"m": 1}'), ('{"n": 1e400}', '{\n "a":\t[1,\r\n2]}'), ("NaN", None),
                ('"quoted"', "[]")]
        for body, meta in rows:
            conn.execute("INSERT INTO app.ev (stream, body, meta) VALUES ('s', %s, %s)", (body, meta))
        expect = [('"plain words"', '{"m": 1}'), ('{"n": 1e400}', '{  "a":\t[1,  2]}'), ('"NaN"', None),
                  ('"quoted"', "[]")]
        with Consumer(empty_dsn, consumer="t", table=table, mode="stream", endpos="now") as f:
            streamed = [(e.data_json, e.metadata_json) for tx in f for e in tx.events]
        col = Collector(Consumer(empty_dsn, consumer="tp", table=table, mode="poll"))
        col.wait_for({1, 2, 3, 4})
        col.stop()
        polled = [(e.data_json, e.metadata_json) for tx in col.transactions for e in tx.events]
        assert streamed == polled == expect
        sink = open_sink(f"jsonl:{tmp_path / 'out.jsonl'}")
        for tx in col.transactions:
            sink.write(tx)
        sink.close()
        lines = (tmp_path / "out.jsonl").read_bytes().splitlines()
        assert [json.loads(line, parse_float=Decimal)["data"] for line in lines] == [
            "plain words", {"n": Decimal("1e400")}, "NaN", "quoted"]


# -- check ----------------------------------------------------------------------------------------


def test_check_passes_on_a_marten_database(empty_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(MARTEN_DDL)
        store.setup(conn)
    assert main(["check", "--preset", "marten", "--dsn", empty_dsn]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "FAIL" not in out
    assert "OK   events_table: public.mt_events has the expected columns" in out
    assert "OK   events_seq: seq_id is filled from mt_events_sequence (OWNED BY, no default)" in out


def test_check_passes_on_an_eventsourcing_database(empty_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(EVENTSOURCING_DDL)
        store.setup(conn)
    assert main(["check", "--preset", "eventsourcing", "--dsn", empty_dsn]) == 0, capsys.readouterr().out
    assert "OK   events_seq: notification_id comes from stored_events_notification_id_seq, CACHE 1" in \
        capsys.readouterr().out


def test_check_fails_clearly_without_mt_events(empty_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--preset", "marten", "--dsn", empty_dsn]) == 1
    out = capsys.readouterr().out
    assert "FAIL events_table: public.mt_events does not exist — fix: check --dsn" in out
    assert "SKIP events_seq" in out
    assert "FAIL bookkeeping: cdc.checkpoints does not exist" in out and "— fix: cdc setup" in out


def test_check_names_a_mapped_column_that_does_not_exist_and_a_wrong_payload_type(
        empty_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(EVENTSOURCING_DDL)
        store.setup(conn)
    code = main(["check", "--preset", "eventsourcing", "--time-column", "recorded_at",
                 "--data-encoding", "jsonb", "--dsn", empty_dsn])
    assert code == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("FAIL events_table"))
    assert "column recorded_at missing" in line and "state is bytea, expected json or jsonb" in line


def test_check_refuses_a_cached_sequence(empty_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute(MARTEN_DDL)
        conn.execute("ALTER SEQUENCE public.mt_events_sequence CACHE 20")
        store.setup(conn)
    assert main(["check", "--preset", "marten", "--dsn", empty_dsn]) == 1
    assert "FAIL events_seq: mt_events_sequence has CACHE 20" in capsys.readouterr().out


# -- the mapping itself (no database) -------------------------------------------------------------


def test_presets_map_the_published_columns() -> None:
    assert table_for("marten") is MARTEN
    assert (MARTEN.qualified, MARTEN.seq, MARTEN.stream_id, MARTEN.version, MARTEN.type, MARTEN.data,
            MARTEN.metadata, MARTEN.created_at, MARTEN.xid) == (
        "public.mt_events", "seq_id", "stream_id", "version", "type", "data", None, "timestamp", None)
    assert (EVENTSOURCING.qualified, EVENTSOURCING.seq, EVENTSOURCING.stream_id, EVENTSOURCING.version,
            EVENTSOURCING.type, EVENTSOURCING.data, EVENTSOURCING.payload_encoding) == (
        "public.stored_events", "notification_id", "originator_id", "originator_version", "topic", "state",
        {"state": "bytea"})
    assert not MARTEN.strict and not EVENTSOURCING.strict
    assert table_for(None) == table_for("cdc") == store.DEFAULT_TABLE


def test_table_and_columns_map_any_table() -> None:
    t = table_for(None, "app.domain_events", seq_column="position", stream_column="aggregate_id",
                  version_column="none", type_column="event_type", data_column="payload",
                  data_encoding="bytea", metadata_column="NONE", time_column="occurred_at", xid_column="-")
    assert t == EventTable("app", "domain_events", "position", "aggregate_id", None, "event_type", "payload",
                           None, "occurred_at", None, {"payload": "bytea"}, strict=False)
    # The preset's schema and encodings stay unless overridden; a renamed payload keeps its encoding.
    t = table_for("eventsourcing", "shop.shop_events", data_column="blob")
    assert (t.qualified, t.data, t.payload_encoding) == ("shop.shop_events", "blob", {"blob": "bytea"})
    assert table_for(None, "cdc.events").strict
    assert table_for(None, "events").qualified == "public.events"
    assert parse_table_name('"odd.schema"."Ev""ents"') == ("odd.schema", 'Ev"ents')


@pytest.mark.parametrize("kwargs, message", [
    ({"preset": "axon"}, "unknown preset"),
    ({"table": "a.b.c"}, "expected SCHEMA.NAME"),
    ({"table": "a."}, "expected SCHEMA.NAME"),
    ({"seq_column": "none"}, "--seq-column cannot be none"),
    ({"stream_column": ""}, "--stream-column cannot be none"),
    ({"data_encoding": "msgpack"}, "--data-encoding"),
])
def test_bad_mappings_say_what_to_write(kwargs: dict[str, Any], message: str) -> None:
    preset = kwargs.pop("preset", None)
    with pytest.raises(ConfigError, match=message):
        table_for(preset, **kwargs)


def test_run_flags_and_toml_build_the_table(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CDC_PRESET", "CDC_TABLE", "CDC_SEQ_COLUMN"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "cdc.toml"
    config.write_text('preset = "marten"\ntable = "events.mt_events"\n')
    assert settings_table(load({}, str(config))) == table_for("marten", "events.mt_events")
    config.write_text('[cdc]\npreset = "eventsourcing"\nmetadata_column = "meta"\nmetadata_encoding = "bytea"\n')
    t = settings_table(load({}, str(config)))
    assert (t.metadata, t.payload_encoding) == ("meta", {"state": "bytea", "meta": "bytea"})

    args = build_parser().parse_args(["run", "--table", "app.ev", "--seq-column", "id", "--type-column", "none",
                                      "--data-encoding", "text"])
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    t = settings_table(load(flags))
    assert (t.qualified, t.seq, t.type, t.payload_encoding, t.strict) == ("app.ev", "id", None, {"data": "text"}, False)
    assert settings_table(load({})) is store.DEFAULT_TABLE
    monkeypatch.setenv("CDC_PRESET", "eventsourcing")
    assert settings_table(load({})) is EVENTSOURCING


def test_cdc_run_with_a_preset_delivers_to_the_sink(es: tuple[Store, str], tmp_path: Any) -> None:
    s, dsn = es
    with psycopg.connect(dsn, autocommit=True) as conn:
        committed = s.append(conn, uuid.UUID(int=9), [(s.event_type, {"k": i}) for i in range(3)])
        lsn = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]  # type: ignore[index]
    out = tmp_path / "run.jsonl"
    assert main(["run", "--preset", s.name, "--dsn", dsn, "--sink", f"jsonl:{out}", "--endpos", lsn,
                 "--heartbeat-interval", "0"]) == 0
    records = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert [(r["seq"], r["stream_id"], r["version"], r["data"]) for r in records] == [
        (seq, w.stream_id, w.version, w.data) for seq, w in sorted(committed.items())]
