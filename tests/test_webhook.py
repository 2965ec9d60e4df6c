"""The webhook sink against a real local HTTP receiver that can be told to fail."""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest

from cdc.errors import ConfigError, SinkError
from cdc.events import Event, Lsn, Transaction
from cdc.sinks import Sink, open_sink
from cdc.webhook import WebhookSink, idempotency_key


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int


@dataclass
class Receiver:
    """Records every request; answers from `script` (status, headers, delay) then 200s."""

    server: ThreadingHTTPServer
    requests: list[Request] = field(default_factory=list)
    script: list[tuple[int, dict[str, str], float]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/events"

    def fail_with(self, *statuses: int, headers: dict[str, str] | None = None, delay: float = 0.0) -> None:
        self.script.extend((s, headers or {}, delay) for s in statuses)


def start_receiver(port: int = 0, idle_timeout: float | None = None) -> Receiver:
    receiver: Receiver

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        timeout = idle_timeout  # closes a kept-alive connection idle this long

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers["Content-Length"]))
            receiver.requests.append(Request(self.path, dict(self.headers.items()), data, self.client_address[1]))
            status, headers, delay = receiver.script.pop(0) if receiver.script else (200, {}, 0.0)
            if delay:
                time.sleep(delay)
            reply = b"no" if status >= 300 else b"ok"
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    receiver = Receiver(server)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = start_receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tx(*seqs: int, lsn: str | None = "0/16B3748", part: int = 0, final: bool = True) -> Transaction:
    events = [Event(s, "order-1", s, "Placed", f"{{\"n\": {s}}}", "{}", datetime(2024, 1, 1, tzinfo=timezone.utc)) for s in seqs]
    return Transaction(741, Lsn.parse(lsn) if lsn else None, None, None, events,
                       "stream" if lsn else "poll", part, final)


def fast(url: str, **kw: object) -> WebhookSink:
    return WebhookSink(url, backoff_initial=0.01, backoff_max=0.05, timeout=2.0, **kw)  # type: ignore[arg-type]


def test_is_a_sink_and_opens_from_its_spec(receiver: Receiver) -> None:
    sink: Sink = open_sink(f"webhook:{receiver.url}")
    assert isinstance(sink, WebhookSink)
    sink.close()


def test_posts_one_json_body_per_transaction(receiver: Receiver) -> None:
    sink = fast(receiver.url)
    t = tx(1, 2)
    sink.write(t)
    sink.flush()
    [req] = receiver.requests
    assert req.path == "/events"
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Idempotency-Key"] == "0/16B3748"
    assert "X-Cdc-Signature" not in req.headers
    assert orjson.loads(req.body) == {"xid": 741, "commit_lsn": "0/16B3748",
                                      "events": orjson.loads(orjson.dumps(t.records()))}
    sink.close()


def test_skips_transactions_without_events(receiver: Receiver) -> None:
    sink = fast(receiver.url)
    sink.write(tx())
    assert receiver.requests == []


def test_reuses_one_connection(receiver: Receiver) -> None:
    sink = fast(receiver.url)
    for i in range(1, 6):
        sink.write(tx(i, lsn=f"0/{i:X}"))
    assert len({r.client_port for r in receiver.requests}) == 1
    sink.close()


def test_idempotency_keys_for_parts_and_poll_transactions() -> None:
    assert idempotency_key(tx(1)) == "0/16B3748"
    assert idempotency_key(tx(1, part=0, final=False)) == "0/16B3748-0"
    assert idempotency_key(tx(5, part=2, final=True)) == "0/16B3748-2"
    assert idempotency_key(tx(12, 20, 40, lsn=None)) == "seq-12-40"


def test_a_part_says_which_part_it_is(receiver: Receiver) -> None:
    fast(receiver.url).write(tx(1, part=1, final=False))
    doc = orjson.loads(receiver.requests[0].body)
    assert (doc["part"], doc["final"]) == (1, False)
    assert receiver.requests[0].headers["Idempotency-Key"] == "0/16B3748-1"


def test_signature_is_an_hmac_of_the_body(receiver: Receiver) -> None:
    fast(receiver.url, secret="s3cret").write(tx(1))
    req = receiver.requests[0]
    expected = "sha256=" + hmac.new(b"s3cret", req.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(req.headers["X-Cdc-Signature"], expected)


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
def test_retries_transient_statuses_with_the_same_key(receiver: Receiver, status: int) -> None:
    receiver.fail_with(status, status)
    fast(receiver.url).write(tx(1))
    assert len(receiver.requests) == 3
    assert {r.headers["Idempotency-Key"] for r in receiver.requests} == {"0/16B3748"}
    assert len({r.body for r in receiver.requests}) == 1


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_client_errors_are_not_retried(receiver: Receiver, status: int) -> None:
    receiver.fail_with(status)
    with pytest.raises(SinkError, match=f"answered {status}") as err:
        fast(receiver.url).write(tx(1))
    assert len(receiver.requests) == 1
    assert "\n" not in str(err.value)


def test_retry_after_is_honoured(receiver: Receiver) -> None:
    receiver.fail_with(429, headers={"Retry-After": "0.5"})
    t0 = time.monotonic()
    fast(receiver.url).write(tx(1))
    assert time.monotonic() - t0 >= 0.5
    assert len(receiver.requests) == 2


def test_gives_up_after_max_attempts(receiver: Receiver) -> None:
    receiver.fail_with(503, 503, 503, 503)
    with pytest.raises(SinkError, match="after 3 attempts"):
        fast(receiver.url, max_attempts=3).write(tx(1))
    assert len(receiver.requests) == 3


def test_timeouts_are_retried(receiver: Receiver) -> None:
    receiver.fail_with(200, delay=1.0)
    sink = WebhookSink(receiver.url, timeout=0.3, backoff_initial=0.01)
    sink.write(tx(1))
    assert len(receiver.requests) == 2


def test_connection_refused_is_retried_until_the_receiver_comes_up() -> None:
    port = free_port()
    late: list[Receiver] = []
    timer = threading.Timer(0.5, lambda: late.append(start_receiver(port)))
    timer.start()
    try:
        fast(f"http://127.0.0.1:{port}/events").write(tx(1))
        assert len(late[0].requests) == 1
    finally:
        timer.join()
        for r in late:
            r.server.shutdown()
            r.server.server_close()


def test_connection_refused_gives_up_after_max_attempts() -> None:
    with pytest.raises(SinkError, match="refused the connection"):
        fast(f"http://127.0.0.1:{free_port()}/events", max_attempts=2).write(tx(1))


def test_stop_during_retries_raises_promptly(receiver: Receiver) -> None:
    receiver.fail_with(*[503] * 100)
    stop = threading.Event()
    sink = WebhookSink(receiver.url, backoff_initial=5.0, backoff_max=30.0, stop_event=stop)
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(SinkError, match="stopped during retries; the transaction was not acknowledged"):
        sink.write(tx(1))
    assert time.monotonic() - t0 < 1.3


def test_a_connection_the_receiver_closed_is_reopened_without_a_retry() -> None:
    receiver = start_receiver(idle_timeout=0.1)
    try:
        sink = WebhookSink(receiver.url, max_attempts=1)
        sink.write(tx(1))
        time.sleep(0.4)  # the receiver drops the idle kept-alive connection
        sink.write(tx(2, lsn="0/2"))
        receiver.fail_with(200, headers={"Connection": "close"})
        sink.write(tx(3, lsn="0/3"))
        sink.write(tx(4, lsn="0/4"))
        assert len(receiver.requests) == 4
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def test_errors_never_show_url_credentials(receiver: Receiver) -> None:
    receiver.fail_with(404)
    url = receiver.url.replace("http://", "http://user:hunter2@")
    with pytest.raises(SinkError) as err:
        fast(url).write(tx(1))
    assert "hunter2" not in str(err.value) and "127.0.0.1" in str(err.value)
    assert receiver.requests[0].headers["Authorization"].startswith("Basic ")


def test_rejects_a_non_http_url() -> None:
    with pytest.raises(ConfigError):
        WebhookSink("ftp://example.com/x")


def test_a_worker_slice_has_its_own_key_and_says_which_slice_it_is(receiver: Receiver) -> None:
    sink = fast(receiver.url, slice_label="w2of4")
    sink.write(tx(7, 9))
    assert receiver.requests[0].headers["Idempotency-Key"] == "0/16B3748-w2of4"
    assert orjson.loads(receiver.requests[0].body)["slice"] == "w2of4"
    assert idempotency_key(tx(7, 9)) == "0/16B3748"
