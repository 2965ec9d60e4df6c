"""`cdc run` as an operator runs it: webhook and python sinks, poison handling, HTTP endpoint,
configuration precedence, logs without payloads, SIGTERM during retries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from cdc.embedded import wait_for

from .support import prime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Receiver:
    """A real HTTP receiver: records requests; answers with `status` (changeable)."""

    def __init__(self, status: int = 200):
        self.status = status
        self.requests: list[tuple[dict[str, str], dict]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers), json.loads(body)))
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def seqs(self) -> list[int]:
        return [e["seq"] for _, b in self.requests for e in b["events"]]

    def close(self) -> None:
        self.server.shutdown()


def cdc_run(dsn: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cdc", "run", "--dsn", dsn, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def insert(conn: psycopg.Connection, stream: str, n: int, data: str = '{"v": 1}') -> None:
    with conn.transaction():
        for v in range(1, n + 1):
            conn.execute("INSERT INTO cdc.events(stream_id, version, type, data) VALUES (%s, %s, 'E', %s)", (stream, v, data))


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    return proc.returncode, err.decode()


def test_webhook_sink_posts_each_transaction_with_a_stable_idempotency_key(dsn, conn):
    rx = Receiver()
    proc = cdc_run(dsn, "--sink", f"webhook:{rx.url}", "--webhook-secret", "s3cret")
    try:
        insert(conn, "a", 3)
        insert(conn, "b", 2)
        assert wait_for(lambda: len(rx.seqs()) >= 5, timeout=30), rx.requests
    finally:
        code, err = stop(proc)
        rx.close()
    assert code == 0, err
    assert sorted(rx.seqs()) == [1, 2, 3, 4, 5]
    for headers, body in rx.requests:
        assert headers["Idempotency-Key"] and headers["X-Cdc-Signature"].startswith("sha256=")
        assert set(body) >= {"xid", "commit_lsn", "events"}
        assert list(body["events"][0]) == ["seq", "stream_id", "version", "type", "data", "metadata",
                                           "created_at", "xid", "commit_lsn", "source"]


def test_webhook_with_four_workers_posts_every_slice_once_in_per_stream_order(dsn, conn):
    prime(dsn, "default")  # the slot exists: everything comes from the stream, keyed by commit LSN
    rx = Receiver()
    with conn.transaction():  # one transaction spanning streams that land on different workers
        for v in range(1, 4):
            for stream in ("a", "b", "c", "d", "e", "f"):
                conn.execute("INSERT INTO cdc.events(stream_id, version, type, data) VALUES (%s, %s, 'E', '{}')",
                             (stream, v))
    insert(conn, "g", 2)
    end = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
    proc = cdc_run(dsn, "--sink", f"webhook:{rx.url}", "--workers", "4", "--endpos", end)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        rx.close()
    assert proc.returncode == 0, err.decode()
    assert sorted(rx.seqs()) == list(range(1, 21))
    keys = [h["Idempotency-Key"] for h, _ in rx.requests]
    assert len(keys) == len(set(keys)), "each slice has its own key"
    first_lsn = rx.requests[0][1]["commit_lsn"]
    slices = [b for _, b in rx.requests if b["commit_lsn"] == first_lsn]
    assert len(slices) > 1 and all(b["slice"].endswith("of4") for b in slices)
    for h, b in rx.requests:
        assert h["Idempotency-Key"] == f"{b['commit_lsn']}-{b['slice']}"
    for stream in "abcdefg":
        versions = [e["version"] for _, b in rx.requests for e in b["events"] if e["stream_id"] == stream]
        assert versions == sorted(versions) and versions, (stream, versions)


def test_sigterm_during_webhook_retries_exits_cleanly_without_acknowledging(dsn, conn):
    rx = Receiver(status=503)
    proc = cdc_run(dsn, "--sink", f"webhook:{rx.url}")
    insert(conn, "a", 2)
    assert wait_for(lambda: len(rx.requests) >= 2, timeout=30)
    t0 = time.monotonic()
    code, err = stop(proc)
    assert code == 0, err
    assert time.monotonic() - t0 < 5
    # The receiver comes back: the unsent transaction is delivered, so it was not acknowledged.
    rx.status = 200
    rx.requests.clear()
    proc = cdc_run(dsn, "--sink", f"webhook:{rx.url}")
    try:
        assert wait_for(lambda: rx.seqs() == [1, 2], timeout=30), rx.requests
    finally:
        stop(proc)
        rx.close()


def test_webhook_4xx_is_poison_moved_to_dead_letters_and_the_feed_goes_on(dsn, conn):
    rx = Receiver(status=422)
    proc = cdc_run(dsn, "--sink", f"webhook:{rx.url}", "--max-attempts", "2", "--on-poison", "dead-letter")
    try:
        insert(conn, "a", 2)
        assert wait_for(lambda: conn.execute("SELECT count(*) FROM cdc.dead_letters").fetchone()[0] == 1, timeout=30)
        rx.status = 200
        insert(conn, "b", 1)
        assert wait_for(lambda: 3 in rx.seqs(), timeout=30)
    finally:
        code, err = stop(proc)
        rx.close()
    row = conn.execute("SELECT seqs, attempts, error FROM cdc.dead_letters").fetchone()
    assert row[0] == [1, 2] and row[1] == 2 and "422" in row[2]


def test_poison_stops_by_default_without_acknowledging(dsn, conn):
    rx = Receiver(status=400)
    proc = cdc_run(dsn, "--sink", f"webhook:{rx.url}", "--max-attempts", "2")
    insert(conn, "a", 1)
    _, raw = proc.communicate(timeout=60)
    err = raw.decode()
    rx.close()
    assert proc.returncode == 1
    assert "giving up" in err.strip().splitlines()[-1] and "Traceback" not in err
    # ...and the slot was not moved past the poison transaction: it streams again.
    rx2 = Receiver()
    proc = cdc_run(dsn, "--sink", f"webhook:{rx2.url}")
    try:
        assert wait_for(lambda: rx2.seqs() == [1], timeout=30)
    finally:
        stop(proc)
        rx2.close()


def test_python_sink_is_exactly_once_with_the_checkpoint(dsn, conn, tmp_path):
    (tmp_path / "proj.py").write_text(
        "def apply(conn, tx):\n"
        "    for e in tx.events:\n"
        "        conn.execute('INSERT INTO projected(seq) VALUES (%s)', (e.seq,))\n"
    )
    conn.execute("CREATE TABLE projected(seq bigint PRIMARY KEY)")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}"}
    proc = cdc_run(dsn, "--sink", "python:proj:apply", env=env)
    insert(conn, "a", 3)
    assert wait_for(lambda: conn.execute("SELECT count(*) FROM projected").fetchone()[0] == 3, timeout=30)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    insert(conn, "b", 2)
    proc = cdc_run(dsn, "--sink", "python:proj:apply", env=env)
    try:
        assert wait_for(lambda: conn.execute("SELECT count(*) FROM projected").fetchone()[0] == 5, timeout=30)
        time.sleep(0.5)
    finally:
        stop(proc)
    assert [r[0] for r in conn.execute("SELECT seq FROM projected ORDER BY seq")] == [1, 2, 3, 4, 5]


def test_http_endpoint_serves_health_readiness_and_prometheus_metrics(dsn, conn):
    proc = cdc_run(dsn, "--sink", "null", "--http-port", "0", "--log-level", "info")
    try:
        port = None
        deadline = time.monotonic() + 30
        assert proc.stderr is not None
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline().decode()
            if "health and metrics on http://" in line:
                port = int(line.split("http://")[1].split("/")[0].rsplit(":", 1)[1])
        assert port, "no HTTP port announced"
        base = f"http://127.0.0.1:{port}"
        insert(conn, "a", 4)
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
        assert wait_for(lambda: _ready(base), timeout=30)

        def events_total() -> float:
            text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
            for fam in text_string_to_metric_families(text):
                if fam.name == "cdc_events":
                    return sum(s.value for s in fam.samples if s.name == "cdc_events_total" and s.labels.get("path") in ("stream", "poll"))
            return 0.0

        assert wait_for(lambda: events_total() >= 4, timeout=30)
        names = {f.name for f in text_string_to_metric_families(urllib.request.urlopen(f"{base}/metrics").read().decode())}
        assert {"cdc_events", "cdc_lag_bytes", "cdc_lag_seconds", "cdc_reconnects", "cdc_slot_retained_wal_bytes"} <= names
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def _ready(base: str) -> bool:
    try:
        return urllib.request.urlopen(f"{base}/readyz", timeout=5).status == 200
    except Exception:
        return False


def test_flags_override_environment_which_overrides_the_config_file(dsn, conn, tmp_path):
    out_file, out_env, out_flag = tmp_path / "file.jsonl", tmp_path / "env.jsonl", tmp_path / "flag.jsonl"
    cfg = tmp_path / "cdc.toml"
    cfg.write_text(f'sink = "jsonl:{out_file}"\nconsumer = "fromfile"\nmode = "stream"\n')
    insert(conn, "a", 1)
    end = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
    proc = cdc_run(dsn, "--config", str(cfg), "--endpos", "now", env={"CDC_SINK": f"jsonl:{out_env}"})
    assert proc.wait(30) == 0, proc.stderr.read().decode()
    assert out_env.exists() and not out_file.exists()
    assert conn.execute("SELECT count(*) FROM cdc.checkpoints WHERE consumer='fromfile'").fetchone()[0] == 1
    insert(conn, "b", 1)
    end = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
    proc = cdc_run(dsn, "--config", str(cfg), "--endpos", end, "--sink", f"jsonl:{out_flag}",
                   env={"CDC_SINK": f"jsonl:{out_env}"})
    assert proc.wait(30) == 0
    assert out_flag.exists()


def test_unknown_config_key_and_bad_values_exit_2_with_one_line(dsn, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('sinkk = "stdout"\n')
    for args in (["--config", str(cfg)], ["--slot", "Bad Name"], ["--endpos", "nope"], ["--sink", "kafka:x"]):
        proc = cdc_run(dsn, *args)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 2, (args, err)
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cdc: error: "), lines


def test_logs_never_carry_event_payloads_and_mask_the_password(dsn, conn):
    secret_payload = '{"card": "4111-1111-1111-1111"}'
    dsn_with_password = dsn + " password=hunter2"
    proc = cdc_run(dsn_with_password, "--sink", "null", "--log-level", "debug", "--log-format", "json")
    try:
        insert(conn, "a", 2, data=secret_payload)
        time.sleep(2)
    finally:
        code, err = stop(proc)
    assert code == 0
    assert "4111" not in err and "hunter2" not in err
    for line in err.strip().splitlines():
        json.loads(line)  # every log line is a JSON object


def test_heartbeats_advance_the_slot_while_the_events_table_is_idle(dsn, conn):
    proc = cdc_run(dsn, "--sink", "null", "--heartbeat-interval", "0.3", "--status-interval", "1")
    try:
        assert wait_for(lambda: conn.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name='cdc' AND active_pid IS NOT NULL"
            " AND confirmed_flush_lsn IS NOT NULL"  # NULL while the slot is still being created
        ).fetchone() is not None, timeout=30)

        def flushed() -> int:
            return conn.execute("SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots WHERE slot_name='cdc'").fetchone()[0]

        start = flushed()
        # No events at all: only heartbeats can move the slot forward.
        assert wait_for(lambda: flushed() > start, timeout=15)
    finally:
        code, err = stop(proc)
    assert code == 0, err


def test_heartbeat_writes_logical_messages_only_while_the_feed_is_idle(dsn, conn):
    from types import SimpleNamespace

    from cdc.runner import Heartbeat

    conn.execute("SELECT pg_create_logical_replication_slot('hb', 'wal2json')")
    feed = SimpleNamespace(path="stream", delivered_events=0)
    beat = Heartbeat(dsn, 0.2, feed)  # type: ignore[arg-type]
    beat.start()
    time.sleep(1.5)
    feed.delivered_events = 1  # busy from here on: events flow, no heartbeat needed
    time.sleep(0.05)
    idle_count = _heartbeats(conn)
    for n in range(2, 34):  # events flow 4x as often as the interval: a loaded machine sees it busy too
        feed.delivered_events = n
        time.sleep(0.05)
    beat.stop()
    assert idle_count >= 3
    assert _heartbeats(conn) <= 1  # the rest of the messages: none while busy, one in flight at most


def _heartbeats(conn: psycopg.Connection) -> int:
    rows = conn.execute(
        "SELECT data FROM pg_logical_slot_get_changes('hb', NULL, NULL, 'format-version', '2', "
        "'add-msg-prefixes', 'cdc')").fetchall()
    msgs = [json.loads(r[0]) for r in rows]
    return sum(1 for m in msgs if m["action"] == "M" and m["content"].startswith("heartbeat"))
