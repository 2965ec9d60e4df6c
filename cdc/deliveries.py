"""The delivery record: what the stream and the poller handed a consumer, written on the
delivery path (one COPY a batch, before the checkpoint is saved) and read by the reconciler.

Rows: `cdc.deliveries`, one an event delivered (consumer, run, seq, xid, commit LSN, commit
time, source, and a delivery number counting per consumer in delivery order);
`cdc.delivery_runs`, one a process start, with the checkpoint it started from; and now and then
a fence in `cdc.delivery_fences`: `pg_current_snapshot()` and `pg_current_wal_insert_lsn()` read
in one statement (what a fence proves: reconcile.py). A recording run's start also closes the
window the consumer last ran without recording (`cdc.checkpoints.unrecorded`, opened by the
checkpoint save of a run that does not record): reconcile reports such windows as not recorded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import psycopg
from psycopg_pool import ConnectionPool

from .events import Transaction

# One statement: the insert position is read after the statement's snapshot was taken.
# `through_delivery` (the consumer's last delivery then) is where prune() may cut.
_FENCE = """
INSERT INTO cdc.delivery_fences (consumer, snapshot, wal_lsn, through_delivery)
SELECT %(c)s, pg_current_snapshot(), pg_current_wal_insert_lsn(),
       (SELECT max(delivery) FROM cdc.deliveries WHERE consumer = %(c)s)
"""

# The open unrecorded window ends where this recording run starts.
_CLOSE_UNRECORDED = """
UPDATE cdc.checkpoints SET unrecorded = jsonb_set(unrecorded, '{-1}', (unrecorded -> -1) || jsonb_build_object(
    'to_lsn', lsn::text, 'to_seq', seq, 'to_seqs_above', to_jsonb(seqs_above), 'ended_at', now()))
WHERE consumer = %(c)s AND jsonb_array_length(unrecorded) > 0 AND NOT (unrecorded -> -1 ? 'to_seq')
"""

_NULL = "\\N"  # NULL in COPY text format
_COPY = "COPY cdc.deliveries (consumer, run, xid, commit_lsn, commit_time, source, delivery, seq) FROM STDIN"


def _copy_text(value: str) -> str:
    """A value in COPY text format."""
    return (value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r"))


class DeliveryLog:
    """The compact record of what one consumer was handed. Not thread-safe: one delivery loop."""

    def __init__(self, pool: ConnectionPool, consumer: str, *, fence_interval: float = 1.0):
        self.pool = pool
        self.consumer = consumer
        self.fence_interval = fence_interval
        self.run: int | None = None
        self._next_delivery = 1
        self._last_fence = float("-inf")
        self._consumer_text = _copy_text(consumer)

    def start_run(self) -> None:
        """A new run id, with the checkpoint this process starts from."""
        with self.pool.connection() as conn, conn.transaction():
            row = conn.execute(
                """
                INSERT INTO cdc.delivery_runs (consumer, start_lsn, start_seq, start_seqs_above)
                SELECT %(c)s, c.lsn, coalesce(c.seq, 0), coalesce(c.seqs_above, '{}')
                FROM (SELECT 1) AS one LEFT JOIN cdc.checkpoints c ON c.consumer = %(c)s
                RETURNING run
                """,
                {"c": self.consumer},
            ).fetchone()
            assert row is not None
            conn.execute(_CLOSE_UNRECORDED, {"c": self.consumer})
            last = conn.execute(
                "SELECT coalesce(max(delivery), 0) FROM cdc.deliveries WHERE consumer = %s", (self.consumer,)
            ).fetchone()
            last_delivery = int(last[0]) if last else 0
            conn.execute(_FENCE, {"c": self.consumer})
        self.run = int(row[0])
        self._next_delivery = last_delivery + 1
        self._last_fence = time.monotonic()

    def record(self, txs: Sequence[Transaction], conn: psycopg.Connection | None = None) -> None:
        """Record a batch of handled transactions: one COPY, before the checkpoint is saved; or,
        given `conn`, inside its open transaction (a projection's, which commits its checkpoint
        itself: its record then commits with its effects, or neither does)."""
        if self.run is None:
            self.start_run()
        number = self._next_delivery
        lines: list[str] = []
        prefix = f"{self._consumer_text}\t{self.run}\t"
        for tx in txs:
            if not tx.events:
                continue
            xid = _NULL if tx.xid is None else tx.xid
            lsn = _NULL if tx.commit_lsn is None else tx.commit_lsn
            at = _NULL if tx.commit_time is None else tx.commit_time.isoformat()
            head = f"{prefix}{xid}\t{lsn}\t{at}\t{tx.source}\t"
            for event in tx.events:
                lines.append(f"{head}{number}\t{event.seq}\n")
                number += 1
        if not lines:
            return
        data = "".join(lines).encode()
        now = time.monotonic()
        fence = now - self._last_fence >= self.fence_interval
        if conn is not None:
            self._write(conn, data, fence)
        else:
            with self.pool.connection() as own, own.transaction():
                self._write(own, data, fence)
        self._next_delivery = number
        if fence:
            self._last_fence = now

    def _write(self, conn: psycopg.Connection, data: bytes, fence: bool) -> None:
        with conn.cursor().copy(_COPY) as copy:
            copy.write(data)
        if fence:
            conn.execute(_FENCE, {"c": self.consumer})

    def prune(self, retention_seconds: float) -> int:
        """Forget deliveries older than `retention_seconds`; return how many rows went."""
        return prune(self.pool, self.consumer, retention_seconds)


def prune(pool: ConnectionPool, consumer: str, retention_seconds: float) -> int:
    """Cut at the newest fence older than the retention: fences know the delivery number then."""
    params = {"c": consumer, "secs": float(retention_seconds)}
    with pool.connection() as conn, conn.transaction():
        row = conn.execute(
            "SELECT max(through_delivery) FROM cdc.delivery_fences "
            "WHERE consumer = %(c)s AND taken_at < now() - make_interval(secs => %(secs)s)",
            params,
        ).fetchone()
        cut = row[0] if row else None
        deleted = 0
        if cut is not None:
            cur = conn.execute(
                """
                WITH gone AS (
                    DELETE FROM cdc.deliveries WHERE consumer = %(c)s AND delivery <= %(cut)s RETURNING seq
                )
                INSERT INTO cdc.delivery_horizons AS h (consumer, pruned_through, pruned_max_seq)
                SELECT %(c)s, %(cut)s, max(seq) FROM gone HAVING count(*) > 0
                ON CONFLICT (consumer) DO UPDATE SET
                    pruned_through = greatest(h.pruned_through, excluded.pruned_through),
                    pruned_max_seq = greatest(h.pruned_max_seq, excluded.pruned_max_seq)
                RETURNING (SELECT count(*) FROM gone)
                """,
                {**params, "cut": cut},
            ).fetchone()
            deleted = int(cur[0]) if cur else 0
        # Keep the newest fence whatever its age: it may be the one the next reconcile needs.
        conn.execute(
            "DELETE FROM cdc.delivery_fences WHERE consumer = %(c)s "
            "AND taken_at < now() - make_interval(secs => %(secs)s) "
            "AND taken_at < (SELECT max(taken_at) FROM cdc.delivery_fences WHERE consumer = %(c)s)",
            params,
        )
        conn.execute(
            "DELETE FROM cdc.delivery_runs r WHERE r.consumer = %(c)s "
            "AND r.started_at < now() - make_interval(secs => %(secs)s) "
            "AND r.run < coalesce((SELECT d.run FROM cdc.deliveries d WHERE d.consumer = %(c)s "
            "ORDER BY d.delivery LIMIT 1), (SELECT max(run) FROM cdc.delivery_runs WHERE consumer = %(c)s))",
            params,
        )
    return deleted


def take_fence(conn: psycopg.Connection, consumer: str) -> None:
    """Record a fence for `consumer` (autocommit or inside the caller's transaction)."""
    conn.execute(_FENCE, {"c": consumer})
