"""`benchmarks/routing.py --quick` end to end: a real etcd and control plane start, the bulk
write is seen, and the report holds every number (no timing is asserted: it is a benchmark)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LATENCIES = ("p50_us", "p99_us", "p999_us", "max_us")


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_quick_routing_bench_reports_every_number(tmp_path: Path) -> None:
    out = tmp_path / "results"
    try:
        run = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "routing.py"), "--quick", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"routing.py --quick did not finish within 120 s:\n{exc.stdout}")
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    report = json.loads((out / "routing.json").read_text())
    scale = report["scale"]
    assert (scale["workers"], scale["models"], scale["watchers"]) == (20, 100, 20)
    assert report["meta"]["keys_written"] > scale["models"] + scale["workers"]
    assert "vCPUs" in report["meta"]["machine"]
    # A second control plane started on the written namespace came up and answered for all of it.
    assert _positive(report["meta"]["control_plane_cold_start_s"])
    results = report["results"]
    assign = results["assign"]
    assert assign["n"] == scale["assign_calls"]
    for stats in (
        assign,
        assign["health_check"],
        results["in_process"]["handler"],
        results["in_process"]["select"],
        results["pick"],
    ):
        for key in LATENCIES:
            assert _positive(stats[key]), (key, stats)
    assert results["pick"]["models_cached"] == scale["sdk_models"]
    fanout = results["fanout"]
    # Every watcher saw every change.
    assert fanout["n"] == scale["watchers"] * scale["fanout_rounds"]
    for key in ("p50_ms", "p99_ms", "max_ms"):
        assert _positive(fanout[key]), (key, fanout)
    checks = report["targets"]
    assert [c["check"] for c in checks] == ["AssignWorker RPC round trip", "SDK RouteCache.pick"]
    assert all(isinstance(c["met"], bool) for c in checks)

    table = (out / "routing.md").read_text()
    assert "| AssignWorker RPC, round trip (a) | 300 |" in table
    assert "WatchModel fan-out to 20 watchers" in table
    assert "SDK RouteCache.pick: p99" in run.stdout  # the verdicts are printed
    assert sorted(p.name for p in out.iterdir()) == ["routing.json", "routing.md"]
