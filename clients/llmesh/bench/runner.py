"""Running the benchmark: the same prompts for every mode, each mode started, warmed up, measured
level by level and stopped in turn (never two engines at once), then the report."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmesh.bench.backends import (
    AsyncLLMBackend,
    Backend,
    GatewayBackend,
    MeshBackend,
    MeshCluster,
    VLLMServeBackend,
)
from llmesh.bench.cpu import cpu_snapshot, cpu_usage
from llmesh.bench.load_generator import Prompt, run_level, summarize, synthetic_prompts
from llmesh.bench.report import evaluate_targets, fmt, report_meta, say, write_report
from llmesh.bench.settings import MODES, BenchSettings
from llmesh.common.errors import LLMeshError, Unavailable

#: Run order: the mesh modes and the gateway share one local mesh, so they run back to back.
_RUN_ORDER = ("asyncllm", "mesh-vllm", "gateway", "mesh-transformers", "vllm-serve")


def _prompt_sets(settings: BenchSettings) -> tuple[list[Prompt], dict[int, list[Prompt]]]:
    """The warm-up prompts and each level's prompts, the same for every mode."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(settings.model))
    warmup = synthetic_prompts(tokenizer, settings.warmup, settings.input_len, settings.seed)
    levels = {
        c: synthetic_prompts(
            tokenizer, settings.requests_for(c), settings.input_len, settings.seed + 1000 * (i + 1)
        )
        for i, c in enumerate(settings.concurrency)
    }
    return warmup, levels


async def _bench_mode(
    backend: Backend,
    settings: BenchSettings,
    warmup: Sequence[Prompt],
    levels: Mapping[int, Sequence[Prompt]],
) -> dict[str, Any]:
    """Start ``backend``, warm it up, run every level, stop it."""
    report: dict[str, Any] = {"levels": {}}
    t0 = time.perf_counter()
    try:
        await _measure(backend, settings, warmup, levels, report, t0)
    except BaseException:
        # Keep the error that stopped the mode, not one from tearing it down.
        with contextlib.suppress(Exception):
            await backend.stop()
        raise
    await backend.stop()
    return report


async def _measure(
    backend: Backend,
    settings: BenchSettings,
    warmup: Sequence[Prompt],
    levels: Mapping[int, Sequence[Prompt]],
    report: dict[str, Any],
    t0: float,
) -> None:
    """Start ``backend``, warm it up and run every level into ``report``."""
    await backend.start()
    report["startup_s"] = time.perf_counter() - t0
    say(f"{backend.mode}: up in {report['startup_s']:.1f} s")
    if warmup:
        results, _ = await run_level(
            backend.request,
            warmup,
            concurrency=min(len(warmup), max(settings.concurrency)),
            request_rate=math.inf,
            seed=settings.seed,
            tag=f"{backend.mode}-warmup",
        )
        failed = [r.error for r in results if not r.ok]
        if failed:
            raise Unavailable(f"warm-up requests failed: {failed[0]}")
    for concurrency, prompts in levels.items():
        cpu_before = cpu_snapshot()
        results, duration = await run_level(
            backend.request,
            prompts,
            concurrency=concurrency,
            request_rate=settings.request_rate,
            seed=settings.seed + concurrency,
            tag=f"{backend.mode}-c{concurrency}",
        )
        summary = summarize(results, duration)
        summary.update(cpu_usage(cpu_before, cpu_snapshot(), summary["output_tokens"]))
        report["levels"][str(concurrency)] = summary
        say(_level_line(backend.mode, concurrency, summary))


def _level_line(mode: str, concurrency: int, s: Mapping[str, Any]) -> str:
    line = (
        f"{mode:>17} c={concurrency:<4} {s['output_tok_s']:9.1f} tok/s "
        f"{s['requests_s']:7.2f} req/s  TTFT p50 {fmt(s['ttft_p50_ms'])} "
        f"p99 {fmt(s['ttft_p99_ms'])} ms  TPOT p50 {fmt(s['tpot_p50_ms'])} ms  "
        f"ITL p50 {fmt(s['itl_p50_ms'])} ms"
    )
    if s["failed"]:
        line += f"  FAILED {s['failed']}/{s['requests']}: {s['errors'][0]}"
    return line


def run_benchmark(settings: BenchSettings) -> dict[str, Any]:
    """Run every selected mode in turn; returns the report (also written to disk).

    A mode that fails to start or dies is recorded with its error and the others still run.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if any(m in settings.modes for m in ("asyncllm", "mesh-vllm", "gateway", "vllm-serve")):
        # Sets vLLM's logging level and the spawn start method (this process gets gRPC
        # threads in the mesh modes; forking after that is unsafe) before vLLM is imported.
        import llmesh.inference_worker.engines.vllm_engine  # noqa: F401

    warmup, levels = _prompt_sets(settings)
    # Server logs stay out of the results directory (it may be committed); they are kept for
    # a look after a failure, and their place is in the report.
    logs = Path(tempfile.mkdtemp(prefix=f"llmesh-bench-{settings.name}-logs-"))
    say(f"server logs: {logs}")
    modes: dict[str, Any] = {}
    cluster: MeshCluster | None = None
    try:
        for mode in [m for m in _RUN_ORDER if m in settings.modes]:
            say(f"== {mode}: {MODES[mode]}")
            try:
                if mode.startswith("mesh-") or mode == "gateway":
                    if cluster is None:
                        cluster = MeshCluster(settings, logs)
                        cluster.start()
                    backend: Backend = (
                        GatewayBackend(settings, cluster, logs / "gateway.log")
                        if mode == "gateway"
                        else MeshBackend(settings, cluster, mode.removeprefix("mesh-"))
                    )
                else:
                    if cluster is not None:  # never two engines (or their idle mesh) at once
                        cluster.stop()
                        cluster = None
                    if mode == "asyncllm":
                        backend = AsyncLLMBackend(settings)
                    else:
                        backend = VLLMServeBackend(settings, logs / "vllm-serve.log")
                modes[mode] = asyncio.run(_bench_mode(backend, settings, warmup, levels))
            except (LLMeshError, OSError, RuntimeError, ImportError, ValueError) as exc:
                message = f"{type(exc).__name__}: {exc}"
                say(f"{mode} failed: {message}")
                modes[mode] = {"error": message, "levels": {}}
                if mode != "asyncllm" and cluster is not None and not _alive(cluster):
                    cluster.stop()
                    cluster = None
    finally:
        if cluster is not None:
            cluster.stop()
    report = {
        "meta": {**report_meta(settings, warmup, levels), "logs": str(logs)},
        "modes": modes,
        "targets": evaluate_targets(modes, settings.concurrency),
    }
    write_report(report, settings.out, settings.name)
    return report


def _alive(cluster: MeshCluster) -> bool:
    return all(p is not None and p.poll() is None for p in (cluster.worker, cluster.control_plane))
