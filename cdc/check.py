"""Preflight: can this server, this role and this table feed `cdc run`? One line a check.

Every check reads the catalogs, except the wal2json one, which creates and drops a temporary
slot: the only way to prove the plugin both loads and is allowed (output_plugin_libraries on
PostgreSQL 15.19+/16.15+/17.11+/18.6+) is to ask the server to use it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from .connection import connect, mask
from .errors import CdcError
from .grants import missing, quote_ident
from .progress import size_text as _size
from .store import DEFAULT_TABLE, EventTable, table_oid

DROP_LOST_SLOT = "drop it: cdc will recreate it and replay from the poller"

# Creating a logical slot waits for every running transaction that has an xid: a forgotten
# `BEGIN; INSERT ...` in some psql would hang the preflight. Give up after this long instead.
SLOT_TEST_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome. `fix` says what to do when `ok` is False.

    `skipped`: the check could not run because another one failed (that one carries the fix);
    a skipped check is `ok`, so one cause fails the run once.
    """

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    skipped: bool = False


def _ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, True, detail)


def _fail(name: str, detail: str, fix: str | None) -> CheckResult:
    return CheckResult(name, False, detail, fix)


def _skip(name: str, detail: str) -> CheckResult:
    return CheckResult(name, True, detail, skipped=True)


def sink_check(settings: Any) -> CheckResult:
    """The nats sink: NATS answers, and the JetStream stream is there and can serve, or will be
    made by `cdc run`. Never creates anything."""
    from .jetstream import probe, target_of

    try:
        target = target_of(settings)
    except CdcError as err:
        return _fail("sink", str(err), None)
    ok, detail, fix = probe(target)
    return _ok("sink", detail) if ok else _fail("sink", detail, fix)


def format_results(results: list[CheckResult]) -> str:
    """One line a check: ``OK   wal_level: logical`` / ``FAIL wal2json: ... — fix: ...``."""
    lines = []
    for r in results:
        label = "SKIP" if r.skipped else "OK" if r.ok else "FAIL"
        line = f"{label:<4} {r.name}: {r.detail}"
        if not r.ok and r.fix:
            line += f" — fix: {r.fix}"
        lines.append(line)
    return "\n".join(lines)


def main_check(dsn: str, slot: str = "cdc", table: EventTable = DEFAULT_TABLE,
               features: tuple[str, ...] = ("run",), plugin: str | None = None, publication: str | None = None,
               sink_settings: Any = None) -> int:
    """Run the checks, print them to stdout; 0 when all pass, 1 otherwise."""
    results = run_checks(dsn, slot=slot, table=table, features=features, plugin=plugin, publication=publication)
    sink = getattr(sink_settings, "sink", None) or ""
    if sink.startswith(("nats://", "tls://")):
        results.append(sink_check(sink_settings))
    print(format_results(results), flush=True)
    return 0 if all(r.ok for r in results) else 1


def run_checks(dsn: str, *, slot: str = "cdc", table: EventTable = DEFAULT_TABLE,
               features: tuple[str, ...] = ("run",), plugin: str | None = None,
               publication: str | None = None) -> list[CheckResult]:
    """Every check, in the order a user would fix them. Stops after `server` if it fails."""
    try:
        conn = connect(dsn, autocommit=True)
    except CdcError as err:
        return [_fail("server", str(err), "check --dsn / CDC_DSN and that the server runs and accepts the login")]
    with conn:
        ctx = _Context(conn, slot, table, features, plugin, publication)
        results = [ctx.server()]
        for name, check in ctx.checks():
            try:
                results.append(check())
            except psycopg.Error as err:
                # A check the role may not run (a catalog it cannot read, ...) is a finding too.
                text = mask((str(err).strip().splitlines() or [type(err).__name__])[0])
                results.append(_fail(name, f"could not check: {text}", None))
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.rollback()
        return results


class _Context:
    """The checks over one connection, sharing what they learn (version, superuser, ...)."""

    def __init__(self, conn: psycopg.Connection, slot: str, table: EventTable, features: tuple[str, ...] = ("run",),
                 plugin: str | None = None, publication: str | None = None):
        from .decoders import publication_name, resolve_plugin

        self.conn = conn
        self.plugin = resolve_plugin(plugin)
        self.publication = publication or publication_name(table)
        self.features = features
        self.slot = slot
        self.table = table
        self.major = 0
        self.user = ""
        self.superuser = False
        self.may_replicate = False
        self.wal_level = ""
        self.table_oid: int | None = None

    def _one(self, query: str | sql.SQL | sql.Composed, params: tuple[object, ...] = ()) -> tuple[object, ...] | None:
        return self.conn.execute(query, params).fetchone()

    def checks(self) -> list[tuple[str, Callable[[], CheckResult]]]:
        """The checks after `server`, by the name their result carries."""
        return [("standby", self.standby), ("wal_level", self.wal_level_check),
                ("replication_privilege", self.replication_privilege),
                *([("wal2json", self.wal2json)] if self.plugin == "wal2json" else [("publication", self.publication_check)]),
                ("slot", self.slot_state), ("events_table", self.events_table),
                ("select_privilege", self.select_privilege), ("events_seq", self.events_seq),
                ("bookkeeping", self.bookkeeping), ("grants", self.grants),
                ("inactive_slots", self.inactive_slots)]

    def server(self) -> CheckResult:
        row = self._one(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int, "
            "current_user, current_database(), r.rolsuper, r.rolreplication "
            "FROM pg_roles r WHERE r.rolname = current_user"
        )
        assert row is not None
        version, num, user, db, super_, repl = row
        self.user = str(user)
        self.major = int(num) // 10000  # type: ignore[call-overload]
        self.superuser = bool(super_)
        self.may_replicate = bool(super_ or repl)
        return _ok("server", f"PostgreSQL {str(version).split()[0]}, database {db}, user {self.user}")

    def standby(self) -> CheckResult:
        row = self._one("SELECT pg_is_in_recovery()")
        if row and row[0]:
            return _fail("standby", "the server is a hot standby (in recovery)",
                         f"point --dsn at the primary: PostgreSQL {self.major} cannot decode on a standby")
        return _ok("standby", "no: the server is a primary")

    def wal_level_check(self) -> CheckResult:
        row = self._one("SELECT current_setting('wal_level')")
        self.wal_level = str(row[0]) if row else ""
        if self.wal_level == "logical":
            return _ok("wal_level", "logical")
        return _fail("wal_level", f"{self.wal_level} (logical decoding needs logical)",
                     "ALTER SYSTEM SET wal_level = logical, then restart the server (or use --mode poll)")

    def replication_privilege(self) -> CheckResult:
        if self.superuser:
            return _ok("replication_privilege", f"{self.user} is a superuser")
        if self.may_replicate:
            return _ok("replication_privilege", f"{self.user} has REPLICATION")
        return _fail("replication_privilege", f"{self.user} has neither REPLICATION nor superuser",
                     f"ALTER ROLE {quote_ident(self.user)} REPLICATION "
                     "(as a superuser), or use --mode poll")

    def wal2json(self) -> CheckResult:
        install = f"apt-get install postgresql-{self.major}-wal2json (or use --mode poll)"
        allow = ("add wal2json to output_plugin_libraries, e.g. ALTER SYSTEM SET output_plugin_libraries = "
                 "'pgoutput, test_decoding, wal2json', then reload the server")
        # The allow-list can be read whatever the role and wal_level: say so even when the slot
        # test below cannot run.
        listed = self._one("SELECT setting FROM pg_settings WHERE name = 'output_plugin_libraries'")
        if listed is not None and "wal2json" not in {p.strip() for p in str(listed[0]).split(",")}:
            return _fail("wal2json", f"not allowed by output_plugin_libraries ({listed[0]!r})", allow)
        if self.wal_level != "logical":
            return _skip("wal2json", "not tested: a slot needs wal_level = logical (see wal_level)")
        if not self.may_replicate:
            return _skip("wal2json", "not tested: the role may not create slots (see replication_privilege)")
        name = f"cdc_check_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        conn = self.conn
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL statement_timeout = {SLOT_TEST_TIMEOUT_MS}")
                conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json', temporary => true)", (name,))
                conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
        except psycopg.Error as err:
            state = err.sqlstate
            text = (str(err).strip().splitlines() or [""])[0]
            if state == "58P01" or "No such file" in text:
                return _fail("wal2json", "not installed", install)
            if state == "42501" and "output plugin" in text:
                return _fail("wal2json", f"not allowed: {text}", allow)
            if state == "55000" and "wal_level" in text:
                return _skip("wal2json", "not tested: a slot needs wal_level = logical (see wal_level)")
            if state == "53400":
                return _fail("wal2json", f"not tested: {text}",
                             "raise max_replication_slots (restart) or drop an unused slot")
            if state == "57014":
                return _fail("wal2json", "not tested: creating a slot waits for a long-running transaction",
                             "find it in pg_stat_activity (xact_start) and end it, then check again")
            return _fail("wal2json", f"a test slot could not be created [{state}]: {mask(text)}", None)
        return _ok("wal2json", "installed and allowed (a test slot was created and dropped)")

    def publication_check(self) -> CheckResult:
        """pgoutput is built in and always allowed: what it needs is our publication."""
        from .store import publication_problem

        problem = publication_problem(self.conn, self.table, self.publication)
        if problem is not None:
            what, fix = problem
            return _fail("publication", what, fix if self.table != DEFAULT_TABLE or "CREATE" not in fix
                         else f"cdc setup, or {fix}")
        others = self.conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s "
            "AND (schemaname, tablename) <> (%s, %s) ORDER BY 1", (self.publication, self.table.schema,
                                                                 self.table.name)).fetchall()
        if others:
            shown = ", ".join(str(r[0]) for r in others[:5]) + (", ..." if len(others) > 5 else "")
            return _fail("publication", f"{self.publication} also publishes {len(others)} other tables ({shown}): "
                         "the stream would decode and skip their changes",
                         f"a publication of {self.table.qualified} alone (--publication NAME), e.g. "
                         f"CREATE PUBLICATION cdc_only FOR TABLE {self.table.qualified} WITH (publish = 'insert, truncate')")
        return _ok("publication", f"{self.publication} publishes inserts and truncates of {self.table.qualified} "
                   "(pgoutput is built in and always allowed)")

    def slot_state(self) -> CheckResult:
        row = self._one(
            "SELECT plugin, slot_type, database, active_pid, wal_status, "
            "(pg_current_wal_lsn() - restart_lsn)::bigint, current_database() "
            "FROM pg_replication_slots WHERE slot_name = %s",
            (self.slot,),
        )
        name = f"slot {self.slot}"
        if row is None:
            return _ok("slot", f"{name} does not exist yet: `cdc run` creates it")
        plugin, kind, database, pid, wal_status, retained, here = row
        drop = "SELECT pg_drop_replication_slot('{}')".format(self.slot.replace("'", "''"))
        if kind != "logical" or plugin != self.plugin:
            return _fail("slot", f"{name} exists but is a {kind} slot of plugin {plugin}, not {self.plugin}",
                         f"use --plugin {plugin}, another --slot, or {drop} if it is not used" if kind == "logical"
                         else f"use another --slot, or {drop} if it is not used")
        if database != here:
            return _fail("slot", f"{name} belongs to database {database}, not {here}",
                         "use another --slot for this database")
        parts = [f"{name} exists", f"active pid {pid}" if pid else "inactive",
                 f"wal_status {wal_status}"]
        owner = _slot_owners(self.conn).get(self.slot)
        if owner is not None:
            parts.append(f"recorded by consumer {owner}")
        if retained is not None:
            parts.append(f"retains {_size(int(retained))} of WAL")  # type: ignore[call-overload]
        detail = ", ".join(parts)
        if wal_status == "lost":
            return _fail("slot", detail, f"{DROP_LOST_SLOT} ({drop})")
        return _ok("slot", detail)

    def events_table(self) -> CheckResult:
        t = self.table
        missing_fix = "cdc setup" if t == DEFAULT_TABLE else "check --dsn (the right database?), --preset and --table"
        oid = table_oid(self.conn, t)
        if oid is None:
            from .presets import candidates_hint

            return _fail("events_table", f"{t.qualified} does not exist", candidates_hint(self.conn, t) or missing_fix)
        self.table_oid = oid
        columns: dict[str, str] = dict(self.conn.execute(
            "SELECT attname, atttypid::regtype::text FROM pg_attribute "
            "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
            (self.table_oid,),
        ).fetchall())
        problems = []
        for field, column in _mapped_columns(t):
            if column not in columns:
                problems.append(f"column {column} missing")
                continue
            accepted = _accepted_types(t, field, column)
            if columns[column] not in accepted:
                problems.append(f"{column} is {columns[column]}, expected {' or '.join(sorted(accepted))}")
        if t.strict:
            known = {c for _, c in _mapped_columns(t)}
            extra = sorted(set(columns) - known)
            if extra:
                problems.append(f"unmapped columns {', '.join(extra)} (the stream stops on them)")
        if problems:
            fix = ("restore the table as `cdc setup` creates it, or map it (--preset, --table, --*-column)"
                   if t.strict else "map the table's columns (--*-column, NONE for one it lacks; --data-encoding)")
            return _fail("events_table", f"{t.qualified}: {'; '.join(problems)}", fix)
        return _ok("events_table", f"{t.qualified} has the expected columns")

    def select_privilege(self) -> CheckResult:
        if self.table_oid is None:
            return _skip("select_privilege", "not tested: no events table (see events_table)")
        t = self.table
        row = self._one("SELECT has_schema_privilege(%s, 'USAGE'), has_table_privilege(%s, 'SELECT')",
                        (t.schema, self.table_oid))
        usage, select = row if row else (False, False)
        if usage and select:
            return _ok("select_privilege", f"{self.user} may read {t.qualified}")
        user = quote_ident(self.user)
        grants = ([] if select else [f"GRANT SELECT ON {t.qualified} TO {user}"]) + \
                 ([] if usage else [f"GRANT USAGE ON SCHEMA {t.schema} TO {user}"])
        return _fail("select_privilege", f"{self.user} may not read {t.qualified}", "; ".join(grants))

    def events_seq(self) -> CheckResult:
        if self.table_oid is None:
            return _skip("events_seq", "not tested: no events table (see events_table)")
        t = self.table
        # The sequence the column's default calls (serial, or nextval(...) by hand), or its
        # identity sequence, read from pg_depend: name lookups would need USAGE on the schema.
        # Else a sequence OWNED BY the column (deptype 'a'): Marten's mt_events has no default,
        # its append function inserts nextval('mt_events_sequence') taken in the same transaction.
        row = self._one(
            """
            SELECT s.oid::regclass::text, q.seqcache, d.deptype = 'a'
            FROM pg_attribute a
            JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND (
                 (d.classid = 'pg_attrdef'::regclass AND d.objid = (
                      SELECT oid FROM pg_attrdef WHERE adrelid = a.attrelid AND adnum = a.attnum))
              OR (d.classid = 'pg_class'::regclass AND d.deptype IN ('i', 'a')
                  AND d.refobjid = a.attrelid AND d.refobjsubid = a.attnum))
            JOIN pg_class s ON s.oid = CASE WHEN d.classid = 'pg_attrdef'::regclass THEN d.refobjid ELSE d.objid END
                           AND s.relkind = 'S'
            JOIN pg_sequence q ON q.seqrelid = s.oid
            WHERE a.attrelid = %s AND a.attname = %s
            ORDER BY d.deptype = 'a'
            LIMIT 1
            """,
            (self.table_oid, t.seq),
        )
        sequence, cache = (str(row[0]), int(row[1])) if row else (None, 0)  # type: ignore[call-overload]
        owned_only = bool(row[2]) if row else False
        if sequence is None:
            return _fail("events_seq", f"{t.qualified}.{t.seq} is not filled from a sequence",
                         f"give {t.seq} a CACHE 1 sequence default (as `cdc setup` creates it): "
                         "the poller proves holes dead only with one")
        if cache != 1:
            return _fail("events_seq", f"{sequence} has CACHE {cache}: a session could use a cached seq "
                         "long after later ones committed, and the poller would skip it",
                         f"ALTER SEQUENCE {sequence} CACHE 1")
        if owned_only:
            return _ok("events_seq", f"{t.seq} is filled from {sequence} (OWNED BY, no default), CACHE 1: "
                       "writers must take nextval in the inserting transaction, as Marten does")
        return _ok("events_seq", f"{t.seq} comes from {sequence}, CACHE 1")

    def bookkeeping(self) -> CheckResult:
        # Where consumers keep their positions. For cdc.events, events_table already says
        # `cdc setup`; a mapped table exists without it.
        row = self._one("SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = 'cdc' AND c.relname = 'checkpoints')")
        if row and row[0]:
            return _ok("bookkeeping", "cdc.checkpoints exists")
        if self.table == DEFAULT_TABLE and self.table_oid is None:
            return _skip("bookkeeping", "not tested: the cdc schema is missing (see events_table)")
        mapped = "" if self.table == DEFAULT_TABLE else f"; {self.table.qualified} is left as it is"
        return _fail("bookkeeping", "cdc.checkpoints does not exist (consumers keep their positions there)",
                     f"cdc setup (creates the cdc schema{mapped})")


    def inactive_slots(self) -> CheckResult:
        """Logical slots of the run's plugin nobody reads now: each holds WAL on the server until it is
        read or dropped. Informational (a consumer between runs has one too), so always OK; a
        slot no consumer's checkpoint records is most likely left over."""
        rows = self.conn.execute(
            "SELECT slot_name, (pg_current_wal_lsn() - restart_lsn)::bigint, wal_status "
            "FROM pg_replication_slots WHERE slot_type = 'logical' AND plugin = %s "
            "AND database = current_database() AND active_pid IS NULL AND NOT temporary ORDER BY slot_name",
            (self.plugin,)).fetchall()
        if not rows:
            return _ok("inactive_slots", f"none: every {self.plugin} slot in this database is being read")
        owners = _slot_owners(self.conn)
        parts = []
        for name, retained, wal_status in rows:
            owner = owners.get(name)
            who = f"consumer {owner}" if owner else "no consumer records it"
            held = _size(int(retained)) if retained is not None else "no"
            drop = "SELECT pg_drop_replication_slot('{}')".format(str(name).replace("'", "''"))
            parts.append(f"{name} ({who}, retains {held} of WAL, wal_status {wal_status}; drop: {drop})")
        return _ok("inactive_slots", f"{len(rows)} not being read, holding WAL until read or dropped: "
                   + "; ".join(parts))

    def grants(self) -> CheckResult:
        """Every grant the features need (see grants.py), so that passing here means `cdc run`
        with the same settings does not fail on a privilege."""
        what = ", ".join(self.features)
        if self.superuser:
            return _ok("grants", f"{self.user} is superuser: every grant for {what}")
        lacking = missing(self.conn, self.user, self.features, self.table)
        if not lacking:
            return _ok("grants", f"{self.user} has every grant for {what}")
        return _fail("grants", f"{self.user} lacks {len(lacking)} grant{'s' if len(lacking) > 1 else ''} for {what}",
                     "as the owner run " + " ".join(lacking) + f" (or `cdc setup --grant {self.user}`)")


# Types each field may have. The stream and the poller both read these as text or numbers.
_TYPES: dict[str, set[str]] = {
    "seq": {"bigint", "integer"},
    "stream_id": {"text", "character varying", "character", "uuid", "bigint", "integer"},
    "version": {"bigint", "integer", "smallint", "numeric"},
    "type": {"text", "character varying", "character"},
    "created_at": {"timestamp with time zone", "timestamp without time zone"},
    "xid": {"xid8", "xid", "bigint"},
}
_PAYLOAD_TYPES = {
    "jsonb": {"jsonb", "json"},
    "bytea": {"bytea"},
    "text": {"text", "character varying"},
}




def _slot_owners(conn: psycopg.Connection) -> dict[str, str]:
    """slot -> the consumer whose checkpoint records it, where cdc.checkpoints can be read."""
    try:
        with conn.transaction():
            rows = conn.execute("SELECT slot, consumer FROM cdc.checkpoints WHERE slot IS NOT NULL").fetchall()
    except psycopg.Error:  # no cdc setup yet, an old schema, or no SELECT on it
        return {}
    return {str(slot): str(consumer) for slot, consumer in rows}


def _mapped_columns(t: EventTable) -> list[tuple[str, str]]:
    """(field, column) for every field the mapping names."""
    fields = ("seq", "stream_id", "version", "type", "data", "metadata", "created_at", "xid")
    return [(f, getattr(t, f)) for f in fields if getattr(t, f)]


def _accepted_types(t: EventTable, field: str, column: str) -> set[str]:
    if field in ("data", "metadata"):
        return _PAYLOAD_TYPES.get(t.payload_encoding.get(column, "jsonb"), {"jsonb", "json"})
    return _TYPES[field]
