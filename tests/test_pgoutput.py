"""The pgoutput decoder as a pure function: protocol messages in, transactions out, and the same
events, byte for byte, as the wal2json decoder makes of the same rows."""

from __future__ import annotations

import json
import struct

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.decoders import pgoutput, wal2json
from cdc.errors import DecodeError, UnsupportedChangeError
from cdc.events import Lsn, wire_records
from cdc.store import EventTable

COLUMNS = ["seq", "stream_id", "version", "type", "data", "metadata", "created_at", "xid"]
OID = 16400
STAMP = "2026-11-26 06:53:12.580681+00"


def wrap(payload: bytes, start: int = 0x100) -> memoryview:
    """An XLogData message as it comes off the wire: 'w', start, end, send time, then the plugin's bytes."""
    return memoryview(b"w" + struct.pack("!QQQ", start, start, 0) + payload)


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def relation(columns=COLUMNS, oid=OID, schema="cdc", name="events") -> bytes:
    body = struct.pack("!I", oid) + cstr(schema) + cstr(name) + b"d" + struct.pack("!H", len(columns))
    for c in columns:
        body += b"\0" + cstr(c) + struct.pack("!Ii", 3802 if c in ("data", "metadata") else 25, -1)
    return b"R" + body


def begin(commit=0x200, xid=7, us=817_000_000_000_000) -> bytes:
    return b"B" + struct.pack("!QqI", commit, us, xid)


def commit(commit=0x200, end=0x230, us=817_000_000_000_000) -> bytes:
    return b"C" + struct.pack("!BQQq", 0, commit, end, us)


def insert(values, oid=OID) -> bytes:
    body = struct.pack("!I", oid) + b"N" + struct.pack("!H", len(values))
    for v in values:
        if v is None:
            body += b"n"
        else:
            raw = v.encode()
            body += b"t" + struct.pack("!I", len(raw)) + raw
    return b"I" + body


def row(seq, stream="s", version=1, data='{"a": 1}', metadata="{}", created=STAMP, xid=7):
    return [str(seq), stream, None if version is None else str(version), "T", data, metadata, created, str(xid)]


def message(lsn=0x300, transactional=False, prefix="cdc", content=b"heartbeat") -> bytes:
    return b"M" + struct.pack("!BQ", 1 if transactional else 0, lsn) + cstr(prefix) + struct.pack("!I", len(content)) + content


def decode(decoder, *payloads):
    out = []
    decoder.decode([wrap(p) for p in payloads], out)
    return out


def test_a_transaction_carries_its_commit_end_time_and_rows():
    d = pgoutput.Decoder()
    (tx,) = decode(d, begin(), relation(), insert(row(1, data='{"x": [1, 2]}')), insert(row(2, metadata=None)), commit())
    assert (tx.xid, tx.commit_lsn, tx.end_lsn, tx.final, tx.part, tx.source) == (7, Lsn(0x200), Lsn(0x230), True, 0, "stream")
    assert tx.commit_time is not None and tx.commit_time.year == 2025
    e1, e2 = tx.events
    assert (e1.seq, e1.stream_id, e1.version, e1.type, e1.data_json, e1.metadata_json) == (1, "s", 1, "T", '{"x": [1, 2]}', "{}")
    assert e1.created_at is not None and e1.created_at.isoformat() == "2026-11-26T06:53:12.580681+00:00"
    assert e2.metadata_json is None and not d.in_transaction


def test_messages_split_across_batches_make_the_same_transaction():
    d = pgoutput.Decoder()
    assert decode(d, begin(), relation(), insert(row(1))) == []
    assert d.in_transaction
    (tx,) = decode(d, insert(row(2)), commit())
    assert [e.seq for e in tx.events] == [1, 2]


def test_a_huge_transaction_comes_in_parts_and_only_the_last_carries_the_end():
    d = pgoutput.Decoder(chunk_events=2)
    parts = decode(d, begin(), relation(), *[insert(row(n)) for n in range(1, 6)], commit())
    assert [(p.part, p.final, len(p.events)) for p in parts] == [(0, False, 2), (1, False, 2), (2, True, 1)]
    assert {(p.xid, p.commit_lsn) for p in parts} == {(7, Lsn(0x200))}
    # Before the commit arrives the end is not known: the lowest position past the commit's start.
    assert [p.end_lsn for p in parts] == [Lsn(0x201), Lsn(0x201), Lsn(0x230)]


def test_an_empty_transaction_and_a_non_transactional_message_are_acknowledgeable():
    d = pgoutput.Decoder()
    empty, beat = decode(d, begin(), message(transactional=True), commit(), message(lsn=0x400))
    assert empty.events == [] and empty.end_lsn == Lsn(0x230)
    assert beat.events == [] and beat.commit_lsn == beat.end_lsn == Lsn(0x400) and beat.xid is None


def test_origin_and_type_messages_are_ignored():
    d = pgoutput.Decoder()
    origin = b"O" + struct.pack("!Q", 0x150) + cstr("node")
    typ = b"Y" + struct.pack("!I", 99) + cstr("public") + cstr("mood")
    (tx,) = decode(d, begin(), origin, typ, relation(), insert(row(1)), commit())
    assert len(tx.events) == 1


def test_an_altered_events_table_stops_at_its_relation_message():
    with pytest.raises(UnsupportedChangeError, match=r"has columns cdc does not know \(tenant\)"):
        decode(pgoutput.Decoder(), begin(), relation(COLUMNS + ["tenant"]))
    with pytest.raises(UnsupportedChangeError, match="has no column data"):
        decode(pgoutput.Decoder(), begin(), relation([c for c in COLUMNS if c != "data"]))


def test_a_mapped_table_that_is_not_strict_takes_extra_columns():
    table = EventTable(schema="public", name="mt_events", metadata=None, xid=None, strict=False)
    cols = ["seq", "stream_id", "version", "type", "data", "created_at", "tenant"]
    (tx,) = decode(pgoutput.Decoder(table), begin(), relation(cols, schema="public", name="mt_events"),
                   insert(["5", "s", "2", "T", "{}", STAMP, "t1"]), commit())
    e = tx.events[0]
    assert (e.seq, e.version, e.metadata_json) == (5, 2, None)


def test_truncate_of_the_events_table_stops_the_feed_and_of_another_table_does_not():
    other = relation(["id"], oid=555, schema="public", name="other")
    truncate_other = b"T" + struct.pack("!IBI", 1, 0, 555)
    (tx,) = decode(pgoutput.Decoder(), begin(), other, truncate_other, commit())
    assert tx.events == []
    with pytest.raises(UnsupportedChangeError, match="TRUNCATE of cdc.events"):
        decode(pgoutput.Decoder(), begin(), relation(), b"T" + struct.pack("!IBII", 2, 0, 555, OID))


def test_update_or_delete_of_the_events_table_stops_the_feed():
    for kind in (b"U", b"D"):
        with pytest.raises(UnsupportedChangeError, match="must be append-only"):
            decode(pgoutput.Decoder(), begin(), relation(), kind + struct.pack("!I", OID) + b"K")


def test_changes_of_another_published_table_are_skipped_with_one_warning(caplog):
    d = pgoutput.Decoder()
    other = relation(["id"], oid=555, schema="public", name="other")
    (tx,) = decode(d, begin(), other, insert(["1"], oid=555), insert(["2"], oid=555), relation(),
                   insert(row(1)), commit())
    assert [e.seq for e in tx.events] == [1]
    assert [r.message for r in caplog.records].count(
        next(r.message for r in caplog.records if "public.other" in r.message)) == 1


@pytest.mark.parametrize("payloads, what", [
    ((begin(), insert(row(1))), "before the Relation message"),
    ((insert(row(1)),), "insert outside a transaction"),
    ((begin(), begin()), "begin inside a transaction"),
    ((commit(),), "commit outside a transaction"),
    ((begin(), relation(), insert(row(1))[:-3]), "unreadable row"),
    ((begin(), relation(), b"I" + struct.pack("!I", OID) + b"N" + struct.pack("!H", 1) + b"b"), "column kind 'b'"),
    ((b"S" + struct.pack("!I", 7),), "unexpected message 'S'"),
    ((begin(), commit(commit=0x999)), "inside the transaction that commits at 0/200"),
    ((b"B\0\0",), "short begin"),
])
def test_what_cannot_be_read_is_refused_with_its_lsn_never_skipped(payloads, what):
    d = pgoutput.Decoder()
    with pytest.raises(DecodeError, match="cannot decode the pgoutput message at 0/100") as info:
        decode(d, *payloads)
    assert what in str(info.value) and info.value.lsn == 0x100


# -- the same events as wal2json makes --------------------------------------------------------------

def _wal2json_messages(rows):
    b = orjson.dumps({"action": "B", "xid": 7, "timestamp": STAMP, "lsn": "0/200", "nextlsn": "0/230"})
    ins = [orjson.dumps({"action": "I", "schema": "cdc", "table": "events", "columns": [
        {"name": n, "value": (int(v) if n in ("seq", "version") and v is not None else v)}
        for n, v in zip(COLUMNS, r)]}) for r in rows]
    c = orjson.dumps({"action": "C", "xid": 7, "timestamp": STAMP, "lsn": "0/200", "nextlsn": "0/230"})
    return [b, *ins, wrap(c, 0x230)]


def _lines(txs):
    return [orjson.dumps(r) for tx in txs for r in wire_records(tx)]


_json_text = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
).map(lambda v: json.dumps(v, ensure_ascii=False))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=20), _json_text, st.one_of(st.none(), _json_text)),
                min_size=1, max_size=5))
def test_both_decoders_make_identical_lines_from_the_same_rows(rows):
    table_rows = [row(n + 1, stream=s, data=d, metadata=m) for n, (s, d, m) in enumerate(rows)]
    via_pgoutput = decode(pgoutput.Decoder(), begin(), relation(), *[insert(r) for r in table_rows], commit())
    w = wal2json.Decoder()
    out: list = []
    w.decode([m if isinstance(m, memoryview) else wrap(m) for m in _wal2json_messages(table_rows)], out)
    assert _lines(via_pgoutput) == _lines(out)
