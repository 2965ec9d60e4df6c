"""`cdc demo`: the main job on a throwaway cluster.

Writers append concurrently; some roll back, some hold their transaction (and its sequence
numbers) open while later ones commit. The consumer prints every committed event as a JSON line,
in commit order, then checks on stderr what it received against what the table holds.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time

import psycopg

from . import store
from .consumer import Consumer
from .embedded import embedded_cluster
from .errors import ConcurrencyError
from .sinks import StreamSink

log = logging.getLogger("cdc.demo")


class _Rollback(Exception):
    pass


def write_for(dsn: str, writers: int, seconds: float, stats: dict[str, int]) -> None:
    """`writers` concurrent writers for `seconds`, counting into `stats` what committed and what
    rolled back."""
    lock = threading.Lock()
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=_writer, args=(dsn, n, until, stats, lock), daemon=True)
               for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _writer(dsn: str, n: int, until: float, stats: dict[str, int], lock: threading.Lock) -> None:
    rng = random.Random(n)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < until:
            stream = f"order-{rng.randrange(20)}"
            events = [store.NewEvent(rng.choice(["Placed", "Paid", "Shipped"]), {"writer": n, "amount": rng.randrange(1000)})
                      for _ in range(rng.randint(1, 5))]
            roll_back = rng.random() < 0.1
            hold = rng.random() < 0.05
            try:
                with conn.transaction():
                    seqs = store.append(conn, stream, events, expected_version=None, notify=False)
                    if hold:  # keep the sequence numbers taken while later transactions commit
                        time.sleep(rng.uniform(0.5, 1.5))
                    if roll_back:
                        raise _Rollback
                with lock:
                    stats["committed"] += len(seqs)
            except _Rollback:
                with lock:
                    stats["rolled_back"] += len(events)
            except (ConcurrencyError, psycopg.Error):
                pass  # a version race with another writer on the same stream: nothing written
            time.sleep(rng.uniform(0.005, 0.03))


def demo(*, seconds: float = 5.0, writers: int = 4) -> int:
    print("cdc demo: starting a throwaway PostgreSQL cluster...", file=sys.stderr)
    with embedded_cluster(fast=True) as cluster:
        dsn = cluster.dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            store.setup(conn)
        stats = {"committed": 0, "rolled_back": 0}
        delivered: list[tuple[int, str, int, int | None]] = []  # seq, stream, version, xid
        sink = StreamSink()
        consumer = Consumer(dsn, consumer="demo", mode="auto", checkpoint_interval=0.5)

        def drive() -> None:
            # Write only once the consumer streams, so that every event comes from the stream (a
            # slot created while writers run hands over from a snapshot instead); where logical
            # decoding is unavailable it polls, and the writers start once that is settled.
            deadline, polled_since = time.monotonic() + 15, None
            while time.monotonic() < deadline and consumer.path != "stream":
                if consumer.path == "poll":
                    polled_since = polled_since or time.monotonic()
                    if time.monotonic() - polled_since > 1.0:
                        break
                time.sleep(0.02)
            print(f"cdc demo: {writers} writers for {seconds:g} s on {cluster.dsn}; events follow on stdout",
                  file=sys.stderr)
            write_for(dsn, writers, seconds, stats)
            deadline = time.monotonic() + 20
            with psycopg.connect(dsn, autocommit=True) as conn:
                committed = {r[0] for r in conn.execute("SELECT seq FROM cdc.events")}
                while time.monotonic() < deadline and not committed <= {d[0] for d in delivered}:
                    time.sleep(0.1)
            consumer.stop()

        threading.Thread(target=drive, daemon=True).start()
        try:
            for tx in consumer:
                sink.write(tx)
                sink.flush()
                delivered.extend((e.seq, e.stream_id, e.version or 0, tx.xid) for e in tx.events)
        finally:
            consumer.close()
        return _summary(dsn, delivered, stats, consumer.path)


def _summary(dsn: str, delivered: list[tuple[int, str, int, int | None]], stats: dict[str, int], path: str | None) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        committed = {r[0] for r in conn.execute("SELECT seq FROM cdc.events")}
    seqs = [d[0] for d in delivered]
    missing = committed - set(seqs)
    duplicates = len(seqs) - len(set(seqs))
    last: dict[str, int] = {}
    stream_violations = 0
    for _, stream, version, _ in delivered:
        if version != last.get(stream, 0) + 1:
            stream_violations += 1
        last[stream] = version
    inversions = sum(1 for a, b in zip(seqs, seqs[1:]) if b < a)
    ok = not missing and not duplicates and not stream_violations
    out = sys.stderr
    print("", file=out)
    print(f"cdc demo summary ({path} path):", file=out)
    print(f"  committed {len(committed)} events, rolled back {stats['rolled_back']}, delivered {len(seqs)}", file=out)
    print(f"  missing {len(missing)}, duplicates {duplicates}, per-stream version order violations {stream_violations}", file=out)
    print(f"  {inversions} places where commit order differs from seq order (a transaction that took a lower seq "
          "committed later): a `WHERE seq > last` poller would have had to wait or skip there", file=out)
    print(f"  {'OK: every committed event exactly once, in commit order' if ok else 'FAILED'}", file=out)
    return 0 if ok else 1
