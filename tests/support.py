"""Test helpers shared by the suites: concurrent writers and a consumer running in a thread."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import psycopg

from cdc import Consumer, Transaction


class Rollback(Exception):
    pass


def write_concurrently(
    dsn: str,
    *,
    writers: int = 8,
    seconds: float = 5.0,
    max_events: int = 50,
    rollback: float = 0.1,
    hold: float = 0.05,
    hold_seconds: tuple[float, float] = (0.5, 2.0),
    streams: int = 50,
    seed: int = 1,
) -> dict[str, int]:
    """Writers appending transactions of 1..max_events events for `seconds`; a share roll back,
    a share hold their transaction (and its sequence numbers) open while others commit."""
    stats = {"committed_tx": 0, "rolled_back_tx": 0, "held_tx": 0}
    lock = threading.Lock()
    until = time.monotonic() + seconds

    def writer(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while time.monotonic() < until:
                stream = f"w{n}-s{rng.randrange(streams)}"
                k = rng.randint(1, max_events)
                held = rng.random() < hold
                rolled = rng.random() < rollback
                try:
                    with conn.transaction():
                        # Each writer owns its streams, so versions never race.
                        v = conn.execute("SELECT coalesce(max(version),0) FROM cdc.events WHERE stream_id=%s",
                                         (stream,)).fetchone()[0]
                        with conn.cursor() as cur:
                            cur.executemany(
                                "INSERT INTO cdc.events(stream_id, version, type, data) VALUES (%s, %s, 'E', %s::jsonb)",
                                [(stream, v + j + 1, f'{{"n": {j}}}') for j in range(k)],
                            )
                        if held:
                            time.sleep(rng.uniform(*hold_seconds))
                        if rolled:
                            raise Rollback
                    with lock:
                        stats["committed_tx"] += 1
                        stats["held_tx"] += held
                except Rollback:
                    with lock:
                        stats["rolled_back_tx"] += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats


def committed_seqs(dsn: str) -> set[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT seq FROM cdc.events")}


class Collector:
    """Runs a Consumer in a thread and keeps every transaction it hands over."""

    def __init__(self, consumer: Consumer, on_tx: Callable[[Transaction], None] | None = None):
        self.consumer = consumer
        self.transactions: list[Transaction] = []
        self.error: BaseException | None = None
        self.on_tx = on_tx
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for tx in self.consumer:
                self.transactions.append(tx)
                if self.on_tx:
                    self.on_tx(tx)
        except BaseException as err:  # surfaced by the test
            self.error = err

    @property
    def seqs(self) -> list[int]:
        return [e.seq for tx in self.transactions for e in tx.events]

    def wait_for(self, seqs: set[int], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error:
                raise self.error
            if seqs <= set(self.seqs):
                return
            time.sleep(0.05)
        missing = sorted(seqs - set(self.seqs))
        raise AssertionError(f"not delivered within {timeout} s: {len(missing)} seqs, first {missing[:10]}")

    def stop(self) -> None:
        self.consumer.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "consumer did not stop"
        self.consumer.close()
        if self.error:
            raise self.error
