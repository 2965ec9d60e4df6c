"""wal2json format-version 2 messages → `Transaction`s. Pure: bytes in, transactions out.

One message a change, framed by B (begin) and C (commit). Both carry the commit record's LSN
(`lsn`) and the position just past it (`nextlsn`, what we acknowledge). An I carries its row.
Anything we cannot read raises DecodeError with the LSN and the raw text: a message is never
skipped, so the slot is never acknowledged past it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec
import orjson

from ..errors import DecodeError, UnsupportedChangeError
from ..events import Event, Lsn, Transaction
from ..store import DEFAULT_TABLE, EventTable
from .rows import DEFAULT_CHUNK_EVENTS, altered, jsonb_text, mapped_columns, parse_lsn, payload_reader

# The plugin options the decoder relies on, besides add-tables (from the mapping).
OPTIONS: dict[str, str] = {
    "format-version": "2",
    "include-xids": "1",
    "include-timestamp": "1",
    "include-lsn": "1",
    # Column types would only be parsed and dropped: without them each insert message is a
    # quarter shorter, for the walsender to write and for us to parse.
    "include-types": "0",
    # TRUNCATE must reach us so we can stop on it rather than go on as if nothing happened.
    "actions": "insert,truncate",
    "add-msg-prefixes": "cdc",
}

_loads = orjson.loads
_timestamp = datetime.fromisoformat


# The hot path reads B and I messages into typed structs: msgspec fills them in C, skipping the
# keys we do not need, about twice as fast as a dict from orjson (1.4 against 2.6 µs an insert
# with its values collected). gc=False: they hold only strings and numbers, never a cycle.
class _Column(msgspec.Struct, gc=False):
    name: str
    value: Any


class _Insert(msgspec.Struct, gc=False):
    schema: str
    table: str
    columns: list[_Column]


class _Begin(msgspec.Struct, gc=False):
    xid: int
    lsn: str
    nextlsn: str
    timestamp: str | None = None


_read_insert = msgspec.json.Decoder(_Insert).decode
_read_begin = msgspec.json.Decoder(_Begin).decode
_MISREAD = (msgspec.DecodeError, orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError)


def _start(message: memoryview) -> int:
    """The start LSN in an XLogData header."""
    return int(_unpack_start(message, 1)[0])


_unpack_start = struct.Struct("!Q").unpack_from
_new_lsn = int.__new__


def _event_builder(table: EventTable, new: type[Event]) -> Callable[[dict[str, Any]], Event]:
    """One closure per mapping: the per-insert work is lookups and conversions only. A column
    the mapping lacks is looked up as None, which no message has: the field stays None."""
    seq, stream_id, version, etype = table.seq, table.stream_id, table.version, table.type
    data, metadata, created_at = table.data, table.metadata, table.created_at
    read_data, read_metadata = payload_reader(table, data), payload_reader(table, metadata)

    def build(values: dict[Any, Any]) -> Event:
        get = values.get
        d, m, t = get(data), get(metadata), get(created_at)
        # wal2json gives bigint as a JSON number: no int() needed. stream_id is text for us but
        # may be a number in a mapped table, and Event.stream_id is always a str.
        sid = values[stream_id]
        return new(
            values[seq],
            sid if sid.__class__ is str else str(sid),
            get(version),
            get(etype),
            read_data(d) if d is not None else None,
            read_metadata(m) if m is not None else None,
            _timestamp(t) if t is not None else None,
        )

    return build


def _no_row(columns: list[_Column]) -> Event:
    raise AssertionError("no row layout learnt yet")  # unreachable: its length is -1


def _row_builder(table: EventTable, names: list[str], new: type[Event]) -> Callable[[list[_Column]], Event] | None:
    """The by-position twin of `_event_builder`, for a layout with every field present and
    jsonb payloads (cdc.events); None where the by-name path must serve."""
    columns = (table.seq, table.stream_id, table.version, table.type, table.data, table.metadata,
               table.created_at)
    encodings = {table.payload_encoding.get(c, "jsonb") for c in (table.data, table.metadata) if c}
    if not all(c and c in names for c in columns) or encodings - {"jsonb"}:
        return None
    i_seq, i_sid, i_ver, i_type, i_data, i_meta, i_time = (names.index(c) for c in columns)  # type: ignore[arg-type]
    timestamp, as_text = _timestamp, jsonb_text

    def row(c: list[_Column]) -> Event:
        sid, d, m, t = c[i_sid].value, c[i_data].value, c[i_meta].value, c[i_time].value
        # The payloads' text as it is (a jsonb's has no line breaks; a json column's may).
        if d.__class__ is not str or "\n" in d or "\r" in d:
            d = as_text(d)
        if m.__class__ is not str or "\n" in m or "\r" in m:
            m = as_text(m)
        return new(
            c[i_seq].value,
            sid if sid.__class__ is str else str(sid),
            c[i_ver].value,
            c[i_type].value,
            d,
            m,
            timestamp(t) if t is not None else None,
        )

    return row


class Decoder:
    """Assembles transactions from a stream of wal2json v2 messages.

    Feed each XLogData payload to `feed`; it returns a Transaction when one is complete (or a
    part of a huge one, every `chunk_events` events), else None. Transactions with no events
    (other tables, DDL, heartbeats) come out too, with `events == []`: they must be
    acknowledged like any other, or the slot would never advance on a busy database.
    """

    __slots__ = ("table", "chunk_events", "_xid", "_commit_lsn", "_end_lsn", "_time", "_events",
                 "_part", "_in_tx", "_known", "_name", "_schema", "_strict", "_build",
                 "_nextlsn", "_layout", "_new", "_required")

    def __init__(self, table: EventTable = DEFAULT_TABLE, *, chunk_events: int = DEFAULT_CHUNK_EVENTS,
                 event_class: type[Event] = Event):
        self.table = table
        self._new = event_class
        self.chunk_events = chunk_events
        self._in_tx = False
        self._events: list[Event] = []
        self._part = 0
        self._xid: int | None = None
        self._commit_lsn: Lsn | None = None
        self._end_lsn: Lsn | None = None
        self._time: datetime | None = None
        self._nextlsn = "0/0"
        self._known = mapped_columns(table)
        self._required = self._known  # every mapped column: one dropped or renamed stops the feed
        self._name, self._schema, self._strict = table.name, table.schema, table.strict
        self._build = _event_builder(table, event_class)
        # (column count, last column's name, builder by position) of the row layout last seen.
        # wal2json lists an insert's columns in attribute order; adding or dropping a column
        # changes the count or the last name, and then the by-name path checks and relearns.
        self._layout: tuple[int, str | None, Callable[[list[_Column]], Event]] = (-1, None, _no_row)

    @property
    def in_transaction(self) -> bool:
        return self._in_tx

    def decode(self, messages: list[memoryview], out: list[Transaction]) -> None:
        """Decode XLogData messages as they come off the wire ('w', three 8-byte header fields,
        then the plugin's bytes), appending finished transactions to `out`.

        The hot path: one call per batch, the open transaction's state in locals (saved back
        before anything else runs and at the end), begin/insert/commit inlined. Anything
        unusual goes through `feed`, which has every check; its errors carry the message's LSN
        from the header.
        """
        in_tx, events, part = self._in_tx, self._events, self._part
        xid, commit_lsn, ctime = self._xid, self._commit_lsn, self._time
        nextlsn, end_lsn = self._nextlsn, self._end_lsn
        chunk = self.chunk_events
        build, known, strict = self._build, self._known, self._strict
        layout_len, layout_last, build_row = self._layout
        name, schema = self._name, self._schema
        read_insert, read_begin, timestamp = _read_insert, _read_begin, _timestamp
        new_tx, new_lsn, unpack_start = Transaction, _new_lsn, _unpack_start
        for m in messages:
            # Bytes 25.. are the plugin's: '{"action":"X"...'; the action letter is byte 36.
            if len(m) > 38 and m[35] == 34 and m[37] == 34:
                action = m[36]
                if in_tx:
                    if action == 67 and m[-1] == 125:  # '{"action":"C"...}': nothing to read
                        # The commit's XLogData starts where the transaction ends (its nextlsn).
                        out.append(new_tx(xid, commit_lsn, new_lsn(Lsn, unpack_start(m, 1)[0]), ctime,
                                          events, "stream", part, True))
                        events = []
                        in_tx = False
                        continue
                    if action == 73:  # '{"action":"I"'
                        try:
                            ins = read_insert(m[25:])
                            if ins.table != name or ins.schema != schema:
                                raise KeyError("table")
                            cols = ins.columns
                            if len(cols) == layout_len and cols[-1].name == layout_last:
                                # The row layout seen before: read values by position.
                                events.append(build_row(cols))
                            else:
                                values = {c.name: c.value for c in cols}
                                if strict and not known.issuperset(values) or not known.issubset(values):
                                    raise self._altered(values, _start(m))
                                events.append(build(values))
                                self._learn([c.name for c in cols])
                                layout_len, layout_last, build_row = self._layout
                        except _MISREAD as err:
                            self._save(in_tx, events, part, xid, commit_lsn, ctime, nextlsn, end_lsn)
                            raise self._refused(m, err) from None
                        if len(events) >= chunk:
                            self._save(in_tx, events, part, xid, commit_lsn, ctime, nextlsn, end_lsn)
                            out.append(self._emit(final=False))
                            events, part, end_lsn = self._events, self._part, self._end_lsn
                        continue
                elif action == 66:  # '{"action":"B"'
                    try:
                        begin = read_begin(m[25:])
                        hi, _, lo = begin.lsn.partition("/")
                        commit_lsn = new_lsn(Lsn, (int(hi, 16) << 32) | int(lo, 16))
                        xid = begin.xid
                        stamp = begin.timestamp
                        ctime = timestamp(stamp) if stamp else None
                        nextlsn = begin.nextlsn  # parsed only if a part needs it
                    except _MISREAD as err:
                        self._save(in_tx, events, part, xid, commit_lsn, ctime, nextlsn, end_lsn)
                        raise self._refused(m, err) from None
                    end_lsn = None
                    in_tx = True
                    part = 0
                    continue
            self._save(in_tx, events, part, xid, commit_lsn, ctime, nextlsn, end_lsn)
            tx = self.feed(m[25:], _start(m))
            in_tx, events, part = self._in_tx, self._events, self._part
            xid, commit_lsn, ctime = self._xid, self._commit_lsn, self._time
            nextlsn, end_lsn = self._nextlsn, self._end_lsn
            if tx is not None:
                out.append(tx)
        self._save(in_tx, events, part, xid, commit_lsn, ctime, nextlsn, end_lsn)

    def _refused(self, m: memoryview, err: Exception) -> Exception:
        """The error for a message the fast path could not read: `feed`'s precise one, or, for
        what only the typed read refuses (a wrong type), one that says so."""
        lsn = _start(m)
        try:
            self.feed(m[25:], lsn)
        except (DecodeError, UnsupportedChangeError) as precise:
            return precise
        return self._error(f"unexpected value ({err})", m[25:], lsn)

    def _save(self, in_tx: bool, events: list[Event], part: int, xid: int | None, commit_lsn: Lsn | None,
              ctime: datetime | None, nextlsn: str, end_lsn: Lsn | None) -> None:
        self._in_tx, self._events, self._part = in_tx, events, part
        self._xid, self._commit_lsn, self._time = xid, commit_lsn, ctime
        self._nextlsn, self._end_lsn = nextlsn, end_lsn

    def feed(self, payload: bytes | memoryview, lsn: int = 0) -> Transaction | None:
        try:
            msg = _loads(payload)
            action = msg["action"]
        except (orjson.JSONDecodeError, TypeError, KeyError) as err:
            raise self._error(f"not a wal2json v2 message ({err})", payload, lsn) from None
        if action == "I":
            if not self._in_tx:
                raise self._error("insert outside a transaction", payload, lsn)
            if msg.get("table") != self._name or msg.get("schema") != self._schema:
                raise self._error(f"change of unknown table {msg.get('schema')}.{msg.get('table')}", payload, lsn)
            try:
                values = {c["name"]: c["value"] for c in msg["columns"]}
            except (KeyError, TypeError):
                raise self._error("insert without its columns", payload, lsn) from None
            if self._strict and not self._known.issuperset(values) or not self._required.issubset(values):
                raise self._altered(values, lsn)
            try:
                event = self._build(values)
            except KeyError as err:
                raise self._error(f"insert lacks column {err}: the table was altered", payload, lsn) from None
            except (ValueError, TypeError, AttributeError) as err:
                raise self._error(f"undecodable value ({err})", payload, lsn) from None
            events = self._events
            events.append(event)
            if len(events) >= self.chunk_events:
                return self._emit(final=False)
            return None
        if action == "B":
            if self._in_tx:
                raise self._error("begin inside a transaction (missing commit)", payload, lsn)
            try:
                self._xid = msg["xid"]
                self._commit_lsn = parse_lsn(msg["lsn"])
                self._end_lsn = parse_lsn(msg["nextlsn"])
                self._time = _timestamp(msg["timestamp"]) if msg.get("timestamp") else None
            except (KeyError, ValueError, TypeError) as err:
                raise self._error(f"begin without its LSNs ({err}): enable include-lsn", payload, lsn) from None
            self._in_tx = True
            self._part = 0
            return None
        if action == "C":
            if not self._in_tx:
                raise self._error("commit outside a transaction", payload, lsn)
            if msg.get("xid") != self._xid:
                raise self._error(f"commit of xid {msg.get('xid')} inside xid {self._xid}", payload, lsn)
            self._in_tx = False
            return self._emit(final=True)
        if action == "M":
            if not msg.get("transactional"):
                # Outside any transaction: acknowledge its position like an empty transaction.
                try:
                    at = parse_lsn(msg["lsn"])
                except (KeyError, ValueError, TypeError):
                    raise self._error("message without an LSN", payload, lsn) from None
                if self._in_tx:
                    return None
                return Transaction(None, at, at, None, [], "stream")
            return None
        if action == "T":
            raise UnsupportedChangeError(
                f"TRUNCATE of {msg.get('schema')}.{msg.get('table')} at {Lsn(lsn)} (xid {msg.get('xid')}): "
                "events were removed, so consumers can no longer be in step; rebuild them "
                "(cdc replay) and recreate the slot"
            )
        if action in ("U", "D"):
            raise UnsupportedChangeError(
                f"{'UPDATE' if action == 'U' else 'DELETE'} on {msg.get('schema')}.{msg.get('table')} at {Lsn(lsn)}: "
                "the events table must be append-only"
            )
        raise self._error(f"unknown action {action!r}", payload, lsn)

    def _emit(self, *, final: bool) -> Transaction:
        if self._end_lsn is None:
            self._end_lsn = parse_lsn(self._nextlsn)
        tx = Transaction(self._xid, self._commit_lsn, self._end_lsn, self._time, self._events,
                         "stream", self._part, final)
        self._events = []
        self._part += 1
        return tx

    def _learn(self, names: list[str]) -> None:
        row = _row_builder(self.table, names, self._new)
        self._layout = (len(names), names[-1], row) if row is not None and names else (-1, None, _no_row)

    def _altered(self, values: dict[str, Any], lsn: int) -> UnsupportedChangeError:
        return altered(self.table, self._known, self._required, values, Lsn(lsn))

    def _error(self, what: str, payload: bytes | memoryview, lsn: int) -> DecodeError:
        raw = bytes(payload)
        shown = raw[:2000].decode("utf-8", "replace")
        return DecodeError(f"cannot decode the wal2json message at {Lsn(lsn)}: {what}: {shown}", lsn=lsn, raw=raw)
