"""Where delivered transactions go: stdout, a JSON-lines file, nowhere, or a user's function.

A sink's contract: `write(tx)` hands it a transaction (or a part of a huge one); `flush()`
makes everything written so far durable, and only after it returns may the position be
acknowledged. Records are one JSON line per event (see `events.wire_records`), written whole, the payloads
spliced in as the exact JSON text PostgreSQL holds.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
from collections.abc import Callable
from typing import IO, Protocol

import orjson

from .errors import ConfigError
from .events import Transaction, wire_records


class Sink(Protocol):
    def write(self, tx: Transaction) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _lines(tx: Transaction) -> bytes:
    # One buffer per transaction: each line is written whole, and one write serves them all.
    dumps = orjson.dumps
    out = [dumps(r) for r in wire_records(tx)]
    out.append(b"")
    return b"\n".join(out)


class NullSink:
    """Discards events: for benchmarks and for checking that a feed drains."""

    def write(self, tx: Transaction) -> None:
        pass

    def write_lines(self, data: bytes) -> None:
        """Discard records already formatted (the replay fast path, see `StreamSink.write_lines`)."""

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class StreamSink:
    """JSON lines to a binary file object (stdout by default)."""

    def __init__(self, out: IO[bytes] | None = None):
        self.out = out if out is not None else sys.stdout.buffer

    def write(self, tx: Transaction) -> None:
        if tx.events:
            self.out.write(_lines(tx))

    def write_lines(self, data: bytes) -> None:
        """Records already formatted, whole lines each ending in a newline, byte for byte what
        `write` prints for them: the replay fast path (polling._replay_lines) builds them."""
        self.out.write(data)

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        self.flush()


class JsonlSink(StreamSink):
    """JSON lines appended to a file; `flush` fsyncs, so an acknowledged event is on disk.

    While a replay writes hundreds of MB between flushes, the kernel is asked every `SYNC_EVERY`
    bytes to start writing the file out (`sync_file_range`, where the platform has it), so the
    disk works alongside and the fsync at the end is short. That call neither waits nor commits
    the journal; what is durable is decided by `flush` alone, whose fsync reports any write
    error. Measured on 1M events (300 MB), best of 5 against a bare COPY: 1.03x, against 0.95x
    with only the fsync at the end and 0.84x with an fdatasync every 32 MB in a thread (each one
    a journal commit and a device flush).
    """

    SYNC_EVERY = 8 << 20

    def __init__(self, path: str):
        try:
            _drop_torn_line(path)
            super().__init__(open(path, "ab"))
        except OSError as err:
            raise ConfigError(f"cannot open {path!r} for the jsonl sink: {err.strerror}") from None
        self.path = path
        self._unsynced = 0
        self._writebacks = 0

    def write(self, tx: Transaction) -> None:
        if tx.events:
            self.write_lines(_lines(tx))

    def write_lines(self, data: bytes) -> None:
        self.out.write(data)
        self._unsynced += len(data)
        if self._unsynced >= self.SYNC_EVERY and _WRITEBACK is not None:
            self._unsynced = 0
            self._writebacks += 1
            _WRITEBACK(self.out.fileno(), 0, 0, 2)  # SYNC_FILE_RANGE_WRITE: start, don't wait

    def flush(self) -> None:
        self.out.flush()
        os.fsync(self.out.fileno())
        self._unsynced = 0

    def close(self) -> None:
        self.flush()
        self.out.close()


def _writeback_call() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux), or None."""
    try:
        fn = ctypes.CDLL(None).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_WRITEBACK = _writeback_call()


def _drop_torn_line(path: str) -> None:
    """Cut a partial last line left by a kill in the middle of a write. It was never
    acknowledged, so it will be written again whole; appending after it would glue two records
    into one unreadable line."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            step = min(65536, end)
            f.seek(end - step)
            chunk = f.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                end = end - step + cut + 1
                break
            end -= step
        if end != size:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())


class CallbackSink:
    """Calls `handler(tx)` for every transaction with events; the library's callback style."""

    def __init__(self, handler: Callable[[Transaction], object]):
        self.handler = handler

    def write(self, tx: Transaction) -> None:
        if tx.events:
            self.handler(tx)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def load_callable(spec: str) -> Callable[..., object]:
    """`module:function` (or `module.sub:function`) → the function."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"expected MODULE:FUNCTION, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot load {spec!r}: {err}") from None
    if not callable(fn):
        raise ConfigError(f"{spec!r} is not callable")
    return fn


def open_sink(spec: str) -> Sink:
    """A sink from its command-line form: stdout, null, jsonl:PATH, webhook:URL."""
    kind, _, arg = spec.partition(":")
    if kind == "stdout" and not arg:
        return StreamSink()
    if kind == "null" and not arg:
        return NullSink()
    if kind == "jsonl" and arg:
        return JsonlSink(arg)
    if kind == "webhook" and arg:
        from .webhook import WebhookSink

        return WebhookSink(arg)
    raise ConfigError(
        f"unknown sink {spec!r}: use stdout, null, jsonl:PATH, webhook:URL, python:MODULE:FUNCTION or nats://HOST:PORT"
    )
