"""`cdc demo --fanout N`: one slot, JetStream, N projections on N partitions.

A throwaway PostgreSQL cluster and a throwaway nats-server; `cdc run --sink nats://...
--nats-partitions N` publishes the feed; N reader processes (`python -m cdc.fanout reader ...`)
each project one partition exactly once (`JetStreamProjection`) while writers append, roll back
and hold transactions open. At the end each projection must hold exactly the committed events of
its partition's streams, once each, every stream in version order.

The reader process is also what the tests kill -9 mid-batch.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from . import store
from .consumer import Consumer
from .demo import write_for
from .embedded import NatsServer, embedded_cluster
from .events import Transaction
from .jetstream import Target, partition_of
from .jetstream_reader import JetStreamProjection

ROOT = Path(__file__).resolve().parent.parent
TABLE_SQL = """
CREATE TABLE IF NOT EXISTS js_projection (
    reader text NOT NULL, seq bigint NOT NULL, stream_id text NOT NULL, version bigint,
    arrival bigserial
)
"""


def reader_main(argv: list[str]) -> int:
    """One projection process: each event a row of js_projection (reader, seq, stream_id,
    version, arrival), written with the reader's position in one transaction."""
    p = argparse.ArgumentParser(prog="python -m cdc.fanout reader")
    p.add_argument("dsn")
    p.add_argument("url")
    p.add_argument("stream")
    p.add_argument("name")
    p.add_argument("--partition", type=int, default=None)
    p.add_argument("--partitions", type=int, default=1)
    p.add_argument("--subject", default=None, help="the sink's --nats-subject")
    p.add_argument("--idle", type=float, default=None, help="stop after this many seconds without a message")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds a transaction takes (a slow handler)")
    args = p.parse_args(argv)
    target = Target.parse(args.url, stream=args.stream, subject=args.subject, partitions=args.partitions)
    subjects = target.partition_filter(args.partition) if args.partition is not None else None

    def project(conn: psycopg.Connection, tx: Transaction) -> None:
        if args.sleep:
            time.sleep(args.sleep)
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO js_projection (reader, seq, stream_id, version) VALUES (%s, %s, %s, %s)",
                            [(args.name, e.seq, e.stream_id, e.version) for e in tx.events])

    with psycopg.connect(args.dsn, autocommit=True) as setup:
        setup.execute(TABLE_SQL)
    with psycopg.connect(args.dsn) as conn:
        projection = JetStreamProjection(project, conn, target, name=args.name, subjects=subjects)
        signal.signal(signal.SIGTERM, lambda *_: projection.stop())
        print(f"{args.name}: reading {subjects or target.filter} from after stream seq {projection.saved()}",
              file=sys.stderr, flush=True)
        handled = projection.run(idle_timeout=args.idle)
        print(f"{args.name}: {handled} events", file=sys.stderr, flush=True)
    return 0


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL)


def fanout(*, seconds: float = 5.0, writers: int = 4, partitions: int = 3) -> int:
    out = sys.stderr
    print(f"cdc demo --fanout {partitions}: starting a throwaway PostgreSQL cluster and nats-server...", file=out)
    with embedded_cluster(fast=True) as cluster:
        nats = NatsServer()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            dsn = cluster.dsn
            with psycopg.connect(dsn, autocommit=True) as conn:
                store.setup(conn)
                conn.execute(TABLE_SQL)
            with Consumer(dsn, consumer="fanout", endpos="now") as feed:  # the slot, before the writes
                for _ in feed:
                    pass
            run = _spawn("-m", "cdc", "run", "--dsn", dsn, "--consumer", "fanout", "--mode", "stream", "--sink",
                         nats.url, "--nats-stream", "CDC", "--nats-partitions", str(partitions), "--log-level", "warning")
            procs.append(run)
            names = [f"projection-{k}" for k in range(partitions)]
            readers = [_spawn("-m", "cdc.fanout", "reader", dsn, nats.url, "CDC", name, "--partition", str(k),
                              "--partitions", str(partitions)) for k, name in enumerate(names)]
            procs += readers
            print(f"cdc demo --fanout: cdc run -> JetStream {nats.url} (stream CDC, {partitions} partitions) -> "
                  f"{partitions} projection processes; {writers} writers for {seconds:g} s", file=out)
            stats = {"committed": 0, "rolled_back": 0}
            write_for(dsn, writers, seconds, stats)
            with psycopg.connect(dsn, autocommit=True) as conn:
                committed = conn.execute("SELECT seq, stream_id, version FROM cdc.events").fetchall()
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    if run.poll() is not None:
                        print(f"cdc run exited with {run.returncode}", file=out)
                        break
                    done = conn.execute("SELECT count(*) FROM js_projection").fetchone()
                    if done is not None and done[0] >= len(committed):
                        break
                    time.sleep(0.2)
                time.sleep(0.5)  # anything more (a duplicate would be) lands now, and shows below
                rows = conn.execute("SELECT reader, seq, stream_id, version FROM js_projection ORDER BY arrival").fetchall()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
            nats.close()
        return _summary(committed, rows, names, partitions, stats)


def _summary(committed: list[tuple[int, str, int]], rows: list[tuple[str, int, str, int]], names: list[str],
             partitions: int, stats: dict[str, int]) -> int:
    out = sys.stderr
    print("", file=out)
    print(f"cdc demo --fanout summary: committed {len(committed)} events, rolled back {stats['rolled_back']}", file=out)
    ok = True
    for k, name in enumerate(names):
        want = {seq for seq, sid, _ in committed if partition_of(sid, partitions) == k}
        mine = [(seq, sid, version) for reader, seq, sid, version in rows if reader == name]
        seqs = [m[0] for m in mine]
        last: dict[str, int] = {}
        disorder = 0
        for _, sid, version in mine:
            if version <= last.get(sid, 0):
                disorder += 1
            last[sid] = version
        missing, extra, twice = len(want - set(seqs)), len(set(seqs) - want), len(seqs) - len(set(seqs))
        good = not (missing or extra or twice or disorder)
        ok &= good
        print(f"  {name}: {len(seqs)} events of {len(last)} streams; missing {missing}, not its own {extra}, "
              f"twice {twice}, out of stream order {disorder}{'' if good else '  <- FAILED'}", file=out)
    print(f"  {'OK: every projection holds exactly its committed events, once each, in stream order' if ok else 'FAILED'}",
          file=out)
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["reader"]:
        sys.exit(reader_main(sys.argv[2:]))
    sys.exit("usage: python -m cdc.fanout reader DSN URL STREAM NAME [options]")
