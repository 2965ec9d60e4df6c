"""scripts/bench --quick runs end to end and writes its results. Nothing here is about speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_writes_results_json_markdown_and_plot(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("stream_vs_recvlogical_1", "stream_vs_recvlogical_100", "replay_vs_copy", "latency_ms",
                "peak_rss_mb", "reconcile_s", "machine"):
        assert key in results, key
    assert set(results["latency_ms"]) >= {"stream_500", "stream_2000", "poll_500", "poll_2000"}
    assert {"p50", "p95", "p99", "max"} <= set(results["latency_ms"]["stream_500"])
    assert {"cpu", "cores", "postgresql"} <= set(results["machine"])
    assert (tmp_path / "results.md").read_text().startswith("| measure")
    assert (tmp_path / "latency.png").stat().st_size > 0
