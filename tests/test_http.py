"""The sidecar's HTTP face: liveness follows the run loop, readiness the feed, /metrics Prometheus."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdc.embedded import wait_for
from cdc.http import HttpServer, SlotMonitor, serve
from cdc.metrics import REGISTRY, Status


def get(server: HttpServer, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def status() -> Status:
    s = Status()
    s.connected = True
    s.slot_valid = True
    return s


@pytest.fixture
def http(status: Status) -> Iterator[HttpServer]:
    with serve("127.0.0.1", 0, status=status, ready_max_lag_seconds=10.0, ready_max_lag_bytes=1000,
               tick_timeout=5.0) as server:
        yield server


def test_binds_an_ephemeral_port_on_localhost(http: HttpServer) -> None:
    assert http.port > 0 and http.host == "127.0.0.1"


def test_healthz_is_ok_while_the_loop_ticks(http: HttpServer, status: Status) -> None:
    status.tick()
    assert get(http, "/healthz") == (200, "ok\n")


def test_healthz_is_503_when_the_last_tick_is_too_old(http: HttpServer, status: Status) -> None:
    status.last_tick = time.monotonic() - 60
    code, body = get(http, "/healthz")
    assert code == 503 and "not ticked" in body


def test_readyz_is_ok_when_connected_with_a_valid_slot_and_low_lag(http: HttpServer, status: Status) -> None:
    status.lag_bytes, status.lag_seconds = 10, 0.5
    assert get(http, "/readyz")[0] == 200


def test_readyz_is_ok_in_poll_mode_without_a_slot(http: HttpServer, status: Status) -> None:
    status.slot_valid = None
    assert get(http, "/readyz")[0] == 200


def test_readyz_is_503_when_lag_is_over_a_threshold(http: HttpServer, status: Status) -> None:
    status.lag_bytes = 5000
    code, body = get(http, "/readyz")
    assert code == 503 and body == "lag 5000 bytes is over 1000 bytes\n"
    status.lag_bytes, status.lag_seconds = 0, 30.0
    code, body = get(http, "/readyz")
    assert code == 503 and "lag 30.0 s" in body


@pytest.mark.parametrize(("change", "reason"), [
    ({"connected": False}, "not connected"),
    ({"slot_valid": False}, "slot is missing or lost"),
    ({"standby": True}, "standby"),
    ({"catching_up": "hand-off replay", "backlog_events": 12_345}, "catching up: hand-off replay, 12,345 events to go"),
    ({"catching_up": "stream catch-up", "backlog_bytes": 4096}, "catching up: stream catch-up, 4,096 bytes of WAL"),
    ({"catching_up": "poll catch-up"}, "catching up: poll catch-up, under way"),
])
def test_readyz_is_503_with_a_one_line_reason(http: HttpServer, status: Status, change: dict[str, object], reason: str) -> None:
    for k, v in change.items():
        setattr(status, k, v)
    code, body = get(http, "/readyz")
    assert code == 503 and reason in body and body.count("\n") == 1


def test_a_standby_is_alive_but_not_ready(http: HttpServer, status: Status) -> None:
    status.standby = True
    status.tick()
    assert get(http, "/healthz")[0] == 200
    assert get(http, "/readyz")[0] == 503


def test_metrics_are_prometheus_text_with_cdc_names(http: HttpServer) -> None:
    code, body = get(http, "/metrics")
    assert code == 200
    names = {f.name for f in text_string_to_metric_families(body)}
    assert {"cdc_events", "cdc_lag_bytes", "cdc_slot_retained_wal_bytes", "cdc_slot_wal_status"} <= names


def test_unknown_path_is_404(http: HttpServer) -> None:
    assert get(http, "/nope")[0] == 404


def test_a_taken_port_is_a_clear_error(http: HttpServer) -> None:
    from cdc.errors import ConfigError

    with pytest.raises(ConfigError, match="--http-port"):
        serve("127.0.0.1", http.port)


def test_slot_monitor_reports_lag_of_a_real_slot(conn: psycopg.Connection, dsn: str) -> None:
    conn.execute("SELECT pg_create_logical_replication_slot('s', 'wal2json')")
    conn.execute("CREATE TABLE filler AS SELECT generate_series(1, 1000) AS n")
    status = Status()
    monitor = SlotMonitor(dsn, "s", status=status, interval=0.1)
    monitor.start()
    try:
        assert wait_for(lambda: (status.lag_bytes or 0) > 0, timeout=10)
        assert status.slot_valid is True
        assert (REGISTRY.get_sample_value("cdc_lag_bytes") or 0) > 0
        assert (REGISTRY.get_sample_value("cdc_slot_retained_wal_bytes") or 0) >= status.lag_bytes  # type: ignore[operator]
        assert REGISTRY.get_sample_value("cdc_slot_wal_status", {"status": "reserved"}) == 1
        assert REGISTRY.get_sample_value("cdc_slot_wal_status", {"status": "lost"}) == 0
    finally:
        monitor.stop()
    # Its own ordinary connection, closed on stop: nothing of it is left on the server.
    assert wait_for(lambda: conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'cdc-slot-monitor' "
        "AND datname = current_database()").fetchone() == (0,), timeout=5)


def test_slot_monitor_marks_a_missing_slot_invalid(dsn: str) -> None:
    status = Status()
    status.slot_valid = True
    monitor = SlotMonitor(dsn, "nosuchslot", status=status)
    try:
        assert monitor.poll_once() is None
    finally:
        monitor.stop()
    assert status.slot_valid is False


def test_slot_monitor_survives_an_unreachable_server() -> None:
    monitor = SlotMonitor("host=127.0.0.1 port=1 connect_timeout=1", "s", status=Status(), interval=0.05)
    monitor.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    monitor.stop()
    assert time.monotonic() - t0 < 3


def test_a_missing_slot_does_not_unready_the_poller(http: HttpServer, status: Status) -> None:
    status.slot_valid = False
    status.path = "poll"
    assert get(http, "/readyz")[0] == 200
