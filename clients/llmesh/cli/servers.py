"""Server subcommands of the CLI: ``up``, ``control-plane`` and the two kinds of worker.

``llmesh up`` is the embedded default: a local etcd child (unless ``--etcd`` is given), the
control plane on 127.0.0.1:50051, N inference workers and M trainer workers (``--trainers``,
default 0) as child processes, and the OpenAI-compatible HTTP gateway on 127.0.0.1:8000
(``--gateway-listen``; ``--no-gateway`` for none), also a child. Ctrl-C or SIGTERM
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
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmesh.arg_types import positive_seconds
from llmesh.cli.gateway import gateway_argv
from llmesh.common.auth import auth_from_env
from llmesh.common.etcd_keys import DEFAULT_NAMESPACE
from llmesh.common.etcd_security import EtcdSecurity, add_etcd_arguments
from llmesh.common.local_etcd import LocalEtcd
from llmesh.common.process import guarded, stop_child
from llmesh.common.tls import TlsConfig, add_tls_arguments
from llmesh.gateway import DEFAULT_GATEWAY_LISTEN
from llmesh.i18n import t

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:50051"


def _security(args: argparse.Namespace) -> dict[str, object]:
    """The TLS, etcd-security and --insecure keyword arguments a server command runs with.

    Raises:
        ValueError: the settings are incomplete for a server (checked before anything starts).
    """
    tls = TlsConfig.from_args(args)
    if tls is not None:
        tls.server_credentials()  # a CA alone (say, a client's LLMESH_TLS_CA) cannot serve
    return {
        "tls": tls,
        "etcd_security": EtcdSecurity.from_args(args),
        "insecure": bool(getattr(args, "insecure", False)),
    }


def _security_argv(security: dict[str, object]) -> list[str]:
    """The same settings as flags for a child ``llmesh`` command (``up``'s workers)."""
    argv: list[str] = []
    tls, etcd_security = security["tls"], security["etcd_security"]
    if isinstance(tls, TlsConfig):
        argv += tls.to_argv()
    if isinstance(etcd_security, EtcdSecurity):
        argv += etcd_security.to_argv()
    if security["insecure"]:
        argv.append("--insecure")
    return argv


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
    if auth_from_env(args.auth):
        cmd += ["--auth"]
    if args.no_metrics:
        cmd += ["--no-metrics"]
    return cmd


def _trainer_command(args: argparse.Namespace, etcd: str, index: int) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "llmesh",
        "trainer-worker",
        "--etcd",
        etcd,
        "--namespace",
        args.namespace,
        "--listen",
        f"{args.host}:0",
        "--worker-id",
        f"trainer-{index}",
        "--lease-ttl",
        str(args.lease_ttl),
    ]
    if args.jobs_dir:
        cmd += ["--jobs-dir", args.jobs_dir]
    if auth_from_env(args.auth):
        cmd += ["--auth"]
    if args.no_metrics:
        cmd += ["--no-metrics"]
    return cmd


async def _up(args: argparse.Namespace) -> int:
    from llmesh.control_plane.server import run_control_plane

    # --auth, else LLMESH_AUTH: the same rule every server applies (auth_from_env).
    auth = auth_from_env(args.auth)
    admin_token_id: str | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    security = _security(args)
    tls = security["tls"]
    assert tls is None or isinstance(tls, TlsConfig)
    state_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="llmesh-"))
    etcd: LocalEtcd | None = None
    workers: list[subprocess.Popen[bytes]] = []
    gateway: subprocess.Popen[bytes] | None = None
    try:
        if args.etcd:
            endpoint = args.etcd
        else:
            # With TLS the local etcd serves it too (and demands client certificates when the
            # mesh does), with the same certificate: every hop is encrypted.
            etcd = LocalEtcd(state_dir / "etcd", tls=tls if tls and tls.cert else None)
            if etcd.tls is not None and security["etcd_security"] is None:
                security["etcd_security"] = EtcdSecurity(ca=tls.ca, cert=tls.cert, key=tls.key)
            # In the main thread on purpose: PR_SET_PDEATHSIG fires when the *thread* that
            # started the child exits, and a pool thread may exit before we do.
            etcd.start()
            endpoint = etcd.endpoint
            print(f"etcd        {endpoint} (data in {etcd.data_dir})", flush=True)
        child_argv = _security_argv(security)
        child_env = {**os.environ}
        if isinstance(security["etcd_security"], EtcdSecurity):
            child_env.update(security["etcd_security"].secret_env())
        if auth:
            admin_token_id = await _print_admin_token(
                endpoint, args.namespace, security["etcd_security"]
            )
        async with run_control_plane(
            listen=args.listen,
            etcd=endpoint,
            namespace=args.namespace,
            auth=auth,
            **security,  # type: ignore[arg-type]
            metrics_listen=metrics_listen(args),
        ) as cp:
            print(f"control     {cp.address}", flush=True)
            if cp.metrics is not None:
                print(f"metrics     control plane {cp.metrics.url}", flush=True)
            for i in range(args.workers):
                # Popen only forks; the brief block is fine at startup.
                proc = subprocess.Popen(  # noqa: ASYNC220
                    guarded(_worker_command(args, endpoint, i) + child_argv),
                    start_new_session=True,
                    env=child_env,
                )
                workers.append(proc)
            for i in range(args.trainers):
                proc = subprocess.Popen(  # noqa: ASYNC220
                    guarded(_trainer_command(args, endpoint, i) + child_argv),
                    start_new_session=True,
                    env=child_env,
                )
                workers.append(proc)
            await _wait_workers(cp, len(workers), workers, stop)
            for worker in sorted(cp.registry.workers().values(), key=lambda w: w.id):
                if worker.metrics_url:
                    print(f"metrics     {worker.id} {worker.metrics_url}", flush=True)
            if not args.no_gateway and not _port_free(args.gateway_listen):
                # Checked first: waiting for "accepts connections" would take another
                # server on that port for our gateway, and print its URL beside the token.
                log.warning(
                    "no gateway: %s is in use; pass --gateway-listen HOST:PORT or --no-gateway",
                    args.gateway_listen,
                )
            elif not args.no_gateway:
                argv = gateway_argv(
                    cp.address,
                    args.gateway_listen,
                    tls=tls,
                    auth=auth,
                    insecure=bool(security["insecure"]),
                )
                # Its own stdout only repeats the URL printed below once it accepts
                # connections; its log (stderr) still reaches the terminal.
                gateway = subprocess.Popen(  # noqa: ASYNC220 - only forks, at startup
                    guarded(argv),
                    start_new_session=True,
                    env=child_env,
                    stdout=subprocess.DEVNULL,
                )
                if await _wait_gateway(args.gateway_listen, gateway, stop):
                    scheme = "https" if tls is not None and tls.cert else "http"
                    print(f"gateway     {scheme}://{args.gateway_listen}/v1", flush=True)
            print(
                f"workers     {args.workers} inference + {args.trainers} trainer registered; "
                "ready (Ctrl-C stops everything)",
                flush=True,
            )
            while not stop.is_set():
                for proc in workers:
                    if proc.poll() is not None:
                        log.warning("worker pid %d exited with %s", proc.pid, proc.returncode)
                if gateway is not None and gateway.poll() is not None:
                    log.warning("the gateway exited with %s", gateway.returncode)
                    gateway = None
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
            print(
                "stopping: the gateway, workers drain, then the control plane, then etcd",
                flush=True,
            )
            if gateway is not None:
                await asyncio.to_thread(stop_child, gateway, 15)
            await asyncio.gather(*(asyncio.to_thread(stop_child, p, 30) for p in workers))
    finally:
        if gateway is not None:
            stop_child(gateway, 5)
        for proc in workers:
            stop_child(proc, 5)
        if admin_token_id is not None:
            # Its secret was printed to a terminal; it must not outlive this `up` (an external
            # etcd or a --data-dir keeps the records).
            await _revoke_admin_token(
                endpoint, args.namespace, security["etcd_security"], admin_token_id
            )
        if etcd is not None:
            etcd.stop()
            if not args.data_dir:
                shutil.rmtree(state_dir, ignore_errors=True)
    print("stopped", flush=True)
    return 0


async def _revoke_admin_token(
    etcd: str, namespace: str, etcd_security: EtcdSecurity | None, token_id: str
) -> None:
    """Revoke the admin token :func:`_print_admin_token` made (logged, never raised)."""
    from llmesh.common.auth_store import EtcdTokens
    from llmesh.common.etcd import EtcdKV
    from llmesh.common.etcd_keys import Keys

    kv = EtcdKV(etcd, security=etcd_security)
    try:
        await EtcdTokens(kv, Keys(namespace)).revoke(token_id)
        print(f"revoked admin token {token_id}", flush=True)
    except Exception as exc:  # noqa: BLE001 - stopping goes on; say what to do instead
        log.warning(
            "could not revoke this up's admin token %s (%s); revoke it with "
            "`llmesh tokens revoke %s --etcd %s`",
            token_id,
            exc,
            token_id,
            etcd,
        )
    finally:
        await kv.close()


async def _print_admin_token(
    etcd: str, namespace: str, etcd_security: EtcdSecurity | None = None
) -> str:
    """Create an admin token for this ``up`` and print it (its secret is stored nowhere).

    Returns:
        The token's id (``up`` revokes it when it stops).
    """
    from llmesh.common.auth import ROLE_ADMIN, new_token
    from llmesh.common.auth_store import EtcdTokens
    from llmesh.common.etcd import EtcdKV
    from llmesh.common.etcd_keys import Keys

    token, record = new_token("llmesh up", ROLE_ADMIN)
    kv = EtcdKV(etcd, security=etcd_security)
    try:
        await EtcdTokens(kv, Keys(namespace)).add(record)
    finally:
        await kv.close()
    print(f"admin token {token}", flush=True)
    print(
        f"            (id {record.id}; export LLMESH_TOKEN=<token>; revoked when this "
        "`llmesh up` stops)",
        flush=True,
    )
    return record.id


def _port_free(listen: str) -> bool:
    """Whether ``listen`` (``host:port``) can be bound now (port 0: always)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or int(port) == 0:
        return True
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the gateway will bind (uvicorn sets SO_REUSEADDR): only a listener counts.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", int(port)))
        except OSError:
            return False
    return True


async def _wait_gateway(
    listen: str, proc: subprocess.Popen[bytes], stop: asyncio.Event, timeout: float = 60
) -> bool:
    """Wait until the gateway child accepts connections on ``listen``; False (and a warning
    that says why) when it exited first or did not come up in time. The rest of the mesh
    keeps running either way: the gateway is a client of it."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1" if host != "::" else "::1"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        if proc.poll() is not None:
            log.warning(
                "the gateway exited with %s (is %s in use? pass --gateway-listen HOST:PORT or "
                "--no-gateway); the rest of the mesh runs on",
                proc.returncode,
                listen,
            )
            return False
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 1)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.2)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    if not stop.is_set():
        log.warning("the gateway did not answer on %s within %g s", listen, timeout)
    return False


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


def metrics_listen(args: argparse.Namespace) -> str | None:
    """Where a server's /metrics binds: "off" for --no-metrics, else --metrics-listen."""
    return "off" if args.no_metrics else args.metrics_listen


def add_metrics_options(parser: argparse.ArgumentParser) -> None:
    """``--metrics-listen`` and ``--no-metrics``: where a server serves /metrics, or not."""
    parser.add_argument(
        "--metrics-listen",
        default=None,
        metavar="HOST:PORT",
        help=t(
            "where /metrics (Prometheus) binds (default: a free port on the server's host; "
            "'off': none)",
            "Prometheus /metrics 的绑定地址（默认：服务所在主机的空闲端口；'off'：关闭）",
        ),
    )
    parser.add_argument(
        "--no-metrics",
        action="store_true",
        help=t("serve no /metrics endpoint", "不提供 /metrics 端点"),
    )


def _cmd_up(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_up(args))
    except (RuntimeError, TimeoutError, ConnectionError, OSError) as exc:  # incl. no etcd
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _cmd_control_plane(args: argparse.Namespace) -> int:
    from llmesh.control_plane.server import serve_forever

    asyncio.run(
        serve_forever(
            listen=args.listen,
            etcd=args.etcd,
            namespace=args.namespace,
            **_security(args),  # type: ignore[arg-type]
            auth=args.auth,
            token_file=args.token_file,
            metrics_listen=metrics_listen(args),
            startup_timeout=args.startup_timeout,
        )
    )
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
            gpu_ids=args.gpu_ids,
            lease_ttl=args.lease_ttl,
            drain_grace=args.drain_grace,
            wedge_timeout=args.wedge_timeout,
            run_dir=args.run_dir,
            **_security(args),
            auth=args.auth,
            allow_remote_code=args.allow_remote_code,
            token_file=args.token_file,
            metrics_listen=metrics_listen(args),
        )
    )
    return 0


def _gpu_ids(text: str) -> list[str]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("give GPU ids separated by commas, e.g. 0,1")
    return ids


def _cmd_trainer_worker(args: argparse.Namespace) -> int:
    from llmesh.trainer_worker.server import serve_forever

    asyncio.run(
        serve_forever(
            listen=args.listen,
            advertise=args.advertise,
            etcd=args.etcd,
            namespace=args.namespace,
            worker_id=args.worker_id,
            cpus=args.cpus,
            gpus=args.gpus,
            jobs_dir=args.jobs_dir,
            lease_ttl=args.lease_ttl,
            cancel_grace=args.cancel_grace,
            **_security(args),
            auth=args.auth,
            allowed_roots=args.allowed_root,
            token_file=args.token_file,
            metrics_listen=metrics_listen(args),
        )
    )
    return 0


def _auth_option(parser: argparse.ArgumentParser, *, up_help: bool = False) -> None:
    if up_help:
        text = t(
            "require bearer tokens everywhere (default $LLMESH_AUTH); creates and prints an "
            "admin token, revoked when up stops",
            "所有服务都要求访问令牌（默认 $LLMESH_AUTH）；创建并打印一个管理员令牌，up 退出时吊销",
        )
    else:
        text = t(
            "require bearer tokens (default $LLMESH_AUTH); `llmesh tokens create` makes them",
            "要求访问令牌（默认 $LLMESH_AUTH）；用 `llmesh tokens create` 创建",
        )
    parser.add_argument("--auth", action="store_true", default=None, help=text)
    if not up_help:
        parser.add_argument(
            "--token-file",
            default=None,
            help=t(
                "with --auth: check tokens against this file (`llmesh tokens ... --file`) "
                "instead of etcd (default $LLMESH_TOKEN_FILE)",
                "配合 --auth：按此文件（`llmesh tokens ... --file`）而非 etcd 校验令牌"
                "（默认 $LLMESH_TOKEN_FILE）",
            ),
        )


def add_server_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``up``, ``control-plane``, ``inference-worker`` and ``trainer-worker``.

    Args:
        subparsers: the ``llmesh`` parser's subcommands.
    """
    up = subparsers.add_parser(
        "up",
        help=t(
            "run etcd, the control plane and inference workers on this machine",
            "在本机运行 etcd、控制平面和推理工作节点",
        ),
        description=t(
            "Start a local mesh: etcd (unless --etcd), the control plane and workers.",
            "启动本地网格：etcd（除非指定 --etcd）、控制平面和工作节点。",
        ),
    )
    up.add_argument(
        "--listen", default=DEFAULT_LISTEN, help=t("control plane address", "控制平面地址")
    )
    up.add_argument(
        "--host", default="127.0.0.1", help=t("address the workers bind", "工作节点绑定的地址")
    )
    up.add_argument(
        "--etcd",
        default=None,
        help=t(
            "use this etcd HOST:PORT instead of a child", "使用这个 etcd（HOST:PORT），不启动子进程"
        ),
    )
    up.add_argument(
        "--workers",
        type=int,
        default=1,
        help=t("inference workers to start", "要启动的推理工作节点数"),
    )
    up.add_argument(
        "--trainers",
        type=int,
        default=0,
        help=t("trainer workers to start", "要启动的训练工作节点数"),
    )
    up.add_argument(
        "--jobs-dir",
        default=None,
        help=t(
            "where trainer workers write job outputs (default: ~/.llmesh/jobs)",
            "训练工作节点写入任务输出的目录（默认：~/.llmesh/jobs）",
        ),
    )
    up.add_argument(
        "--worker-cpus",
        type=float,
        default=None,
        help=t("CPUs each worker declares", "每个工作节点声明的 CPU 数"),
    )
    up.add_argument(
        "--worker-gpus",
        type=float,
        default=None,
        help=t("GPUs each worker declares", "每个工作节点声明的 GPU 数"),
    )
    up.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help=t("etcd key namespace", "etcd 键的命名空间")
    )
    up.add_argument(
        "--lease-ttl",
        type=int,
        default=5,
        help=t("worker lease TTL in seconds", "工作节点租约的存活时间（秒）"),
    )
    up.add_argument(
        "--data-dir",
        default=None,
        help=t("keep etcd data here (default: temporary)", "etcd 数据保存目录（默认：临时目录）"),
    )
    add_tls_arguments(up)
    add_etcd_arguments(up)
    _auth_option(up, up_help=True)
    up.add_argument(
        "--no-metrics",
        action="store_true",
        help=t(
            "no /metrics endpoints (each process serves one on a free port by default)",
            "不提供 /metrics 端点（默认每个进程在空闲端口上提供一个）",
        ),
    )
    up.add_argument(
        "--metrics-listen",
        default=None,
        metavar="HOST:PORT",
        help=t(
            "where the control plane's /metrics binds (default: a free port on --listen's host)",
            "控制平面 /metrics 的绑定地址（默认：--listen 主机上的空闲端口）",
        ),
    )
    up.add_argument(
        "--gateway-listen",
        default=DEFAULT_GATEWAY_LISTEN,
        metavar="HOST:PORT",
        help=t(
            f"where the OpenAI-compatible HTTP gateway binds (default {DEFAULT_GATEWAY_LISTEN})",
            f"OpenAI 兼容 HTTP 网关的绑定地址（默认 {DEFAULT_GATEWAY_LISTEN}）",
        ),
    )
    up.add_argument(
        "--no-gateway",
        action="store_true",
        help=t("start no HTTP gateway", "不启动 HTTP 网关"),
    )
    up.set_defaults(func=_cmd_up)

    cpl = subparsers.add_parser(
        "control-plane",
        help=t(
            "run a control plane (stateless; run several against one etcd)",
            "运行控制平面（无状态；可对同一个 etcd 运行多个）",
        ),
    )
    cpl.add_argument("--listen", default=DEFAULT_LISTEN, help=t("address to bind", "绑定的地址"))
    cpl.add_argument(
        "--etcd",
        default=None,
        help=t("etcd HOST:PORT (default $LLMESH_ETCD)", "etcd 地址 HOST:PORT（默认 $LLMESH_ETCD）"),
    )
    cpl.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help=t("etcd key namespace", "etcd 键的命名空间")
    )
    cpl.add_argument(
        "--startup-timeout",
        type=positive_seconds,
        default=10.0,
        help=t(
            "seconds to reach etcd and load the namespace before giving up (default 10; "
            "a namespace of 100,000 keys took 4-5 s on 2 CPUs)",
            "连接 etcd 并载入命名空间的最长秒数（默认 10；10 万个键在 2 个 CPU 上约需 4-5 秒）",
        ),
    )
    add_tls_arguments(cpl)
    add_etcd_arguments(cpl)
    _auth_option(cpl)
    add_metrics_options(cpl)
    cpl.set_defaults(func=_cmd_control_plane)

    def worker_options(parser: argparse.ArgumentParser, worker_id_help: tuple[str, str]) -> None:
        """The options every worker kind takes: where it listens, etcd, id, capacity."""
        parser.add_argument(
            "--listen",
            default="127.0.0.1:0",
            help=t("address to bind (port 0: any)", "绑定的地址（端口 0：任意空闲端口）"),
        )
        parser.add_argument(
            "--advertise",
            default=None,
            help=t(
                "HOST:PORT clients dial (default: bound)",
                "客户端连接的 HOST:PORT（默认：绑定地址）",
            ),
        )
        parser.add_argument(
            "--etcd",
            default=None,
            help=t(
                "etcd HOST:PORT (default $LLMESH_ETCD)", "etcd 地址 HOST:PORT（默认 $LLMESH_ETCD）"
            ),
        )
        parser.add_argument(
            "--namespace",
            default=DEFAULT_NAMESPACE,
            help=t("etcd key namespace", "etcd 键的命名空间"),
        )
        parser.add_argument("--worker-id", default=None, help=t(*worker_id_help))
        parser.add_argument(
            "--cpus",
            type=float,
            default=None,
            help=t("CPUs to declare (default: all)", "声明的 CPU 数（默认：全部）"),
        )
        parser.add_argument(
            "--gpus",
            type=float,
            default=None,
            help=t("GPUs to declare (default: detected)", "声明的 GPU 数（默认：自动检测）"),
        )
        add_tls_arguments(parser)
        add_etcd_arguments(parser)

    iw = subparsers.add_parser(
        "inference-worker", help=t("run an inference worker", "运行推理工作节点")
    )
    worker_options(iw, ("stable id (default: HOSTNAME-PORT)", "固定的节点 id（默认：主机名-端口）"))
    iw.add_argument(
        "--lease-ttl", type=int, default=5, help=t("lease TTL in seconds", "租约存活时间（秒）")
    )
    iw.add_argument(
        "--drain-grace",
        type=float,
        default=30.0,
        help=t("seconds to finish requests", "停机时留给进行中请求的秒数"),
    )
    iw.add_argument(
        "--gpu-ids",
        type=_gpu_ids,
        default=None,
        help=t(
            "GPU ids this worker may use, e.g. 0,1 (wins over --gpus)",
            "本节点可用的 GPU id，如 0,1（优先于 --gpus）",
        ),
    )
    iw.add_argument(
        "--wedge-timeout",
        type=float,
        default=30.0,
        help=t(
            "seconds a replica may hold requests without progress before it is restarted "
            "(0: never)",
            "副本有请求却无进展多少秒后重启（0：不检测）",
        ),
    )
    iw.add_argument(
        "--run-dir",
        default=None,
        help=t(
            "where replica processes keep their spec and log (default: a temporary directory)",
            "副本进程存放配置与日志的目录（默认：临时目录）",
        ),
    )
    _auth_option(iw)
    iw.add_argument(
        "--allow-remote-code",
        action="store_true",
        default=None,
        help=t(
            "let deploys that ask for trust_remote_code run Python code from their model "
            "directory (default $LLMESH_ALLOW_REMOTE_CODE; off)",
            "允许请求 trust_remote_code 的部署运行模型目录中的 Python 代码"
            "（默认 $LLMESH_ALLOW_REMOTE_CODE；关闭）",
        ),
    )
    add_metrics_options(iw)
    iw.set_defaults(func=_cmd_inference_worker)

    tw = subparsers.add_parser(
        "trainer-worker",
        help=t("run a trainer worker (fine-tuning jobs)", "运行训练工作节点（微调任务）"),
    )
    worker_options(
        tw,
        (
            "stable id; a restart with the same id finds its jobs (default: HOSTNAME-PORT)",
            "固定的节点 id；以相同 id 重启可找回其任务（默认：主机名-端口）",
        ),
    )
    tw.add_argument(
        "--jobs-dir",
        default="~/.llmesh/jobs",
        help=t(
            "where a job writes when its spec names no output_dir: JOBS_DIR/JOB_ID",
            "任务未指定 output_dir 时的输出位置：JOBS_DIR/任务ID",
        ),
    )
    tw.add_argument(
        "--lease-ttl", type=int, default=5, help=t("lease TTL in seconds", "租约存活时间（秒）")
    )
    tw.add_argument(
        "--cancel-grace",
        type=float,
        default=10.0,
        help=t(
            "seconds a cancelled job's ranks get before they are killed",
            "取消任务时，其进程被强制结束前的宽限秒数",
        ),
    )
    _auth_option(tw)
    tw.add_argument(
        "--allowed-root",
        action="append",
        default=None,
        help=t(
            "a directory job data, model and output paths must lie under (repeatable; "
            "default $LLMESH_ALLOWED_ROOTS, separated by ':')",
            "任务的数据、模型和输出路径必须位于其下的目录"
            "（可重复；默认 $LLMESH_ALLOWED_ROOTS，以 ':' 分隔）",
        ),
    )
    add_metrics_options(tw)
    tw.set_defaults(func=_cmd_trainer_worker)
