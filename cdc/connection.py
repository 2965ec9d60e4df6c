"""How we reach the server: the DSN (flag, CDC_DSN or libpq's PG* variables), pools, and errors
turned into one line that says what to fix. Secrets never leave this module unmasked."""

from __future__ import annotations

import getpass
import os
import re

import psycopg
from psycopg_pool import ConnectionPool

from .errors import ConfigError, ConnectError, ReplicationPrivilegeError

_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_PASSWORD_URL = re.compile(r"(://[^:/@\s]+:)([^@\s]+)(@)")


def resolve_dsn(dsn: str | None) -> str:
    """The DSN to use: the argument, else CDC_DSN, else "" so libpq reads PGHOST, PGPORT, ...

    Raises ConfigError when nothing at all says where the server is.
    """
    if dsn:
        return dsn
    env = os.environ.get("CDC_DSN")
    if env:
        return env
    if any(k in os.environ for k in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")):
        return ""
    raise ConfigError("no database given: pass --dsn, or set CDC_DSN or the PGHOST/PGPORT/... variables")


def mask(text: str) -> str:
    """`text` with any password in a DSN replaced by ***."""
    return _PASSWORD_URL.sub(r"\1***\3", _PASSWORD_KV.sub(r"\1***", text))


def describe(dsn: str) -> str:
    """host:port/dbname of a DSN, for log lines."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "?"
    host = str(info.get("host") or os.environ.get("PGHOST") or "localhost")
    port = info.get("port") or os.environ.get("PGPORT") or "5432"
    db = info.get("dbname") or os.environ.get("PGDATABASE") or info.get("user") or "postgres"
    return f"{host}:{port}/{db}"


def conninfo_user(dsn: str) -> str:
    """The role a DSN logs in as (libpq's default: PGUSER, else the OS user)."""
    try:
        user = psycopg.conninfo.conninfo_to_dict(dsn).get("user")
    except psycopg.ProgrammingError:
        user = None
    return str(user or os.environ.get("PGUSER") or getpass.getuser())


def connect_error(err: Exception, dsn: str) -> Exception:
    """The user-facing error for a failed connection attempt."""
    # libpq's message spans lines ("connection to server ... failed: Connection refused",
    # "\tIs the server running ..."): keep all of it, on one line.
    text = " ".join(part.strip() for part in str(err).strip().splitlines() if part.strip()) or type(err).__name__
    # Up to 15: "must be superuser or replication role to start walsender"; 16+: "permission
    # denied to start WAL sender ... Only roles with the REPLICATION attribute may start a WAL
    # sender process."
    if ("replication role" in text or "must be superuser or replication" in text
            or "start WAL sender" in text or "REPLICATION attribute" in text):
        role = conninfo_user(dsn)
        return ReplicationPrivilegeError(
            f"the role {role} may not stream changes: ALTER ROLE {role} REPLICATION as a superuser (managed "
            "services: their replication role, e.g. GRANT rds_replication), or use --mode poll"
        )
    if isinstance(err, psycopg.ProgrammingError):
        return ConfigError(f"invalid DSN: {mask(text)} (expected e.g. 'host=db user=app dbname=app' or postgresql://...)")
    return ConnectError(f"cannot connect to {describe(dsn)}: {mask(text)} (check --dsn / CDC_DSN and that the server runs)")


# What a server answers at connect while it starts, stops or restarts (SQLSTATE 57P03).
_NOT_NOW = ("the database system is starting up", "the database system is shutting down",
            "the database system is in recovery mode", "the database system is not yet accepting connections",
            "the database system is not accepting connections")


# What a client sees while no server listens (between a restart's stop and start).
_GONE = ("Connection refused", "No such file or directory")


def server_not_ready(err: BaseException, *, restarting: bool = False) -> bool:
    """The server is starting, stopping or restarting: worth waiting for, unlike a wrong DSN or
    an unreachable host, which should fail at once. `restarting`: it said so before, so no one
    listening for a moment is the gap between its stop and its start."""
    text = str(err)
    return any(t in text for t in _NOT_NOW) or (restarting and any(t in text for t in _GONE))


def connect(dsn: str, **kwargs: object) -> psycopg.Connection:
    """A plain connection, or ConnectError with one clear line."""
    try:
        return psycopg.connect(dsn, connect_timeout=int(os.environ.get("CDC_CONNECT_TIMEOUT", "10")), **kwargs)  # type: ignore[arg-type]
    except (psycopg.OperationalError, psycopg.ProgrammingError) as err:
        raise connect_error(err, dsn) from None


def open_pool(dsn: str, *, max_size: int = 4, name: str = "cdc", timeout: float = 30.0) -> ConnectionPool:
    """The pool for ordinary work (setup, appends, polling, checkpoints, the reconciler).

    Opened eagerly with one connection so a wrong DSN fails here, with its clear message.
    """
    conn = connect(dsn)  # fail fast, clearly
    conn.close()
    pool = ConnectionPool(
        dsn,
        min_size=1,
        max_size=max_size,
        name=name,
        kwargs={"autocommit": True},
        open=False,
        timeout=timeout,
        # A server restart leaves dead connections in the pool: test each on checkout (one
        # round trip, and we check out about once a second).
        check=ConnectionPool.check_connection,
    )
    pool.open(wait=True, timeout=30)
    return pool
