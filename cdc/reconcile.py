"""The two paths compared: what the stream handed a consumer against the events table in seq order.

What is recorded (`deliveries.DeliveryLog`, on the delivery path, one COPY a batch): a row an event
delivered — consumer, run, seq, xid, commit LSN, commit time, source, a delivery number counting
per consumer in delivery order — in `cdc.deliveries`; a row a process start in
`cdc.delivery_runs`, with the checkpoint it started from; and now and then a *fence* in
`cdc.delivery_fences`: `pg_current_snapshot()` and `pg_current_wal_insert_lsn()` read in one
statement, the LSN after the snapshot.

What "should have been delivered" means. `cdc.events` has no commit LSN, so the table alone
cannot say which events the stream has passed. Two facts can:
- the consumer's own claim: a seq at or below `cdc.checkpoints.seq` or in its `seqs_above`;
- a fence: an event visible in a fence's snapshot committed before that fence's `wal_lsn` (its
  commit record was inserted before the snapshot saw it). Once the consumer's acknowledged
  stream position (`cdc.checkpoints.lsn`, the end of the last transaction handled) is at or past
  that `wal_lsn`, the stream has gone past the event's commit, in commit order, so the consumer
  must have it. We use the newest fence at or below the checkpoint LSN; earlier fences see less.
An event neither claimed nor behind such a fence is *pending* (it may have committed after the
position) and is not expected yet. A fence is taken at each `start_run`, at most every
`fence_interval` seconds by `record`, by the shadow reconciler each round, and by `reconcile`
itself (for the next one). So a slot advanced past committed events while the consumer was
stopped is caught as soon as the consumer acknowledges anything past the fence its restart took.

The window: seqs from the lowest seq delivered in the window (every delivery, or those since
`since`) upwards. A delivered seq that the table lacks is "missing on the table side".

Duplicates. A seq delivered again in the same run is a duplicate. Delivered again in a later
run, it is a duplicate when that run's starting checkpoint already covered the earlier delivery
(commit LSN <= start LSN, or seq <= start seq, or seq in start seqs_above): the consumer should
have skipped it. Otherwise it is a crash replay (delivered, not yet acknowledged, process died):
counted apart, not a failure.

Order: per stream, the first delivery of each seq, in delivery order, must step version by one.

Inversions: for every delivered event with a higher seq delivered before it, the pair with the
*first* such overtaker: from that commit on, a poller saw a hole at the lower seq. The delay is
the time between the two commits, from the WAL commit timestamps the stream recorded
(`commit_time`; `pg_xact_commit_timestamp` is not used: it needs track_commit_timestamp); where
one is missing (poll deliveries), the difference of `delivered_at` instead (said in the report).
A Marten-style poller that skips a hole older than `stale_threshold` would have skipped it when
the delay exceeds the threshold.

The heavy work (1,000,000 events) is SQL over temp tables: no per-row Python but for findings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from .deliveries import take_fence
from .errors import CdcError
from .events import Lsn
from .metrics import RECONCILE_FINDINGS
from .store import DEFAULT_TABLE, EventTable

log = logging.getLogger("cdc.reconcile")

DEFAULT_STALE_THRESHOLD = 3.0
DEFAULT_MAX_FINDINGS = 100_000  # per kind kept in detail; counts are always exact

# -- findings ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Missing:
    """An event one side has and the other lacks. `side` is the side that lacks it."""

    seq: int
    side: Literal["stream", "table"]
    stream_id: str | None
    version: int | None
    xid: int | None
    commit_lsn: Lsn | None
    reason: str


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A seq delivered again: a real duplicate, or (in `Report.crash_replays`) an allowed replay."""

    seq: int
    stream_id: str | None
    version: int | None
    xid: int | None
    commit_lsn: Lsn | None
    first_delivery: int
    first_run: int
    delivery: int
    run: int
    reason: str


@dataclass(frozen=True, slots=True)
class OrderViolation:
    """A stream whose versions arrived out of order, or with one skipped."""

    stream_id: str
    seq: int
    version: int
    previous_seq: int
    previous_version: int
    delivery: int
    kind: Literal["skipped", "out_of_order"]


@dataclass(frozen=True, slots=True)
class Inversion:
    """`seq` committed after the higher `overtaken_by_seq`: seq order and commit order differ."""

    seq: int
    stream_id: str | None
    version: int | None
    xid: int | None
    commit_lsn: Lsn | None
    overtaken_by_seq: int
    overtaken_by_xid: int | None
    overtaken_by_commit_lsn: Lsn | None
    delay_seconds: float | None
    skipped_by_stale_poller: bool
    explanation: str


@dataclass
class Report:
    consumer: str
    window: dict[str, Any]
    missing: list[Missing] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    order_violations: list[OrderViolation] = field(default_factory=list)
    inversions: list[Inversion] = field(default_factory=list)
    crash_replays: list[Duplicate] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    stale_threshold: float = DEFAULT_STALE_THRESHOLD
    delay_source: str = "commit_time"
    elapsed_seconds: float = 0.0
    runs: list[RunInfo] = field(default_factory=list)  # the recording runs on record
    unrecorded: list[Unrecorded] = field(default_factory=list)  # windows it ran without recording

    @property
    def agrees(self) -> bool:
        return not (self.counts.get("missing") or self.counts.get("duplicates")
                    or self.counts.get("order_violations"))

    def to_json(self) -> dict[str, Any]:
        def rows(items: Iterable[Any]) -> list[dict[str, Any]]:
            out = []
            for item in items:
                d = asdict(item)
                for k, v in d.items():
                    if isinstance(v, Lsn):
                        d[k] = str(v)
                out.append(d)
            return out

        return {
            "consumer": self.consumer,
            "agrees": self.agrees,
            "window": {k: (v.isoformat() if isinstance(v, datetime) else str(v) if isinstance(v, Lsn) else v)
                       for k, v in self.window.items()},
            "counts": dict(self.counts),
            "stale_threshold": self.stale_threshold,
            "delay_source": self.delay_source,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "missing": rows(self.missing),
            "duplicates": rows(self.duplicates),
            "order_violations": rows(self.order_violations),
            "inversions": rows(self.inversions),
            "crash_replays": rows(self.crash_replays),
            "runs": [r.to_json() for r in self.runs],
            "unrecorded": [w.to_json() for w in self.unrecorded],
        }

    def summary_lines(self) -> list[str]:
        c, w = self.counts, self.window
        lines = [
            f"consumer {self.consumer}: {'AGREE' if self.agrees else 'DISAGREE'} "
            f"({_span(w)}, {c.get('expected', 0)} expected, "
            f"{c.get('delivered', 0)} delivered, checkpoint {w.get('checkpoint_lsn') or 'none'}, "
            f"fence {w.get('fence_lsn') or 'none'}, {self.elapsed_seconds:.2f}s)",
            f"  missing: {c.get('missing', 0)}  duplicates: {c.get('duplicates', 0)}  "
            f"order violations: {c.get('order_violations', 0)}  inversions: {c.get('inversions', 0)} "
            f"({c.get('inversions_skipped', 0)} a {self.stale_threshold:g}s stale poller would skip)  "
            f"crash replays: {c.get('crash_replays', 0)}  not recorded: {c.get('not_recorded', 0)}",
        ]
        if self.runs:
            first, last = self.runs[0], self.runs[-1]
            lines.append(f"  covers {len(self.runs)} recording run{'s' if len(self.runs) != 1 else ''}: "
                         f"run {first.run} (started {first.started_at:%Y-%m-%d %H:%M:%S}) to run {last.run} "
                         f"(started {last.started_at:%Y-%m-%d %H:%M:%S}), "
                         f"{sum(r.deliveries for r in self.runs)} deliveries on record")
        for u in [u for u in self.unrecorded if not u.before_recording][:20]:
            lines.append(f"  not recorded{' (still running so)' if u.open else ''}: {u.describe()}: "
                         "its deliveries are not checked")
        for m in self.missing[:50]:
            where = f"stream {m.stream_id} v{m.version}" if m.stream_id is not None else f"commit {m.commit_lsn}"
            lines.append(f"  missing on the {m.side} side: seq {m.seq} ({where}, xid {m.xid}): {m.reason}")
        for d in self.duplicates[:50]:
            lines.append(f"  duplicate: seq {d.seq} (xid {d.xid}) delivery {d.delivery} run {d.run} "
                         f"after delivery {d.first_delivery} run {d.first_run}: {d.reason}")
        for o in self.order_violations[:50]:
            lines.append(f"  order: stream {o.stream_id} v{o.version} (seq {o.seq}) after "
                         f"v{o.previous_version} (seq {o.previous_seq}): {o.kind}")
        for i in [i for i in self.inversions if i.skipped_by_stale_poller][:20]:
            lines.append(f"  inversion: {i.explanation}")
        shown = sum(min(len(x), 50) for x in (self.missing, self.duplicates, self.order_violations))
        total = c.get("missing", 0) + c.get("duplicates", 0) + c.get("order_violations", 0)
        if total > shown:
            lines.append(f"  ... {total - shown} more (use --json)")
        return lines


# -- comparing -----------------------------------------------------------------------------------


def reconcile(
    pool: ConnectionPool,
    *,
    consumer: str,
    since: datetime | None = None,
    stale_threshold: float = DEFAULT_STALE_THRESHOLD,
    table: EventTable = DEFAULT_TABLE,
    max_findings: int = DEFAULT_MAX_FINDINGS,
) -> Report:
    """Compare `consumer`'s recorded deliveries with the events table over the window."""
    with pool.connection() as conn:
        return reconcile_conn(conn, consumer=consumer, since=since, stale_threshold=stale_threshold,
                              table=table, max_findings=max_findings)


def reconcile_conn(
    conn: psycopg.Connection,
    *,
    consumer: str,
    since: datetime | None = None,
    from_delivery: int | None = None,
    stale_threshold: float = DEFAULT_STALE_THRESHOLD,
    table: EventTable = DEFAULT_TABLE,
    max_findings: int = DEFAULT_MAX_FINDINGS,
    fence: bool = True,
) -> Report:
    """`reconcile` on one connection; `from_delivery` narrows the window to later deliveries."""
    started = time.monotonic()
    if fence:
        with conn.transaction():
            take_fence(conn, consumer)
    with conn.transaction():
        # One snapshot for everything: deliveries, checkpoint and events agree with each other.
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SET LOCAL work_mem = '256MB'")
        report = _compare(conn, consumer, since, from_delivery, stale_threshold, table, max_findings)
    report.elapsed_seconds = time.monotonic() - started
    return report


def _compare(
    conn: psycopg.Connection,
    consumer: str,
    since: datetime | None,
    from_delivery: int | None,
    stale_threshold: float,
    table: EventTable,
    max_findings: int,
) -> Report:
    ck = conn.execute(
        "SELECT lsn::text, seq, seqs_above, unrecorded FROM cdc.checkpoints WHERE consumer = %s", (consumer,)
    ).fetchone()
    runs = _runs(conn, consumer)
    if not runs:
        raise CdcError(_no_record(conn, consumer, known=ck is not None))
    ck_lsn = Lsn.parse(ck[0]) if ck and ck[0] else None
    ck_seq = int(ck[1]) if ck else 0
    ck_above = list(ck[2] or []) if ck else []
    current = _Cover(ck_lsn, ck_seq, frozenset(ck_above))
    unrecorded = _unrecorded(ck[3] if ck else [], runs[0], current)
    where: sql.Composable = sql.SQL("consumer = %(c)s")
    if since is not None:
        where += sql.SQL(" AND delivered_at >= %(since)s")
    if from_delivery is not None:
        where += sql.SQL(" AND delivery > %(from)s")
    params: dict[str, Any] = {"c": consumer, "since": since, "from": from_delivery}
    row = conn.execute(sql.SQL("SELECT min(seq), max(seq) FROM cdc.deliveries WHERE ") + where, params).fetchone()
    lo, hi = (row[0], row[1]) if row else (None, None)
    fence_row = None
    if ck_lsn is not None:
        fence_row = conn.execute(
            "SELECT snapshot::text, wal_lsn::text, taken_at FROM cdc.delivery_fences "
            "WHERE consumer = %s AND wal_lsn <= %s::pg_lsn ORDER BY wal_lsn DESC LIMIT 1",
            (consumer, str(ck_lsn)),
        ).fetchone()
    horizon = conn.execute(
        "SELECT pruned_max_seq FROM cdc.delivery_horizons WHERE consumer = %s", (consumer,)
    ).fetchone()
    pruned_max_seq = int(horizon[0]) if horizon else None
    window: dict[str, Any] = {
        "lo_seq": lo, "hi_seq": hi, "since": since, "from_delivery": from_delivery,
        "checkpoint_lsn": ck_lsn, "checkpoint_seq": ck_seq, "checkpoint_seqs_above": len(ck_above),
        "fence_lsn": Lsn.parse(fence_row[1]) if fence_row else None,
        "fence_taken_at": fence_row[2] if fence_row else None,
        "pruned_max_seq": pruned_max_seq,
    }
    report = Report(consumer, window, stale_threshold=stale_threshold, runs=runs, unrecorded=unrecorded)
    counts = report.counts
    for k in ("expected", "delivered", "deliveries", "missing", "missing_stream_side", "missing_table_side",
              "duplicates", "crash_replays", "order_violations", "inversions", "inversions_skipped",
              "not_recorded"):
        counts[k] = 0
    if lo is None:
        return report

    ev = table.ident()
    seq_col = sql.Identifier(table.seq)
    xid32 = (sql.SQL("(e.{}::text::numeric %% 4294967296)::bigint").format(sql.Identifier(table.xid))
             if table.xid else sql.SQL("NULL::bigint"))
    stream_col = sql.SQL("e.{}").format(sql.Identifier(table.stream_id))
    version_col = sql.SQL("e.{}").format(sql.Identifier(table.version)) if table.version else sql.SQL("NULL::bigint")
    p = {"c": consumer, "lo": lo}

    # The consumer's deliveries of the window's seqs, one row a seq: first delivery and count.
    conn.execute(
        "CREATE TEMP TABLE cdc_rd ON COMMIT DROP AS "
        "SELECT seq, min(delivery) AS delivery, count(*) AS n FROM cdc.deliveries "
        "WHERE consumer = %(c)s AND seq >= %(lo)s GROUP BY seq", p)
    conn.execute("ANALYZE cdc_rd")
    row = conn.execute("SELECT count(*), coalesce(sum(n), 0) FROM cdc_rd").fetchone()
    counts["delivered"], counts["deliveries"] = (int(row[0]), int(row[1])) if row else (0, 0)

    # Missing on the stream side: expected (claimed, or behind the fence) and never delivered.
    xid_col = table.xid
    use_fence = fence_row is not None and xid_col is not None and _is_xid8(conn, table)
    expected = sql.SQL("(e.{seq} <= %(ck_seq)s OR e.{seq} = ANY(%(above)s::bigint[]){fence})").format(
        seq=seq_col,
        fence=sql.SQL(" OR pg_visible_in_snapshot(e.{}, %(snap)s::pg_snapshot)").format(sql.Identifier(xid_col))
        if use_fence and xid_col is not None else sql.SQL(""),
    )
    mp = {**p, "ck_seq": ck_seq, "above": ck_above, "snap": fence_row[0] if use_fence and fence_row else None,
          "limit": max_findings}
    row = conn.execute(sql.SQL("SELECT count(*) FROM {} e WHERE e.{} >= %(lo)s AND ").format(ev, seq_col) + expected,
                       mp).fetchone()
    counts["expected"] = int(row[0]) if row else 0
    q = sql.SQL(
        "SELECT e.{seq}, {stream}, {version}, {xid}, (e.{seq} <= %(ck_seq)s OR e.{seq} = ANY(%(above)s::bigint[])) "
        "FROM {ev} e WHERE e.{seq} >= %(lo)s AND {expected} "
        "AND NOT EXISTS (SELECT 1 FROM cdc_rd r WHERE r.seq = e.{seq}) ORDER BY e.{seq}"
    ).format(seq=seq_col, stream=stream_col, version=version_col, xid=xid32, ev=ev, expected=expected)
    stream_missing = not_recorded = 0
    for seq, stream_id, version, xid, claimed in conn.execute(q, mp):
        if pruned_max_seq is not None and seq <= pruned_max_seq:
            continue  # its delivery record may have been pruned: undecidable, not a finding
        if claimed and any(w.holds(seq) for w in unrecorded):
            not_recorded += 1  # handled while the consumer did not record: not a finding either
            continue
        stream_missing += 1
        if stream_missing <= max_findings:
            reason = ("the checkpoint claims it handled" if claimed else
                      f"committed before fence {window['fence_lsn']}, which the checkpoint "
                      f"{ck_lsn} has passed, yet never delivered")
            report.missing.append(Missing(int(seq), "stream", stream_id, version, xid, None, reason))

    # Missing on the table side: delivered, yet not in the table.
    q = sql.SQL(
        "SELECT r.seq, d.xid, d.commit_lsn::text FROM cdc_rd r "
        "JOIN cdc.deliveries d ON d.consumer = %(c)s AND d.seq = r.seq AND d.delivery = r.delivery "
        "WHERE NOT EXISTS (SELECT 1 FROM {ev} e WHERE e.{seq} = r.seq) ORDER BY r.seq LIMIT %(limit)s"
    ).format(ev=ev, seq=seq_col)
    table_missing = 0
    for seq, xid, lsn in conn.execute(q, mp):
        table_missing += 1
        report.missing.append(Missing(int(seq), "table", None, None, xid, Lsn.parse(lsn) if lsn else None,
                                      "delivered but not in the events table"))
    counts["missing_stream_side"], counts["missing_table_side"] = stream_missing, table_missing
    counts["not_recorded"] = not_recorded
    counts["missing"] = stream_missing + table_missing

    _duplicates(conn, report, ev, seq_col, stream_col, version_col, p, max_findings)
    if table.version:
        _order(conn, report, ev, seq_col, stream_col, version_col, max_findings, unrecorded)
    _inversions(conn, report, ev, seq_col, stream_col, version_col, p, stale_threshold, max_findings)
    return report


@dataclass(frozen=True, slots=True)
class _Cover:
    """What a checkpoint claims handled: seqs up to `seq`, those in `above`, commits to `lsn`."""

    lsn: Lsn | None
    seq: int
    above: frozenset[int]

    def covers(self, seq: int) -> bool:
        return seq <= self.seq or seq in self.above

    def to_json(self) -> dict[str, Any]:
        return {"lsn": str(self.lsn) if self.lsn is not None else None, "seq": self.seq,
                "seqs_above": len(self.above)}


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A recording run: when it started, from which checkpoint, and how much it recorded."""

    run: int
    started_at: datetime
    start: _Cover
    deliveries: int

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "started_at": self.started_at.isoformat(), "start": self.start.to_json(),
                "deliveries": self.deliveries}


@dataclass(frozen=True, slots=True)
class Unrecorded:
    """A window the consumer ran without recording: from the checkpoint `start` (None: from the
    beginning) to `end` (where recording began again, or the checkpoint now when `open`)."""

    started_at: datetime | None
    ended_at: datetime | None
    start: _Cover | None
    end: _Cover
    open: bool
    before_recording: bool = False

    def holds(self, seq: int) -> bool:
        """Whether the event `seq` was handled in this window: its end claims it, its start does
        not. (A checkpoint claims exactly what was handled, and claims only grow; so an event
        expected only by a fence, which the checkpoint does not claim, is in no window.)"""
        return self.end.covers(seq) and not (self.start is not None and self.start.covers(seq))

    def to_json(self) -> dict[str, Any]:
        return {"started_at": self.started_at.isoformat() if self.started_at else None,
                "ended_at": self.ended_at.isoformat() if self.ended_at else None,
                "from": self.start.to_json() if self.start else None, "to": self.end.to_json(),
                "open": self.open, "before_recording": self.before_recording}

    def describe(self) -> str:
        if self.before_recording:
            return f"before recording began (up to checkpoint {self.end.lsn} / seq {self.end.seq})"
        since = self.started_at.strftime("%Y-%m-%d %H:%M:%S") if self.started_at else "?"
        until = "now" if self.open else self.ended_at.strftime("%Y-%m-%d %H:%M:%S") if self.ended_at else "?"
        start = f"{self.start.lsn} / seq {self.start.seq}" if self.start else "the beginning"
        return f"{since} .. {until}, checkpoint {start} to {self.end.lsn} / seq {self.end.seq}"


def _runs(conn: psycopg.Connection, consumer: str) -> list[RunInfo]:
    rows = conn.execute(
        "SELECT r.run, r.started_at, r.start_lsn::text, r.start_seq, r.start_seqs_above, coalesce(d.n, 0) "
        "FROM cdc.delivery_runs r LEFT JOIN (SELECT run, count(*) AS n FROM cdc.deliveries "
        " WHERE consumer = %(c)s GROUP BY run) d ON d.run = r.run "
        "WHERE r.consumer = %(c)s ORDER BY r.run", {"c": consumer}).fetchall()
    return [RunInfo(int(run), at, _Cover(Lsn.parse(lsn) if lsn else None, int(seq), frozenset(above or ())), int(n))
            for run, at, lsn, seq, above, n in rows]


def _unrecorded(marks: list[dict[str, Any]] | None, first: RunInfo, current: _Cover) -> list[Unrecorded]:
    """The unrecorded windows: before the first recorded run still on record (its start
    checkpoint claims what was handled before), and every one cdc.checkpoints.unrecorded keeps."""
    def cover(mark: dict[str, Any], end: str) -> _Cover:
        lsn = mark.get(f"{end}_lsn")
        return _Cover(Lsn.parse(lsn) if lsn else None, int(mark.get(f"{end}_seq") or 0),
                      frozenset(mark.get(f"{end}_seqs_above") or ()))

    def when(text: str | None) -> datetime | None:
        return datetime.fromisoformat(text) if text else None

    out = [Unrecorded(None, first.started_at, None, first.start, False, before_recording=True)]
    for mark in marks or []:
        closed = "to_seq" in mark
        start = cover(mark, "from")
        out.append(Unrecorded(when(mark.get("started_at")), when(mark.get("ended_at")),
                              None if start.lsn is None and start.seq == 0 else start,
                              cover(mark, "to") if closed else current, not closed))
    return out


def _no_record(conn: psycopg.Connection, consumer: str, *, known: bool) -> str:
    how = (f"run it with --record-deliveries (or --reconcile), e.g. cdc run --consumer {consumer} "
           "--record-deliveries, then reconcile")
    if known:
        return f"consumer {consumer!r} has no delivery record (it never ran recording its deliveries): {how}"
    names = [r[0] for r in conn.execute("SELECT consumer FROM cdc.checkpoints ORDER BY consumer LIMIT 20")]
    return (f"no consumer {consumer!r}: cdc.checkpoints knows "
            + (", ".join(names) if names else "none yet") + f"; or, if it is new, {how}")


def _is_xid8(conn: psycopg.Connection, table: EventTable) -> bool:
    row = conn.execute(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = to_regclass(%s) AND attname = %s AND NOT attisdropped",
        (table.qualified, table.xid),
    ).fetchone()
    return bool(row and row[0] == "xid8")


def _duplicates(conn: psycopg.Connection, report: Report, ev: sql.Composable, seq_col: sql.Composable,
                stream_col: sql.Composable, version_col: sql.Composable, p: dict[str, Any],
                max_findings: int) -> None:
    q = sql.SQL(
        "SELECT d.seq, d.run, d.delivery, d.xid, d.commit_lsn::text, ru.start_lsn::text, ru.start_seq, "
        "ru.start_seqs_above, {stream}, {version} "
        "FROM cdc_rd r JOIN cdc.deliveries d ON d.consumer = %(c)s AND d.seq = r.seq "
        "LEFT JOIN cdc.delivery_runs ru ON ru.run = d.run "
        "LEFT JOIN {ev} e ON e.{seq} = r.seq "
        "WHERE r.n > 1 ORDER BY d.seq, d.delivery"
    ).format(stream=stream_col, version=version_col, ev=ev, seq=seq_col)
    previous: tuple[Any, ...] | None = None
    dups = replays = 0
    for row in conn.execute(q, p):
        seq, run, delivery, xid, lsn_text, start_lsn, start_seq, start_above, stream_id, version = row
        commit_lsn = Lsn.parse(lsn_text) if lsn_text else None
        if previous is None or previous[0] != seq:
            previous = row
            continue
        prev_run, prev_delivery, prev_lsn_text = previous[1], previous[2], previous[4]
        prev_lsn = Lsn.parse(prev_lsn_text) if prev_lsn_text else None
        if run == prev_run:
            reason, real = "delivered twice in the same run", True
        else:
            covered = (
                (prev_lsn is not None and start_lsn is not None and prev_lsn <= Lsn.parse(start_lsn))
                or (start_seq is not None and seq <= start_seq)
                or seq in (start_above or ())
            )
            if covered:
                reason, real = (f"run {run} started at checkpoint {start_lsn} / seq {start_seq}, "
                                "which already covered it"), True
            else:
                reason, real = f"crash replay: not acknowledged when run {run} started at {start_lsn}", False
        finding = Duplicate(int(seq), stream_id, version, xid, commit_lsn, int(prev_delivery), int(prev_run),
                            int(delivery), int(run), reason)
        if real:
            dups += 1
            if dups <= max_findings:
                report.duplicates.append(finding)
        else:
            replays += 1
            if replays <= max_findings:
                report.crash_replays.append(finding)
        previous = row
    report.counts["duplicates"], report.counts["crash_replays"] = dups, replays


def _order(conn: psycopg.Connection, report: Report, ev: sql.Composable, seq_col: sql.Composable,
           stream_col: sql.Composable, version_col: sql.Composable, max_findings: int,
           unrecorded: Sequence[Unrecorded] = ()) -> None:
    q = sql.SQL(
        "SELECT stream_id, seq, version, prev_seq, prev_version, delivery FROM ("
        " SELECT {stream} AS stream_id, r.seq, {version} AS version, r.delivery,"
        "  lag({version}) OVER w AS prev_version, lag(r.seq) OVER w AS prev_seq"
        " FROM cdc_rd r JOIN {ev} e ON e.{seq} = r.seq"
        " WINDOW w AS (PARTITION BY {stream} ORDER BY r.delivery)"
        ") x WHERE prev_version IS NOT NULL AND version <> prev_version + 1 ORDER BY delivery"
    ).format(stream=stream_col, version=version_col, ev=ev, seq=seq_col)
    # The versions a skip jumps over, when every one was handled in an unrecorded window, were
    # delivered unrecorded: not a violation.
    between = sql.SQL("SELECT e.{seq} FROM {ev} e WHERE {stream} = %s AND {version} > %s AND {version} < %s").format(
        seq=seq_col, ev=ev, stream=stream_col, version=version_col)
    n = 0
    for stream_id, seq, version, prev_seq, prev_version, delivery in conn.execute(q).fetchall():
        if unrecorded and version > prev_version + 1:
            skipped = [r[0] for r in conn.execute(between, (stream_id, prev_version, version))]
            if skipped and all(any(w.holds(s) for w in unrecorded) for s in skipped):
                continue
        n += 1
        if n <= max_findings:
            kind: Literal["skipped", "out_of_order"] = "skipped" if version > prev_version + 1 else "out_of_order"
            report.order_violations.append(
                OrderViolation(stream_id, int(seq), int(version), int(prev_seq), int(prev_version), int(delivery), kind))
    report.counts["order_violations"] = n


def _inversions(conn: psycopg.Connection, report: Report, ev: sql.Composable, seq_col: sql.Composable,
                stream_col: sql.Composable, version_col: sql.Composable, p: dict[str, Any],
                stale_threshold: float, max_findings: int) -> None:
    # In delivery (= commit) order, a seq below the running maximum committed after a higher one.
    # The running maxima are increasing in both order and seq: the first one above a late seq is
    # the first commit that opened the hole a poller would have seen.
    conn.execute(
        "CREATE TEMP TABLE cdc_runmax ON COMMIT DROP AS SELECT seq, delivery, "
        "max(seq) OVER (ORDER BY delivery ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS max_before "
        "FROM cdc_rd")
    conn.execute(
        "CREATE TEMP TABLE cdc_records ON COMMIT DROP AS SELECT seq, delivery FROM cdc_runmax "
        "WHERE max_before IS NULL OR seq > max_before")
    conn.execute("CREATE INDEX ON cdc_records (seq)")
    conn.execute("ANALYZE cdc_records")
    q = sql.SQL(
        "WITH late AS (SELECT l.seq, l.delivery, b.seq AS by_seq, b.delivery AS by_delivery "
        " FROM cdc_runmax l CROSS JOIN LATERAL ("
        "  SELECT seq, delivery FROM cdc_records WHERE seq > l.seq ORDER BY seq LIMIT 1) b"
        " WHERE l.max_before > l.seq) "
        "SELECT late.seq, {stream}, {version}, a.xid, a.commit_lsn::text, "
        " late.by_seq, b.xid, b.commit_lsn::text, "
        " extract(epoch FROM a.commit_time - b.commit_time), "
        " extract(epoch FROM a.delivered_at - b.delivered_at) "
        "FROM late "
        "JOIN cdc.deliveries a ON a.consumer = %(c)s AND a.seq = late.seq AND a.delivery = late.delivery "
        "JOIN cdc.deliveries b ON b.consumer = %(c)s AND b.seq = late.by_seq AND b.delivery = late.by_delivery "
        "LEFT JOIN {ev} e ON e.{seq} = late.seq ORDER BY late.delivery"
    ).format(stream=stream_col, version=version_col, ev=ev, seq=seq_col)
    n = skipped = 0
    fallback = False
    for (seq, stream_id, version, xid, lsn, by_seq, by_xid, by_lsn, commit_delay, delivered_delay) in conn.execute(q, p):
        if commit_delay is not None:
            delay: float | None = float(commit_delay)
        else:
            delay = float(delivered_delay) if delivered_delay is not None else None
            fallback = True
        skip = delay is not None and delay > stale_threshold
        n += 1
        skipped += skip
        if n <= max_findings:
            explanation = (
                f"seq {seq} (xid {xid}, commit {lsn}) committed {delay if delay is not None else '?'}s after "
                f"the higher seq {by_seq} (xid {by_xid}, commit {by_lsn}): the lower seq committed later"
                + (f"; a poller with a {stale_threshold:g}s stale threshold would have skipped it" if skip else "")
            )
            report.inversions.append(Inversion(
                int(seq), stream_id, version, xid, Lsn.parse(lsn) if lsn else None, int(by_seq), by_xid,
                Lsn.parse(by_lsn) if by_lsn else None, delay, skip, explanation))
    report.counts["inversions"], report.counts["inversions_skipped"] = n, skipped
    if fallback:
        report.delay_source = "commit_time where recorded, else delivered_at (poll deliveries)"


# -- continuous ----------------------------------------------------------------------------------


class ShadowReconciler:
    """Beside a running consumer: every `interval` seconds, check the recently recorded window.

    Each round takes a fence, then compares the deliveries recorded in the last few rounds (so an
    event pending in one round is decided in a later one) with the table, on its own pooled
    connection: never the replication connection. Each finding is counted in
    RECONCILE_FINDINGS and logged once (seq, xid, LSNs; never payloads). A lost event whose seq
    lies below everything delivered in the recent window is left to the one-shot `cdc reconcile`.
    """

    def __init__(
        self,
        pool: ConnectionPool,
        consumer: str,
        *,
        interval: float = 5.0,
        stale_threshold: float = DEFAULT_STALE_THRESHOLD,
        table: EventTable = DEFAULT_TABLE,
        rounds: int = 3,
    ):
        self.pool = pool
        self.consumer = consumer
        self.interval = interval
        self.stale_threshold = stale_threshold
        self.table = table
        self.rounds = rounds
        self.last_report: Report | None = None
        self.errors = 0
        self._marks: deque[int] = deque(maxlen=rounds)
        self._seen: set[tuple[Any, ...]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"cdc-reconcile-{self.consumer}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_once()
            except Exception as err:  # keep shadowing: the delivery path must not notice
                self.errors += 1
                RECONCILE_FINDINGS.labels("error").inc()
                log.warning("reconcile round failed for consumer %s: %s", self.consumer, err)

    def check_once(self) -> Report:
        """One round (the thread calls it; tests may too)."""
        with self.pool.connection() as conn:
            row = conn.execute(
                "SELECT coalesce(max(delivery), 0) FROM cdc.deliveries WHERE consumer = %s", (self.consumer,)
            ).fetchone()
            conn.commit()
            mark = int(row[0]) if row else 0
            from_delivery = self._marks[0] if len(self._marks) == self.rounds else None
            self._marks.append(mark)
            report = reconcile_conn(conn, consumer=self.consumer, from_delivery=from_delivery,
                                    stale_threshold=self.stale_threshold, table=self.table, max_findings=10_000)
        self._publish(report)
        self.last_report = report
        return report

    def _publish(self, report: Report) -> None:
        lo = report.window.get("lo_seq")
        if lo is not None:  # forget what lies below the window: it cannot come back
            self._seen = {k for k in self._seen if k[1] >= lo}
        for m in report.missing:
            if self._new(("missing", m.seq, m.side)):
                RECONCILE_FINDINGS.labels("missing").inc()
                log.error("missing on the %s side: consumer %s seq %d stream %s version %s xid %s commit_lsn %s: %s",
                          m.side, self.consumer, m.seq, m.stream_id, m.version, m.xid, m.commit_lsn, m.reason)
        for d in report.duplicates:
            if self._new(("duplicate", d.seq, d.delivery)):
                RECONCILE_FINDINGS.labels("duplicate").inc()
                log.error("duplicate delivery: consumer %s seq %d xid %s commit_lsn %s delivery %d run %d "
                          "(first delivery %d run %d): %s", self.consumer, d.seq, d.xid, d.commit_lsn,
                          d.delivery, d.run, d.first_delivery, d.first_run, d.reason)
        for d in report.crash_replays:
            if self._new(("crash_replay", d.seq, d.delivery)):
                RECONCILE_FINDINGS.labels("crash_replay").inc()
                log.info("crash replay: consumer %s seq %d delivery %d run %d", self.consumer, d.seq, d.delivery, d.run)
        for o in report.order_violations:
            if self._new(("order_violation", o.seq, o.delivery)):
                RECONCILE_FINDINGS.labels("order_violation").inc()
                log.error("order violation (%s): consumer %s stream %s version %d seq %d after version %d seq %d",
                          o.kind, self.consumer, o.stream_id, o.version, o.seq, o.previous_version, o.previous_seq)
        for i in report.inversions:
            if self._new(("inversion", i.seq, i.overtaken_by_seq)):
                RECONCILE_FINDINGS.labels("inversion_skipped" if i.skipped_by_stale_poller else "inversion").inc()
                (log.warning if i.skipped_by_stale_poller else log.debug)("inversion: consumer %s: %s",
                                                                           self.consumer, i.explanation)

    def _new(self, key: tuple[Any, ...]) -> bool:
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


# -- command line --------------------------------------------------------------------------------


def run_cli(
    dsn: str,
    consumer: str,
    json: bool,
    *,
    since: datetime | str | None = None,
    stale_threshold: float = DEFAULT_STALE_THRESHOLD,
    table: EventTable = DEFAULT_TABLE,
) -> tuple[int, str]:
    """`cdc reconcile`: (exit code, output). 0 the paths agree, 1 they do not, 2 an error (then,
    without `json`, the output is the one error line, for stderr).

    `since`: a datetime, ISO 8601 text, or an age such as ``90s``, ``10m``, ``2h``, ``1d``.
    """
    import orjson

    from .errors import CdcError

    try:
        since = parse_since(since)
        with psycopg.connect(dsn) as conn:
            report = reconcile_conn(conn, consumer=consumer, since=since, stale_threshold=stale_threshold,
                                    table=table)
    except (psycopg.Error, CdcError, OSError, ValueError) as err:
        from .connection import mask
        from .errors import explain_database_error

        if isinstance(err, psycopg.Error):
            text = mask(explain_database_error(err))
        else:
            text = mask(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        if json:
            return 2, orjson.dumps({"error": text}).decode() + "\n"
        return 2, f"cdc: error: {text}\n"
    code = 0 if report.agrees else 1
    if json:
        return code, orjson.dumps(report.to_json(), option=orjson.OPT_NON_STR_KEYS).decode() + "\n"
    return code, "\n".join(report.summary_lines()) + "\n"


def _span(window: dict[str, Any]) -> str:
    lo, hi = window.get("lo_seq"), window.get("hi_seq")
    return "no seqs" if lo is None or hi is None else f"seqs {lo}..{hi}"


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: datetime | str | None) -> datetime | None:
    """A datetime, ISO 8601 text (UTC when no zone), or an age like ``10m`` (ago, from now)."""
    if value is None or isinstance(value, datetime):
        return value
    text = value.strip()
    if text and text[-1] in _UNITS and text[:-1].replace(".", "", 1).isdigit():
        return datetime.now(timezone.utc) - timedelta(seconds=float(text[:-1]) * _UNITS[text[-1]])
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {value!r}: expected ISO 8601 (2024-05-01T12:00) or an age (90s, 10m, 2h, 1d)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
