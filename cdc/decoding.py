"""wal2json format-version 2 messages → `Transaction`s. Pure: bytes in, transactions out.

One message a change, framed by B (begin) and C (commit). Both carry the commit record's LSN
(`lsn`) and the position just past it (`nextlsn`, what we acknowledge). An I carries its row.
Anything we cannot read raises DecodeError with the LSN and the raw text: a message is never
skipped, so the slot is never acknowledged past it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from .errors import DecodeError, UnsupportedChangeError
from .events import Event, Lsn, Transaction
from .store import DEFAULT_TABLE, EventTable

DEFAULT_CHUNK_EVENTS = 10_000

# The plugin options the decoder relies on, besides add-tables (from the mapping).
PLUGIN_OPTIONS: dict[str, str] = {
    "format-version": "2",
    "include-xids": "1",
    "include-timestamp": "1",
    "include-lsn": "1",
    # TRUNCATE must reach us so we can stop on it rather than go on as if nothing happened.
    "actions": "insert,truncate",
    "add-msg-prefixes": "cdc",
}

_loads = orjson.loads
_timestamp = datetime.fromisoformat


def parse_lsn(text: str) -> Lsn:
    hi, _, lo = text.partition("/")
    return Lsn((int(hi, 16) << 32) | int(lo, 16))


class Decoder:
    """Assembles transactions from a stream of wal2json v2 messages.

    Feed each XLogData payload to `feed`; it returns a Transaction when one is complete (or a
    part of a huge one, every `chunk_events` events), else None. Transactions with no events
    (other tables, DDL, heartbeats) come out too, with `events == []`: they must be
    acknowledged like any other, or the slot would never advance on a busy database.
    """

    __slots__ = ("table", "chunk_events", "_xid", "_commit_lsn", "_end_lsn", "_time", "_events",
                 "_part", "_in_tx", "_known", "_fields", "_json_cols", "messages")

    def __init__(self, table: EventTable = DEFAULT_TABLE, *, chunk_events: int = DEFAULT_CHUNK_EVENTS):
        self.table = table
        self.chunk_events = chunk_events
        self._in_tx = False
        self._events: list[Event] = []
        self._part = 0
        self._xid: int | None = None
        self._commit_lsn: Lsn | None = None
        self._end_lsn: Lsn | None = None
        self._time: datetime | None = None
        self.messages: list[tuple[str, str]] = []  # (prefix, content) of our logical messages
        cols = (table.seq, table.stream_id, table.version, table.type, table.data,
                table.metadata, table.created_at, table.xid)
        self._fields = cols
        self._known = frozenset(c for c in cols if c)
        self._json_cols = {c: table.payload_encoding.get(c, "jsonb") for c in (table.data, table.metadata) if c}

    @property
    def in_transaction(self) -> bool:
        return self._in_tx

    def feed(self, payload: bytes | memoryview, lsn: int = 0) -> Transaction | None:
        try:
            msg = _loads(payload)
            action = msg["action"]
        except (orjson.JSONDecodeError, TypeError, KeyError) as err:
            raise self._error(f"not a wal2json v2 message ({err})", payload, lsn) from None
        if action == "I":
            if not self._in_tx:
                raise self._error("insert outside a transaction", payload, lsn)
            self._events.append(self._event(msg, payload, lsn))
            if len(self._events) >= self.chunk_events:
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
            self.messages.append((str(msg.get("prefix")), str(msg.get("content"))))
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
        tx = Transaction(self._xid, self._commit_lsn, self._end_lsn, self._time, self._events,
                         "stream", self._part, final)
        self._events = []
        self._part += 1
        return tx

    def _event(self, msg: dict[str, Any], payload: bytes | memoryview, lsn: int) -> Event:
        t = self.table
        if msg.get("table") != t.name or msg.get("schema") != t.schema:
            raise self._error(f"change of unknown table {msg.get('schema')}.{msg.get('table')}", payload, lsn)
        try:
            values = {c["name"]: c["value"] for c in msg["columns"]}
        except (KeyError, TypeError):
            raise self._error("insert without its columns", payload, lsn) from None
        if t.strict and not self._known.issuperset(values):
            extra = sorted(set(values) - self._known)
            raise UnsupportedChangeError(
                f"{t.qualified} has columns cdc does not know ({', '.join(extra)}) at {Lsn(lsn)}: "
                "the table was altered; undo the change or map the table (--preset, --*-column)"
            )
        try:
            seq, stream_id, version, etype, data, metadata, created_at, _ = self._fields
            return Event(
                int(values[seq]),
                str(values[stream_id]),
                values[version] if version else None,
                values[etype] if etype else None,
                self._json(data, values[data]) if data else None,
                self._json(metadata, values[metadata]) if metadata else None,
                _timestamp(values[created_at]) if created_at and values[created_at] is not None else None,
            )
        except KeyError as err:
            raise self._error(f"insert lacks column {err}: the table was altered", payload, lsn) from None
        except (ValueError, TypeError) as err:
            raise self._error(f"undecodable value ({err})", payload, lsn) from None

    def _json(self, column: str, value: Any) -> Any:
        if value is None:
            return None
        encoding = self._json_cols[column]
        if encoding == "jsonb":
            return _loads(value)
        if encoding == "bytea":
            raw = bytes.fromhex(value[2:] if value.startswith("\\x") else value)
            try:
                return _loads(raw)
            except orjson.JSONDecodeError:
                return raw.hex()
        return value

    def _error(self, what: str, payload: bytes | memoryview, lsn: int) -> DecodeError:
        raw = bytes(payload)
        shown = raw[:2000].decode("utf-8", "replace")
        return DecodeError(f"cannot decode the wal2json message at {Lsn(lsn)}: {what}: {shown}", lsn=lsn, raw=raw)
