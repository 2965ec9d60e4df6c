"""Fault-injection helpers shared by test_faults.py and test_soak.py: writers that survive server
restarts, `cdc run` subprocesses, and the check of a delivery against cdc.events itself."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import orjson
import psycopg

from .support import drop_slot_while_running, prime  # noqa: F401  (the suites import them from here too)

ROOT = Path(__file__).resolve().parent.parent


class Rollback(Exception):
    pass


class Writers:
    """`writers` threads appending until stopped. A share of transactions roll back, a share are
    big (one INSERT ... SELECT of `big_events` rows, so a consumer with a small --chunk-events has
    parts in flight), a share hold their sequence numbers open for `hold_seconds`. They survive
    server restarts and terminated backends: a commit whose outcome is unknown is fine, since
    every check reads cdc.events, not the writers' counts."""

    def __init__(self, dsn: str, *, writers: int = 4, max_events: int = 20, big: float = 0.0,
                 big_events: int = 500, rollback: float = 0.1, hold: float = 0.0,
                 hold_seconds: tuple[float, float] = (0.5, 2.0), pause: float = 0.002, seed: int = 1):
        self.dsn = dsn
        self.max_events, self.big, self.big_events = max_events, big, big_events
        self.rollback, self.hold, self.hold_seconds, self.pause = rollback, hold, hold_seconds, pause
        self.seed = seed
        self.stats = {"committed_tx": 0, "rolled_back_tx": 0, "held_tx": 0, "big_tx": 0, "errors": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write, args=(n,), daemon=True) for n in range(writers)]

    def __enter__(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _write(self, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        conn: psycopg.Connection | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                stream = f"w{n}-s{rng.randrange(50)}"
                big = rng.random() < self.big
                k = self.big_events if big else rng.randint(1, self.max_events)
                held = rng.random() < self.hold
                with conn.transaction():
                    # Each writer owns its streams, so versions never race.
                    conn.execute(
                        "INSERT INTO cdc.events (stream_id, version, type, data) "
                        "SELECT %(s)s, v.base + g, 'E', jsonb_build_object('n', g) FROM generate_series(1, %(k)s) g, "
                        "(SELECT coalesce(max(version), 0) AS base FROM cdc.events WHERE stream_id = %(s)s) v "
                        "ORDER BY g",
                        {"s": stream, "k": k},
                    )
                    if held:
                        time.sleep(rng.uniform(*self.hold_seconds))
                    if rng.random() < self.rollback:
                        raise Rollback
                self._count("committed_tx")
                if big:
                    self._count("big_tx")
                if held:
                    self._count("held_tx")
            except Rollback:
                self._count("rolled_back_tx")
            except psycopg.Error:
                self._count("errors")
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(0.2)
            self._stop.wait(self.pause)
        if conn is not None:
            conn.close()


# -- the database's side ------------------------------------------------------------------------

def sql(dsn: str, query: str, params: object = None) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def committed_by_xid(dsn: str) -> dict[int, list[int]]:
    """Every committed transaction's seqs, in seq (= insertion) order, by 32-bit xid as wal2json
    reports it."""
    out: dict[int, list[int]] = {}
    for xid, seq in sql(dsn, "SELECT (xid::text::bigint & 4294967295), seq FROM cdc.events ORDER BY seq"):
        out.setdefault(int(xid), []).append(seq)
    return out


def current_lsn(dsn: str) -> str:
    return sql(dsn, "SELECT pg_current_wal_insert_lsn()::text")[0][0]


def slot_row(dsn: str, slot: str) -> tuple | None:
    rows = sql(dsn, "SELECT active_pid, confirmed_flush_lsn::text, wal_status FROM pg_replication_slots "
                    "WHERE slot_name = %s", (slot,))
    return rows[0] if rows else None


def wait_slot_free(dsn: str, slot: str, timeout: float = 10.0) -> None:
    """After kill -9 the walsender notices the closed socket within milliseconds; a consumer that
    starts before that exits with 'slot in use' (by design), so a supervisor waits for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = slot_row(dsn, slot)
        if row is None or row[0] is None:
            return
        time.sleep(0.02)
    raise AssertionError(f"slot {slot} still active after {timeout} s")


def terminate_walsender(dsn: str, slot: str) -> bool:
    rows = sql(dsn, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                    "WHERE slot_name = %s AND active_pid IS NOT NULL", (slot,))
    return bool(rows)


# -- cdc run subprocesses -------------------------------------------------------------------------

def cdc_run(dsn: str, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`cdc run` with its log appended to `log` (a file, not a pipe: a full pipe would stall it)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with open(log, "ab") as err:
        return subprocess.Popen([sys.executable, "-m", "cdc", "run", "--dsn", dsn, *args],
                                stdout=subprocess.DEVNULL, stderr=err, env=full_env, cwd=ROOT)


def drain(dsn: str, *args: str, log: Path, env: dict[str, str] | None = None, timeout: float = 120) -> None:
    """Run `cdc run` up to the current WAL position and require exit 0."""
    proc = cdc_run(dsn, *args, "--endpos", current_lsn(dsn), log=log, env=env)
    try:
        rc = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, f"drain exited {rc}: {tail(log)}"


def wait_log(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 60, count: int = 1) -> None:
    """Until `cdc run`'s log says `text` (`count` times): e.g. "streaming from slot", before a
    fault that must meet a running stream rather than a process still starting."""
    deadline = time.monotonic() + timeout
    while (log.read_text(errors="replace") if log.exists() else "").count(text) < count:
        assert proc.poll() is None, f"cdc run exited {proc.returncode}: {tail(log, 20)}"
        assert time.monotonic() < deadline, f"cdc run did not log {text!r} within {timeout} s: {tail(log, 20)}"
        time.sleep(0.05)


def tail(log: Path, n: int = 8) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return "\n".join(lines[-n:])


def read_jsonl(*paths: Path, torn: list[str] | None = None, writing: bool = False) -> list[dict]:
    """The records of jsonl sink files. A line that does not parse is a record torn by kill -9
    (and glued to the next run's first one): collected in `torn` when given, else an error.
    `writing`: a run may be writing the last line as we read it, so a line without its newline
    is not read yet."""
    records = []
    for p in paths:
        if not p.exists():
            continue
        data = p.read_bytes()
        if writing and not data.endswith(b"\n"):
            data = data[:data.rfind(b"\n") + 1]
        for n, line in enumerate(data.splitlines(), 1):
            try:
                records.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                if torn is None:
                    raise AssertionError(f"{p.name} line {n} is not a whole record: {line[:120]!r}...") from None
                torn.append(f"{p.name}:{n}: {line[:200]!r}")
    return records


def wait_delivered(paths: Iterable[Path], seqs: set[int], timeout: float = 60.0) -> None:
    paths = list(paths)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = {r["seq"] for r in read_jsonl(*paths, writing=True)}
        if seqs <= got:
            return
        time.sleep(0.2)
    missing = sorted(seqs - {r["seq"] for r in read_jsonl(*paths)})
    raise AssertionError(f"not delivered within {timeout} s: {len(missing)} seqs, first {missing[:10]}")


# -- the check ---------------------------------------------------------------------------------------

def check_delivery(dsn: str, records: list[dict]) -> dict[str, int]:
    """Against the committed content of cdc.events: nothing lost, nothing invented, and an event
    delivered again only as part of its transaction delivered again from its start.

    Records are grouped by (xid, commit_lsn), in file order; each group splits into runs where
    the seq goes back. A run must be a contiguous slice of its transaction's seqs; a stream run
    that repeats events must start at the transaction's first event (kill -9 mid-transaction
    leaves a prefix, then the whole transaction comes again). Runs from the poll path (the
    hand-off's replay under a snapshot) deliver what the saved position lacks.
    """
    committed = {s for seqs in committed_by_xid(dsn).values() for s in seqs}
    by_xid = committed_by_xid(dsn)
    delivered = [r["seq"] for r in records]
    lost = committed - set(delivered)
    invented = set(delivered) - committed
    assert not lost, f"{len(lost)} committed events never delivered, first {sorted(lost)[:10]}"
    assert not invented, f"delivered events that never committed: {sorted(invented)[:10]}"
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["xid"], r["commit_lsn"]), []).append(r)
    seen: set[int] = set()
    stats = {"events": len(delivered), "duplicates": len(delivered) - len(set(delivered)),
             "transactions": len(by_xid), "replayed_runs": 0, "partial_runs": 0}
    for (xid, _), group in groups.items():
        whole = by_xid[xid]
        index = {s: i for i, s in enumerate(whole)}
        runs: list[list[dict]] = []
        for r in group:
            if not runs or r["seq"] <= runs[-1][-1]["seq"]:
                runs.append([])
            runs[-1].append(r)
        for run in runs:
            seqs = [r["seq"] for r in run]
            first = index[seqs[0]]
            assert seqs == whole[first:first + len(seqs)], f"xid {xid}: run {seqs[:5]}... is not a slice of {whole[:5]}..."
            again = seen.intersection(seqs)
            if again:
                stats["replayed_runs"] += 1
                if run[0]["source"] == "stream":
                    assert first == 0, f"xid {xid}: events {sorted(again)[:5]} delivered again from mid-transaction"
            if len(seqs) < len(whole) and run[0]["source"] == "stream":
                stats["partial_runs"] += 1
            seen.update(seqs)
    return stats


def check_projection(dsn: str) -> None:
    """The exactly-once handler's table holds each committed seq exactly once."""
    committed = {s for seqs in committed_by_xid(dsn).values() for s in seqs}
    dups = sql(dsn, "SELECT seq, count(*) FROM fault_projection GROUP BY seq HAVING count(*) > 1 ORDER BY seq LIMIT 10")
    assert not dups, f"projected twice: {dups}"
    projected = {r[0] for r in sql(dsn, "SELECT seq FROM fault_projection")}
    assert projected == committed, (f"projection lacks {len(committed - projected)} "
                                    f"(first {sorted(committed - projected)[:10]}), has {len(projected - committed)} extra")


def one_line_error(stderr: str) -> str:
    """The one `cdc: error:` line a failed command printed, with no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("cdc: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def run_to_exit(dsn: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`cdc run` to its end, its output captured (for the runs that should stop at once)."""
    return subprocess.run([sys.executable, "-m", "cdc", "run", "--dsn", dsn, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
