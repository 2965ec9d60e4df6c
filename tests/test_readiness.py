"""Readiness and lag tell the truth in every phase (issue 16): a new consumer's hand-off replay of
a million events is a backlog, and /readyz says 503 until it is delivered."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVENTS = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


def _gauge(base: str, name: str) -> float | None:
    status, text = _get(f"{base}/metrics")
    if status != 200:
        return None
    for fam in text_string_to_metric_families(text):
        if fam.name == name:
            return fam.samples[0].value
    return None


def _backlog(base: str) -> float | None:
    return _gauge(base, "cdc_backlog_events")


def _fill(conn: psycopg.Connection, prefix: str, events: int) -> None:
    """`events` events in ten transactions: the backlog falls in steps on every path."""
    for part in range(10):
        conn.execute("INSERT INTO cdc.events (stream_id, version, type, data) "
                     "SELECT %s || g, 1, 'E', jsonb_build_object('n', g) FROM generate_series(%s::int, %s::int) g",
                     (prefix, part * events // 10 + 1, (part + 1) * events // 10))


def _start(dsn: str, log: Path, consumer: str, mode: str) -> tuple[subprocess.Popen[bytes], str]:
    """`cdc run` into a null sink with its HTTP endpoint on a free port: (process, base URL)."""
    port = _free_port()
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cdc", "run", "--dsn", dsn, "--sink", "null",
                                 "--http-port", str(port), "--consumer", consumer, "--mode", mode],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": ROOT})
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(("mode", "events", "phase", "caught_up"), [
    ("stream", EVENTS, "hand-off replay", "streaming from slot"),
    ("poll", 500_000, "poll catch-up", "following new events"),
])
def test_readyz_is_503_with_a_falling_backlog_until_caught_up(dsn, conn, tmp_path, mode, events, phase, caught_up):
    """A new consumer's hand-off replay of a million events, and a poller's catch-up."""
    _fill(conn, "s", events)
    log = tmp_path / "run.log"
    proc, base = _start(dsn, log, "fresh", mode)
    samples: list[tuple[int, str, float | None]] = []
    lags: list[float] = []  # cdc_lag_seconds while catching up
    began = time.monotonic()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            status, body = _get(f"{base}/readyz")
            backlog = _backlog(base)
            if status:
                samples.append((status, body, backlog))
                if "catching up" in body:
                    lags.append(_gauge(base, "cdc_lag_seconds") or 0.0)
            if status == 200 and caught_up in log.read_text():
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"never ready: {samples[-3:]}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    catching = [(s, b, n) for s, b, n in samples if f"catching up: {phase}" in b]
    assert len(catching) >= 3, samples[:10]
    assert all(s == 503 for s, _, _ in catching)
    backlog = [n for _, _, n in catching if n is not None]
    assert backlog == sorted(backlog, reverse=True), "the backlog never grows during the replay"
    assert backlog[0] > backlog[-1] and backlog[0] >= events // 2, backlog
    # The lag is the age of what is being delivered, not 0 (the events were written before the run).
    assert max(lags) > 0.5, lags
    # Ready only once caught up, and from then on nothing is left.
    first_ready = next(i for i, (s, _, _) in enumerate(samples) if s == 200)
    assert all("catching up" in b or s != 200 for s, b, _ in samples[:first_ready])
    assert samples[first_ready][2] == 0
    text = log.read_text()
    assert f"{phase}: {events:,} events" in text, text[-2000:]
    if time.monotonic() - began > 12:  # long enough for a progress line (one every 5 s)
        assert f"of {events:,} events (" in text and "events/s, ETA" in text, text[-2000:]
    print(f"{len(catching)} samples catching up, backlog {backlog[0]:,.0f} -> {backlog[-1]:,.0f}")


def test_readyz_is_503_while_the_stream_catches_up_after_downtime(dsn, conn, tmp_path):
    from .support import prime

    prime(dsn, "back")  # the consumer exists, caught up, then stops; the table grows meanwhile
    _fill(conn, "d", 300_000)
    log = tmp_path / "run.log"
    proc, base = _start(dsn, log, "back", "stream")
    samples: list[tuple[int, str]] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            status, body = _get(f"{base}/readyz")
            if status:
                samples.append((status, body))
            if status == 200 and "streaming live" in log.read_text():
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"never ready: {samples[-3:]}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    text = log.read_text()
    assert "stream catch-up: " in text and "of WAL to read" in text, text[-2000:]
    catching = [b for s, b in samples if s == 503 and "catching up: stream catch-up" in b]
    assert catching, samples[:5]
    first_ready = next(i for i, (s, _) in enumerate(samples) if s == 200)
    assert all(s == 503 for s, _ in samples[:first_ready])
