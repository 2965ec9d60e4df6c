"""The embedded cluster: starts as an unprivileged user, and no postgres outlives its owner."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psycopg

from cdc.embedded import embedded_cluster, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _postgres_running(data_dir: str) -> bool:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return any(data_dir in line and "postgres" in line for line in out.splitlines())


def test_cluster_has_logical_decoding_and_is_removed_after_use():
    with embedded_cluster(fast=True) as c:
        with psycopg.connect(c.dsn) as conn:
            assert conn.execute("SHOW wal_level").fetchone()[0] == "logical"
            conn.execute("SELECT pg_create_logical_replication_slot('x', 'wal2json', true)")
        data = c.data_dir
    assert not _postgres_running(data)
    assert not os.path.exists(data)


def _demo(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cdc", "demo", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": ROOT})


def _data_dir(proc: subprocess.Popen) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline().decode()
        m = re.search(r"host=(/tmp/cdc-pg-[^/ ]+)/run", line)
        if m:
            return m.group(1) + "/data"
    raise AssertionError("the demo never said where its cluster is")


def test_ctrl_c_on_the_demo_leaves_no_postgres_behind():
    proc = _demo("--seconds", "30")
    data = _data_dir(proc)
    assert proc.stdout is not None and proc.stdout.readline()  # events are flowing
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=60)  # read what it still prints, as a terminal would: a full pipe blocks its exit
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # its threads' stacks, to stderr
        time.sleep(1)
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError("the demo did not stop on Ctrl-C:\n" + err.decode(errors="replace")[-6000:]) from None
    assert wait_for(lambda: not _postgres_running(data), timeout=10)
    assert not os.path.exists(os.path.dirname(data))


def test_kill_9_of_the_owner_leaves_no_postgres_behind():
    proc = _demo("--seconds", "30")
    data = _data_dir(proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # The watchdog notices its pipe closing and stops the server, then removes the files.
    assert wait_for(lambda: not _postgres_running(data), timeout=30)
    assert wait_for(lambda: not os.path.exists(os.path.dirname(data)), timeout=10)


def test_demo_prints_events_and_a_summary_and_exits_0():
    proc = _demo("--seconds", "3")
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err.decode()[-2000:]
    lines = out.decode().splitlines()
    assert len(lines) > 10
    assert "OK: every committed event exactly once" in err.decode()
