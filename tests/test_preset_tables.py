"""Presets find real tables (issue 15): the eventsourcing library names its table
`<application name>_events` and Marten puts `mt_events` in its own schema. One table with the
preset's columns is used; several are listed; `cdc check` names candidates for a wrong --table."""

from __future__ import annotations

import orjson
import psycopg
import pytest

from cdc import store

from .test_mistakes import cdc
from .test_presets import EVENTSOURCING_DDL, MARTEN_DDL


def _eventsourcing_table(conn: psycopg.Connection, qualified: str, rows: int = 3) -> None:
    schema, _, name = qualified.rpartition(".")
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    conn.execute(EVENTSOURCING_DDL.replace("public.stored_events", qualified)
                 .replace("stored_events_notification_id_idx", f"{name}_notification_id_idx"))
    for i in range(rows):
        conn.execute(f"INSERT INTO {qualified} (originator_id, originator_version, topic, state) "
                     "VALUES (gen_random_uuid(), 1, 'bank:Opened', %s)", (orjson.dumps({"n": i}),))


def _data(stdout: str) -> list[object]:
    return [orjson.loads(line)["data"] for line in stdout.splitlines()]


@pytest.mark.parametrize("qualified", ["public.bank_events", "accounts.bank_events"])
def test_the_one_eventsourcing_table_is_found_by_every_command(empty_dsn: str, qualified: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        store.setup(conn)
        _eventsourcing_table(conn, qualified)
    check = cdc("check", "--dsn", empty_dsn, "--preset", "eventsourcing")
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"OK   events_table: {qualified} has the expected columns" in check.stdout, check.stdout
    run = cdc("run", "--dsn", empty_dsn, "--preset", "eventsourcing", "--record-deliveries", "--endpos", "now")
    assert run.returncode == 0, run.stderr
    assert _data(run.stdout) == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert f"reading {qualified}" in run.stderr, run.stderr
    replay = cdc("replay", "--dsn", empty_dsn, "--preset", "eventsourcing", "--from-seq", "1")
    assert replay.returncode == 0 and _data(replay.stdout) == _data(run.stdout), replay.stderr
    reconcile = cdc("reconcile", "--dsn", empty_dsn, "--preset", "eventsourcing")
    assert reconcile.returncode == 0 and "AGREE" in reconcile.stdout, reconcile.stdout + reconcile.stderr
    # Not told again: replay and reconcile use the mapping the consumer ran with.
    replay = cdc("replay", "--dsn", empty_dsn, "--from-seq", "1")
    assert replay.returncode == 0 and _data(replay.stdout) == _data(run.stdout), replay.stderr
    assert f"reading {qualified} with the mapping consumer default ran with" in replay.stderr, replay.stderr
    reconcile = cdc("reconcile", "--dsn", empty_dsn)
    assert reconcile.returncode == 0 and "AGREE" in reconcile.stdout, reconcile.stdout + reconcile.stderr
    other = cdc("replay", "--dsn", empty_dsn, "--from-seq", "1", "--consumer", "nobody")
    assert other.returncode == 0 and other.stdout == "", "another consumer's mapping is not this one's"


def test_several_candidate_tables_are_listed_for_the_user_to_choose(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        store.setup(conn)
        _eventsourcing_table(conn, "public.bank_events")
        _eventsourcing_table(conn, "public.shop_events")
    for args in (["run", "--endpos", "now"], ["replay", "--from-seq", "1"], ["check"]):
        proc = cdc(*args[:1], "--dsn", empty_dsn, "--preset", "eventsourcing", *args[1:])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
        last = proc.stderr.strip().splitlines()[-1]
        assert "public.bank_events" in last and "public.shop_events" in last and "--table" in last, last
    chosen = cdc("run", "--dsn", empty_dsn, "--preset", "eventsourcing", "--table", "shop_events", "--endpos", "now")
    assert chosen.returncode == 0 and len(_data(chosen.stdout)) == 3, chosen.stderr


def test_stored_events_is_used_when_it_exists(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        store.setup(conn)
        _eventsourcing_table(conn, "public.stored_events", rows=2)
        _eventsourcing_table(conn, "public.bank_events", rows=5)
    run = cdc("run", "--dsn", empty_dsn, "--preset", "eventsourcing", "--endpos", "now")
    assert run.returncode == 0 and len(_data(run.stdout)) == 2, run.stderr


def test_marten_in_its_own_schema_is_found(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        store.setup(conn)
        conn.execute("CREATE SCHEMA billing")
        conn.execute(MARTEN_DDL.replace("public.", "billing."))
    check = cdc("check", "--dsn", empty_dsn, "--preset", "marten")
    assert "OK   events_table: billing.mt_events has the expected columns" in check.stdout, check.stdout


def test_a_wrong_table_meets_the_candidates_in_check_and_run(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        store.setup(conn)
        _eventsourcing_table(conn, "public.bank_events")
    check = cdc("check", "--dsn", empty_dsn, "--preset", "eventsourcing", "--table", "bank_event")
    assert check.returncode == 1
    line = next(line for line in check.stdout.splitlines() if "events_table" in line)
    assert "public.bank_event does not exist" in line and "public.bank_events" in line, check.stdout
    run = cdc("run", "--dsn", empty_dsn, "--preset", "eventsourcing", "--table", "bank_event", "--endpos", "now")
    assert run.returncode == 1 and "public.bank_events" in run.stderr.strip().splitlines()[-1], run.stderr
