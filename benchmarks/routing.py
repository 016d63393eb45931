"""Routing at scale: the route decision with 1,000 workers x 10,000 models registered.

Usage: .venv/bin/python benchmarks/routing.py [--quick] [--out DIR] [--profile [--py-spy PATH]]
       [--workers N] [--models N] [--watchers N] [--sdk-models N] [--seed N]

A real etcd (a child process, as ``llmesh up`` runs it), the real control plane (``llmesh
control-plane``, a child process) and real gRPC on loopback. Measured:

(a) ``AssignWorker``: one unary call at a time from this process through the SDK's own call
    path (``call_unary`` on a sync stub, as ``RouteCache`` falls back to it), each to a random
    model (uniform over all of them), policy least-loaded: round-trip latency p50/p99. Each is
    followed by a grpc.health ``Check`` on the same channel, the gRPC floor. Next to it, the
    same handler called in this process without gRPC (``ControlPlaneServicer.AssignWorker``
    over an ``EtcdRegistry`` loaded from the same etcd), which splits the round trip into the
    decision and the wire.
(b) The SDK's local pick: ``RouteCache.pick`` on models whose ``WatchModel`` stream has
    delivered its snapshot (one watch thread per model, as the SDK runs them; ``--sdk-models``
    of them, not all 10,000), and ``Selector.select`` alone over the replica sets of every
    model (as the control plane's view builds them).
(c) ``WatchModel`` fan-out: ``--watchers`` concurrent streams on one model (grpc.aio in this
    process over several connections); one replica's in-flight count is then written to etcd
    the way a worker publishes it, and each watcher's arrival time is taken against the moment
    just before the write. Pooled over 10 changes (2 with ``--quick``): p50/p99/max across
    watchers. The control plane deliberately waits ``WATCH_COALESCE_SECONDS`` after a change
    before it sends (to merge bursts), so that much of every number is by design.

The mesh's records are written straight into etcd in bulk, not through ``DeployModel``: the
same keys (:mod:`llmesh.common.etcd_keys`) and the same protobuf records the deployer and the
workers write. Workers and replica statuses hang off one shared lease (each real worker has its
own); models, assignments and the placement counter are durable, as the control plane writes
them. Replicas per model are drawn uniformly from 1..8 over distinct workers (seeded), all READY
with a random published in-flight count. The control plane starts on the empty namespace and
follows the bulk write through its etcd watch; at the end a second control plane is started on
the full namespace and timed until it answers for all of it (``control_plane_cold_start_s``;
``registry_load_s`` is the same listing timed in this process).

Results go to OUT/routing.{json,md} (default benchmarks/results). With ``--profile``, py-spy
samples the control plane during (a) and (c) and the report lists where its time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
from routing_mesh import (
    QUICK,
    Mesh,
    Scale,
    caught_up,
    cold_start,
    cpu_seconds,
    find_py_spy,
    populate,
    profile_summary,
    profiled,
    put_op,
    revoke_lease,
    say,
    start_control_plane,
    wait_until,
)

from llmesh.bench.load_generator import percentile
from llmesh.common.etcd import EtcdKV
from llmesh.common.etcd_keys import Keys, encode
from llmesh.common.grpc_server import CHANNEL_OPTIONS
from llmesh.common.local_etcd import LocalEtcd
from llmesh.common.process import stop_child
from llmesh.control_plane.servicer import WATCH_COALESCE_SECONDS
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: The issue's target for one route decision at 1,000 workers x 10,000 models.
TARGET_P99_US = 200.0


def _us(values_ns: Sequence[int]) -> dict[str, float]:
    """p50/p99/p99.9/max/mean of nanosecond samples, in microseconds."""
    us = [v / 1000 for v in values_ns]
    return {
        "n": len(us),
        "p50_us": percentile(us, 50),
        "p99_us": percentile(us, 99),
        "p999_us": percentile(us, 99.9),
        "max_us": max(us),
        "mean_us": sum(us) / len(us),
    }


def _machine() -> str:
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cores} vCPUs ({cpu}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}"
    )


# -- (a) AssignWorker -----------------------------------------------------------------------------


def bench_assign(address: str, models: Sequence[str], calls: int, seed: int) -> dict[str, Any]:
    """Sequential AssignWorker calls through the SDK's unary call path.

    Each is followed by a grpc.health.v1 ``Check`` on the same server and channel: a unary call
    whose handler does next to nothing, so its round trip is the floor the gRPC stack sets here.
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from llmesh.route_cache import CONTROL_CALL_TIMEOUT_S, call_unary

    rng = random.Random(seed)
    names = [rng.choice(models) for _ in range(calls)]
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = cp_grpc.ControlPlaneServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest()

        def one(model: str) -> None:
            call_unary(
                stub.AssignWorker,
                cp.AssignWorkerRequest(model=model),
                name="ControlPlaneService/AssignWorker",
                timeout=CONTROL_CALL_TIMEOUT_S,
            )

        warmup = names[: max(50, calls // 20)]
        for model in warmup:  # connection, caches
            one(model)
            health.Check(check, timeout=CONTROL_CALL_TIMEOUT_S)
        samples = []
        floor = []
        for model in names:
            t0 = time.perf_counter_ns()
            one(model)
            t1 = time.perf_counter_ns()
            health.Check(check, timeout=CONTROL_CALL_TIMEOUT_S)
            floor.append(time.perf_counter_ns() - t1)
            samples.append(t1 - t0)
    return {**_us(samples), "warmup": len(warmup), "health_check": _us(floor)}


async def bench_in_process(
    etcd: str, keys: Keys, models: Sequence[str], calls: int, seed: int
) -> dict[str, Any]:
    """The AssignWorker handler without gRPC, and Selector.select alone over every model."""
    from llmesh.common.routing import Selector
    from llmesh.control_plane.deployments import Deployer
    from llmesh.control_plane.registry import EtcdRegistry
    from llmesh.control_plane.servicer import ControlPlaneServicer
    from llmesh.control_plane.views import current_replicas

    kv = EtcdKV(etcd, timeout=60)
    registry = EtcdRegistry(kv, keys)
    t0 = time.monotonic()
    await registry.start(timeout=300)
    load_s = time.monotonic() - t0
    try:
        servicer = ControlPlaneServicer(registry, Deployer(registry, kv, keys))
        rng = random.Random(seed)
        names = [rng.choice(models) for _ in range(calls)]
        for model in names[:1000]:
            await servicer.AssignWorker(cp.AssignWorkerRequest(model=model), None)
        handler = []
        view = []
        for model in names:
            request = cp.AssignWorkerRequest(model=model)
            t0 = time.perf_counter_ns()
            await servicer.AssignWorker(request, None)
            t1 = time.perf_counter_ns()
            current_replicas(registry, registry.models()[model])
            view.append(time.perf_counter_ns() - t1)
            handler.append(t1 - t0)
        servicer.close()
        # Every model's replica set as the control plane's view (and WatchModel) gives it.
        sets = {m: current_replicas(registry, registry.models()[m]) for m in models}
        selector = Selector()
        select = []
        order = list(models) * max(1, calls // len(models))
        rng.shuffle(order)
        for model in order:
            replicas = sets[model]
            t0 = time.perf_counter_ns()
            selector.select(model, replicas)
            select.append(time.perf_counter_ns() - t0)
        return {
            "handler": _us(handler),
            "view": _us(view),
            "select": _us(select),
            "registry_load_s": load_s,
        }
    finally:
        await registry.close()
        await kv.close()


# -- (b) the SDK's local pick ---------------------------------------------------------------------


def bench_pick(
    address: str, models: Sequence[str], cached: int, calls: int, seed: int
) -> dict[str, Any]:
    """RouteCache.pick on models whose WatchModel snapshot has arrived."""
    from llmesh.route_cache import RouteCache

    rng = random.Random(seed)
    watched = rng.sample(list(models), min(cached, len(models)))
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    cache = RouteCache(channel)
    try:
        t0 = time.monotonic()
        for model in watched:
            cache.replicas(model)  # starts the watch, waits for its first snapshot
        deadline = time.monotonic() + 60
        while any(cache.is_stale(m) for m in watched) and time.monotonic() < deadline:
            time.sleep(0.1)
        stale = sum(cache.is_stale(m) for m in watched)
        watch_s = time.monotonic() - t0
        # With nothing changing, what the watch threads cost: grpc's sync stream iterator
        # wakes every 0.1 s (grpc._common.wait) to let signal handlers run.
        idle0 = time.process_time()
        time.sleep(2.0)
        idle_cpu = (time.process_time() - idle0) / 2.0
        names = [rng.choice(watched) for _ in range(calls)]
        for model in names[:1000]:
            cache.pick(model)
        samples = []
        for model in names:
            t0n = time.perf_counter_ns()
            cache.pick(model)
            samples.append(time.perf_counter_ns() - t0n)
    finally:
        cache.close()
        channel.close()
    return {
        **_us(samples),
        "models_cached": len(watched) - stale,
        "watch_threads": len(watched),
        "watch_setup_s": watch_s,
        "idle_cpu_share": idle_cpu,
    }


# -- (c) WatchModel fan-out -----------------------------------------------------------------------


async def bench_fanout(
    address: str, etcd: str, keys: Keys, mesh: Mesh, watchers: int, rounds: int, cp_pid: int
) -> dict[str, Any]:
    """``watchers`` WatchModel streams on one model; time each change's arrival at each.

    Also the control plane's CPU time per change (``cp_pid``'s, over the rounds alone).
    """
    model, status = mesh.fanout_model, common_pb2.Replica()
    status.CopyFrom(mesh.fanout_status)
    # Separate connections (a local subchannel pool each), ~100 streams per connection.
    n_channels = max(1, min(16, watchers // 100))
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(n_channels)]
    stubs = [cp_grpc.ControlPlaneServiceStub(c) for c in channels]
    kv = EtcdKV(etcd)
    arrivals: list[list[float]] = [[] for _ in range(rounds)]
    want: dict[int, int] = {}  # in-flight count -> round
    subscribed = 0
    all_subscribed = asyncio.Event()
    round_done = [asyncio.Event() for _ in range(rounds)]
    errors: list[str] = []

    async def watcher(i: int) -> None:
        nonlocal subscribed
        call = stubs[i % n_channels].WatchModel(cp.WatchModelRequest(name=model))
        try:
            first = True
            async for response in call:
                now = time.perf_counter()
                if first:
                    first = False
                    subscribed += 1
                    if subscribed == watchers:
                        all_subscribed.set()
                    continue
                for r in response.model.replicas:
                    if r.worker_id == status.worker_id and r.index == status.index:
                        k = want.get(r.inflight)
                        if k is not None:
                            arrivals[k].append(now)
                            if len(arrivals[k]) == watchers:
                                round_done[k].set()
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                errors.append(f"{err.code().name}: {err.details()}")

    tasks = [asyncio.create_task(watcher(i)) for i in range(watchers)]
    t_sub = time.perf_counter()
    starts: list[float] = []
    try:
        await asyncio.wait_for(all_subscribed.wait(), 120)
        subscribe_s = time.perf_counter() - t_sub
        await asyncio.sleep(0.5)
        cpu0 = cpu_seconds(cp_pid)
        for k in range(rounds):
            status.inflight = 100 + k  # a count nothing else publishes
            want[status.inflight] = k
            key = keys.replica(model, status.worker_id, status.generation, status.index)
            value = encode(status)
            t0 = time.perf_counter()
            await kv.txn([], [put_op(key, value, mesh.lease)])
            starts.append(t0)
            await asyncio.wait_for(round_done[k].wait(), 60)
            await asyncio.sleep(0.3)
        cpu_per_change = (cpu_seconds(cp_pid) - cpu0) / rounds
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in channels:
            await c.close()
        await kv.close()
    if errors:
        raise RuntimeError(f"{len(errors)} watchers failed, e.g. {errors[0]}")
    lat_ms = [1000 * (a - starts[k]) for k in range(rounds) for a in arrivals[k]]
    first_ms = [1000 * (min(arrivals[k]) - starts[k]) for k in range(rounds)]
    last_ms = [1000 * (max(arrivals[k]) - starts[k]) for k in range(rounds)]
    return {
        "n": len(lat_ms),
        "watchers": watchers,
        "rounds": rounds,
        "connections": n_channels,
        "replicas_in_model": mesh.fanout_replicas,
        "p50_ms": percentile(lat_ms, 50),
        "p99_ms": percentile(lat_ms, 99),
        "max_ms": max(lat_ms),
        "first_ms_per_round": first_ms,
        "last_ms_per_round": last_ms,
        "coalesce_ms": 1000 * WATCH_COALESCE_SECONDS,
        "subscribe_s": subscribe_s,
        # Includes 0.3 s of idle control plane per round (its reconcile loop, etcd watch).
        "server_cpu_ms_per_change": 1000 * cpu_per_change,
    }


# -- report ---------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table plus the verdict lines."""
    r = report["results"]
    a, h, s, p, f = r["assign"], r["in_process"], r["in_process"]["select"], r["pick"], r["fanout"]
    rows = [
        "| what | samples | p50 | p99 | p99.9 | max |",
        "|---|---:|---:|---:|---:|---:|",
        _row("AssignWorker RPC, round trip (a)", a),
        _row("↳ gRPC floor: health `Check` round trip, same server", a["health_check"]),
        _row("AssignWorker handler, no gRPC (a)", h["handler"]),
        _row("replica view built afresh (`current_replicas`)", h["view"]),
        _row(f"SDK `RouteCache.pick`, {p['models_cached']} models cached (b)", p),
        _row(f"`Selector.select` alone, all {report['scale']['models']:,} models (b)", s),
        f"| WatchModel fan-out to {f['watchers']:,} watchers, change → arrival (c) | {f['n']:,} "
        f"| {f['p50_ms']:.1f} ms | {f['p99_ms']:.1f} ms | | {f['max_ms']:.1f} ms |",
    ]
    lines = [
        *rows,
        "",
        f"- CPU per AssignWorker + Check pair: control plane {a['server_cpu_us_per_pair']:.0f} µs,"
        f" client {a['client_cpu_us_per_pair']:.0f} µs; fan-out: control plane "
        f"{f['server_cpu_ms_per_change']:.0f} ms CPU per change sent to {f['watchers']:,} "
        "watchers",
        f"- the SDK with {p['watch_threads']:,} watch threads and no changes uses "
        f"{100 * p['idle_cpu_share']:.0f} % of a core",
    ]
    cold = report["meta"]["control_plane_cold_start_s"]
    lines.append(
        f"- a control plane started on all {report['meta']['keys_written']:,} keys first answers "
        + (f"{cold:.1f} s after it was started" if cold is not None else "never (see its log)")
    )
    for t in report["targets"]:
        verdict = "met" if t["met"] else "NOT met"
        lines.append(
            f"- {t['check']}: p99 {t['value']:.1f} µs (target ≤ {t['target']:.0f} µs): {verdict}"
        )
    lines.append(
        f"- fan-out includes the control plane's {f['coalesce_ms']:.0f} ms coalescing wait; "
        f"first watcher per round {', '.join(f'{x:.1f}' for x in f['first_ms_per_round'])} ms, "
        f"last {', '.join(f'{x:.1f}' for x in f['last_ms_per_round'])} ms"
    )
    return "\n".join(lines) + "\n"


def _row(label: str, d: dict[str, Any]) -> str:
    return (
        f"| {label} | {d['n']:,} | {d['p50_us']:.1f} µs | {d['p99_us']:.1f} µs "
        f"| {d['p999_us']:.1f} µs | {d['max_us']:.1f} µs |"
    )


def _timed(label: str, fn: Callable[[], Any]) -> Any:
    t0 = time.monotonic()
    say(f"{label} ...")
    out = fn()
    say(f"{label}: {time.monotonic() - t0:.1f} s")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 workers x 100 models, 20 watchers")
    ap.add_argument("--workers", type=int, help="registered workers (default 1000)")
    ap.add_argument("--models", type=int, help="deployed models (default 10000)")
    ap.add_argument("--watchers", type=int, help="WatchModel streams for (c) (default 1000)")
    ap.add_argument("--sdk-models", type=int, help="models the SDK's RouteCache watches in (b)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="py-spy the control plane in (a), (c)")
    ap.add_argument("--py-spy", help="py-spy executable (default: next to python, or on PATH)")
    ap.add_argument("--out", default=str(RESULTS), help="results directory")
    args = ap.parse_args(argv)
    scale = QUICK if args.quick else Scale()
    overrides = {
        k: v
        for k, v in (
            ("workers", args.workers),
            ("models", args.models),
            ("watchers", args.watchers),
            ("sdk_models", args.sdk_models),
        )
        if v is not None
    }
    scale = Scale(**{**asdict(scale), **overrides})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = Keys("/llmesh")
    logs = Path(tempfile.mkdtemp(prefix="llmesh-routing-"))
    etcd = LocalEtcd(logs / "etcd", log_level="error")
    control_plane: subprocess.Popen[bytes] | None = None
    load_before = os.getloadavg()
    say(f"machine: {_machine()}; load average {load_before[0]:.1f}; logs in {logs}")
    try:
        etcd.start()
        # The control plane starts on the empty namespace and follows the bulk write through
        # its etcd watch (a cold start on the full namespace is timed at the end).
        control_plane, address = start_control_plane(etcd.endpoint, logs)
        wait_until(
            control_plane,
            logs,
            lambda stub: stub.ListWorkers(cp.ListWorkersRequest(), timeout=2) is not None,
            address=address,
        )
        t0 = time.monotonic()
        mesh = asyncio.run(populate(etcd.endpoint, keys, scale, args.seed))
        populate_s = time.monotonic() - t0
        say(
            f"wrote {mesh.keys_written:,} keys ({scale.workers:,} workers, {scale.models:,} models,"
            f" {mesh.replicas:,} replicas) in {populate_s:.1f} s"
        )
        load_s = wait_until(
            control_plane,
            logs,
            lambda stub: caught_up(stub, mesh, scale.workers),
            address=address,
        )
        say(f"control plane {address} shows all of it {load_s:.1f} s after the write")
        # `guarded` execs the control plane, so the child's pid is the control plane's.
        cp_pid = control_plane.pid
        spy = find_py_spy(args.py_spy) if args.profile else None

        with profiled(spy, cp_pid, out / "routing-profile-assign.txt", 120):
            cpu0, own0 = cpu_seconds(cp_pid), time.process_time()
            assign = _timed(
                "(a) AssignWorker",
                lambda: bench_assign(address, mesh.models, scale.assign_calls, args.seed),
            )
            # Per call pair (AssignWorker + Check), warm-up included: CPU time is what
            # contention on a shared machine leaves alone, unlike latency.
            calls = assign["n"] + assign["warmup"]
            assign["server_cpu_us_per_pair"] = 1e6 * (cpu_seconds(cp_pid) - cpu0) / calls
            assign["client_cpu_us_per_pair"] = 1e6 * (time.process_time() - own0) / calls
        in_process = _timed(
            "(a) handler in process",
            lambda: asyncio.run(
                bench_in_process(etcd.endpoint, keys, mesh.models, scale.handler_calls, args.seed)
            ),
        )
        pick = _timed(
            "(b) RouteCache.pick",
            lambda: bench_pick(address, mesh.models, scale.sdk_models, scale.pick_calls, args.seed),
        )
        with profiled(spy, cp_pid, out / "routing-profile-fanout.txt", 120):
            cpu0 = cpu_seconds(cp_pid)
            fanout = _timed(
                "(c) WatchModel fan-out",
                lambda: asyncio.run(
                    bench_fanout(
                        address,
                        etcd.endpoint,
                        keys,
                        mesh,
                        scale.watchers,
                        scale.fanout_rounds,
                        cp_pid,
                    )
                ),
            )
            # Subscribing, the snapshots and every round's sends.
            fanout["server_cpu_s"] = cpu_seconds(cp_pid) - cpu0
        cold_start_s = _timed(
            "cold start",
            lambda: cold_start(etcd.endpoint, logs, mesh, scale.workers),
        )
        asyncio.run(revoke_lease(etcd.endpoint, mesh.lease))
    finally:
        stop_child(control_plane, 30)
        etcd.stop()

    report: dict[str, Any] = {
        "meta": {
            "machine": _machine(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "method": (
                "real etcd, real control plane process, gRPC on loopback; records written "
                "straight into etcd in bulk (same keys and protobuf records as the deployer and "
                "the workers; one shared lease for all workers), not through DeployModel"
            ),
            "keys_written": mesh.keys_written,
            "replicas": mesh.replicas,
            "populate_s": populate_s,
            # Other work on the machine skews latency (not the CPU time per call).
            "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
            "control_plane_catch_up_s": load_s,
            # A second `llmesh control-plane` started on the full namespace (None: it never
            # came up; its log says why).
            "control_plane_cold_start_s": cold_start_s,
        },
        "scale": asdict(scale),
        "results": {"assign": assign, "in_process": in_process, "pick": pick, "fanout": fanout},
        "targets": [
            {
                "check": "AssignWorker RPC round trip",
                "value": assign["p99_us"],
                "target": TARGET_P99_US,
                "met": assign["p99_us"] <= TARGET_P99_US,
            },
            {
                "check": "SDK RouteCache.pick",
                "value": pick["p99_us"],
                "target": TARGET_P99_US,
                "met": pick["p99_us"] <= TARGET_P99_US,
            },
        ],
    }
    if args.profile:
        report["profile"] = {
            phase: profile_summary(out / f"routing-profile-{phase}.txt")
            for phase in ("assign", "fanout")
        }
    (out / "routing.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "routing.md").write_text(table)
    say("")
    say(table)
    say(f"results: {out / 'routing'}.{{json,md}}")
    shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
