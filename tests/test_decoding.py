"""The wal2json v2 decoder as a pure function: messages in, transactions out."""

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.decoders.wal2json import Decoder
from cdc.errors import DecodeError, UnsupportedChangeError
from cdc.events import Lsn


def b(xid=7, lsn="0/100", nextlsn="0/130"):
    return orjson.dumps({"action": "B", "xid": xid, "timestamp": "2026-11-26 06:53:12.583036+00", "lsn": lsn, "nextlsn": nextlsn})


def c(xid=7, lsn="0/100", nextlsn="0/130"):
    return orjson.dumps({"action": "C", "xid": xid, "timestamp": "2026-11-26 06:53:12.583036+00", "lsn": lsn, "nextlsn": nextlsn})


def i(seq, stream="s", version=1, data='{"a": 1}', xid=7, extra=None):
    cols = [
        {"name": "seq", "type": "bigint", "value": seq},
        {"name": "stream_id", "type": "text", "value": stream},
        {"name": "version", "type": "bigint", "value": version},
        {"name": "type", "type": "text", "value": "T"},
        {"name": "data", "type": "jsonb", "value": data},
        {"name": "metadata", "type": "jsonb", "value": "{}"},
        {"name": "created_at", "type": "timestamp with time zone", "value": "2026-11-26 06:53:12.580681+00"},
        {"name": "xid", "type": "xid8", "value": str(xid)},
    ] + (extra or [])
    return orjson.dumps({"action": "I", "xid": xid, "lsn": "0/F0", "schema": "cdc", "table": "events", "columns": cols})


def test_transaction_carries_commit_and_end_lsn_and_decoded_json():
    d = Decoder()
    assert d.feed(b()) is None
    assert d.feed(i(1, data='{"x": [1, 2]}')) is None
    tx = d.feed(c())
    assert tx.xid == 7 and tx.commit_lsn == Lsn.parse("0/100") and tx.end_lsn == Lsn.parse("0/130")
    assert tx.events[0].data == {"x": [1, 2]} and tx.events[0].metadata == {}
    assert tx.events[0].created_at.year == 2026 and tx.final and tx.source == "stream"


def test_empty_transaction_is_emitted_for_acknowledgement():
    d = Decoder()
    d.feed(b())
    tx = d.feed(c())
    assert tx.events == [] and tx.end_lsn == Lsn.parse("0/130")


def test_huge_transaction_comes_in_parts_ending_with_the_commit():
    d = Decoder(chunk_events=3)
    d.feed(b())
    parts = [t for t in (d.feed(i(n)) for n in range(1, 8)) if t]
    parts.append(d.feed(c()))
    assert [len(p.events) for p in parts] == [3, 3, 1]
    assert [p.final for p in parts] == [False, False, True]
    assert [p.part for p in parts] == [0, 1, 2]
    assert all(p.end_lsn == Lsn.parse("0/130") for p in parts)


def test_truncate_stops_the_feed():
    d = Decoder()
    d.feed(b())
    with pytest.raises(UnsupportedChangeError, match="TRUNCATE"):
        d.feed(orjson.dumps({"action": "T", "xid": 7, "schema": "cdc", "table": "events"}))


def test_unknown_column_means_the_table_was_altered():
    d = Decoder()
    d.feed(b())
    with pytest.raises(UnsupportedChangeError, match="altered"):
        d.feed(i(1, extra=[{"name": "tenant", "type": "text", "value": "x"}]))


def test_unknown_table_is_a_decode_error_with_lsn_and_raw_text():
    d = Decoder()
    d.feed(b())
    msg = orjson.dumps({"action": "I", "xid": 7, "schema": "public", "table": "other", "columns": []})
    with pytest.raises(DecodeError) as info:
        d.feed(msg, 0x1234)
    assert info.value.lsn == 0x1234 and b"other" in info.value.raw
    assert "0/1234" in str(info.value)


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'{"action":"I"}', b'{"action":"C","xid":1}', b"\xff\xfe", b'{"action":"Z"}'])
def test_malformed_messages_raise_decode_error(raw):
    with pytest.raises(DecodeError):
        Decoder().feed(raw, 42)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_decode_silently(raw):
    d = Decoder()
    try:
        out = d.feed(raw, 1)
    except (DecodeError, UnsupportedChangeError):
        return
    # Whatever was accepted must be a well-formed message: never a half-read transaction.
    assert out is None or out.end_lsn is not None


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 200), st.integers(1, 400))
def test_truncated_valid_messages_raise(cut, seq):
    msg = i(seq)
    d = Decoder()
    d.feed(b())
    if cut < len(msg):
        with pytest.raises(DecodeError):
            d.feed(msg[:cut], 5)


def frame(payload: bytes, lsn: int = 0x100) -> memoryview:
    """An XLogData message as it comes off the wire: 'w', start, WAL end, time, then the payload."""
    import struct

    return memoryview(b"w" + struct.pack("!QQQ", lsn, lsn, 0) + payload)


def test_batch_decode_matches_message_by_message_decode():
    msgs = [b(xid=7), i(1, xid=7), i(2, xid=7, data='{"n": [1, {"x": null}]}'), c(xid=7),
            b(xid=8, lsn="0/200", nextlsn="0/230"), i(3, stream="t", xid=8), c(xid=8, lsn="0/200", nextlsn="0/230")]
    one = Decoder()
    expected = [tx for tx in (one.feed(m, 1) for m in msgs) if tx]
    out: list = []
    # The commit's header start is the transaction's end (its nextlsn), as on the wire.
    Decoder().decode([frame(m, 0x130 if m is msgs[3] else 0x230 if m is msgs[6] else 0x100) for m in msgs], out)
    assert [(t.xid, t.commit_lsn, t.end_lsn, t.events) for t in out] == \
        [(t.xid, t.commit_lsn, t.end_lsn, t.events) for t in expected]


def test_batch_decode_notices_a_column_added_after_the_layout_was_learnt():
    d = Decoder()
    d.decode([frame(b()), frame(i(1))], [])
    with pytest.raises(UnsupportedChangeError, match="tenant"):
        d.decode([frame(i(2, extra=[{"name": "tenant", "type": "text", "value": "x"}]))], [])


def test_batch_decode_errors_carry_the_lsn_from_the_header():
    d = Decoder()
    d.decode([frame(b())], [])
    with pytest.raises(DecodeError) as info:
        d.decode([frame(b'{"action":"I","xid":7,"columns":', 0xABCDEF)], [])
    assert info.value.lsn == 0xABCDEF and "0/ABCDEF" in str(info.value)


def _stream(n_tx: int = 4, per: int = 3) -> list[memoryview]:
    """`n_tx` transactions of `per` inserts, framed as on the wire (the commit's header start
    is its nextlsn), with a logical message and an empty transaction among them."""
    msgs: list[memoryview] = []
    seq = 0
    for t in range(n_tx):
        lsn, nextlsn = f"0/{0x1000 * (t + 1):X}", f"0/{0x1000 * (t + 1) + 0x30:X}"
        msgs.append(frame(b(xid=100 + t, lsn=lsn, nextlsn=nextlsn), 0x1000 * t + 0x800))
        for _ in range(per if t != 2 else 0):
            seq += 1
            msgs.append(frame(i(seq, stream=f"s{seq % 2}", xid=100 + t), 0x1000 * t + 0x900))
        msgs.append(frame(c(xid=100 + t, lsn=lsn, nextlsn=nextlsn), 0x1000 * (t + 1) + 0x30))
        if t == 1:
            msgs.append(frame(orjson.dumps({"action": "M", "transactional": False, "prefix": "cdc",
                                            "content": "hb", "lsn": "0/2100"}), 0x2100))
    return msgs


def _summary(txs):
    return [(t.xid, t.commit_lsn, t.end_lsn, t.commit_time, t.part, t.final, t.events) for t in txs]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 30), max_size=6), st.integers(1, 4))
def test_batch_decode_gives_the_same_transactions_wherever_the_batches_are_cut(cuts, chunk):
    # The open transaction's state lives in locals during a batch and is saved at its end:
    # cutting the stream anywhere, with parts of any size, must not change what comes out.
    msgs = _stream()
    one = Decoder(chunk_events=chunk)
    expected = []
    for m in msgs:
        tx = one.feed(m[25:], 0)
        if tx is not None:
            expected.append(tx)
    d, out, at = Decoder(chunk_events=chunk), [], 0
    for cut in sorted(set(cuts)) + [len(msgs)]:
        d.decode(msgs[at:cut], out)
        at = max(at, cut)
    assert _summary(out) == _summary(expected)
    assert not d.in_transaction


@pytest.mark.parametrize("bad", [
    b'{"action":"B","xid":7,"timestamp":null,"lsn":"zz/1","nextlsn":"0/130"}',  # LSN not hex
    b'{"action":"B","xid":"7","lsn":"0/100","nextlsn":"0/130"}',  # xid not a number
    b'{"action":"B","xid":7,"nextlsn":"0/130"}',  # no lsn
])
def test_batch_decode_refuses_a_bad_begin(bad):
    with pytest.raises(DecodeError):
        Decoder().decode([frame(bad, 0x77)], [])


@pytest.mark.parametrize("bad", [
    b'{"action":"I","xid":7,"schema":"cdc","table":"events","columns":[{"name":"seq"}]}',  # no value
    b'{"action":"I","xid":7,"schema":"cdc","table":"events","columns":{"seq":1}}',  # not a list
    b'{"action":"I","xid":7,"schema":"cdc","table":"events"}',  # no columns
    b'{"action":"I","xid":7,"schema":"cdc","table":"other","columns":[]}',  # another table
    b'{"action":"I","xid":7,"schema":"cdc","table":"events","columns":[{"name":"seq","value":1}',  # cut
])
def test_batch_decode_refuses_a_bad_insert_and_keeps_the_transaction_open(bad):
    d = Decoder()
    out: list = []
    d.decode([frame(b()), frame(i(1))], out)
    with pytest.raises(DecodeError) as info:
        d.decode([frame(i(2)), frame(bad, 0x99)], out)
    assert info.value.lsn == 0x99 and out == []
    # Nothing of the transaction was handed over: it is delivered again after the fix.
    assert d.in_transaction


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400))
def test_batch_decode_refuses_every_truncated_insert(cut):
    msg = i(5)
    if cut >= len(msg):
        return
    d = Decoder()
    d.decode([frame(b())], [])
    with pytest.raises(DecodeError):
        d.decode([frame(msg[:cut])], [])
