"""The soak (issue #8): mixed writers for CDC_SOAK_MINUTES (default 30) with random faults, then
a full check against cdc.events. Run with scripts/soak; excluded from scripts/test.

Two `cdc run` consumers, each on its own slot: a jsonl sink (at-least-once: duplicates only as
whole transactions replayed after a crash) and an exactly-once projection (python sink).
A supervisor restarts a consumer that died. Faults, one every few seconds, at random: kill -9 of
a consumer, pg_terminate_backend of its walsender, the slot dropped under it, the server
restarted fast or immediate.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from cdc.embedded import restart

from .faults import (
    Writers,
    cdc_run,
    check_delivery,
    check_projection,
    drain,
    drop_slot_while_running,
    read_jsonl,
    tail,
    terminate_walsender,
    wait_slot_free,
)

pytestmark = pytest.mark.soak

MINUTES = float(os.environ.get("CDC_SOAK_MINUTES", "30"))
FAULTS = ["kill_9", "terminate_walsender", "drop_slot", "restart_fast", "restart_immediate"]


def test_soak_random_faults_lose_nothing(dsn, conn, server, tmp_path):
    conn.execute("CREATE TABLE fault_projection (seq bigint NOT NULL, xid bigint)")
    out, log = tmp_path / "events.jsonl", tmp_path / "run.log"
    common = ["--mode", "stream", "--checkpoint-interval", "0.2", "--chunk-events", "100", "--heartbeat-interval", "1"]
    consumers = {
        "sj": [*common, "--slot", "sj", "--consumer", "sj", "--sink", f"jsonl:{out}"],
        "sp": [*common, "--slot", "sp", "--consumer", "sp", "--sink", "python:tests.fault_projection:project"],
    }
    faults = FAULTS if server.cluster is not None else FAULTS[:3]
    rng = random.Random(int(os.environ.get("CDC_SOAK_SEED", "9")))
    procs = {}
    injected: dict[str, int] = {f: 0 for f in faults}
    restarts = 0

    def supervise() -> None:
        nonlocal restarts
        for slot, args in consumers.items():
            p = procs.get(slot)
            if p is None or p.poll() is not None:
                if p is not None:
                    restarts += 1
                    # Only kill -9 may end a consumer: anything else is a failure to investigate.
                    assert p.returncode == -signal.SIGKILL, f"{slot} exited {p.returncode}: {tail(log)}"
                wait_slot_free(dsn, slot, timeout=30)
                procs[slot] = cdc_run(dsn, *args, log=log)

    until = time.monotonic() + MINUTES * 60
    with Writers(dsn, writers=4, max_events=20, big=0.02, big_events=1000, rollback=0.2, hold=0.02,
                 hold_seconds=(1, 4), pause=0.02, seed=9) as writers:
        supervise()
        while time.monotonic() < until:
            time.sleep(rng.uniform(1, 5))
            supervise()
            fault = rng.choice(faults)
            slot = rng.choice(list(consumers))
            injected[fault] += 1
            if fault == "kill_9":
                procs[slot].send_signal(signal.SIGKILL)
                procs[slot].wait()
            elif fault == "terminate_walsender":
                terminate_walsender(dsn, slot)
            elif fault == "drop_slot":
                drop_slot_while_running(dsn, slot, timeout=30)
            else:
                restart(server.cluster, fault.removeprefix("restart_"))
        time.sleep(2)
        supervise()
    for p in procs.values():
        p.send_signal(signal.SIGTERM)
    for slot, p in procs.items():
        assert p.wait(60) == 0, f"{slot}: {tail(log)}"
    for args in consumers.values():
        drain(dsn, *args, log=log, timeout=600)
    stats = check_delivery(dsn, read_jsonl(out))
    check_projection(dsn)
    print(f"soak {MINUTES} min: faults {injected}, consumer restarts {restarts}, delivery {stats}, "
          f"writers {writers.stats}")
