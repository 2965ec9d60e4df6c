"""A slot per consumer (issue 15): two consumer names never share a slot by default, a slot
another consumer records is refused, and a consumer that moves to another slot hears about the
one it left (which holds WAL until dropped)."""

from __future__ import annotations

import logging
import re

import psycopg
import pytest

from cdc import Consumer
from cdc.checkpoint import default_slot

from .support import append_events as _append
from .support import jsonl_seqs as _seqs
from .test_mistakes import cdc, slots


@pytest.mark.parametrize("name", ["projector", "Billing-Projection", "billing_projection", "BILLING_projection",
                                  "x" * 200, "ünïcode name", "a.b", "default"])
def test_the_default_slot_is_a_valid_name_of_the_consumers_own(name: str) -> None:
    slot = default_slot(name)
    assert re.fullmatch(r"[a-z0-9_]{1,63}", slot), slot
    assert slot == default_slot(name), "must be stable across runs"
    assert slot == ("cdc" if name == "default" else slot)
    if name != "default":
        assert slot.startswith("cdc_") and slot != "cdc"


def test_names_that_read_alike_get_slots_of_their_own() -> None:
    names = ["Billing-Projection", "billing_projection", "BILLING_projection", "billing.projection",
             "x" * 200, "x" * 201, "default", "cdc"]
    assert len({default_slot(n) for n in names}) == len(names)


def test_the_library_example_and_the_sidecar_run_in_turn_each_on_its_own_slot(dsn: str, conn: psycopg.Connection,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    # The finding: both defaulted to slot `cdc`, so each run dropped and re-created it with a replay.
    caplog.set_level(logging.INFO, logger="cdc")
    _append(conn, "a")
    seen: dict[str, list[int]] = {"projector": [], "default": []}
    for round_ in range(2):
        with Consumer(dsn, consumer="projector", endpos="now") as feed:
            seen["projector"] += [e.seq for tx in feed for e in tx.events]
        run = cdc("run", "--dsn", dsn, "--endpos", "now")
        assert run.returncode == 0, run.stderr
        seen["default"] += _seqs(run.stdout)
        if round_ == 1:
            assert "slot does not exist" not in run.stderr, "the sidecar's slot was re-created"
        _append(conn, f"b{round_}")
    assert {"cdc", "cdc_projector"} <= slots(dsn)
    handoffs = [r for r in caplog.records if "slot does not exist" in r.getMessage()]
    assert len(handoffs) == 1, "the library consumer's slot was re-created"
    committed = sorted(r[0] for r in conn.execute("SELECT seq FROM cdc.events WHERE stream_id <> 'b1'"))
    assert sorted(seen["projector"]) == committed and sorted(seen["default"]) == committed
    rows = dict(conn.execute("SELECT consumer, slot FROM cdc.checkpoints").fetchall())
    assert rows == {"projector": "cdc_projector", "default": "cdc"}


def test_a_slot_another_consumer_records_is_refused_with_one_line(dsn: str, conn: psycopg.Connection) -> None:
    _append(conn, "a")
    first = cdc("run", "--dsn", dsn, "--consumer", "a", "--endpos", "now")
    assert first.returncode == 0, first.stderr
    before = conn.execute("SELECT lsn::text, seq FROM cdc.checkpoints WHERE consumer = 'a'").fetchone()
    for slot in ("cdc_a",):
        proc = cdc("run", "--dsn", dsn, "--consumer", "b", "--slot", slot, "--endpos", "now")
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert "Traceback" not in proc.stderr and last.startswith("cdc: error: "), proc.stderr
        assert f"slot {slot}" in last and "'a'" in last and "--slot" in last, last
    assert "cdc_a" in slots(dsn), "the other consumer's slot must survive"
    assert conn.execute("SELECT lsn::text, seq FROM cdc.checkpoints WHERE consumer = 'a'").fetchone() == before
    assert conn.execute("SELECT count(*) FROM cdc.checkpoints WHERE consumer = 'b'").fetchone()[0] == 0


def test_a_consumer_moved_to_another_slot_hears_about_the_old_one_and_repeats_nothing(dsn: str,
                                                                                   conn: psycopg.Connection) -> None:
    _append(conn, "a")
    first = cdc("run", "--dsn", dsn, "--consumer", "mover", "--slot", "old_one", "--endpos", "now")
    assert first.returncode == 0, first.stderr
    _append(conn, "b")
    second = cdc("run", "--dsn", dsn, "--consumer", "mover", "--endpos", "now")
    assert second.returncode == 0, second.stderr
    assert "slot old_one before" in second.stderr and "pg_drop_replication_slot('old_one')" in second.stderr, second.stderr
    delivered = _seqs(first.stdout) + _seqs(second.stdout)
    assert sorted(delivered) == sorted(r[0] for r in conn.execute("SELECT seq FROM cdc.events"))
    assert conn.execute("SELECT slot FROM cdc.checkpoints WHERE consumer = 'mover'").fetchone()[0] == "cdc_mover"


def test_a_consumer_from_before_slots_were_recorded_is_told_about_slot_cdc(dsn: str, conn: psycopg.Connection) -> None:
    # Before this version every consumer read `cdc` by default and no slot was recorded.
    _append(conn, "a")
    first = cdc("run", "--dsn", dsn, "--consumer", "legacy", "--slot", "cdc", "--endpos", "now")
    assert first.returncode == 0, first.stderr
    conn.execute("UPDATE cdc.checkpoints SET slot = NULL")
    _append(conn, "b")
    again = cdc("run", "--dsn", dsn, "--consumer", "legacy", "--endpos", "now")
    assert again.returncode == 0, again.stderr
    assert "slot cdc before" in again.stderr and "--slot cdc" in again.stderr, again.stderr
    assert len(_seqs(again.stdout)) == 2, "the new slot's hand-off repeats nothing the checkpoint holds"


def test_a_schema_from_an_earlier_version_meets_one_line_then_setup_upgrades_it(dsn: str,
                                                                              conn: psycopg.Connection) -> None:
    conn.execute("ALTER TABLE cdc.checkpoints DROP COLUMN slot")
    proc = cdc("run", "--dsn", dsn, "--endpos", "now")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "cdc setup" in last and "slot" in last, last
    assert slots(dsn) == set()
    assert cdc("setup", "--dsn", dsn).returncode == 0
    assert cdc("run", "--dsn", dsn, "--endpos", "now").returncode == 0


# -- slots never leak (issue 16) --------------------------------------------------------------------

def test_a_hand_off_that_fails_in_the_sink_leaves_no_slot_however_often(dsn: str, conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE fault_projection (seq bigint NOT NULL, xid bigint)")
    _append(conn, "leak", 3)
    before = slots(dsn)
    for n in range(3):  # each a new consumer: a left slot each would add up to max_replication_slots
        proc = cdc("run", "--dsn", dsn, "--consumer", f"leak{n}", "--sink", "python:tests.fault_projection:project",
                   "--max-attempts", "1", "--endpos", "now", env={"CDC_FAULT_FAIL": "1", "PYTHONPATH": "."})
        assert proc.returncode == 1, proc.stderr
        assert f"dropped slot {default_slot(f'leak{n}')}" in proc.stderr, proc.stderr
        assert slots(dsn) == before, proc.stderr
    # The next run of one of them hands over again and delivers everything, once.
    proc = cdc("run", "--dsn", dsn, "--consumer", "leak0", "--sink", "python:tests.fault_projection:project",
               "--endpos", "now", env={"PYTHONPATH": "."})
    assert proc.returncode == 0, proc.stderr
    assert [r[0] for r in conn.execute("SELECT seq FROM fault_projection ORDER BY seq")] == [1, 2, 3]
    assert slots(dsn) == before | {default_slot("leak0")}


def test_a_hand_off_stopped_midway_drops_its_slot_and_the_next_run_finishes_it(dsn: str, conn: psycopg.Connection,
                                                                            tmp_path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from .test_mistakes import ROOT, add_events

    add_events(conn, 300_000)
    out, log = tmp_path / "a.jsonl", tmp_path / "a.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cdc", "run", "--dsn", dsn, "--consumer", "halt",
                                 "--sink", f"jsonl:{out}"], cwd=ROOT, stderr=err, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while "events to replay" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()
    text = log.read_text()
    assert "dropped slot cdc_halt: the run stopped before its hand-off finished" in text, text
    assert default_slot("halt") not in slots(dsn)
    first = _seqs(out)
    assert 0 < len(first) < 300_000, "stopped midway"
    proc2 = cdc("run", "--dsn", dsn, "--consumer", "halt", "--sink", f"jsonl:{tmp_path / 'b.jsonl'}",
                "--endpos", "now", timeout=120)
    assert proc2.returncode == 0, proc2.stderr
    both = first + _seqs(tmp_path / "b.jsonl")
    assert sorted(both) == list(range(1, 300_001)), "each event once across the two runs"


def test_check_lists_inactive_wal2json_slots_with_retained_wal_and_the_drop_command(dsn: str,
                                                                                   conn: psycopg.Connection) -> None:
    _append(conn, "chk", 2)
    assert cdc("run", "--dsn", dsn, "--consumer", "owned", "--sink", "null", "--endpos", "now").returncode == 0
    conn.execute("SELECT pg_create_logical_replication_slot('orphan', 'wal2json')")
    conn.execute("SELECT pg_create_logical_replication_slot('other_plugin', 'test_decoding')")
    _append(conn, "chk2", 2)
    proc = cdc("check", "--dsn", dsn)
    line = next(ln for ln in proc.stdout.splitlines() if "inactive_slots" in ln)
    assert line.startswith("OK   inactive_slots: 2 not being read"), line
    assert "orphan (no consumer records it, retains " in line, line
    assert "drop: SELECT pg_drop_replication_slot('orphan')" in line, line
    assert f"{default_slot('owned')} (consumer owned, retains " in line, line
    assert "other_plugin" not in line
    slot_line = next(ln for ln in cdc("check", "--dsn", dsn, "--slot", default_slot("owned")).stdout.splitlines()
                     if ln.startswith("OK   slot:"))
    assert "recorded by consumer owned" in slot_line, slot_line
    conn.execute("SELECT pg_drop_replication_slot('other_plugin')")
