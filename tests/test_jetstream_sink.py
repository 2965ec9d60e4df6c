"""The JetStream sink on its own, against a real nats-server: pipelined publishing keeps commit
order through a connection broken mid-flight, what the stream holds is not published again past
its duplicate window, and a stream whose last message is not ours is chained onto."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import pytest

from cdc.events import Event, Lsn, Transaction
from cdc.jetstream import JetStreamSink, Target, partition_of

from .natsserver import stream_messages

_names = itertools.count()


def _name() -> str:
    return f"K{next(_names)}_{int(time.time() * 1000) % 10_000_000}"


def tx(seqs: list[int], *, lsn: int | None = None, source: str = "stream") -> Transaction:
    events = [Event(s, f"acct-{s % 7}", s, "Deposited", '{"amount": 12345678901234567890.5}', None, None) for s in seqs]
    commit = Lsn(lsn) if lsn is not None else None
    return Transaction(xid=seqs[0], commit_lsn=commit, end_lsn=Lsn(lsn + 1) if lsn is not None else None,
                       commit_time=None, source=source, events=events)


def sink(url: str, stream: str, **kw) -> JetStreamSink:
    return JetStreamSink(Target.parse(url, stream=stream, **kw.pop("target", {})), ack_timeout=2.0,
                         backoff_initial=0.05, backoff_max=0.5, **kw)


def _seqs(url: str, stream: str) -> list[int]:
    return [int(h["Cdc-Seq"]) for _, h, _ in stream_messages(url, stream)]


def _create(url: str, stream: str, subjects: list[str], window: float) -> None:
    import nats
    from nats.js.api import StorageType, StreamConfig

    async def go() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(StreamConfig(name=stream, subjects=subjects, storage=StorageType.FILE,
                                                         duplicate_window=window, allow_atomic=True))
        finally:
            await nc.close()

    asyncio.run(go())


def _publish_foreign(url: str, subject: str) -> None:
    import nats

    async def go() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().publish(subject, b"{}", headers={"Nats-Msg-Id": "someone-else"})
        finally:
            await nc.close()

    asyncio.run(go())


def test_a_server_killed_mid_flight_leaves_the_stream_in_commit_order_without_holes(nats_server):
    """20,000 single-event transactions pipelined; nats-server is killed -9 and restarted in the
    middle. Some messages were on the wire, some in nats-py's buffer: the chain makes JetStream
    refuse every message after a lost one, and the sink publishes again from the first one not
    stored. The stream then holds 1..20,000 once each, in order. (Without the chain it held
    1..23, 5014..8192, 24..5013, 8193..20000: the buffered messages overtook the lost ones.)"""
    stream = _name()
    s = sink(nats_server.url, stream)
    try:
        def restart() -> None:
            nats_server.stop(kill=True)
            time.sleep(0.5)
            nats_server.start()

        t = threading.Thread(target=restart)
        for n in range(1, 20_001):
            s.write(tx([n], lsn=1000 + n))
            if n == 5_000:
                t.start()
        s.flush()
        t.join()
        assert s.published >= 20_000 and s.republished > 0, (s.published, s.republished)
    finally:
        s.close()
    assert _seqs(nats_server.url, stream) == list(range(1, 20_001))


@pytest.mark.parametrize("source", ["stream", "poll"])
def test_what_the_stream_holds_is_not_published_again_past_the_duplicate_window(nats_server, source):
    """A restart after a long outage brings again transactions the stream already holds (the
    slot, or the poller's checkpoint, was behind), after the duplicate window: JetStream alone
    would store them twice. The sink reads the stream's last message at start and skips them,
    down to the event inside a transaction cut in parts."""
    stream = _name()
    _create(nats_server.url, stream, ["cdc.events.*"], window=1.0)
    lsn = (lambda n: 5000 + n) if source == "stream" else (lambda n: None)
    first = [tx([1, 2, 3], lsn=lsn(1), source=source), tx([4], lsn=lsn(2), source=source),
             tx([5, 6], lsn=lsn(3), source=source)]
    s = sink(nats_server.url, stream)
    try:
        for t in first:
            s.write(t)
        s.flush()
    finally:
        s.close()
    time.sleep(1.5)  # past the window
    again = first + [tx([7, 8], lsn=lsn(4), source=source), tx([9], lsn=lsn(5), source=source)]
    s = sink(nats_server.url, stream)
    try:
        for t in again:
            s.write(t)
        s.flush()
        assert s.skipped == 6
    finally:
        s.close()
    assert _seqs(nats_server.url, stream) == list(range(1, 10))


def test_a_transaction_stored_in_part_is_completed_not_repeated(nats_server):
    """The stream holds the first part of a huge transaction (its last message, seq 3, of a
    transaction that goes on to seq 6): after the window, the same transaction comes again whole,
    in other parts. Only seq 4 to 6 are new."""
    stream = _name()
    _create(nats_server.url, stream, ["cdc.events.*"], window=1.0)
    s = sink(nats_server.url, stream)
    try:
        s.write(tx([1, 2, 3], lsn=9000))
        s.flush()
    finally:
        s.close()
    time.sleep(1.5)
    s = sink(nats_server.url, stream)
    try:
        s.write(tx([1, 2], lsn=9000))
        s.write(tx([3, 4], lsn=9000))
        s.write(tx([5, 6], lsn=9000))
        s.write(tx([7], lsn=9100))
        s.flush()
    finally:
        s.close()
    assert _seqs(nats_server.url, stream) == [1, 2, 3, 4, 5, 6, 7]


def test_a_message_someone_else_published_is_chained_onto(nats_server):
    """Another publisher wrote to the stream between two runs: the first message's chain header
    names our last message, JetStream says its last is another; nothing is lost (everything
    before is stored), so the sink chains onto what the stream holds and goes on."""
    stream = _name()
    s = sink(nats_server.url, stream)
    try:
        s.write(tx([1], lsn=100))
        s.flush()
        _publish_foreign(nats_server.url, "cdc.events.elsewhere")
        for n in range(2, 50):
            s.write(tx([n], lsn=100 + n))
        s.flush()
    finally:
        s.close()
    held = stream_messages(nats_server.url, stream)
    assert [h.get("Cdc-Seq") for _, h, _ in held] == ["1", None] + [str(n) for n in range(2, 50)]


def test_partitions_put_every_stream_whole_in_one_partition(nats_server):
    stream = _name()
    s = sink(nats_server.url, stream, target={"partitions": 3})
    try:
        assert s.target.subject == "cdc.events.{partition}.{stream_id}" and s.target.filter == "cdc.events.*.*"
        for n in range(1, 200):
            s.write(tx([n], lsn=100 + n))
        s.flush()
    finally:
        s.close()
    seen: dict[str, set[str]] = {}
    for subject, headers, record in stream_messages(nats_server.url, stream):
        part = subject.split(".")[2]
        assert part == str(partition_of(record["stream_id"], 3))
        seen.setdefault(record["stream_id"], set()).add(part)
    assert all(len(parts) == 1 for parts in seen.values()) and len({p for v in seen.values() for p in v}) == 3
    assert Target.parse("nats://h:1", partitions=3).partition_filter(1) == "cdc.events.1.*"


def test_events_published_again_in_another_order_are_held_once_and_the_chain_goes_on(nats_server, caplog):
    """A hand-off after a failover replays by seq what the stream path published in commit
    order: JetStream holds each already (duplicates), and the next new event's chain names the
    last one republished, not the stream's last. Nothing is lost, so the sink chains on."""
    stream = _name()
    s = sink(nats_server.url, stream)
    try:
        for n in range(1, 6):
            s.write(tx([n], lsn=700 + n))
        s.flush()
        for n in (3, 5, 4):
            s.write(tx([n], source="poll"))
        s.write(tx([6], lsn=800))
        with caplog.at_level("INFO", logger="cdc.jetstream"):
            s.flush()
    finally:
        s.close()
    assert _seqs(nats_server.url, stream) == [1, 2, 3, 4, 5, 6]
    assert "published again in another order" in caplog.text
