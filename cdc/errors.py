"""Errors users see. Each message says what is wrong and how to fix it, in one line.

    CdcError
    ├── ConfigError            a setting is missing or invalid
    ├── ConnectError           the server cannot be reached, or refused the login
    │   └── ConnectionLostError    the stream broke mid-way; retried with backoff
    ├── SetupError             the server cannot serve logical decoding as asked
    │   ├── WalLevelError          wal_level is not 'logical'
    │   ├── PluginMissingError     wal2json is not installed
    │   ├── PluginNotAllowedError  output_plugin_libraries does not name wal2json
    │   ├── ReplicationPrivilegeError  the role lacks REPLICATION
    │   └── EventsTableMissingError    cdc.events (or the mapped table) does not exist
    ├── SlotError
    │   ├── SlotInUseError         another process streams from the slot (SQLSTATE 55006)
    │   └── SlotLostError          the slot was dropped or invalidated while we used it
    ├── DecodeError            a wal2json message we cannot turn into events; never skipped
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


class SlotError(CdcError):
    pass


class SlotInUseError(SlotError):
    pass


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
