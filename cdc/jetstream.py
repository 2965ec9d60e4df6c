"""The NATS JetStream sink: one message per event, exactly once, a transaction at a time.

One slot feeds a durable, replicated log that many consumers on many machines read. Each event
is one message on the subject of its stream (`cdc.events.<stream_id>` by default); its body is
the event's JSON line (the jsonl sink's bytes, payloads exact), its headers say where it came
from. Exactly once rests on JetStream's de-duplication: `Nats-Msg-Id` is derived from the
event's identity (its table and seq), never from the delivery, so the stream, a replay, the
poller, a hand-off and a restart after kill -9 all publish the same id for the same event, and
JetStream stores it once (within the stream's duplicate window).

A transaction is published as atomic batches where the stream allows them (NATS 2.12+,
`allow_atomic`; at most 1,000 messages a batch, so a larger transaction goes in ordered
batches): a reader sees none of a batch or all of it. A batch that JetStream refuses because it
holds an id it has already seen (error 10201: a retry after a crash, or the same events again
along another path with other batch boundaries) is published again message by message, each
de-duplicated on its own: a batch is refused whole even when only some of its ids were seen.
`write` returns once JetStream has acknowledged every message of the transaction, so the slot
is acknowledged only after that. NATS down or unreachable: `write` waits, reconnecting with
backoff (nothing dropped, nothing acknowledged), until it is back or the run is stopped.

nats-py is asyncio; the sink runs its own event loop in a thread and the feed waits on it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import orjson

from .errors import ConfigError, SinkError
from .events import Transaction, wire_records

log = logging.getLogger("cdc.jetstream")

T = TypeVar("T")

BATCH_MAX = 1000  # the server's limit on an atomic batch
DUPLICATE_IN_BATCH = 10201  # "atomic publish batch contains duplicate message id"
ATOMIC_DISABLED = 10174  # "atomic publish is disabled"
SUBJECTS_OVERLAP = 10065  # "subjects overlap with an existing stream"
DEFAULT_SUBJECT = "cdc.events.{stream_id}"
_SPECIAL = {".": "%2E", "*": "%2A", ">": "%3E", "%": "%25", " ": "%20", "\t": "%09", "\r": "%0D", "\n": "%0A"}


def subject_token(stream_id: str) -> str:
    """A stream id as one subject token: the characters NATS gives a meaning (`.`, `*`, `>`) or
    refuses (whitespace), and `%` itself, percent-encoded; everything else as it is. An empty
    id becomes `%00`. Reversible: `urllib.parse.unquote` gives the id back."""
    if not stream_id:
        return "%00"
    if not any(c in _SPECIAL for c in stream_id):
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
        return cls(servers, stream=settings.get("stream") or "CDC", subject=subject, user=user, password=password,
                   token=settings.get("token") or token, creds=settings.get("creds"), tls_ca=settings.get("tls_ca"),
                   replicas=int(settings.get("replicas") or 1))

    @property
    def filter(self) -> str:
        """The stream's subjects: the template with the stream id as a wildcard."""
        return self.subject.replace("{stream_id}", "*")

    @property
    def display(self) -> str:
        return ",".join(self.servers) + f" stream {self.stream}"


class JetStreamSink:
    """Publishes each event of each transaction to JetStream; `write` returns once all of them
    are acknowledged by the stream. `stop_event` interrupts a wait for NATS with SinkError: the
    transaction is then not acknowledged, and comes again."""

    def __init__(self, target: Target, *, table: str = "cdc.events", ack_timeout: float = 10.0,
                 backoff_initial: float = 0.2, backoff_max: float = 10.0,
                 stop_event: threading.Event | None = None, connect: bool = True):
        try:
            import nats  # noqa: F401
        except ImportError:
            raise ConfigError("the nats sink needs nats-py: pip install 'cdc[nats]'") from None
        self.target = target
        self.table = table
        self.ack_timeout = ack_timeout
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.stop_event = stop_event
        self.atomic = False  # whether the stream takes atomic batches (found at connect)
        self.published = 0
        self._last_error: str | None = None
        self._closing = False
        self._nc: Any = None
        self._js: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cdc-nats", daemon=True)
        self._thread.start()
        if connect:
            # Now, so that a stream that cannot serve (overlapping subjects, no duplicate window)
            # stops the run at its start. NATS not answering yet is waited out by `write`.
            try:
                self._call(self._connect(), timeout=30)
            except ConfigError:
                self.close()
                raise
            except Exception as err:
                log.warning("NATS %s not reachable yet (%s): the feed waits for it", target.display,
                            f"{type(err).__name__}: {err}".strip())

    # -- the Sink protocol ----------------------------------------------------------------

    def write(self, tx: Transaction) -> None:
        if not tx.events:
            return
        messages = self._messages(tx)
        delay = self.backoff_initial
        attempt = 0
        while True:
            attempt += 1
            try:
                self._call(self._publish(messages), timeout=self.ack_timeout * (1 + len(messages) / BATCH_MAX) + 5)
                self.published += len(messages)
                if attempt > 1:
                    log.info("NATS %s took transaction xid=%s after %d attempts", self.target.display, tx.xid, attempt)
                return
            except (SinkError, ConfigError):
                raise
            except Exception as err:  # a lost connection, a timeout, NATS restarting: wait and try again
                problem = f"{type(err).__name__}: {err}".strip()
            wait = random.uniform(delay / 2, delay)
            delay = min(delay * 2, self.backoff_max)
            log.warning("NATS %s: %s publishing transaction xid=%s (attempt %d); retrying in %.1f s with the "
                        "same message ids", self.target.display, problem, tx.xid, attempt, wait)
            if self.stop_event is not None and self.stop_event.wait(wait):
                raise SinkError("stopped while NATS was unavailable; the transaction was not acknowledged")
            if self.stop_event is None:
                time.sleep(wait)

    def flush(self) -> None:
        pass  # write returns only once JetStream acknowledged every message: nothing is pending

    def close(self) -> None:
        self._closing = True
        try:
            self._call(self._shutdown(), timeout=10)
        except Exception:
            pass
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self._loop.close()

    async def _shutdown(self) -> None:
        """Close the connection, then end every task nats-py left behind (a reconnect in progress
        leaves its reader, pinger and flusher): a loop stopped under them prints tracebacks at exit."""
        if self._nc is not None:
            try:
                await asyncio.wait_for(self._nc.close(), timeout=5)
            except Exception:
                pass
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- publishing -------------------------------------------------------------------------

    def _messages(self, tx: Transaction) -> list[tuple[str, bytes, dict[str, str]]]:
        dumps, subject, table = orjson.dumps, self.target.subject, self.table
        commit = str(tx.commit_lsn) if tx.commit_lsn is not None else ""
        xid = "" if tx.xid is None else str(tx.xid)
        out = []
        for event, record in zip(tx.events, wire_records(tx)):
            headers = {"Nats-Msg-Id": message_id(table, event.seq), "Cdc-Seq": str(event.seq),
                       "Cdc-Stream-Id": event.stream_id, "Cdc-Type": event.type or "", "Cdc-Source": tx.source}
            if commit:
                headers["Cdc-Commit-Lsn"] = commit
            if xid:
                headers["Cdc-Xid"] = xid
            out.append((subject.format(stream_id=subject_token(event.stream_id)), dumps(record), headers))
        return out

    async def _publish(self, messages: list[tuple[str, bytes, dict[str, str]]]) -> None:
        # A client that is reconnecting is kept: it holds what is published meanwhile and sends it
        # on reconnect (the acks we wait for come then, or the retry repeats the same ids). Closing
        # it mid-reconnect left its reader, pinger and flusher running unowned.
        if self._nc is None or self._nc.is_closed:
            await self._connect()
        if not self.atomic:
            await self._one_by_one(messages)
            return
        for start in range(0, len(messages), BATCH_MAX):
            batch = messages[start:start + BATCH_MAX]
            if not await self._batch(batch):
                await self._one_by_one(batch)

    async def _batch(self, batch: list[tuple[str, bytes, dict[str, str]]]) -> bool:
        """One atomic batch; False when JetStream refused it for an id it already holds (then
        some or all of it is stored: the caller publishes it message by message)."""
        from nats.js.errors import BadRequestError

        batch_id = batch[0][2]["Nats-Msg-Id"] + f"#{len(batch)}#{random.getrandbits(32):08x}"
        last = len(batch) - 1
        for n, (subject, body, headers) in enumerate(batch):
            h = {**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(n + 1)}
            if n < last:
                await self._nc.publish(subject, body, headers=h)
                continue
            h["Nats-Batch-Commit"] = "1"
            try:
                await self._js.publish(subject, body, headers=h, timeout=self.ack_timeout)
            except BadRequestError as err:
                if getattr(err, "err_code", None) == DUPLICATE_IN_BATCH:
                    return False
                if getattr(err, "err_code", None) == ATOMIC_DISABLED:
                    self.atomic = False
                    log.warning("NATS stream %s does not allow atomic batches now: publishing message by message",
                                self.target.stream)
                    return False
                raise
        return True

    async def _one_by_one(self, messages: list[tuple[str, bytes, dict[str, str]]]) -> None:
        """In order, pipelined, every ack awaited; a message whose id JetStream has seen is
        acknowledged as a duplicate, which is what we want."""
        publish = self._js.publish_async
        futures = [await publish(subject, body, headers=headers) for subject, body, headers in messages]
        await asyncio.wait_for(asyncio.gather(*futures), timeout=self.ack_timeout + len(messages) / 1000)

    async def _connect(self) -> None:
        import nats

        t = self.target
        options: dict[str, Any] = {"servers": t.servers, "connect_timeout": 5, "max_reconnect_attempts": -1,
                                   "reconnect_time_wait": 0.5, "allow_reconnect": True, "name": "cdc",
                                   "error_cb": self._on_error, "disconnected_cb": self._on_disconnected,
                                   "reconnected_cb": self._on_reconnected}
        if t.user is not None:
            options |= {"user": t.user, "password": t.password}
        if t.token is not None:
            options["token"] = t.token
        if t.creds is not None:
            options["user_credentials"] = t.creds
        if t.tls_ca is not None:
            import ssl

            options["tls"] = ssl.create_default_context(cafile=t.tls_ca)
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
        await self._ensure_stream()

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
        log.warning("NATS %s disconnected: the feed waits (nothing acknowledged) while it reconnects",
                    self.target.display)

    async def _on_reconnected(self) -> None:
        self._last_error = None
        log.info("NATS %s reconnected: publishing again", self.target.display)

    async def _ensure_stream(self) -> None:
        """Create the stream, or check the one there: it must take our subjects, keep them on
        file, and have a duplicate window (which is what exactly-once rests on)."""
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
        subjects = config.subjects or []
        if not any(_covers(s, t.filter) for s in subjects):
            raise ConfigError(f"NATS stream {t.stream} takes subjects {subjects}, not {t.filter}: add {t.filter} to it, "
                            "or give another --nats-stream")
        if not config.duplicate_window:
            raise ConfigError(f"NATS stream {t.stream} has no duplicate window: exactly once needs one "
                            "(duplicate_window, e.g. 2m)")
        self.atomic = bool(getattr(config, "allow_atomic", False))

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise


def _covers(pattern: str, subject: str) -> bool:
    """Whether NATS subject pattern `pattern` matches every subject `subject` (itself a pattern) does."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]) or (token == "*" and s[i] == ">"):
            return False
    return len(p) == len(s)
