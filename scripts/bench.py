"""cdc's benchmark: every figure a ratio against a reference measured in the same run.

    scripts/bench [--quick] [--out DIR] [--only stream,latency,big,plugins,jetstream] [--runs N]

One embedded cluster (fsync off), one database a scenario so sequences and slots start clean:
- stream drain: cdc.Consumer(endpos) into a NullSink vs pg_recvlogical -f /dev/null, same WAL,
  same wal2json options, same transport (TCP loopback, and the unix socket for 1 event/tx);
  slots created before the writes; each run --runs times (3), alternating which goes first,
  best of each kept (every run is in results.json);
- replay: cdc.polling.replay into a NullSink and into a jsonl file vs psql COPY (SELECT * ...
  ORDER BY seq) > /dev/null, on 1M events 1,000 a transaction and on 300k one a transaction
  (each with its own created_at: the event store's usual shape);
- latency commit -> handler at a paced commit rate, stream and poll, with and without a
  transaction holding a sequence number for a while (the consumer runs in its own process), and
  the stream recording its deliveries (`stream_recording`: what --record-deliveries costs); on
  the stream split at the read that brought the commit: the server's and the kernel's part
  (from the commit, or from the read's start if cdc was busy until later, to the bytes received)
  and cdc's (busy before that read, then decoding and handing over);
- peak RSS of a consumer process draining 1M events, and one 1M-row transaction;
- reconcile over 1M recorded deliveries;
- plugins (`--only plugins`): wal2json v2 and pgoutput on the same WAL, each drained by cdc and
  by pg_recvlogical with the same plugin and options (TCP loopback), with the walsender's CPU
  time per event for each reader (what the stream costs the primary);
- jetstream (`--only jetstream`, needs `pip install -e '.[test]'`): a primed slot of 300,000
  single-event transactions drained into JetStream (R1, file storage) by the nats sink vs a bare
  nats-py publish_async loop of the same messages to the same server, and commit -> JetStream
  reader latency at 500 commits/s.
Progress on stderr; DIR/results.json, DIR/results.md, DIR/latency.png. Never asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdc import Consumer, Lsn, embedded_cluster, setup, tune_gc  # noqa: E402
from cdc.decoders import start_options  # noqa: E402
from cdc.sinks import JsonlSink, NullSink  # noqa: E402
from cdc.store import DEFAULT_TABLE  # noqa: E402

STARTED = time.monotonic()

# One event a row, the shape of a typical domain event; `per` rows a transaction.
WRITE_PROC = """
CREATE PROCEDURE bench_write(n int, per int) LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 0..n - 1 LOOP
    INSERT INTO cdc.events (stream_id, version, type, data, metadata)
    SELECT 'account-' || (i * per + g), 1, 'MoneyDeposited',
           jsonb_build_object('amount', (i * per + g) % 10000, 'currency', 'EUR',
                              'note', 'salary ü', 'tags', jsonb_build_array('a', 'b')),
           '{"source": "bench", "user": 42}'
    FROM generate_series(1, per) AS g;
    COMMIT;
  END LOOP;
END $$;
"""
LATENCY_INSERT = ("INSERT INTO cdc.events (stream_id, version, type, data) "
                  "VALUES (%s, 1, %s, '{\"amount\": 1}') RETURNING seq")


def say(msg: str) -> None:
    sys.stderr.write(f"[{time.monotonic() - STARTED:6.1f}s] {msg}\n")
    sys.stderr.flush()


def dsn_for(cluster: Any, db: str) -> str:
    return psycopg.conninfo.make_conninfo(cluster.dsn, dbname=db)


def new_database(cluster: Any, db: str) -> str:
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}"')
        conn.execute(f'CREATE DATABASE "{db}"')
    dsn = dsn_for(cluster, db)
    with psycopg.connect(dsn, autocommit=True) as conn:
        setup(conn)
        conn.execute(WRITE_PROC)
        conn.execute("CREATE TABLE bench_other (x int)")
    return dsn


def wal_insert_lsn(dsn: str) -> Lsn:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return Lsn.parse(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])


def prime(dsn: str, name: str, plugin: str = "wal2json") -> None:
    """Slot `name` and consumer `name` positioned at the current WAL end, before the writes."""
    with Consumer(dsn, consumer=name, slot=name, endpos=wal_insert_lsn(dsn), plugin=plugin) as feed:  # type: ignore[arg-type]
        for _ in feed:
            pass


def write(dsn: str, transactions: int, per: int) -> Lsn:
    """Write, then return an endpos just past the writes, with one more (other-table)
    transaction after it so both readers see WAL beyond endpos and stop."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CALL bench_write(%s, %s)", (transactions, per))
        end = Lsn.parse(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
        conn.execute("INSERT INTO bench_other VALUES (1)")
        conn.execute("VACUUM ANALYZE cdc.events")
    return end


def drain_cdc(dsn: str, name: str, endpos: Lsn, plugin: str = "wal2json") -> tuple[float, int]:
    sink = NullSink()
    events = 0
    started = time.monotonic()
    with Consumer(dsn, consumer=name, slot=name, endpos=endpos, plugin=plugin) as feed:  # type: ignore[arg-type]
        for tx in feed:
            sink.write(tx)
            events += len(tx.events)
    return time.monotonic() - started, events


def host(cluster: Any, transport: str) -> str:
    return "127.0.0.1" if transport == "tcp" else cluster.socket_dir


def drain_recvlogical(cluster: Any, db: str, slot: str, endpos: Lsn, transport: str = "unix",
                      plugin: str = "wal2json") -> float:
    options = start_options(plugin, DEFAULT_TABLE)  # type: ignore[arg-type]
    cmd = [f"{cluster.bin_dir}/pg_recvlogical", "-h", host(cluster, transport), "-p", str(cluster.port),
           "-U", "postgres", "-d", db, "-S", slot, "--start", "--no-loop", "-E", str(endpos),
           "-f", "/dev/null"]
    for k, v in options.items():
        cmd += ["-o", f"{k}={v}"]
    started = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def bench_stream(cluster: Any, per: int, events: int, runs: int = 3, transport: str = "unix") -> dict[str, Any]:
    """Both readers over the same transport (unix socket or TCP loopback), on the same WAL, from
    slots made before the writes: cdc as a consumer already standing on its slot."""
    db = f"bench_stream_{per}_{transport}"
    dsn = psycopg.conninfo.make_conninfo(new_database(cluster, db), host=host(cluster, transport))
    names = [f"cdc_{n}" for n in range(runs)]
    recv_names = [f"recv_{n}" for n in range(runs)]
    for n in names:
        prime(dsn, n)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in recv_names:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (n,))
    say(f"stream {per}/tx over {transport}: writing {events:,} events in {events // per:,} transactions")
    endpos = write(dsn, events // per, per)
    cdc_times, recv_times = [], []

    def cdc_run(slot: str) -> None:
        seconds, got = drain_cdc(dsn, slot, endpos)
        if got != events:
            raise SystemExit(f"cdc drained {got} events, expected {events}")
        cdc_times.append(seconds)

    for n, (cdc_slot, recv_slot) in enumerate(zip(names, recv_names)):
        # Alternate which goes first, so neither always meets a cold cache.
        if n % 2 == 0:
            cdc_run(cdc_slot)
            recv_times.append(drain_recvlogical(cluster, db, recv_slot, endpos, transport))
        else:
            recv_times.append(drain_recvlogical(cluster, db, recv_slot, endpos, transport))
            cdc_run(cdc_slot)
        say(f"stream {per}/tx over {transport}: cdc {events / cdc_times[-1]:,.0f}/s, "
            f"pg_recvlogical {events / recv_times[-1]:,.0f}/s")
    cdc_rate, recv_rate = events / min(cdc_times), events / min(recv_times)
    drop_database(cluster, db)
    return {"events": events, "events_per_tx": per, "transport": transport, "cdc_events_per_s": round(cdc_rate),
            "recvlogical_events_per_s": round(recv_rate), "ratio": round(cdc_rate / recv_rate, 3),
            "runs": [{"cdc_events_per_s": round(events / c), "recvlogical_events_per_s": round(events / r)}
                     for c, r in zip(cdc_times, recv_times)]}


class WalsenderCpu:
    """The CPU time of the walsender serving `slot`, read from /proc while it runs (it exits with
    its client): user + system seconds, at most one poll interval short."""

    def __init__(self, dsn: str, slot: str):
        self.dsn, self.slot, self.seconds = dsn, slot, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> WalsenderCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            pid = None
            while not self._stop.is_set():
                if pid is None:
                    row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                                       (self.slot,)).fetchone()
                    pid = row[0] if row else None
                if pid is not None:
                    try:
                        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                        self.seconds = (int(fields[11]) + int(fields[12])) / tick
                    except (OSError, IndexError, ValueError):
                        pass
                self._stop.wait(0.02)


def bench_plugins(cluster: Any, per: int, events: int, runs: int) -> dict[str, Any]:
    """Every plugin the server has, on the same WAL: cdc and pg_recvlogical (same plugin, same
    options, TCP loopback) from slots made before the writes, with the walsender's CPU per event."""
    db = f"bench_plugins_{per}"
    dsn = psycopg.conninfo.make_conninfo(new_database(cluster, db), host="127.0.0.1")
    plugins = ["pgoutput"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute("SELECT pg_create_logical_replication_slot('probe', 'wal2json', true)")
            plugins.insert(0, "wal2json")
        except psycopg.Error:
            say(f"plugins: the server has no wal2json (PostgreSQL {cluster.version // 10000}): pgoutput only")
    slots = {p: ([f"cdc_{p}_{n}" for n in range(runs)], [f"recv_{p}_{n}" for n in range(runs)]) for p in plugins}
    for plugin, (mine, theirs) in slots.items():
        for n in mine:
            prime(dsn, n, plugin)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for n in theirs:
                conn.execute("SELECT pg_create_logical_replication_slot(%s, %s)", (n, plugin))
    say(f"plugins {per}/tx: writing {events:,} events in {events // per:,} transactions")
    endpos = write(dsn, events // per, per)
    out: dict[str, Any] = {"events": events, "events_per_tx": per, "transport": "tcp"}
    for plugin, (mine, theirs) in slots.items():
        cdc_runs, recv_runs = [], []
        for n, (cdc_slot, recv_slot) in enumerate(zip(mine, theirs)):
            def cdc_drain() -> None:
                with WalsenderCpu(dsn, cdc_slot) as cpu:
                    seconds, got = drain_cdc(dsn, cdc_slot, endpos, plugin)
                if got != events:
                    raise SystemExit(f"cdc drained {got} events with {plugin}, expected {events}")
                cdc_runs.append((seconds, cpu.seconds))

            def recv_drain() -> None:
                with WalsenderCpu(dsn, recv_slot) as cpu:
                    seconds = drain_recvlogical(cluster, db, recv_slot, endpos, "tcp", plugin)
                recv_runs.append((seconds, cpu.seconds))

            for step in ((cdc_drain, recv_drain) if n % 2 == 0 else (recv_drain, cdc_drain)):
                step()
            say(f"plugins {per}/tx {plugin}: cdc {events / cdc_runs[-1][0]:,.0f}/s "
                f"(walsender {cdc_runs[-1][1] / events * 1e6:.1f} µs/event), pg_recvlogical "
                f"{events / recv_runs[-1][0]:,.0f}/s (walsender {recv_runs[-1][1] / events * 1e6:.1f} µs/event)")
        best_cdc, best_recv = min(cdc_runs), min(recv_runs)
        out[plugin] = {
            "cdc_events_per_s": round(events / best_cdc[0]), "recvlogical_events_per_s": round(events / best_recv[0]),
            "ratio": round(best_recv[0] / best_cdc[0], 3),
            "walsender_us_per_event_cdc": round(best_cdc[1] / events * 1e6, 2),
            "walsender_us_per_event_recvlogical": round(best_recv[1] / events * 1e6, 2),
            "runs": [{"cdc_events_per_s": round(events / c[0]), "recvlogical_events_per_s": round(events / r[0]),
                      "walsender_cpu_s_cdc": c[1], "walsender_cpu_s_recvlogical": r[1]}
                     for c, r in zip(cdc_runs, recv_runs)],
        }
    drop_database(cluster, db)
    return out


def bench_jetstream(cluster: Any, events: int, runs: int) -> dict[str, Any]:
    """A consumer standing on its primed slot drains `events` single-event transactions into
    JetStream (R1, file storage) through the nats sink, vs a bare nats-py `publish_async` loop of
    the same messages (subjects, bodies, headers, read back from the first stream) to the same
    server, into a stream of its own, every ack awaited."""
    import asyncio

    import nats
    from nats.js.api import StorageType, StreamConfig

    from cdc.jetstream import JetStreamSink, Target
    from tests.natsserver import NatsServer

    db = "bench_jetstream"
    dsn = psycopg.conninfo.make_conninfo(new_database(cluster, db), host=host(cluster, "tcp"))
    names = [f"cdc_js_{n}" for n in range(runs)]
    for n in names:
        prime(dsn, n)
    say(f"jetstream: writing {events:,} events in {events:,} transactions")
    endpos = write(dsn, events, 1)
    server = NatsServer()
    cdc_times, bare_times = [], []
    try:
        def drain(name: str, stream: str) -> float:
            sink = JetStreamSink(Target.parse(server.url, stream=stream, subject=stream + ".{stream_id}"))
            got = 0
            started = time.monotonic()
            try:
                with Consumer(dsn, consumer=name, slot=name, endpos=endpos, on_checkpoint=sink.flush) as feed:
                    for tx in feed:
                        sink.write(tx)
                        got += len(tx.events)
                sink.flush()
            finally:
                sink.close()
            if got != events:
                raise SystemExit(f"jetstream: cdc drained {got} events, expected {events}")
            return time.monotonic() - started

        async def read(stream: str) -> list[tuple[str, bytes, dict[str, str]]]:
            nc = await nats.connect(server.url)
            try:
                js = nc.jetstream()
                sub = await js.subscribe(stream + ".>", ordered_consumer=True)
                out = []
                while len(out) < events:
                    msg = await sub.next_msg(timeout=10)
                    out.append((msg.subject, msg.data, dict(msg.headers or {})))
                await sub.unsubscribe()
                return out
            finally:
                await nc.close()

        async def bare(stream: str, messages: list[tuple[str, bytes, dict[str, str]]]) -> float:
            nc = await nats.connect(server.url)
            try:
                js = nc.jetstream()
                await js.add_stream(StreamConfig(name=stream, subjects=[stream + ".*"], storage=StorageType.FILE,
                                                 duplicate_window=120))
                started = time.monotonic()
                publish = js.publish_async
                futures = [await publish(stream + "." + subject.split(".", 1)[1], body, headers=headers)
                           for subject, body, headers in messages]
                await asyncio.gather(*futures)
                return time.monotonic() - started
            finally:
                await nc.close()

        messages = None
        for n, name in enumerate(names):
            cdc_times.append(drain(name, f"CDC{n}"))
            if messages is None:
                messages = asyncio.run(read("CDC0"))
            bare_times.append(asyncio.run(bare(f"BARE{n}", messages)))
            say(f"jetstream: cdc {events / cdc_times[-1]:,.0f}/s, bare publish_async {events / bare_times[-1]:,.0f}/s")
    finally:
        server.close()
    drop_database(cluster, db)
    cdc_rate, bare_rate = events / min(cdc_times), events / min(bare_times)
    return {"events": events, "cdc_events_per_s": round(cdc_rate), "bare_publish_async_per_s": round(bare_rate),
            "ratio": round(cdc_rate / bare_rate, 3),
            "runs": [{"cdc_events_per_s": round(events / c), "bare_publish_async_per_s": round(events / b)}
                     for c, b in zip(cdc_times, bare_times)]}


def bench_jetstream_latency(cluster: Any, rate: int, seconds: float) -> dict[str, Any]:
    """Commit -> JetStream reader: `cdc run --sink nats://...` in its own process, a `Reader`
    here noting when each event arrives, paced writers committing (synchronous_commit on)."""
    from cdc.jetstream import Target
    from cdc.jetstream_reader import Reader
    from tests.natsserver import NatsServer

    db = "bench_js_latency"
    dsn = new_database(cluster, db)
    prime(dsn, "jslat")
    server = NatsServer()
    log_path = Path(tempfile.mkstemp(prefix="cdc-bench-js-")[1])
    commits: dict[int, float] = {}
    arrivals: dict[int, float] = {}
    stop = threading.Event()
    with open(log_path, "ab") as log:
        run = subprocess.Popen([sys.executable, "-m", "cdc", "run", "--dsn", dsn, "--consumer", "jslat", "--mode", "stream",
                                "--sink", server.url, "--nats-stream", "LAT"], stderr=log, stdout=subprocess.DEVNULL,
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 30
        while "streaming from slot" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        reader = Reader(Target.parse(server.url, stream="LAT"))

        def read() -> None:
            for tx in reader:
                now = time.time()
                for e in tx.events:
                    arrivals[e.seq] = now

        reading = threading.Thread(target=read, daemon=True)
        reading.start()
        time.sleep(1.0)

        write_paced(dsn, rate, seconds, stop, commits)
        deadline = time.monotonic() + 20
        while not set(commits) <= set(arrivals) and time.monotonic() < deadline:
            time.sleep(0.1)
        reader.stop()
        reading.join(5)
        reader.close()
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(30)
        server.close()
        log_path.unlink()
    drop_database(cluster, db)
    lat = [max(0.0, arrivals[s] - c) * 1000 for s, c in commits.items() if s in arrivals]
    stats = percentiles(lat) | {"commits": len(commits), "achieved_rate": round(len(commits) / seconds),
                                "missing": len(commits) - len(lat)}
    say(f"latency commit -> JetStream reader {rate}/s: p50 {stats['p50']} p99 {stats['p99']} max {stats['max']} ms "
        f"({stats['achieved_rate']}/s achieved, {stats['missing']} missing)")
    return stats


def drop_database(cluster: Any, db: str) -> None:
    with psycopg.connect(dsn_for(cluster, db), autocommit=True) as conn:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s", (db,)):
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


# -- replay, RSS and reconcile: one database of `events` rows -------------------------------------


def bench_replay(cluster: Any, db: str, dsn: str, events: int, per: int, runs: int) -> dict[str, Any]:
    """cdc.polling.replay into the null sink and into a jsonl file against psql COPY (SELECT *
    ... ORDER BY seq) > /dev/null, alternating, `runs` times; the best of each compared."""
    from cdc.polling import replay

    psql = [f"{cluster.bin_dir}/psql", "-h", cluster.socket_dir, "-p", str(cluster.port), "-U", "postgres",
            "-d", db, "-X", "-q", "-c", "COPY (SELECT * FROM cdc.events ORDER BY seq) TO STDOUT"]
    copy_times: list[float] = []
    replay_times: dict[str, list[float]] = {"null": [], "jsonl": []}
    jsonl = Path(tempfile.mkdtemp(prefix="cdc-bench-")) / "replay.jsonl"
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run(psql, check=True, stdout=subprocess.DEVNULL)
        copy_times.append(time.monotonic() - started)
        for kind in ("null", "jsonl"):
            jsonl.unlink(missing_ok=True)
            sink = NullSink() if kind == "null" else JsonlSink(str(jsonl))
            summary = replay(dsn, sink=sink, progress=False)
            sink.close()
            if summary.events != events:
                raise SystemExit(f"replay handed over {summary.events} events, expected {events}")
            replay_times[kind].append(summary.seconds)
        say(f"replay {per}/tx: cdc into null {events / replay_times['null'][-1]:,.0f}/s, into jsonl "
            f"{events / replay_times['jsonl'][-1]:,.0f}/s, psql COPY {events / copy_times[-1]:,.0f}/s")
    jsonl.unlink(missing_ok=True)
    jsonl.parent.rmdir()
    copy_rate = events / min(copy_times)
    out: dict[str, Any] = {}
    for kind, times in replay_times.items():
        rate = events / min(times)
        out[kind] = {"events": events, "events_per_tx": per, "sink": kind, "cdc_events_per_s": round(rate),
                     "copy_events_per_s": round(copy_rate), "ratio": round(rate / copy_rate, 3),
                     "runs": [round(c / t, 3) for c, t in zip(copy_times, times)]}
    return out


def bench_big(cluster: Any, events: int, quick: bool) -> dict[str, Any]:
    db = "bench_big"
    dsn = new_database(cluster, db)
    for name in ("rss", "recon"):
        prime(dsn, name)
    say(f"replay: writing {events:,} events, 1,000 a transaction")
    endpos = write(dsn, events // 1000, 1000)
    replays = bench_replay(cluster, db, dsn, events, 1000, 1 if quick else 5)
    out: dict[str, Any] = {"replay_null": replays["null"], "replay_jsonl": replays["jsonl"]}
    say(f"rss: a consumer process draining {events:,} events")
    out["rss_many"] = drain_child(dsn, "rss", endpos)
    out["reconcile"] = bench_reconcile(dsn, endpos, events)
    drop_database(cluster, db)

    # The event store's usual shape: one event a transaction, each with its own created_at.
    db = "bench_replay_1"
    dsn = new_database(cluster, db)
    single = events // 10 if quick else events * 3 // 10
    say(f"replay: writing {single:,} events, one a transaction")
    write(dsn, single, 1)
    replays = bench_replay(cluster, db, dsn, single, 1, 1 if quick else 5)
    out["replay_1_null"], out["replay_1_jsonl"] = replays["null"], replays["jsonl"]
    drop_database(cluster, db)

    db = "bench_bigtx"
    dsn = new_database(cluster, db)
    prime(dsn, "rss")
    say(f"rss: writing one transaction of {events:,} rows")
    endpos = write(dsn, 1, events)
    out["rss_one_tx"] = drain_child(dsn, "rss", endpos)
    drop_database(cluster, db)
    return out


def drain_child(dsn: str, name: str, endpos: Lsn) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "_drain", dsn, name, str(endpos)],
                          check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(proc.stdout)
    say(f"rss: {result['events']:,} events in {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB")
    return result


def child_drain(dsn: str, name: str, endpos: str) -> None:
    started = time.monotonic()
    seconds, events = drain_cdc(dsn, name, Lsn.parse(endpos))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"events": events, "seconds": round(time.monotonic() - started, 2),
                      "peak_rss_mb": round(rss_mb, 1)}))


def bench_reconcile(dsn: str, endpos: Lsn, events: int) -> dict[str, Any]:
    try:
        from psycopg_pool import ConnectionPool

        from cdc.reconcile import reconcile
    except ImportError as err:
        say(f"reconcile: not available ({err}): null")
        return {"seconds": None, "error": str(err)}
    try:
        say(f"reconcile: recording deliveries of {events:,} events")
        got = 0
        with Consumer(dsn, consumer="recon", slot="recon", endpos=endpos, record_deliveries=True) as feed:
            for tx in feed:
                got += len(tx.events)
        with ConnectionPool(dsn, min_size=1, max_size=2, open=True) as pool:
            started = time.monotonic()
            report = reconcile(pool, consumer="recon")
            seconds = time.monotonic() - started
        say(f"reconcile: {seconds:.2f} s, agrees: {report.agrees}")
        return {"seconds": round(seconds, 2), "events": got, "agrees": bool(report.agrees)}
    except Exception as err:  # another engineer's module, still moving: report, don't fail
        say(f"reconcile: failed ({err!r}): null")
        return {"seconds": None, "error": repr(err)}


# -- latency ----------------------------------------------------------------------------------------


def paced(dsn: str, thread: int, per_second: float, stop: threading.Event, commits: dict[int, float]) -> None:
    """A writer committing `per_second` single-event transactions, each commit's time noted by
    its seq. The cluster runs synchronous_commit=off (fast=True): WAL then reaches the walsender
    only at the WAL writer's next round (200 ms). Writers here flush at commit, as production does."""
    with psycopg.connect(dsn, autocommit=True, options="-c synchronous_commit=on") as conn:
        started = time.monotonic()
        i = 0
        while not stop.is_set():
            delay = started + i / per_second - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            seq = conn.execute(LATENCY_INSERT, (f"w{thread}-{i}", "Paced")).fetchone()[0]
            commits[seq] = time.time()
            i += 1


def write_paced(dsn: str, rate: int, seconds: float, stop: threading.Event, commits: dict[int, float],
                also: tuple[Any, ...] = ()) -> None:
    """Two `paced` writers sharing `rate` commits/s for `seconds` (and each of `also`, a function
    that writes until `stop`), then stop them all."""
    threads = [threading.Thread(target=paced, args=(dsn, t, rate / 2, stop, commits)) for t in range(2)]
    threads += [threading.Thread(target=f) for f in also]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()


def bench_latency(cluster: Any, path: str, rate: int, held: bool, seconds: float) -> dict[str, Any]:
    db = "bench_latency"
    dsn = new_database(cluster, db)
    name = "lat"
    if path != "poll":
        prime(dsn, name)
    out_file = f"/tmp/cdc-bench-latency-{os.getpid()}.json"
    child = subprocess.Popen([sys.executable, __file__, "_latency", dsn, name, path, out_file],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    child.stdout.readline()  # "ready": the consumer is iterating
    time.sleep(0.5)
    commits: dict[int, float] = {}
    stop = threading.Event()

    sync = "-c synchronous_commit=on"  # as in `paced`

    def holder() -> None:
        # Takes a seq, keeps it 1.5 s uncommitted, every 3 s: the poller must wait behind it.
        with psycopg.connect(dsn, options=sync) as conn:
            i = 0
            while not stop.wait(1.5):
                seq = conn.execute(LATENCY_INSERT, (f"held-{i}", "Held")).fetchone()[0]
                stop.wait(1.5)
                conn.commit()
                commits[seq] = time.time()
                i += 1

    write_paced(dsn, rate, seconds, stop, commits, also=(holder,) if held else ())
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(LATENCY_INSERT, ("stop", "BenchStop"))
    child.wait(timeout=120)
    handled = json.loads(Path(out_file).read_text())
    os.unlink(out_file)
    drop_database(cluster, db)
    lat, server, ours = [], [], []
    for seq, at, commit_time, began, received in handled:
        if path != "poll":
            lat.append(max(0.0, at - commit_time) * 1000)
            server.append(max(0.0, received - max(began, commit_time)) * 1000)
            ours.append((max(0.0, at - received) + max(0.0, began - commit_time)) * 1000)
        elif seq in commits:
            lat.append(max(0.0, at - commits[seq]) * 1000)
    missing = len(commits) - len(lat)
    stats = percentiles(lat)
    if server:
        stats["commit_to_received"], stats["received_to_handler"] = percentiles(server), percentiles(ours)
    stats |= {"commits": len(commits), "achieved_rate": round(len(commits) / seconds), "missing": missing}
    say(f"latency {path} {rate}/s{' held seq' if held else ''}: p50 {stats['p50']} p99 {stats['p99']} "
        f"max {stats['max']} ms ({stats['achieved_rate']}/s achieved)")
    stats["samples"] = lat
    return stats


def percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None, "n": 0}
    v = sorted(values)

    def at(q: float) -> float:
        return round(v[min(len(v) - 1, int(q * len(v)))], 3)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": round(v[-1], 3), "n": len(v)}


def child_latency(dsn: str, name: str, path: str, out_file: str) -> None:
    handled: list[tuple[int, float, float | None, float, float]] = []
    mode = "poll" if path == "poll" else "stream"
    record = path == "stream_recording"  # what --record-deliveries adds to the delivery path
    # When the read that brought a transaction began and returned: splits the latency into the
    # server's and the kernel's part (from the commit, or from when we began to read if that was
    # later, to the bytes in our hands) and cdc's (the rest: busy before that read, then decoding
    # and handing over).
    import cdc.replication

    received = [0.0, 0.0]
    read = cdc.replication.ReplicationStream.read

    def timed_read(self: Any, timeout: float, out: list[memoryview], limit: int = 5000) -> int:
        began = time.time()
        n = read(self, timeout, out, limit)
        if n:
            received[:] = began, time.time()
        return n

    cdc.replication.ReplicationStream.read = timed_read  # type: ignore[method-assign]  # bench instrumentation only
    with Consumer(dsn, consumer=name, slot=name, mode=mode, poll_interval=0.1, stale_after=3.0,
                  record_deliveries=record) as feed:
        print("ready", flush=True)
        for tx in feed:
            now = time.time()
            commit = tx.commit_time.timestamp() if tx.commit_time is not None else None
            done = False
            for e in tx.events:
                if e.type == "BenchStop":
                    done = True
                else:
                    handled.append((e.seq, now, commit, *received))
            if done:
                feed.stop()
    Path(out_file).write_text(json.dumps(handled))


# -- report -------------------------------------------------------------------------------------------


def machine(cluster: Any) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with psycopg.connect(cluster.dsn) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "postgresql": server, "python": platform.python_version(),
            "fsync": "off", "connection": "unix socket"}


def write_report(out: Path, results: dict[str, Any], samples: dict[str, list[float]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        "| measure | cdc | reference | ratio (higher is better) | floor |",
        "|---|---|---|---|---|",
    ]
    for key, floor in (("stream_1", "1.1x"), ("stream_1_unix", "1.1x"), ("stream_100", "1.0x")):
        if key in results:
            st = results[key]
            rows.append(f"| stream drain, {st['events_per_tx']} event(s)/tx, {st['transport']} | "
                        f"{st['cdc_events_per_s']:,} ev/s | pg_recvlogical {st['recvlogical_events_per_s']:,} ev/s | "
                        f"{st['ratio']:.2f}x | >= {floor} |")
    for key in ("plugins_1", "plugins_100"):
        for plugin in ("wal2json", "pgoutput"):
            if plugin in results.get(key, {}):
                pl = results[key][plugin]
                rows.append(f"| {plugin} drain, {results[key]['events_per_tx']} event(s)/tx, tcp; walsender "
                            f"{pl['walsender_us_per_event_cdc']} vs {pl['walsender_us_per_event_recvlogical']} µs/event | "
                            f"{pl['cdc_events_per_s']:,} ev/s | pg_recvlogical {pl['recvlogical_events_per_s']:,} ev/s "
                            f"| {pl['ratio']:.2f}x | >= 1.0x |")
    for key in ("replay", "replay_jsonl", "replay_1", "replay_1_jsonl"):
        if key in results:
            rp = results[key]
            rows.append(f"| replay {rp['events']:,} events ({rp['events_per_tx']:,} a transaction) into {rp['sink']} | "
                        f"{rp['cdc_events_per_s']:,} ev/s | psql COPY {rp['copy_events_per_s']:,} ev/s | "
                        f"{rp['ratio']:.2f}x | >= 0.9x |")
    if "latency_ms" in results:
        rows += [
            "",
            "| latency commit -> handler (ms) | p50 | p95 | p99 | max | commits/s achieved |",
            "|---|---|---|---|---|---|",
        ]
        for key, st in results["latency_ms"].items():
            rows.append(f"| {key} | {st['p50']} | {st['p95']} | {st['p99']} | {st['max']} | {st['achieved_rate']} |")
        split = [(k, st) for k, st in results["latency_ms"].items() if "commit_to_received" in st]
        if split:
            rows += [
                "",
                "| stream latency, split (ms): p50 / p99 | server and kernel (commit, or cdc's read if later, "
                "-> received) | cdc (busy before that read, then -> handler) |",
                "|---|---|---|",
            ]
            for key, st in split:
                a, b = st["commit_to_received"], st["received_to_handler"]
                rows.append(f"| {key} | {a['p50']} / {a['p99']} | {b['p50']} / {b['p99']} |")
    if "peak_rss_mb" in results:
        rss, recon = results["peak_rss_mb"], results["reconcile_s"]
        rows += [
            "",
            "| other | value |",
            "|---|---|",
            f"| peak RSS, consumer draining {results['big_events']:,} events | {rss['many_transactions']} MB |",
            f"| peak RSS, consumer draining one {results['big_events']:,}-row transaction | "
            f"{rss['one_transaction']} MB (floor < 300) |",
            f"| reconcile over {results['big_events']:,} delivered events | {'n/a' if recon is None else f'{recon} s'} |",
        ]
    rows += [
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, PostgreSQL "
        f"{results['machine']['postgresql']}, fsync off{' (--quick)' if results['quick'] else ''}. Stream rates are "
        "whole drains (connect to endpos) from slots made before the writes; the best of the runs of each.",
    ]
    (out / "results.md").write_text("\n".join(rows) + "\n")
    if not samples:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, path in zip(axes, ("stream", "poll")):
        for key, values in samples.items():
            if key.startswith(path) and values:
                v = sorted(values)
                ax.plot(v, [i / len(v) for i in range(len(v))], label=key)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("commit -> handler latency (ms)")
        ax.set_ylabel("fraction of events")
        ax.set_title(f"{path} path")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)


def main() -> None:
    tune_gc()  # as `cdc run` does
    if len(sys.argv) > 1 and sys.argv[1] == "_drain":
        return child_drain(*sys.argv[2:5])
    if len(sys.argv) > 1 and sys.argv[1] == "_latency":
        return child_latency(*sys.argv[2:6])
    parser = argparse.ArgumentParser(description="cdc benchmarks, as ratios against pg_recvlogical and psql COPY")
    parser.add_argument("--quick", action="store_true", help="scaled down to about a minute (for CI)")
    parser.add_argument("--out", default=str(ROOT / "scripts" / "bench-results"), help="where the results go")
    parser.add_argument("--only", default="stream,latency,big,plugins",
                        help="comma-separated parts to run: stream (drain vs pg_recvlogical), latency, "
                             "big (replay vs COPY, peak RSS, reconcile), plugins (wal2json and pgoutput, "
                             "each vs pg_recvlogical, with walsender CPU per event), jetstream (a primed slot "
                             "into JetStream vs a bare nats-py publish_async loop, and commit -> JetStream reader "
                             "latency); default all but jetstream")
    parser.add_argument("--runs", type=int, default=3,
                        help="stream drains per reader, alternating cdc and pg_recvlogical; the best of "
                             "each is compared (default 3)")
    args = parser.parse_args()
    quick = args.quick
    if quick:
        args.runs = 1  # --quick proves the bench works; its figures are not for comparison
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - {"stream", "latency", "big", "plugins", "jetstream"}
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; choose from stream, latency, big, plugins, "
                     "jetstream")
    single, multi, big = (20_000, 50_000, 100_000) if quick else (300_000, 500_000, 1_000_000)
    lat_seconds = 2.0 if quick else 10.0
    results: dict[str, Any] = {"quick": quick}
    samples: dict[str, list[float]] = {}
    with embedded_cluster(fast=True) as cluster:
        results["machine"] = machine(cluster)
        say(f"cluster up: PostgreSQL {results['machine']['postgresql']}, {results['machine']['cores']} cores")
        if "stream" in parts:
            results["stream_1"] = bench_stream(cluster, 1, single, args.runs, "tcp")
            results["stream_1_unix"] = bench_stream(cluster, 1, single, args.runs, "unix")
            results["stream_100"] = bench_stream(cluster, 100, multi, args.runs, "tcp")
            results["stream_vs_recvlogical_1"] = results["stream_1"]["ratio"]
            results["stream_vs_recvlogical_1_unix"] = results["stream_1_unix"]["ratio"]
            results["stream_vs_recvlogical_100"] = results["stream_100"]["ratio"]
        if "latency" in parts:
            latency: dict[str, Any] = {}
            for path in ("stream", "stream_recording", "poll"):
                for rate in (500, 2000):
                    for held in ((False,) if path == "stream_recording" else (False, True)):
                        key = f"{path}_{rate}{'_held_seq' if held else ''}"
                        stats = bench_latency(cluster, path, rate, held, lat_seconds)
                        samples[key] = stats.pop("samples")
                        latency[key] = stats
            results["latency_ms"] = latency
        if "jetstream" in parts:
            results["jetstream"] = bench_jetstream(cluster, single, args.runs)
            results["jetstream_vs_publish_async"] = results["jetstream"]["ratio"]
            results["jetstream_latency_ms"] = bench_jetstream_latency(cluster, 500, lat_seconds)
        if "plugins" in parts:
            results["plugins_1"] = bench_plugins(cluster, 1, single, args.runs)
            results["plugins_100"] = bench_plugins(cluster, 100, multi, args.runs)
        if "big" in parts:
            big_results = bench_big(cluster, big, quick)
            results["replay"] = big_results["replay_null"]
            results["replay_jsonl"] = big_results["replay_jsonl"]
            results["replay_1"] = big_results["replay_1_null"]
            results["replay_1_jsonl"] = big_results["replay_1_jsonl"]
            results["replay_vs_copy"] = big_results["replay_null"]["ratio"]
            results["replay_jsonl_vs_copy"] = big_results["replay_jsonl"]["ratio"]
            results["big_events"] = big
            results["peak_rss_mb"] = {"many_transactions": big_results["rss_many"]["peak_rss_mb"],
                                      "one_transaction": big_results["rss_one_tx"]["peak_rss_mb"]}
            results["rss_runs"] = {"many_transactions": big_results["rss_many"],
                                   "one_transaction": big_results["rss_one_tx"]}
            results["reconcile_s"] = big_results["reconcile"]["seconds"]
            results["reconcile"] = big_results["reconcile"]
    results["elapsed_s"] = round(time.monotonic() - STARTED, 1)
    out = Path(args.out)
    write_report(out, results, samples)
    say(f"done in {results['elapsed_s']} s: {out / 'results.json'}, results.md"
        f"{', latency.png' if samples else ''}")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
