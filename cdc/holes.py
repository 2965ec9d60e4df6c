"""Sequence holes: when a missing seq may still commit, and when it is proven never to.

Seqs come from a CACHE 1 sequence, but transactions commit in any order, so a reader going up
the seqs meets *holes*: a seq missing below a seq it can see. A hole is either in flight (its
transaction will still insert or commit it) or dead (rolled back, or the number was never used).
Skipping an in-flight hole loses an event; waiting on a dead one forever stalls the feed. Time
cannot tell them apart (a transaction may legitimately stay open for minutes), so we prove
death instead of guessing it.

The proof. Let a snapshot T1 lack seq s but show a larger seq L. Whoever took s did so before L
was taken (one sequence, no cache: numbers are handed out in time order), and L's transaction
committed before T1, so the holder of s began before T1. `nextval()` takes a RowExclusiveLock on
the sequence relation under the *top* transaction's resource owner (sequence.c,
lock_and_open_sequence), held until that transaction ends, and `pg_locks` is readable by every
role. Hence:

1. In a statement after T1 (time T2 >= T1) read H(s): the virtual transactions holding a lock
   on the sequence. The holder of s, if still running at T2, is in H(s). This covers the window
   between `nextval()` and the INSERT too: the lock comes with the number.
2. Later, check which members of H(s) still hold any lock (T3). When none does, every possible
   holder has ended. Postgres makes a commit visible (ProcArrayEndTransaction) *before* it
   releases the locks, so a snapshot T4 taken after T3 shows s if it ever committed.
   Absent at T4: s is dead, pass it. Present: deliver it.
3. A hole with a live holder is never passed, however old; age only decides when to warn.

Costs of the rule being per relation, not per number: any transaction that took a number and
is still open (an idle-in-transaction session, say) holds up proving later holes dead until it
ends. That delays, it never loses. Two uses the rule cannot cover, documented in store.py's
spirit: a cached sequence (a session may use a number long after a later one committed: refused
by `sequence_oid`), and a number taken in one transaction and inserted by another one (nothing
ties the insert to the lock; don't do that).

PREPARE TRANSACTION moves a transaction's locks to a new virtual transaction id (pid NULL), so
the one we saw in H(s) vanishes although it may still commit. A prepared transaction holding
the sequence lock therefore counts as a live holder of every pending hole.

The state here is pure (`HoleTracker`, `SeqWatermark`'s walk) so it is unit-tested without a
database; the few SQL helpers it needs sit at the end.
"""

from __future__ import annotations

import bisect
import logging
import re
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from .checkpoint import Position
from .errors import ConfigError
from .store import DEFAULT_TABLE, EventTable

# vxid -> backend pid (None for a prepared transaction)
Holders = Mapping[str, "int | None"]

# A stale hole is logged again at most this often.
WARN_EVERY = 5.0


@dataclass
class Hole:
    """A run of missing seqs `first..last` seen in one snapshot, with the holders read after it.

    `cleared` is sticky: once no holder is alive (at some time T), any snapshot taken after T
    that still lacks a seq of the run proves that seq dead.
    """

    first: int
    last: int
    holders: frozenset[str]
    seen_at: float
    cleared: bool = False
    alive: dict[str, int | None] = field(default_factory=dict)
    warned_at: float | None = None

    def split(self, first: int, last: int) -> Hole:
        return Hole(first, last, self.holders, self.seen_at, self.cleared, dict(self.alive), self.warned_at)


@dataclass(frozen=True)
class Scan:
    """What one snapshot's seqs allow.

    `ready`: how many of the given seqs lie in the resolved prefix (deliverable now).
    `high_water_mark`: every seq at or below it is present or proven dead.
    `new_gaps`: runs missing in this snapshot that no tracked hole covers: read their holders.
    `dead`: seqs passed as dead by this scan (for logs and tests).
    """

    ready: int
    high_water_mark: int
    new_gaps: list[tuple[int, int]]
    dead: list[tuple[int, int]]


@dataclass(frozen=True)
class StaleHole:
    """A hole waited on for longer than the threshold, and who holds it up."""

    first: int
    last: int
    age: float
    pids: tuple[int | None, ...]


class HoleTracker:
    """The pending holes above a high-water mark, and the decision: dead, wait, or warn.

    One cycle, in this order (the order is the proof):
      `check(live)` with the holders alive now (T3), for the holes not yet cleared;
      `scan(hwm, seqs)` with the seqs of a snapshot taken after that (T4);
      `add(scan.new_gaps, holders)` with the sequence's lock holders read after the snapshot.
    """

    def __init__(self, *, stale_after: float = 3.0, warn_every: float = WARN_EVERY):
        self.stale_after = stale_after
        self.warn_every = warn_every
        self.holes: list[Hole] = []  # disjoint, sorted by `first`

    def __len__(self) -> int:
        return len(self.holes)

    def waiting(self) -> bool:
        """True when a hole still waits on a holder (so the holders must be checked)."""
        return any(not h.cleared for h in self.holes)

    def watched(self) -> frozenset[str]:
        """The vxids whose liveness decides the holes not yet cleared."""
        out: set[str] = set()
        for h in self.holes:
            if not h.cleared:
                out |= h.holders
        return frozenset(out)

    def check(self, live: Holders) -> None:
        """Record which holders are alive now; holes left with none become cleared.

        `live` maps the vxids of `watched()` still holding any lock, plus every prepared
        transaction (pid None) holding the sequence lock, to their pid.
        """
        prepared = {v: p for v, p in live.items() if p is None}
        for h in self.holes:
            if h.cleared:
                continue
            alive = {v: live[v] for v in h.holders if v in live}
            alive.update(prepared)
            h.alive = alive
            if not alive:
                h.cleared = True

    def add(self, gaps: Iterable[tuple[int, int]], holders: Holders, now: float) -> None:
        """Track `gaps` (from `Scan.new_gaps`), with H = the sequence's lock holders read after
        the snapshot that showed them. No holder at all: cleared at once (the read is the T3)."""
        hs = frozenset(holders)
        for first, last in gaps:
            hole = Hole(first, last, hs, now, cleared=not hs, alive=dict(holders))
            i = bisect.bisect_left([h.first for h in self.holes], first)
            self.holes.insert(i, hole)

    def scan(self, hwm: int, seqs: Sequence[int], *, complete_to: int | None = None,
             blocked: int | None = None) -> Scan:
        """Walk a snapshot's sorted seqs (all > hwm) from hwm: how far is proven?

        A missing seq inside a cleared hole is dead; one inside a waiting hole, or in no hole
        yet, stops the prefix, and so does `blocked` (a seq the caller must not pass). Tracked
        holes are re-cut to what is still missing. Only a missing seq below a visible one is a
        hole, so the walk ends at the last seq given, or at `complete_to` when the caller knows
        a larger seq exists (the watermark: a handled seq committed).
        """
        end = seqs[-1] if seqs else hwm
        if complete_to is not None and complete_to > end:
            end = complete_to
        gaps: list[tuple[int, int]] = []
        expected = hwm + 1
        for s in seqs:
            if s > expected:
                gaps.append((expected, s - 1))
            expected = s + 1
        if expected <= end:
            gaps.append((expected, end))

        # Cut the missing runs along the tracked holes (both sorted): each piece is tracked
        # (with its hole) or new (None). Parts of holes not missing any more are dropped.
        pieces: list[tuple[int, int, Hole | None]] = []
        holes, j = self.holes, 0
        for first, last in gaps:
            cursor = first
            while j < len(holes) and holes[j].last < cursor:
                j += 1
            k = j
            while k < len(holes) and holes[k].first <= last:
                h = holes[k]
                lo, hi = max(h.first, cursor), min(h.last, last)
                if lo > cursor:
                    pieces.append((cursor, lo - 1, None))
                pieces.append((lo, hi, h))
                cursor = hi + 1
                if h.last > last:
                    break
                k += 1
            j = k
            if cursor <= last:
                pieces.append((cursor, last, None))

        stop = blocked if blocked is not None and blocked <= end else None
        dead: list[tuple[int, int]] = []
        for first, last, hole in pieces:
            if stop is not None and first > stop:
                break
            if hole is None or not hole.cleared:
                stop = first
                break
            dead.append((first, last))
        hwm_new = end if stop is None else stop - 1

        kept = [h.split(first, last) for first, last, h in pieces if h is not None and first > hwm_new]
        kept += [h.split(max(h.first, end + 1), h.last) for h in holes if h.last > end]
        self.holes = kept
        new_gaps = [(first, last) for first, last, h in pieces if h is None and first > hwm_new]
        return Scan(bisect.bisect_right(seqs, hwm_new), hwm_new, new_gaps, dead)

    def stale(self, now: float) -> list[StaleHole]:
        """Holes waited on for longer than `stale_after` and due a (repeated) warning."""
        out = []
        for h in self.holes:
            if h.cleared or now - h.seen_at < self.stale_after:
                continue
            if h.warned_at is not None and now - h.warned_at < self.warn_every:
                continue
            h.warned_at = now
            out.append(StaleHole(h.first, h.last, now - h.seen_at, tuple(sorted(
                h.alive.values(), key=lambda p: (p is None, p or 0)))))
        return out

    def oldest(self, now: float) -> tuple[float, int]:
        """(age in seconds, a live holder's pid) of the oldest hole waited on; (0, 0) if none."""
        waiting = [h for h in self.holes if not h.cleared]
        if not waiting:
            return 0.0, 0
        h = min(waiting, key=lambda h: h.seen_at)
        pids = [p for p in h.alive.values() if p is not None]
        return now - h.seen_at, (min(pids) if pids else 0)


def describe_stale(stale: StaleHole, ages: Mapping[int, float | None]) -> str:
    """The warning line for a stale hole: the seq, the holders' pids and transaction ages."""
    seqs = f"seq {stale.first}" if stale.first == stale.last else f"seqs {stale.first}..{stale.last}"
    holders = []
    for pid in stale.pids:
        if pid is None:
            holders.append("a prepared transaction")
            continue
        age = ages.get(pid)
        holders.append(f"pid {pid} (transaction open {age:.1f} s)" if age is not None
                       else f"pid {pid} (transaction age unknown)")
    return (f"waiting {stale.age:.1f} s on {seqs}: the sequence is held by "
            f"{', '.join(holders) or 'no one any more'}; it is never skipped while its holder "
            "runs (end that transaction if it is stuck)")


# -- the stream path's watermark ---------------------------------------------------------------

# How many unhandled seqs one advance() looks up at most: bounds the statement, not correctness.
_MAX_CANDIDATES = 10_000


class SeqWatermark:
    """The seq coordinate of a consumer fed in commit order (the stream).

    `mark_handled` is the hot path: per transaction, memory only. `advance(conn)` (every few
    seconds) moves the mark W over seqs that are handled, or absent from the table and proven
    dead by the hole rule above. It stops at the first seq present but unhandled (it committed:
    the stream will bring it) or missing with a live holder.
    """

    def __init__(self, *, table: EventTable = DEFAULT_TABLE, position: Position | None = None,
                 stale_after: float = 3.0):
        self.table = table
        start = position or Position()
        self.seq = start.seq
        self.handled: set[int] = {s for s in start.seqs_above if s > start.seq}
        self.tracker = HoleTracker(stale_after=stale_after)
        self._seq_oid: int | None = None
        self.log = logging.getLogger("cdc.holes")

    def mark_handled(self, seqs: Iterable[int]) -> None:
        # Mostly each seq is the one after the mark (commit order = seq order when writers do
        # not overlap): move the mark at once, and keep a set only of what lies beyond a gap.
        w, handled = self.seq, self.handled
        for s in seqs:
            if s == w + 1:
                w = s
                if handled:
                    while w + 1 in handled:
                        w += 1
                        handled.discard(w)
            elif s > w:
                handled.add(s)
        self.seq = w

    @property
    def position(self) -> Position:
        return Position(None, self.seq, frozenset(self.handled))

    def _pop_contiguous(self) -> None:
        w, handled = self.seq, self.handled
        while w + 1 in handled:
            w += 1
            handled.discard(w)
        self.seq = w

    def advance(self, conn: psycopg.Connection) -> Position:
        """Move W as far as proven; return the position. `conn`: an autocommit connection.

        Statements, in the order the proof needs: the liveness of pending holes' holders (T3),
        then one presence lookup of the unhandled seqs in (W, limit] (T4), then, for holes new
        in it, the sequence's lock holders. A second round runs at once when the new holes had
        no holder at all (rolled back before we looked), so they pass in this same call.
        """
        self._pop_contiguous()
        for _ in range(2):
            if not self.handled:
                self.tracker.holes.clear()
                break
            top = max(self.handled)
            candidates: list[int] = []
            for s in range(self.seq + 1, top):
                if s not in self.handled:
                    candidates.append(s)
                    if len(candidates) >= _MAX_CANDIDATES:
                        break
            if not candidates:  # cannot happen after _pop_contiguous, kept for safety
                break
            if self._seq_oid is None:
                self._seq_oid = sequence_oid(conn, self.table)
            if self.tracker.waiting():
                self.tracker.check(live_holders(conn, self.tracker.watched(), self._seq_oid))
            present = set(present_seqs(conn, self.table, candidates))
            limit = candidates[-1]
            visible = [s for s in range(self.seq + 1, limit + 1) if s in self.handled or s in present]
            scan = self.tracker.scan(self.seq, visible, complete_to=limit,
                                     blocked=min(present) if present else None)
            self.seq = max(self.seq, scan.high_water_mark)
            self.handled = {s for s in self.handled if s > self.seq}
            self._pop_contiguous()
            if not scan.new_gaps:
                break
            self.tracker.add(scan.new_gaps, seq_lock_holders(conn, self._seq_oid), time.monotonic())
            if self.tracker.waiting():
                break
        for stale in self.tracker.stale(time.monotonic()):
            self.log.warning(describe_stale(stale, transaction_ages(conn, [p for p in stale.pids if p])))
        return self.position


# -- SQL helpers ---------------------------------------------------------------------------------

_NEXTVAL = re.compile(r"nextval\('((?:[^']|'')+)'(?:::regclass)?\)")


def sequence_oid(conn: psycopg.Connection, table: EventTable = DEFAULT_TABLE) -> int:
    """The oid of the sequence feeding `table.seq`; ConfigError unless it exists and is CACHE 1."""
    row = conn.execute(
        "SELECT pg_get_serial_sequence(%s, %s)::regclass::oid",
        (sql.Identifier(table.schema, table.name).as_string(conn), table.seq),
    ).fetchone()
    oid = row[0] if row else None
    if oid is None:
        # Not owned by the column (a plain DEFAULT nextval('...')): read the default.
        row = conn.execute(
            """
            SELECT pg_get_expr(d.adbin, d.adrelid)
            FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
            WHERE d.adrelid = %s::regclass AND a.attname = %s
            """,
            (sql.Identifier(table.schema, table.name).as_string(conn), table.seq),
        ).fetchone()
        match = _NEXTVAL.search(row[0]) if row and row[0] else None
        if match is None:
            raise ConfigError(
                f"cannot find the sequence behind {table.qualified}.{table.seq} (no serial/identity "
                "and no DEFAULT nextval(...)): the poller needs it to prove holes dead"
            )
        row = conn.execute("SELECT %s::regclass::oid", (match.group(1).replace("''", "'"),)).fetchone()
        assert row is not None
        oid = row[0]
    row = conn.execute(
        "SELECT s.seqrelid::regclass::text, s.seqcache FROM pg_sequence s WHERE s.seqrelid = %s",
        (oid,),
    ).fetchone()
    if row is not None and row[1] != 1:
        raise ConfigError(
            f"sequence {row[0]} has CACHE {row[1]}: a session may then use a number long after a "
            f"later one committed, and holes cannot be proven dead; run ALTER SEQUENCE {row[0]} CACHE 1"
        )
    return int(oid)


def seq_lock_holders(conn: psycopg.Connection, seq_oid: int) -> dict[str, int | None]:
    """H: the virtual transactions (other than ours) holding a lock on the sequence, with pids.
    Prepared transactions show with pid NULL and are kept."""
    rows = conn.execute(
        "SELECT DISTINCT virtualtransaction, pid FROM pg_locks "
        "WHERE locktype = 'relation' AND relation = %s AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND pid IS DISTINCT FROM pg_backend_pid()",
        (seq_oid,),
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def live_holders(conn: psycopg.Connection, vxids: Collection[str], seq_oid: int) -> dict[str, int | None]:
    """Which of `vxids` still hold any lock (a transaction keeps the lock on its own vxid to its
    end), plus any prepared transaction holding the sequence lock (see the module docstring)."""
    rows = conn.execute(
        "SELECT DISTINCT virtualtransaction, pid FROM pg_locks "
        "WHERE virtualtransaction = ANY(%s) "
        "OR (pid IS NULL AND locktype = 'relation' AND relation = %s)",
        (list(vxids), seq_oid),
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def transaction_ages(conn: psycopg.Connection, pids: Collection[int]) -> dict[int, float | None]:
    """Seconds each backend's transaction has been open (None where the role may not see it)."""
    if not pids:
        return {}
    rows = conn.execute(
        "SELECT pid, extract(epoch FROM clock_timestamp() - xact_start)::float8 "
        "FROM pg_stat_activity WHERE pid = ANY(%s)",
        (list(pids),),
    ).fetchall()
    return {int(r[0]): r[1] for r in rows}


def present_seqs(conn: psycopg.Connection, table: EventTable, seqs: Sequence[int]) -> list[int]:
    """Which of `seqs` are in the table, in one statement (one snapshot)."""
    rows = conn.execute(
        sql.SQL("SELECT {seq} FROM {table} WHERE {seq} = ANY(%s)").format(
            seq=sql.Identifier(table.seq), table=table.ident()),
        (list(seqs),),
    ).fetchall()
    return [int(r[0]) for r in rows]
