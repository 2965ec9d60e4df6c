"""The library surface: iterate, async iterate, callbacks, explicit acks, the projection handler."""

from __future__ import annotations

import asyncio
import threading

import psycopg

import cdc
from cdc.embedded import wait_for

from .support import committed_seqs


def _insert(conn: psycopg.Connection, stream: str, n: int) -> None:
    cdc.append(conn, stream, [cdc.NewEvent("E", {"i": i}) for i in range(n)], expected_version=None)


def test_async_consumer_yields_the_same_transactions(dsn, conn):
    _insert(conn, "a", 3)
    _insert(conn, "b", 2)

    async def main() -> list[int]:
        seen: list[int] = []
        async with cdc.AsyncConsumer(dsn, consumer="async") as feed:
            async for tx in feed:
                seen.extend(e.seq for e in tx.events)
                if len(seen) >= 5:
                    break
        return seen

    assert asyncio.run(main()) == [1, 2, 3, 4, 5]


def test_callback_style_and_stop_from_another_thread(dsn, conn):
    got: list[int] = []
    feed = cdc.Consumer(dsn, consumer="cb")
    t = threading.Thread(target=feed.run, args=(lambda tx: got.extend(e.seq for e in tx.events),))
    t.start()
    _insert(conn, "a", 4)
    assert wait_for(lambda: len(got) == 4, timeout=20)
    feed.stop()
    t.join(5)
    assert not t.is_alive()
    feed.close()
    assert got == [1, 2, 3, 4]


def test_exception_in_the_handler_does_not_acknowledge_the_transaction(dsn, conn):
    _insert(conn, "a", 2)
    try:
        with cdc.Consumer(dsn, consumer="boom") as feed:
            for _tx in feed:
                raise RuntimeError("handler failed")
    except RuntimeError:
        pass
    with cdc.Consumer(dsn, consumer="boom", endpos=cdc.Lsn.parse(
            conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])) as feed:
        assert [e.seq for tx in feed for e in tx.events] == [1, 2]


def test_projection_commits_handler_writes_and_checkpoint_together(dsn, conn):
    conn.execute("CREATE TABLE totals(stream_id text PRIMARY KEY, n int NOT NULL)")

    def apply(c: psycopg.Connection, tx: cdc.Transaction) -> None:
        for e in tx.events:
            c.execute("INSERT INTO totals VALUES (%s, 1) ON CONFLICT (stream_id) DO UPDATE SET n = totals.n + 1",
                      (e.stream_id,))

    for round_ in range(2):
        _insert(conn, "a", 3)
        _insert(conn, "b", 1)
        end = cdc.Lsn.parse(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
        with psycopg.connect(dsn, autocommit=True) as pconn, \
                cdc.Consumer(dsn, consumer="totals", endpos=end, auto_ack=True) as feed:
            projection = cdc.Projection(apply, pconn, consumer="totals")
            for tx in feed:
                projection.write(tx)
    assert dict(conn.execute("SELECT stream_id, n FROM totals").fetchall()) == {"a": 6, "b": 2}
    assert len(committed_seqs(dsn)) == 8


def _parts(xid: int, seqs: list[list[int]]) -> list[cdc.Transaction]:
    """One transaction handed over in parts, as the stream does for a huge one."""
    end = cdc.Lsn(0x5000 + xid)
    return [cdc.Transaction(xid, cdc.Lsn(0x4000 + xid), end, None,
                            [cdc.Event(s, f"s{s}", 1, "E", "{}", "{}", None) for s in part], "stream",
                            n, n == len(seqs) - 1)
            for n, part in enumerate(seqs)]


def test_a_huge_transaction_delivered_again_from_its_start_is_applied_once(dsn, conn):
    # The feed reconnects while a projection holds the first parts of a huge transaction open,
    # and delivers it again from part 0: the open parts are undone, not applied twice.
    from cdc.partitions import Partition

    conn.execute("CREATE TABLE applied(seq bigint)")

    def apply(c: psycopg.Connection, tx: cdc.Transaction) -> None:
        c.cursor().executemany("INSERT INTO applied VALUES (%s)", [(e.seq,) for e in tx.events])

    one, two = _parts(7, [[1, 2], [3, 4], [5]]), _parts(8, [[6], [7], [8]])
    with psycopg.connect(dsn, autocommit=True) as pconn:
        projection = cdc.Projection(apply, pconn, consumer="again")
        for tx in [one[0], one[1], *one]:  # cut short after part 1, then all of it
            projection.write(tx)
    with psycopg.connect(dsn, autocommit=True) as pconn:
        partition = Partition(apply, pconn, consumer="again-w", index=0, workers=2)
        for tx in [two[0], two[1], *two]:
            partition.write(tx)
    assert [r[0] for r in conn.execute("SELECT seq FROM applied ORDER BY seq")] == [1, 2, 3, 4, 5, 6, 7, 8]
