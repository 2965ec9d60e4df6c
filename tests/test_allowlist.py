"""cdc on a server minor with `output_plugin_libraries` (15.19+, 16.15+, 17.11+, 18.6+), which
loads only the output plugins it lists: the embedded cluster lists wal2json, and a server that
does not gets one clear line from `cdc run` and `cdc check`, with no slot left behind.

The server is the installed one when it is new enough, else the one scripts/setup unpacks into
/var/tmp/cdc-postgresql-<version> (or CDC_TEST_ALLOWLIST_BINDIR); skipped when neither exists.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cdc import Consumer, Lsn, NewEvent, append, setup
from cdc.embedded import _server_version, embedded_cluster, find_bin_dir

# The first minor of each major with the setting (released 2026-08-13).
ALLOWLIST_SINCE = {15: 19, 16: 15, 17: 11, 18: 6}


def _allowlist_bindir() -> Path | None:
    explicit = os.environ.get("CDC_TEST_ALLOWLIST_BINDIR")
    candidates = [Path(explicit)] if explicit else []
    try:
        candidates.append(find_bin_dir())
    except Exception:
        pass
    candidates += [Path(p) for p in sorted(glob.glob("/var/tmp/cdc-postgresql-*/usr/lib/postgresql/*/bin"))]
    for c in candidates:
        if not (c / "postgres").exists():
            continue
        major, minor = _server_version(c)
        if major > 18 or minor >= ALLOWLIST_SINCE.get(major, 10**6):
            return c
    return None


BINDIR = _allowlist_bindir()
pytestmark = pytest.mark.skipif(
    BINDIR is None, reason="no PostgreSQL minor with output_plugin_libraries here (scripts/setup unpacks one)"
)


@pytest.fixture
def allowlist_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CDC_PG_BINDIR", str(BINDIR))
    yield


def _cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdc", *args, "--dsn", dsn], capture_output=True, text=True,
                          timeout=60)


def test_the_embedded_cluster_lists_wal2json_and_streams(allowlist_server: None) -> None:
    with embedded_cluster(fast=True) as cluster:
        assert cluster.version >= 150019
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            assert "wal2json" in conn.execute("SHOW output_plugin_libraries").fetchone()[0]
            setup(conn)
        with Consumer(cluster.dsn, consumer="a", endpos="now") as feed:  # creates the slot
            assert list(feed) == []
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            append(conn, "s-1", [NewEvent("Opened", {"n": 1})], expected_version=0)
            end = Lsn.parse(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
        with Consumer(cluster.dsn, consumer="a", endpos=end) as feed:
            events = [e for tx in feed for e in tx.events]
        assert [(e.stream_id, e.data) for e in events] == [("s-1", {"n": 1})]


def test_a_server_that_does_not_list_wal2json_gets_one_line_that_says_how_to_fix_it(allowlist_server: None) -> None:
    refused = {"output_plugin_libraries": "'pgoutput, test_decoding'"}
    with embedded_cluster(fast=True, settings=refused) as cluster:
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            setup(conn)
        run = _cli(cluster.dsn, "run", "--mode", "stream", "--sink", "null")
        assert run.returncode != 0 and run.stdout == ""
        last = run.stderr.strip().splitlines()[-1]
        assert "output_plugin_libraries" in last and "wal2json" in last, run.stderr
        assert "Traceback" not in run.stderr
        check = _cli(cluster.dsn, "check")
        assert check.returncode != 0
        line = next(ln for ln in check.stdout.splitlines() if " wal2json" in ln)
        assert line.startswith("FAIL") and "output_plugin_libraries" in line
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0
