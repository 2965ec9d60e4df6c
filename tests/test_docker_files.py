"""The files under docker/ say what they must, read without Docker (none runs here).

Tiny parsers below: a Dockerfile is instructions with line continuations; compose.yaml is kept
to the YAML subset `_parse_yaml` reads (block mappings, lists, JSON-style flow lists, plain or
quoted scalars), so no YAML library is needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import subprocess
import threading
import tomllib
from datetime import datetime, timezone
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


# -- parsers -------------------------------------------------------------------------------

def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name} ends inside a continuation"
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (k, _) in enumerate(instructions) if k == "FROM"]
    return instructions[starts[-1]:]


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith("[") or text.startswith("{"):
        return json.loads(text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _strip_comment(line: str) -> str:
    # A '#' starts a comment at the line start or after a space, outside quotes.
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i].rstrip()
    return line.rstrip()


def _parse_yaml(text: str) -> Any:
    assert "\t" not in text, "compose.yaml must indent with spaces"
    lines = [(len(s) - len(s.lstrip(" ")), s.strip())
             for s in (_strip_comment(raw) for raw in text.splitlines()) if s.strip()]

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- "):
            items: list[Any] = []
            while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
                items.append(_scalar(lines[i][1][2:]))
                i += 1
            return items, i
        mapping: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent:
            key, sep, rest = lines[i][1].partition(":")
            assert sep and not key.startswith("- "), f"unsupported YAML: {lines[i][1]!r}"
            key = _scalar(key)
            assert key not in mapping, f"duplicate key {key!r}"
            i += 1
            if rest.strip():
                mapping[key] = _scalar(rest)
            elif i < len(lines) and lines[i][0] > indent:
                mapping[key], i = block(i, lines[i][0])
            elif i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
                mapping[key], i = block(i, indent)  # a list at the key's own indent
            else:
                mapping[key] = None
        return mapping, i

    doc, end = block(0, lines[0][0])
    assert end == len(lines), f"unparsed YAML from line {lines[end][1]!r}"
    return doc


def test_the_yaml_subset_parser() -> None:
    doc = _parse_yaml('a: 1\nb:\n  c: "x # y"  # note\n  d:\n    - e\n    - "f"\n  g: ["h", "i"]\nj:\n')
    assert doc == {"a": "1", "b": {"c": "x # y", "d": ["e", "f"], "g": ["h", "i"]}, "j": None}


# -- postgres.Dockerfile ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres_image() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKER / "postgres.Dockerfile")


def test_postgres_image_pins_the_minor_and_installs_wal2json(postgres_image: list[tuple[str, str]]) -> None:
    [base] = [a for k, a in postgres_image if k == "FROM"]
    assert re.fullmatch(r"postgres:15\.\d+(-\w+)?", base), base
    runs = " ".join(a for k, a in postgres_image if k == "RUN")
    assert "apt-get install" in runs and "postgresql-15-wal2json" in runs


def test_postgres_image_starts_with_logical_decoding(postgres_image: list[tuple[str, str]]) -> None:
    [cmd] = [json.loads(a) for k, a in postgres_image if k == "CMD"]
    assert cmd[0] == "postgres"
    settings = {cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-c"}
    assert "wal_level=logical" in settings
    assert any(s.startswith("max_replication_slots=") for s in settings)
    assert any(s.startswith("max_wal_senders=") for s in settings)
    # Naming the allow-list on a server without it stops the server: never unconditionally.
    assert not any("output_plugin_libraries" in s for s in settings)


def test_postgres_image_copies_an_executable_entrypoint(postgres_image: list[tuple[str, str]]) -> None:
    for k, a in postgres_image:
        if k == "COPY":
            source = a.split()[0]
            assert (DOCKER / source).exists(), f"COPY {source}: missing from docker/"
    script = DOCKER / "postgres-entrypoint.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    [entrypoint] = [json.loads(a) for k, a in postgres_image if k == "ENTRYPOINT"]
    assert entrypoint == ["cdc-postgres-entrypoint.sh"]


@pytest.mark.parametrize(("version", "allow_list"), [
    ("15.18", False), ("15.19", True), ("16.14", False), ("16.15", True),
    ("17.11", True), ("18.5", False), ("18.6", True), ("19.0", True),
])
def test_entrypoint_names_wal2json_only_where_the_server_has_the_allow_list(
    tmp_path: Path, version: str, allow_list: bool
) -> None:
    (tmp_path / "postgres").write_text(f'#!/bin/sh\necho "postgres (PostgreSQL) {version} (Debian {version}-1.pgdg120+1)"\n')
    (tmp_path / "docker-entrypoint.sh").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    for f in tmp_path.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(["sh", str(DOCKER / "postgres-entrypoint.sh"), "postgres", "-c", "wal_level=logical"],
                         capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    assert out[:3] == ["postgres", "-c", "wal_level=logical"]
    assert ("output_plugin_libraries=pgoutput,test_decoding,wal2json" in out) is allow_list
    # Anything but the server (a shell, psql) passes through untouched.
    out = subprocess.run(["sh", str(DOCKER / "postgres-entrypoint.sh"), "bash", "-c", "true"],
                         capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    assert out == ["bash", "-c", "true"]


def test_the_pinned_minor_predates_the_allow_list(postgres_image: list[tuple[str, str]]) -> None:
    [base] = [a for k, a in postgres_image if k == "FROM"]
    pinned = re.search(r":(\d+\.\d+)", base)
    assert pinned and pinned.group(1) == "15.18", "bumped the pin? check the entrypoint's allow-list rule"


# -- Dockerfile (the sidecar) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def sidecar() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKER / "Dockerfile")


def test_sidecar_bases_are_pinned_python_311_slim(sidecar: list[tuple[str, str]]) -> None:
    bases = [a.split()[0] for k, a in sidecar if k == "FROM"]
    assert bases
    for b in bases:
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", b), b


def test_sidecar_runs_as_a_non_root_user(sidecar: list[tuple[str, str]]) -> None:
    users = [a for k, a in final_stage(sidecar) if k == "USER"]
    assert users, "the final stage must switch USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_sidecar_entrypoint_command_port_and_healthcheck(sidecar: list[tuple[str, str]]) -> None:
    stage = dict(final_stage(sidecar))
    assert json.loads(stage["ENTRYPOINT"]) == ["cdc"]
    assert json.loads(stage["CMD"]) == ["run"]
    assert stage["EXPOSE"].split() == ["9187"]
    health = stage["HEALTHCHECK"]
    assert "http://127.0.0.1:9187/healthz" in health and "urllib" in health
    cmd = json.loads(health[health.index("CMD") + 3:].strip())
    assert cmd[:2] == ["python", "-c"]
    compile(cmd[2], "<healthcheck>", "exec")
    # The endpoint the healthcheck calls must be served without flags.
    env = stage["ENV"]
    assert "CDC_HTTP_PORT=9187" in env and "CDC_HTTP_HOST=0.0.0.0" in env


def test_sidecar_copies_from_the_repository_root(sidecar: list[tuple[str, str]]) -> None:
    for k, a in sidecar:
        if k == "COPY" and not a.startswith("--from"):
            for source in a.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository root"


def test_the_cdc_command_exists() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "cdc" in project["project"]["scripts"]


# -- compose.yaml --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = _parse_yaml((DOCKER / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def test_compose_has_postgres_sidecar_and_receiver(compose: dict[str, Any]) -> None:
    assert {"postgres", "cdc", "receiver"} <= set(compose["services"])


def test_compose_builds_resolve_to_files(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build}"
    assert compose["services"]["postgres"]["build"]["dockerfile"] == "postgres.Dockerfile"
    cdc = compose["services"]["cdc"]["build"]
    assert (DOCKER / cdc["context"]).resolve() == ROOT and cdc["dockerfile"] == "docker/Dockerfile"


def test_compose_postgres_is_healthchecked_and_awaited(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert services["cdc"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_sidecar_streams_to_the_receiver_and_serves_http(compose: dict[str, Any]) -> None:
    cmd = compose["services"]["cdc"]["command"]
    assert cmd[0] == "run"
    flags = dict(zip(cmd[1::2], cmd[2::2]))
    assert flags["--sink"] == "webhook:http://receiver:8080/events"
    assert flags["--http-host"] == "0.0.0.0" and flags["--http-port"] == "9187"
    assert "@postgres:5432/" in flags["--dsn"]
    assert compose["services"]["receiver"]["environment"]["PORT"] == "8080"
    assert "9187:9187" in compose["services"]["cdc"]["ports"]


def test_compose_receiver_mounts_a_script_that_exists(compose: dict[str, Any]) -> None:
    receiver = compose["services"]["receiver"]
    [mount] = receiver["volumes"]
    source, target = mount.split(":")[:2]
    assert (DOCKER / source).is_file()
    assert receiver["command"] == ["python", target]


def test_receiver_accepts_a_signed_delivery_and_drops_repeats(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cdc.errors import SinkError
    from cdc.events import Event, Lsn, Transaction
    from cdc.webhook import WebhookSink

    spec = importlib.util.spec_from_file_location("cdc_demo_receiver", DOCKER / "receiver.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SECRET", b"change-me")
    server = ThreadingHTTPServer(("127.0.0.1", 0), module.Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/events"
        tx = Transaction(7, Lsn.parse("0/10"), None, None,
                         [Event(1, "o-1", 1, "Placed", "{}", "{}", datetime(2024, 1, 1, tzinfo=timezone.utc))], "stream")
        WebhookSink(url, secret="change-me").write(tx)
        WebhookSink(url, secret="change-me").write(tx)
        out = capsys.readouterr().out
        assert '"stream_id":"o-1"' in out and "repeat 0/10" in out
        with pytest.raises(SinkError, match="401"):
            WebhookSink(url, secret="wrong").write(tx)
    finally:
        server.shutdown()
        server.server_close()


def test_compose_fanout_profile_runs_cdc_into_jetstream_and_three_partition_readers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    fanout = {n for n, s in services.items() if s.get("profiles") == ["fanout"]}
    assert fanout == {"nats", "cdc-fanout", "projection-0", "projection-1", "projection-2"}
    run = services["cdc-fanout"]["command"]
    assert run[run.index("--sink") + 1] == "nats://nats:4222" and run[run.index("--nats-partitions") + 1] == "3"
    for k in range(3):
        reader = services[f"projection-{k}"]
        assert reader["entrypoint"] == ["python", "-m", "cdc.fanout", "reader"]
        args = reader["command"]
        assert args[1] == "nats://nats:4222" and args[args.index("--partition") + 1] == str(k)
    from cdc.cli import build_parser

    build_parser().parse_args(run)  # the flags exist
