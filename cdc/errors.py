"""Errors users see. Each message says what is wrong and how to fix it, in one line.

    CdcError
    ├── ConfigError            a setting is missing or invalid
    ├── ConnectError           the server cannot be reached, or refused the login
    │   └── ConnectionLostError    the stream broke mid-way; retried with backoff
    ├── SetupError             the server cannot serve logical decoding as asked
    │   ├── WalLevelError          wal_level is not 'logical'
    │   ├── PluginMissingError     the output plugin is not installed
    │   ├── PluginNotAllowedError  output_plugin_libraries does not name the plugin
    │   ├── ReplicationPrivilegeError  the role lacks REPLICATION
    │   ├── EventsTableMissingError    cdc.events (or the mapped table) does not exist
    │   └── PublicationError       pgoutput: the publication is missing or does not publish the table
    ├── SlotError
    │   ├── SlotInUseError         another process streams from the slot (SQLSTATE 55006)
    │   └── SlotLostError          the slot was dropped or invalidated while we used it
    ├── DecodeError            a plugin message we cannot turn into events; never skipped
    ├── UnsupportedChangeError a TRUNCATE or DDL on the events table: the feed cannot go on as is
    ├── ConcurrencyError       an append found the stream at another version; nothing was written
    ├── EmbeddedError          the throwaway cluster could not start
    └── SinkError              a sink gave up on a transaction (after its retries)
"""

from __future__ import annotations


class CdcError(Exception):
    """Base of every error `cdc` raises on purpose. `str(err)` is the one line to show."""

    exit_code = 1


class ConfigError(CdcError):
    exit_code = 2


class ConnectError(CdcError):
    pass


class SetupError(CdcError):
    pass


class WalLevelError(SetupError):
    pass


class PluginMissingError(SetupError):
    pass


class PluginNotAllowedError(SetupError):
    pass


class ReplicationPrivilegeError(SetupError):
    pass


class EventsTableMissingError(SetupError):
    pass


class PublicationError(SetupError):
    pass


class SlotError(CdcError):
    pass


class SlotInUseError(SlotError):
    """`holder` names the process holding the slot, when known (a standby logs it)."""

    def __init__(self, message: str, holder: str | None = None):
        super().__init__(message)
        self.holder = holder


class SlotLostError(SlotError):
    pass


class DecodeError(CdcError):
    """A message that cannot be decoded. Carries its LSN and raw text for the log."""

    def __init__(self, message: str, *, lsn: int | None = None, raw: bytes | str | None = None):
        self.lsn = lsn
        self.raw = raw
        super().__init__(message)


class UnsupportedChangeError(CdcError):
    pass


class ConcurrencyError(CdcError):
    """An append expected a stream version the stream is not at. Nothing was written."""

    def __init__(self, stream_id: str, expected: int, actual: int):
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"stream {stream_id!r} is at version {actual}, not the expected {expected}: "
            "reload the stream and retry the command"
        )


class EmbeddedError(CdcError):
    pass


class SinkError(CdcError):
    pass


class ConnectionLostError(ConnectError):
    """The stream broke (server restart, walsender terminated, network): retried with backoff."""


def explain_database_error(err: Exception) -> str:
    """One line for a server error that reached the top: what is wrong and how to fix it.

    The cases a new user meets first (the schema not set up, a missing grant, an altered
    table) get their fix named; any other keeps PostgreSQL's own first line and SQLSTATE."""
    import psycopg  # errors.py stays importable without a driver for the rest of the hierarchy

    diag = getattr(err, "diag", None)
    primary = ((diag.message_primary if diag else None) or str(err).strip().splitlines()[0] or type(err).__name__)
    if isinstance(err, psycopg.errors.InsufficientPrivilege):
        return (f"{primary}: the role lacks a grant cdc needs; see 'Grants' in README.md for the GRANTs each "
                "feature needs, and `cdc check` for the ones missing")
    if isinstance(err, (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName)) and (
            "cdc" in primary or "delivery" in primary or "checkpoints" in primary or "dead_letters" in primary):
        return f"{primary}: the cdc schema is not set up in this database; run `cdc setup` (as a role that may create it)"
    if isinstance(err, (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName)):
        return f"{primary}: check --table / --preset, and that the DSN names the right database"
    if isinstance(err, psycopg.errors.UndefinedColumn):
        return (f"{primary}: the table was altered (a column dropped or renamed) or the mapping names a column it "
                "does not have; undo the change or fix --*-column (`cdc check` lists the columns)")
    if isinstance(err, psycopg.OperationalError):
        return f"the database connection failed: {primary}"
    code = getattr(err, "sqlstate", None)
    return f"the database refused: {primary}" + (f" (SQLSTATE {code})" if code else "")
