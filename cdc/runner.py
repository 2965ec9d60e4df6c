"""The sidecar: a Consumer wired to a sink, with retries and dead letters, the HTTP endpoint,
heartbeats, the shadow reconciler and standby. `cdc run` is this plus argument parsing."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, cast

import orjson
import psycopg

from . import metrics
from .checkpoint import Projection
from .config import Settings
from .connection import connect, conninfo_user, resolve_dsn, server_not_ready
from .consumer import Consumer
from .errors import CdcError, SinkError, SlotInUseError
from .events import Lsn, Transaction, wire_records
from .partitions import Partition, Partitions
from .progress import counted
from .sinks import Sink, load_callable, open_sink
from .store import DEFAULT_TABLE, EventTable

log = logging.getLogger("cdc.run")


def mapping_given(settings: Settings) -> bool:
    """Whether the settings name a table mapping at all (a preset other than cdc, a table, a
    column or an encoding), rather than leaving the default."""
    from .presets import columns_from

    return not (settings.preset in (None, "cdc") and settings.table is None and settings.data_encoding is None
                and settings.metadata_encoding is None
                and not any(v is not None for v in columns_from(settings).values()))


def table_for(settings: Settings, conn: psycopg.Connection | None = None) -> EventTable:
    """The events table the settings name: a preset (default cdc.events), with --table and
    the column settings mapped over it (see presets.py). With `conn`, a preset's table that is
    not under its default name is looked for (presets.find_table)."""
    from .presets import columns_from, find_table
    from .presets import table_for as preset_table

    columns = columns_from(settings)
    if not mapping_given(settings):
        return DEFAULT_TABLE
    table = preset_table(settings.preset, settings.table, data_encoding=settings.data_encoding,
                         metadata_encoding=settings.metadata_encoding,
                         **cast(dict[str, Any], columns))  # str | None each; mypy would match them to `strict`
    if conn is not None and settings.table is None:
        table = find_table(conn, table, settings.preset)
    return table


class Redeliver(Exception):
    """The projection's connection broke: whether its last commit landed, and what of a huge
    transaction it held open, only the database knows. Resume from the position saved with its
    effects (Consumer.rewind), as a restart would, without exiting."""


class Delivery:
    """Hands each transaction to the sink, retrying; after `max_attempts` failures it stops,
    or parks the transaction in cdc.dead_letters and goes on. Nothing is dropped silently.

    A projection whose database connection broke (a server restart, a terminated backend) is
    not poison: it waits for a new connection for as long as it takes, without counting
    attempts, then resumes from what the database recorded (one projection: Redeliver; a
    partition: its row read again). `release` (the consumer's `release_stream`) lets the
    server's shutdown go on instead of waiting for our walsender."""

    def __init__(self, sink: Sink, settings: Settings, dsn: str, stop: threading.Event,
                 release: Callable[[], None] | None = None):
        self.sink = sink
        self.settings = settings
        self.dsn = dsn
        self.stop = stop
        self.release = release

    def __call__(self, tx: Transaction) -> None:
        attempts = self.settings.max_attempts
        attempt = outage = 0
        while True:
            try:
                self.sink.write(tx)
                if outage:
                    log.info("the projection's database is back: transaction xid=%s delivered", tx.xid)
                return
            except Exception as err:  # a user's handler may raise anything
                metrics.ERRORS.labels("sink").inc()
                first = tx.events[0].seq if tx.events else None
                if self._connection_broken():
                    outage += 1
                    delay = min(5.0, 0.2 * 2 ** min(outage - 1, 5))
                    log.warning("the projection's database connection broke on transaction xid=%s lsn=%s seq=%s: "
                                "%s; reconnecting in %.1f s (attempt %d; not acknowledged)",
                                tx.xid, tx.commit_lsn, first, _one_line(err), delay, outage)
                    if outage == 1 and self.release is not None:
                        self.release()
                else:
                    attempt += 1
                    log.warning("sink failed on transaction xid=%s lsn=%s seq=%s (attempt %d/%d): %s",
                                tx.xid, tx.commit_lsn, first, attempt, attempts, _one_line(err))
                    if attempt >= attempts and not self.stop.is_set():
                        if self.settings.on_poison == "dead-letter":
                            self._dead_letter(tx, err, attempts)
                            return
                        raise SinkError(
                            f"giving up on transaction xid={tx.xid} lsn={tx.commit_lsn} after {attempts} attempts: "
                            f"{_one_line(err)} (not acknowledged; fix the sink and restart, or use --on-poison "
                            "dead-letter)"
                        ) from None
                    delay = min(5.0, 0.2 * 2 ** (attempt - 1))
                if self.stop.is_set() or self.stop.wait(delay):
                    raise SinkError(f"stopped while retrying transaction xid={tx.xid}: not acknowledged") from None
                if self._reopen_projection(tx) and isinstance(self.sink, Projection):
                    # Whether the interrupted commit landed is known only to the database: start
                    # again from the position saved with the projection's effects (this also
                    # brings a huge transaction's lost earlier parts again).
                    raise Redeliver(f"the projection's connection broke on transaction xid={tx.xid}")

    def _connection_broken(self) -> bool:
        conn = getattr(self.sink, "conn", None)
        return isinstance(self.sink, (Projection, Partition)) and conn is not None and (conn.closed or conn.broken)

    def _reopen_projection(self, tx: Transaction) -> bool:
        """A server restart or a terminated backend breaks the projection's connection and rolls
        back its open transaction: reopen it so the retry starts that transaction over (True once
        reopened). Parts handed over before the break are gone with it, so a later part is not
        retried alone: the caller redelivers the transaction from part 0 (one projection), or
        stops (N workers: nothing was acknowledged; the next run delivers it from part 0)."""
        sink = self.sink
        if not self._connection_broken():
            return False
        assert isinstance(sink, (Projection, Partition))
        if tx.part > 0 and isinstance(sink, Partition):
            raise SinkError(f"the projection's connection broke inside transaction xid={tx.xid} handed over in "
                            "parts: not acknowledged; it is delivered again from its start on the next run")
        old = sink.conn
        try:
            sink.reset(connect(self.dsn, autocommit=True))
        except CdcError:
            return False  # server still down: the next attempt tries again
        old.close()
        return True

    def _dead_letter(self, tx: Transaction, err: Exception, attempts: int) -> None:
        with connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO cdc.dead_letters (consumer, xid, commit_lsn, seqs, records, error, attempts) "
                "VALUES (%s, %s, %s::pg_lsn, %s, %s, %s, %s)",
                (self.settings.consumer, tx.xid, str(tx.commit_lsn) if tx.commit_lsn else None,
                 [e.seq for e in tx.events], orjson.dumps(wire_records(tx)).decode(), _one_line(err), attempts),
            )
        metrics.DEAD_LETTERS.inc(len(tx.events))
        log.error("moved transaction xid=%s lsn=%s (%d events) to cdc.dead_letters: %s",
                  tx.xid, tx.commit_lsn, len(tx.events), _one_line(err))


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class Periodic:
    """Runs `task()` every `interval` seconds on a daemon thread until `stop()`. A round that
    fails is logged; the next one runs as planned. Never touches the replication connection."""

    def __init__(self, name: str, interval: float, task: Callable[[], None]):
        self.interval = interval
        self.task = task
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.task()
            except (psycopg.Error, CdcError) as err:
                log.warning("%s failed: %s", self._thread.name, _one_line(err))


class Heartbeat(Periodic):
    """Writes a logical message every `interval` s while the feed is idle, so the slot's position
    advances (WAL is not held back) and lag is measured even without events."""

    def __init__(self, dsn: str, interval: float, consumer: Consumer):
        super().__init__("cdc-heartbeat", interval, self._beat)
        self.dsn = dsn
        self.consumer = consumer
        self._conn: psycopg.Connection | None = None
        self._seen = -1

    def _beat(self) -> None:
        if self.consumer.path != "stream" or self.consumer.delivered_events != self._seen:
            self._seen = self.consumer.delivered_events
            return
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn, autocommit=True)
        try:
            self._conn.execute("SELECT pg_logical_emit_message(true, 'cdc', %s)", (f"heartbeat {time.time():.6f}",))
        except psycopg.Error as err:
            self._conn = None
            raise CdcError(f"could not write a heartbeat as role {conninfo_user(self.dsn)}: {_one_line(err)} "
                           "(an idle slot then holds WAL; --heartbeat-interval 0 turns heartbeats off)") from None


def pruner(consumer: Consumer, retention_seconds: float, every: float = 60.0) -> Periodic:
    """Keeps the delivery record within its retention, once a minute, off the delivery path."""

    def prune() -> None:
        assert consumer.deliveries is not None
        removed = consumer.deliveries.prune(retention_seconds)
        if removed:
            log.info("pruned %d delivery records older than %.0f h", removed, retention_seconds / 3600)

    return Periodic("cdc-prune", every, prune)


def run(settings: Settings) -> int:
    """`cdc run`: deliver until stopped (SIGTERM/SIGINT) or --endpos; returns the exit code."""
    dsn = resolve_dsn(settings.dsn)
    table = table_for(settings)
    stop = threading.Event()
    consumer_ref: list[Consumer] = []

    def on_signal(signum: int, _frame: Any) -> None:
        if not stop.is_set():
            log.info("received %s: finishing the current transaction, then stopping", signal.Signals(signum).name)
        stop.set()
        for c in consumer_ref:
            c.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    server = None
    if settings.http_port is not None:
        from .http import serve

        server = serve(settings.http_host, settings.http_port,
                       ready_max_lag_seconds=settings.ready_max_lag_seconds,
                       ready_max_lag_bytes=settings.ready_max_lag_bytes)
        log.info("health and metrics on http://%s:%d/ (healthz, readyz, metrics)", settings.http_host, server.port)

    projection_conn = None
    try:
        if settings.sink.startswith(("nats://", "tls://")):
            from .jetstream import target_of

            target_of(settings)  # a wrong flag is told before anything connects
        # A server starting, stopping or restarting (a sidecar started with its database, a
        # restart during ours) is waited for; any other failure to connect ends the run at once.
        deadline, attempt = time.monotonic() + settings.startup_wait, 0
        while True:
            sink = None
            try:
                started, table = _at_start(dsn, settings, table)  # before the sink's set-up and helpers write
                sink, projection_conn = _open_sink(settings, dsn, stop, table)
                consumer = Consumer(
                    dsn, consumer=settings.consumer, slot=settings.slot, mode=settings.mode, table=table,
                    endpos=_endpos(settings.endpos),
                    chunk_events=settings.chunk_events, status_interval=settings.status_interval,
                    checkpoint_interval=settings.checkpoint_interval, poll_interval=settings.poll_interval,
                    stale_after=settings.stale_threshold, on_checkpoint=sink.flush,
                    record_deliveries=settings.record_deliveries or settings.reconcile,
                    reconnect=True, auto_ack=settings.workers == 1, numbers=settings.numbers,
                    plugin=settings.plugin, publication=settings.publication, failover_slot=settings.failover_slot,
                )
                consumer.mark_start(started)
                if isinstance(sink, Projection):
                    consumer.record_deliveries_in(sink)
                # These hold a huge transaction's parts in one database transaction until its last.
                consumer.whole_transactions = isinstance(sink, (Projection, Partitions))
                break
            except (CdcError, psycopg.OperationalError) as err:
                if sink is not None:
                    sink.close()
                if projection_conn is not None:
                    projection_conn.close()
                    projection_conn = None
                if not server_not_ready(err, restarting=attempt > 0) or stop.is_set() or time.monotonic() > deadline:
                    raise
                attempt += 1
                delay = min(5.0, 0.5 * 2 ** (attempt - 1))
                log.warning("the server is not accepting connections yet: %s; retrying in %.1f s (attempt %d)",
                            _one_line(err), delay, attempt)
                if stop.wait(delay):
                    return 0
        consumer_ref[:] = [consumer]
        if stop.is_set():
            consumer.stop()
        return _drive(consumer, sink, settings, dsn, stop)
    except SlotInUseError:
        if not settings.standby or stop.is_set():
            raise
        return 0
    finally:
        if projection_conn is not None:
            projection_conn.close()
        if server is not None:
            server.close()


def _open_sink(settings: Settings, dsn: str, stop: threading.Event,
               table: EventTable | None = None) -> tuple[Sink, psycopg.Connection | None]:
    if settings.sink.startswith(("nats://", "tls://")):
        from .jetstream import JetStreamSink, target_of

        return JetStreamSink(target_of(settings), table=(table or DEFAULT_TABLE).qualified, stop_event=stop), None
    if settings.sink.startswith("python:"):
        handler = load_callable(settings.sink.removeprefix("python:"))
        if settings.workers > 1:
            from .partitions import Partitions

            return Partitions(handler, dsn, consumer=settings.consumer, workers=settings.workers), None
        conn = connect(dsn, autocommit=True)
        from .partitions import retire_partitions

        retire_partitions(conn, settings.consumer, 1)  # after a run with --workers N > 1
        return Projection(handler, conn, consumer=settings.consumer), conn
    if settings.sink.startswith("webhook:"):
        from .webhook import WebhookSink, WebhookSinks

        url = settings.sink.removeprefix("webhook:")
        if settings.workers > 1:
            return WebhookSinks(url, settings.workers, secret=settings.webhook_secret, stop_event=stop), None
        return WebhookSink(url, secret=settings.webhook_secret, stop_event=stop), None
    return open_sink(settings.sink), None


def _drive(consumer: Consumer, sink: Sink, settings: Settings, dsn: str, stop: threading.Event) -> int:
    deliver = Delivery(sink, settings, dsn, stop, release=consumer.release_stream)
    helpers: list[Any] = []
    if settings.http_port is not None and settings.mode != "poll":
        from .http import SlotMonitor

        helpers.append(SlotMonitor(dsn, settings.slot))
    if settings.heartbeat_interval > 0 and settings.mode != "poll":
        helpers.append(Heartbeat(dsn, settings.heartbeat_interval, consumer))
    shadow_pool = None
    if settings.reconcile:
        from .connection import open_pool
        from .reconcile import ShadowReconciler

        # Its own pool: a reconcile round must never make a checkpoint save wait.
        shadow_pool = open_pool(dsn, max_size=2, name="cdc-reconcile")
        helpers.append(ShadowReconciler(shadow_pool, settings.consumer,
                                        stale_threshold=settings.stale_threshold, table=consumer.table))
    if consumer.deliveries is not None:
        helpers.append(pruner(consumer, settings.delivery_retention_hours * 3600))
    for h in helpers:
        h.start()
    failed = True
    try:
        while True:
            try:
                try:
                    if settings.workers > 1:
                        from .workers import run_workers

                        run_workers(consumer, sink, settings.workers,
                                    lambda s: Delivery(s, settings, dsn, stop, consumer.release_stream))
                    else:
                        feed = iter(consumer)
                        try:
                            for tx in feed:
                                deliver(tx)
                        except Redeliver as again:
                            feed.close()  # type: ignore[attr-defined]
                            if stop.is_set():
                                return 0
                            log.warning("%s: resuming from the position saved with its effects", again)
                            consumer.rewind()
                            continue
                except SinkError:
                    if not stop.is_set():
                        raise
                    # Stopped mid-retry: the transaction is not acknowledged; it comes again.
                    log.info("stopped while the sink was retrying: that transaction is not acknowledged")
                    return 0
                failed = False
                return 0
            except SlotInUseError as err:
                if not settings.standby or stop.is_set():
                    raise
                metrics.STATUS.standby = True
                metrics.STATUS.tick()
                log.info("slot %s is in use by %s: standing by, taking over when it is released",
                         settings.slot, err.holder or "another process")
                waited = 0
                while not stop.wait(1.0):
                    metrics.STATUS.tick()
                    if _slot_free(consumer.pool, settings.slot):
                        break
                    waited += 1
                    if waited % 60 == 0:
                        log.info("still standing by for slot %s (%d s)", settings.slot, waited)
                if stop.is_set():
                    failed = False
                    return 0
                metrics.STATUS.standby = False
                log.info("slot %s is free: taking over", settings.slot)
    finally:
        for h in helpers:
            h.stop()
        try:
            # After a failure the transaction in hand was not delivered: never acknowledge it.
            consumer.close(ack_pending=not failed)
        finally:
            sink.close()
            if shadow_pool is not None:
                shadow_pool.close()
        log.info("stopped: %s in %s delivered", counted(consumer.delivered_events, "event"),
                 counted(consumer.delivered_transactions, "transaction"))


def _slot_free(pool: Any, slot: str) -> bool:
    try:
        with pool.connection() as conn:
            row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
        return row is None or row[0] is None
    except psycopg.Error:
        return False


def _endpos(value: str | None) -> Lsn | Literal["now"] | None:
    if value is None:
        return None
    return "now" if value == "now" else Lsn.parse(value)


def _at_start(dsn: str, settings: Settings, table: EventTable) -> tuple[Lsn, EventTable]:
    """Where the WAL is as the run starts, and `table` where the preset's really is."""
    from .polling import WAL_NOW
    from .presets import find_table

    with connect(dsn, autocommit=True) as conn:
        row = conn.execute(WAL_NOW).fetchone()
        if settings.table is None:
            table = find_table(conn, table, settings.preset)
        return Lsn.parse(row[0]) if row and row[0] else Lsn(0), table
