"""Test helpers shared by the suites: concurrent writers and a consumer running in a thread."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import psycopg

from cdc import Consumer, Lsn, Transaction, store
from cdc.decoders import resolve_plugin

# The plugin the suite's streams use: wal2json, or pgoutput where scripts/test runs the suite on a
# server without wal2json (CDC_PLUGIN=pgoutput, as `cdc run` and Consumer read it too).
PLUGIN: str = resolve_plugin(None)
# The name of the `cdc check` line that proves the plugin can serve.
PLUGIN_CHECK = "wal2json" if PLUGIN == "wal2json" else "publication"


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


def append_events(conn: psycopg.Connection, stream: str, n: int = 2) -> None:
    """Append `n` events to a new stream, as the application would."""
    store.append(conn, stream, [store.NewEvent("E", {"i": i}) for i in range(n)], expected_version=0)


def jsonl_seqs(out: Path | str) -> list[int]:
    """The seqs of a jsonl sink's file (none if it is not there yet) or of stdout's text."""
    if isinstance(out, Path) and not out.exists():
        return []
    text = out.read_bytes() if isinstance(out, Path) else out.encode()
    return [orjson.loads(line)["seq"] for line in text.splitlines()]


def wal_now(conn: psycopg.Connection) -> Lsn:
    """The server's WAL insert position now: an --endpos just past what was written so far."""
    return Lsn.parse(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])


def prime(dsn: str, consumer: str, slot: str | None = None) -> None:
    """Create the slot and the consumer's position (an empty hand-off), so later events stream."""
    with Consumer(dsn, consumer=consumer, slot=slot, endpos="now") as feed:
        assert list(feed) == []


def drop_slot_while_running(dsn: str, slot: str, timeout: float = 20.0) -> None:
    """Terminate the walsender and drop the slot, again and again, until the drop wins the race
    against the consumer's reconnect."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                         "WHERE slot_name = %s AND active_pid IS NOT NULL", (slot,))
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                return
            except psycopg.errors.ObjectInUse:
                time.sleep(0.005)
            except psycopg.errors.UndefinedObject:
                return
    raise AssertionError(f"could not drop slot {slot} within {timeout} s")
