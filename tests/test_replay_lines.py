"""The replay fast path (JSON lines built from COPY) prints exactly what the object path prints."""

from __future__ import annotations

import io

import psycopg

from cdc import DEFAULT_TABLE
from cdc.polling import _replay, replay
from cdc.sinks import StreamSink

AWKWARD = [
    ("plain", '{"amount": 1, "currency": "EUR"}', '{}'),
    ('quote " and back\\slash', '{"s": "tab\\there\\nnewline \\"q\\" \\\\ \\u0001"}', '{"k": null}'),
    ("ünïcödé 😀 \u2028", '{"ü": ["é", {"deep": {"deeper": [1, 2.5, -3e-7, 1.10, 12345678901234567890]}}]}',
     '{"trace": "x"}'),
    ("tab\there", 'null', '{"a": [true, false, null]}'),
    ("nl\nhere", '"just a string"', '[]'),
    ("ctrl\x01\x1f", '123', '{}'),
]


class _ObjectsOnly(StreamSink):
    write_lines = None  # type: ignore[assignment]  # forces the Event path


def _insert(conn) -> None:
    with conn.transaction():
        for i, (stream, data, meta) in enumerate(AWKWARD):
            conn.execute(
                "INSERT INTO cdc.events (stream_id, version, type, data, metadata) VALUES (%s, 1, %s, %s, %s)",
                (stream, f"T{i} \"x\"", data, meta),
            )
    with conn.transaction():  # a second transaction, and a created_at with whole seconds
        conn.execute("INSERT INTO cdc.events (stream_id, version, type, data, created_at) "
                     "VALUES ('s2', 1, 'T', '{}', '2026-01-02 03:04:05+00')")
        conn.execute("INSERT INTO cdc.events (stream_id, version, type, data, created_at) "
                     "VALUES ('s2', 2, 'T', '{}', '2026-01-02 03:04:05.5+00')")


def _both_paths(dsn: str, timezone: str) -> list[tuple[bytes, int, int]]:
    """(output, events, transactions) of a whole replay by the fast path, then the Event path."""
    outputs = []
    for sink_class in (StreamSink, _ObjectsOnly):
        buf = io.BytesIO()
        with psycopg.connect(dsn, autocommit=True, options=f"-c TimeZone={timezone}") as c:
            summary = _replay(c, DEFAULT_TABLE, 0, None, sink_class(buf), False, 10_000)
        outputs.append((buf.getvalue(), summary.events, summary.transactions))
    return outputs


def test_fast_replay_prints_the_same_bytes_as_the_event_path(dsn, conn):
    conn.execute("SET TimeZone = 'UTC'")
    _insert(conn)
    for timezone in ("UTC", "Asia/Kolkata"):
        fast, objects = _both_paths(dsn, timezone)
        assert fast[1:] == objects[1:] == (len(AWKWARD) + 2, 2)
        assert fast[0] == objects[0]
        assert fast[0].count(b"\n") == len(AWKWARD) + 2


def test_fast_replay_respects_the_range(dsn, conn):
    _insert(conn)
    buf = io.BytesIO()
    summary = replay(dsn, from_seq=2, to_seq=4, sink=StreamSink(buf), progress=False)
    assert summary.events == 2
    assert [line.split(b",")[0] for line in buf.getvalue().splitlines()] == [b'{"seq":3', b'{"seq":4']


def test_jsonl_sink_cuts_a_torn_last_line_before_appending(tmp_path):
    from cdc.sinks import JsonlSink

    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"seq":1}\n{"seq":2}\n{"seq":3,"str')  # killed mid-write
    JsonlSink(str(path)).close()
    assert path.read_bytes() == b'{"seq":1}\n{"seq":2}\n'
    path.write_bytes(b'{"seq":1')  # not even one whole line
    JsonlSink(str(path)).close()
    assert path.read_bytes() == b""


def test_fast_replay_of_many_rows_in_every_shape_prints_the_same_bytes_as_the_event_path(dsn, conn):
    """Blocks of rows the fast path joins in bulk (no backslash, plain stream ids) and blocks it
    takes row by row (an escape, a tab or a quote in a stream id) alternate through thousands of
    rows: one-event and 500-event transactions, one type or many, created_at with a full, a
    trimmed or no fraction; in timezones with offsets in hours, minutes, and behind UTC."""
    conn.execute("SET TimeZone = 'UTC'")
    for i in range(1500):  # single-event transactions, each its own created_at
        conn.execute("INSERT INTO cdc.events (stream_id, version, type, data, created_at) VALUES "
                     "(%s, 1, %s, '{\"n\": 1}', '2026-01-02 03:04:05+00'::timestamptz + %s * interval '1.37 ms')",
                     (f"one-{i}", f"T{i % 7}", i))
    with conn.transaction():  # one big transaction, one type
        conn.execute("INSERT INTO cdc.events (stream_id, version, type, data, metadata) "
                     "SELECT 'big-' || g, g, 'Big', jsonb_build_object('g', g, 'ü', 'x'), '{\"m\": 1}' "
                     "FROM generate_series(1, 500) g")
    with conn.transaction():  # awkward rows among plain ones
        conn.execute("INSERT INTO cdc.events (stream_id, version, type, data, metadata) "
                     "SELECT CASE WHEN g % 97 = 0 THEN 'q\"' || g WHEN g % 71 = 0 THEN E'tab\\t' || g ELSE 'mixed-' || g END, "
                     "g, 'T' || (g % 3), "
                     "CASE WHEN g % 89 = 0 THEN '{\"s\": \"a\\\\b\\n\"}'::jsonb ELSE '[1, 2.50, -3e-7]'::jsonb END, "
                     "CASE WHEN g % 50 = 0 THEN 'null' ELSE '{}' END::jsonb FROM generate_series(1, 2000) g")
    total = 1500 + 500 + 2000
    for timezone in ("UTC", "Asia/Kolkata", "America/St_Johns", "America/Sao_Paulo"):
        fast, objects = _both_paths(dsn, timezone)
        assert fast[1] == objects[1] == total
        assert fast[2] == objects[2] == 1500 + 2
        assert fast[0] == objects[0], timezone
        assert fast[0].count(b"\n") == total


def _copy_row(seq: int, sid: bytes, version: bytes, etype: bytes, data: bytes, metadata: bytes, ts: bytes,
              xid: bytes) -> bytes:
    return b"\t".join((b"%d" % seq, sid, version, etype, data, metadata, ts, xid))


def test_bulk_and_row_by_row_lines_are_the_same_bytes():
    """`_Lines.block` in bulk equals the row-by-row form, for blocks that take either path:
    xids past 2**32 (an xid8's epoch) named as the stream names them, repeated and distinct
    values, a stream id or type JSON must escape."""
    import random

    from cdc.polling import _Lines

    rnd = random.Random(7)
    stamps = [b"2026-12-04 18:22:24.123456+00", b"2026-12-04 18:22:24.12+05:30", b"2026-12-04 18:22:24-03",
              b"2026-12-04 18:22:24.5+00", b"\\N"]
    sids = [b"a", b"account-1", b"q\"x", b"ctl\x01", b"\\\\back", b"\xc3\xbc"]
    xids = [b"7", b"4294967301", b"-12", b"999999999", b"\\N"]
    seq = 0
    paths = {"bulk": 0, "rows": 0}
    for _ in range(300):
        rows = []
        plain = rnd.random() < 0.5  # a block of plain rows, or one with some awkward rows in it
        for _ in range(rnd.randrange(1, 60)):
            seq += 1
            simple = plain or rnd.random() < 0.7
            rows.append(_copy_row(
                seq, rnd.choice(sids[:2] if simple else sids), rnd.choice([b"1", b"22"] if simple else [b"1", b"\\N"]),
                rnd.choice([b"T", b"Other"] if simple else [b"T", b'T"q', b"\\N"]),
                rnd.choice([b'{"a": 1}', b"[]"] if simple else [b'{"a": "\\\\n"}', b"\\N"]), b"{}",
                rnd.choice(stamps[:4] if simple else stamps), rnd.choice(xids[:4] if simple else xids)))
        block = b"".join(r + b"\n" for r in rows)
        bulk, by_row = _Lines(), _Lines()
        parts, n, last = bulk.block(block)
        assert n == len(rows) and last == b"%d" % seq
        assert b"".join(parts) == b"".join(by_row._row(r) for r in rows)
        assert bulk.transactions == by_row.transactions
        paths["bulk" if len(parts) == 16 * n + 1 else "rows"] += 1
    assert paths["bulk"] >= 20 and paths["rows"] >= 20, paths


def test_created_at_is_written_as_datetime_isoformat_writes_it():
    import random
    from datetime import datetime

    from cdc.polling import _stamp

    rnd = random.Random(3)
    for _ in range(20_000):
        us = rnd.choice([0, rnd.randrange(1, 10), rnd.randrange(10**6), rnd.randrange(1000) * 1000])
        frac = ("." + f"{us:06d}".rstrip("0")) if us else ""
        offset = rnd.choice(["+00", "-03", "+05:30", "+14", "-09:30", "+05:53:28", "-00:25:21"])
        ts = (f"{rnd.randrange(1, 10000):04d}-{rnd.randrange(1, 13):02d}-{rnd.randrange(1, 29):02d} "
              f"{rnd.randrange(24):02d}:{rnd.randrange(60):02d}:{rnd.randrange(60):02d}{frac}{offset}")
        assert _stamp(ts.encode()) == b'"%b"' % datetime.fromisoformat(ts).isoformat().encode(), ts


def test_jsonl_sink_starting_writeback_behind_a_long_write_keeps_every_line_in_order(tmp_path):
    """The writeback a long replay starts (every SYNC_EVERY bytes) goes on beside the writes:
    every line arrives whole and in order, and flush still makes it all durable."""
    from cdc import sinks

    path = tmp_path / "e.jsonl"
    sink = sinks.JsonlSink(str(path))
    sink.SYNC_EVERY = 4096
    for i in range(20_000):
        sink.write_lines(b'{"seq":%d,"pad":"%b"}\n' % (i, b"x" * (i % 50)))
    assert sink._writebacks > 10 or sinks._WRITEBACK is None
    sink.close()
    lines = path.read_bytes().splitlines()
    assert [int(line[7:line.index(b",")]) for line in lines] == list(range(20_000))
