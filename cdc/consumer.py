"""The run loop: source (stream | poll) → decode → hand over → acknowledge.

Delivery contract, whichever path serves:
- transactions reach the caller whole (or in parts that end with the commit, for huge ones),
  in commit order on the stream and in seq order on the poller;
- a position is acknowledged (checkpoint saved, then the slot told) only after the caller has
  handled the transaction and the sink has made it durable: kill -9 loses nothing, and replays
  whole transactions at most since the last checkpoint (at-least-once);
- on restart, transactions at or below the checkpoint are skipped: a clean stop re-emits nothing.

The hand-off between the paths (a new consumer, a rebuild, a dropped or invalidated slot):
the slot is created with an exported snapshot. That snapshot sees exactly the transactions that
committed before the slot's first position, and the slot streams exactly those that commit
after it. So we replay, under the snapshot, every event the consumer's seq position does not
already cover (the poll path), then stream from the slot's first position: nothing is missed
and nothing is handed over twice, with writers appending all the while.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from array import array
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal

import psycopg
from psycopg_pool import ConnectionPool

from . import metrics
from .checkpoint import LEGACY_SLOT, Checkpoints, Position, Projection, default_slot, mapping_json
from .connection import describe, mask, open_pool, resolve_dsn
from .decoders import DEFAULT_CHUNK_EVENTS, Plugin, new_decoder, publication_name, resolve_plugin, start_options
from .errors import (
    CdcError,
    ConfigError,
    ConnectError,
    ConnectionLostError,
    DecodeError,
    PluginMissingError,
    PluginNotAllowedError,
    ReplicationPrivilegeError,
    SinkError,
    SlotInUseError,
    SlotLostError,
    UnsupportedChangeError,
    WalLevelError,
)
from .events import DecimalEvent, Event, Lsn, Transaction
from .progress import Progress, counted, size_text
from .replication import ReplicationStream
from .store import DEFAULT_TABLE, EventTable, require_table

if TYPE_CHECKING:
    from .holes import SeqWatermark
    from .polling import Poller

log = logging.getLogger("cdc.consumer")

Mode = Literal["stream", "poll", "auto"]

# Reasons logical decoding cannot serve, for which auto mode polls instead.
UNAVAILABLE = (WalLevelError, PluginMissingError, PluginNotAllowedError, ReplicationPrivilegeError)


# How far behind the run's start an endpos may be and still be a hand-off's (see
# _refuse_endpos_before): one WAL segment of the default size.
ENDPOS_SLACK = 16 * 1024 * 1024

# Seconds to wait for a slot held by another walsender before saying it is in use.
SLOT_RELEASE_GRACE = 5.0
# A stream that starts this far (bytes of WAL) behind the WAL's position at the run's start is
# catching up: /readyz says so until it is past that position. Less is a moment's reading.
CATCH_UP_BYTES = 4 * 1024 * 1024

# Handled transactions are kept for one pass of bookkeeping, up to this many events: beyond,
# the pass runs early, so memory does not grow with throughput. The stream path settles after
# every batch anyway (see `_READ_BATCH`).
_SETTLE_EVENTS = 20_000
_RECORD_EVERY = 0.1

# XLogData messages read and decoded a batch. Each batch's transactions are handed over and
# settled before the next read, so what a batch allocates is freed while it is still in the CPU
# cache: 2,000 messages (about 1 MB) ran 10 % faster here than 5,000 settled once a second.
_READ_BATCH = 2_000
_NO_END = Lsn(2**64 - 1)


def tune_gc(gen0: int = 50_000) -> None:
    """Collect cyclic garbage less often. A decoded transaction is a few dozen small objects that
    die young; with the default threshold (a gen-0 collection every 700 allocations) the
    collector took 30-40 % of the stream's hot path here (measured: 48k → 74k events/s).
    `cdc run`, `cdc replay` and the benchmarks call this; call it in your own consumer process
    when throughput matters. Process-wide, so the library never does it behind your back."""
    gc.freeze()  # what exists now (modules, the pool) is never scanned again
    threshold0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, threshold0), gen1, gen2)


class Consumer:
    """Iterate over committed transactions; acknowledge them as you handle them.

    >>> with Consumer("dbname=app", consumer="projector") as feed:
    ...     for tx in feed:
    ...         apply(tx)            # auto_ack: acknowledged when you ask for the next one

    With ``auto_ack=False`` call `ack(tx)` once `tx` is durably handled; unacknowledged
    transactions come again after a restart. `stop()` (from a signal handler or another
    thread) ends the iteration after the current transaction, acknowledging what was handled.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        consumer: str = "default",
        slot: str | None = None,
        mode: Mode = "stream",
        table: EventTable = DEFAULT_TABLE,
        auto_ack: bool = True,
        endpos: Lsn | Literal["now"] | None = None,
        chunk_events: int = DEFAULT_CHUNK_EVENTS,
        status_interval: float = 10.0,
        checkpoint_interval: float = 1.0,
        poll_interval: float = 0.1,
        stale_after: float = 3.0,
        reconnect: bool = True,
        backoff_max: float = 30.0,
        on_checkpoint: Callable[[], None] | None = None,
        record_deliveries: bool = False,
        pool: ConnectionPool | None = None,
        numbers: Literal["float", "decimal"] = "float",
        plugin: Plugin | None = None,
        publication: str | None = None,
        failover_slot: bool = False,
    ):
        self.dsn = resolve_dsn(dsn)
        # The logical decoding plugin the slot is made with and read with (see cdc.decoders);
        # pgoutput reads the publication, made by `cdc setup` (or here, by the table's owner).
        self.plugin: Plugin = resolve_plugin(plugin)
        self.publication = publication or publication_name(table)
        # PostgreSQL 17+: the slot is made with failover, for sync_replication_slots on a standby.
        self.failover_slot = failover_slot
        if numbers not in ("float", "decimal"):
            raise ConfigError(f"numbers={numbers!r}: use 'float' or 'decimal'")
        # How Event.data reads non-integer numbers (integers are exact either way).
        self.event_class: type[Event] = DecimalEvent if numbers == "decimal" else Event
        self.consumer = consumer
        self.slot = slot or default_slot(consumer)
        self.mode: Mode = mode
        self.table = table
        self.auto_ack = auto_ack
        # "now" is the WAL position when the run starts, read by the run itself: a position the
        # caller read earlier may already be behind it by the time a new consumer's hand-off begins.
        self._endpos_now = endpos == "now"
        self.endpos: Lsn | None = None if endpos == "now" else endpos
        self._run_start: Lsn | None = None
        self.chunk_events = chunk_events
        self.status_interval = status_interval
        self.checkpoint_interval = checkpoint_interval
        self.poll_interval = poll_interval
        self.stale_after = stale_after
        self.reconnect = reconnect
        self.backoff_max = backoff_max
        self.on_checkpoint = on_checkpoint
        self._own_pool = pool is None
        # A short wait for a connection: while the run loop waits it cannot answer the
        # walsender, and a server shutting down refuses new connections until it is down.
        self.pool = pool if pool is not None else open_pool(self.dsn, name=f"cdc-{consumer}", timeout=5.0)
        self.checkpoints = Checkpoints(self.pool, consumer)
        self.checkpoints.mapping = mapping_json(table)
        self.checkpoints.recording = record_deliveries
        self.deliveries = None
        if record_deliveries:
            from .deliveries import DeliveryLog

            self.deliveries = DeliveryLog(self.pool, consumer)
        self._sink_records = False  # a Projection records the deliveries in its own transactions
        self._stop = False
        self._feed: Generator[Transaction, None, None] | None = None  # the iteration under way
        self._backlog_top = 0  # the highest seq of a poll catch-up's backlog
        # A stream behind after downtime: (its start, the WAL at the run's start, its Progress).
        self._catch_up: tuple[Lsn, Lsn, Progress] | None = None
        self._stream: ReplicationStream | None = None
        self._position = Position()
        self._watermark: SeqWatermark | None = None
        self._open_seqs = array("q")  # seqs of a transaction whose final part is not handled yet
        # Set when the sink holds a huge transaction's parts in one database transaction until its
        # final part (Projection, ParallelProjection: the runner and ParallelProjection set it):
        # then its earlier parts are durable only with that part. Other sinks make each part
        # durable at the checkpoint's flush, and a run stopped inside a transaction goes on after
        # what it delivered.
        self.whole_transactions = False
        self._poller: Poller | None = None
        self._acked_lsn: Lsn | None = None
        self._pending: list[Transaction] = []  # handed over, not yet acknowledged
        self._handled_txs: list[Transaction] = []  # acknowledged, not yet settled in a checkpoint
        self._last_commit_time: datetime | None = None
        self._unsettled = 0  # events in _handled_txs
        self._settled_at = 0.0
        self._dirty = False  # handed-over transactions acknowledged since the last save
        # Only empty transactions acknowledged since (other tables, heartbeats, our own
        # checkpoint writes): saved at the status interval, or saving would feed itself.
        self._moved = False
        self._last_checkpoint = time.monotonic()
        self.path: str | None = None
        self.delivered_events = 0
        self.delivered_transactions = 0
        with self.pool.connection() as conn:
            require_table(conn, table)

    # -- public API ---------------------------------------------------------------------------

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # Leaving on an exception means the transaction in hand was not handled: keep it pending.
        self.close(ack_pending=exc_type is None)

    def __iter__(self) -> Iterator[Transaction]:
        feed = self._feed = self._run()
        return feed

    def ack(self, tx: Transaction) -> None:
        """Mark `tx` (and, on the stream, everything before it) as durably handled."""
        if tx in self._pending:
            idx = self._pending.index(tx)
            pending = self._pending
            while idx + 1 < len(pending) and not pending[idx + 1].events and pending[idx + 1].final:
                idx += 1  # nothing for the caller to handle (the end of a hand-off): done with it
            done = self._pending[: idx + 1]
            del self._pending[: idx + 1]  # in place: the stream loop holds this list
            for t in done:
                self._handled(t)

    def record_deliveries_in(self, projection: Projection) -> None:
        """With `record_deliveries`, let `projection` write the delivery record in the
        transactions that commit its effects and its checkpoint. Otherwise the record is written
        at the consumer's next checkpoint, and a crash in between (kill -9, a failover) leaves
        effects that `cdc reconcile` would call missing."""
        if self.deliveries is not None:
            projection.deliveries = self.deliveries
            self._sink_records = True

    def stop(self) -> None:
        """Ask the iteration to end after the current transaction. Safe from signal handlers."""
        self._stop = True

    @property
    def stopping(self) -> bool:
        return self._stop

    def release_stream(self) -> None:
        """Close the replication connection now; the feed reconnects at its next read and
        resumes after what was acknowledged. For a handler whose own database went away: a
        server shutting down waits for its walsenders' clients to confirm everything sent, and
        one whose handler is stuck in retries would hold the shutdown until wal_sender_timeout.
        Safe from another thread (the stream's I/O is locked)."""
        rs = self._stream
        if rs is not None and rs.streaming:  # not mid hand-off: its snapshot's replay goes on
            rs.close()

    def rewind(self) -> None:
        """Forget what was handed over since the last saved checkpoint, acknowledged or not,
        and drop the stream: the next iteration starts again from the saved position. For a
        projection whose connection broke: its row in cdc.checkpoints, written with its own
        effects, is the truth about whether the interrupted commit landed, and a huge
        transaction whose earlier parts went with the connection comes again from its first
        part. Close the old iterator first."""
        self._pending.clear()
        self._handled_txs.clear()
        self._dirty = self._moved = False
        self._drop_stream()
        self._drop_poller()

    def run(self, handler: Callable[[Transaction], object]) -> None:
        """The callback style: call `handler(tx)` for each transaction until `stop()`."""
        for tx in self:
            handler(tx)

    def close(self, *, ack_pending: bool = True) -> None:
        """Save the position of what was acknowledged, end the stream politely, release all.

        With auto_ack, a transaction still in the caller's hands counts as handled unless
        `ack_pending` is False (pass False when its handling failed)."""
        try:
            if self.auto_ack and ack_pending:
                self._ack_pending()
            self._checkpoint(final=True)
        except (psycopg.Error, ConnectError) as err:
            log.warning("could not save the final checkpoint: %s", mask(str(err)))
        except SinkError as err:  # the sink could not make it durable: the position stays where it was
            log.info("final checkpoint not saved: %s", err)
        finally:
            feed, self._feed = self._feed, None
            if feed is not None:
                # Ended now, while its connections are open: an unfinished hand-off drops its
                # slot (left to the garbage collector, it would find the pool closed).
                try:
                    feed.close()
                except ValueError:  # close() called from inside the iteration: it ends on its own
                    pass
            if self._stream is not None:
                self._stream.close()
                self._stream = None
            self._drop_poller()
            if self._own_pool:
                self.pool.close()

    # -- the loop -----------------------------------------------------------------------------

    def _run(self) -> Generator[Transaction, None, None]:
        attempt = 0
        poll_only = self.mode == "poll"
        loaded = False
        while not self._stop:
            try:
                if not loaded:
                    # Inside the retries: after a rewind the database may be going down again.
                    self._load_position()
                    if self.deliveries is not None:
                        self.deliveries.start_run()
                    loaded = True
                if poll_only:
                    yield from self._poll()
                else:
                    yield from self._streaming()
                return
            except UNAVAILABLE as err:
                if self.mode != "auto":
                    raise
                log.warning("logical decoding unavailable, polling instead: %s", err)
                poll_only = True
            except SlotLostError as err:
                if self.mode == "stream" and not self.reconnect:
                    raise
                # The slot is gone: the next cycle recreates it and replays, under its snapshot,
                # what the position does not cover (the poll path), then streams again.
                log.error("%s; replaying from the checkpoint via the poller, then recreating the slot", err)
                metrics.ERRORS.labels("slot_lost").inc()
                self._drop_stream()
            except (ConnectionLostError, ConnectError, psycopg.OperationalError) as err:
                if not self.reconnect or self._stop:
                    raise
                self._drop_stream()
                attempt += 1
                delay = min(self.backoff_max, 0.5 * 2 ** min(attempt - 1, 10))
                metrics.RECONNECTS.inc()
                metrics.STATUS.connected = False
                log.warning("%s; reconnecting in %.1f s (attempt %d)", err, delay, attempt)
                self._sleep(delay)
                continue
            attempt = 0

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop and time.monotonic() < deadline:
            time.sleep(min(0.1, deadline - time.monotonic()))

    def mark_start(self, lsn: Lsn) -> None:
        """Where the WAL was when the run began: what `endpos="now"` means, and the point before
        which a hand-off refuses an endpos. A caller that writes before iterating (a sink set-up,
        a prune) gives the position it read before those writes; else the run reads it itself."""
        self._run_start = lsn
        if self._endpos_now:
            self.endpos = lsn
            log.info("--endpos now: stopping at %s, the WAL position at the start of the run", lsn)

    def _load_position(self) -> None:
        from .polling import WAL_NOW

        self._position = self.checkpoints.load() or Position()
        if self._run_start is None:
            with self.pool.connection() as conn:
                row = conn.execute(WAL_NOW).fetchone()
            self.mark_start(Lsn.parse(row[0]) if row and row[0] else Lsn(0))
        self._use_position(self._position)

    def _use_position(self, position: Position) -> None:
        from .holes import SeqWatermark

        self._position = position
        self._acked_lsn = position.lsn
        self._watermark = SeqWatermark(table=self.table, position=position, stale_after=self.stale_after)
        self._open_seqs = array("q")

    def _reload_position(self) -> None:
        saved = self.checkpoints.load() or Position()
        if saved.lsn != self._position.lsn or saved.seq != self._position.seq:
            log.info("consumer %s: checkpoint moved from %s / seq %d to %s / seq %d since it was loaded; "
                     "starting from the newer one", self.consumer, self._position.lsn, self._position.seq,
                     saved.lsn, saved.seq)
        self._use_position(saved)

    def _claim_slot(self) -> None:
        """One slot, one consumer: a slot another consumer's checkpoint records is refused
        (ConfigError), and a consumer that moved to another slot hears about the one it left,
        which holds WAL until someone drops it."""
        last = self.checkpoints.claim(self.slot)
        left = last
        if last is None and self._position.lsn is not None and self.slot != LEGACY_SLOT:
            # It streamed before slots were recorded, when every consumer read `cdc` by default.
            with self.pool.connection() as conn:
                if conn.execute("SELECT FROM pg_replication_slots WHERE slot_name = %s AND database = "
                                "current_database()", (LEGACY_SLOT,)).fetchone() is not None:
                    left = LEGACY_SLOT
        if left is not None and left != self.slot:
            log.warning("consumer %s read slot %s before and reads %s now (a new slot hands over from the "
                        "checkpoint: nothing missed or repeated); give --slot %s to keep the old one, or drop "
                        "it once nothing reads it: SELECT pg_drop_replication_slot('%s')",
                        self.consumer, left, self.slot, left, left)

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _drop_poller(self) -> None:
        if self._poller is not None:
            self._poller.close()
            self._poller = None

    # -- stream ---------------------------------------------------------------------------------

    def _streaming(self) -> Generator[Transaction, None, None]:
        rs = ReplicationStream(self.dsn, self.slot, plugin=self.plugin, failover=self.failover_slot)
        self._stream = rs
        rs.open()
        metrics.STATUS.connected = True
        self._claim_slot()
        info = rs.slot_info()
        if info is not None and info.plugin != self.plugin:
            raise ConfigError(
                f"slot {self.slot!r} was made by the {info.plugin} plugin and this run reads with {self.plugin}: a slot "
                f"is only ever read by the plugin that made it; run with --plugin {info.plugin}, or give another "
                f"--slot (or drop this one, SELECT pg_drop_replication_slot('{self.slot}'), and the next run hands "
                "over by seq)")
        if self.plugin == "pgoutput":
            self._require_publication()
        held = info is not None and info.active_pid is not None
        if held:
            # A consumer restarted right after a kill -9 finds its old walsender still holding the
            # slot for a moment (until the server notices the dead socket): give it a few seconds.
            assert info is not None and info.active_pid is not None
            holder = rs.holder(info.active_pid)
            log.info("slot %s is held by %s: waiting up to %.0f s for it to be released",
                     self.slot, holder, SLOT_RELEASE_GRACE)
            deadline = time.monotonic() + SLOT_RELEASE_GRACE
            while info is not None and info.active_pid is not None and time.monotonic() < deadline and not self._stop:
                time.sleep(0.25)
                info = rs.slot_info()
            if info is not None and info.active_pid is not None:
                raise SlotInUseError(
                    f"slot {self.slot!r} is in use by another process ({holder}): stop it, "
                    "or run this one as a standby (--standby) or with another --slot", holder
                )
        # The checkpoint as it is now that nobody holds the slot: one loaded before (at start, or
        # while the slot's last holder was still acknowledging) is behind the slot, and starting
        # from it would deliver what that holder had already acknowledged again. A holder saves
        # its checkpoint before it acknowledges the slot, so this one covers the slot's position.
        # Another process can only have moved it before this one handed anything over, or while
        # this one waited for the slot; in the second case this one's own progress is saved
        # first (saves merge: the newer position wins), then the merged one is read.
        fresh = not (self.delivered_events or self._pending or self._handled_txs)
        if held and not fresh:
            self._checkpoint(final=True)
        if fresh or held:
            self._reload_position()
        saved = self._acked_lsn
        reason = None
        if info is None:
            reason = "slot does not exist"
        elif info.wal_status == "lost":
            reason = "slot was invalidated (wal_status lost)"
        elif saved is None:
            reason = "consumer has no stream position yet"
        elif info.confirmed_flush is not None and info.confirmed_flush > saved:
            reason = f"slot was advanced to {info.confirmed_flush}, past the consumer's checkpoint {saved}"
        if reason is not None:
            start = yield from self._handoff(rs, reason, drop=info is not None)
            if start is None:
                return
        else:
            assert saved is not None
            start = saved
        rs.start(start, start_options(self.plugin, self.table, self.publication))
        metrics.STATUS.set_path("stream")
        metrics.STATUS.slot_valid = True
        self.path = "stream"
        log.info("streaming from slot %s at %s on %s as consumer %s", self.slot, start,
                 describe(self.dsn), self.consumer)
        self._catch_up = None
        if self._run_start is not None and int(self._run_start) - int(start) > CATCH_UP_BYTES:
            # Behind after downtime: the WAL written since is a backlog until the stream is past it.
            gap = int(self._run_start) - int(start)
            log.info("stream catch-up: %s of WAL to read up to %s, where the WAL was when the run started",
                     size_text(gap), self._run_start)
            self._catch_up = (start, self._run_start, Progress("stream catch-up", log=log, bar=True, backlog=True))
            metrics.STATUS.backlog_bytes = gap
        try:
            yield from self._stream_loop(rs)
        finally:
            self._end_catch_up()

    def _require_publication(self) -> None:
        """pgoutput sends the changes of a publication's tables: ours must be in it before a slot
        is made or read. Missing, it is made here when this role may (it owns the table);
        otherwise one line says which statement to run."""
        from .store import ensure_publication

        with self.pool.connection() as conn:
            ensure_publication(conn, self.table, self.publication)

    def _catch_up_step(self) -> None:
        """Once a loop: how far the stream is through the catch-up (by acknowledged position)."""
        assert self._catch_up is not None
        start, target, progress = self._catch_up
        at = self._acked_lsn or start
        if at >= target:
            log.info("stream catch-up: done, %s delivered; streaming live", counted(self.delivered_events, "event"))
            self._end_catch_up()
            return
        left = int(target) - int(at)
        metrics.STATUS.backlog_bytes = left
        progress.update(self.delivered_events, 1 - left / max(int(target) - int(start), 1))

    def _end_catch_up(self) -> None:
        if self._catch_up is not None:
            self._catch_up[2].end()
            self._catch_up = None
            metrics.STATUS.backlog_bytes = None

    def _handoff(self, rs: ReplicationStream, reason: str, *, drop: bool) -> Generator[Transaction, None, Lsn | None]:
        """(Re)create the slot with an exported snapshot and replay what the position lacks."""
        if self.endpos is not None and self._run_start is not None:
            self._refuse_endpos_before(self._run_start)
        log.warning("%s: replaying from seq %d under a new slot snapshot, then streaming",
                    reason, self._position.seq)
        if drop:
            rs.drop_slot()
        created = rs.create_slot(export_snapshot=True)
        assert created.snapshot is not None
        after = self._current_position()
        metrics.STATUS.set_path("poll")
        self.path = "poll"
        progress: list[Progress] = []

        def total(n: int) -> None:
            # Until it is done, the consumer is behind by this many events: /readyz says so.
            progress.append(Progress("hand-off replay", n, log=log, bar=True, backlog=True))
            log.info("hand-off replay: %s to replay from the slot's snapshot", counted(n, "event"))

        try:
            finished = yield from self._replay_snapshot(rs, created.snapshot, after, progress, total)
        finally:
            if progress:
                progress[0].end()
        if not finished:
            return None
        point = created.consistent_point
        if self._pending:
            # auto_ack off, and the caller has not acknowledged all of the replay yet: the slot's
            # start is recorded once it has (an empty transaction at that position, acknowledged
            # with the replay's last one). A crash before then repeats the hand-off from the seq
            # position, which covers exactly what was acknowledged.
            self._pending.append(Transaction(None, point, point, None, [], "poll"))
        else:
            self._acked_lsn = point
            self._dirty = True
            self._checkpoint(final=True)
        log.info("hand-off: %s replayed from the snapshot; streaming from %s",
                 counted(progress[0].done if progress else 0, "event"), created.consistent_point)
        return created.consistent_point

    def _replay_snapshot(self, rs: ReplicationStream, snapshot: str, after: Position,
                         progress: list[Progress], total: Callable[[int], None]) -> Generator[Transaction, None, bool]:
        """The hand-off's replay: True once all of it is handled, False when stopped midway."""
        from .polling import read_snapshot

        count = 0
        lag = _ReplayLag()
        try:
            for tx in read_snapshot(self.dsn, snapshot, table=self.table, after=after, batch=5000,
                                    event_class=self.event_class, on_total=total):
                yield from self._hand_over(tx)
                count += len(tx.events)
                progress[0].update(count)
                lag.update(tx)
                self._checkpoint()  # a long replay killed midway resumes from here, not from zero
                if self._stop:
                    # Not finished: the consumer has no position at the slot's start, so the next
                    # run repeats the hand-off from the seq position saved now, under a slot of
                    # its own: this one would only hold WAL until then.
                    self._checkpoint(final=True)
                    self._drop_new_slot(rs, "stopped before its hand-off finished")
                    return False
        except GeneratorExit:
            # The caller stopped iterating mid-replay (its handler or sink failed, or it broke
            # out): as above, the next run hands over again under a new slot.
            self._drop_new_slot(rs, "left before its hand-off finished")
            raise
        except (psycopg.errors.InvalidParameterValue, psycopg.errors.UndefinedObject) as err:
            # 22023 "invalid snapshot identifier" up to PostgreSQL 17; 42704 "snapshot ... does
            # not exist" from 18.
            if "snapshot" not in str(err):
                raise
            # The connection that exported it ended (a restart, a terminated walsender) before
            # the replay took it: the slot is ahead of the position now, so the next attempt
            # drops it and starts the hand-off again.
            raise ConnectionLostError(f"the new slot's snapshot is gone before the replay could use it "
                                      f"({mask(str(err).splitlines()[0])})") from None
        except Exception as err:
            # A failure the hand-off will not retry (a missing grant, an altered table): drop the
            # slot made for it, or it would hold WAL for nobody. Lost connections are retried,
            # and the retry drops and re-creates it anyway.
            if not isinstance(err, (ConnectionLostError, ConnectError, psycopg.OperationalError)):
                self._drop_new_slot(rs, "its hand-off failed")
            raise
        return True

    def _refuse_endpos_before(self, start: Lsn) -> None:
        """A hand-off replays every event committed before its slot's start, and the snapshot
        has no commit LSNs to stop at an earlier one: an endpos well before the run's start is
        refused rather than delivered past. One reached while the slot is being made
        ends the run at the slot's start: everything committed by endpos, and maybe a few after
        (as on the poll path)."""
        assert self.endpos is not None
        # A read writes WAL too (page pruning, hint bits), as do cdc's own bookkeeping and the
        # server's snapshots: an endpos a script read a moment before the run is a little behind
        # its start with no commit in between. Within one WAL segment it ends the run at the
        # slot's start like a later one (maybe a few transactions past it, as documented).
        if self.endpos + ENDPOS_SLACK < start:
            raise ConfigError(
                f"--endpos {self.endpos} is more than 16 MB of WAL before the start of this run (the WAL "
                f"was at {start}), and "
                f"consumer {self.consumer!r} needs a new slot: its hand-off delivers everything committed "
                f"up to the slot's start, so it cannot stop at {self.endpos}; give --endpos now, "
                f"{start} or later, or none")

    def _drop_new_slot(self, rs: ReplicationStream, why: str) -> None:
        """Every slot a run creates and does not go on to use is dropped: left, it would hold WAL
        for nobody (and a few such runs use up max_replication_slots)."""
        try:
            if rs.conn is not None:
                rs.drop_slot()
            else:  # its connection is closed already: drop it through the pool, if nobody took it
                with self.pool.connection() as conn:
                    conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                                 "WHERE slot_name = %s AND active_pid IS NULL", (self.slot,))
            log.info("dropped slot %s: the run %s (the next run makes a new one)", self.slot, why)
        except (psycopg.Error, CdcError) as err:
            log.warning("could not drop slot %s, made for a hand-off that did not finish (%s): drop it by "
                        "hand: SELECT pg_drop_replication_slot('%s')", self.slot, mask(str(err).strip()), self.slot)

    def _stream_loop(self, rs: ReplicationStream) -> Iterator[Transaction]:
        decoder = new_decoder(self.plugin, self.table, chunk_events=self.chunk_events, event_class=self.event_class)
        skip_to = self._acked_lsn or Lsn(0)
        endpos = self.endpos
        stop_after = endpos if endpos is not None else _NO_END
        batch: list[memoryview] = []
        txs: list[Transaction] = []
        decode = decoder.decode
        status = metrics.STATUS
        pending, auto_ack, handled_txs = self._pending, self.auto_ack, self._handled_txs
        while not self._stop:
            batch.clear()
            txs.clear()
            got = rs.read(0.2, batch, _READ_BATCH)
            status.tick()
            refused: CdcError | None = None
            try:
                decode(batch, txs)
            except (DecodeError, UnsupportedChangeError) as err:
                # What was whole before the message it refuses is delivered first: it is not held
                # back by what comes after it. The refused message is never acknowledged.
                refused = err
            batch.clear()  # the raw messages are decoded: free them now
            for tx in txs:
                end = tx.end_lsn  # never None on the stream
                # Decided at a transaction's first part: its later ones follow it (pgoutput's
                # parts before the last carry a lower bound of the end, see cdc.decoders.pgoutput).
                if end > stop_after and tx.part == 0:  # type: ignore[operator]
                    self._finish_at_endpos()
                    return
                if end <= skip_to:  # type: ignore[operator]
                    # Handled before the restart (the slot lags our checkpoint): mark, don't emit.
                    self._mark_handled(tx)
                    continue
                if not tx.events and tx.part == 0:
                    # Not an empty final part of a transaction handed over in parts (its size a
                    # multiple of chunk_events): the sink must see that commit, or a projection's
                    # open database transaction is acknowledged without being committed.
                    if tx.final and not pending:
                        self._acked_lsn = end
                        self._moved = True
                        self._last_commit_time = tx.commit_time
                    continue
                # The hand-over and `_handled`, inlined: this runs once per transaction.
                pending.append(tx)
                yield tx
                if auto_ack:
                    pending.clear()
                    handled_txs.append(tx)
                    if tx.final:
                        self._acked_lsn = end
                        self._last_commit_time = tx.commit_time
                    self._dirty = True
                if self._stop:
                    break
            txs.clear()
            if refused is not None and not self._stop:
                self._checkpoint(final=True)  # what was delivered before it
                raise refused
            if self._catch_up is not None:
                self._catch_up_step()
            # Settle each batch (at most _READ_BATCH events); but recording deliveries is a
            # database write, made every _RECORD_EVERY s (or when the events pile up): once a
            # checkpoint, a second's deliveries in one write held up the commits arriving
            # meanwhile (2,000 a second: 16 ms a write, p99 12 ms).
            if handled_txs and (self.deliveries is None or time.monotonic() - self._settled_at >= _RECORD_EVERY
                                or sum(len(t.events) for t in handled_txs) > _SETTLE_EVENTS):
                self._settle()
            if not got:
                if endpos is not None and not decoder.in_transaction and rs.server_wal_end >= endpos:
                    self._finish_at_endpos()
                    return
                if not decoder.in_transaction and not pending:
                    self._idle_ack(rs, endpos)
                if endpos is not None:
                    rs.send_status(reply=True)  # the reply's WAL end tells us whether we are done
            # Saved early only when idle (the read timed out), not whenever a read brought no
            # data: a keepalive wakes one after nearly every transaction, and saving then, with
            # its confirmation prompting the next keepalive, was a checkpoint write a
            # transaction (and ~1.5 ms of latency for the commits arriving meanwhile).
            self._checkpoint(force=rs.timed_out)
            if time.monotonic() - rs.last_status_at >= self.status_interval:
                rs.send_status()
        if decoder.in_transaction and self._pending:
            log.info("stopping inside transaction %s: it will be delivered again from its start",
                     self._pending[-1].xid)

    def _idle_ack(self, rs: ReplicationStream, endpos: Lsn | None) -> None:
        """When the server asks for a reply while we are idle, confirm its sent position, as
        pg_recvlogical does: saved in the checkpoint first, then told to the slot.

        Safe: the walsender sends each transaction at its commit, in order, so every commit
        before its sent position has reached us, and nothing is in our hands or half-received.
        Needed: at a fast shutdown the walsender waits for the client to confirm all it sent,
        and our last transaction's end is short of that. Then the checkpoint cannot be saved
        (the database is going down): the save fails within the pool's timeout, the stream is
        dropped, and the server goes on without our confirmation. Only on a server request:
        our own checkpoint write is WAL too, and acknowledging it each idle moment would feed
        itself.
        """
        if not rs.reply_requested:
            return
        rs.reply_requested = False
        if not self._pending:  # everything the server has sent is handled: nothing is behind
            self._last_commit_time = None
            metrics.LAG_SECONDS.set(0.0)
            metrics.STATUS.lag_seconds = 0.0
        target = rs.server_wal_end if endpos is None else min(rs.server_wal_end, endpos)
        if target > (self._acked_lsn or 0):
            self._acked_lsn = target
            self._moved = True
        if target > rs.flushed:
            self._checkpoint(final=True)

    def _finish_at_endpos(self) -> None:
        # What the caller has not acknowledged stays so (auto_ack off: a worker may still fail on it).
        if self.auto_ack:
            self._ack_pending()
        self._checkpoint(final=True)
        self._stop = True

    # -- poll -----------------------------------------------------------------------------------

    def _poll(self) -> Iterator[Transaction]:
        from .polling import CommitBound, Poller

        self._poller = poller = Poller(
            pool=self.pool, table=self.table, position=self._current_position(),
            interval=self.poll_interval, stale_after=self.stale_after, event_class=self.event_class,
        )
        metrics.STATUS.set_path("poll")
        metrics.STATUS.connected = True
        metrics.STATUS.slot_valid = None
        self.path = "poll"
        log.info("polling %s on %s as consumer %s from seq %d", self.table.qualified,
                 describe(self.dsn), self.consumer, self._position.seq)
        bound = CommitBound(self.table, self.endpos) if self.endpos is not None else None
        catch_up = self._poll_backlog()
        done = 0
        lag = _ReplayLag()
        try:
            while not self._stop:
                txs = poller.poll(0.2)
                metrics.STATUS.tick()
                for tx in txs:
                    yield from self._hand_over(tx)
                    done += len(tx.events)
                    lag.update(tx)
                    if self._stop:
                        break
                if catch_up is not None:
                    catch_up.update(done)
                    if done >= (catch_up.total or 0) or (not txs and poller.high_water_mark >= self._backlog_top):
                        catch_up.end()
                        log.info("poll catch-up: %s delivered; following new events", counted(done, "event"))
                        catch_up = None
                self._checkpoint(force=not txs)
                if bound is not None and not self._stop:
                    with self.pool.connection() as conn:
                        top = bound.step(conn)
                    if top is not None and poller.high_water_mark >= top and not poller.in_transaction:
                        log.info("endpos %s reached: every event committed before it is delivered "
                                 "(up to seq %d)", self.endpos, poller.high_water_mark)
                        self._finish_at_endpos()
        finally:
            if catch_up is not None:
                catch_up.end()
            poller.close()
            self._poller = None

    def _poll_backlog(self) -> Progress | None:
        """The events already committed above the position when polling starts: a backlog, in
        /readyz and the logs, until the poller has delivered them."""
        from psycopg import sql

        with self.pool.connection() as conn:
            row = conn.execute(sql.SQL("SELECT count(*), max({seq}) FROM {t} WHERE {seq} > %s").format(
                t=self.table.ident(), seq=sql.Identifier(self.table.seq)), (self._position.seq,)).fetchone()
        total = max(int(row[0]) - len(self._position.seqs_above), 0) if row else 0
        self._backlog_top = int(row[1]) if row and row[1] is not None else 0  # caught up past this
        if total == 0:
            return None
        log.info("poll catch-up: %s committed above seq %d to deliver", counted(total, "event"), self._position.seq)
        return Progress("poll catch-up", total, log=log, bar=True, backlog=True)

    # -- acknowledgement --------------------------------------------------------------------------

    def _hand_over(self, tx: Transaction) -> Iterator[Transaction]:
        self._pending.append(tx)
        yield tx
        if self.auto_ack:
            self._ack_pending()

    def _ack_pending(self) -> None:
        for t in self._pending:
            self._handled(t)
        self._pending.clear()

    def _handled(self, tx: Transaction) -> None:
        # Bookkeeping only: the watermark, counters, metrics and the delivery record are updated
        # in one pass at the next checkpoint, not once per transaction.
        self._handled_txs.append(tx)
        if tx.final and tx.end_lsn is not None:
            self._acked_lsn = tx.end_lsn
            self._last_commit_time = tx.commit_time
        self._dirty = True
        self._unsettled += len(tx.events)
        if self._unsettled > _SETTLE_EVENTS:
            self._settle()  # keep memory bounded between checkpoints

    def _settle(self) -> None:
        """Fold the transactions handled since the last checkpoint into the watermark, the
        counters, the metrics and the delivery record."""
        txs = self._handled_txs.copy()  # the same list stays: the stream loop holds it
        self._handled_txs.clear()
        self._unsettled = 0
        self._settled_at = time.monotonic()
        if txs:
            self._watermark.mark_handled(self._durable_seqs(txs))  # type: ignore[union-attr]
            events = sum(len(tx.events) for tx in txs)
            finals = sum(1 for tx in txs if tx.final)
            self.delivered_events += events
            self.delivered_transactions += finals
            path = txs[-1].source
            metrics.EVENTS.labels(path).inc(events)
            metrics.TRANSACTIONS.labels(path).inc(finals)
            metrics.LAST_DELIVERY.set(time.time())
            if self.deliveries is not None and not self._sink_records:
                self.deliveries.record(txs)
        if self._last_commit_time is not None:
            lag = max(0.0, time.time() - self._last_commit_time.timestamp())
            metrics.LAG_SECONDS.set(lag)
            metrics.STATUS.lag_seconds = lag  # what --ready-max-lag-seconds compares

    def _durable_seqs(self, txs: list[Transaction]) -> list[int]:
        """The seqs of `txs` that a checkpoint may count as handled. For a sink that holds a
        transaction's parts in one open database transaction (`whole_transactions`), a
        transaction handed over in parts counts only with its final part: a seq mark covering
        its earlier parts would make a hand-off, or a partition that skips what the mark covers,
        pass over events a crash rolled back."""
        if not self.whole_transactions:
            return [e.seq for tx in txs for e in tx.events]
        seqs: list[int] = []
        opened = self._open_seqs
        for tx in txs:
            if not tx.final:
                opened.extend(e.seq for e in tx.events)
                continue
            if opened:
                seqs.extend(opened)
                opened = self._open_seqs = array("q")
            seqs.extend(e.seq for e in tx.events)
        return seqs

    def _mark_handled(self, tx: Transaction) -> None:
        if tx.events:
            self._watermark.mark_handled([e.seq for e in tx.events])  # type: ignore[union-attr]

    def _current_position(self) -> Position:
        self._settle()
        with self.pool.connection() as conn:
            wm = self._watermark.advance(conn)  # type: ignore[union-attr]
        self._position = Position(self._acked_lsn, wm.seq, wm.seqs_above)
        return self._position

    def _checkpoint(self, *, force: bool = False, final: bool = False) -> None:
        """Make what was handled durable (sink), save the position, then tell the slot.

        `force`: the feed is idle, save now rather than at the interval; `final`: stopping or
        switching paths, save whatever moved."""
        now = time.monotonic()
        since = now - self._last_checkpoint
        if not self._dirty:
            if not self._moved or not (final or since >= self.status_interval):
                return
        elif not (force or final) and since < self.checkpoint_interval:
            return
        if self.on_checkpoint is not None:
            self.on_checkpoint()
        self._settle()
        self.checkpoints.save(self._current_position())
        self._dirty = self._moved = False
        self._last_checkpoint = now
        if self._stream is not None and self._stream.streaming and self._acked_lsn is not None:
            self._stream.acknowledge(self._acked_lsn)


class _ReplayLag:
    """Lag in seconds on the poll paths, whose transactions carry no commit time: the age of the
    event just delivered (its created_at), about that of the oldest one still to deliver while a
    backlog lasts. Read at most twice a second, not per event."""

    def __init__(self) -> None:
        self._at = 0.0

    def update(self, tx: Transaction) -> None:
        now = time.monotonic()
        if now - self._at < 0.5 or not tx.events:
            return
        self._at = now
        created = tx.events[-1].created_at
        if created is not None and tx.commit_time is None:
            at = created.timestamp() if created.tzinfo is not None else created.replace(tzinfo=timezone.utc).timestamp()
            lag = max(0.0, time.time() - at)
            metrics.LAG_SECONDS.set(lag)
            metrics.STATUS.lag_seconds = lag


class AsyncConsumer:
    """The same feed for asyncio: ``async for tx in AsyncConsumer(...)``.

    The protocol loop runs in a worker thread (the hot path stays the measured sync one); each
    step is awaited, so the event loop never blocks on the socket.
    """

    def __init__(self, dsn: str | None = None, **kwargs: object):
        self._args = (dsn, kwargs)
        self._consumer: Consumer | None = None
        self._iter: Iterator[Transaction] | None = None

    async def __aenter__(self) -> AsyncConsumer:
        dsn, kwargs = self._args
        self._consumer = await asyncio.to_thread(lambda: Consumer(dsn, **kwargs))  # type: ignore[arg-type]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[Transaction]:
        return self

    async def __anext__(self) -> Transaction:
        if self._consumer is None:
            await self.__aenter__()
        assert self._consumer is not None
        if self._iter is None:
            self._iter = iter(self._consumer)
        it = self._iter
        tx = await asyncio.to_thread(next, it, None)
        if tx is None:
            raise StopAsyncIteration
        return tx

    async def ack(self, tx: Transaction) -> None:
        assert self._consumer is not None
        self._consumer.ack(tx)

    def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.stop()

    async def aclose(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            consumer.stop()
            await asyncio.to_thread(consumer.close)
