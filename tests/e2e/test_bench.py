"""`llmesh bench --quick` end to end: in-process vLLM, the mesh (vllm and transformers) and
vLLM's OpenAI server really start, serve the same load, and the report holds every number."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from llmesh.bench import CPU_ROLES, MODES

NUMBERS = (
    "output_tok_s",
    "requests_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "itl_p50_ms",
    "itl_p99_ms",
)


def _left_behind(*marks: str) -> list[str]:
    """Command lines of live processes that contain every one of ``marks``."""
    left = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdline = path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(m in cmdline for m in marks) and "pytest" not in cmdline:
            left.append(cmdline)
    return left


def test_quick_bench_measures_every_mode(spawn: Any, test_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    concurrency = ["1", "2"]
    bench = spawn(
        *("bench", "--quick", "--model", str(test_model_dir), "--out", str(out)),
        *("--concurrency", *concurrency, "--num-requests", "3"),
        *("--input-len", "16", "--output-len", "8", "--warmup", "1"),
        # A small KV cache: CI machines share their memory with other tests.
        *("--gpu-memory-utilization", "0.1"),
        name="bench",
    )
    try:
        code = bench.proc.wait(timeout=280)
    except subprocess.TimeoutExpired:
        pytest.fail(f"llmesh bench did not finish within 280 s:\n{bench.output()[-4000:]}")
    log = bench.output()
    assert code == 0, log[-4000:]

    report = json.loads((out / "serving.json").read_text())
    assert set(report["modes"]) == set(MODES)
    for mode, data in report["modes"].items():
        assert data.get("error") is None, (mode, data)
        assert data["startup_s"] > 0
        assert sorted(data["levels"]) == concurrency, mode
        for level in data["levels"].values():
            assert (level["requests"], level["completed"], level["failed"]) == (3, 3, 0), mode
            # ignore_eos: every request gave exactly --output-len tokens on a 16 + BOS prompt.
            assert level["output_tokens"] == 3 * 8 and level["input_tokens"] == 3 * 17, mode
            for key in NUMBERS:
                assert isinstance(level[key], float) and level[key] > 0, (mode, key, level)
            assert level["cpu_s"]["bench"] > 0, mode  # the load generator's own CPU time
    # CPU is attributed to the processes that spent it (children in clock ticks, so summed
    # over the run: a quick level is only tens of milliseconds).
    spent = {
        mode: {r: sum(lv["cpu_s"][r] for lv in data["levels"].values()) for r in CPU_ROLES}
        for mode, data in report["modes"].items()
    }
    assert spent["mesh-transformers"]["engine"] == 0, spent  # no vLLM processes there
    assert sum(spent[m]["engine"] for m in ("asyncllm", "mesh-vllm", "vllm-serve")) > 0, spent
    assert sum(spent[m]["server"] for m in ("mesh-vllm", "vllm-serve", "mesh-transformers")) > 0
    checks = report["targets"]
    # mesh vs AsyncLLM (tok/s, TTFT p50, p99 per level), mesh vs vllm serve at 32 streams
    # (or the highest level run), gateway vs vllm serve (tok/s per level, TTFT p50 at 1).
    assert len(checks) == 3 * len(concurrency) + 1 + len(concurrency) + 1
    assert sum(c["check"].startswith("gateway") for c in checks) == len(concurrency) + 1
    assert all(isinstance(c["value"], float) and isinstance(c["met"], bool) for c in checks)
    assert report["meta"]["prompt_tokens_exact"] == report["meta"]["prompt_tokens_total"] == 6

    table = (out / "serving.md").read_text()
    for label in MODES.values():
        for c in concurrency:
            assert f"| {c} | {label} | " in table
    assert "mesh / vllm serve output tok/s" in table
    assert "mesh / AsyncLLM output tok/s at 2 streams:" in log  # the verdicts are printed

    png = (out / "serving.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    # Everything it started is gone: the OpenAI server, the mesh's worker, control plane and
    # etcd (whose data dir is under the logs).
    logs = Path(report["meta"]["logs"])
    assert {p.name for p in logs.iterdir()} >= {
        "vllm-serve.log",
        "inference-worker.log",
        "control-plane.log",
    }
    assert not _left_behind("vllm.entrypoints.openai.api_server", str(test_model_dir))
    assert not _left_behind("inference-worker", f"bench-{bench.proc.pid}")
    assert not _left_behind(str(logs))
    assert sorted(p.name for p in out.iterdir()) == ["serving.json", "serving.md", "serving.png"]
    shutil.rmtree(logs)
