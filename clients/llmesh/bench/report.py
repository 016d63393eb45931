"""The benchmark's report: the issue's targets checked against the numbers, the markdown tables,
the run's description (load, machine, versions), and NAME.json / NAME.md / NAME.png on disk."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmesh.bench.chart import write_chart
from llmesh.bench.cpu import CPU_ROLES
from llmesh.bench.load_generator import Prompt
from llmesh.bench.settings import MODES, BenchSettings

#: Targets from the issue: (key, description, threshold).
THROUGHPUT_RATIO_TARGET = 0.97  # mesh-vllm / asyncllm output tok/s, at every concurrency
TTFT_P50_ADDED_MS_TARGET = 1.0  # mesh-vllm TTFT p50 - asyncllm TTFT p50, at every concurrency
TTFT_P99_ADDED_MS_TARGET = 5.0  # same for p99
SERVE_RATIO_TARGET = 1.2  # mesh-vllm / vllm-serve output tok/s at SERVE_RATIO_STREAMS
GATEWAY_RATIO_TARGET = 0.95  # gateway / vllm-serve output tok/s, at every concurrency
GATEWAY_TTFT_ADDED_MS_TARGET = 2.0  # gateway - vllm-serve TTFT p50 at 1 stream
SERVE_RATIO_STREAMS = 32


def say(text: str) -> None:
    """Print a line of the benchmark's progress or results at once (children share stdout).

    Args:
        text: the line.
    """
    print(text, flush=True)


def _level(modes: Mapping[str, Any], mode: str, concurrency: int) -> Mapping[str, Any] | None:
    level = modes.get(mode, {}).get("levels", {}).get(str(concurrency))
    if not level or not level.get("completed"):
        return None
    return level


def evaluate_targets(modes: Mapping[str, Any], concurrency: Sequence[int]) -> list[dict[str, Any]]:
    """The issue's targets, checked against this run's numbers.

    - mesh-vllm output tok/s >= 0.97 x asyncllm at every concurrency;
    - mesh-vllm TTFT p50 at most 1 ms, p99 at most 5 ms above asyncllm's;
    - mesh-vllm output tok/s >= 1.2 x vllm-serve at 32 streams (at the largest measured
      concurrency when 32 was not measured).

    Returns:
        One dict per check: ``check``, ``streams``, ``value``, ``target`` (text), ``met``
        (None when a mode needed for it is missing).
    """
    checks: list[dict[str, Any]] = []

    def add(check: str, streams: int, value: float | None, target: str, met: bool | None) -> None:
        checks.append(
            {"check": check, "streams": streams, "value": value, "target": target, "met": met}
        )

    for c in concurrency:
        mesh, base = _level(modes, "mesh-vllm", c), _level(modes, "asyncllm", c)
        if mesh is None or base is None:
            for check, target in (
                ("mesh / AsyncLLM output tok/s", f">= {THROUGHPUT_RATIO_TARGET}"),
                ("mesh - AsyncLLM TTFT p50 (ms)", f"<= {TTFT_P50_ADDED_MS_TARGET}"),
                ("mesh - AsyncLLM TTFT p99 (ms)", f"<= {TTFT_P99_ADDED_MS_TARGET}"),
            ):
                add(check, c, None, target, None)
            continue
        ratio = mesh["output_tok_s"] / base["output_tok_s"] if base["output_tok_s"] else None
        add(
            "mesh / AsyncLLM output tok/s",
            c,
            ratio,
            f">= {THROUGHPUT_RATIO_TARGET}",
            None if ratio is None else ratio >= THROUGHPUT_RATIO_TARGET,
        )
        for q, limit in (("p50", TTFT_P50_ADDED_MS_TARGET), ("p99", TTFT_P99_ADDED_MS_TARGET)):
            added = mesh[f"ttft_{q}_ms"] - base[f"ttft_{q}_ms"]
            add(f"mesh - AsyncLLM TTFT {q} (ms)", c, added, f"<= {limit}", added <= limit)
    at = SERVE_RATIO_STREAMS if SERVE_RATIO_STREAMS in concurrency else max(concurrency)
    mesh, serve = _level(modes, "mesh-vllm", at), _level(modes, "vllm-serve", at)
    ratio = (
        mesh["output_tok_s"] / serve["output_tok_s"]
        if mesh is not None and serve is not None and serve["output_tok_s"]
        else None
    )
    add(
        "mesh / vllm serve output tok/s",
        at,
        ratio,
        f">= {SERVE_RATIO_TARGET}",
        None if ratio is None else ratio >= SERVE_RATIO_TARGET,
    )
    if "gateway" in modes:
        for c in concurrency:
            gw, serve = _level(modes, "gateway", c), _level(modes, "vllm-serve", c)
            ratio = (
                gw["output_tok_s"] / serve["output_tok_s"]
                if gw is not None and serve is not None and serve["output_tok_s"]
                else None
            )
            add(
                "gateway / vllm serve output tok/s",
                c,
                ratio,
                f">= {GATEWAY_RATIO_TARGET}",
                None if ratio is None else ratio >= GATEWAY_RATIO_TARGET,
            )
        gw, serve = _level(modes, "gateway", 1), _level(modes, "vllm-serve", 1)
        added = None
        if gw is not None and serve is not None:
            added = gw["ttft_p50_ms"] - serve["ttft_p50_ms"]
        add(
            "gateway - vllm serve TTFT p50 (ms)",
            1,
            added,
            f"<= {GATEWAY_TTFT_ADDED_MS_TARGET}",
            None if added is None else added <= GATEWAY_TTFT_ADDED_MS_TARGET,
        )
    return checks


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for the tables, ``-`` where there is none.

    Args:
        value: the number, or None.
        digits: digits after the point.
    """
    return "-" if value is None else f"{value:.{digits}f}"


def _met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[met]


def markdown_report(report: Mapping[str, Any]) -> str:
    """The results and target checks as markdown tables (what the README shows)."""
    meta = report["meta"]
    lines = [
        f"Model: {meta['model']}. Load: {meta['load']}.",
        f"Machine: {meta['machine']}.",
        "",
        "| streams | mode | output tok/s | req/s | TTFT p50 (ms) | TTFT p99 (ms) "
        "| TPOT p50 (ms) | ITL p50 (ms) | ITL p99 (ms) | failed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in meta["concurrency"]:
        for mode, label in MODES.items():
            data = report["modes"].get(mode)
            if data is None:
                continue
            s = data.get("levels", {}).get(str(c))
            if s is None:
                lines.append(f"| {c} | {label} | failed: {data.get('error', '?')[:80]} |||||||")
                continue
            lines.append(
                f"| {c} | {label} | {s['output_tok_s']:.1f} | {s['requests_s']:.2f} "
                f"| {fmt(s['ttft_p50_ms'])} | {fmt(s['ttft_p99_ms'])} "
                f"| {fmt(s['tpot_p50_ms'], 2)} | {fmt(s['itl_p50_ms'], 2)} "
                f"| {fmt(s['itl_p99_ms'], 2)} | {s['failed']}/{s['requests']} |"
            )
    lines += _cpu_table(report)
    lines += ["", "| target | streams | measured | target | met |", "|---|---:|---:|---|---|"]
    for t in report["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:+.2f}"
        if t["value"] is not None and "/" in t["check"]:
            value = f"{t['value']:.3f}"
        lines.append(
            f"| {t['check']} | {t['streams']} | {value} | {t['target']} | {_met(t['met'])} |"
        )
    return "\n".join(lines) + "\n"


def _cpu_table(report: Mapping[str, Any]) -> list[str]:
    """CPU ms per output token by role, and the machine's other load, per level and mode."""
    rows = []
    for c in report["meta"]["concurrency"]:
        for mode, label in MODES.items():
            s = report["modes"].get(mode, {}).get("levels", {}).get(str(c))
            per = (s or {}).get("cpu_ms_per_token")
            if not per or None in per.values():
                continue
            cells = " | ".join(f"{per[r]:.3f}" for r in CPU_ROLES)
            rows.append(
                f"| {c} | {label} | {cells} | {sum(per.values()):.3f} "
                f"| {fmt(s.get('other_load_cores'), 2)} |"
            )
    if not rows:
        return []
    return [
        "",
        "CPU ms per output token: bench = the load generator (with vLLM's frontend in "
        "AsyncLLM mode); server = the mesh's processes or the OpenAI server; engine = vLLM's "
        "EngineCore and workers. Other load = cores kept busy by other processes meanwhile.",
        "",
        "| streams | mode | bench | server | engine | total | other load (cores) |",
        "|---:|---|---:|---:|---:|---:|---:|",
        *rows,
    ]


def write_report(report: Mapping[str, Any], out: Path, name: str) -> None:
    """Write NAME.json, NAME.md and NAME.png into ``out`` and print the tables and verdicts.

    Args:
        report: the benchmark's report (``meta``, ``modes``, ``targets``).
        out: the results directory (created if missing).
        name: the file name stem.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_report(report)
    (out / f"{name}.md").write_text(table)
    if not write_chart(report, out / f"{name}.png"):
        say("matplotlib is not installed, so no chart: pip install 'llmesh[plot]'")
    say("")
    say(table)
    for t in report["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        say(f"{t['check']} at {t['streams']} streams: {value} (target {t['target']}): {verdict}")
    say(f"results: {out / name}.{{json,md,png}}")


# -- environment ---------------------------------------------------------------------------------


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 2**20:.0f} GiB RAM"
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = "no GPU"
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{cores} cores {cpu}{mem}, {gpu}, {platform.system()} {platform.release()}"


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("vllm", "torch", "transformers", "grpc", "aiohttp"):
        with contextlib.suppress(Exception):
            module = __import__(name)
            versions[name] = str(getattr(module, "__version__", "?"))
    with contextlib.suppress(Exception):
        from llmesh import __version__

        versions["llmesh"] = __version__
    return versions


def report_meta(
    settings: BenchSettings, warmup: Sequence[Prompt], levels: Mapping[int, Sequence[Prompt]]
) -> dict[str, Any]:
    """The report's ``meta``: the model, the load, the machine, versions and engine settings.

    Args:
        settings: the run's settings.
        warmup: the warm-up prompts.
        levels: each concurrency level's prompts.
    """
    tokens = [p.tokens for ps in levels.values() for p in ps]
    rate = "all at once" if math.isinf(settings.request_rate) else f"{settings.request_rate}/s"
    per_level = ", ".join(f"{c}: {len(p)}" for c, p in levels.items())
    return {
        "model": settings.model_desc,
        "model_path": str(settings.model),
        "load": (
            f"prompts {settings.input_len} tokens (+BOS), outputs {settings.output_len} tokens"
            f"{' (ignore_eos)' if settings.ignore_eos else ''}, requests per level {per_level}, "
            f"arrivals {rate}"
        ),
        "machine": _machine(),
        "versions": _versions(),
        "command": settings.command,
        "concurrency": settings.concurrency,
        "num_requests": {str(c): len(p) for c, p in levels.items()},
        "warmup_requests": len(warmup),
        "input_len": settings.input_len,
        "prompt_tokens_exact": sum(t == settings.input_len for t in tokens),
        "prompt_tokens_total": len(tokens),
        "output_len": settings.output_len,
        "ignore_eos": settings.ignore_eos,
        "request_rate": None if math.isinf(settings.request_rate) else settings.request_rate,
        "seed": settings.seed,
        "vllm": {
            "max_num_seqs": settings.max_num_seqs,
            "max_model_len": settings.max_model_len,
            "gpu_memory_utilization": settings.gpu_memory_utilization,
            "dtype": settings.dtype,
            "enforce_eager": settings.enforce_eager,
        },
        "modes": {m: MODES[m] for m in settings.modes},
    }
