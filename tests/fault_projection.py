"""Projection handlers for the fault tests: `cdc run --sink python:tests.fault_projection:project`.

`project` inserts one row an event into fault_projection in the projection's own transaction
(the one the checkpoint commits in), so the table must end with exactly the committed seqs.
CDC_FAULT_KILL_AT=N makes the process kill -9 itself when it starts on its N-th transaction;
CDC_FAULT_FAIL=1 makes the handler raise (a poison sink); CDC_FAULT_SLEEP=S sleeps S seconds in
each transaction before writing (a slow handler, so a fault lands mid-transaction).
"""

from __future__ import annotations

import os
import signal
import time

import psycopg

from cdc import Transaction

_handled = 0


def project(conn: psycopg.Connection, tx: Transaction) -> None:
    global _handled
    _handled += 1
    if _handled == int(os.environ.get("CDC_FAULT_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("CDC_FAULT_FAIL"):
        raise RuntimeError("projection handler failed on purpose")
    time.sleep(float(os.environ.get("CDC_FAULT_SLEEP", "0")))
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO fault_projection (seq, xid) VALUES (%s, %s)",
                        [(e.seq, tx.xid) for e in tx.events])
