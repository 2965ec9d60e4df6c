"""The records that cross layers: positions, events and the transactions that carry them.

Every source (the wal2json stream, the poller, a replay) produces the same `Transaction`s, so
sinks, checkpoints and the reconciler never need to know which path delivered an event.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson

from .jsontext import loads

Source = Literal["stream", "poll"]


class Lsn(int):
    """A WAL position. An int, so comparisons are free; printed the way Postgres prints it."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """Read ``'16/B374D848'`` (the pg_lsn text form)."""
        try:
            hi, lo = text.split("/")
            return cls((int(hi, 16) << 32) | int(lo, 16))
        except ValueError:
            raise ValueError(f"not an LSN: {text!r} (expected the form 16/B374D848)") from None

    def __str__(self) -> str:
        return f"{self >> 32:X}/{self & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn('{self}')"


class Event:
    """One row of the events table. The fields a mapped table lacks are None.

    `data_json` and `metadata_json` are the payloads' JSON text exactly as PostgreSQL produced it
    (`jsonb::text`): sinks splice it into their output unparsed, so numbers and documents reach
    them as PostgreSQL holds them. `data` and `metadata` parse it on first access (see
    `cdc.jsontext.loads` for the number policy: integers exact, other numbers float, or Decimal
    with `DecimalEvent`, which `Consumer(numbers="decimal")` makes).

    Read-only by contract. A slotted class rather than a frozen dataclass or a NamedTuple: as
    cheap to make as a tuple, with room for the parsed payloads once someone asks for them.
    """

    __slots__ = ("seq", "stream_id", "version", "type", "data_json", "metadata_json", "created_at",
                 "_data", "_metadata")
    _decimal = False

    seq: int
    stream_id: str
    version: int | None
    type: str | None
    data_json: str | None
    metadata_json: str | None
    created_at: datetime | None
    _data: Any
    _metadata: Any

    def __init__(self, seq: int, stream_id: str, version: int | None, type: str | None,
                 data_json: str | None, metadata_json: str | None, created_at: datetime | None):
        self.seq = seq
        self.stream_id = stream_id
        self.version = version
        self.type = type
        self.data_json = data_json
        self.metadata_json = metadata_json
        self.created_at = created_at

    @property
    def data(self) -> Any:
        """The data, parsed from `data_json` once (None where the table has no data column)."""
        try:
            return self._data
        except AttributeError:
            value = self._data = self._parse(self.data_json)
            return value

    @property
    def metadata(self) -> Any:
        """The metadata, parsed from `metadata_json` once."""
        try:
            return self._metadata
        except AttributeError:
            value = self._metadata = self._parse(self.metadata_json)
            return value

    def _parse(self, text: str | None) -> Any:
        # Most metadata is '{}': a new dict is five times cheaper than parsing one.
        if text is None:
            return None
        return {} if text == "{}" else loads(text, decimal=self._decimal)

    def _key(self) -> tuple[Any, ...]:
        return (self.seq, self.stream_id, self.version, self.type, self.data_json,
                self.metadata_json, self.created_at)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(seq={self.seq!r}, stream_id={self.stream_id!r}, version={self.version!r}, "
                f"type={self.type!r}, data_json={self.data_json!r}, metadata_json={self.metadata_json!r}, "
                f"created_at={self.created_at!r})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self._key())


class DecimalEvent(Event):
    """An Event whose `data` and `metadata` read non-integer numbers as `decimal.Decimal`."""

    __slots__ = ()
    _decimal = True


@dataclass(slots=True)
class Transaction:
    """The events one database transaction committed, in the order they were written.

    Read-only by contract (not frozen: a frozen dataclass costs 1.6 µs to make, a third of the
    whole per-transaction budget of the stream path).

    The stream path knows `xid`, `commit_lsn` (the commit record) and `end_lsn` (just past it:
    the position to acknowledge). The poll path knows `xid` only where the table records it, and
    neither LSN: its position is the seq high-water mark instead.

    A very large transaction is handed over in parts so memory stays bounded: every part but the
    last has ``final=False``, and only a final part may be acknowledged. After a crash the whole
    transaction is delivered again, from part 0.
    """

    xid: int | None
    commit_lsn: Lsn | None
    end_lsn: Lsn | None
    commit_time: datetime | None
    events: list[Event]
    source: Source
    part: int = 0
    final: bool = True

    @property
    def last_seq(self) -> int | None:
        return self.events[-1].seq if self.events else None

    def records(self) -> list[dict[str, Any]]:
        """The events as flat dicts (the sinks' record, see `wire_records`) with the payloads
        parsed into Python objects."""
        return [record(e, self) for e in self.events]


def record(event: Event, tx: Transaction) -> dict[str, Any]:
    """An event's record with its payloads parsed, for library code: `data` and `metadata` are
    Python objects here (see `Event.data`); the sinks write `wire_records` instead."""
    return {
        "seq": event.seq,
        "stream_id": event.stream_id,
        "version": event.version,
        "type": event.type,
        "data": event.data,
        "metadata": event.metadata,
        "created_at": event.created_at.isoformat() if event.created_at is not None else None,
        "xid": tx.xid,
        "commit_lsn": str(tx.commit_lsn) if tx.commit_lsn is not None else None,
        "source": tx.source,
    }


_Fragment = orjson.Fragment
_EMPTY = orjson.Fragment(b"{}")


def wire_records(tx: Transaction) -> list[dict[str, Any]]:
    """The published records of a transaction's events: the contract of the stdout, jsonl,
    webhook and dead-letter sinks. The payloads are `orjson.Fragment`s of the exact JSON text,
    so `orjson.dumps` splices them in unparsed (numbers exact, any depth)."""
    source, xid = tx.source, tx.xid
    commit = str(tx.commit_lsn) if tx.commit_lsn is not None else None
    fragment, empty = _Fragment, _EMPTY
    out = []
    for e in tx.events:
        d, m, t = e.data_json, e.metadata_json, e.created_at
        out.append({
            "seq": e.seq, "stream_id": e.stream_id, "version": e.version, "type": e.type,
            "data": None if d is None else fragment(d),
            "metadata": None if m is None else (empty if m == "{}" else fragment(m)),
            "created_at": t.isoformat() if t is not None else None,
            "xid": xid, "commit_lsn": commit, "source": source,
        })
    return out
