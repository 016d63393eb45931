"""Server subcommands of the CLI: ``up``, ``control-plane`` and ``inference-worker``.

``llmesh up`` is the embedded default: a local etcd child (unless ``--etcd`` is given), the
control plane on 127.0.0.1:50051 and N inference workers as child processes. Ctrl-C or SIGTERM
stops them all — workers drain first, then the control plane, then etcd — and every child is
also tied to this process with PR_SET_PDEATHSIG so none outlives it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmesh.local_etcd import LocalEtcd, guarded, stop_child
from llmesh.store import DEFAULT_NAMESPACE

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:50051"


def _worker_command(args: argparse.Namespace, etcd: str, index: int) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "llmesh",
        "inference-worker",
        "--etcd",
        etcd,
        "--namespace",
        args.namespace,
        "--listen",
        f"{args.host}:0",
        "--worker-id",
        f"worker-{index}",
        "--lease-ttl",
        str(args.lease_ttl),
    ]
    if args.worker_cpus is not None:
        cmd += ["--cpus", str(args.worker_cpus)]
    if args.worker_gpus is not None:
        cmd += ["--gpus", str(args.worker_gpus)]
    return cmd


async def _up(args: argparse.Namespace) -> int:
    from llmesh.control_plane.server import run_control_plane

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    state_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="llmesh-"))
    etcd: LocalEtcd | None = None
    workers: list[subprocess.Popen[bytes]] = []
    try:
        if args.etcd:
            endpoint = args.etcd
        else:
            etcd = LocalEtcd(state_dir / "etcd")
            # In the main thread on purpose: PR_SET_PDEATHSIG fires when the *thread* that
            # started the child exits, and a pool thread may exit before we do.
            etcd.start()
            endpoint = etcd.endpoint
            print(f"etcd        {endpoint} (data in {etcd.data_dir})", flush=True)
        async with run_control_plane(
            listen=args.listen, etcd=endpoint, namespace=args.namespace
        ) as cp:
            print(f"control     {cp.address}", flush=True)
            for i in range(args.workers):
                # Popen only forks; the brief block is fine at startup.
                proc = subprocess.Popen(  # noqa: ASYNC220
                    guarded(_worker_command(args, endpoint, i)), start_new_session=True
                )
                workers.append(proc)
            await _wait_workers(cp, len(workers), workers, stop)
            print(
                f"workers     {len(workers)} registered; ready (Ctrl-C stops everything)",
                flush=True,
            )
            while not stop.is_set():
                for proc in workers:
                    if proc.poll() is not None:
                        log.warning("worker pid %d exited with %s", proc.pid, proc.returncode)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
            print("stopping: workers drain, then the control plane, then etcd", flush=True)
            await asyncio.gather(*(asyncio.to_thread(stop_child, p, 30) for p in workers))
    finally:
        for proc in workers:
            stop_child(proc, 5)
        if etcd is not None:
            etcd.stop()
            if not args.data_dir:
                shutil.rmtree(state_dir, ignore_errors=True)
    print("stopped", flush=True)
    return 0


async def _wait_workers(
    cp: object, want: int, procs: list[subprocess.Popen[bytes]], stop: asyncio.Event
) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not stop.is_set():
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a worker exited with code {proc.returncode} while starting")
        if len(cp.registry.workers()) >= want:  # type: ignore[attr-defined]
            return
        await asyncio.sleep(0.1)
    if not stop.is_set():
        raise TimeoutError("workers did not register within 120 s")


def _cmd_up(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_up(args))
    except (RuntimeError, TimeoutError, ConnectionError, OSError) as exc:  # incl. no etcd
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _cmd_control_plane(args: argparse.Namespace) -> int:
    from llmesh.control_plane.server import serve_forever

    asyncio.run(serve_forever(listen=args.listen, etcd=args.etcd, namespace=args.namespace))
    return 0


def _cmd_inference_worker(args: argparse.Namespace) -> int:
    # Model loading progress bars are noise in a server log.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from llmesh.inference_worker.server import serve_forever

    asyncio.run(
        serve_forever(
            listen=args.listen,
            advertise=args.advertise,
            etcd=args.etcd,
            namespace=args.namespace,
            worker_id=args.worker_id,
            cpus=args.cpus,
            gpus=args.gpus,
            lease_ttl=args.lease_ttl,
            drain_grace=args.drain_grace,
        )
    )
    return 0


def add_server_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `up`, `control-plane`, `inference-worker` and `demo` on the CLI's subparsers."""
    from llmesh.demo import add_demo_command

    add_demo_command(subparsers)
    up = subparsers.add_parser(
        "up",
        help="run etcd, the control plane and inference workers on this machine",
        description="Start a local mesh: etcd (unless --etcd), the control plane and workers.",
    )
    up.add_argument("--listen", default=DEFAULT_LISTEN, help="control plane address")
    up.add_argument("--host", default="127.0.0.1", help="address the workers bind")
    up.add_argument("--etcd", default=None, help="use this etcd HOST:PORT instead of a child")
    up.add_argument("--workers", type=int, default=1, help="inference workers to start")
    up.add_argument("--worker-cpus", type=float, default=None, help="CPUs each worker declares")
    up.add_argument("--worker-gpus", type=float, default=None, help="GPUs each worker declares")
    up.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="etcd key namespace")
    up.add_argument("--lease-ttl", type=int, default=5, help="worker lease TTL in seconds")
    up.add_argument("--data-dir", default=None, help="keep etcd data here (default: temporary)")
    up.set_defaults(func=_cmd_up)

    cpl = subparsers.add_parser(
        "control-plane",
        help="run a control plane (stateless; run several against one etcd)",
    )
    cpl.add_argument("--listen", default=DEFAULT_LISTEN, help="address to bind")
    cpl.add_argument("--etcd", default=None, help="etcd HOST:PORT (default $LLMESH_ETCD)")
    cpl.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="etcd key namespace")
    cpl.set_defaults(func=_cmd_control_plane)

    iw = subparsers.add_parser("inference-worker", help="run an inference worker")
    iw.add_argument("--listen", default="127.0.0.1:0", help="address to bind (port 0: any)")
    iw.add_argument("--advertise", default=None, help="HOST:PORT clients dial (default: bound)")
    iw.add_argument("--etcd", default=None, help="etcd HOST:PORT (default $LLMESH_ETCD)")
    iw.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="etcd key namespace")
    iw.add_argument("--worker-id", default=None, help="stable id (default: HOSTNAME-PORT)")
    iw.add_argument("--cpus", type=float, default=None, help="CPUs to declare (default: all)")
    iw.add_argument("--gpus", type=float, default=None, help="GPUs to declare (default: detected)")
    iw.add_argument("--lease-ttl", type=int, default=5, help="lease TTL in seconds")
    iw.add_argument("--drain-grace", type=float, default=30.0, help="seconds to finish requests")
    iw.set_defaults(func=_cmd_inference_worker)
