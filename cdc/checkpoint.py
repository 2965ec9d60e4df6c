"""Where each consumer stands, saved in the database, moving only forward.

A position has two coordinates, because the two paths count differently:
- `lsn`: the end of the last transaction handled from the stream (what the slot may be
  acknowledged up to);
- `seq` + `seqs_above`: every seq at or below `seq` is handled or proven never to commit, and
  `seqs_above` lists handled ones beyond it. The stream hands events over in commit order, so a
  few handled seqs sit above the contiguous mark; the poller hands over in seq order and keeps
  `seqs_above` empty. Either path can take over from the other's position with nothing missed
  and nothing twice.

The exactly-once variant: `save(..., conn=c)` inside the handler's own transaction.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any

import orjson
import psycopg
from psycopg_pool import ConnectionPool

from .errors import CdcError, ConfigError
from .events import Lsn, Transaction
from .store import EventTable

DEFAULT_CONSUMER = "default"
LEGACY_SLOT = "cdc"  # every consumer's default slot before slots were per consumer


def default_slot(consumer: str) -> str:
    """The slot a consumer reads unless told otherwise: its own, so two consumers never share
    one by default (a shared slot is acknowledged by whichever ran last, and each re-creates it
    with a replay when it finds the other's position). `cdc` for the default consumer, as ever."""
    if consumer == DEFAULT_CONSUMER:
        return LEGACY_SLOT
    name = re.sub(r"[^a-z0-9_]", "_", consumer.lower())
    if name != consumer or len(name) > 59:
        # Two names that read the same once lowered and cleaned still get two slots.
        name = f"{name[:50]}_{hashlib.sha1(consumer.encode()).hexdigest()[:8]}"
    return f"cdc_{name}"


@dataclass(frozen=True)
class Position:
    lsn: Lsn | None = None
    seq: int = 0
    seqs_above: frozenset[int] = field(default_factory=frozenset)

    def handled(self, seq: int) -> bool:
        """True when the event `seq` was already handled (so a replay must skip it)."""
        return seq <= self.seq or seq in self.seqs_above


def mapping_json(table: EventTable) -> str:
    """The table mapping as saved with a consumer's checkpoint."""
    return orjson.dumps(asdict(table)).decode()


def saved_mapping(conn: psycopg.Connection, consumer: str) -> EventTable | None:
    """The table mapping `consumer` last ran with, if it recorded one."""
    try:
        row = conn.execute("SELECT mapping::text FROM cdc.checkpoints WHERE consumer = %s", (consumer,)).fetchone()
    except psycopg.Error:  # no schema, an older one, no grant: the command itself says so
        return None
    if row is None or row[0] is None:
        return None
    fields = orjson.loads(row[0])
    known = {f.name for f in dataclass_fields(EventTable)}
    return EventTable(**{k: v for k, v in fields.items() if k in known})


# A save by a consumer that does not record its deliveries opens an unrecorded window (from the
# position before it) unless one is open; a recording run's start closes it (deliveries.py).
_SAVE = """
INSERT INTO cdc.checkpoints AS c (consumer, lsn, seq, seqs_above, slot, mapping, updated_at, unrecorded)
VALUES (%(consumer)s, %(lsn)s::pg_lsn, %(seq)s, %(above)s, %(slot)s, %(mapping)s::jsonb, now(),
        CASE WHEN %(recording)s THEN '[]'::jsonb ELSE jsonb_build_array(jsonb_build_object(
            'from_lsn', NULL, 'from_seq', 0, 'from_seqs_above', '[]'::jsonb, 'started_at', now())) END)
ON CONFLICT (consumer) DO UPDATE SET
    unrecorded = CASE
        WHEN %(recording)s OR (jsonb_array_length(c.unrecorded) > 0 AND NOT (c.unrecorded -> -1 ? 'to_seq'))
        THEN c.unrecorded
        ELSE c.unrecorded || jsonb_build_array(jsonb_build_object(
            'from_lsn', c.lsn::text, 'from_seq', c.seq, 'from_seqs_above', to_jsonb(c.seqs_above),
            'started_at', now())) END,
    slot = coalesce(excluded.slot, c.slot),
    mapping = coalesce(excluded.mapping, c.mapping),
    lsn = greatest(c.lsn, excluded.lsn),
    seqs_above = CASE WHEN excluded.seq > c.seq THEN excluded.seqs_above
                      WHEN excluded.seq = c.seq THEN ARRAY(SELECT DISTINCT unnest(c.seqs_above || excluded.seqs_above) ORDER BY 1)
                      ELSE c.seqs_above END,
    seq = greatest(c.seq, excluded.seq),
    updated_at = now()
"""


class Checkpoints:
    """Load and save one consumer's position."""

    def __init__(self, pool: ConnectionPool, consumer: str):
        self.pool = pool
        self.consumer = consumer
        self.slot: str | None = None  # recorded with each save once the stream claimed it
        self.mapping: str | None = None  # the table mapping as JSON, recorded with each save
        self.recording = False  # whether this run records its deliveries (reconcile's windows)

    def load(self) -> Position | None:
        with self.pool.connection() as conn:
            try:
                conn.execute("SELECT slot, mapping, unrecorded FROM cdc.checkpoints LIMIT 0")
            except psycopg.errors.UndefinedColumn:
                raise CdcError("cdc.checkpoints lacks the slot, mapping and unrecorded columns (a schema from an earlier "
                               "cdc): run `cdc setup` as the owner of schema cdc to upgrade it") from None
            return load(conn, self.consumer)

    def save(self, position: Position, *, conn: psycopg.Connection | None = None) -> None:
        """Save `position`. With `conn`, inside that connection's current transaction (the
        projection handler's), so the handler's writes and the position commit together."""
        if conn is not None:
            save(conn, self.consumer, position, self.slot, self.mapping, self.recording)
            return
        with self.pool.connection() as c:
            save(c, self.consumer, position, self.slot, self.mapping, self.recording)

    def claim(self, slot: str) -> str | None:
        """Refuse a slot another consumer's checkpoint records; else return the slot this
        consumer last read (None if it never recorded one), and record `slot` from the next save."""
        with self.pool.connection() as conn:
            rows = conn.execute("SELECT consumer, slot FROM cdc.checkpoints WHERE slot = %s OR consumer = %s",
                                (slot, self.consumer)).fetchall()
        others = sorted(r[0] for r in rows if r[0] != self.consumer)
        if others:
            raise ConfigError(
                f"slot {slot} is read by consumer {others[0]!r} (its checkpoint in cdc.checkpoints): give "
                f"consumer {self.consumer!r} its own --slot (or none: the default is {default_slot(self.consumer)}); "
                f"two consumers on one slot acknowledge each other's events")
        self.slot = slot
        return next((r[1] for r in rows if r[0] == self.consumer), None)

    def reset(self) -> None:
        """Forget the position: the next run starts from the beginning."""
        with self.pool.connection() as conn:
            conn.execute("DELETE FROM cdc.checkpoints WHERE consumer = %s", (self.consumer,))


def load(conn: psycopg.Connection, consumer: str) -> Position | None:
    row = conn.execute(
        "SELECT lsn::text, seq, seqs_above FROM cdc.checkpoints WHERE consumer = %s", (consumer,)
    ).fetchone()
    if row is None:
        return None
    return Position(Lsn.parse(row[0]) if row[0] else None, int(row[1]), frozenset(row[2] or ()))


def save(conn: psycopg.Connection, consumer: str, position: Position, slot: str | None = None,
         mapping: str | None = None, recording: bool = False) -> None:
    conn.execute(
        _SAVE,
        {
            "consumer": consumer,
            "lsn": str(position.lsn) if position.lsn is not None else None,
            "seq": position.seq,
            "above": sorted(position.seqs_above),
            "slot": slot,
            "mapping": mapping,
            "recording": recording,
        },
    )


def cut_short(held: tuple[int | None, Lsn | None, int] | None, tx: Transaction) -> bool:
    """Whether `tx` shows that the transaction whose parts up to `held` are open in the
    database will not be continued: another transaction, or the same one from an earlier part."""
    if held is None:
        return False
    xid, commit, part = held
    return (tx.xid, tx.commit_lsn) != (xid, commit) or tx.part <= part


def durable(conn: psycopg.Connection) -> psycopg.Connection:
    """`conn` with synchronous_commit on for its session, whatever the server's default."""
    conn.execute("SET synchronous_commit TO on")
    return conn


class Projection:
    """A sink whose handler writes into the database in the same transaction as the checkpoint.

    `handler(conn, tx)` runs inside a transaction on `conn`; the consumer's position is saved
    in that same transaction, so the handler's effect and "this transaction is done" commit
    together or not at all: exactly-once, even after kill -9. A transaction handed over in parts
    is one database transaction from its first part to its final one. The connection commits with
    synchronous_commit on (set here, for this session): a commit that returned must survive a
    crash, or the feed would move past effects the database then forgets.
    """

    def __init__(
        self,
        handler: Callable[[psycopg.Connection, Transaction], object],
        conn: psycopg.Connection,
        *,
        consumer: str = "default",
    ):
        self.handler = handler
        self.conn = durable(conn)
        self.consumer = consumer
        self._open: AbstractContextManager[object] | None = None
        # (xid, commit LSN, last part) held open: a transaction's identity across its parts (their
        # end_lsn is not: pgoutput knows a transaction's end only at its last part).
        self._open_part: tuple[int | None, Lsn | None, int] | None = None
        self._seqs: list[int] = []  # of the transaction in progress, all its parts
        # The consumer's delivery record, when it records (set by `Consumer.record_in(sink)`):
        # written in the projection's transaction, so a crash between the projection's commit
        # and the consumer's next checkpoint cannot leave effects the record does not show.
        self.deliveries: Any = None
        self._parts: list[Transaction] = []

    def write(self, tx: Transaction) -> None:
        opened = self._open
        if opened is not None and cut_short(self._open_part, tx):
            # The feed reconnected inside a huge transaction and delivers it again from its
            # start (or moved on): the parts held open are uncommitted; undo them first.
            self._open, self._seqs, self._parts = None, [], []
            abandon(opened)
            opened = None
        if opened is None:
            opened = self._open = self.conn.transaction()
            opened.__enter__()
        self._open_part = (tx.xid, tx.commit_lsn, tx.part)
        try:
            if tx.events:
                self.handler(self.conn, tx)
                self._seqs.extend(e.seq for e in tx.events)
                if self.deliveries is not None:
                    self._parts.append(tx)
            if tx.final:
                if self._parts:
                    self.deliveries.record(self._parts, conn=self.conn)
                # The stream position and the seqs themselves: a later hand-off replays by seq
                # (from the consumer's position, which this row feeds), so it must know them too.
                # The consumer's next checkpoint folds the seqs into its contiguous mark.
                self.conn.execute(
                    "INSERT INTO cdc.checkpoints AS c (consumer, lsn, seqs_above) VALUES (%s, %s::pg_lsn, %s) "
                    "ON CONFLICT (consumer) DO UPDATE SET lsn = greatest(c.lsn, excluded.lsn), "
                    "seqs_above = ARRAY(SELECT DISTINCT s FROM unnest(c.seqs_above || excluded.seqs_above) s "
                    "WHERE s > c.seq ORDER BY 1), updated_at = now()",
                    (self.consumer, str(tx.end_lsn) if tx.end_lsn is not None else None, self._seqs),
                )
        except BaseException as err:
            self._open = None
            self._seqs, self._parts = [], []
            opened.__exit__(type(err), err, err.__traceback__)
            raise
        if tx.final:
            self._open = None
            self._parts = []
            self._seqs = []
            opened.__exit__(None, None, None)  # commit: the handler's writes and the position

    def flush(self) -> None:
        pass

    def reset(self, conn: psycopg.Connection) -> None:
        """Write through `conn` from now on: the old connection broke, and the transaction
        open on it is gone (rolled back by the server)."""
        self.conn = durable(conn)
        self._open = None
        self._seqs = []

    def close(self) -> None:
        if self._open is not None:  # a huge transaction cut short: undo its parts
            opened, self._open = self._open, None
            self._seqs = []
            abandon(opened)


class _Abandoned(Exception):
    pass


def abandon(opened: AbstractContextManager[object]) -> None:
    """Roll back a database transaction held open across the parts of a huge one."""
    opened.__exit__(_Abandoned, _Abandoned(), None)
