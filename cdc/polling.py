"""The poll path: a gap-safe sequence poller, history replay, and reads under an exported snapshot.

The poller reads rows above its high-water mark (hwm) in seq order, a page per statement (one
statement, one snapshot: the mark is never computed from two snapshots, see NOTES.md). Seq
order is not commit order, so a page can show seq 7 while 5 is still in flight: 5 is a hole.
Delivery stops at the first hole until holes.py proves it dead (its transaction rolled back) or
the row shows up. A hole whose holder is still running is never skipped, however long it stays
open; after `stale_after` seconds we only warn, naming the holder's pid.

One poll cycle, in the order the proof needs:
  1. pending holes: which of their holders are still alive (T3);
  2. the page, a fresh snapshot (T4 > T3): missing seqs of cleared holes are dead;
  3. holes new in this page: read the sequence's lock holders (T2 >= the page's snapshot).
"""

from __future__ import annotations

import logging
import re
import select
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from operator import ne
from typing import Any

import orjson
import psycopg
from psycopg import pq, sql
from psycopg_pool import ConnectionPool

from . import metrics
from .checkpoint import Position
from .errors import UnsupportedChangeError
from .events import Event, Lsn, Transaction
from .holes import (
    HoleTracker,
    describe_stale,
    live_holders,
    seq_lock_holders,
    sequence_oid,
    transaction_ages,
)
from .jsontext import from_bytes, from_text, one_line
from .progress import Progress, counted
from .sinks import Sink
from .store import DEFAULT_TABLE, NOTIFY_CHANNEL, EventTable

log = logging.getLogger("cdc.poll")

# Where the WAL is now, on a primary or a standby: the insert position, which holds every commit
# that returned, also under synchronous_commit = off (the write position may still lag it).
WAL_NOW = ("SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
           "ELSE pg_current_wal_insert_lsn() END)::text")

_Row = tuple[Any, ...]


class _Decode:
    """Rows of `EventTable.select_list()` → Events. jsonb payloads come as their text (the
    select list casts them) and stay text; bytea and text payloads become JSON text (jsontext)."""

    def __init__(self, table: EventTable, event_class: type[Event] = Event):
        self.new = event_class
        readers: dict[str, Callable[[Any], str]] = {
            "bytea": lambda v: from_bytes(bytes(v)), "text": from_text, "jsonb": one_line}
        # A column the mapping lacks is selected as NULL: its reader is never called.
        self.read_data = readers[table.payload_encoding.get(table.data or "", "jsonb")]
        self.read_metadata = readers[table.payload_encoding.get(table.metadata or "", "jsonb")]

    def event(self, row: _Row) -> Event:
        d, m = row[4], row[5]
        if d is not None:
            d = self.read_data(d)
        if m is not None:
            m = self.read_metadata(m)
        stream_id = row[1]
        if type(stream_id) is not str:
            stream_id = str(stream_id)
        return self.new(row[0], stream_id, row[2], row[3], d, m, row[6])


def _select(table: EventTable, where: sql.Composable, limit: bool) -> sql.Composed:
    return sql.SQL("SELECT {cols} FROM {table} WHERE {where} ORDER BY {seq}{limit}").format(
        cols=table.select_list(), table=table.ident(), where=where, seq=sql.Identifier(table.seq),
        limit=sql.SQL(" LIMIT %(limit)s") if limit else sql.SQL(""),
    )


class Poller:
    """Committed events in seq order, nothing skipped that may still commit.

    `poll(timeout)` returns the transactions ready now (consecutive rows of one xid form one
    transaction), waiting up to `timeout` when none is. `position` is where a restart resumes.
    """

    def __init__(
        self,
        *,
        pool: ConnectionPool,
        table: EventTable = DEFAULT_TABLE,
        position: Position | None = None,
        page_size: int = 1000,
        interval: float = 0.1,
        stale_after: float = 3.0,
        listen: bool = True,
        event_class: type[Event] = Event,
    ):
        self.pool = pool
        self.table = table
        start = position or Position()
        self.high_water_mark = start.seq
        # Handled before we started (the stream's seqs_above): present in the table, not re-emitted.
        self._skip = {s for s in start.seqs_above if s > start.seq}
        self.page_size = page_size
        self.interval = interval
        self.tracker = HoleTracker(stale_after=stale_after)
        self._decode = _Decode(table, event_class)
        self._has_xid = table.xid is not None
        self._query = _select(table, sql.SQL("{} > %(after)s").format(sql.Identifier(table.seq)), True)
        self._seq_oid: int | None = None
        # The last transaction handed out when it reached the end of a full page: it may go on.
        self._open_xid: int | None = None
        self._open_part = 0
        self._listener: psycopg.Connection | None = None
        if listen:
            conninfo = pool.conninfo if isinstance(pool.conninfo, str) else pool.conninfo()
            self._listener = psycopg.connect(conninfo, autocommit=True, **_connect_kwargs(pool))
            self._listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))

    @property
    def in_transaction(self) -> bool:
        """A transaction cut at a page end was handed out and may go on in the next page."""
        return self._open_xid is not None

    @property
    def position(self) -> Position:
        hwm = self.high_water_mark
        return Position(None, hwm, frozenset(s for s in self._skip if s > hwm))

    def poll(self, timeout: float) -> list[Transaction]:
        deadline = time.monotonic() + timeout
        while True:
            txs, again = self._cycle()
            if txs:
                return txs
            if again:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._wait(min(remaining, self.interval))

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        metrics.HOLE_AGE.set(0)
        metrics.HOLE_HOLDER.set(0)

    def __enter__(self) -> Poller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one cycle ------------------------------------------------------------------------------

    def _cycle(self) -> tuple[list[Transaction], bool]:
        """One page: (transactions ready, whether to read again at once)."""
        try:
            return self._read_page()
        except psycopg.errors.UndefinedColumn as err:
            raise _drifted(self.table, err) from None

    def _read_page(self) -> tuple[list[Transaction], bool]:
        tracker = self.tracker
        with self.pool.connection() as conn:
            if self._seq_oid is None:
                self._seq_oid = sequence_oid(conn, self.table)
            if tracker.waiting():
                tracker.check(live_holders(conn, tracker.watched(), self._seq_oid))  # T3
            rows = conn.execute(self._query, {"after": self.high_water_mark, "limit": self.page_size}).fetchall()  # T4
            scan = tracker.scan(self.high_water_mark, [r[0] for r in rows])
            if scan.new_gaps:
                tracker.add(scan.new_gaps, seq_lock_holders(conn, self._seq_oid), time.monotonic())
            now = time.monotonic()
            for stale in tracker.stale(now):
                log.warning(describe_stale(stale, transaction_ages(conn, [p for p in stale.pids if p])))
        age, pid = tracker.oldest(now)
        metrics.HOLE_AGE.set(age)
        metrics.HOLE_HOLDER.set(pid)
        if scan.dead:
            log.debug("passed dead seqs %s", scan.dead)

        ready = rows[:scan.ready]
        hwm = scan.high_water_mark
        full = len(rows) == self.page_size
        open_end = full and scan.ready == len(rows) and self._has_xid
        txs: list[Transaction] = []
        if self._open_xid is not None and (not ready or ready[0][0] != self.high_water_mark + 1
                                           or ready[0][7] != self._open_xid):
            # The transaction cut at the last page end did not go on: close it.
            txs.append(Transaction(self._open_xid, None, None, None, [], "poll", self._open_part, True))
            self._open_xid = None
        if full and ready and scan.ready == len(rows) and self._has_xid:
            # The page ends inside what may be one transaction: keep its trailing run for the
            # next page, unless the run is the whole page (then hand it out as a part).
            last_xid = ready[-1][7]
            cut = len(ready)
            while cut > 0 and ready[cut - 1][7] == last_xid:
                cut -= 1
            if cut > 0:
                hwm = ready[cut][0] - 1
                ready = ready[:cut]
                open_end = False
        txs.extend(self._group(ready, open_end=open_end))
        if hwm > self.high_water_mark:
            self.high_water_mark = hwm
            if self._skip:
                self._skip = {s for s in self._skip if s > hwm}
        # Read again at once: a full page, or holes proven dead or with no holder at all.
        again = (full and scan.ready > 0) or (bool(scan.new_gaps) and not tracker.waiting())
        return [t for t in txs if t.events or not t.final or t.part > 0], again

    def _group(self, rows: Sequence[_Row], *, open_end: bool) -> list[Transaction]:
        out: list[Transaction] = []
        if not rows:
            return out
        event, skip = self._decode.event, self._skip
        if not self._has_xid:
            events = [event(r) for r in rows if r[0] not in skip]
            return [Transaction(None, None, None, None, events, "poll")] if events else []
        run: list[Event] = []
        xid = rows[0][7]
        for r in rows:
            if r[7] != xid:
                out.append(self._tx(xid, run, final=True))
                run, xid = [], r[7]
            if r[0] not in skip:
                run.append(event(r))
        out.append(self._tx(xid, run, final=not open_end))
        return [t for t in out if t.events or t.part > 0]

    def _tx(self, xid: int, events: list[Event], *, final: bool) -> Transaction:
        part = self._open_part + 1 if xid == self._open_xid else 0
        if xid == self._open_xid:
            self._open_xid = None
        if not final:
            self._open_xid, self._open_part = xid, part
        return Transaction(xid, None, None, None, events, "poll", part, final)

    def _wait(self, seconds: float) -> None:
        listener = self._listener
        if listener is None:
            time.sleep(seconds)
            return
        # Any notification wakes us; drain what is queued so one burst costs one cycle.
        ready = select.select([listener.fileno()], [], [], seconds)[0]
        if ready:
            for _ in listener.notifies(timeout=0.0):
                pass


def _connect_kwargs(pool: ConnectionPool) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict((pool.kwargs() if callable(pool.kwargs) else pool.kwargs) or {})
    kwargs.pop("autocommit", None)
    return kwargs


# -- replay ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplaySummary:
    events: int
    transactions: int
    seconds: float
    rate: float


def proven_upper_bound(conn: psycopg.Connection, table: EventTable, to_seq: int | None, *,
                       interval: float = 0.05, stale_after: float = 3.0) -> int:
    """The largest seq (<= to_seq) below which every seq that will ever commit is visible now.

    The hole rule applied to all holes below max(seq) at once: read the max (one snapshot),
    then the sequence's lock holders; once all of them have ended, any later snapshot shows
    every committed seq up to that max. Waits (warning like the poller) while a holder runs.
    """
    oid = sequence_oid(conn, table)
    seq = sql.Identifier(table.seq)
    if to_seq is None:
        row = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(seq, table.ident())).fetchone()
    else:
        row = conn.execute(sql.SQL("SELECT max({}) FROM {} WHERE {} <= %s").format(seq, table.ident(), seq),
                           (to_seq,)).fetchone()
    top = int(row[0]) if row and row[0] is not None else 0
    holders = seq_lock_holders(conn, oid)
    started, warned = time.monotonic(), 0.0
    while holders:
        holders = live_holders(conn, holders, oid)
        if not holders:
            break
        now = time.monotonic()
        if now - started >= stale_after and now - warned >= 5.0:
            warned = now
            pids = sorted(p for p in holders.values() if p is not None)
            log.warning("replay waits for the transactions holding the sequence to end, pids %s "
                        "(a seq below %d may still commit)", pids or "prepared", top)
        time.sleep(interval)
    return top


class CommitBound:
    """The poll path's reading of an end LSN: the largest seq of the transactions that committed
    before the WAL reached it, found a step per poll cycle (the poll loop never blocks on it).

    Rows carry no commit LSN, so the bound is read in the order the hole rule needs: once the
    WAL is at `lsn`, every commit at or before it is written; each such transaction is then
    either visible or still holding the sequence lock (a transaction ends visible before it
    releases its locks). When the holders seen at that moment have all ended, max(seq) covers
    every one of them. Delivering up to that bound is everything committed by `lsn`, and maybe
    some committed after it.
    """

    def __init__(self, table: EventTable, lsn: Lsn):
        self.table, self.lsn = table, lsn
        self.value: int | None = None
        self._holders: dict[str, int | None] | None = None
        self._oid = 0

    def step(self, conn: psycopg.Connection) -> int | None:
        if self.value is not None:
            return self.value
        if self._holders is None:
            row = conn.execute(WAL_NOW).fetchone()
            if row is None or Lsn.parse(row[0]) < self.lsn:
                return None
            self._oid = sequence_oid(conn, self.table)
            self._holders = seq_lock_holders(conn, self._oid)
        elif self._holders:
            self._holders = live_holders(conn, self._holders, self._oid)
        if not self._holders:
            seq = sql.Identifier(self.table.seq)
            row = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(seq, self.table.ident())).fetchone()
            self.value = int(row[0]) if row and row[0] is not None else 0
        return self.value


class _Progress:
    """The replay's progress by seq: `Progress` with the fraction of the seq range done."""

    def __init__(self, first: int, last: int, enabled: bool):
        self.first, self.span = first, max(last - first, 1)
        self.progress = Progress("replay", log=log, bar=enabled)

    def update(self, events: int, seq: int) -> None:
        self.progress.update(events, min(max(seq - self.first, 0) / self.span, 1.0))

    def end(self) -> None:
        self.progress.end()


def replay(
    source: ConnectionPool | str,
    *,
    table: EventTable = DEFAULT_TABLE,
    from_seq: int = 0,
    to_seq: int | None = None,
    sink: Sink,
    progress: bool = True,
    batch: int = 10_000,
    event_class: type[Event] = Event,
) -> ReplaySummary:
    """Hand every committed event with from_seq < seq <= to_seq to `sink`, in seq order, fast.

    Ends at a proven bound (`proven_upper_bound`): nothing below it can still commit, so a
    poller started at the returned bound misses nothing. One snapshot; text COPY parsed here
    (see `_copy_text`); tables with bytea/text payloads go through a server-side cursor.
    """
    try:
        if isinstance(source, str):
            with psycopg.connect(source, autocommit=True) as conn:
                return _replay(conn, table, from_seq, to_seq, sink, progress, batch, event_class)
        with source.connection() as conn:
            return _replay(conn, table, from_seq, to_seq, sink, progress, batch, event_class)
    except psycopg.errors.UndefinedColumn as err:
        raise _drifted(table, err) from None


def _drifted(table: EventTable, err: psycopg.Error) -> UnsupportedChangeError:
    """A mapped column the table no longer has: the same stop as the stream's, one line."""
    detail = (err.diag.message_primary or str(err)).strip()
    return UnsupportedChangeError(
        f"{table.qualified}: {detail}: the table was altered (a column dropped or renamed); undo the change "
        "or map the table (--preset, --*-column)")


def _replay(conn: psycopg.Connection, table: EventTable, from_seq: int, to_seq: int | None,
            sink: Sink, progress: bool, batch: int, event_class: type[Event] = Event) -> ReplaySummary:
    started = time.monotonic()
    top = proven_upper_bound(conn, table, to_seq)
    bar = _Progress(from_seq, top, progress)
    events = transactions = 0
    write_lines = getattr(sink, "write_lines", None)
    if top > from_seq and write_lines is not None and _jsonb_payloads(table):
        events, transactions = _replay_lines(conn, table, from_seq, top, write_lines, bar, batch)
    elif top > from_seq:
        for tx in _read_range(conn, table, from_seq, top, batch, event_class):
            sink.write(tx)
            events += len(tx.events)
            transactions += 1 if tx.final else 0
            bar.update(events, tx.events[-1].seq if tx.events else from_seq)
    sink.flush()
    bar.end()
    seconds = time.monotonic() - started
    rate = events / seconds if seconds > 0 else 0.0
    sys.stderr.write(f"replayed {counted(events, 'event')} ({counted(transactions, 'transaction')}) "
                     f"in {seconds:.2f} s, {rate:,.0f} events/s\n")
    return ReplaySummary(events, transactions, seconds, rate)


def _read_range(conn: psycopg.Connection, table: EventTable, after: int, upto: int,
                batch: int, event_class: type[Event] = Event) -> Iterator[Transaction]:
    where = sql.SQL("{seq} > %(after)s AND {seq} <= %(upto)s").format(seq=sql.Identifier(table.seq))
    query = _select(table, where, False)
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn.transaction():
            if _jsonb_payloads(table):
                yield from _copy_text(conn, table, query, {"after": after, "upto": upto}, batch, event_class)
            else:
                yield from _rows_to_transactions(conn, table, query, {"after": after, "upto": upto},
                                                 frozenset(), batch, event_class)
    finally:
        conn.autocommit = autocommit


def _jsonb_payloads(table: EventTable) -> bool:
    return all(table.payload_encoding.get(c, "jsonb") == "jsonb" for c in (table.data, table.metadata) if c)


# COPY text escapes on output: backslash, and the control characters below.
_UNESCAPE = {b"\\\\": b"\\", b"\\b": b"\b", b"\\f": b"\f", b"\\n": b"\n", b"\\r": b"\r",
             b"\\t": b"\t", b"\\v": b"\v"}
_ESCAPED = re.compile(rb"\\[\\bfnrtv]")
# What makes a COPY text field more than its JSON string's contents: a COPY escape (\\), a
# quote, or a control character (COPY writes \x01 and the like raw).
_JSON_SPECIAL = re.compile(rb'[\x00-\x1f"\\]').search

def _unescape(field: bytes) -> bytes:
    return _ESCAPED.sub(lambda m: _UNESCAPE[m.group()], field) if b"\\" in field else field


def _copy_out(conn: psycopg.Connection, copy_sql: sql.Composed, params: dict[str, Any]) -> Generator[bytes, None, None]:
    """The rows of `COPY ... TO STDOUT` (text format, each ending in a newline), in blocks of
    what libpq has buffered.

    Read from libpq directly: psycopg's Copy iterator costs a generator round and a wait per row
    (libpq returns one row a call), ~1.8 µs, more than everything else the replay does per row
    and enough to make Python the bottleneck against the server's COPY. Here a row costs one
    PQgetCopyData call; when nothing is buffered, we wait for the socket and read more."""
    text = psycopg.ClientCursor(conn).mogrify(copy_sql, params)
    pgconn = conn.pgconn
    pgconn.send_query(text.encode(conn.info.encoding))
    result = _next_result(pgconn)
    if result is None or result.status != pq.ExecStatus.COPY_OUT:
        _finish(conn, result)
    get, fd = pgconn.get_copy_data, pgconn.socket
    try:
        while True:
            chunks: list[Any] = []
            while True:
                n, data = get(1)
                if n <= 0:
                    break
                chunks.append(data)
            if chunks:
                yield b"".join(chunks)
            if n == -1:
                break
            if n == 0:
                select.select([fd], [], [])
                pgconn.consume_input()
            else:
                raise psycopg.OperationalError(pgconn.get_error_message() or "COPY failed")
    except BaseException:
        # A reader that stops early (a closed pipe, an error in the sink, close()): end the COPY
        # at once, read up to its end and drain its results, so the connection can roll back.
        if pgconn.transaction_status == pq.TransactionStatus.ACTIVE:
            cancel = pgconn.cancel_conn()
            cancel.blocking()
            cancel.finish()
            while get(0)[0] >= 0:
                pass
            while pgconn.get_result() is not None:
                pass
        raise
    _finish(conn, _next_result(pgconn))


def _next_result(pgconn: Any) -> Any:
    """libpq's next result, waiting on the socket instead of blocking in C (so Ctrl-C works)."""
    while pgconn.is_busy():
        select.select([pgconn.socket], [], [])
        pgconn.consume_input()
    return pgconn.get_result()


def _finish(conn: psycopg.Connection, result: Any) -> None:
    """The COPY's final result: raise its error, and drain the results after it."""
    pgconn = conn.pgconn
    error: psycopg.Error | None = None
    if result is None:
        error = psycopg.OperationalError(pgconn.get_error_message() or "the server sent no result for COPY")
    elif result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.COPY_OUT):
        error = psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
    while _next_result(pgconn) is not None:
        pass
    if error is not None:
        raise error


def _copy_text(conn: psycopg.Connection, table: EventTable, query: sql.Composed,
               params: dict[str, Any], batch: int, event_class: type[Event] = Event) -> Iterator[Transaction]:
    """The replay hot path: `COPY (SELECT ...) TO STDOUT` in text, parsed here.

    Measured on 1M rows (2 cores): ~1.8x a binary server-side cursor and ~1.7x binary COPY
    through psycopg's row loaders. What costs is Python per row, so: one split per line, the
    jsonb text kept as it is (never parsed), a timestamp parsed once per distinct value (a
    transaction's rows share now()).
    """
    conn.execute("SET LOCAL DateStyle = ISO")
    copy_sql = sql.SQL("COPY ({}) TO STDOUT").format(query)
    with closing(_copy_out(conn, copy_sql, params)) as batches:
        yield from _copy_events(batches, table, batch, event_class)


def _copy_events(batches: Iterator[bytes], table: EventTable, batch: int,
                 event_class: type[Event]) -> Iterator[Transaction]:
    fromiso, new, flat = datetime.fromisoformat, event_class, one_line
    null = b"\\N"
    has_xid = table.xid is not None
    last_ts: bytes | None = None
    last_dt: datetime | None = None
    run: list[Event] = []
    xid_text: bytes | None = None
    part = 0
    for block in batches:
        rows = block.split(b"\n")
        rows.pop()
        for row in rows:
            f = row.split(b"\t")
            if f[7] != xid_text:
                if run or part:
                    yield Transaction(_xid(xid_text), None, None, None, run, "poll", part, True)
                run, xid_text, part = [], f[7], 0
            elif len(run) >= batch:
                yield Transaction(_xid(xid_text), None, None, None, run, "poll", part, not has_xid)
                run, part = [], (part + 1 if has_xid else 0)
            ts = f[6]
            if ts != last_ts:
                last_ts, last_dt = ts, (None if ts == null else fromiso(ts.decode()))
            e = new(
                int(f[0]),
                _unescape(f[1]).decode(),
                None if f[2] == null else int(f[2]),
                None if f[3] == null else _unescape(f[3]).decode(),
                None if f[4] == null else flat(_unescape(f[4]).decode()),
                None if f[5] == null else flat(_unescape(f[5]).decode()),
                last_dt,
            )
            run.append(e)
    if run or part:
        yield Transaction(_xid(xid_text), None, None, None, run, "poll", part, True)


def _replay_lines(conn: psycopg.Connection, table: EventTable, after: int, upto: int,
                  write_lines: Any, bar: _Progress, batch: int) -> tuple[int, int]:
    """The replay fast path for sinks that take JSON lines: no Event and no dict per row.

    Each line is byte for byte what `sinks.StreamSink.write` prints for the event (a test holds
    both paths to that). The server sends plain text COPY of the columns, as cheap for it as
    `COPY (SELECT * ...)`; the record is built here: the payloads are PostgreSQL's text spliced
    in as it is (COPY's escapes undone where there is a backslash), a block of rows at a time
    (see `_Lines`). Measured on 300k rows (2 cores): formatting the head server-side (to_json,
    ||) held the server to 0.6x of a plain COPY, and the server was the bottleneck. Returns
    (events, transactions).
    """
    seq_col = sql.Identifier(table.seq)

    def column(name: str | None, form: str = "{}") -> sql.Composable:
        return sql.SQL(form).format(sql.Identifier(name)) if name else sql.SQL("NULL")

    query = sql.SQL(
        "COPY (SELECT {s}, {sid}, {version}, {type}, {data}, {metadata}, {created_at}, {xid} FROM {table} "
        "WHERE {s} > %(after)s AND {s} <= %(upto)s ORDER BY {s}) TO STDOUT"
    ).format(sid=column(table.stream_id), version=column(table.version), type=column(table.type),
             data=column(table.data), metadata=column(table.metadata),  # text COPY: jsonb's own text
             created_at=column(table.created_at), xid=column(table.xid),
             table=table.ident(), s=seq_col)
    lines = _Lines()
    events = 0
    out: list[bytes] = []
    size = 0
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SET LOCAL DateStyle = ISO")
            with closing(_copy_out(conn, query, {"after": after, "upto": upto})) as blocks:
                for block in blocks:
                    parts, n, last = lines.block(block)
                    out += parts
                    events += n
                    size += n
                    if size >= 256:  # whole lines, in writes of some 64 KiB: one join, one write
                        write_lines(b"".join(out))
                        out, size = [], 0
                        bar.update(events, int(last))
                if out:
                    write_lines(b"".join(out))
    finally:
        conn.autocommit = autocommit
    transactions = lines.transactions
    if table.xid is None:
        transactions = -(-events // batch)  # the object path's parts, each final without an xid
    return events, transactions


# The constant text before each of a line's eight COPY fields in turn; the fields go between.
_SLOTS: list[bytes] = [x for sep in (
    b',"commit_lsn":null,"source":"poll"}\n{"seq":', b',"stream_id":"', b'","version":', b',"type":',
    b',"data":', b',"metadata":', b',"created_at":', b',"xid":') for x in (sep, b"")]
_ROW_END = b',"commit_lsn":null,"source":"poll"}\n'
_NULL = b"\\N"
_ESCAPED_IN_JSON = bytes(range(32)) + b'"\\'


class _Memo(dict[bytes, bytes]):
    """A field's JSON text by its COPY text, made once per distinct value: a transaction's rows
    share created_at and xid, and stream types repeat."""

    def __init__(self, make: Callable[[bytes], bytes]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key: bytes) -> bytes:
        value = self[key] = self.make(key)
        return value


def _quote(field: bytes) -> bytes:
    """A text field as the JSON string orjson writes for it: as it is between quotes unless it
    holds what JSON escapes (orjson escapes only quotes, backslashes and controls)."""
    if _JSON_SPECIAL(field) is None:
        return b'"%b"' % field
    return b"null" if field == _NULL else orjson.dumps(_unescape(field).decode())


def _payload(field: bytes) -> bytes:
    if b"\\" not in field:
        return field
    if field == _NULL:
        return b"null"
    field = _unescape(field)  # a json column's raw line breaks come back here: make them spaces
    return field.replace(b"\r", b" ").replace(b"\n", b" ") if b"\n" in field or b"\r" in field else field


def _stamp(ts: bytes) -> bytes:
    """created_at's COPY text (DateStyle ISO) as the JSON string of `datetime.isoformat()`: for
    the usual form, `2026-12-04 18:22:24.123456+00`, without making a datetime."""
    n = len(ts)
    if 24 <= n <= 29 and ts[10] == 32 and ts[19] == 46 and ts[n - 3] in b"+-":  # a fraction, an offset in hours
        return b'"%bT%b%b%b:00"' % (ts[:10], ts[11:n - 3], b"00000"[:29 - n], ts[n - 3:])
    return b"null" if ts == _NULL else b'"%b"' % datetime.fromisoformat(ts.decode()).isoformat().encode()


def _xid_text(xid: bytes) -> bytes:
    return b"null" if xid == _NULL else b"%d" % _xid32(int(xid))


class _Lines:
    """COPY text rows of `_replay_lines`' select list → the JSON lines `StreamSink` prints.

    Python per row is what made the replay slower than the server's COPY, so a block without a
    backslash (no NULL, no COPY escape: every field is what it reads) is split into its fields
    once and joined with the constant text between them, with list slices, map and join: C
    loops, no Python bytecode per row. A block with a backslash, or whose stream ids or types
    hold what JSON escapes, goes row by row. Either way the bytes are the same (a test holds
    both, and the Event path, to that).
    """

    def __init__(self) -> None:
        self.transactions = 0
        self.last_xid: bytes | None = None
        self.stamps, self.xids, self.types = _Memo(_stamp), _Memo(_xid_text), _Memo(_quote)

    def block(self, block: bytes) -> tuple[list[bytes], int, bytes]:
        """(the lines' parts, to be joined; how many lines; the last seq's text) for a block of
        whole rows."""
        if len(self.stamps) > 10_000:
            self.stamps.clear()
            self.xids.clear()
        if len(self.types) > 10_000:
            self.types.clear()
        if b"\\" not in block:
            f = block.replace(b"\n", b"\t").split(b"\t")
            f.pop()  # after the last newline
            n = len(f) >> 3
            sids = b"".join(f[1::8])
            if n and len(f) == n << 3 and len(sids.translate(None, _ESCAPED_IN_JSON)) == len(sids):
                last = f[-8]
                f[3::8] = self._same(f[3::8], self.types, n)
                xids = f[7::8]
                if xids.count(xids[0]) == n:  # one transaction's rows
                    self.transactions += xids[0] != self.last_xid
                else:
                    self.transactions += sum(map(ne, xids, [self.last_xid, *xids[:-1]]))
                self.last_xid = xids[-1]
                f[6::8] = self._same(f[6::8], self.stamps, n)
                if max(map(len, xids)) > 9:  # else below 2**32: as the stream names it already
                    f[7::8] = self._same(xids, self.xids, n)
                parts = _SLOTS * n
                parts[1::2] = f
                parts[0] = b'{"seq":'
                parts.append(_ROW_END)
                return parts, n, last
        rows = block.split(b"\n")
        rows.pop()
        return list(map(self._row, rows)), len(rows), rows[-1][:rows[-1].index(b"\t")]

    @staticmethod
    def _same(fields: list[bytes], memo: _Memo, n: int) -> list[bytes]:
        """The fields' JSON text: one lookup when they are all one value (a transaction's
        created_at and xid, a type written in bulk), else one each."""
        first = fields[0]
        if fields.count(first) == n:
            return [memo[first]] * n
        # Runs (transactions of several rows) are worth a memo; distinct values are not.
        return list(map(memo.__getitem__ if first == fields[1] else memo.make, fields))

    def _row(self, row: bytes) -> bytes:
        seq, sid, version, etype, data, metadata, ts, xid = row.split(b"\t")
        if xid != self.last_xid:
            self.transactions += 1
            self.last_xid = xid
        return (b'{"seq":%b,"stream_id":%b,"version":%b,"type":%b,"data":%b,"metadata":%b,"created_at":%b,"xid":%b'
                b'%b' % (seq, _quote(sid), b"null" if version == _NULL else version, self.types[etype],
                         _payload(data), _payload(metadata), self.stamps[ts], self.xids[xid], _ROW_END))


def _xid32(xid: int) -> int:
    # As the select list's mod(xid::text::numeric, 2^32): the sign of the dividend.
    return xid % 4294967296 if xid >= 0 else -(-xid % 4294967296)


def _xid(text: bytes | None) -> int | None:
    return None if text is None or text == b"\\N" else int(text)


def _rows_to_transactions(conn: psycopg.Connection, table: EventTable, query: sql.Composed,
                          params: dict[str, Any], skip: frozenset[int], batch: int,
                          event_class: type[Event] = Event) -> Iterator[Transaction]:
    """Stream `query`'s rows through a server-side cursor as poll Transactions: consecutive
    rows of one xid are one transaction, handed out in parts of at most `batch` events."""
    event = _Decode(table, event_class).event
    has_xid = table.xid is not None
    with conn.cursor(name="cdc_read", binary=True) as cur:
        cur.itersize = batch
        cur.execute(query, params)
        run: list[Event] = []
        xid: int | None = None
        part = 0
        while True:
            rows = cur.fetchmany(batch)
            if not rows:
                break
            if not has_xid:
                events = [event(r) for r in rows if r[0] not in skip]
                if events:
                    yield Transaction(None, None, None, None, events, "poll")
                continue
            for r in rows:
                if r[7] != xid:
                    if run or part:
                        yield Transaction(xid, None, None, None, run, "poll", part, True)
                    run, xid, part = [], r[7], 0
                if not skip or r[0] not in skip:
                    run.append(event(r))
            if len(run) >= batch:
                yield Transaction(xid, None, None, None, run, "poll", part, False)
                run, part = [], part + 1
        if run or part:
            yield Transaction(xid, None, None, None, run, "poll", part, True)


def read_snapshot(
    dsn: str,
    snapshot: str,
    *,
    table: EventTable = DEFAULT_TABLE,
    after: Position,
    batch: int = 10_000,
    event_class: type[Event] = Event,
    on_total: Callable[[int], None] | None = None,
) -> Iterator[Transaction]:
    """Every row with seq > after.seq, not in after.seqs_above, as of an exported snapshot.
    `on_total` hears, before the first row, how many events that is (a count under the snapshot).

    For the poll → stream hand-off: the slot's exported snapshot is the exact boundary, so no
    gap checks are needed. REPEATABLE READ with SET TRANSACTION SNAPSHOT as its first statement;
    the exporting connection must keep the snapshot valid until the first batch has arrived.
    """
    where = sql.SQL("{seq} > %(after)s").format(seq=sql.Identifier(table.seq))
    query = _select(table, where, False)
    with psycopg.connect(dsn) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            try:
                if on_total is not None:
                    row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE ").format(table.ident()) + where,
                                       {"after": after.seq}).fetchone()
                    on_total(max(int(row[0]) - len(after.seqs_above), 0) if row else 0)
                yield from _rows_to_transactions(conn, table, query, {"after": after.seq},
                                                 frozenset(after.seqs_above), batch, event_class)
            except psycopg.errors.UndefinedColumn as err:
                raise _drifted(table, err) from None
