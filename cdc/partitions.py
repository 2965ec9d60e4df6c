"""The exactly-once projection with N workers: a partition a worker, each with its own
connection and its own checkpoint row ("<consumer>#w<i>of<N>" in cdc.checkpoints), written in the
same database transaction as the handler's slice, so replays skip what a partition applied.

    consumer = Consumer(dsn, consumer="orders", auto_ack=False)
    with ParallelProjection(consumer, project, workers=8) as p:
        p.run()
    consumer.close()

The dispatching (slices, queues, the acknowledged low watermark) is workers.py's; this module is
what the partitions record and how a restart, a hand-off or a new worker count stays exactly-once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import psycopg

from .checkpoint import Position, abandon, cut_short, durable, load
from .connection import connect
from .errors import ConfigError, SinkError
from .events import Event, Lsn, Transaction
from .workers import DEFAULT_QUEUE_EVENTS, DEFAULT_QUEUE_SIZE, ParallelDispatcher, stream_key

log = logging.getLogger("cdc.partitions")


# A partition's row: the stream position it reached, and every seq it applied that the
# consumer's own mark does not cover yet (pruned here as that mark moves).
_PARTITION_SAVE = """
INSERT INTO cdc.checkpoints AS c (consumer, lsn, seqs_above) VALUES (%(name)s, %(lsn)s::pg_lsn, %(seqs)s)
ON CONFLICT (consumer) DO UPDATE SET lsn = greatest(c.lsn, excluded.lsn), seqs_above = ARRAY(
    SELECT DISTINCT s FROM unnest(c.seqs_above || excluded.seqs_above) s
    WHERE s > coalesce((SELECT g.seq FROM cdc.checkpoints g WHERE g.consumer = %(global)s), 0) ORDER BY 1),
    updated_at = now()
"""


def partition_name(consumer: str, index: int, workers: int) -> str:
    return f"{consumer}#w{index}of{workers}"


def retire_partitions(conn: psycopg.Connection, consumer: str, workers: int) -> None:
    """Before a projection starts with `workers` partitions: drop the checkpoint rows of another
    partitioning when the consumer's own checkpoint covers them, else refuse (ConfigError).

    Changing N moves streams between workers; a partition that applied transactions past the
    consumer's checkpoint would have them applied again by their new owner."""
    pattern = re.compile(re.escape(consumer) + r"#w(\d+)of(\d+)")
    like = consumer.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "#w%of%"
    rows = conn.execute("SELECT consumer, lsn::text, seq, seqs_above FROM cdc.checkpoints WHERE consumer LIKE %s",
                        (like,)).fetchall()
    stale = [r for r in rows if (m := pattern.fullmatch(r[0])) and int(m.group(2)) != workers]
    if not stale:
        return
    done = load(conn, consumer) or Position()
    for name, lsn, seq, above in stale:
        beyond_lsn = lsn is not None and (done.lsn is None or Lsn.parse(lsn) > done.lsn)
        beyond_seq = any(not done.handled(s) for s in (above or ()))
        if beyond_lsn or beyond_seq:
            old = pattern.fullmatch(name).group(2)  # type: ignore[union-attr]
            raise ConfigError(
                f"consumer {consumer!r} last ran with {old} workers, and its partition {name!r} applied "
                f"transactions past the consumer's checkpoint ({lsn or 'seqs ' + str(sorted(above)[:3])} > "
                f"{done.lsn}): with {workers} workers streams move between partitions and those would be "
                f"applied twice. Stop it cleanly (SIGTERM) with --workers {old} first, then restart with "
                f"--workers {workers}"
            )
    with conn.transaction():
        conn.execute("DELETE FROM cdc.checkpoints WHERE consumer = ANY(%s)", ([r[0] for r in stale],))
    log.info("consumer %s: retired the checkpoints of %d partitions from another --workers value",
             consumer, len(stale))


class Partition:
    """One worker's share of a projection: `handler(conn, slice)` and this partition's checkpoint
    commit in one database transaction; a slice the partition already applied is skipped.

    A slice is skipped when the partition's LSN covers it (stream), and each event when its seq
    is at or below the consumer's contiguous mark or recorded in this partition's `seqs_above`.
    Both paths record seqs: after a crash the consumer's checkpoint may lag what the partitions
    committed, and a hand-off then replays by seq from that older position. A huge transaction
    stays one database transaction from its first part to its final one."""

    def __init__(self, handler: Callable[[psycopg.Connection, Transaction], object], conn: psycopg.Connection,
                 *, consumer: str, index: int, workers: int):
        self.handler = handler
        self.conn = durable(conn)  # see Projection: a returned commit must survive a crash
        self.consumer = consumer
        self.name = partition_name(consumer, index, workers)
        self._load()
        self._open: Any = None  # the psycopg transaction context, open across parts
        self._open_part: tuple[int | None, Lsn | None, int] | None = None
        self._open_seqs: list[int] = []
        self._broken: tuple[int | None, Lsn | None] | None = None

    def _load(self) -> None:
        mine = load(self.conn, self.name) or Position()
        self.lsn = mine.lsn
        self._global_seq = (load(self.conn, self.consumer) or Position()).seq
        self._seqs = {s for s in mine.seqs_above if s > self._global_seq}

    def write(self, tx: Transaction) -> None:
        if tx.end_lsn is not None and self.lsn is not None and tx.end_lsn <= self.lsn:
            return  # applied before a restart
        if tx.part == 0:
            self._broken = None  # delivered again from its start: what broke is behind us
        if self._broken is not None and self._broken == (tx.xid, tx.commit_lsn):
            raise SinkError(
                f"transaction xid={tx.xid} failed in part {tx.part} after its earlier parts were rolled "
                "back: it must be applied again from its start (restart)"
            )
        mark, applied = self._global_seq, self._seqs
        events = [e for e in tx.events if e.seq > mark and e.seq not in applied]
        if self._open is not None and cut_short(self._open_part, tx):
            # Delivered again from an earlier part after a reconnect: undo the parts held open.
            opened, self._open = self._open, None
            abandon(opened)
        if self._open is None:
            self._open = self.conn.transaction()
            self._open.__enter__()
            self._open_seqs = []
        self._open_part = (tx.xid, tx.commit_lsn, tx.part)
        try:
            if events:
                self.handler(self.conn, tx if len(events) == len(tx.events) else replace(tx, events=events))
                self._open_seqs.extend(e.seq for e in events)
            if tx.final:
                if tx.end_lsn is not None or self._open_seqs:
                    self.conn.execute(_PARTITION_SAVE, {
                        "name": self.name, "lsn": str(tx.end_lsn) if tx.end_lsn is not None else None,
                        "seqs": self._open_seqs, "global": self.consumer})
                opened, self._open = self._open, None
                opened.__exit__(None, None, None)
                self._committed(tx)
        except BaseException as err:
            if tx.part > 0:
                self._broken = (tx.xid, tx.commit_lsn)
            opened, self._open = self._open, None
            if opened is not None:
                opened.__exit__(type(err), err, err.__traceback__)
            raise

    def _committed(self, tx: Transaction) -> None:
        if tx.end_lsn is not None:
            self.lsn = tx.end_lsn
        if self._open_seqs:
            self._seqs.update(self._open_seqs)
            if len(self._seqs) > 100_000:  # fold what the consumer's checkpoint now covers
                self._global_seq = (load(self.conn, self.consumer) or Position()).seq
                self._seqs = {s for s in self._seqs if s > self._global_seq}
        self._open_seqs = []

    def flush(self) -> None:
        pass

    def reset(self, conn: psycopg.Connection) -> None:
        """Write through `conn` from now on: the old connection broke, and the transaction
        open on it is gone (rolled back by the server). What is applied is read again from the
        partition's row: a commit the break interrupted may have landed or not."""
        self.conn = durable(conn)
        self._open = None
        self._open_seqs = []
        self._load()

    def close(self) -> None:
        if self._open is not None:  # a huge transaction cut short: undo its parts
            opened, self._open = self._open, None
            abandon(opened)


class Partitions:
    """The N partitions of a projection, each with its own connection (from `dsn`). A sink in
    name only (`flush`, `close`): the dispatcher hands each partition its worker's slices."""

    def __init__(self, handler: Callable[[psycopg.Connection, Transaction], object], dsn: str, *,
                 consumer: str, workers: int):
        self.conns: list[psycopg.Connection] = []
        try:
            for _ in range(workers):
                self.conns.append(connect(dsn, autocommit=True))
            retire_partitions(self.conns[0], consumer, workers)
            self.partitions = [Partition(handler, c, consumer=consumer, index=i, workers=workers)
                               for i, c in enumerate(self.conns)]
        except BaseException:
            self.close()
            raise

    @property
    def per_worker(self) -> list[Partition]:
        return self.partitions

    def write(self, tx: Transaction) -> None:
        raise TypeError("Partitions are written by a ParallelDispatcher, one partition per worker")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        for p in getattr(self, "partitions", ()):
            try:
                p.close()
            except psycopg.Error as err:
                log.warning("could not roll back %s: %s", p.name, err)
        for c in self.conns:
            c.close()
        for p in getattr(self, "partitions", ()):
            p.conn.close()  # a connection a retry opened after the first one broke
        self.conns = []


class ParallelProjection(ParallelDispatcher):
    """The exactly-once projection with N workers: `handler(conn, slice)` runs in a database
    transaction on the worker's own connection, together with that partition's checkpoint.

    >>> consumer = Consumer(dsn, consumer="orders", auto_ack=False)
    >>> with ParallelProjection(consumer, project, workers=8) as p:
    ...     p.run()
    >>> consumer.close()

    Starting with another `workers` value than last time is refused while a partition has
    applied transactions past the consumer's checkpoint (stop cleanly first): see
    `retire_partitions`.
    """

    def __init__(
        self,
        consumer: Any,
        handler: Callable[[psycopg.Connection, Transaction], object],
        *,
        dsn: str | None = None,
        workers: int = 8,
        key: Callable[[Event], object] = stream_key,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        queue_events: int = DEFAULT_QUEUE_EVENTS,
    ):
        self.partitions = Partitions(handler, dsn or consumer.dsn, consumer=consumer.consumer, workers=workers)
        consumer.whole_transactions = True  # the partitions commit a transaction at its last part
        try:
            super().__init__(consumer, [p.write for p in self.partitions.partitions], workers=workers, key=key,
                             queue_size=queue_size, queue_events=queue_events)
        except BaseException:
            self.partitions.close()
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.partitions.close()
