"""Primary failover with a real physical standby: the primary dies mid-stream, the standby is
promoted, and `cdc run` (a libpq multi-host DSN with target_session_attrs=read-write) carries on.

Before PostgreSQL 17 a promoted standby has no logical slots: the consumer hands over by seq
under a new slot, from the checkpoint the projection committed with its own writes (replicated
with them). On 17+ a failover slot kept by the standby's slot sync survives the promotion and
the stream goes on from it, without a hand-off.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from cdc import store
from cdc.checkpoint import default_slot
from cdc.embedded import _server_version, embedded_cluster, find_bin_dir, wait_for

from .faults import ROOT, Writers, cdc_run, check_projection, sql, tail, wait_log
from .replicas import crash, multi_host_dsn, promote, standby_of
from .support import PLUGIN

PROJECT = "python:tests.fault_projection:project"


def _prepare(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        store.setup(conn)
        conn.execute("CREATE TABLE fault_projection (seq bigint NOT NULL, xid bigint)")


def _wait_projected(dsn: str, log: Path, timeout: float = 90) -> None:
    def done() -> bool:
        committed = {r[0] for r in sql(dsn, "SELECT seq FROM cdc.events")}
        return committed <= {r[0] for r in sql(dsn, "SELECT seq FROM fault_projection")}
    assert wait_for(done, timeout=timeout, interval=0.3), f"the projection did not catch up after the failover: {tail(log, 25)}"


def _stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(30) == 0, tail(log, 20)
    finally:
        if proc.poll() is None:
            proc.kill()


def _reconcile(dsn: str, consumer: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdc", "reconcile", "--dsn", dsn, "--consumer", consumer],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_primary_failover_loses_nothing_and_applies_nothing_twice(tmp_path):
    log = tmp_path / "run.log"
    with embedded_cluster(fast=True) as primary:
        _prepare(primary.dsn)
        with standby_of(primary) as standby:
            dsn = multi_host_dsn(primary, standby)
            proc = cdc_run(dsn, "--mode", "stream", "--plugin", PLUGIN, "--consumer", "fo", "--sink", PROJECT,
                           "--record-deliveries", "--checkpoint-interval", "0.1", log=log)
            try:
                wait_log(log, "streaming from slot", proc)
                with Writers(dsn, writers=3, big=0.05, big_events=300, rollback=0.2, pause=0.01):
                    time.sleep(2.5)
                    crash(primary)
                    promote(standby)
                    time.sleep(3)
                _wait_projected(standby.dsn, log)
            finally:
                _stop(proc, log)
            events = sql(standby.dsn, "SELECT count(*) FROM cdc.events")[0][0]
            check_projection(standby.dsn)  # 0 lost, 0 applied twice, against what the new primary holds
            text = log.read_text()
            assert "reconnecting" in text and "slot does not exist" in text, tail(log, 20)
            assert events > 100
            rec = _reconcile(standby.dsn, "fo")
            assert rec.returncode == 0, rec.stdout + rec.stderr


def test_a_failover_slot_survives_promotion_and_the_stream_goes_on_without_a_hand_off(tmp_path):
    if _server_version(find_bin_dir())[0] < 17:
        pytest.skip("failover slots need PostgreSQL 17 or later (scripts/test runs this on 18)")
    log = tmp_path / "run.log"
    with embedded_cluster(fast=True, settings={"synchronized_standby_slots": "'sb1'",
                                               "synchronous_standby_names": "'*'"}) as primary:
        _prepare(primary.dsn)
        # The standby's copy of postgresql.conf has the primary's synchronous settings: once
        # promoted, with no standby of its own, every commit would wait for one forever.
        with standby_of(primary, slot="sb1", settings={"sync_replication_slots": "on", "hot_standby_feedback": "on",
                                                       "synchronous_standby_names": "''",
                                                       "synchronized_standby_slots": "''"}) as standby:
            dsn = multi_host_dsn(primary, standby)
            proc = cdc_run(dsn, "--mode", "stream", "--plugin", PLUGIN, "--failover-slot", "--consumer", "fs",
                           "--sink", PROJECT, "--checkpoint-interval", "0.1", log=log)
            try:
                wait_log(log, "streaming from slot", proc)
                slot = default_slot("fs")
                assert sql(primary.dsn, "SELECT failover FROM pg_replication_slots WHERE slot_name = %s",
                           (slot,)) == [(True,)]
                # Synced, and persistent: a synced slot still temporary (not yet caught up with the
                # primary's) is dropped at promotion. Waited for before the writers: on a loaded
                # machine a slot that keeps moving takes long to sync; once persistent it stays so.
                assert wait_for(lambda: sql(standby.dsn, "SELECT synced AND NOT temporary FROM pg_replication_slots "
                                                         "WHERE slot_name = %s", (slot,)) == [(True,)], timeout=120), \
                    "the standby never synced the slot"
                with Writers(dsn, writers=3, rollback=0.2, pause=0.01):
                    time.sleep(1.5)
                    crash(primary)
                    promote(standby)
                    time.sleep(3)
                _wait_projected(standby.dsn, log)
                wait_log(log, "streaming from slot", proc, count=2)
            finally:
                _stop(proc, log)
            check_projection(standby.dsn)
            text = log.read_text()
            assert "reconnecting" in text, tail(log, 20)
            after = text[text.index("reconnecting"):]
            assert "replaying from seq" not in after and "slot does not exist" not in after, tail(log, 30)


def test_failover_slot_is_made_on_17_and_refused_in_one_line_before(dsn, conn):
    version = conn.execute("SHOW server_version_num").fetchone()[0]
    from cdc import Consumer
    from cdc.errors import SetupError

    if int(version) >= 170000:
        with Consumer(dsn, consumer="fo", failover_slot=True, endpos="now") as feed:
            assert list(feed) == []
        assert sql(dsn, "SELECT failover FROM pg_replication_slots WHERE slot_name = %s", (default_slot("fo"),)) == [(True,)]
        return
    with pytest.raises(SetupError, match="this server cannot make failover slots .*needs PostgreSQL 17 or later"):
        with Consumer(dsn, consumer="fo", failover_slot=True, endpos="now") as feed:
            list(feed)
    assert sql(dsn, "SELECT count(*) FROM pg_replication_slots")[0][0] == 0
