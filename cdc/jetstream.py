"""The NATS JetStream sink: one message per event, exactly once, in commit order.

One slot feeds a durable, replicated log that many consumers on many machines read. Each event
is one message on the subject of its stream (`cdc.events.<stream_id>` by default); its body is
the event's JSON line (the jsonl sink's bytes, payloads exact), its headers say where it came
from. Exactly once rests on JetStream's de-duplication: `Nats-Msg-Id` is derived from the
event's identity (its table and seq), never from the delivery, so the stream, a replay, the
poller, a hand-off and a restart after kill -9 all publish the same id for the same event, and
JetStream stores it once (within the stream's duplicate window).

Publishing is pipelined: `write` queues a transaction and returns, `flush` (called by the
consumer before it acknowledges the slot) returns once JetStream has acknowledged every message
so far. Each message carries `Nats-Expected-Last-Msg-Id`, the id of the one published before it,
so a connection broken mid-flight cannot leave a later message stored before a lost one: the
stream stays in commit order, and the sink publishes again from the first message not stored. A
transaction of several events goes as atomic batches where the stream allows them (NATS 2.12+,
`allow_atomic`; at most 1,000 messages a batch): a reader sees none of a batch or all of it. A
batch refused because JetStream holds one of its ids (error 10201: a retry after a crash) goes
again message by message, each de-duplicated on its own. Past the duplicate window JetStream
would store a republished event again, so at start the sink reads the stream's last message and
skips what comes again before it. NATS down or unreachable: `flush` waits, reconnecting with
backoff (nothing dropped, nothing acknowledged), until it is back or the run is stopped.

nats-py is asyncio; the sink runs its own event loop in a thread and the feed waits on it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import orjson

from . import metrics
from .errors import ConfigError, SinkError
from .events import Event, Lsn, Transaction, wire_records

log = logging.getLogger("cdc.jetstream")

T = TypeVar("T")

BATCH_MAX = 1000  # the server's limit on an atomic batch
DUPLICATE_IN_BATCH = 10201  # "atomic publish batch contains duplicate message id"
ATOMIC_DISABLED = 10174  # "atomic publish is disabled"
SUBJECTS_OVERLAP = 10065  # "subjects overlap with an existing stream"
STORED, DUPLICATE = 1, 2  # a message's state once JetStream answered: stored now, or held already
WRONG_LAST_ID = 10070  # "wrong last msg ID": the chain (Nats-Expected-Last-Msg-Id) did not hold
EXPECTED_LAST_ID = "Nats-Expected-Last-Msg-Id"
DEFAULT_SUBJECT = "cdc.events.{stream_id}"
_NEEDS_ESCAPE = re.compile(r"[.*>%\s]")
_SPECIAL = {".": "%2E", "*": "%2A", ">": "%3E", "%": "%25", " ": "%20", "\t": "%09", "\r": "%0D", "\n": "%0A"}


def subject_token(stream_id: str) -> str:
    """A stream id as one subject token: the characters NATS gives a meaning (`.`, `*`, `>`) or
    refuses (whitespace), and `%` itself, percent-encoded; everything else as it is. An empty
    id becomes `%00`. Reversible: `urllib.parse.unquote` gives the id back."""
    if not stream_id:
        return "%00"
    if _NEEDS_ESCAPE.search(stream_id) is None:
        return stream_id
    return "".join(_SPECIAL.get(c, c) for c in stream_id)


def message_id(table: str, seq: int) -> str:
    """The event's identity: the same whichever path delivers it, and after any restart."""
    return f"{table}:{seq}"


@dataclass(frozen=True)
class Target:
    """Where and how to publish, from `nats://[user:pass@|token@]host:port[,host:port]`."""

    servers: list[str]
    stream: str = "CDC"
    subject: str = DEFAULT_SUBJECT
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    tls_ca: str | None = None
    replicas: int = 1
    duplicate_window: float = 120.0
    partitions: int = 1  # what `{partition}` in the subject counts up to (see partition_of)

    @classmethod
    def parse(cls, url: str, **settings: Any) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls") or not parts.netloc:
            raise ConfigError(f"--sink {url!r}: expected nats://host:port (or tls://host:port)")
        auth, _, hosts = parts.netloc.rpartition("@")
        user = password = token = None
        if auth:
            name, colon, secret = auth.partition(":")
            if colon:
                user, password = unquote(name), unquote(secret)
            else:
                token = unquote(name)
        servers = [f"{parts.scheme}://{h}" for h in hosts.split(",") if h]
        subject = settings.get("subject") or DEFAULT_SUBJECT
        if "{stream_id}" not in subject:
            raise ConfigError(f"--nats-subject {subject!r} must contain {{stream_id}} (e.g. {DEFAULT_SUBJECT})")
        partitions = int(settings.get("partitions") or 1)
        if partitions < 1:
            raise ConfigError(f"--nats-partitions {partitions}: give 1 or more")
        if partitions > 1 and "{partition}" not in subject:
            subject = subject.replace("{stream_id}", "{partition}.{stream_id}")
        try:
            subject.format(stream_id="s", partition=0)
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"--nats-subject {subject!r}: only {{stream_id}} and {{partition}} may be in braces") from None
        return cls(servers, stream=settings.get("stream") or "CDC", subject=subject, user=user, password=password,
                   token=settings.get("token") or token, creds=settings.get("creds"), tls_ca=settings.get("tls_ca"),
                   replicas=int(settings.get("replicas") or 1), partitions=partitions)

    @property
    def filter(self) -> str:
        """The stream's subjects: the template with the stream id (and partition) as wildcards."""
        return self.subject.replace("{stream_id}", "*").replace("{partition}", "*")

    def partition_filter(self, partition: int) -> str:
        """The subjects of one partition's streams, for a reader of that partition."""
        if "{partition}" not in self.subject:
            raise ConfigError(f"subject template {self.subject!r} has no {{partition}}: publish with --nats-partitions N")
        if not 0 <= partition < self.partitions:
            raise ConfigError(f"partition {partition}: give 0 to {self.partitions - 1}")
        return self.subject.replace("{partition}", str(partition)).replace("{stream_id}", "*")

    @property
    def display(self) -> str:
        return ",".join(self.servers) + f" stream {self.stream}"

    def connect_options(self) -> dict[str, Any]:
        """What `nats.connect` needs to reach and log in to these servers."""
        options: dict[str, Any] = {"servers": self.servers}
        if self.user is not None:
            options |= {"user": self.user, "password": self.password}
        if self.token is not None:
            options["token"] = self.token
        if self.creds is not None:
            options["user_credentials"] = self.creds
        if self.tls_ca is not None:
            import ssl

            options["tls"] = ssl.create_default_context(cafile=self.tls_ca)
        return options


def target_of(settings: Any) -> Target:
    """The target of `--sink nats://...` and its flags (`cdc run`'s settings), checked before
    anything connects: a flag that cannot work is one line at once, not after the database was
    reached."""
    if getattr(settings, "workers", 1) > 1:
        raise ConfigError("--workers N with a nats sink: JetStream keeps per-subject order for one publisher; "
                          "run it with --workers 1")
    return Target.parse(settings.sink, stream=settings.nats_stream, subject=settings.nats_subject,
                        token=settings.nats_token, creds=settings.nats_creds, tls_ca=settings.nats_tls_ca,
                        replicas=settings.nats_replicas, partitions=settings.nats_partitions)


class EventLoop:
    """nats-py is asyncio and the feed is not: an event loop in a daemon thread, `call` to run a
    coroutine on it and wait, `close` to end it (after every task left on it, so that nothing is
    destroyed pending at exit)."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self, client: Any) -> None:
        """Close nats-py `client` (if any), end the tasks left, stop the loop."""
        async def shutdown() -> None:
            if client is not None:
                try:
                    await asyncio.wait_for(client.close(), timeout=5)
                except Exception:
                    pass
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            if self.loop.is_running():
                self.call(shutdown(), timeout=10)
        except Exception:
            pass
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self.loop.close()


class JetStreamSink:
    """Publishes each event of each transaction to JetStream. `write` queues a transaction and
    returns; `flush` returns once JetStream has acknowledged every message written so far (the
    consumer acknowledges the slot only after it). `stop_event` interrupts a wait for NATS with
    SinkError: what was not acknowledged is then not acknowledged to the slot either, and comes
    again. In library mode, give the consumer `on_checkpoint=sink.flush` (as `cdc run` does), so
    the slot moves only past what JetStream holds."""

    def __init__(self, target: Target, *, table: str = "cdc.events", ack_timeout: float = 10.0,
                 backoff_initial: float = 0.2, backoff_max: float = 10.0,
                 stop_event: threading.Event | None = None, connect: bool = True,
                 max_in_flight: int = 8192):
        try:
            import nats  # noqa: F401
        except ImportError:
            raise ConfigError("the nats sink needs nats-py: pip install 'cdc[nats]'") from None
        self.target = target
        self.table = table
        self.ack_timeout = ack_timeout
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.stop_event = stop_event
        self.max_in_flight = max_in_flight
        self.atomic = False  # whether the stream takes atomic batches (found at connect)
        self.published = 0  # messages JetStream acknowledged (stored, or already held)
        self.skipped = 0  # events not published at start because the stream already held them
        self.republished = 0  # messages published again after a failure (each stored once all the same)
        self._last_error: str | None = None
        self._closing = False
        self._nc: Any = None
        self._js: Any = None
        # Loop-thread state. `_queue` is what `write` handed over; `_sent` the messages published
        # and not yet known stored, in publish order, each [subject, body, headers, state]
        # (state None: no answer yet, STORED, DUPLICATE, else the error).
        self._queue: deque[Transaction] = deque()
        self._sent: list[list[Any]] = []
        self._replies: dict[str, list[Any]] = {}
        self._answered = asyncio.Event()
        self._inbox = ""
        self._reply_n = 0
        self._chain: str | None = None  # the id of the last message published: the next one expects it
        self._after_duplicate = False  # whether the last message known stored was one JetStream held already
        self._resume: tuple[str, Lsn | None, int] | None = None  # what the stream held at start
        self._drainer: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._events = EventLoop("cdc-nats")
        self._loop, self._call = self._events.loop, self._events.call
        metrics.SINK_CONNECTED.set(0)
        if connect:
            # Now, so that a stream that cannot serve (overlapping subjects, no duplicate window)
            # stops the run at its start. NATS not answering yet is waited out by `flush`.
            try:
                self._call(self._connect(), timeout=30)
            except ConfigError:
                self.close()
                raise
            except Exception as err:
                self._problem(f"not reachable yet ({_one_line(err)})")
                log.warning("NATS %s not reachable yet (%s): the feed waits for it", target.display, _one_line(err))

    # -- the Sink protocol ----------------------------------------------------------------

    def write(self, tx: Transaction) -> None:
        if not tx.events:
            return
        if self._failure is not None:
            raise self._failure
        self._queue.append(tx)
        if self._drainer is None:  # idle: wake it (while it runs, it takes what is queued)
            self._loop.call_soon_threadsafe(self._wake)
        if len(self._queue) > self.max_in_flight:  # bounded memory: wait for the publisher
            self.flush()

    def flush(self) -> None:
        """Wait until every message written so far is stored in JetStream (or already was)."""
        self._call(self._flush())

    def close(self) -> None:
        self._closing = True
        self._events.close(self._nc)

    # -- publishing (the loop thread) --------------------------------------------------------
    #
    # One publisher, pipelined: a message goes out without waiting for the one before it to be
    # acknowledged. What keeps the stream in commit order when a connection breaks mid-flight
    # (the server got some messages, lost the next, then gets the ones nats-py buffered) is a
    # chain: each message carries `Nats-Expected-Last-Msg-Id`, the id of the one published before
    # it, so JetStream stores none after a lost one. De-duplication comes first in JetStream, so
    # a message it already holds is acknowledged as a duplicate whatever its chain says. On any
    # failure the publisher waits, then publishes again from the first message not stored.
    #
    # A transaction of several events goes as atomic batches where the stream allows them. A
    # batch cannot carry the chain header, so it is a barrier: it goes once everything before it
    # is stored, and what comes after is chained to its last message.

    def _wake(self) -> None:
        if self._drainer is None and self._queue:
            self._drainer = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._queue:
                tx = self._queue.popleft()
                await self._ready()
                events = self._unseen(tx)
                if not events:
                    continue
                messages = self._messages(tx, events)
                if self.atomic and len(messages) > 1:
                    await self._settle()
                    for start in range(0, len(messages), BATCH_MAX):
                        await self._batch(messages[start:start + BATCH_MAX])
                else:
                    await self._send(messages)
                    if len(self._sent) >= self.max_in_flight:
                        await self._settle()
        except BaseException as err:  # a stop, or a stream that cannot serve: `flush` raises it
            self._failure = err if isinstance(err, (SinkError, ConfigError)) else SinkError(_one_line(err))
            self._queue.clear()
            if not isinstance(err, Exception):
                raise
        finally:
            self._drainer = None
            if self._queue and self._failure is None:
                # `write` appended after the loop above found the queue empty, and saw this
                # drainer still running: take it now rather than at the next write or flush.
                self._wake()

    async def _flush(self) -> None:
        while True:
            if self._failure is not None:
                raise self._failure
            if self._drainer is not None:
                await asyncio.shield(self._drainer)
                continue
            if self._queue:
                self._wake()
                continue
            break
        try:
            await self._settle()
        except (SinkError, ConfigError) as err:
            self._failure = err
            raise

    def _messages(self, tx: Transaction, events: list[Event]) -> list[list[Any]]:
        dumps, subject, table = orjson.dumps, self.target.subject, self.table
        commit = str(tx.commit_lsn) if tx.commit_lsn is not None else ""
        xid = "" if tx.xid is None else str(tx.xid)
        partitions = self.target.partitions if "{partition}" in subject else 0
        records = wire_records(tx)
        if len(events) != len(tx.events):
            records = records[len(tx.events) - len(events):]
        out = []
        for event, record in zip(events, records):
            headers = {"Nats-Msg-Id": message_id(table, event.seq), "Cdc-Seq": str(event.seq),
                       "Cdc-Stream-Id": event.stream_id, "Cdc-Type": event.type or "", "Cdc-Source": tx.source}
            if commit:
                headers["Cdc-Commit-Lsn"] = commit
            if xid:
                headers["Cdc-Xid"] = xid
            if partitions:
                name = subject.format(stream_id=subject_token(event.stream_id),
                                      partition=partition_of(event.stream_id, partitions))
            else:
                name = subject.format(stream_id=subject_token(event.stream_id))
            out.append([name, dumps(record), headers, None])
        return out

    async def _send(self, messages: list[list[Any]]) -> None:
        """Publish chained, without waiting for acknowledgements."""
        publish = self._nc.publish
        for m in messages:
            headers = m[2]
            if self._chain is not None:
                headers[EXPECTED_LAST_ID] = self._chain
            else:
                headers.pop(EXPECTED_LAST_ID, None)
            self._chain = headers["Nats-Msg-Id"]
            self._reply_n += 1
            reply = f"{self._inbox}{self._reply_n}"
            m[3] = None
            self._replies[reply] = m
            self._sent.append(m)
            await publish(m[0], m[1], reply=reply, headers=headers)

    def _on_reply(self, msg: Any) -> None:
        m = self._replies.pop(msg.subject, None)
        if m is None:
            return  # an answer to a publish given up on (its message was published again)
        data = msg.data
        if not data:  # a status message: no responders (no stream takes the subject), or a timeout
            status = (msg.headers or {}).get("Status", "")
            m[3] = (0, "no JetStream stream answered (status %s)" % status)
        else:
            try:
                answer = orjson.loads(data)
            except orjson.JSONDecodeError:
                answer = {"error": {"err_code": 0, "description": f"unreadable answer {data[:80]!r}"}}
            error = answer.get("error")
            if error is None:
                m[3] = DUPLICATE if answer.get("duplicate") else STORED
            else:
                m[3] = (error.get("err_code", 0), error.get("description", ""))
        self._answered.set()

    async def _settle(self) -> None:
        """Until every message in `_sent` is stored: wait for their answers, then publish again
        from the first one not stored, after a backoff. Only a stop ends it otherwise."""
        delay, attempt = self.backoff_initial, 0
        while self._sent:
            sent = self._sent
            deadline = time.monotonic() + self.ack_timeout + len(sent) / 2000
            while sent[-1][3] is None and time.monotonic() < deadline:
                self._answered.clear()
                if sent[-1][3] is not None:
                    break
                try:
                    await asyncio.wait_for(self._answered.wait(), timeout=max(0.01, deadline - time.monotonic()))
                except TimeoutError:
                    break
            first = next((i for i, m in enumerate(sent) if m[3] not in (STORED, DUPLICATE)), None)
            stored = len(sent) if first is None else first
            if stored:
                self._after_duplicate = sent[stored - 1][3] == DUPLICATE
            self.published += stored
            del sent[:stored]
            metrics.SINK_UNACKED.set(len(sent))
            if not sent:
                self._problem(None)
                return
            state = sent[0][3]
            if isinstance(state, tuple) and state[0] == WRONG_LAST_ID:
                # Everything before it is stored, so nothing is lost: JetStream's last message is
                # not the one published before (a hand-off or a failover republished in another
                # order, or another publisher). Chain it to what the stream holds and go on.
                held = state[1].partition("wrong last msg ID:")[2].strip()
                expected = sent[0][2].pop(EXPECTED_LAST_ID, None)
                if held:
                    sent[0][2][EXPECTED_LAST_ID] = held
                if self._after_duplicate:  # a replay (hand-off, failover) republished in another order
                    log.info("NATS stream %s: its last message is %s (events were published again in another "
                             "order, each acknowledged as held): chaining to it", self.target.stream, held or "none")
                else:
                    log.warning("NATS stream %s: its last message is %s, not %s which it acknowledged: chaining to "
                                "it (another publisher, or a server that lost acknowledged messages in a crash: an "
                                "R1 stream without sync_interval: always can)", self.target.stream, held or "none",
                                expected)
                await self._resend()
                continue
            attempt += 1
            problem = "no acknowledgement within %.0f s" % self.ack_timeout if state is None else \
                f"error {state[0]}: {state[1]}"
            wait = random.uniform(delay / 2, delay)
            delay = min(delay * 2, self.backoff_max)
            self._problem(problem)
            log.warning("NATS %s: %s for %d message(s) from seq %s (attempt %d); publishing them again in %.1f s "
                        "with the same message ids", self.target.display, problem, len(sent),
                        sent[0][2].get("Cdc-Seq"), attempt, wait)
            await self._pause(wait)
            await self._ready()
            await self._resend()

    async def _resend(self) -> None:
        """Publish `_sent` again in order, keeping each message's chain header."""
        pending, self._sent = self._sent, []
        self._replies.clear()
        self.republished += len(pending)
        publish = self._nc.publish
        for m in pending:
            self._reply_n += 1
            reply = f"{self._inbox}{self._reply_n}"
            m[3] = None
            self._replies[reply] = m
            self._sent.append(m)
            await publish(m[0], m[1], reply=reply, headers=m[2])
        if pending:
            self._chain = pending[-1][2]["Nats-Msg-Id"]

    async def _batch(self, batch: list[list[Any]]) -> None:
        """One atomic batch, everything before it stored. Refused for an id JetStream already
        holds (some or all of it is stored), it goes message by message instead."""
        from nats.js.errors import BadRequestError

        delay, attempt = self.backoff_initial, 0
        while True:
            batch_id = batch[0][2]["Nats-Msg-Id"] + f"#{len(batch)}#{random.getrandbits(32):08x}"
            last = len(batch) - 1
            try:
                for n, (subject, body, headers, _) in enumerate(batch):
                    h = {k: v for k, v in headers.items() if k != EXPECTED_LAST_ID}
                    h |= {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(n + 1)}
                    if n < last:
                        await self._nc.publish(subject, body, headers=h)
                        continue
                    h["Nats-Batch-Commit"] = "1"
                    await self._js.publish(subject, body, headers=h, timeout=self.ack_timeout)
                self.published += len(batch)
                self._chain = batch[-1][2]["Nats-Msg-Id"]
                self._problem(None)
                return
            except BadRequestError as err:
                code = getattr(err, "err_code", None)
                if code == ATOMIC_DISABLED:
                    self.atomic = False
                    log.warning("NATS stream %s does not allow atomic batches now: publishing message by message",
                                self.target.stream)
                if code in (DUPLICATE_IN_BATCH, ATOMIC_DISABLED):
                    await self._send(batch)
                    await self._settle()
                    return
                problem = _one_line(err)
            except Exception as err:  # a lost connection, a timeout, NATS restarting
                problem = _one_line(err)
            attempt += 1
            wait = random.uniform(delay / 2, delay)
            delay = min(delay * 2, self.backoff_max)
            self._problem(problem)
            log.warning("NATS %s: %s publishing a batch of %d from seq %s (attempt %d); retrying in %.1f s with the "
                        "same message ids", self.target.display, problem, len(batch), batch[0][2]["Cdc-Seq"],
                        attempt, wait)
            await self._pause(wait)
            await self._ready()

    async def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if self.stop_event is not None and self.stop_event.is_set():
                raise SinkError("stopped while NATS was unavailable; what it did not acknowledge was not acknowledged "
                                "to the slot either")
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.1))

    async def _ready(self) -> None:
        """A connection, made again if nats-py gave up on it (it keeps reconnecting on its own
        otherwise, holding what is published meanwhile). Waits, with backoff, until there is one."""
        delay = self.backoff_initial
        while self._nc is None or self._nc.is_closed:
            try:
                await self._connect()
                return
            except ConfigError:
                raise
            except Exception as err:
                wait = random.uniform(delay / 2, delay)
                delay = min(delay * 2, self.backoff_max)
                self._problem(f"not reachable ({_one_line(err)})")
                log.warning("NATS %s not reachable (%s); trying again in %.1f s (nothing acknowledged)",
                            self.target.display, _one_line(err), wait)
                await self._pause(wait)

    def _unseen(self, tx: Transaction) -> list[Event]:
        """The events of `tx` the stream did not hold at start. Past the duplicate window JetStream
        would store a republished event again, so what the stream holds is read once at start (its
        last message) and what comes again before it is skipped: on the stream path by commit
        LSN (the feed is in commit order), on the poll paths by seq (they go in seq order)."""
        resume = self._resume
        if resume is None:
            return tx.events
        source, lsn, seq = resume
        events = tx.events
        if source == "stream":
            if tx.commit_lsn is None or lsn is None or tx.commit_lsn > lsn:
                self._resume = None
                return events
            if tx.commit_lsn < lsn:
                self.skipped += len(events)
                return []
            # The same transaction: what comes after its last stored event is new.
            for i, e in enumerate(events):
                if e.seq == seq:
                    self.skipped += i + 1
                    self._resume = None
                    return events[i + 1:]
            self.skipped += len(events)  # an earlier part of it
            return []
        if tx.commit_lsn is not None:  # the stream after a replay: new
            self._resume = None
            return events
        if events[-1].seq <= seq and all(e.seq <= seq for e in events):
            self.skipped += len(events)
            return []
        self._resume = None
        fresh = [e for e in events if e.seq > seq]
        self.skipped += len(events) - len(fresh)
        return fresh

    def _problem(self, problem: str | None) -> None:
        """What /readyz and the sink gauge say."""
        metrics.STATUS.sink_problem = None if problem is None else f"NATS {self.target.display}: {problem}"
        metrics.SINK_CONNECTED.set(1 if problem is None and self._nc is not None and self._nc.is_connected else 0)

    async def _connect(self) -> None:
        import nats

        options = self.target.connect_options() | {
            "connect_timeout": 5, "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5, "allow_reconnect": True,
            "name": "cdc", "error_cb": self._on_error, "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected}
        if self._nc is not None:  # a closed connection (nats-py gave up on it): a new one
            old, self._nc = self._nc, None
            self._closing = True
            try:
                await old.close()
            except Exception:
                pass
            finally:
                self._closing = False
        self._nc = await nats.connect(**options)
        self._js = self._nc.jetstream(timeout=self.ack_timeout)
        first = self._inbox == ""
        self._inbox = self._nc.new_inbox() + "."
        self._replies.clear()

        async def on_reply(msg: Any) -> None:
            self._on_reply(msg)

        await self._nc.subscribe(self._inbox + "*", cb=on_reply, pending_msgs_limit=-1, pending_bytes_limit=-1)
        last = await self._ensure_stream()
        if first:
            await self._read_last(last)
        self._problem(None)

    async def _read_last(self, last_seq: int) -> None:
        """What the stream holds at start: its last message, which the first one published is
        chained to, and up to which what comes again is skipped (see `_unseen`)."""
        if not last_seq:
            return
        try:
            msg = await self._js.get_msg(self.target.stream, seq=last_seq)
        except Exception as err:
            log.warning("NATS stream %s: cannot read its last message (%s): relying on its duplicate window alone",
                        self.target.stream, _one_line(err))
            return
        headers = msg.headers or {}
        self._chain = headers.get("Nats-Msg-Id")
        try:
            seq = int(headers["Cdc-Seq"])
        except (KeyError, ValueError):
            log.warning("NATS stream %s: its last message (stream seq %d) was not published by cdc: relying on the "
                        "duplicate window alone", self.target.stream, last_seq)
            return
        lsn_text = headers.get("Cdc-Commit-Lsn")
        lsn = Lsn.parse(lsn_text) if lsn_text else None
        source = "stream" if headers.get("Cdc-Source") == "stream" else "poll"
        self._resume = (source, lsn, seq)
        log.info("NATS stream %s holds up to event seq %d%s: what comes again before it is not published twice",
                 self.target.stream, seq, f" (commit LSN {lsn})" if lsn is not None else "")

    # nats-py reconnects by itself and holds what is published meanwhile: the feed waits in
    # `write` for the acks. One line each, never nats-py's tracebacks.
    async def _on_error(self, err: Exception) -> None:
        text = f"{type(err).__name__}: {err}".strip()
        if text != self._last_error:
            self._last_error = text
            log.warning("NATS %s: %s", self.target.display, text)

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        self._problem("disconnected, reconnecting")
        log.warning("NATS %s disconnected: the feed waits (nothing acknowledged) while it reconnects",
                    self.target.display)

    async def _on_reconnected(self) -> None:
        self._last_error = None
        self._problem(None)
        log.info("NATS %s reconnected: publishing again", self.target.display)

    async def _ensure_stream(self) -> int:
        """Create the stream, or check the one there: it must take our subjects, keep them on
        file, and have a duplicate window (which is what exactly-once rests on). Returns the
        stream sequence of its last message (0: empty)."""
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import BadRequestError, NotFoundError

        t = self.target
        try:
            info = await self._js.stream_info(t.stream)
        except NotFoundError:
            config = StreamConfig(name=t.stream, subjects=[t.filter], storage=StorageType.FILE,
                                  num_replicas=t.replicas, duplicate_window=t.duplicate_window, allow_atomic=True)
            try:
                info = await self._js.add_stream(config)
            except BadRequestError as err:
                if getattr(err, "err_code", None) == SUBJECTS_OVERLAP:
                    raise ConfigError(f"NATS stream {t.stream} cannot be created: its subjects {t.filter} overlap "
                                      "another stream's; give that stream (--nats-stream) or other subjects "
                                      "(--nats-subject)") from None
                # A server before 2.12 does not know allow_atomic: message by message there.
                log.info("NATS stream %s without atomic batches (%s)", t.stream, err)
                config.allow_atomic = None
                info = await self._js.add_stream(config)
            log.info("created NATS JetStream stream %s (subjects %s, file storage, %d replica(s), duplicate "
                     "window %.0f s%s)", t.stream, t.filter, t.replicas, t.duplicate_window,
                     ", atomic batches" if info.config.allow_atomic else "")
        config = info.config
        problem = stream_problem(config, t)
        if problem is not None:
            raise ConfigError(f"{problem[0]}: {problem[1]}")
        self.atomic = bool(getattr(config, "allow_atomic", False))
        return int(info.state.last_seq or 0) if info.state is not None else 0


def stream_problem(config: Any, t: Target) -> tuple[str, str] | None:
    """Why an existing stream cannot serve the sink (what, and the fix), or None."""
    subjects = config.subjects or []
    if not any(_covers(s, t.filter) for s in subjects):
        return (f"NATS stream {t.stream} takes subjects {subjects}, not {t.filter}",
                f"add {t.filter} to it, or give another --nats-stream")
    if not config.duplicate_window:
        return (f"NATS stream {t.stream} has no duplicate window",
                "exactly once needs one (duplicate_window, e.g. 2m)")
    return None


def probe(t: Target, timeout: float = 5.0) -> tuple[bool, str, str | None]:
    """For `cdc check`: whether NATS answers and the stream can serve: (ok, what, fix)."""
    import socket

    import nats
    from nats.js.errors import NotFoundError

    refused = []
    for server in t.servers:  # nats-py retries a refused first connection for a while: ask TCP first
        parts = urlsplit(server)
        try:
            socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=timeout).close()
        except OSError as err:
            refused.append(f"{parts.netloc}: {err.strerror or err}")
    if len(refused) == len(t.servers):
        return False, f"NATS does not answer ({'; '.join(refused)})", \
            "start it, or fix --sink (nats://host:port)"

    async def go() -> tuple[bool, str, str | None]:
        options = t.connect_options() | {"connect_timeout": timeout, "allow_reconnect": False,
                                         "max_reconnect_attempts": 0}

        async def no_errors(err: Exception) -> None:
            pass

        options["error_cb"] = no_errors
        try:
            nc = await asyncio.wait_for(nats.connect(**options), timeout=timeout * (len(t.servers) + 1))
        except Exception as err:
            return False, f"NATS {','.join(t.servers)} does not answer ({_one_line(err)})", \
                "start it, or fix --sink (nats://host:port) and the credentials"
        try:
            js = nc.jetstream(timeout=timeout)
            try:
                account = await js.account_info()
            except Exception as err:
                return False, f"NATS {','.join(t.servers)} answers but JetStream does not ({_one_line(err)})", \
                    "run nats-server with JetStream enabled (-js), and give the account JetStream limits"
            try:
                info = await js.stream_info(t.stream)
            except NotFoundError:
                return True, (f"NATS {nc.connected_url.netloc if nc.connected_url else t.servers[0]} (JetStream, "
                              f"{account.streams} stream(s)): stream {t.stream} does not exist yet; `cdc run` creates "
                              f"it (subjects {t.filter}, file storage, {t.replicas} replica(s))"), None
            problem = stream_problem(info.config, t)
            if problem is not None:
                return False, problem[0], problem[1]
            c = info.config
            return True, (f"NATS stream {t.stream}: {info.state.messages:,} messages, subjects {c.subjects}, "
                          f"{getattr(c.storage, 'value', c.storage)} storage, {c.num_replicas} replica(s), duplicate "
                          f"window {c.duplicate_window:g} s"
                          f"{', atomic batches' if getattr(c, 'allow_atomic', False) else ''}"), None
        finally:
            await nc.close()

    return asyncio.run(go())


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip().splitlines()[0] if str(err) else type(err).__name__


def partition_of(stream_id: str, partitions: int) -> int:
    """The partition (0 to partitions-1) a stream's events go to with `{partition}` in the
    subject template: FNV-1a (32 bits) of the stream id's UTF-8 bytes, modulo the count. Stable
    across processes and versions, so a reader can compute it too."""
    h = 0x811C9DC5
    for b in stream_id.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def _covers(pattern: str, subject: str) -> bool:
    """Whether NATS subject pattern `pattern` matches every subject `subject` (itself a pattern) does."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]) or (token == "*" and s[i] == ">"):
            return False
    return len(p) == len(s)
