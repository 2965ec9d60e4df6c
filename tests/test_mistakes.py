"""The first hour with a new tool is made of mistakes: each one meets one line that says what is
wrong and how to fix it, the right exit code (2 usage, 1 runtime), no traceback, no slot left.

Table-driven: each case sets up a real database the wrong way, runs a real `cdc` command in a
subprocess, and checks what a user sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo

from cdc import store

from .test_presets import MARTEN_DDL

ROOT = Path(__file__).resolve().parent.parent


def cdc(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdc", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def slots(dsn: str) -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = current_database()")}


def add_events(conn: psycopg.Connection, n: int) -> None:
    conn.execute("INSERT INTO cdc.events (stream_id, version, type, data) "
                  "SELECT 's' || g || '-' || gen_random_uuid(), 1, 'E', jsonb_build_object('n', g) "
                 "FROM generate_series(1, %s) g", (n,))


@dataclass
class Mistake:
    name: str
    prepare: Callable[[psycopg.Connection, str, Path], list[str]]  # -> the command's arguments
    code: int
    says: tuple[str, ...]  # what the one line must contain (all, case-insensitive)
    env: dict[str, str] = field(default_factory=dict)
    setup: bool = True  # `cdc setup` ran first


def _run_before_setup_marten(conn: psycopg.Connection, dsn: str, tmp: Path) -> list[str]:
    conn.execute(MARTEN_DDL)
    return ["run", "--dsn", dsn, "--preset", "marten", "--sink", "null", "--endpos", "now"]


def _dropped_column(conn: psycopg.Connection, dsn: str, tmp: Path, *args: str) -> list[str]:
    add_events(conn, 3)
    conn.execute("ALTER TABLE cdc.events DROP COLUMN type")
    add_events_no_type(conn)
    return [args[0], "--dsn", dsn, *args[1:]]


def add_events_no_type(conn: psycopg.Connection) -> None:
    conn.execute("INSERT INTO cdc.events (stream_id, version, data) VALUES ('late', 1, '{}')")


def _stream_dropped_column(conn: psycopg.Connection, dsn: str, tmp: Path) -> list[str]:
    # A consumer standing on its slot, then the table loses a column under it.
    first = cdc("run", "--dsn", dsn, "--sink", "null", "--endpos", "now")
    assert first.returncode == 0, first.stderr
    conn.execute("ALTER TABLE cdc.events DROP COLUMN type")
    add_events_no_type(conn)
    return ["run", "--dsn", dsn, "--sink", "null", "--mode", "stream", "--endpos", "now"]


def _config(text: str) -> Callable[[psycopg.Connection, str, Path], list[str]]:
    def prepare(conn: psycopg.Connection, dsn: str, tmp: Path) -> list[str]:
        path = tmp / "cdc.toml"
        path.write_text(text)
        return ["run", "--dsn", dsn, "--config", str(path), "--endpos", "now"]
    return prepare


MISTAKES = [
    Mistake("run --preset marten before cdc setup", _run_before_setup_marten, 1, ("cdc setup",), setup=False),
    Mistake("replay before cdc setup", lambda c, d, t: ["replay", "--dsn", d, "--from-seq", "1"], 1,
            ("cdc setup",), setup=False),
    # reconcile's exit codes: 0 agree, 1 disagree, 2 could not tell.
    Mistake("reconcile before cdc setup", lambda c, d, t: ["reconcile", "--dsn", d], 2, ("cdc setup",), setup=False),
    Mistake("run before cdc setup", lambda c, d, t: ["run", "--dsn", d, "--sink", "null", "--endpos", "0/1"], 1,
            ("cdc setup",), setup=False),
    Mistake("replay after a column was dropped",
            lambda c, d, t: _dropped_column(c, d, t, "replay", "--from-seq", "1", "--sink", "null"), 1,
            ("type", "altered")),
    Mistake("poll after a column was dropped",
            lambda c, d, t: _dropped_column(c, d, t, "run", "--mode", "poll", "--sink", "null"), 1,
            ("type", "altered")),
    Mistake("stream after a column was dropped", _stream_dropped_column, 1, ("no column type", "altered")),
    Mistake("a boolean that is not one", lambda c, d, t: ["run", "--dsn", d, "--endpos", "0/1"], 2,
            ("CDC_RECONCILE", "not a boolean"), env={"CDC_RECONCILE": "ture"}),
    Mistake("a typo at the top level next to a [cdc] table", _config('sinkk = "null"\n[cdc]\nsink = "null"\n'), 2,
            ("sinkk", "did you mean sink")),
    Mistake("a typo under [cdc]", _config('[cdc]\nmode = "poll"\nslott = "x"\n'), 2, ("slott", "did you mean slot")),
    Mistake("a key both at the top level and under [cdc]", _config('sink = "null"\n[cdc]\nsink = "stdout"\n'), 2,
            ("both",)),
    Mistake("a bad value in the file names where it came from", _config('chunk_events = 0\n'), 2,
            ("chunk_events", "cdc.toml")),
    Mistake("--from-seq above --to-seq", lambda c, d, t: ["replay", "--dsn", d, "--from-seq", "50", "--to-seq", "10"],
            2, ("swap",)),
    Mistake("--from-seq 0", lambda c, d, t: ["replay", "--dsn", d, "--from-seq", "0"], 2, ("start at 1",)),
    Mistake("replay to webhook", lambda c, d, t: ["replay", "--dsn", d, "--from-seq", "1", "--sink", "webhook:x"], 2,
            ("stdout, null or jsonl",)),
]


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_a_mistake_meets_one_line_the_right_exit_code_and_leaves_no_slot(empty_dsn: str, tmp_path: Path,
                                                                         mistake: Mistake) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        if mistake.setup:
            store.setup(conn)
        args = mistake.prepare(conn, empty_dsn, tmp_path)
        before = slots(empty_dsn)
    proc = cdc(*args, env=mistake.env)
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("cdc: error: ")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == mistake.code, proc.stderr
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    for words in mistake.says:
        assert words.lower() in errors[0].lower(), errors[0]
    assert slots(empty_dsn) <= before, "a failed command left a slot behind"


def test_replay_into_a_closed_pipe_ends_quietly(dsn: str, conn: psycopg.Connection) -> None:
    add_events(conn, 20_000)
    proc = subprocess.run(f"{sys.executable} -m cdc replay --dsn '{dsn}' --from-seq 1 | head -1; "
                          "echo \"status ${PIPESTATUS[0]}\" >&2", shell=True, executable="/bin/bash", cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.count("\n") == 1 and '"seq":1,' in proc.stdout
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr.lower(), proc.stderr
    assert proc.stderr.strip().endswith("status 0"), proc.stderr


def test_version() -> None:
    import cdc as package

    proc = cdc("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"cdc {package.__version__}"


def test_a_role_without_grants_meets_one_line_naming_the_grant_on_every_command(dsn: str, conn: psycopg.Connection) -> None:
    role = f"nogrants_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
    try:
        add_events(conn, 3)
        as_role = conninfo.make_conninfo(dsn, user=role)
        for args in (["run", "--sink", "null", "--endpos", "now"], ["run", "--mode", "poll", "--sink", "null"],
                     ["replay", "--from-seq", "1"], ["reconcile"]):
            proc = cdc(args[0], "--dsn", as_role, *args[1:])
            assert "Traceback" not in proc.stderr, (args, proc.stderr)
            last = proc.stderr.strip().splitlines()[-1]
            assert proc.returncode == (2 if args[0] == "reconcile" else 1), (args, proc.stderr)
            assert last.startswith("cdc: error: "), (args, proc.stderr)
            assert "permission denied" in last and "grant" in last.lower(), (args, last)
        assert slots(dsn) == set()
    finally:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


# -- least privilege --------------------------------------------------------------------------------


def test_heartbeats_need_no_grant_beyond_login(dsn: str, conn: psycopg.Connection) -> None:
    # pg_logical_emit_message is executable by any role: a role with only the documented grants
    # moves its idle slot with heartbeats, and a failing heartbeat is logged, never silent.
    import signal
    import time

    role = f"hb_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
    try:
        assert cdc("setup", "--dsn", dsn, "--grant", role).returncode == 0
        as_role = conninfo.make_conninfo(dsn, user=role)
        proc = subprocess.Popen([sys.executable, "-m", "cdc", "run", "--dsn", as_role, "--sink", "null",
                                 "--heartbeat-interval", "0.2", "--status-interval", "0.5"],
                                cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            def flushed() -> int | None:
                row = conn.execute("SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots "
                                   "WHERE slot_name = 'cdc' AND active_pid IS NOT NULL").fetchone()
                return int(row[0]) if row and row[0] is not None else None  # NULL while being created

            deadline = time.monotonic() + 30
            while flushed() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            start = flushed()
            assert start is not None, "the run never streamed"
            while (flushed() or 0) <= start and time.monotonic() < deadline:
                time.sleep(0.1)
            assert (flushed() or 0) > start, "no heartbeat moved the idle slot"
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "heartbeat" not in err, err
    finally:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def test_a_role_with_exactly_the_documented_grants_runs_every_command(dsn: str, conn: psycopg.Connection,
                                                                      tmp_path: Path) -> None:
    from cdc.grants import grant_sql

    role = f"app_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
    try:
        proc = cdc("setup", "--dsn", dsn, "--grant", role)
        assert proc.returncode == 0, proc.stderr
        as_role = conninfo.make_conninfo(dsn, user=role)
        add_events(conn, 5)
        checked = cdc("check", "--dsn", as_role, "--feature", "record-deliveries", "--feature", "reconcile",
                      "--feature", "dead-letters")
        assert checked.returncode == 0, checked.stdout
        # Stream (a hand-off first: a new consumer), recording deliveries, then reconcile.
        out = tmp_path / "out.jsonl"
        run = cdc("run", "--dsn", as_role, "--sink", f"jsonl:{out}", "--record-deliveries", "--endpos", "now")
        assert run.returncode == 0, run.stderr
        assert len(out.read_text().splitlines()) == 5
        add_events(conn, 2)
        run = cdc("run", "--dsn", as_role, "--sink", f"jsonl:{out}", "--record-deliveries", "--endpos", "now")
        assert run.returncode == 0, run.stderr
        assert len(out.read_text().splitlines()) == 7
        recon = cdc("reconcile", "--dsn", as_role, "--consumer", "default")
        assert recon.returncode == 0, recon.stdout + recon.stderr
        replay = cdc("replay", "--dsn", as_role, "--from-seq", "1", "--sink", "null")
        assert replay.returncode == 0, replay.stderr
        # Poll, auto and a standby, each as its own consumer, with the same grants.
        for extra in (["--mode", "poll", "--consumer", "lp"], ["--mode", "auto", "--consumer", "la"],
                      ["--standby", "--consumer", "ls"]):
            other = cdc("run", "--dsn", as_role, "--sink", f"jsonl:{tmp_path / extra[-1]}", "--endpos", "now", *extra)
            assert other.returncode == 0, (extra, other.stderr)
            assert len((tmp_path / extra[-1]).read_text().splitlines()) == 7, extra
        from .test_sidecar import Receiver

        rx = Receiver()
        try:
            hook = cdc("run", "--dsn", as_role, "--sink", f"webhook:{rx.url}", "--consumer", "lw", "--endpos", "now")
            assert hook.returncode == 0 and len(rx.seqs()) == 7, hook.stderr
        finally:
            rx.close()
        # A handler that fails: the transaction goes to cdc.dead_letters.
        (tmp_path / "failing.py").write_text("def handle(conn, tx):\n    raise ValueError('no')\n")
        add_events(conn, 1)
        dead = cdc("run", "--dsn", as_role, "--sink", "python:failing:handle", "--on-poison", "dead-letter",
                   "--max-attempts", "1", "--consumer", "dl", "--slot", "dl", "--endpos", "now",
                   env={"PYTHONPATH": f"{tmp_path}:{ROOT}"})
        assert dead.returncode == 0, dead.stderr
        assert conn.execute("SELECT count(*) FROM cdc.dead_letters").fetchone()[0] >= 1
        # One grant revoked at a time: `cdc check` names it, `cdc run` fails with one line.
        for statement in grant_sql(role, ["run"]):
            revoke = statement.replace("GRANT ", "REVOKE ", 1).replace(f" TO {role};", f" FROM {role};")
            conn.execute(revoke)
            try:
                checked = cdc("check", "--dsn", as_role)
                assert checked.returncode == 1 and statement in checked.stdout, (statement, checked.stdout)
                # A new consumer: its hand-off reads the table too (a slot in use reads only the WAL).
                before = slots(dsn)
                failed = cdc("run", "--dsn", as_role, "--sink", "null", "--consumer", "fresh", "--slot", "fresh",
                             "--endpos", "now")
                assert failed.returncode != 0 and "Traceback" not in failed.stderr, failed.stderr
                assert failed.stderr.strip().splitlines()[-1].startswith("cdc: error: "), failed.stderr
                assert slots(dsn) == before, "a failed hand-off left its slot behind"
            finally:
                conn.execute(statement)
    finally:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = current_database() "
                                    "AND NOT active").fetchall():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def test_every_command_reads_the_same_settings_flags_then_environment_then_file(dsn: str, conn: psycopg.Connection,
                                                                                tmp_path: Path) -> None:
    add_events(conn, 3)
    proc = cdc("replay", "--dsn", dsn, "--from-seq", "1", env={"CDC_SINK": "null"})
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    out = tmp_path / "o.jsonl"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[cdc]\nsink = "jsonl:{out}"\nconsumer = "named"\nslot = "named"\n')
    proc = cdc("replay", "--dsn", dsn, "--from-seq", "1", "--config", str(cfg))
    assert proc.returncode == 0 and len(out.read_text().splitlines()) == 3, proc.stderr
    run = cdc("run", "--dsn", dsn, "--config", str(cfg), "--sink", "null", "--record-deliveries", "--endpos", "now")
    assert run.returncode == 0, run.stderr
    for how in ({"env": {"CDC_CONSUMER": "named"}}, {"args": ("--config", str(cfg))}):
        proc = cdc("reconcile", "--dsn", dsn, *how.get("args", ()), env=how.get("env"))  # type: ignore[arg-type]
        assert proc.returncode == 0 and "3 delivered" in proc.stdout, (how, proc.stdout, proc.stderr)
    proc = cdc("check", "--dsn", dsn, env={"CDC_SLOT": "named"})
    assert "named" in proc.stdout, proc.stdout


def test_messages_name_the_role_and_never_print_none(dsn: str, conn: psycopg.Connection) -> None:
    role = f"norepl_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        assert cdc("setup", "--dsn", dsn, "--grant", role).returncode == 0
        proc = cdc("run", "--dsn", conninfo.make_conninfo(dsn, user=role), "--mode", "stream", "--sink", "null",
                   "--endpos", "now")
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and f"ALTER ROLE {role} REPLICATION" in last, proc.stderr
    finally:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")
    proc = cdc("reconcile", "--dsn", dsn, "--consumer", "nosuch")
    assert "None" not in proc.stdout, proc.stdout
    add_events(conn, 1)
    proc = cdc("run", "--dsn", dsn, "--sink", "null", "--endpos", "now")
    assert proc.returncode == 0 and "1 event in 1 transaction delivered" in proc.stderr, proc.stderr


def test_a_mistake_is_one_json_object_under_json_logs(empty_dsn: str) -> None:
    import json

    for args, env in ((["replay", "--dsn", empty_dsn, "--from-seq", "1", "--log-format", "json"], {}),
                      (["run", "--dsn", empty_dsn, "--endpos", "0/1"], {"CDC_LOG_FORMAT": "json"})):
        proc = cdc(*args, env=env)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        doc = json.loads(proc.stderr.strip().splitlines()[-1])
        assert doc["level"] == "error" and "cdc setup" in doc["message"] and doc["exit_code"] == 1, doc
