"""Soak: N minutes of steady streaming through a local mesh, with random cancels.

Starts the servers ``llmesh up`` runs (etcd, a control plane, one inference worker; each a
child process), deploys the llmesh test model with the transformers engine, and keeps
``--streams`` streams running through the SDK (``async_stream_chat_oai``) for ``--minutes``:
each request asks for a random length, and about one in ``--cancel-every`` is abandoned early
(the SDK cancels it on the worker). Reported: requests finished / cancelled / failed (with the
errors seen), output tokens per second, and the resident memory (RSS) and open file
descriptors of every mesh process (etcd, control plane, node agent, replica processes) after a
one-minute warm-up and at the end, with the growth between them.

Usage: ``python benchmarks/soak.py [--minutes 30] [--streams 64] [--out DIR]``. Targets (issue
"Requests survive failure"): 0 errors, RSS growth < 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _proc_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _usage(pid: int) -> tuple[int, int]:
    """(RSS bytes, open file descriptors) of one process; (0, 0) when it is gone."""
    try:
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0, 0


def _name(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(c.decode(errors="replace") for c in cmd if c)
    for key, label in (
        ("replica_process", "replica process"),
        ("inference-worker", "node agent"),
        ("control-plane", "control plane"),
        ("etcd", "etcd"),
    ):
        if key in text:
            return label
    return text[:40]


def snapshot(roots: dict[str, int]) -> dict[str, dict[str, int]]:
    """RSS and fds per mesh process, keyed "label pid"."""
    out: dict[str, dict[str, int]] = {}
    for root in roots.values():
        for pid in _proc_tree(root):
            rss, fds = _usage(pid)
            if rss:
                out[f"{_name(pid)} {pid}"] = {"rss": rss, "fds": fds}
    return out


async def soak(llm: Any, model: str, args: argparse.Namespace, on_warm: Any) -> dict[str, Any]:
    """Keep ``args.streams`` streams running for ``args.minutes``; count what happened."""
    rng = random.Random(args.seed)
    end = time.monotonic() + args.minutes * 60
    warm_at = time.monotonic() + min(60.0, args.minutes * 60 / 4)
    counts: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    tokens = 0
    warmed = False

    async def one(i: int) -> None:
        nonlocal tokens, warmed
        while time.monotonic() < end:
            if not warmed and time.monotonic() >= warm_at:
                warmed = True
                on_warm()
            length = rng.randint(16, 256)
            cancel_after = rng.randint(1, length) if rng.randrange(args.cancel_every) == 0 else 0
            seen = 0
            try:
                stream = llm.async_stream_chat_oai(
                    [{"role": "user", "content": f"Soak {i}: tell me something, {rng.random()}"}],
                    model=model,
                    llm_config={"max_length": length, "ignore_eos": True, "timeout_s": 120},
                )
                async for _, meta in stream:
                    seen = int(meta.get("generated_tokens_count") or 0)
                    if cancel_after and seen >= cancel_after:
                        break
                await stream.aclose()
                counts["cancelled" if cancel_after and seen < length else "finished"] += 1
                tokens += seen
            except Exception as exc:  # noqa: BLE001 - a soak counts failures and goes on
                counts["failed"] += 1
                errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1

    began = time.monotonic()
    try:
        await asyncio.gather(*(one(i) for i in range(args.streams)))
    finally:
        await llm.aclose_async_channels()
    elapsed = time.monotonic() - began
    return {
        "requests": dict(counts),
        "errors": dict(errors),
        "output_tokens": tokens,
        "tokens_per_s": tokens / elapsed if elapsed else 0.0,
        "seconds": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--cancel-every", type=int, default=8, help="about 1 in N is cancelled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "llmesh")
    args = parser.parse_args(argv)

    from llmesh.bench.backends import MeshCluster
    from llmesh.testing import make_test_model

    model_dir = make_test_model(args.cache_dir / "tiny-llama")
    logs = Path(tempfile.mkdtemp(prefix="llmesh-soak-"))
    cluster = MeshCluster(types.SimpleNamespace(startup_timeout=120.0), logs)  # type: ignore[arg-type]
    cluster.start()
    try:
        llm = cluster.llm
        llm.setup_infer_backend("transformers").deploy(
            str(model_dir), "custom/llama", "soak", {"max_concurrency": str(args.streams)}
        )
        roots = {
            "etcd": cluster.etcd.proc.pid,
            "control plane": cluster.control_plane.pid,  # type: ignore[union-attr]
            "worker": cluster.worker.pid,  # type: ignore[union-attr]
        }
        marks: dict[str, Any] = {}
        result = asyncio.run(
            soak(llm, "soak", args, lambda: marks.setdefault("start", snapshot(roots)))
        )
        marks.setdefault("start", snapshot(roots))
        marks["end"] = snapshot(roots)
    finally:
        cluster.stop()
    rows = []
    for key, start in marks["start"].items():
        end = marks["end"].get(key)
        if end is None:
            rows.append((key, start["rss"], 0, start["fds"], 0, None))
            continue
        growth = (end["rss"] - start["rss"]) / start["rss"] * 100
        rows.append((key, start["rss"], end["rss"], start["fds"], end["fds"], growth))
    cpu = platform.processor() or platform.machine()
    machine = f"{os.cpu_count()} cores {cpu}, Python {sys.version.split()[0]}"
    lines = [
        f"Soak: {args.minutes:g} min, {args.streams} streams, ~1 in {args.cancel_every} cancelled; "
        f"machine: {machine}.",
        "",
        f"requests: {result['requests']}; failed: {result['requests'].get('failed', 0)}; "
        f"output tokens: {result['output_tokens']} ({result['tokens_per_s']:.0f}/s)",
        "",
        "| process | RSS after warm-up (MiB) | RSS at end (MiB) | growth | fds after warm-up "
        "| fds at end |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, r0, r1, f0, f1, growth in rows:
        g = "gone" if growth is None else f"{growth:+.1f} %"
        lines.append(f"| {key} | {r0 / 2**20:.1f} | {r1 / 2**20:.1f} | {g} | {f0} | {f1} |")
    if result["errors"]:
        lines += ["", "errors:", *(f"- {n} x {e}" for e, n in result["errors"].items())]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.md").write_text(text + "\n")
    (args.out / "soak.json").write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, **result, **marks}, indent=1
        )
    )
    return 0 if not result["requests"].get("failed") else 1


if __name__ == "__main__":
    sys.exit(main())
