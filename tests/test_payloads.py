"""Payloads reach every path exactly as PostgreSQL holds them (a real cluster, real wal2json).

The oracle is PostgreSQL's own text (`data::text`) read with an exact parser (big ints exact,
non-integers as Decimal). Every path — the stream, `cdc replay`, the poller, the hand-off
replay, the webhook sink, the dead-letter row — must deliver a value equal to it; the Event's
`data_json` must be that text itself.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cdc import DecimalEvent, Event, jsontext
from cdc.consumer import Consumer
from cdc.events import Transaction
from cdc.sinks import StreamSink
from cdc.webhook import WebhookSink

from .support import Collector, prime, wal_now
from .test_webhook import start_receiver

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _unbounded_python() -> Iterator[None]:
    """The oracle (Python's json) needs room: 10,000-digit ints and 1,000-deep documents."""
    digits, depth = sys.get_int_max_str_digits(), sys.getrecursionlimit()
    sys.set_int_max_str_digits(0)
    sys.setrecursionlimit(20_000)
    yield
    sys.set_int_max_str_digits(digits)
    sys.setrecursionlimit(depth)


def exact(text: str | bytes) -> Any:
    return json.loads(text, parse_float=Decimal)


# -- documents as JSON text (so numbers can be written the way a user's writer wrote them) -------

HARD_NUMBERS = [
    "1e400", "-1.5e+9999", "123123e1000", "0.1e-999", "1E22", "1e-7", "5e-324", "1.7976931348623157e309",
    "123456789012345678901234567890.123456789", "-237462374673276894279832749832423479823246327846",
    "18446744073709551616", "-9223372036854775809", "1.0", "1.50", "-0.0", "0", "-0", "0.1", "3.141592653589793238462643383279",
]


def _number() -> st.SearchStrategy[str]:
    digits = st.text("0123456789", min_size=1, max_size=40).map(lambda d: d.lstrip("0") or "0")
    frac = st.none() | st.text("0123456789", min_size=1, max_size=40)
    exp = st.none() | st.builds(lambda e, E, sign: f"{E}{sign}{e}", st.integers(0, 400), st.sampled_from("eE"),
                                st.sampled_from(["", "+", "-"]))
    built = st.builds(lambda neg, i, f, e: f"{'-' if neg else ''}{i}{'.' + f if f else ''}{e or ''}",
                      st.booleans(), digits, frac, exp)
    return st.sampled_from(HARD_NUMBERS) | built | st.integers(-(2**200), 2**200).map(str)


_STRING_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")


def _string() -> st.SearchStrategy[str]:
    """A JSON string literal: every escape, raw or \\u-escaped astral characters (surrogate pairs)."""
    specials = st.sampled_from(['"', "\\", "/", "\b", "\f", "\n", "\r", "\t", "\x01", "\x1f", "\x7f",
                                "\u2028", "😀", "𝄞", "é", "\ufeff"])
    text = st.lists(specials | _STRING_CHARS, max_size=12).map("".join)

    def literal(s: str, ascii_only: bool, slash: bool) -> str:
        out = json.dumps(s, ensure_ascii=ascii_only)
        return out.replace("/", "\\/") if slash else out

    return st.builds(literal, text, st.booleans(), st.booleans())


def _document() -> st.SearchStrategy[str]:
    leaf = _number() | _string() | st.sampled_from(["true", "false", "null"])
    tree = st.recursive(
        leaf,
        lambda inner: (st.lists(inner, max_size=5).map(lambda xs: "[" + ", ".join(xs) + "]")
                       | st.lists(st.tuples(_string(), inner), max_size=5).map(
                           lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}")),
        max_leaves=20,
    )
    deep = st.builds(_nest, st.integers(1, 1000), leaf)
    return tree | deep


def _nest(depth: int, leaf: str) -> str:
    out = leaf
    for i in range(depth):
        out = f"[{out}]" if i % 2 else '{"k": ' + out + "}"
    return out


def big_documents() -> list[str]:
    """The documents too big to draw: 20,000 keys, 5 MB (TOASTed), 1,000 deep, a 10,000-digit number."""
    many = "{" + ", ".join(f'"k{i}": {i}' for i in range(20_000)) + ', "": "empty key"}'
    huge = json.dumps({"blob": "x" * 5_000_000, "n": 1})
    return [many, huge, _nest(1000, "1e400"), "[" + "9" * 10_000 + "]", '{"a": 1, "a": 2}']


# -- the paths --------------------------------------------------------------------------------


def insert(conn: psycopg.Connection, docs: list[tuple[str, str]]) -> list[int]:
    """One transaction a document pair, with ordinary events on either side of each."""
    seqs = []
    for n, (data, meta) in enumerate(docs):
        with conn.transaction():
            for d, m in (('{"ordinary": 1}', "{}"), (data, meta), ('{"ordinary": 2}', "{}")):
                seqs.append(conn.execute(
                    "INSERT INTO cdc.events (stream_id, version, type, data, metadata) "
                    "VALUES (%s, (SELECT coalesce(max(version), 0) + 1 FROM cdc.events WHERE stream_id = %s), "
                    "'E', %s::jsonb, %s::jsonb) RETURNING seq", (f"s{n % 3}", f"s{n % 3}", d, m)).fetchone()[0])
    return seqs


def held(conn: psycopg.Connection, seqs: list[int]) -> dict[int, tuple[str, str]]:
    rows = conn.execute("SELECT seq, data::text, metadata::text FROM cdc.events WHERE seq = ANY(%s)", (seqs,))
    return {r[0]: (r[1], r[2]) for r in rows}


def check_events(events: list[Event], truth: dict[int, tuple[str, str]]) -> None:
    """In order, all of them, and each Event's text is PostgreSQL's."""
    assert [e.seq for e in events] == sorted(truth)
    for e in events:
        assert (e.data_json, e.metadata_json) == truth[e.seq], e.seq


def check_lines(lines: list[bytes], truth: dict[int, tuple[str, str]]) -> None:
    check_records([exact(line) for line in lines], truth)


def check_records(records: list[dict[str, Any]], truth: dict[int, tuple[str, str]]) -> None:
    assert [r["seq"] for r in records] == sorted(truth)
    for r in records:
        assert list(r) == ["seq", "stream_id", "version", "type", "data", "metadata", "created_at", "xid",
                           "commit_lsn", "source"]
        data, meta = truth[r["seq"]]
        assert r["data"] == exact(data), r["seq"]
        assert r["metadata"] == exact(meta), r["seq"]


def jsonl(txs: list[Transaction]) -> list[bytes]:
    buf = io.BytesIO()
    sink = StreamSink(buf)
    for tx in txs:
        sink.write(tx)
    return buf.getvalue().splitlines()


def stand_on_slot(dsn: str, consumer: str) -> None:
    """A consumer with its slot, past what the table holds now: what comes next is streamed."""
    with psycopg.connect(dsn, autocommit=True) as c, Consumer(dsn, consumer=consumer, slot=consumer,
                                                              endpos=wal_now(c)) as feed:
        for _ in feed:
            pass


def deliver_all_paths(dsn: str, conn: psycopg.Connection, docs: list[tuple[str, str]], tmp: Path, tag: str) -> None:
    stand_on_slot(dsn, f"live{tag}")
    seqs = insert(conn, docs)
    truth = held(conn, seqs)
    end = wal_now(conn)
    first = min(seqs)

    # The stream, from a consumer already standing on its slot; the webhook sink fed from it.
    receiver = start_receiver()
    try:
        hook = WebhookSink(receiver.url, timeout=30.0)
        with Consumer(dsn, consumer=f"live{tag}", slot=f"live{tag}", endpos=end) as feed:
            txs = [tx for tx in feed if tx.events]
            assert {tx.source for tx in txs} == {"stream"}
            for tx in txs:
                hook.write(tx)
            hook.flush()
        hook.close()
        bodies = [exact(r.body) for r in receiver.requests]
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
    check_events([e for tx in txs for e in tx.events], truth)
    check_lines(jsonl(txs), truth)
    check_records([ev for b in bodies for ev in b["events"]], truth)

    # The hand-off replay: a new consumer, new slot, its history read under the slot's snapshot.
    with Consumer(dsn, consumer=f"new{tag}", slot=f"new{tag}", endpos="now") as feed:
        txs = [tx for tx in feed if tx.events]
    handed = [e for tx in txs for e in tx.events if e.seq >= first]
    check_events(handed, truth)
    check_lines([line for line in jsonl(txs) if exact(line)["seq"] >= first], truth)

    # The poller.
    col = Collector(Consumer(dsn, consumer=f"poll{tag}", mode="poll"))
    col.wait_for(set(seqs), timeout=120)
    col.stop()
    check_events([e for tx in col.transactions for e in tx.events if e.seq >= first], truth)

    # `cdc replay`, into a jsonl file, and through the object path (a sink without write_lines).
    out = tmp / f"replay{tag}.jsonl"
    proc = subprocess.run([sys.executable, "-m", "cdc", "replay", "--dsn", dsn, "--from-seq", str(first),
                           "--sink", f"jsonl:{out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    check_lines(out.read_bytes().splitlines(), truth)


# No shrinking: each example costs seconds of real delivery; the failing documents are printed whole.
@settings(max_examples=5, deadline=None, phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow, HealthCheck.data_too_large])
@given(docs=st.lists(st.tuples(_document(), _document() | st.just("{}")), min_size=10, max_size=30))
def test_every_path_delivers_what_postgres_holds(dsn: str, tmp_path: Path, docs: list[tuple[str, str]]) -> None:
    tag = uuid.uuid4().hex[:8]
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            deliver_all_paths(dsn, conn, docs, tmp_path, tag)
        finally:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name LIKE %s AND NOT active", (f"%{tag}",))


def test_the_documents_too_big_to_draw_on_every_path(dsn: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    bigs = big_documents()
    deliver_all_paths(dsn, conn, [(d, "{}") for d in bigs] + [('{"m": 1}', bigs[2]), ('{}', bigs[3])], tmp_path, "b")


def test_library_numbers_are_exact_integers_and_float_or_decimal(dsn: str, conn: psycopg.Connection) -> None:
    docs = [('{"amount": 123456789012345678901234567890.123456789, "id": -237462374673276894279832749832423479823246327846,'
             ' "tiny": 0.1e-999, "e": 1E22, "huge": 1e400, "f": 2.5}', '{"n": 1.50}')]
    for numbers in ("float", "decimal"):
        prime(dsn, numbers, slot=numbers)
    seqs = insert(conn, docs)
    end = wal_now(conn)
    for numbers, cls in (("float", Event), ("decimal", DecimalEvent)):
        with Consumer(dsn, consumer=numbers, slot=numbers, endpos=end, numbers=numbers) as feed:  # type: ignore[arg-type]
            events = [e for tx in feed for e in tx.events]
        assert [e.seq for e in events] == seqs and all(type(e) is cls for e in events)
        data, meta = events[1].data, events[1].metadata
        assert data["id"] == -237462374673276894279832749832423479823246327846
        assert data["e"] == 10**22 and type(data["e"]) is int  # jsonb holds it as an integer
        assert data["huge"] == Decimal("1e400")  # beyond a float in either mode: never infinity
        if numbers == "float":
            assert data["amount"] == 1.2345678901234568e29 and data["f"] == 2.5 and meta == {"n": 1.5}
        else:
            assert data["amount"] == Decimal("123456789012345678901234567890.123456789")
            assert data["tiny"] == Decimal("1e-1000") and meta == {"n": Decimal("1.50")}
        assert exact(events[1].data_json) == exact(held(conn, seqs)[seqs[1]][0])


def test_a_handler_failing_on_an_odd_value_dead_letters_its_exact_text(dsn: str, conn: psycopg.Connection,
                                                                        tmp_path: Path) -> None:
    (tmp_path / "odd_handler.py").write_text(
        "def handle(conn, tx):\n"
        "    for e in tx.events:\n"
        "        if len(e.data_json) > 300:  # jsonb writes 123123e1000 and 1e400 out in digits\n"
        "            raise ValueError('cannot take this one')\n"
        "        conn.execute('INSERT INTO handled VALUES (%s)', (e.seq,))\n")
    conn.execute("CREATE TABLE handled (seq bigint PRIMARY KEY)")
    prime(dsn, "default")
    deep = _nest(600, "1e400")
    seqs = insert(conn, [('{"n": 123123e1000}', "{}"), ('{"n": 1}', "{}"), (deep, '{"m": 1e400}')])
    truth = held(conn, seqs)
    end = wal_now(conn)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    proc = subprocess.run([sys.executable, "-m", "cdc", "run", "--dsn", dsn, "--sink", "python:odd_handler:handle",
                           "--on-poison", "dead-letter", "--max-attempts", "1", "--endpos", str(end)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    # Every event of the good transaction is handled; the two odd ones are dead letters, in order.
    assert [r[0] for r in conn.execute("SELECT seq FROM handled ORDER BY seq")] == seqs[3:6]
    rows = conn.execute("SELECT seqs, records::text FROM cdc.dead_letters ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [seqs[0:3], seqs[6:9]]
    for _, text in rows:
        for record in exact(text):
            assert record["data"] == exact(truth[record["seq"]][0])
            assert record["metadata"] == exact(truth[record["seq"]][1])


# -- the fast path and the fallback agree with the oracle, without a database ---------------------


@settings(max_examples=300, deadline=None)
@given(doc=_document())
def test_loads_matches_an_exact_parser(doc: str) -> None:
    assert jsontext.loads(doc, decimal=True) == exact(doc)
    assert jsontext._parse(doc, True) == exact(doc)
    floats = jsontext.loads(doc)
    assert floats == json.loads(doc, parse_float=lambda s: float(s) if abs(float(s)) != float("inf") else Decimal(s))


@pytest.mark.parametrize("bad", ["", "NaN", '{"a": Infinity}', "[1,]", "{'a': 1}", "01", "1 2", '"\x01"', "[",
                                 '{"a" 1}', "-", "1.", ".5", "tru"])
def test_not_json_is_refused_by_both_parsers(bad: str) -> None:
    with pytest.raises(ValueError):
        jsontext.loads(bad)
    with pytest.raises(ValueError):
        jsontext._parse(bad, False)
    assert not jsontext.is_json(bad)


def test_encodings_keep_json_text_and_make_the_rest_a_json_string() -> None:
    assert jsontext.from_bytes(b'{"a": 1e400}') == '{"a": 1e400}'
    assert jsontext.from_bytes(b'{"x": NaN}') == '"' + b'{"x": NaN}'.hex() + '"'
    assert jsontext.from_bytes(b"\x00\xff") == '"00ff"'
    assert jsontext.from_bytes(b'{\n  "a": 1\n}') == '{   "a": 1 }'  # one line: it goes into a JSON line
    assert jsontext.from_text("plain words") == '"plain words"'
    assert jsontext.from_text("[1, 2]") == "[1, 2]"


@pytest.mark.parametrize("value", ["10**30", "-(10**5000)", "Decimal('1.50')", "Decimal('1e400')", "[[[[1]]]]",
                                   "{'a': [Decimal('-0.000001'), 2**70, 'é\"\\n']}", "exact(_nest(700, '1'))"])
def test_dumps_is_exact_for_what_orjson_refuses(value: Any) -> None:
    value = eval(value)  # built here: a 5,000-digit int cannot even be a test id
    assert exact(jsontext.dumps(value)) == value


@pytest.mark.parametrize("value", [float("nan"), float("inf"), Decimal("NaN"), {"a": Decimal("-Infinity")}])
def test_dumps_refuses_what_json_cannot_say(value: Any) -> None:
    with pytest.raises(TypeError):
        jsontext.dumps(value)
