"""Other event stores' tables, mapped: Marten's `mt_events`, the eventsourcing library's
`stored_events`, or any table described column by column.

What each preset reads (checked against the libraries' sources):

Marten (.NET), `public.mt_events` (the schema is `StoreOptions.Events.DatabaseSchemaName`):
    seq_id bigint PRIMARY KEY         -> seq. No default: the append function takes
                                         nextval('mt_events_sequence') in the inserting
                                         transaction; the sequence is OWNED BY seq_id, CACHE 1.
    stream_id uuid | varchar          -> stream_id (a uuid as its text)
    version bigint (older: integer)   -> version
    type varchar                      -> type (Marten's event type alias)
    data jsonb                        -> data
    timestamp timestamptz now()       -> created_at
    id, tenant_id, mt_dotnet_type, is_archived, correlation_id, causation_id, headers: not read.
    metadata is null (map --metadata-column headers where Marten's headers are enabled).
    Archiving a stream UPDATEs is_archived: updates are not decoded (actions insert,truncate),
    so archived events stay delivered. A table partitioned on is_archived
    (UseArchivedStreamPartitioning) writes to partitions wal2json names apart: not supported.

eventsourcing (Python), `public.stored_events` (or `<application name>_events`):
    notification_id bigserial          -> seq (CACHE 1; the recorder takes LOCK TABLE ... IN
                                          EXCLUSIVE MODE before inserting, so ids also commit
                                          in order, apart from rolled-back ones)
    originator_id uuid                 -> stream_id (its text)
    originator_version bigint          -> version
    topic text                         -> type
    state bytea                        -> data: the bytes parsed as JSON when they are JSON (the
                                          default transcoder, uncompressed and unencrypted), else
                                          the bytes as a lowercase hex string (no \\x prefix)
    metadata, created_at: null (the table has neither).

Neither table records the inserting transaction, so poll-path transactions carry xid None and
group a page's rows, and the reconciler's fence falls back to the checkpoint. Both presets are
non-strict: columns the mapping does not name are ignored, not a reason to stop.

wal2json 2.5 sends uuid and varchar values as JSON strings, timestamptz as
'2026-11-26 07:11:28.939532+00', and bytea as bare lowercase hex ('7b2278...', no \\x).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import psycopg

from .errors import ConfigError
from .store import DEFAULT_TABLE, EventTable, table_oid

log = logging.getLogger("cdc.presets")

PRESETS = ("cdc", "marten", "eventsourcing")
# The presets whose table find_table looks for when it is not under its default name.
DISCOVERABLE = ("marten", "eventsourcing")

MARTEN = EventTable(
    schema="public", name="mt_events", seq="seq_id", stream_id="stream_id", version="version",
    type="type", data="data", metadata=None, created_at="timestamp", xid=None, strict=False,
)

EVENTSOURCING = EventTable(
    schema="public", name="stored_events", seq="notification_id", stream_id="originator_id",
    version="originator_version", type="topic", data="state", metadata=None, created_at=None,
    xid=None, payload_encoding={"state": "bytea"}, strict=False,
)

_BY_NAME = {"cdc": DEFAULT_TABLE, "marten": MARTEN, "eventsourcing": EVENTSOURCING}

# Column flag/setting name -> EventTable field.
COLUMN_FIELDS = {
    "seq_column": "seq",
    "stream_column": "stream_id",
    "version_column": "version",
    "type_column": "type",
    "data_column": "data",
    "metadata_column": "metadata",
    "time_column": "created_at",
    "xid_column": "xid",
}

# Words that map a column to "absent": the field is left null.
_NONE = ("", "-", "none", "null")

ENCODINGS = ("jsonb", "bytea", "text")


def parse_table_name(text: str) -> tuple[str | None, str]:
    """``schema.name`` -> (schema, name); a bare ``name`` -> (None, name): public. Double
    quotes keep a dot inside a part: ``"my.schema".events``. Names are taken as written (no
    case folding), as they appear in the catalogs and in wal2json's messages."""
    parts: list[str] = []
    current, quoted, i = "", False, 0
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == '"' and text[i + 1:i + 2] == '"':
                current += '"'
                i += 1
            elif ch == '"':
                quoted = False
            else:
                current += ch
        elif ch == '"':
            quoted = True
        elif ch == ".":
            parts.append(current)
            current = ""
        else:
            current += ch
        i += 1
    parts.append(current)
    if quoted or len(parts) > 2 or not all(parts):
        raise ConfigError(f"--table {text!r}: expected SCHEMA.NAME (or NAME, meaning public.NAME)")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def table_for(
    preset: str | None,
    table: str | None = None,
    *,
    data_encoding: str | None = None,
    metadata_encoding: str | None = None,
    strict: bool | None = None,
    **columns: str | None,
) -> EventTable:
    """The EventTable a preset names, with `table` (``SCHEMA.NAME``; ``NAME`` alone is in
    public) and column overrides.

    `columns` take the setting names of COLUMN_FIELDS (``seq_column="id"``); None keeps the
    preset's column, "none" (or "", "-", "null") maps the field to no column (left null; seq
    and stream_id cannot be null). Without a preset, a `table` or a column override maps a
    table of your own: non-strict, payloads jsonb unless `data_encoding`/`metadata_encoding`
    say "bytea" or "text".
    """
    name = preset or "cdc"
    try:
        base = _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}") from None
    unknown = sorted(set(columns) - set(COLUMN_FIELDS))
    if unknown:
        raise ConfigError(f"unknown column setting {', '.join(unknown)}: use {', '.join(COLUMN_FIELDS)}")
    changes: dict[str, object] = {}
    if table:
        schema, rel = parse_table_name(table)
        changes["schema"], changes["name"] = schema or "public", rel
    for setting, value in columns.items():
        if value is None:
            continue
        field = COLUMN_FIELDS[setting]
        if value.strip().lower() in _NONE:
            if field in ("seq", "stream_id"):
                raise ConfigError(f"--{setting.replace('_', '-')} cannot be none: every event needs one")
            changes[field] = None
        else:
            changes[field] = value
    for field, override in (("data", data_encoding), ("metadata", metadata_encoding)):
        if override is not None and override not in ENCODINGS:
            raise ConfigError(f"--{field}-encoding {override!r}: use one of {', '.join(ENCODINGS)}")
    if not changes and data_encoding is None and metadata_encoding is None and strict is None:
        return base
    result = replace(base, **changes)  # type: ignore[arg-type]
    # Encodings follow the field: a renamed payload column keeps the preset's encoding.
    encoding: dict[str, str] = {}
    for field, override in (("data", data_encoding), ("metadata", metadata_encoding)):
        old, new = getattr(base, field), getattr(result, field)
        kind = override or (base.payload_encoding.get(old) if old else None)
        if new and kind:
            encoding[new] = kind
    result = replace(result, payload_encoding=encoding)
    # Our own table mapped onto anything else is no longer the table `cdc setup` made: a table
    # of your own may carry columns we do not read.
    is_strict = strict if strict is not None else (base.strict and result == base)
    return replace(result, strict=is_strict)


def candidates(conn: psycopg.Connection, table: EventTable) -> list[str]:
    """The tables of this database that have the mapping's seq, stream, version, type and data
    columns: where a preset's table lives under another name or schema (the eventsourcing
    library names it `<application name>_events`; Marten puts `mt_events` in its own schema).
    Read from the catalogs, which every role may read."""
    cols = [c for c in (table.seq, table.stream_id, table.version, table.type, table.data) if c]
    rows = conn.execute(
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_' "
        "AND (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 "
        "     AND NOT a.attisdropped AND a.attname = ANY(%s)) = %s "
        "ORDER BY 1", (cols, len(cols))).fetchall()
    return [r[0] for r in rows]


def candidates_hint(conn: psycopg.Connection, table: EventTable) -> str | None:
    """For a mapped table that does not exist: the tables that have its columns, as a fix."""
    found = candidates(conn, table) if table != DEFAULT_TABLE else []
    return f"tables with its columns: {', '.join(found[:5])}: give --table" if found else None


def find_table(conn: psycopg.Connection, table: EventTable, preset: str | None) -> EventTable:
    """A preset's table where it really is: the preset's own name if it exists, else the one
    table with its columns; several are listed for the user to choose with --table."""
    if preset not in DISCOVERABLE or table_oid(conn, table) is not None:
        return table
    found = candidates(conn, table)
    if len(found) > 1:
        raise ConfigError(f"preset {preset}: {table.qualified} does not exist, and {len(found)} tables have its "
                          f"columns ({', '.join(found)}): give --table with the one to read")
    if not found:
        return table
    schema, name = parse_table_name(found[0])
    log.info("preset %s: %s does not exist; reading %s, the one table with its columns", preset, table.qualified,
             found[0])
    return replace(table, schema=schema or "public", name=name)


def columns_from(settings: object) -> dict[str, str | None]:
    """The column settings present on `settings` (a Settings or an argparse Namespace)."""
    return {k: getattr(settings, k, None) for k in COLUMN_FIELDS}
