"""The replication connection and the protocol frames (XLogData, keepalive, status update).

psycopg 3.3 takes us into COPY_BOTH with START_REPLICATION; from there we speak the protocol
through `conn.pgconn`. A replication connection only speaks the simple query protocol, so
commands are composed as text with every identifier and literal quoted by us.
"""

from __future__ import annotations

import logging
import select
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg
from psycopg import pq

from .connection import connect_error, mask
from .errors import (
    CdcError,
    ConnectionLostError,
    PluginMissingError,
    PluginNotAllowedError,
    SetupError,
    SlotInUseError,
    SlotLostError,
    WalLevelError,
)
from .events import Lsn

log = logging.getLogger("cdc.replication")

_XLOGDATA = ord("w")
_KEEPALIVE = ord("k")
_W_HEADER = struct.Struct("!QQQ")
_K_BODY = struct.Struct("!QQB")
_STATUS = struct.Struct("!cQQQQB")
# Postgres epoch (2000-01-01) in Unix seconds: protocol times count microseconds from it.
PG_EPOCH = 946_684_800


def now_pg_us() -> int:
    return int((time.time() - PG_EPOCH) * 1_000_000)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class SlotInfo:
    name: str
    plugin: str | None
    active_pid: int | None
    confirmed_flush: Lsn | None
    wal_status: str | None
    retained_bytes: int | None


@dataclass(frozen=True)
class CreatedSlot:
    consistent_point: Lsn
    snapshot: str | None


class ReplicationStream:
    """One logical replication connection for one slot.

    Usage: `open()`, then `create_slot()` if needed, `start(lsn, options)`, then `read()` in a
    loop and `send_status()` as positions are acknowledged; `close()` at the end. Keepalives that
    ask for a reply are answered inside `read()` with the last acknowledged position, at once:
    an unanswered one gets the walsender killed at wal_sender_timeout.

    A handler slower than wal_sender_timeout would still get it killed, since `read()` is not
    called while the handler runs: a daemon thread sends a status update whenever no message
    went out for `keepalive_interval` seconds (any message from us resets the walsender's
    timeout, even while it is blocked writing to us). libpq is not thread-safe for concurrent
    use of one connection, so every use of `pgconn` holds `_io`; the thread only tries the lock,
    so it never waits on a `read()` in progress (which answers keepalives itself).
    """

    keepalive_interval = 1.0

    def __init__(self, dsn: str, slot: str, *, plugin: str = "wal2json", failover: bool = False):
        self.dsn = dsn
        self.slot = slot
        self.plugin = plugin
        self.failover = failover  # PostgreSQL 17+: a slot a standby's slot sync keeps (sync_replication_slots)
        self.conn: psycopg.Connection | None = None
        self.pgconn: pq.abc.PGconn | None = None
        self.walsender_pid: int | None = None
        self.flushed = Lsn(0)        # what we tell the server we have durably handled
        self.received = Lsn(0)       # the highest position seen in a message
        self.server_wal_end = Lsn(0)  # the server's WAL end, from the last message or keepalive
        self.last_status_at = 0.0
        self.streaming = False
        self.reply_requested = False  # the server asked for a reply since the caller last looked
        # The last read() waited its whole timeout with nothing arriving: the feed is idle. A read
        # that returns nothing because a keepalive woke it is not: the walsender sends one each
        # time it has sent us more than we confirmed, so under load nearly every transaction.
        self.timed_out = False
        self._io = threading.RLock()
        self._keepalive: threading.Thread | None = None

    # -- connection and commands ------------------------------------------------------------

    def open(self) -> None:
        try:
            # prepare_threshold=None: psycopg would prepare a command run five times (the
            # extended protocol), which a replication connection refuses.
            self.conn = psycopg.connect(self.dsn, replication="database", autocommit=True,
                                        prepare_threshold=None)
        except (psycopg.OperationalError, psycopg.ProgrammingError) as err:
            raise connect_error(err, self.dsn) from None
        row = self.conn.execute("SELECT pg_backend_pid()").fetchone()
        self.walsender_pid = int(row[0]) if row else None

    def identify(self) -> tuple[str, int, Lsn, str]:
        """systemid, timeline, the server's current WAL position, database."""
        row = self._command("IDENTIFY_SYSTEM").fetchone()
        assert row is not None
        return str(row[0]), int(row[1]), Lsn.parse(row[2]), str(row[3])

    def slot_info(self) -> SlotInfo | None:
        cur = self._command(
            "SELECT slot_name, plugin, active_pid, confirmed_flush_lsn::text, wal_status, "
            "(pg_current_wal_lsn() - restart_lsn)::bigint "
            f"FROM pg_replication_slots WHERE slot_name = {quote_literal(self.slot)}"
        )
        row = cur.fetchone()
        if row is None:
            return None
        return SlotInfo(
            row[0], row[1], row[2], Lsn.parse(row[3]) if row[3] else None, row[4],
            int(row[5]) if row[5] is not None else None,
        )

    def holder(self, pid: int) -> str:
        """Who a backend is, for a log line about the process holding the slot: its application,
        client address and start time, as far as this role may see them."""
        try:
            row = self._command(
                "SELECT coalesce(nullif(application_name, ''), '?'), coalesce(host(client_addr), 'local'), "
                f"to_char(backend_start, 'YYYY-MM-DD HH24:MI:SS TZ') FROM pg_stat_activity WHERE pid = {int(pid)}"
            ).fetchone()
        except CdcError:
            row = None
        if row is None:
            return f"pid {pid}"
        return f"pid {pid} ({row[0]} from {row[1]}, connected {row[2]})"

    def create_slot(self, *, export_snapshot: bool = False) -> CreatedSlot:
        """Create the slot. With `export_snapshot`, also a snapshot that sees exactly the
        transactions committed before the slot's first position: valid until the next command
        on this connection, so read it before calling `start`."""
        snap = "EXPORT_SNAPSHOT" if export_snapshot else "NOEXPORT_SNAPSHOT"
        if self.failover:
            # The option list form (PostgreSQL 15+); FAILOVER itself is 17+.
            snap = f"(SNAPSHOT '{'export' if export_snapshot else 'nothing'}', FAILOVER true)"
        cur = self._command(f"CREATE_REPLICATION_SLOT {quote_ident(self.slot)} LOGICAL {self.plugin} {snap}")
        row = cur.fetchone()
        assert row is not None
        log.info("created slot %s at %s", self.slot, row[1])
        return CreatedSlot(Lsn.parse(row[1]), row[2])

    def drop_slot(self) -> None:
        self._command(f"DROP_REPLICATION_SLOT {quote_ident(self.slot)}")

    def start(self, start_lsn: Lsn, options: Mapping[str, str]) -> None:
        opts = ", ".join(f"{quote_ident(k)} {quote_literal(v)}" for k, v in options.items())
        self._command(f"START_REPLICATION SLOT {quote_ident(self.slot)} LOGICAL {start_lsn} ({opts})")
        assert self.conn is not None
        self.pgconn = self.conn.pgconn
        self.flushed = max(self.flushed, start_lsn)
        self.streaming = True
        self.last_status_at = time.monotonic()
        self._keepalive = threading.Thread(target=self._keep_alive, name="cdc-keepalive", daemon=True)
        self._keepalive.start()

    def _keep_alive(self) -> None:
        """While the caller is away from `read()` (a slow handler), keep the walsender from
        timing out. Any error ends the thread: the next `read()` reports the lost connection."""
        while self.streaming and self.pgconn is not None:
            time.sleep(0.25)
            if time.monotonic() - self.last_status_at < self.keepalive_interval:
                continue
            if not self._io.acquire(blocking=False):
                continue
            try:
                if self.streaming and self.pgconn is not None:
                    self.send_status()
            except Exception:
                return
            finally:
                self._io.release()

    def _command(self, command: str) -> psycopg.Cursor:
        conn = self.conn
        if conn is None:  # closed: by the sink releasing it (Consumer.release_stream), or stopping
            raise ConnectionLostError("replication connection closed")
        try:
            return conn.execute(command.encode())
        except psycopg.Error as err:
            raise self._translate(err) from None

    def _translate(self, err: psycopg.Error) -> Exception:
        state = getattr(err, "sqlstate", None)
        text = (str(err).strip().splitlines() or [""])[0]
        slot = self.slot
        if state == "55006":
            return SlotInUseError(
                f"slot {slot!r} is in use by another process ({text}): stop the other consumer, "
                "or run this one as a standby (--standby) or with another --slot"
            )
        if state == "55000" and "wal_level" in text:
            return WalLevelError(
                "wal_level is not 'logical': set wal_level = logical in postgresql.conf and restart "
                "the server (or use --mode poll)"
            )
        if state == "55000" and ("invalidated" in text or "can no longer get changes" in text):
            return SlotLostError(f"slot {slot!r} was invalidated ({text}): it must be recreated")
        if state == "58P01" or self.plugin in text and "No such file" in text:
            return PluginMissingError(
                f"the {self.plugin} output plugin is not installed on the server: "
                "apt-get install postgresql-<major>-wal2json, or use --plugin pgoutput (built in) or --mode poll"
            )
        if state == "42501" and "output plugin" in text:
            return PluginNotAllowedError(
                f"the server does not allow {self.plugin}: add it to output_plugin_libraries "
                "(e.g. output_plugin_libraries = 'pgoutput, test_decoding, wal2json') and reload, "
                "or use --plugin pgoutput (always allowed)"
            )
        if self.failover and "failover" in text.lower():  # 15, 16: XX000 "unrecognized option: failover"
            return SetupError(f"this server cannot make failover slots ({text}): --failover-slot needs PostgreSQL 17 or later")
        if state == "42704":
            return SlotLostError(f"slot {slot!r} does not exist ({text})")
        if state == "42710":
            # Another consumer created it between our look and our create: it is theirs now.
            return SlotInUseError(
                f"slot {slot!r} was just created by another process: stop the other consumer, "
                "or run this one as a standby (--standby) or with another --slot"
            )
        if state is None or isinstance(err, psycopg.OperationalError):
            return ConnectionLostError(f"replication connection lost: {mask(text)}")
        return SetupError(f"replication command failed [{state}]: {mask(text)}")

    # -- streaming --------------------------------------------------------------------------

    def read(self, timeout: float, out: list[memoryview], limit: int = 5000) -> int:
        """Append up to `limit` XLogData messages, whole (header and payload), to `out`,
        waiting up to `timeout` seconds for the first; returns how many were added. Drains
        what libpq has buffered before touching the socket: one syscall serves many messages.
        Headers are read once per batch, not per message: the hot path only appends."""
        with self._io:
            return self._read(timeout, out, limit)

    def _read(self, timeout: float, out: list[memoryview], limit: int) -> int:
        pgconn = self.pgconn
        if pgconn is None:
            raise ConnectionLostError("replication connection closed (released by the sink, or stopping)")
        get = pgconn.get_copy_data
        append = out.append
        added = 0
        consumed = False
        last = None
        self.timed_out = False
        try:
            while added < limit:
                nbytes, buf = get(1)
                if nbytes > 0:
                    consumed = False
                    kind = buf[0]
                    if kind == _XLOGDATA:
                        append(buf)
                        added += 1
                        last = buf
                    elif kind == _KEEPALIVE:
                        wal_end, _, reply = _K_BODY.unpack_from(buf, 1)
                        if wal_end > self.server_wal_end:
                            self.server_wal_end = Lsn(wal_end)
                        if reply:
                            self.send_status()
                            self.reply_requested = True
                            if not added:
                                # Let the caller see the new server position at once: idle, it
                                # may acknowledge it (a shutting-down walsender asks again and
                                # again until the client confirms everything it sent).
                                break
                elif nbytes == 0:
                    if not consumed:
                        pgconn.consume_input()  # non-blocking: whatever the socket holds now
                        consumed = True
                    elif added or timeout <= 0:
                        break
                    else:
                        if not select.select([pgconn.socket], [], [], timeout)[0]:
                            self.timed_out = True
                            break
                        timeout = 0
                        consumed = False
                else:
                    raise self._ended()
        except psycopg.Error as err:
            raise self._lost(str(err)) from None
        if last is not None:
            start, wal_end, _ = _W_HEADER.unpack_from(last, 1)
            if start > self.received:
                self.received = Lsn(start)
            if wal_end > self.server_wal_end:
                self.server_wal_end = Lsn(wal_end)
        return added

    def send_status(self, *, reply: bool = False) -> None:
        """Tell the server what we received and what is durably handled (`flushed`)."""
        pgconn = self.pgconn
        if pgconn is None or not self.streaming:
            return
        msg = _STATUS.pack(b"r", max(self.received, self.flushed), self.flushed, self.flushed,
                           now_pg_us(), 1 if reply else 0)
        with self._io:
            try:
                pgconn.put_copy_data(msg)
                while pgconn.flush() == 1:
                    select.select([], [pgconn.socket], [], 1.0)
            except psycopg.Error as err:
                raise self._lost(str(err)) from None
        self.last_status_at = time.monotonic()

    def acknowledge(self, lsn: Lsn) -> None:
        """Report `lsn` as flushed: everything before it is durably handled. Never moves back."""
        if lsn > self.flushed:
            self.flushed = lsn
            self.send_status()

    def _lost(self, text: str) -> ConnectionLostError:
        self.streaming = False
        return ConnectionLostError(f"replication connection lost: {mask(text.strip().splitlines()[0] if text.strip() else 'closed')}")

    def _ended(self) -> Exception:
        """The server ended the COPY: find out why."""
        self.streaming = False
        pgconn = self.pgconn
        assert pgconn is not None
        text = "the server ended the stream"
        state = None
        while True:
            res = pgconn.get_result()
            if res is None:
                break
            if res.status == pq.ExecStatus.FATAL_ERROR:
                text = (res.error_message or b"").decode(errors="replace").strip()
                state = (res.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode() or None
        if state == "55000" and ("invalidated" in text or "can no longer" in text):
            return SlotLostError(f"slot {self.slot!r} was invalidated while streaming: {text}")
        if state == "42704":
            return SlotLostError(f"slot {self.slot!r} was dropped while streaming: {text}")
        return ConnectionLostError(f"replication stream ended: {mask(text) or 'closed'}")

    def close(self) -> None:
        """End the stream politely (the server logs no error), then close the connection."""
        with self._io:  # the keepalive thread sees pgconn None and ends
            conn, pgconn = self.conn, self.pgconn
            self.conn = self.pgconn = None
        if conn is None:
            return
        try:
            if pgconn is not None and self.streaming:
                self.streaming = False
                pgconn.put_copy_end(None)
                pgconn.flush()
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    nbytes, _ = pgconn.get_copy_data(1)
                    if nbytes == -1:
                        break
                    if nbytes == 0:
                        select.select([pgconn.socket], [], [], 0.1)
                        pgconn.consume_input()
                while pgconn.get_result() is not None:
                    pass
        except (psycopg.Error, OSError):
            pass
        finally:
            try:
                conn.close()
            except psycopg.Error:
                pass
