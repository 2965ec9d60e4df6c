"""The stream's decoders: a logical decoding plugin's messages → `Transaction`s.

Two plugins, one contract. wal2json (format-version 2, the default) is JSON; pgoutput is the
binary logical replication protocol every PostgreSQL has built in, allowed where wal2json needs
a server setting (`output_plugin_libraries`, 15.19+ / 16.15+ / 17.11+ / 18.6+), and cheaper for
the walsender. Both make the same Transactions and Events, byte for byte in every sink; the
replication client (`cdc.replication`) is shared and knows nothing of either.
"""

from __future__ import annotations

import os
from typing import Literal, Protocol

from ..errors import ConfigError
from ..events import Event, Transaction
from ..store import EventTable
from . import pgoutput, wal2json
from .rows import DEFAULT_CHUNK_EVENTS

__all__ = ["PLUGINS", "Plugin", "StreamDecoder", "new_decoder", "resolve_plugin", "start_options", "publication_name",
           "DEFAULT_CHUNK_EVENTS"]

Plugin = Literal["wal2json", "pgoutput"]
PLUGINS: tuple[Plugin, ...] = ("wal2json", "pgoutput")


class StreamDecoder(Protocol):
    """Feed it the XLogData messages of a stream, in order; it appends finished transactions
    (and parts of huge ones) to `out`. Raises DecodeError for what it cannot read and
    UnsupportedChangeError for a change that breaks the feed's contract (an altered table, a
    TRUNCATE): never skips a message, so nothing past it is acknowledged."""

    @property
    def in_transaction(self) -> bool: ...

    def decode(self, messages: list[memoryview], out: list[Transaction]) -> None: ...


def resolve_plugin(plugin: str | None) -> Plugin:
    """The plugin asked for; None: CDC_PLUGIN (as `cdc run` reads it, and the DSN from CDC_DSN),
    else wal2json. Anything else is a ConfigError."""
    chosen = plugin or os.environ.get("CDC_PLUGIN") or "wal2json"
    if chosen not in PLUGINS:
        raise ConfigError(f"plugin {chosen!r}: use 'wal2json' or 'pgoutput'")
    return chosen


def new_decoder(plugin: Plugin, table: EventTable, *, chunk_events: int = DEFAULT_CHUNK_EVENTS,
                event_class: type[Event] = Event) -> StreamDecoder:
    if plugin == "pgoutput":
        return pgoutput.Decoder(table, chunk_events=chunk_events, event_class=event_class)
    return wal2json.Decoder(table, chunk_events=chunk_events, event_class=event_class)


def publication_name(table: EventTable) -> str:
    """The publication `cdc setup --plugin pgoutput` makes for a table: ``cdc_<table>``
    (``cdc_events`` for cdc.events; ``cdc_<schema>_<table>`` outside the schemas cdc and public)."""
    if table.schema in ("cdc", "public"):
        return f"cdc_{table.name}"
    return f"cdc_{table.schema}_{table.name}"


def start_options(plugin: Plugin, table: EventTable, publication: str | None = None) -> dict[str, str]:
    """START_REPLICATION's options for `plugin`, reading `table`."""
    if plugin == "pgoutput":
        return pgoutput.options(publication or publication_name(table))
    opts = dict(wal2json.OPTIONS)
    opts["add-tables"] = f"{_escape_table(table.schema)}.{_escape_table(table.name)}"
    return opts


def _escape_table(name: str) -> str:
    # wal2json's add-tables takes schema.table with backslash-escaped specials (",", ".", "*").
    return "".join("\\" + c if c in ",.* \\" else c for c in name)
