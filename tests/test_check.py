"""`cdc check`: each way a server can fail to feed `cdc run` is named, with its fix."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

from cdc import store
from cdc.check import CheckResult, format_results, main_check, run_checks
from cdc.embedded import embedded_cluster

from .support import PLUGIN, PLUGIN_CHECK


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def test_all_checks_pass_on_a_set_up_logical_server(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    results = run_checks(dsn)
    assert [r for r in results if not r.ok] == []
    names = [r.name for r in results]
    assert names[0] == "server"
    assert {"wal_level", PLUGIN_CHECK, "replication_privilege", "select_privilege", "slot",
            "events_table", "events_seq"} <= set(names)
    assert main_check(dsn) == 0
    out = capsys.readouterr().out
    assert "OK   wal_level: logical" in out.splitlines()
    assert "FAIL" not in out


def test_the_wal2json_probe_leaves_no_slot_behind(conn: psycopg.Connection, dsn: str) -> None:
    run_checks(dsn)
    assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)


def test_unreachable_server_stops_after_the_first_check() -> None:
    results = run_checks("host=127.0.0.1 port=1 user=postgres dbname=postgres connect_timeout=2")
    assert len(results) == 1
    assert results[0].name == "server" and not results[0].ok
    assert "FAIL server:" in format_results(results)


def test_missing_events_table_fails_naming_cdc_setup(empty_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    results = by_name(run_checks(empty_dsn))
    assert not results["events_table"].ok
    assert results["events_table"].fix == "cdc setup"
    # The checks that need the table are skipped, not failed a second time.
    assert results["events_seq"].skipped and results["select_privilege"].skipped
    assert main_check(empty_dsn) == 1
    assert "FAIL events_table: cdc.events does not exist — fix: cdc setup" in capsys.readouterr().out


def test_replica_wal_level_fails_with_the_fix() -> None:
    with embedded_cluster(fast=True, settings={"wal_level": "replica"}) as cluster:
        with psycopg.connect(cluster.dsn, autocommit=True) as c:
            store.setup(c)
        results = by_name(run_checks(cluster.dsn))
    assert not results["wal_level"].ok
    assert results["wal_level"].detail.startswith("replica")
    assert "wal_level = logical" in (results["wal_level"].fix or "")
    assert results[PLUGIN_CHECK].skipped or PLUGIN == "pgoutput"
    assert results["events_table"].ok
    line = format_results([results["wal_level"]])
    assert line.startswith("FAIL wal_level: replica") and "— fix: ALTER SYSTEM SET wal_level = logical" in line


def test_role_without_replication_fails(server, dsn: str) -> None:  # type: ignore[no-untyped-def]
    role = f"norepl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server.admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        results = by_name(run_checks(psycopg.conninfo.make_conninfo(dsn, user=role)))
        assert not results["replication_privilege"].ok
        assert "REPLICATION" in (results["replication_privilege"].fix or "")
        assert results[PLUGIN_CHECK].skipped or PLUGIN == "pgoutput"
        assert not results["select_privilege"].ok
        assert "GRANT SELECT ON cdc.events" in (results["select_privilege"].fix or "")
    finally:
        with psycopg.connect(server.admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_cached_sequence_fails_with_alter_sequence(conn: psycopg.Connection, dsn: str) -> None:
    conn.execute("ALTER SEQUENCE cdc.events_seq CACHE 20")
    result = by_name(run_checks(dsn))["events_seq"]
    assert not result.ok
    assert result.fix == "ALTER SEQUENCE cdc.events_seq CACHE 1"


def test_seq_without_a_sequence_fails(conn: psycopg.Connection, dsn: str) -> None:
    conn.execute("ALTER TABLE cdc.events ALTER COLUMN seq DROP DEFAULT")
    conn.execute("ALTER SEQUENCE cdc.events_seq OWNED BY NONE")
    assert not by_name(run_checks(dsn))["events_seq"].ok


def test_altered_table_shape_fails(conn: psycopg.Connection, dsn: str) -> None:
    conn.execute("ALTER TABLE cdc.events ALTER COLUMN data TYPE text, ADD COLUMN tenant text")
    result = by_name(run_checks(dsn))["events_table"]
    assert not result.ok
    assert "data is text" in result.detail and "tenant" in result.detail


def test_existing_slot_reports_its_state(conn: psycopg.Connection, dsn: str) -> None:
    conn.execute("SELECT pg_create_logical_replication_slot('cdc', %s)", (PLUGIN,))
    conn.execute("CREATE TABLE filler AS SELECT generate_series(1, 1000) AS n")
    result = by_name(run_checks(dsn))["slot"]
    assert result.ok
    assert "exists" in result.detail and "wal_status reserved" in result.detail and "retains" in result.detail


def test_slot_of_another_plugin_fails(conn: psycopg.Connection, dsn: str) -> None:
    conn.execute("SELECT pg_create_logical_replication_slot('cdc', 'test_decoding')")
    assert not by_name(run_checks(dsn))["slot"].ok


def test_lost_slot_fails_with_drop_it() -> None:
    # A slot falls behind max_slot_wal_keep_size and is invalidated at the next checkpoint.
    with embedded_cluster(fast=True, settings={"max_slot_wal_keep_size": "1MB"}) as cluster:
        with psycopg.connect(cluster.dsn, autocommit=True) as c:
            store.setup(c)
            c.execute("SELECT pg_create_logical_replication_slot('cdc', %s)", (PLUGIN,))
            c.execute("CREATE TABLE filler (n int)")
            for _ in range(3):
                c.execute("INSERT INTO filler SELECT generate_series(1, 1000)")
                c.execute("SELECT pg_switch_wal()")
            c.execute("CHECKPOINT")
            assert c.execute("SELECT wal_status FROM pg_replication_slots").fetchone() == ("lost",)
        result = by_name(run_checks(cluster.dsn))["slot"]
    assert not result.ok
    assert "wal_status lost" in result.detail
    assert result.fix is not None and result.fix.startswith("drop it: cdc will recreate it and replay from the poller")


def test_mapped_table_with_identity_seq_passes(conn: psycopg.Connection, dsn: str) -> None:
    from cdc.store import EventTable

    conn.execute("CREATE TABLE public.mt_events (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                 "stream_id uuid NOT NULL, version int, type varchar(200), data jsonb, "
                 "timestamp timestamptz, tenant text)")
    table = EventTable(schema="public", name="mt_events", created_at="timestamp", metadata=None,
                       xid=None, strict=False)
    results = by_name(run_checks(dsn, table=table))
    assert results["events_table"].ok, results["events_table"]
    assert results["events_seq"].ok and "mt_events_seq_seq" in results["events_seq"].detail


def test_events_table_and_sequence_are_read_without_schema_usage(server, dsn: str) -> None:  # type: ignore[no-untyped-def]
    role = f"nousage_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server.admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN REPLICATION").format(sql.Identifier(role)))
    try:
        results = by_name(run_checks(psycopg.conninfo.make_conninfo(dsn, user=role)))
        assert results["events_table"].ok and results["events_seq"].ok
        assert results["replication_privilege"].ok and results[PLUGIN_CHECK].ok
        assert results["select_privilege"].fix == (
            f"GRANT SELECT ON cdc.events TO {role}; GRANT USAGE ON SCHEMA cdc TO {role}")
    finally:
        with psycopg.connect(server.admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_pgoutput_checks_the_publication_instead_of_a_plugin(conn: psycopg.Connection, dsn: str) -> None:
    results = by_name(run_checks(dsn, plugin="pgoutput"))
    assert "wal2json" not in results and results["publication"].ok, results["publication"]
    assert "cdc_events publishes inserts and truncates of cdc.events" in results["publication"].detail
    conn.execute("DROP PUBLICATION cdc_events")
    missing = by_name(run_checks(dsn, plugin="pgoutput"))["publication"]
    assert not missing.ok and "publication 'cdc_events' does not exist" in missing.detail
    assert missing.fix is not None and "CREATE PUBLICATION" in missing.fix and "cdc setup" in missing.fix
    conn.execute("CREATE TABLE other (n int)")
    conn.execute("CREATE PUBLICATION cdc_events FOR TABLE cdc.events, other WITH (publish = 'insert')")
    partial = by_name(run_checks(dsn, plugin="pgoutput"))["publication"]
    assert not partial.ok and "does not publish truncates" in partial.detail
    conn.execute("ALTER PUBLICATION cdc_events SET (publish = 'insert, truncate')")
    wide = by_name(run_checks(dsn, plugin="pgoutput"))["publication"]
    assert not wide.ok and "also publishes 1 other tables (public.other)" in wide.detail


def test_a_slot_of_the_other_plugin_says_which_plugin_reads_it(conn: psycopg.Connection, dsn: str) -> None:
    conn.execute("SELECT pg_create_logical_replication_slot('cdc', 'pgoutput')")
    result = by_name(run_checks(dsn, plugin="wal2json"))["slot"]
    assert not result.ok and "plugin pgoutput, not wal2json" in result.detail
    assert result.fix is not None and result.fix.startswith("use --plugin pgoutput")
    assert by_name(run_checks(dsn, plugin="pgoutput"))["slot"].ok
