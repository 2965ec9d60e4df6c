"""A JetStream reader projection process for the tests and the fan-out demo:

    python -m tests.js_projection DSN NATS_URL STREAM NAME [PARTITION PARTITIONS] [--subject T] [--idle S] [--sleep S]

Each event becomes a row of js_projection (reader, seq, stream_id, version, arrival), written
with the reader's position in one transaction, so the table must end with exactly the events of
its subjects, once each; `arrival` (a sequence) shows the order they were applied in.
"""

from __future__ import annotations

import argparse
import signal
import time

import psycopg

from cdc import Transaction
from cdc.jetstream import Target
from cdc.jetstream_reader import JetStreamProjection

TABLE_SQL = """
CREATE TABLE IF NOT EXISTS js_projection (
    reader text NOT NULL, seq bigint NOT NULL, stream_id text NOT NULL, version bigint,
    arrival bigserial
)
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dsn")
    p.add_argument("url")
    p.add_argument("stream")
    p.add_argument("name")
    p.add_argument("partition", nargs="?", type=int)
    p.add_argument("partitions", nargs="?", type=int, default=1)
    p.add_argument("--idle", type=float, default=None)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--subject", default=None, help="the sink's --nats-subject")
    args = p.parse_args()
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
        print(f"reading {subjects or target.filter} from after stream seq {projection.saved()}", flush=True)
        handled = projection.run(idle_timeout=args.idle)
        print(f"{args.name}: {handled} events", flush=True)


if __name__ == "__main__":
    main()
