"""`cdc status`: every consumer as the database knows it, for an operator who did not start them.

Read only, from the catalogs and the cdc schema: a consumer's checkpoint, its slot (active,
retained WAL, lag), how many events it is behind, when it last delivered, whether it records its
deliveries (and so can be reconciled), and the table mapping it ran with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql

from .checkpoint import saved_mapping
from .progress import size_text
from .store import DEFAULT_TABLE, table_oid


@dataclass(frozen=True)
class ConsumerStatus:
    consumer: str
    checkpoint_lsn: str | None
    checkpoint_seq: int
    checkpoint_at: datetime | None
    slot: str | None
    slot_exists: bool
    slot_active_pid: int | None
    slot_wal_status: str | None
    retained_wal_bytes: int | None
    lag_bytes: int | None
    events_behind: int | None  # events in its table above the checkpoint (None: table unreadable)
    last_delivery_at: datetime | None  # the last recorded delivery, when it records
    records_deliveries: bool  # it has a delivery record and does not run unrecorded now
    recorded_runs: int
    table: str
    mapping: dict[str, Any] | None
    slot_plugin: str | None = None  # wal2json or pgoutput: the plugin that made the slot (and reads it)

    def to_json(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(self).items()}

    def line(self) -> str:
        if self.slot is None:
            slot = "no slot (poll only so far)"
        elif not self.slot_exists:
            slot = f"slot {self.slot} missing (the next run hands over anew)"
        else:
            state = f"active pid {self.slot_active_pid}" if self.slot_active_pid else "inactive"
            slot = (f"slot {self.slot} ({self.slot_plugin}) {state}, {self.slot_wal_status}, "
                    f"retains {_size(self.retained_wal_bytes)}")
            if self.lag_bytes is not None:
                slot += f", lag {_size(self.lag_bytes)}"
        behind = "?" if self.events_behind is None else f"{self.events_behind:,}"
        at = self.checkpoint_at.strftime("%Y-%m-%d %H:%M:%S") if self.checkpoint_at else "never"
        rec = (f"records deliveries ({self.recorded_runs} run{'s' if self.recorded_runs != 1 else ''}"
               + (f", last {self.last_delivery_at:%Y-%m-%d %H:%M:%S}" if self.last_delivery_at else "") + ")"
               if self.records_deliveries else
               "does not record deliveries now" + (f" ({self.recorded_runs} recorded runs before)"
                                                    if self.recorded_runs else " (reconcile cannot check it)"))
        return (f"{self.consumer}: checkpoint {self.checkpoint_lsn or 'none'} / seq {self.checkpoint_seq} "
                f"(saved {at}); {slot}; {behind} events behind in {self.table}; {rec}")


def consumers(conn: psycopg.Connection, only: str | None = None) -> list[ConsumerStatus]:
    rows = conn.execute(
        "SELECT c.consumer, c.lsn::text, c.seq, c.seqs_above, c.updated_at, c.slot, c.mapping, c.unrecorded, "
        " s.slot_name IS NOT NULL, s.active_pid, s.wal_status, "
        " (CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END - s.restart_lsn)::bigint, "
        " (CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END - s.confirmed_flush_lsn)::bigint, "
        " s.plugin "
        "FROM cdc.checkpoints c LEFT JOIN pg_replication_slots s ON s.slot_name = c.slot "
        "WHERE %(only)s::text IS NULL OR c.consumer = %(only)s ORDER BY c.consumer", {"only": only}).fetchall()
    out = []
    for (name, lsn, seq, above, at, slot, mapping, unrecorded, exists, pid, wal_status, retained, lag, plugin) in rows:
        table = saved_mapping(conn, name) or DEFAULT_TABLE
        runs, last = _record(conn, name)
        open_window = bool(unrecorded) and "to_seq" not in unrecorded[-1]
        out.append(ConsumerStatus(
            name, lsn, int(seq), at, slot, bool(exists), pid, wal_status,
            int(retained) if retained is not None else None, max(int(lag), 0) if lag is not None else None,
            _behind(conn, table, int(seq), len(above or ())), last, runs > 0 and not open_window, runs,
            table.qualified, mapping, plugin))
    return out


def _record(conn: psycopg.Connection, consumer: str) -> tuple[int, datetime | None]:
    try:
        with conn.transaction():
            row = conn.execute(
                "SELECT (SELECT count(*) FROM cdc.delivery_runs WHERE consumer = %(c)s), "
                "(SELECT max(delivered_at) FROM cdc.deliveries WHERE consumer = %(c)s)", {"c": consumer}).fetchone()
    except psycopg.Error:  # no grant on the delivery record: say nothing rather than guess
        return 0, None
    return (int(row[0]), row[1]) if row else (0, None)


def _behind(conn: psycopg.Connection, table: Any, seq: int, above: int) -> int | None:
    if table_oid(conn, table) is None:
        return None
    try:
        with conn.transaction():
            row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} > %s").format(
                table.ident(), sql.Identifier(table.seq)), (seq,)).fetchone()
    except psycopg.Error:
        return None
    return max(int(row[0]) - above, 0) if row else None


def run_cli(dsn: str, *, as_json: bool, consumer: str | None = None) -> tuple[int, str]:
    """(exit code, output): 0 with a line (or a JSON document) a consumer; 2 when there is
    nothing to show (no cdc setup, or no such consumer), with one line saying so."""
    from .connection import connect
    from .errors import ConfigError

    with connect(dsn, autocommit=True) as conn:
        try:
            found = consumers(conn, consumer)
        except psycopg.errors.UndefinedTable:
            raise ConfigError("no cdc.checkpoints here: run `cdc setup` (and a consumer) first") from None
        except psycopg.errors.UndefinedColumn:
            raise ConfigError("cdc.checkpoints is from an earlier cdc: run `cdc setup` as the owner of schema cdc "
                           "to upgrade it") from None
    if consumer is not None and not found:
        raise ConfigError(f"no consumer {consumer!r} in cdc.checkpoints (cdc status without --consumer lists them)")
    if as_json:
        return 0, orjson.dumps({"consumers": [c.to_json() for c in found]}).decode() + "\n"
    if not found:
        return 0, "no consumers yet: none has saved a checkpoint\n"
    return 0, "".join(c.line() + "\n" for c in found)


def _size(n: int | None) -> str:
    return "?" if n is None else size_text(n)
