"""The mesh that ``routing.py`` measures: its records written into etcd in bulk, and
``llmesh control-plane`` run, waited for, cold-started and profiled as a child process.

Split from ``routing.py`` by stage: this file sets the mesh up; that one measures it and
writes the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from llmesh.common.etcd import EtcdKV, Op
from llmesh.common.etcd_keys import Keys, encode
from llmesh.common.grpc_server import CHANNEL_OPTIONS
from llmesh.common.process import free_port, guarded, stop_child
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc

# etcd refuses a transaction of more than 128 operations (--max-txn-ops) by default.
TXN_OPS = 128
MAX_REPLICAS = 8
# Long enough for any run; the benchmark revokes it at the end (real workers keep a 5 s lease
# alive instead, which changes nothing the route decision reads).
LEASE_TTL_S = 3600


@dataclass(frozen=True)
class Scale:
    """How big the mesh is and how many samples each part takes."""

    workers: int = 1000
    models: int = 10_000
    assign_calls: int = 5000
    handler_calls: int = 20_000
    sdk_models: int = 1000
    pick_calls: int = 50_000
    watchers: int = 1000
    fanout_rounds: int = 10


QUICK = Scale(
    workers=20,
    models=100,
    assign_calls=300,
    handler_calls=1000,
    sdk_models=20,
    pick_calls=2000,
    watchers=20,
    fanout_rounds=2,
)


@dataclass
class Mesh:
    """What was written to etcd."""

    keys_written: int = 0
    replicas: int = 0
    models: list[str] = field(default_factory=list)
    # The fan-out model's first replica status, rewritten with a new in-flight count per round.
    fanout_model: str = ""
    fanout_status: common_pb2.Replica = field(default_factory=common_pb2.Replica)
    fanout_replicas: int = 0
    lease: int = 0


def say(text: str) -> None:
    """Print a progress line at once."""
    print(text, flush=True)


# -- the mesh in etcd -----------------------------------------------------------------------------


def put_op(key: bytes, value: bytes, lease: int = 0) -> Op:
    from aetcd import rpc

    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


async def populate(endpoint: str, keys: Keys, scale: Scale, seed: int) -> Mesh:
    """Write workers, models, assignments and READY replica statuses in bulk.

    The same records the real writers write: the worker record and replica statuses under a
    lease (``WorkerSession``), the model spec, its assignments and the placement counter
    durable (``Deployer.deploy``), one generation per model as successive deploys give.
    """
    from llmesh.common.etcd import worker_client

    rng = random.Random(seed)
    mesh = Mesh()
    client = worker_client(endpoint)
    lease = await client.lease(LEASE_TTL_S)
    mesh.lease = lease.id
    ops: list[Op] = []
    workers = [f"worker-{i:04d}" for i in range(scale.workers)]
    addresses = {w: f"10.0.{i // 250}.{i % 250 + 1}:50051" for i, w in enumerate(workers)}
    for w in workers:
        record = cp.Worker(id=w, address=addresses[w], cpus=256, gpus=0, kind="inference")
        ops.append(put_op(keys.worker(w), encode(record), lease.id))
    for m in range(scale.models):
        name = f"model-{m:05d}"
        generation = m + 1  # each deploy bumps the placement counter and takes its value
        n = rng.randint(1, min(MAX_REPLICAS, scale.workers))
        spec = cp.Model(
            name=name,
            model_path=f"/models/{name}",
            backend="transformers",
            num_replicas=n,
            cpus_per_replica=1,
            pretrained_model_type="custom/llama",
            generation=generation,
        )
        ops.append(put_op(keys.model(name), encode(spec)))
        for index, w in enumerate(rng.sample(workers, n)):
            assignment = common_pb2.Replica(
                model=name, index=index, worker_id=w, generation=generation
            )
            ops.append(put_op(keys.assignment(w, name, index), encode(assignment)))
            status = common_pb2.Replica(
                model=name,
                index=index,
                worker_id=w,
                address=addresses[w],
                state=common_pb2.REPLICA_STATE_READY,
                inflight=rng.randint(0, 3),
                max_concurrency=8,
                generation=generation,
                pid=10_000 + m,
            )
            ops.append(put_op(keys.replica(name, w, generation, index), encode(status), lease.id))
            if m == 0 and index == 0:
                mesh.fanout_model, mesh.fanout_status = name, status
                mesh.fanout_replicas = n
        mesh.models.append(name)
        mesh.replicas += n
    ops.append(put_op(keys.placement, str(scale.models).encode()))
    kv = EtcdKV(endpoint, timeout=60)
    try:
        sem = asyncio.Semaphore(8)

        async def txn(batch: list[Op]) -> None:
            async with sem:
                await kv.txn([], batch)

        await asyncio.gather(*(txn(ops[i : i + TXN_OPS]) for i in range(0, len(ops), TXN_OPS)))
    finally:
        await kv.close()
        await client.close()
    mesh.keys_written = len(ops)
    return mesh


async def revoke_lease(endpoint: str, lease: int) -> None:
    from llmesh.common.etcd import worker_client

    client = worker_client(endpoint)
    try:
        await client.revoke_lease(lease)
    finally:
        await client.close()


# -- the control plane ----------------------------------------------------------------------------


def start_control_plane(
    etcd: str, logs: Path, startup_timeout: float = 10
) -> tuple[subprocess.Popen[bytes], str]:
    """``llmesh control-plane`` as a child; returns it once it answers for the last model."""
    address = f"127.0.0.1:{free_port()}"
    log_path = logs / "control-plane.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            guarded(
                [
                    *(sys.executable, "-m", "llmesh", "control-plane"),
                    *("--listen", address, "--etcd", etcd),
                    *("--startup-timeout", str(startup_timeout)),
                ]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    return proc, address


def cold_start(etcd: str, logs: Path, mesh: Mesh, workers: int) -> float | None:
    """Seconds from starting a second control plane on the written namespace to its first
    answer, or None (the error in its log) when it does not come up. It serves only once its
    mirror holds the whole namespace, so its first answer is the end of the load."""
    cold_logs = logs / "cold-start"
    cold_logs.mkdir(exist_ok=True)
    t0 = time.monotonic()
    proc, address = start_control_plane(etcd, cold_logs, startup_timeout=300)
    try:
        while True:
            if proc.poll() is not None or time.monotonic() - t0 > 300:
                say(f"the cold-started control plane did not come up; see {cold_logs}")
                return None
            # A fresh channel per try: a reused one waits out its reconnect backoff (up to
            # seconds) after the port opens, which would count as load time.
            with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
                stub = cp_grpc.ControlPlaneServiceStub(channel)
                with contextlib.suppress(grpc.RpcError):
                    stub.ListWorkers(cp.ListWorkersRequest(), timeout=1)
                    elapsed = time.monotonic() - t0
                    if not caught_up(stub, mesh, workers):
                        raise RuntimeError("the cold-started control plane answered without all")
                    return elapsed
            time.sleep(0.05)
    finally:
        stop_child(proc, 30)


def wait_until(
    proc: subprocess.Popen[bytes],
    logs: Path,
    check: Callable[[cp_grpc.ControlPlaneServiceStub], bool],
    *,
    address: str,
    timeout: float = 300,
) -> float:
    """Seconds until ``check(stub)`` holds; fails when the control plane exits meanwhile."""
    t0 = time.monotonic()
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = cp_grpc.ControlPlaneServiceStub(channel)
        while True:
            if proc.poll() is not None:
                log = (logs / "control-plane.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the control plane exited with {proc.returncode}:\n{log}")
            with contextlib.suppress(grpc.RpcError):
                if check(stub):
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"the control plane was not ready within {timeout:.0f} s")
            time.sleep(0.5)


def caught_up(stub: cp_grpc.ControlPlaneServiceStub, mesh: Mesh, workers: int) -> bool:
    """Whether the control plane's views hold every worker, model and READY replica written."""
    models = stub.ListModels(cp.ListModelsRequest(), timeout=60).models
    ready = sum(r.state == common_pb2.REPLICA_STATE_READY for m in models for r in m.replicas)
    if len(models) != len(mesh.models) or ready != mesh.replicas:
        return False
    return len(stub.ListWorkers(cp.ListWorkersRequest(), timeout=60).workers) == workers


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (0 where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of stat(5); [0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def profiled(spy: str | None, pid: int, path: Path, seconds: float) -> Iterator[None]:
    """Sample ``pid`` with py-spy into ``path`` (collapsed stacks) while the block runs."""
    if spy is None:
        yield
        return
    proc = subprocess.Popen(
        [
            *(spy, "record", "--pid", str(pid), "--rate", "500", "--format", "raw"),
            *("--duration", str(int(seconds) + 1), "--output", str(path), "--nonblocking"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes what it has
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        stop_child(proc, 5)


def find_py_spy(given: str | None) -> str:
    here = Path(sys.executable).parent / "py-spy"
    spy = given or (str(here) if here.exists() else shutil.which("py-spy"))
    if not spy:
        raise SystemExit("--profile needs py-spy: pip install py-spy, or pass --py-spy PATH")
    return spy


def profile_summary(path: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive sample shares by function from py-spy's collapsed stacks."""
    if not path.exists():
        return {}
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return {}
    return {
        "samples": total,
        "self": [(f, round(n / total, 3)) for f, n in own.most_common(top)],
        "inclusive": [(f, round(n / total, 3)) for f, n in inclusive.most_common(top * 2)],
    }


def _frame(frame: str) -> str:
    """``func (path/to/file.py:12)`` as ``func (file.py)``: lines would split one function."""
    func, sep, where = frame.partition(" (")
    if not sep:
        return frame
    return f"{func} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1]})"
