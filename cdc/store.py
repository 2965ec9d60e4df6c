"""The event store: the events table, its sequence, the bookkeeping tables, and appends.

Any client may append with a plain ``INSERT INTO cdc.events(stream_id, version, type, data)``:
`seq` comes from a CACHE 1 sequence, `xid` from the inserting transaction. CACHE 1 matters: a
session caching sequence values could use a number long after a later one committed, and no
check of running transactions could then prove a hole dead (see polling.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from . import jsontext
from .errors import ConcurrencyError, EventsTableMissingError, PublicationError

NOTIFY_CHANNEL = "cdc_events"

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS cdc;
CREATE SEQUENCE IF NOT EXISTS cdc.events_seq AS bigint CACHE 1;
CREATE TABLE IF NOT EXISTS cdc.events (
    seq        bigint      PRIMARY KEY DEFAULT nextval('cdc.events_seq'),
    stream_id  text        NOT NULL,
    version    bigint      NOT NULL,
    type       text        NOT NULL,
    data       jsonb       NOT NULL DEFAULT '{}',
    metadata   jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    -- The inserting transaction, so the poll path can group rows and name transactions too.
    xid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    UNIQUE (stream_id, version)
);
ALTER SEQUENCE cdc.events_seq OWNED BY cdc.events.seq;
-- Where each consumer stands. `lsn`: end of the last transaction handled from the stream.
-- `seq`: every seq at or below it is handled or proven never to commit; `seqs_above`: the
-- handled ones above it (the stream hands over in commit order, not seq order).
CREATE TABLE IF NOT EXISTS cdc.checkpoints (
    consumer   text        PRIMARY KEY,
    lsn        pg_lsn,
    seq        bigint      NOT NULL DEFAULT 0,
    seqs_above bigint[]    NOT NULL DEFAULT '{}',
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- The slot the consumer streams from (another consumer may not read it), and the table mapping
-- it ran with (replay and reconcile use it unless told otherwise): checkpoint.py. Added only
-- where missing, so that a role that does not own the table can run setup again.
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'cdc.checkpoints'::regclass
                   AND attname = 'slot' AND NOT attisdropped) THEN
        ALTER TABLE cdc.checkpoints ADD COLUMN slot text;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'cdc.checkpoints'::regclass
                   AND attname = 'mapping' AND NOT attisdropped) THEN
        ALTER TABLE cdc.checkpoints ADD COLUMN mapping jsonb;
    END IF;
    -- The windows the consumer ran without recording its deliveries: reconcile reports them
    -- as not recorded, never as missing (reconcile.py).
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'cdc.checkpoints'::regclass
                   AND attname = 'unrecorded' AND NOT attisdropped) THEN
        ALTER TABLE cdc.checkpoints ADD COLUMN unrecorded jsonb NOT NULL DEFAULT '[]';
    END IF;
END $$;
-- Transactions a consumer gave up on (poison), kept with the error instead of dropped.
CREATE TABLE IF NOT EXISTS cdc.dead_letters (
    id         bigserial   PRIMARY KEY,
    consumer   text        NOT NULL,
    xid        bigint,
    commit_lsn pg_lsn,
    seqs       bigint[]    NOT NULL,
    records    json        NOT NULL,  -- json, not jsonb: the payloads' exact text
    error      text        NOT NULL,
    attempts   int         NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
DO $$ BEGIN
    IF (SELECT atttypid FROM pg_attribute
        WHERE attrelid = 'cdc.dead_letters'::regclass AND attname = 'records') = 'jsonb'::regtype THEN
        ALTER TABLE cdc.dead_letters ALTER COLUMN records TYPE json USING records::json;
    END IF;
END $$;
-- The compact record of what a consumer was handed, for the reconciler (see reconcile.py).
-- One row an event delivered; `delivery` counts per consumer, in delivery (= commit) order.
CREATE TABLE IF NOT EXISTS cdc.deliveries (
    consumer     text        NOT NULL,
    run          bigint      NOT NULL DEFAULT 0,
    xid          bigint,
    commit_lsn   pg_lsn,
    commit_time  timestamptz,
    source       text        NOT NULL,
    delivery     bigint      NOT NULL,
    seq          bigint      NOT NULL,
    delivered_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE cdc.deliveries ADD COLUMN IF NOT EXISTS run bigint NOT NULL DEFAULT 0;
ALTER TABLE cdc.deliveries ADD COLUMN IF NOT EXISTS commit_time timestamptz;
DROP INDEX IF EXISTS cdc.deliveries_consumer_time;
CREATE INDEX IF NOT EXISTS deliveries_consumer_seq ON cdc.deliveries (consumer, seq);
CREATE INDEX IF NOT EXISTS deliveries_consumer_delivery ON cdc.deliveries (consumer, delivery);
-- One row a consumer process start, with the position it started from: a redelivery in a
-- later run of an event that position already covered is a duplicate, not a crash replay.
CREATE TABLE IF NOT EXISTS cdc.delivery_runs (
    run              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer         text        NOT NULL,
    started_at       timestamptz NOT NULL DEFAULT now(),
    start_lsn        pg_lsn,
    start_seq        bigint      NOT NULL DEFAULT 0,
    start_seqs_above bigint[]    NOT NULL DEFAULT '{}'
);
-- A snapshot and the WAL insert position read after it: every event visible in `snapshot`
-- committed before `wal_lsn`, so once a consumer has acknowledged `wal_lsn` it must have them.
CREATE TABLE IF NOT EXISTS cdc.delivery_fences (
    consumer         text        NOT NULL,
    taken_at         timestamptz NOT NULL DEFAULT now(),
    snapshot         pg_snapshot NOT NULL,
    wal_lsn          pg_lsn      NOT NULL,
    through_delivery bigint
);
CREATE INDEX IF NOT EXISTS delivery_fences_consumer_lsn ON cdc.delivery_fences (consumer, wal_lsn);
-- What prune() removed: a delivery record of a seq at or below `pruned_max_seq` may be gone.
CREATE TABLE IF NOT EXISTS cdc.delivery_horizons (
    consumer       text   PRIMARY KEY,
    pruned_through bigint NOT NULL,
    pruned_max_seq bigint NOT NULL
);
"""


@dataclass(frozen=True)
class EventTable:
    """Where events live and what each column is called.

    A column mapped to None does not exist in the table: the field is left null. The default is
    `cdc.events`; presets for other event stores map their own tables.
    """

    schema: str = "cdc"
    name: str = "events"
    seq: str = "seq"
    stream_id: str = "stream_id"
    version: str | None = "version"
    type: str | None = "type"
    data: str | None = "data"
    metadata: str | None = "metadata"
    created_at: str | None = "created_at"
    xid: str | None = "xid"
    # How a column's value becomes JSON text (see jsontext): "jsonb" (a jsonb or json column:
    # its text), "bytea" (UTF-8 JSON bytes, else their hex as a JSON string), "text" (JSON text,
    # else a JSON string of it). Only data and metadata need it.
    payload_encoding: dict[str, str] = field(default_factory=dict)
    # Stop on columns the mapping does not name (the table was altered). Off for mapped tables
    # of other event stores, which carry columns we do not read.
    strict: bool = True

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    def select_list(self) -> sql.Composable:
        """The columns a reader needs, in Event field order, NULL where a column is missing.
        jsonb payloads as their text: it goes to the sinks as it is, never parsed."""
        parts: list[sql.Composable] = []
        for col in (self.seq, self.stream_id, self.version, self.type, self.data,
                    self.metadata, self.created_at):
            if not col:
                parts.append(sql.SQL("NULL"))
            elif col in (self.data, self.metadata) and self.payload_encoding.get(col, "jsonb") == "jsonb":
                parts.append(sql.SQL("{}::text").format(sql.Identifier(col)))
            else:
                parts.append(sql.Identifier(col))
        # The xid8 as a 32-bit xid, as the stream names transactions.
        parts.append(
            sql.SQL("mod({}::text::numeric, 4294967296)::bigint").format(sql.Identifier(self.xid))
            if self.xid else sql.SQL("NULL::bigint")
        )
        return sql.SQL(", ").join(parts)


DEFAULT_TABLE = EventTable()


def setup(conn_or_pool: psycopg.Connection | ConnectionPool) -> None:
    """Create the schema, the events table and the bookkeeping tables. Idempotent."""
    if isinstance(conn_or_pool, ConnectionPool):
        with conn_or_pool.connection() as conn:
            _setup(conn)
    else:
        _setup(conn_or_pool)


def _setup(conn: psycopg.Connection) -> None:
    with conn.transaction():
        # Two `cdc setup` at once would race on CREATE ... IF NOT EXISTS: serialize them.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('cdc.setup'))")
        conn.execute(SCHEMA_SQL)
        conn.execute(PUBLICATION_SQL)


# The publication pgoutput reads (`--plugin pgoutput`): made by every setup, so a consumer can
# switch plugins without one. Inserts, and truncates so that one stops the feed rather than
# going unseen. A role that may not create publications (they need CREATE on the database) is
# told, not failed: wal2json does not need it.
PUBLICATION_SQL = """
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'cdc_events') THEN
    CREATE PUBLICATION cdc_events FOR TABLE cdc.events WITH (publish = 'insert, truncate');
  END IF;
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'cdc setup: publication cdc_events not created (%): --plugin pgoutput needs it', SQLERRM;
END $$
"""


def create_publication_sql(table: EventTable, name: str) -> sql.Composed:
    return sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert, truncate')").format(
        sql.Identifier(name), table.ident())


def publication_problem(conn: psycopg.Connection, table: EventTable, name: str) -> tuple[str, str] | None:
    """None when publication `name` publishes the table's inserts and truncates; else what is
    wrong and the statement that fixes it."""
    row = conn.execute("SELECT pubinsert, pubtruncate, puballtables FROM pg_publication WHERE pubname = %s",
                       (name,)).fetchone()
    if row is None:
        return (f"publication {name!r} does not exist", create_publication_sql(table, name).as_string(conn))
    pubinsert, pubtruncate, all_tables = row
    if not all_tables and conn.execute(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s AND tablename = %s",
            (name, table.schema, table.name)).fetchone() is None:
        return (f"publication {name!r} does not publish {table.qualified}",
                sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(name), table.ident()).as_string(conn))
    if not (pubinsert and pubtruncate):
        return (f"publication {name!r} does not publish {'inserts' if not pubinsert else 'truncates'}",
                sql.SQL("ALTER PUBLICATION {} SET (publish = 'insert, truncate')").format(
                    sql.Identifier(name)).as_string(conn))
    return None


def ensure_publication(conn: psycopg.Connection, table: EventTable, name: str) -> None:
    """Make sure publication `name` serves the table: made if missing (by a role that may),
    PublicationError with the fixing statement otherwise."""
    problem = publication_problem(conn, table, name)
    if problem is None:
        return
    what, fix = problem
    if fix.startswith("CREATE"):
        try:
            with conn.transaction():
                conn.execute(create_publication_sql(table, name))
            return
        except psycopg.errors.DuplicateObject:
            problem = publication_problem(conn, table, name)  # another process made it just now
            if problem is None:
                return
            what, fix = problem
        except psycopg.Error as err:
            first = (str(err).strip().splitlines() or [""])[0]
            raise PublicationError(f"{what} and this role may not create it ({first}): run `{fix}` as the owner "
                                   f"of {table.qualified} (for cdc.events: cdc setup)") from None
    raise PublicationError(f"{what} (--plugin pgoutput reads it): run `{fix}`")


def require_table(conn: psycopg.Connection, table: EventTable = DEFAULT_TABLE) -> None:
    """Raise EventsTableMissingError unless the events table exists."""
    row = conn.execute("SELECT to_regclass(%s)", (table.qualified,)).fetchone()
    if row is None or row[0] is None:
        from .presets import candidates_hint

        hint = "run `cdc setup`" if table == DEFAULT_TABLE else "check --table / the preset"
        raise EventsTableMissingError(
            f"events table {table.qualified} does not exist: {candidates_hint(conn, table) or hint}")


def table_oid(conn: psycopg.Connection, table: EventTable) -> int | None:
    """The table's oid, from the catalogs rather than to_regclass: a role without USAGE on the
    schema would see no table."""
    row = conn.execute(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')", (table.schema, table.name)).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else None


@dataclass(frozen=True)
class NewEvent:
    """An event to append: its type, data and optional metadata."""

    type: str
    data: Any = None
    metadata: Any = None


def append(
    pool_or_conn: ConnectionPool | psycopg.Connection,
    stream_id: str,
    events: Sequence[NewEvent],
    *,
    expected_version: int | None,
    notify: bool = True,
) -> list[int]:
    """Append `events` to `stream_id` atomically; return their seqs.

    `expected_version` is the version the stream must be at (0 for a new stream); None appends
    whatever the version. A conflict raises ConcurrencyError and writes nothing. With `notify`,
    a NOTIFY wakes pollers at once instead of at their next interval.
    """
    if isinstance(pool_or_conn, ConnectionPool):
        with pool_or_conn.connection() as conn:
            return _append(conn, stream_id, events, expected_version, notify)
    return _append(pool_or_conn, stream_id, events, expected_version, notify)


def _append(
    conn: psycopg.Connection,
    stream_id: str,
    events: Sequence[NewEvent],
    expected_version: int | None,
    notify: bool,
) -> list[int]:
    if not events:
        return []
    try:
        with conn.transaction():
            row = conn.execute(
                "SELECT coalesce(max(version), 0) FROM cdc.events WHERE stream_id = %s",
                (stream_id,),
            ).fetchone()
            current = int(row[0]) if row else 0
            if expected_version is not None and current != expected_version:
                raise ConcurrencyError(stream_id, expected_version, current)
            versions = list(range(current + 1, current + 1 + len(events)))
            rows = conn.execute(
                """
                INSERT INTO cdc.events (stream_id, version, type, data, metadata)
                SELECT %s, v, t, d::jsonb, m::jsonb
                FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[]) AS x(v, t, d, m)
                RETURNING seq
                """,
                (
                    stream_id,
                    versions,
                    [e.type for e in events],
                    [jsontext.dumps(e.data) for e in events],
                    [jsontext.dumps(e.metadata if e.metadata is not None else {}) for e in events],
                ),
            ).fetchall()
            if notify:
                conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, stream_id))
    except psycopg.errors.UniqueViolation:
        # Someone appended to the stream between our read and our insert.
        actual = conn.execute(
            "SELECT coalesce(max(version), 0) FROM cdc.events WHERE stream_id = %s", (stream_id,)
        ).fetchone()
        raise ConcurrencyError(stream_id, expected_version if expected_version is not None else current,
                               int(actual[0]) if actual else 0) from None
    return sorted(int(r[0]) for r in rows)
