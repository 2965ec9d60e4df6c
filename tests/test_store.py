import psycopg
import pytest

from cdc import store
from cdc.errors import ConcurrencyError


def test_setup_is_idempotent(conn):
    store.setup(conn)
    store.setup(conn)
    assert conn.execute("SELECT to_regclass('cdc.events')").fetchone()[0] is not None


def test_plain_insert_from_any_client_works(conn):
    conn.execute("INSERT INTO cdc.events(stream_id, version, type, data) VALUES ('s', 1, 'T', '{\"a\": 1}')")
    row = conn.execute("SELECT seq, metadata, created_at IS NOT NULL, xid IS NOT NULL FROM cdc.events").fetchone()
    assert row == (1, {}, True, True)


def test_append_assigns_versions_and_returns_seqs(conn):
    seqs = store.append(conn, "s1", [store.NewEvent("A", {"n": 1}), store.NewEvent("B", {"n": 2})], expected_version=0)
    assert seqs == [1, 2]
    store.append(conn, "s1", [store.NewEvent("C")], expected_version=2)
    rows = conn.execute("SELECT version, type FROM cdc.events WHERE stream_id='s1' ORDER BY version").fetchall()
    assert rows == [(1, "A"), (2, "B"), (3, "C")]


def test_conflicting_append_raises_and_writes_nothing(conn):
    store.append(conn, "s1", [store.NewEvent("A")], expected_version=0)
    with pytest.raises(ConcurrencyError) as info:
        store.append(conn, "s1", [store.NewEvent("B"), store.NewEvent("C")], expected_version=0)
    assert info.value.actual == 1
    assert conn.execute("SELECT count(*) FROM cdc.events").fetchone()[0] == 1


def test_racing_appends_one_wins(dsn):
    # Both read version 0, both insert version 1: the unique constraint decides, nothing half-written.
    with psycopg.connect(dsn) as a, psycopg.connect(dsn) as b:
        a.execute("BEGIN")
        a.execute("INSERT INTO cdc.events(stream_id, version, type, data) VALUES ('s', 1, 'A', '{}')")
        import threading

        errors = []

        def other():
            try:
                store.append(b, "s", [store.NewEvent("B"), store.NewEvent("C")], expected_version=0)
            except ConcurrencyError as e:
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        import time

        time.sleep(0.3)
        a.commit()
        t.join(10)
        assert len(errors) == 1
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT count(*) FROM cdc.events").fetchone()[0] == 1


def test_sequence_has_cache_1(conn):
    # A cached sequence would let a session hold numbers across transactions: holes unprovable.
    assert conn.execute("SELECT cache_size FROM pg_sequences WHERE sequencename='events_seq'").fetchone()[0] == 1
