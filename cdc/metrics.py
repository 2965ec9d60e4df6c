"""What a running consumer tells the outside: Prometheus metrics and the state behind /healthz
and /readyz. Updated by the run loop, read by http.py. Names start with `cdc_`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS = Counter("cdc_events", "Events delivered to the sink, by path (stream, poll).", ["path"], registry=REGISTRY)
TRANSACTIONS = Counter("cdc_transactions", "Transactions delivered to the sink, by path.", ["path"], registry=REGISTRY)
LAG_BYTES = Gauge("cdc_lag_bytes", "pg_current_wal_lsn() minus the slot's confirmed flush LSN.", registry=REGISTRY)
LAG_SECONDS = Gauge("cdc_lag_seconds", "Now minus the commit time of the last delivered transaction (or heartbeat).", registry=REGISTRY)
SLOT_RETAINED_BYTES = Gauge("cdc_slot_retained_wal_bytes", "WAL the slot holds back (current LSN minus restart_lsn).", registry=REGISTRY)
SLOT_WAL_STATUS = Gauge("cdc_slot_wal_status", "1 for the slot's current wal_status (reserved, extended, unreserved, lost).", ["status"], registry=REGISTRY)
RECONNECTS = Counter("cdc_reconnects", "Reconnections after a lost connection.", registry=REGISTRY)
ERRORS = Counter("cdc_errors", "Errors, by kind.", ["kind"], registry=REGISTRY)
DEAD_LETTERS = Counter("cdc_dead_lettered_events", "Events moved to cdc.dead_letters after failing the sink.", registry=REGISTRY)
RECONCILE_FINDINGS = Counter("cdc_reconcile_findings", "Disagreements found by the reconciler, by kind.", ["kind"], registry=REGISTRY)
HOLE_AGE = Gauge("cdc_poll_hole_age_seconds", "Age of the oldest sequence hole the poller waits on (0: none).", registry=REGISTRY)
HOLE_HOLDER = Gauge("cdc_poll_hole_holder_pid", "Backend pid of a live transaction holding the oldest hole (0: none).", registry=REGISTRY)
BACKLOG_EVENTS = Gauge("cdc_backlog_events", "Events still to deliver in a hand-off replay or catch-up (0: none, or streaming).", registry=REGISTRY)
MODE = Gauge("cdc_mode", "1 for the path currently delivering (stream or poll).", ["path"], registry=REGISTRY)
LAST_DELIVERY = Gauge("cdc_last_delivery_timestamp_seconds", "Unix time of the last delivery to the sink.", registry=REGISTRY)
SINK_CONNECTED = Gauge("cdc_sink_connected", "1 while a sink with a server of its own (NATS) is connected and "
                       "publishing without errors, else 0.", registry=REGISTRY)
SINK_UNACKED = Gauge("cdc_sink_unacked_messages", "Messages published to the sink's server and not yet acknowledged by it.",
                     registry=REGISTRY)
WORKER_QUEUE_DEPTH = Gauge("cdc_worker_queue_depth", "Slices waiting in a worker's queue (--workers N > 1); a full queue stalls the feed.", ["worker"], registry=REGISTRY)
WORKER_OLDEST_AGE = Gauge("cdc_worker_oldest_age_seconds", "Age of the oldest slice a worker has not finished (0: idle); grows while its handler is stuck.", ["worker"], registry=REGISTRY)


@dataclass
class Status:
    """The run loop's state as /healthz and /readyz see it."""

    started: float = field(default_factory=time.time)
    last_tick: float = field(default_factory=time.monotonic)
    connected: bool = False
    slot_valid: bool | None = None  # None: no slot in use (poll mode)
    path: str | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    standby: bool = False
    error: str | None = None
    catching_up: str | None = None  # the backlog phase under way (e.g. "hand-off replay"), if any
    backlog_events: int | None = None  # events that phase still has to deliver, when known
    backlog_bytes: int | None = None  # bytes of WAL a stream catch-up still has to read
    sink_problem: str | None = None  # why the sink's server (NATS) takes nothing now, if so

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def set_path(self, path: str) -> None:
        self.path = path
        for p in ("stream", "poll"):
            MODE.labels(p).set(1 if p == path else 0)


STATUS = Status()
