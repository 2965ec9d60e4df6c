"""cdc: a complete, commit-ordered feed of appended events from PostgreSQL.

    import cdc
    with cdc.Consumer("dbname=app", consumer="projector") as feed:
        for tx in feed:
            for event in tx.events:
                ...

The stream path reads a logical replication slot (wal2json, or pgoutput with
``Consumer(plugin="pgoutput")``); the poll path is a gap-safe seq poller; a reconciler checks one
against the other.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("cdc")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.1.0"

from .checkpoint import Checkpoints, Position, Projection
from .consumer import AsyncConsumer, Consumer, tune_gc
from .embedded import embedded_cluster
from .errors import (
    CdcError,
    ConcurrencyError,
    ConfigError,
    ConnectError,
    DecodeError,
    SetupError,
    SlotError,
    SlotInUseError,
    SlotLostError,
    UnsupportedChangeError,
)
from .events import DecimalEvent, Event, Lsn, Transaction
from .partitions import ParallelProjection
from .store import DEFAULT_TABLE, EventTable, NewEvent, append, setup
from .workers import ParallelDispatcher

__all__ = [
    "__version__",
    "AsyncConsumer",
    "CdcError",
    "Checkpoints",
    "ConcurrencyError",
    "ConfigError",
    "ConnectError",
    "Consumer",
    "DEFAULT_TABLE",
    "DecimalEvent",
    "DecodeError",
    "Event",
    "EventTable",
    "Lsn",
    "NewEvent",
    "ParallelDispatcher",
    "ParallelProjection",
    "Position",
    "Projection",
    "SetupError",
    "SlotError",
    "SlotInUseError",
    "SlotLostError",
    "Transaction",
    "UnsupportedChangeError",
    "append",
    "embedded_cluster",
    "setup",
    "tune_gc",
]
