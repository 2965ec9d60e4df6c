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


def test_fast_replay_prints_the_same_bytes_as_the_event_path(dsn, conn):
    conn.execute("SET TimeZone = 'UTC'")
    _insert(conn)
    for timezone in ("UTC", "Asia/Kolkata"):
        outputs = []
        for sink_class in (StreamSink, _ObjectsOnly):
            buf = io.BytesIO()
            with psycopg.connect(dsn, autocommit=True, options=f"-c TimeZone={timezone}") as c:
                summary = _replay(c, DEFAULT_TABLE, 0, None, sink_class(buf), False, 10_000)
            outputs.append((buf.getvalue(), summary.events, summary.transactions))
        fast, objects = outputs
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
