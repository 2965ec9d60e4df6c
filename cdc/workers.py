"""Parallel handling: one feed, N workers, each stream's events on one worker, in version order.

    consumer = Consumer(dsn, consumer="projector", auto_ack=False)
    with ParallelDispatcher(consumer, handle, workers=8) as dispatcher:
        dispatcher.run()                 # until consumer.stop(); re-raises a handler's error
    consumer.close()

Each transaction is cut into per-worker slices by a stable hash of a key (the stream id by
default; crc32, not Python's per-process salted `hash()`, so a stream lands on the same worker
after a restart). A slice is a `Transaction` with the same xid and LSNs and only that worker's
events, so handlers keep the consumer's signature. Slices wait in a bounded queue per worker.

What changes with N > 1, and what does not:
- A transaction whose events span streams on different workers is no longer applied
  atomically by one handler call: each worker sees its slice, at its own pace. Per stream,
  events still arrive in version order, each stream on one worker.
- The acknowledged position (slot and checkpoint) is a low watermark: the end of the newest
  transaction such that it and every earlier one have been handled by all their workers. A
  crash replays from there: per stream at-least-once, never a gap, never reordered.
- A huge transaction (handed over in parts) is acknowledged only after its final part's
  slices all completed; its final part reaches every worker that had a part of it, even with
  no events of its own, so a worker holding it open (a projection) knows it is complete.
- Back-pressure: a worker's queue holds at most `queue_size` slices and `queue_events` events
  (one slice bigger than that still fits an empty queue), and at most `workers * queue_size`
  transactions (`workers * queue_events` events) wait for acknowledgement: handled ones behind
  an unfinished one are kept until it finishes. One stuck worker stalls the whole feed instead
  of growing memory; /metrics shows its queue depth and the age of its oldest unfinished slice. The feed stalling also stops answering the server: after
  `wal_sender_timeout` (60 s by default) it reconnects and resumes from the low watermark.
- A handler's error stops every worker; nothing past the failed slice is acknowledged; `run`
  re-raises it.
- The consumer is not thread-safe, so only the thread running `run` acknowledges: workers
  report completions through a queue, drained between transactions, while waiting for queue
  space, and when the consumer is about to save a checkpoint. While the feed is idle the last
  completions are acknowledged at the next transaction or checkpoint, or when it stops.

`ParallelProjection` (partitions.py) is the exactly-once variant: each worker has its own
connection and its own checkpoint row, written in the same database transaction as its slice.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Protocol, Self

import psycopg

from . import metrics
from .checkpoint import Position
from .errors import CdcError, ConfigError
from .events import Event, Lsn, Transaction

log = logging.getLogger("cdc.workers")

DEFAULT_QUEUE_SIZE = 64
DEFAULT_QUEUE_EVENTS = 10_000

Handler = Callable[[Transaction], object]


class Feed(Protocol):
    """What the dispatcher needs of a `Consumer` (created with ``auto_ack=False``)."""

    def __iter__(self) -> Iterator[Transaction]: ...

    def ack(self, tx: Transaction) -> None: ...

    def stop(self) -> None: ...


def stream_key(event: Event) -> str:
    return event.stream_id


def worker_of(key: object, workers: int) -> int:
    """The worker a key belongs to: the same in every process and on every run."""
    data = key if isinstance(key, bytes) else str(key).encode()
    return zlib.crc32(data) % workers


class _Slice:
    __slots__ = ("enqueued", "seqno", "size", "tx")

    def __init__(self, seqno: int, tx: Transaction):
        self.seqno = seqno
        self.tx = tx
        self.size = len(tx.events)
        self.enqueued = time.monotonic()


class _Entry:
    """A transaction handed over by the consumer and the number of its slices not yet handled."""

    __slots__ = ("remaining", "tx")

    def __init__(self, tx: Transaction, remaining: int):
        self.tx = tx
        self.remaining = remaining


class _WorkerQueue:
    """FIFO bounded by slices and by events; also what /metrics reports about a worker."""

    def __init__(self, max_slices: int, max_events: int):
        self.max_slices = max_slices
        self.max_events = max_events
        self._items: deque[_Slice] = deque()
        self._events = 0
        self._cond = threading.Condition()
        self._closed = False
        self.current: _Slice | None = None  # the slice being handled

    def _full(self, size: int) -> bool:
        return bool(self._items) and (len(self._items) >= self.max_slices or self._events + size > self.max_events)

    def put(self, item: _Slice, timeout: float) -> bool:
        """Queue `item`, waiting up to `timeout` s for room; False when there was none."""
        with self._cond:
            if self._full(item.size) and not self._cond.wait_for(lambda: not self._full(item.size), timeout):
                return False
            self._items.append(item)
            self._events += item.size
            self._cond.notify_all()
            return True

    def get(self) -> _Slice | None:
        """The next slice, waiting for one; None once closed and empty."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                return None
            item = self._items.popleft()
            self._events -= item.size
            self.current = item
            self._cond.notify_all()
            return item

    def close(self, *, drop: bool) -> None:
        with self._cond:
            self._closed = True
            if drop:
                self._items.clear()
                self._events = 0
            self._cond.notify_all()

    def depth(self) -> int:
        return len(self._items)

    def oldest_age(self) -> float:
        oldest = self.current
        if oldest is None:
            try:
                oldest = self._items[0]
            except IndexError:
                return 0.0
        return max(0.0, time.monotonic() - oldest.enqueued)


class _Failure:
    __slots__ = ("error", "tx", "worker")

    def __init__(self, worker: int, tx: Transaction, error: BaseException):
        self.worker = worker
        self.tx = tx
        self.error = error


class ParallelDispatcher:
    """Runs `handler` on `workers` threads, each stream on one of them; acknowledges the low
    watermark on `consumer` (which must have ``auto_ack=False``). See the module docstring.

    `handler`: one callable for all workers (it must then be thread-safe), or a sequence of
    one per worker. `key(event)`: what keeps events together and in order (default: the stream
    id); str, bytes or anything whose str() is stable.
    """

    def __init__(
        self,
        consumer: Feed,
        handler: Handler | Sequence[Handler],
        *,
        workers: int = 8,
        key: Callable[[Event], object] = stream_key,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        queue_events: int = DEFAULT_QUEUE_EVENTS,
    ):
        if workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}")
        if queue_size < 1 or queue_events < 1:
            raise ConfigError("queue_size and queue_events must be at least 1")
        if getattr(consumer, "auto_ack", False):
            raise ConfigError("the dispatcher acknowledges by itself: create the Consumer with auto_ack=False")
        handlers = list(handler) if isinstance(handler, Sequence) else [handler] * workers
        if len(handlers) != workers:
            raise ConfigError(f"{len(handlers)} handlers for {workers} workers")
        self.consumer = consumer
        self.workers = workers
        self.key = key
        self._handlers = handlers
        self._queues = [_WorkerQueue(queue_size, queue_events) for _ in range(workers)]
        self._threads: list[threading.Thread] = []
        self._done: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._inflight: deque[_Entry] = deque()  # in the consumer's order
        self._inflight_events = 0
        self._max_inflight = workers * queue_size
        self._max_inflight_events = workers * queue_events
        self._waiting: dict[int, _Entry] = {}  # seqno -> entry with slices not yet handled
        self._seqno = itertools.count()
        self._failure: _Failure | None = None
        self._fail_lock = threading.Lock()
        self._running = False
        self._dispatched: tuple[Lsn, int] | None = None  # (commit_lsn, part) of the newest stream slice out
        self._open_parts: set[int] = set()  # workers holding parts of an unfinished huge transaction
        self.acknowledged: Transaction | None = None
        self.handled_transactions = 0
        self.dispatched_transactions = 0  # handed to workers (parts count one each)
        self._install_hooks()

    # -- public API ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        for w in range(self.workers):
            t = threading.Thread(target=self._work, args=(w,), name=f"cdc-worker-{w}", daemon=True)
            t.start()
            self._threads.append(t)
            label = str(w)
            q = self._queues[w]
            metrics.WORKER_QUEUE_DEPTH.labels(label).set_function(q.depth)
            metrics.WORKER_OLDEST_AGE.labels(label).set_function(q.oldest_age)

    def run(self) -> None:
        """Dispatch until the consumer's iteration ends (`stop()`, endpos), wait for every queued
        slice, acknowledge; or re-raise the first handler error, acknowledging nothing past it."""
        self.start()
        for tx in self.consumer:
            self._dispatch(tx)
            self._settle()
            if self._failure is not None:
                break
        while self._inflight and self._failure is None:
            self._wait_for_completion(0.1)
            self._settle()
        if self._failure is not None:
            f = self._failure
            log.error("worker %d failed on transaction xid=%s lsn=%s: %s; stopping all workers, "
                      "nothing past it acknowledged", f.worker, f.tx.xid, f.tx.commit_lsn, f.error)
            raise f.error

    def stop(self) -> None:
        """End `run` after the queued slices are handled. Safe from signal handlers."""
        self.consumer.stop()

    def close(self) -> None:
        """Stop the workers: queued slices are handled unless a handler failed."""
        if not self._running:
            return
        failed = self._failure is not None
        for q in self._queues:
            q.close(drop=failed)
        for t in self._threads:
            # A handler stuck after a failure elsewhere must not keep the process from exiting.
            t.join(5.0 if failed else None)
            if t.is_alive():
                log.warning("%s is still in its handler; leaving it behind", t.name)
        self._threads.clear()
        self._running = False
        self._settle()
        for w in range(self.workers):
            for gauge in (metrics.WORKER_QUEUE_DEPTH, metrics.WORKER_OLDEST_AGE):
                try:
                    gauge.remove(str(w))
                except KeyError:
                    pass

    @property
    def outstanding(self) -> int:
        """Transactions handed over by the consumer and not yet acknowledged."""
        return len(self._inflight)

    def queue_depths(self) -> list[int]:
        return [q.depth() for q in self._queues]

    # -- dispatching (the consumer's thread) ----------------------------------------------------

    def _dispatch(self, tx: Transaction) -> None:
        size = len(tx.events)
        while self._inflight and (len(self._inflight) >= self._max_inflight
                                  or self._inflight_events + size > self._max_inflight_events):
            # The low watermark is held back (a slow or stuck slice): wait rather than pile up.
            self._wait_for_completion(0.05)
            self._settle()
            if self._failure is not None:
                return
        seqno = next(self._seqno)
        slices = self._split(tx)
        entry = _Entry(tx, len(slices))
        self._inflight.append(entry)
        self._inflight_events += size
        self.dispatched_transactions += 1
        if not slices:
            return
        self._waiting[seqno] = entry
        for w, part in slices:
            item = _Slice(seqno, part)
            q = self._queues[w]
            while not q.put(item, 0.05):
                # Full: the feed waits for this worker (back-pressure), acknowledging meanwhile.
                self._settle()
                if self._failure is not None:
                    return

    def _split(self, tx: Transaction) -> list[tuple[int, Transaction]]:
        if tx.commit_lsn is not None:
            # After a reconnect the stream resends what followed the acknowledged position:
            # slices already out must not go out again (a projection holding a huge transaction
            # open would apply its first parts twice). Their entry completes in order instead.
            # By commit LSN and part: a part's end_lsn is only a bound before the last (pgoutput).
            mark = (tx.commit_lsn, tx.part)
            if self._dispatched is not None and mark <= self._dispatched:
                return []
            self._dispatched = mark
        by_worker: dict[int, list[Event]] = {}
        n, key = self.workers, self.key
        for e in tx.events:
            k = key(e)
            w = zlib.crc32(k if isinstance(k, bytes) else str(k).encode()) % n
            bucket = by_worker.get(w)
            if bucket is None:
                by_worker[w] = [e]
            else:
                bucket.append(e)
        if not tx.final:
            self._open_parts.update(by_worker)
        elif self._open_parts:
            for w in self._open_parts:
                by_worker.setdefault(w, [])
            self._open_parts.clear()
        if len(by_worker) == 1:
            ((w, events),) = by_worker.items()
            return [(w, tx if len(events) == len(tx.events) else replace(tx, events=events))]
        return [(w, replace(tx, events=events)) for w, events in sorted(by_worker.items())]

    def _collect(self) -> None:
        """Count the completions workers reported (no acknowledgement here)."""
        done, waiting = self._done, self._waiting
        while True:
            try:
                seqno = done.get_nowait()
            except queue.Empty:
                return
            entry = waiting[seqno]
            entry.remaining -= 1
            if entry.remaining == 0:
                del waiting[seqno]

    def _settle(self) -> None:
        """Acknowledge the newest transaction that it and all before it are handled."""
        self._collect()
        inflight = self._inflight
        newest: _Entry | None = None
        while inflight and inflight[0].remaining == 0:
            newest = inflight.popleft()
            self._inflight_events -= len(newest.tx.events)
            self.handled_transactions += newest.tx.final
        if newest is not None:
            self.consumer.ack(newest.tx)
            self.acknowledged = newest.tx

    def _wait_for_completion(self, timeout: float) -> None:
        try:
            seqno = self._done.get(timeout=timeout)
        except queue.Empty:
            return
        self._done.put(seqno)  # _collect counts it, with any others

    # -- workers ----------------------------------------------------------------------------------

    def _work(self, w: int) -> None:
        q, handle, report = self._queues[w], self._handlers[w], self._done.put
        while True:
            item = q.get()
            if item is None:
                return
            try:
                if self._failure is None:
                    handle(item.tx)
                    report(item.seqno)
            except BaseException as err:  # noqa: BLE001 - a user's handler may raise anything
                self._fail(w, item.tx, err)
            finally:
                q.current = None

    def _fail(self, w: int, tx: Transaction, err: BaseException) -> None:
        with self._fail_lock:
            if self._failure is None:
                self._failure = _Failure(w, tx, err)
        for q in self._queues:
            q.close(drop=True)
        # Ends an idle feed's iteration too, so `run` sees the failure at once.
        self.consumer.stop()

    # -- hooks into the consumer's checkpoints ---------------------------------------------------

    def _install_hooks(self) -> None:
        """Two hooks, both run on the consumer's own thread just before it saves a position:
        acknowledge what completed (so a busy or just-idle feed's checkpoint is current), and
        refuse to save a position that covers an unfinished slice: a guard, since the consumer
        itself never moves past what is not acknowledged (at --endpos and at the end of a
        hand-off it waits for the acknowledgement), so a save waits for the workers (or fails,
        if one failed) rather than going past them."""
        consumer: Any = self.consumer
        if hasattr(consumer, "on_checkpoint"):
            previous = consumer.on_checkpoint

            def before_checkpoint() -> None:
                self._settle()
                if previous is not None:
                    previous()

            consumer.on_checkpoint = before_checkpoint
        if getattr(consumer, "checkpoints", None) is not None:
            consumer.checkpoints = _GuardedCheckpoints(consumer.checkpoints, self)

    def _covers(self, position: Position, tx: Transaction) -> bool:
        if tx.end_lsn is not None:
            return position.lsn is not None and tx.end_lsn <= position.lsn
        return any(position.handled(e.seq) for e in tx.events)

    def wait_until_handled(self, position: Position) -> None:
        """Return once no unfinished slice is covered by `position`; raise if one never will be."""
        while True:
            self._collect()
            if not any(e.remaining and self._covers(position, e.tx) for e in self._inflight):
                return
            if self._failure is not None:
                raise self._failure.error
            if not self._running:
                raise CdcError(f"position {position.lsn} covers transactions the workers never handled: not saved")
            self._wait_for_completion(0.1)


class _GuardedCheckpoints:
    """Stands in for `consumer.checkpoints`: saves a position only once the workers handled
    every transaction it covers."""

    def __init__(self, inner: Any, dispatcher: ParallelDispatcher):
        self.inner = inner
        self.dispatcher = dispatcher

    def save(self, position: Position, *, conn: psycopg.Connection | None = None) -> None:
        self.dispatcher.wait_until_handled(position)
        self.inner.save(position, conn=conn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def run_workers(consumer: Any, sink: Any, workers: int, wrap: Callable[[Any], Handler]) -> None:
    """`cdc run --workers N`: `wrap(sink)` (retries, dead letters) per worker, or of each of
    `sink.per_worker` where the sink has one a worker (a projection's partitions, webhook
    connections)."""
    per_worker = getattr(sink, "per_worker", None)
    if per_worker is not None:
        handlers = [wrap(s) for s in per_worker]
    else:
        handlers = [wrap(sink) for _ in range(workers)]
    with ParallelDispatcher(consumer, handlers, workers=workers) as dispatcher:
        dispatcher.run()
