"""`cdc status` (issue 16): every consumer as the database knows it, in text and JSON."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson

from cdc.checkpoint import default_slot

from .support import PLUGIN, append_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cdc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdc", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)


def test_status_shows_each_consumer_checkpoint_slot_lag_recording_and_mapping(dsn, conn):
    append_events(conn, "a", 3)
    assert cdc("run", "--dsn", dsn, "--consumer", "rec", "--record-deliveries", "--sink", "null",
               "--endpos", "now").returncode == 0
    assert cdc("run", "--dsn", dsn, "--consumer", "plain", "--sink", "null", "--endpos", "now").returncode == 0
    append_events(conn, "b", 2)  # both are 2 events behind now
    out = cdc("status", "--dsn", dsn, "--json")
    assert out.returncode == 0, out.stderr
    by_name = {c["consumer"]: c for c in orjson.loads(out.stdout)["consumers"]}
    assert set(by_name) == {"rec", "plain"}
    rec, plain = by_name["rec"], by_name["plain"]
    assert rec["records_deliveries"] and rec["recorded_runs"] == 1 and rec["last_delivery_at"]
    assert not plain["records_deliveries"] and plain["last_delivery_at"] is None
    for c, name in ((rec, "rec"), (plain, "plain")):
        assert c["slot"] == default_slot(name) and c["slot_exists"] and c["slot_active_pid"] is None
        assert c["slot_plugin"] == PLUGIN
        assert c["checkpoint_seq"] == 3 and c["events_behind"] == 2 and c["checkpoint_lsn"]
        assert c["retained_wal_bytes"] > 0 and c["lag_bytes"] > 0
        assert c["table"] == "cdc.events" and c["mapping"]["name"] == "events"
    text = cdc("status", "--dsn", dsn)
    lines = text.stdout.splitlines()
    assert text.returncode == 0 and len(lines) == 2, text.stdout
    assert lines[0].startswith("plain: checkpoint ") and "2 events behind in cdc.events" in lines[0]
    assert f"slot {default_slot('plain')} ({PLUGIN}) inactive" in lines[0], lines[0]
    assert "reconcile cannot check it" in lines[0] and "records deliveries (1 run" in lines[1], lines
    one = cdc("status", "--dsn", dsn, "--consumer", "rec")
    assert one.returncode == 0 and one.stdout.startswith("rec: ") and len(one.stdout.splitlines()) == 1
    missing = cdc("status", "--dsn", dsn, "--consumer", "nosuch")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nosuch" in missing.stderr


def test_status_before_setup_is_one_line(empty_dsn):
    proc = cdc("status", "--dsn", empty_dsn)
    assert proc.returncode == 2 and proc.stderr.startswith("cdc: error: ") and "cdc setup" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
