"""pgoutput (logical replication protocol version 1) messages → `Transaction`s. Pure: bytes in,
transactions out.

pgoutput is built into every PostgreSQL, allowed by every managed service, and costs the
walsender less per event than wal2json. Its messages are binary: B (begin: the commit record's
LSN, the commit time, the xid), R (a relation's columns, sent before its first change in a
session and again after it is altered), I (a row: each column's text output, or null), C
(commit: the commit record's LSN and the position just past it, which is what we acknowledge),
M (a logical message: our heartbeats), T (truncate), O and Y (origin, type: not needed). Only
committed transactions are sent, whole, at their commit: no streaming of in-progress ones is
asked for, so nothing here is ever handed over before its commit.

A row's values are the types' text output, exactly what wal2json quotes: a jsonb's text, a
timestamptz in the server's DateStyle, a bigint's digits. `rows` turns both plugins' values into
the same `Event`, so every sink writes the same bytes whichever plugin carried them.

A part of a huge transaction (every `chunk_events` events) is handed over before its commit
message arrives, so before its end is known: such parts carry ``commit_lsn + 1`` as `end_lsn`,
the lowest position past the commit's start. That is enough for what parts are used for
(deciding whether a transaction was handled before a restart: a handled one ends at or before
the acknowledged position, an unhandled one starts at or after it); only the final part, which
carries the real end, is ever acknowledged. Parts of one transaction are told apart by
(xid, commit_lsn), never by end_lsn.

Anything we cannot read raises DecodeError with the LSN and the raw bytes: a message is never
skipped, so the slot is never acknowledged past it.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from ..errors import DecodeError, UnsupportedChangeError
from ..events import Event, Lsn, Transaction
from ..store import DEFAULT_TABLE, EventTable
from .rows import DEFAULT_CHUNK_EVENTS, altered, jsonb_text, mapped_columns, payload_reader

log = logging.getLogger("cdc.decoders.pgoutput")

PROTO_VERSION = "1"

_BEGIN = struct.Struct("!QqI")      # final (commit) LSN, commit time, xid
_COMMIT = struct.Struct("!BQQq")    # flags, commit LSN, end LSN, commit time
_MESSAGE = struct.Struct("!BQ")     # flags (1: transactional), LSN
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_COLUMN_TAIL = struct.Struct("!Ii")  # type oid, type modifier
_HEADER = 25                        # 'w', start, end, send time: then the plugin's bytes
_JSONB = 3802                       # pg_type oid of jsonb
_PG_EPOCH_UNIX = 946_684_800
_fromtimestamp = datetime.fromtimestamp
_timestamp = datetime.fromisoformat
_new_lsn = int.__new__


def options(publication: str) -> dict[str, str]:
    """START_REPLICATION options: protocol 1 (every server since 10), our publication, and
    logical messages (heartbeats go through them)."""
    return {"proto_version": PROTO_VERSION, "publication_names": publication, "messages": "true"}


def _as_is(text: str) -> str:
    return text


def _commit_time(us: int) -> datetime:
    # A float of the Unix time is within 0.2 µs of the exact one for any date this century, and
    # fromtimestamp rounds to the microsecond: exact, and a third of timedelta arithmetic's cost.
    return _fromtimestamp(_PG_EPOCH_UNIX + us / 1e6, timezone.utc)


class _Relation:
    """A relation as its last R message described it. `build` is set only for the events table."""

    __slots__ = ("oid", "schema", "name", "columns", "build", "width")

    def __init__(self, oid: int, schema: str, name: str, columns: list[str],
                 build: Callable[[list[Any]], Event] | None):
        self.oid, self.schema, self.name, self.columns, self.build = oid, schema, name, columns, build
        self.width = len(columns)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def _row_builder(table: EventTable, names: list[str], types: list[int], new: type[Event]) -> Callable[[list[Any]], Event]:
    """The events table's row → an Event. The row is the columns' text as bytes (None for null)
    in relation order, plus one None at the end, where every column the mapping lacks points:
    per row, only lookups and conversions, no test of what the layout has. Integers are read from
    the bytes directly; only the text fields are decoded (the xid column not at all). A jsonb
    payload's text is taken as it is: jsonb's output has no line breaks to fold."""
    absent = len(names)

    def at(column: str | None) -> int:
        return names.index(column) if column else absent

    i_seq, i_sid, i_ver, i_type = at(table.seq), at(table.stream_id), at(table.version), at(table.type)
    i_data, i_meta, i_time = at(table.data), at(table.metadata), at(table.created_at)
    read_data, read_meta = payload_reader(table, table.data), payload_reader(table, table.metadata)
    if i_data < absent and types[i_data] == _JSONB and read_data is jsonb_text:
        read_data = _as_is
    if i_meta < absent and types[i_meta] == _JSONB and read_meta is jsonb_text:
        read_meta = _as_is
    timestamp = _timestamp

    def build(v: list[Any]) -> Event:
        ver, typ, d, m, t = v[i_ver], v[i_type], v[i_data], v[i_meta], v[i_time]
        return new(
            int(v[i_seq]),
            v[i_sid].decode(),
            None if ver is None else int(ver),
            None if typ is None else typ.decode(),
            None if d is None else read_data(d.decode()),
            None if m is None else read_meta(m.decode()),
            None if t is None else timestamp(t.decode()),
        )

    return build


class Decoder:
    """Assembles transactions from a stream of pgoutput messages.

    Same contract as the wal2json decoder: `decode(messages, out)` appends finished
    transactions (and parts of huge ones); transactions without events come out too, to be
    acknowledged; `in_transaction` says whether one is open.
    """

    __slots__ = ("table", "chunk_events", "_new", "_relations", "_in_tx", "_xid", "_commit_lsn",
                 "_time", "_events", "_part", "_known", "_required", "_strict", "_warned")

    def __init__(self, table: EventTable = DEFAULT_TABLE, *, chunk_events: int = DEFAULT_CHUNK_EVENTS,
                 event_class: type[Event] = Event):
        self.table = table
        self.chunk_events = chunk_events
        self._new = event_class
        self._relations: dict[int, _Relation] = {}
        self._in_tx = False
        self._xid: int | None = None
        self._commit_lsn: Lsn | None = None
        self._time: datetime | None = None
        self._events: list[Event] = []
        self._part = 0
        self._known = mapped_columns(table)
        self._required = self._known
        self._strict = table.strict
        self._warned: set[int] = set()

    @property
    def in_transaction(self) -> bool:
        return self._in_tx

    def decode(self, messages: list[memoryview], out: list[Transaction]) -> None:
        """Decode XLogData messages as they come off the wire, appending finished transactions
        to `out`. The hot path: the open transaction's state in locals (saved back before
        anything else runs, and at the end), inserts, begins and commits inline; the rest goes
        through `_other`."""
        relations, chunk, new_lsn, new_tx, stamp_of = self._relations, self.chunk_events, _new_lsn, Transaction, _commit_time
        unpack_begin, unpack_commit, u32, u16 = _BEGIN.unpack_from, _COMMIT.unpack_from, _U32.unpack_from, _U16.unpack_from
        in_tx, events, part, xid, commit_lsn, ctime = (self._in_tx, self._events, self._part, self._xid,
                                                       self._commit_lsn, self._time)
        try:
            for m in messages:
                kind = m[25]
                if kind == 73 and in_tx:  # 'I': relation oid, 'N', then the new row
                    try:
                        rel = relations[u32(m, 26)[0]]
                        build = rel.build
                        if build is None:
                            self._foreign(rel, "INSERT", m)
                            continue
                        row = bytes(m)
                        if row[30] != 78:
                            raise ValueError("no new row ('N')")
                        n = u16(row, 31)[0]
                        values: list[Any] = []
                        append = values.append
                        pos = 33
                        for _ in range(n):
                            k = row[pos]
                            if k == 116:  # 't': length, then the text
                                end = pos + 5 + u32(row, pos + 1)[0]
                                append(row[pos + 5:end])
                                pos = end
                            elif k == 110:  # 'n': null
                                append(None)
                                pos += 1
                            else:  # 'u' (unchanged TOAST: never in an insert) or 'b' (binary: not asked for)
                                raise ValueError(f"column kind {chr(k)!r}")
                        if pos != len(row) or n != rel.width:
                            raise ValueError(f"{n} columns in {len(row) - 33} bytes, for a relation of {rel.width}")
                        append(None)  # where the columns the mapping lacks point
                        events.append(build(values))
                    except KeyError:
                        raise self._error("insert before the Relation message of its table", m) from None
                    except (ValueError, IndexError, TypeError, AttributeError, struct.error, UnicodeDecodeError) as err:
                        raise self._error(f"unreadable row ({err})", m) from None
                    if len(events) >= chunk:
                        # Its end is not known before its commit: a lower bound (see the module's doc).
                        out.append(new_tx(xid, commit_lsn, new_lsn(Lsn, commit_lsn + 1), ctime, events,  # type: ignore[operator]
                                          "stream", part, False))
                        events = []
                        part += 1
                    continue
                if kind == 66 and not in_tx:  # 'B'
                    try:
                        final, stamp, xid = unpack_begin(m, 26)
                    except struct.error:
                        raise self._error("short begin", m) from None
                    commit_lsn = new_lsn(Lsn, final)
                    ctime = stamp_of(stamp)
                    in_tx = True
                    part = 0
                    continue
                if kind == 67 and in_tx:  # 'C'
                    try:
                        _, at, end_lsn, _ = unpack_commit(m, 26)
                    except struct.error:
                        raise self._error("short commit", m) from None
                    if at != commit_lsn:
                        raise self._error(f"commit at {Lsn(at)} inside the transaction that commits at {commit_lsn}", m)
                    out.append(new_tx(xid, commit_lsn, new_lsn(Lsn, end_lsn), ctime, events, "stream", part, True))
                    events = []
                    in_tx = False
                    continue
                self._in_tx, self._events, self._part = in_tx, events, part
                self._xid, self._commit_lsn, self._time = xid, commit_lsn, ctime
                tx = self._other(kind, m)
                if tx is not None:
                    out.append(tx)
        finally:
            self._in_tx, self._events, self._part = in_tx, events, part
            self._xid, self._commit_lsn, self._time = xid, commit_lsn, ctime

    def _other(self, kind: int, m: memoryview) -> Transaction | None:
        """Every message but an insert, begin or commit in its place."""
        if kind == 82:  # 'R'
            self._relation(m)
            return None
        if kind == 77:  # 'M': a logical message
            try:
                flags, lsn = _MESSAGE.unpack_from(m, 26)
            except struct.error:
                raise self._error("short message", m) from None
            if flags & 1 or self._in_tx:
                return None  # transactional: its transaction is acknowledged at its commit
            at = Lsn(lsn)
            return Transaction(None, at, at, None, [], "stream")
        if kind in (79, 89):  # 'O' origin, 'Y' type: nothing an event needs
            return None
        if kind == 84:  # 'T': relation count, options, oids
            if not self._in_tx:
                raise self._error("truncate outside a transaction", m)
            try:
                count = _U32.unpack_from(m, 26)[0]
                oids = [_U32.unpack_from(m, 31 + 4 * i)[0] for i in range(count)]
            except struct.error:
                raise self._error("short truncate", m) from None
            for oid in oids:
                rel = self._relations.get(oid)
                if rel is not None and rel.build is not None:
                    raise UnsupportedChangeError(
                        f"TRUNCATE of {rel.qualified} at {Lsn(_start(m))} (xid {self._xid}): events were removed, "
                        "so consumers can no longer be in step; rebuild them (cdc replay) and recreate the slot"
                    )
            return None
        if kind in (85, 68):  # 'U', 'D'
            what = "UPDATE" if kind == 85 else "DELETE"
            rel = self._relations.get(_U32.unpack_from(m, 26)[0]) if len(m) >= 30 else None
            if rel is not None and rel.build is None:
                self._foreign(rel, what, m)
                return None
            name = rel.qualified if rel is not None else self.table.qualified
            raise UnsupportedChangeError(f"{what} on {name} at {Lsn(_start(m))}: the events table must be append-only")
        if kind == 73:
            raise self._error("insert outside a transaction", m)
        if kind == 66:
            raise self._error("begin inside a transaction (missing commit)", m)
        if kind == 67:
            raise self._error("commit outside a transaction", m)
        raise self._error(f"unexpected message {chr(kind)!r} (streamed or two-phase transactions are not asked for)", m)

    def _relation(self, m: memoryview) -> None:
        """Learn a relation's columns. Ours must have exactly the mapped ones (strict) or at least
        them: an R message is sent before the first change after an ALTER, so an altered events
        table stops the feed here, before any of its rows is handed over."""
        raw = bytes(m[_HEADER:])
        try:
            oid = _U32.unpack_from(raw, 1)[0]
            schema, pos = _cstring(raw, 5)
            name, pos = _cstring(raw, pos)
            pos += 1  # replica identity
            count = _U16.unpack_from(raw, pos)[0]
            pos += 2
            columns, types = [], []
            for _ in range(count):
                column, pos = _cstring(raw, pos + 1)  # after the flags
                types.append(_COLUMN_TAIL.unpack_from(raw, pos)[0])
                pos += _COLUMN_TAIL.size
                columns.append(column)
        except (ValueError, struct.error, UnicodeDecodeError) as err:
            raise self._error(f"unreadable relation ({err})", m) from None
        build = None
        if schema == self.table.schema and name == self.table.name:
            if self._strict and not self._known.issuperset(columns) or not self._required.issubset(columns):
                raise altered(self.table, self._known, self._required, columns, Lsn(_start(m)))
            build = _row_builder(self.table, columns, types, self._new)
        self._relations[oid] = _Relation(oid, schema, name, columns, build)

    def _foreign(self, rel: _Relation, what: str, m: memoryview) -> None:
        """A change of another table: the publication names more than the events table (made by
        hand, or FOR ALL TABLES). Not an event: skipped, said once per table."""
        if rel.oid not in self._warned:
            self._warned.add(rel.oid)
            log.warning("skipping changes of %s (first: %s at %s): the publication publishes more than %s; "
                        "cdc check says which", rel.qualified, what, Lsn(_start(m)), self.table.qualified)

    def _error(self, what: str, m: memoryview) -> DecodeError:
        lsn = _start(m)
        raw = bytes(m[_HEADER:])
        return DecodeError(f"cannot decode the pgoutput message at {Lsn(lsn)}: {what}: {raw[:600].hex()}",
                           lsn=lsn, raw=raw)


def _start(m: memoryview) -> int:
    return int(struct.unpack_from("!Q", m, 1)[0])


def _cstring(raw: bytes, pos: int) -> tuple[str, int]:
    end = raw.index(0, pos)
    return raw[pos:end].decode(), end + 1
