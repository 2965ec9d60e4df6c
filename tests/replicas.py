"""A physical standby of an embedded cluster, for the failover tests: `pg_basebackup -R` from
the primary, streaming replication, promotion."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import psycopg

from cdc.embedded import Cluster, _free_port, _run_as, _server_user, append_conf, cluster_dirs, wait_for


@contextmanager
def standby_of(primary: Cluster, *, settings: Mapping[str, str] | None = None,
               slot: str | None = None) -> Iterator[Cluster]:
    """Start a hot standby streaming from `primary` (through physical slot `slot`, made here,
    if given); stop it and remove its files at the end."""
    user, root, data, sock, log = cluster_dirs("cdc-standby-")
    bin_dir = primary.bin_dir
    started = False
    try:
        cmd = [f"{bin_dir}/pg_basebackup", "-D", data, "-R", "-X", "stream", "-c", "fast", "-d", primary.dsn]
        if slot:
            cmd += ["-S", slot, "-C"]
        r = _run_as(user, cmd)
        assert r.returncode == 0, f"pg_basebackup failed: {r.stderr}"
        port = _free_port()
        conf = {"port": str(port), "unix_socket_directories": f"'{sock}'", "hot_standby": "on",
                **dict(settings or {})}
        append_conf(data, conf, "cdc standby")
        r = _run_as(user, [f"{bin_dir}/pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start"])
        started = True
        assert r.returncode == 0, f"standby did not start: {Path(log).read_text()[-2000:]}"
        standby = replace(primary, dsn=f"host={sock} port={port} user=postgres dbname=postgres",
                          tcp_dsn=f"host=127.0.0.1 port={port} user=postgres dbname=postgres", port=port,
                          socket_dir=sock, data_dir=data, log_file=log)
        with psycopg.connect(primary.dsn, autocommit=True) as conn:
            assert wait_for(lambda: conn.execute("SELECT count(*) FROM pg_stat_replication "
                                                 "WHERE state = 'streaming'").fetchone()[0] > 0, timeout=30)
        yield standby
    finally:
        if started:
            _run_as(user, [f"{bin_dir}/pg_ctl", "-D", data, "stop", "-m", "immediate", "-w", "-t", "30"])
        shutil.rmtree(root, ignore_errors=True)


def crash(cluster: Cluster) -> None:
    """The primary dies (pg_ctl stop -m immediate: no shutdown checkpoint, no last WAL sent)."""
    r = _run_as(_server_user(), [f"{cluster.bin_dir}/pg_ctl", "-D", cluster.data_dir, "stop", "-m", "immediate", "-w"])
    assert r.returncode == 0, r.stderr


def promote(cluster: Cluster) -> None:
    r = _run_as(_server_user(), [f"{cluster.bin_dir}/pg_ctl", "-D", cluster.data_dir, "promote", "-w", "-t", "60"])
    assert r.returncode == 0, r.stderr


def multi_host_dsn(*clusters: Cluster, dbname: str = "postgres") -> str:
    """One DSN naming every node; libpq connects to the one that takes writes."""
    return (f"host={','.join(c.socket_dir for c in clusters)} port={','.join(str(c.port) for c in clusters)} "
            f"user=postgres dbname={dbname} target_session_attrs=read-write")
