#!/usr/bin/env python
"""Throughput of `--workers N` against `--workers 1` with a handler that sleeps per event.

    .venv/bin/python scripts/bench_workers.py            # a throwaway cluster; or --dsn DSN

The same committed events (small transactions over many streams) are read twice from their own
slots; the handler sleeps --sleep-ms per event, standing in for a projection's round trip. The
result is the ratio of the two throughputs, measured in this run from first to last handled event.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import threading
import time

import psycopg

from cdc import Consumer, Lsn, ParallelDispatcher, Transaction, embedded_cluster, setup


def current_lsn(dsn: str) -> Lsn:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return Lsn.parse(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])


def prime(dsn: str, name: str) -> None:
    """Create the slot and the consumer's position now, so what is written next streams."""
    with Consumer(dsn, consumer=name, slot=name, endpos=current_lsn(dsn)) as feed:
        assert list(feed) == []


def write(dsn: str, events: int, per_tx: int, streams: int) -> None:
    rng = random.Random(1)
    versions = [0] * streams
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(events // per_tx):
            rows = []
            for _ in range(per_tx):
                s = rng.randrange(streams)
                versions[s] += 1
                rows.append((f"stream-{s}", versions[s]))
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany("INSERT INTO cdc.events(stream_id, version, type, data) VALUES (%s, %s, 'E', '{}')", rows)


def measure(dsn: str, name: str, workers: int, sleep: float, endpos: Lsn) -> tuple[int, float]:
    lock = threading.Lock()
    stamps: list[float] = []

    def handle(tx: Transaction) -> None:
        start = time.perf_counter()
        for _ in tx.events:
            time.sleep(sleep)
        with lock:
            stamps.extend((start, time.perf_counter()))
            handled[0] += len(tx.events)

    handled = [0]
    consumer = Consumer(dsn, consumer=name, slot=name, endpos=endpos, auto_ack=False)
    try:
        with ParallelDispatcher(consumer, handle, workers=workers) as dispatcher:
            dispatcher.run()
    finally:
        consumer.close()
    return handled[0], max(stamps) - min(stamps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", help="a database where `cdc setup` may run (default: a throwaway cluster)")
    p.add_argument("--events", type=int, default=1600)
    p.add_argument("--per-tx", type=int, default=4, help="events per transaction")
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--sleep-ms", type=float, default=5.0, help="handler time per event")
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(embedded_cluster(fast=True)).dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            setup(conn)
        one, many = "bench_w1", f"bench_w{args.workers}"
        for name in (one, many):
            prime(dsn, name)
        write(dsn, args.events, args.per_tx, args.streams)
        endpos = current_lsn(dsn)
        results = {}
        for name, n in ((one, 1), (many, args.workers)):
            events, seconds = measure(dsn, name, n, args.sleep_ms / 1000, endpos)
            results[n] = events / seconds
            print(f"workers={n:<3} {events} events in {seconds:6.2f} s: {results[n]:8.0f} events/s")
        with psycopg.connect(dsn, autocommit=True) as conn:
            for name in (one, many):
                conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
                conn.execute("DELETE FROM cdc.checkpoints WHERE consumer = %s", (name,))
        ratio = results[args.workers] / results[1]
        print(f"ratio: {ratio:.2f}x with {args.workers} workers "
              f"(handler {args.sleep_ms:g} ms/event, {args.per_tx} events/tx over {args.streams} streams)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
