"""The other side of the nats sink: read the feed back from JetStream as `Transaction`s, and
project it exactly once.

Why an ordered consumer and not a durable one: several pullers on one durable consumer hand
messages out in parallel, and even one puller gets a message again after its ack wait, behind
later ones; either breaks per-stream order. An ordered consumer (nats-py's `ordered_consumer`)
is one in-flight flow per reader that JetStream itself checks for gaps, recreating it at the
next expected stream sequence if one shows. JetStream then keeps nothing per reader: the
position (the stream sequence of the last message handled) lives where the reader's effects do,
which is what makes it exactly once: `JetStreamProjection` saves it in the projection's database
in the same transaction as the handler's writes, and starts after it.

Partitions: a sink run with `--nats-partitions N` puts every stream in one of N partitions
(`cdc.events.<partition>.<stream_id>`); N readers each read one (`Target.partition_filter(k)`),
every stream whole and in order in one of them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Literal, TypeVar

import orjson
import psycopg

from .checkpoint import durable
from .errors import ConfigError, DecodeError
from .events import DecimalEvent, Event, Lsn, Transaction
from .jetstream import EventLoop, Target

log = logging.getLogger("cdc.jetstream")

T = TypeVar("T")

# A JSON string, or a bracket: what the scanner needs to find where a document ends.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_DATA, _METADATA, _CREATED = ',"data":', ',"metadata":', ',"created_at":'

POSITIONS_SQL = """
CREATE TABLE IF NOT EXISTS cdc.jetstream_positions (
    reader     text        PRIMARY KEY,
    stream     text        NOT NULL,
    subjects   text        NOT NULL,
    stream_seq bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""


def _value_end(text: str, start: int) -> int:
    """Where the JSON value starting at `start` ends (exclusive)."""
    first = text[start]
    if first in "{[":
        depth = 0
        for m in _TOKEN.finditer(text, start):
            token = m.group()
            if token in "{[":
                depth += 1
            elif token in "]}":
                depth -= 1
                if depth == 0:
                    return m.end()
        raise ValueError("unterminated document")
    if first == '"':
        string = _TOKEN.match(text, start)
        if string is None:
            raise ValueError("unterminated string")
        return string.end()
    end = text.find(",", start)
    return len(text) if end < 0 else end


def parse_message(body: bytes, event_class: type[Event] = Event) -> tuple[Event, dict[str, Any]]:
    """An event from a message body (the jsonl line the sink published), its payloads the exact
    JSON text in the line, never parsed here; and the rest of the record (xid, commit_lsn, source)."""
    text = body.decode()
    at = text.find(_DATA)
    tail_at = text.rfind(_CREATED)
    if at < 0 or tail_at < 0:
        raise DecodeError(f"not a cdc record: {text[:120]!r}")
    data_start = at + len(_DATA)
    # The payloads are spliced in as they are; only the data's end needs finding. The metadata
    # key right after it, if it shows up once, is it (a document can hold that text only inside
    # a string, or in non-canonical JSON: then the scanner decides).
    meta_at = text.find(_METADATA, data_start)
    if meta_at < 0:
        raise DecodeError(f"not a cdc record: {text[:120]!r}")
    if text.find(_METADATA, meta_at + 1, tail_at) >= 0:
        meta_at = _value_end(text, data_start)
        if not text.startswith(_METADATA, meta_at):
            raise DecodeError(f"not a cdc record: {text[:120]!r}")
    head = orjson.loads(text[:at] + "}")
    rest = orjson.loads("{" + text[tail_at + 1:])
    data = text[data_start:meta_at]
    metadata = text[meta_at + len(_METADATA):tail_at]
    created = rest.get("created_at")
    event = event_class(head["seq"], head["stream_id"], head.get("version"), head.get("type"),
                        None if data == "null" else data, None if metadata == "null" else metadata,
                        datetime.fromisoformat(created) if created else None)
    return event, rest


class Reader:
    """Transactions from a JetStream stream the nats sink fills, in stream order, from after
    stream sequence `after` (0: from the start).

        with Reader(Target.parse("nats://127.0.0.1:4222"), after=saved) as reader:
            for tx in reader:
                ...            # reader.position: the stream sequence of tx's last message

    A transaction is the consecutive messages of one database transaction (same xid and commit
    LSN) that arrive together; with a subject filter, only its events in that filter. Iteration
    ends after `idle_timeout` seconds without a message, if given, else runs until `stop()`.
    """

    def __init__(self, target: Target, *, after: int = 0, subjects: str | None = None,
                 numbers: Literal["float", "decimal"] = "float", idle_timeout: float | None = None,
                 batch_max: int = 1000):
        try:
            import nats  # noqa: F401
        except ImportError:
            raise ConfigError("the JetStream reader needs nats-py: pip install 'cdc[nats]'") from None
        self.target = target
        self.subjects = subjects or target.filter
        self.after = after
        self.position = after
        self.event_class: type[Event] = DecimalEvent if numbers == "decimal" else Event
        self.idle_timeout = idle_timeout
        self.batch_max = batch_max
        self._stop = threading.Event()
        self._nc: Any = None
        self._sub: Any = None
        self._events = EventLoop("cdc-nats-reader")
        self._call = self._events.call
        try:
            self._call(self._open(), timeout=30)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop(self) -> None:
        self._stop.set()

    def __iter__(self) -> Iterator[Transaction]:
        if self._sub is None and not self._call(self._subscribe()):
            return
        idle = 0.0
        while not self._stop.is_set():
            messages = self._call(self._fetch(0.5))
            if not messages:
                idle += 0.5
                if self.idle_timeout is not None and idle >= self.idle_timeout:
                    return
                continue
            idle = 0.0
            yield from self._transactions(messages)

    def _transactions(self, messages: list[tuple[int, bytes]]) -> Iterator[Transaction]:
        key: tuple[Any, Any, Any] | None = None
        events: list[Event] = []
        rest: dict[str, Any] = {}
        last = 0
        for stream_seq, body in messages:
            event, r = parse_message(body, self.event_class)
            k = (r.get("xid"), r.get("commit_lsn"), r.get("source"))
            if events and (k != key or k[0] is None and k[1] is None):
                yield self._tx(events, rest, last)
                events = []
            key, rest, last = k, r, stream_seq
            events.append(event)
        if events:
            yield self._tx(events, rest, last)

    def _tx(self, events: list[Event], rest: dict[str, Any], stream_seq: int) -> Transaction:
        self.position = stream_seq
        lsn = rest.get("commit_lsn")
        return Transaction(xid=rest.get("xid"), commit_lsn=Lsn.parse(lsn) if lsn else None, end_lsn=None,
                           commit_time=None, events=events, source=rest.get("source") or "stream")

    def close(self) -> None:
        self._events.close(self._nc)

    async def _open(self) -> None:
        import nats

        options = self.target.connect_options() | {
            "connect_timeout": 5, "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5, "name": "cdc-reader",
            "error_cb": self._on_error}
        self._nc = await nats.connect(**options)

    async def _subscribe(self) -> bool:
        """Subscribe, waiting for the stream if `cdc run` has not made it yet. False: stopped."""
        from nats.js.api import ConsumerConfig, DeliverPolicy
        from nats.js.errors import NotFoundError

        t = self.target
        js = self._nc.jetstream()
        waited = False
        while True:
            try:
                await js.stream_info(t.stream)
                break
            except NotFoundError:
                if not waited:
                    log.info("NATS stream %s does not exist yet: waiting for `cdc run --sink nats://...` to make it",
                             t.stream)
                    waited = True
                for _ in range(10):
                    if self._stop.is_set():
                        return False
                    await asyncio.sleep(0.1)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.after + 1) \
            if self.after else ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        self._sub = await js.subscribe(self.subjects, stream=t.stream, ordered_consumer=True, config=config,
                                       pending_msgs_limit=-1, pending_bytes_limit=-1)
        return True

    async def _fetch(self, timeout: float) -> list[tuple[int, bytes]]:
        sub = self._sub
        try:
            msg = await sub.next_msg(timeout=timeout)
        except TimeoutError:  # nats-py's own is one (and asyncio's, since 3.11)
            return []
        out = [(msg.metadata.sequence.stream, msg.data)]
        while len(out) < self.batch_max and sub.pending_msgs > 0:
            msg = await sub.next_msg(timeout=1)
            out.append((msg.metadata.sequence.stream, msg.data))
        return out

    async def _on_error(self, err: Exception) -> None:
        log.warning("NATS %s (reader): %s", self.target.display, f"{type(err).__name__}: {err}".strip())


class JetStreamProjection:
    """Exactly once from JetStream into a database: `handler(conn, tx)` runs in a transaction on
    `conn`, and the reader's position is saved in that same transaction (`cdc.jetstream_positions`,
    one row per `name`), so the effects and "handled up to here" commit together or not at all.
    On start it reads from after the saved position. Killed anywhere, restarted: exact."""

    def __init__(self, handler: Callable[[psycopg.Connection, Transaction], object], conn: psycopg.Connection,
                 target: Target, *, name: str, subjects: str | None = None,
                 numbers: Literal["float", "decimal"] = "float"):
        self.handler = handler
        self.conn = durable(conn)
        self.target = target
        self.name = name
        self.subjects = subjects or target.filter
        self.numbers = numbers
        self.handled = 0
        self._reader: Reader | None = None
        try:
            with self.conn.transaction():
                self.conn.execute(POSITIONS_SQL)
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            pass  # another reader made it at the same moment
        except psycopg.errors.InsufficientPrivilege as err:
            raise ConfigError(f"cannot create cdc.jetstream_positions ({err.diag.message_primary}): run `cdc setup` "
                              "as the schema's owner, or grant CREATE on schema cdc") from None

    def saved(self) -> int:
        row = self.conn.execute("SELECT stream_seq, stream, subjects FROM cdc.jetstream_positions WHERE reader = %s",
                                (self.name,)).fetchone()
        self.conn.commit()
        if row is None:
            return 0
        if (row[1], row[2]) != (self.target.stream, self.subjects):
            raise ConfigError(f"reader {self.name!r} was reading {row[1]} {row[2]}, not {self.target.stream} "
                              f"{self.subjects}: give another name, or delete its row from cdc.jetstream_positions")
        return int(row[0])

    def run(self, *, idle_timeout: float | None = None) -> int:
        """Read and project until `stop()` (or `idle_timeout` seconds without a message).
        Returns how many events this call handled."""
        with Reader(self.target, after=self.saved(), subjects=self.subjects, numbers=self.numbers,
                    idle_timeout=idle_timeout) as reader:
            self._reader = reader
            for tx in reader:
                with self.conn.transaction():
                    self.handler(self.conn, tx)
                    self.conn.execute(
                        "INSERT INTO cdc.jetstream_positions AS p (reader, stream, subjects, stream_seq) "
                        "VALUES (%s, %s, %s, %s) ON CONFLICT (reader) DO UPDATE SET "
                        "stream_seq = excluded.stream_seq, updated_at = now()",
                        (self.name, self.target.stream, self.subjects, reader.position))
                self.handled += len(tx.events)
        return self.handled

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.stop()
