"""What both decoders do with a row of the events table, whatever plugin carried it.

A plugin decides how a value travels (wal2json: inside JSON, numbers bare; pgoutput: the
type's text output); from there both must make the same `Event`, byte for byte in every sink,
and refuse the same altered tables with the same line. So the payload rules, the LSN text form
and the altered-table error live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import orjson

from ..errors import UnsupportedChangeError
from ..events import Lsn
from ..jsontext import from_bytes, from_text, one_line
from ..store import EventTable

# A huge transaction is handed over in parts of this many events: memory stays bounded.
DEFAULT_CHUNK_EVENTS = 10_000


def parse_lsn(text: str) -> Lsn:
    hi, _, lo = text.partition("/")
    return Lsn((int(hi, 16) << 32) | int(lo, 16))


def jsonb_text(value: Any) -> Any:
    """A jsonb/json value's text as the plugin sent it → the event's JSON text: a string as it
    is (a json column's line breaks made spaces, so a JSON line stays one line), anything else
    (a plugin printing json bare) serialised; None stays."""
    if value is None or value.__class__ is str:
        return value if value is None else one_line(value)
    return orjson.dumps(value).decode()


def payload_reader(table: EventTable, column: str | None) -> Callable[[Any], str]:
    """How a data/metadata value becomes the event's JSON text, never parsed on the way: jsonb
    as its text (taken as it is); bytea as hex (its bytes if they are JSON, else the hex as a
    JSON string); text as JSON if it is, else as a JSON string."""
    encoding = table.payload_encoding.get(column, "jsonb") if column else "text"
    if encoding == "jsonb":
        return jsonb_text
    if encoding == "bytea":
        def bytea(value: str) -> str:
            return from_bytes(bytes.fromhex(value[2:] if value.startswith("\\x") else value))
        return bytea
    return lambda value: from_text(value if value.__class__ is str else orjson.dumps(value).decode())


def mapped_columns(table: EventTable) -> frozenset[str]:
    """Every column the mapping names: one dropped or renamed stops the feed."""
    cols = (table.seq, table.stream_id, table.version, table.type, table.data,
            table.metadata, table.created_at, table.xid)
    return frozenset(c for c in cols if c)


def altered(table: EventTable, known: frozenset[str], required: frozenset[str], names: Collection[str],
            lsn: Lsn) -> UnsupportedChangeError:
    """The one line for a row whose columns are not the mapping's: the table was altered."""
    missing = sorted(required - set(names))
    if missing:
        return UnsupportedChangeError(
            f"{table.qualified} has no column {', '.join(missing)} at {lsn}: the table was altered "
            "(a column dropped or renamed); undo the change or map the table (--preset, --*-column)"
        )
    extra = sorted(set(names) - known)
    return UnsupportedChangeError(
        f"{table.qualified} has columns cdc does not know ({', '.join(extra)}) at {lsn}: "
        "the table was altered; undo the change or map the table (--preset, --*-column)"
    )
