"""Health, readiness and metrics over HTTP, plus the slot monitor that feeds the lag gauges.

- `/healthz`: the process is alive, i.e. the run loop ticked recently. A stuck loop (a sink
  that hangs, a deadlock) turns it 503 so the orchestrator restarts us.
- `/readyz`: the feed is flowing: connected, the slot usable, the sink taking events, lag under
  the thresholds, and not a standby. A standby waiting for the slot is healthy but not ready.
- `/metrics`: Prometheus text of `cdc.metrics.REGISTRY`.

The stdlib server is enough: a scrape every few seconds, never on the delivery path.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .connection import connect, mask
from .errors import CdcError, ConfigError
from .metrics import (
    LAG_BYTES,
    REGISTRY,
    SLOT_RETAINED_BYTES,
    SLOT_WAL_STATUS,
    STATUS,
    Status,
)

log = logging.getLogger("cdc.http")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9187
WAL_STATUSES = ("reserved", "extended", "unreserved", "lost")
_TEXT = "text/plain; charset=utf-8"


def liveness(status: Status, tick_timeout: float) -> str | None:
    """Why the process is not healthy, or None when it is."""
    age = time.monotonic() - status.last_tick
    if age > tick_timeout:
        return f"the run loop has not ticked for {age:.0f} s (limit {tick_timeout:g} s)"
    return None


def readiness(
    status: Status, *, max_lag_seconds: float | None = None, max_lag_bytes: int | None = None
) -> str | None:
    """Why the feed is not ready, in one line, or None when it is."""
    if status.standby:
        return "standby: another consumer holds the slot; this one takes over when it goes"
    if not status.connected:
        return "not connected to the database" + (f": {status.error}" if status.error else "")
    # While the poller delivers (poll mode, or auto mode fallen back), a missing slot does not
    # stop the feed: the wal_status gauge still tells.
    if status.slot_valid is False and status.path != "poll":
        return "the replication slot is missing or lost"
    if status.sink_problem is not None:
        return f"the sink is not taking events: {status.sink_problem}"
    if status.catching_up is not None:
        left = (f"{status.backlog_events:,} events to go" if status.backlog_events is not None
                else f"{status.backlog_bytes:,} bytes of WAL to go" if status.backlog_bytes is not None
                else "under way")
        return f"catching up: {status.catching_up}, {left}"
    if max_lag_seconds is not None and status.lag_seconds is not None and status.lag_seconds > max_lag_seconds:
        return f"lag {status.lag_seconds:.1f} s is over {max_lag_seconds:g} s"
    if max_lag_bytes is not None and status.lag_bytes is not None and status.lag_bytes > max_lag_bytes:
        return f"lag {status.lag_bytes} bytes is over {max_lag_bytes} bytes"
    return None


class HttpServer:
    """A running HTTP endpoint. `port` is the bound port (useful with port 0)."""

    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread):
        self._server = server
        self._thread = thread
        self.host = str(server.server_address[0])
        self.port = int(server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HttpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    host: str | None = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    status: Status = STATUS,
    ready_max_lag_seconds: float | None = None,
    ready_max_lag_bytes: int | None = None,
    tick_timeout: float = 30.0,
) -> HttpServer:
    """Serve /healthz, /readyz and /metrics from a daemon thread; `close()` stops it.

    Port 0 binds any free port (see `.port`). A bind failure raises ConfigError.
    """
    host = host or DEFAULT_HOST
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Handler(BaseHTTPRequestHandler):
        server_version = "cdc"

        def do_GET(self) -> None:
            self._respond(head=False)

        def do_HEAD(self) -> None:
            self._respond(head=True)

        def _respond(self, *, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                reason = liveness(status, tick_timeout)
                body: str | bytes
                code, body, ctype = (503 if reason else 200), (reason or "ok") + "\n", _TEXT
            elif path == "/readyz":
                reason = readiness(status, max_lag_seconds=ready_max_lag_seconds,
                                   max_lag_bytes=ready_max_lag_bytes)
                code, body, ctype = (503 if reason else 200), (reason or "ready") + "\n", _TEXT
            elif path == "/metrics":
                code, body, ctype = 200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST
            else:
                code, body, ctype = 404, "not found: try /healthz, /readyz or /metrics\n", _TEXT
            data = body.encode() if isinstance(body, str) else body
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib's name
            log.debug("%s %s", self.address_string(), format % args)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = family

    try:
        server = Server((host, port), Handler)
    except OSError as err:
        raise ConfigError(
            f"cannot serve HTTP on {host}:{port}: {err.strerror or err} (choose another --http-port / --http-host)"
        ) from None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="cdc-http", daemon=True)
    thread.start()
    return HttpServer(server, thread)


class SlotMonitor:
    """Reads the slot's lag and WAL retention every `interval` seconds, on its own connection.

    Never the replication connection: that one is in COPY_BOTH and can run no query. Sets
    LAG_BYTES, SLOT_RETAINED_BYTES, SLOT_WAL_STATUS and `status.lag_bytes` / `status.slot_valid`
    (False when the slot is missing or lost). Connection failures are logged and retried.
    """

    QUERY = """
        SELECT (w.lsn - s.confirmed_flush_lsn)::bigint, (w.lsn - s.restart_lsn)::bigint, s.wal_status
        FROM (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                          ELSE pg_current_wal_lsn() END AS lsn) w
        LEFT JOIN pg_replication_slots s ON s.slot_name = %s
    """

    def __init__(self, dsn: str, slot: str, *, status: Status = STATUS, interval: float = 5.0):
        self.dsn = dsn
        self.slot = slot
        self.status = status
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cdc-slot-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 15)
            self._thread = None
        else:
            self._close()  # poll_once() called without the thread

    def poll_once(self) -> tuple[int | None, int | None, str | None] | None:
        """Read and publish once: (lag bytes, retained bytes, wal_status), or None: no slot."""
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn, autocommit=True, application_name="cdc-slot-monitor")
            # A monitor query must never pile up behind a lock: give up and try next time.
            self._conn.execute("SET statement_timeout = '10s'")
        row = self._conn.execute(self.QUERY, (self.slot,)).fetchone()
        lag, retained, wal_status = row if row else (None, None, None)
        if wal_status is None:  # no such slot
            self.status.slot_valid = False
            self.status.lag_bytes = None
            for s in WAL_STATUSES:
                SLOT_WAL_STATUS.labels(s).set(0)
            return None
        for s in WAL_STATUSES:
            SLOT_WAL_STATUS.labels(s).set(1 if s == wal_status else 0)
        if lag is not None:
            LAG_BYTES.set(max(int(lag), 0))
        if retained is not None:
            SLOT_RETAINED_BYTES.set(max(int(retained), 0))
        self.status.lag_bytes = max(int(lag), 0) if lag is not None else None
        self.status.slot_valid = wal_status != "lost"
        return lag, retained, wal_status

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.poll_once()
                if failing:
                    log.info("slot monitor: reading slot %s again", self.slot)
                failing = False
            except (CdcError, psycopg.Error) as err:
                if not failing:  # once per outage, not every interval
                    log.warning("slot monitor: cannot read slot %s: %s", self.slot,
                                mask((str(err).strip().splitlines() or [type(err).__name__])[0]))
                failing = True
                self._close()
            self._stop.wait(self.interval)
        self._close()

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None
