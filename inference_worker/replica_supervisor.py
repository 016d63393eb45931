"""One replica process, supervised by its node agent: start, watch, restart, stop.

The supervisor starts the process with the replica's devices in ``CUDA_VISIBLE_DEVICES``, reads
its ``WatchReplica`` stream and publishes what it reports (state, in-flight, and the process's
own address, pid and devices) under the agent's etcd lease. It also tells the process which
LoRA adapters to load. When the process exits, stops reporting, or has requests in flight and
makes no progress for ``wedge_timeout`` seconds, the supervisor takes it out of routing at once
(LOADING, with the reason), kills it and starts it again with backoff; after ``max_restarts``
crashes within ``crash_window`` seconds it reports FAILED with the last lines of its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from llmesh.common.auth_client import aio_token_interceptors
from llmesh.common.etcd_security import without_etcd_credentials
from llmesh.common.grpc_server import CHANNEL_OPTIONS
from llmesh.common.metrics import enum_name
from llmesh.common.tls import ENV_NAMES, INSECURE_ENV, TlsConfig, aio_channel
from llmesh.inference_worker.replica_process import ReplicaSpec
from llmesh.v1 import common_pb2, replica_service_pb2_grpc
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import replica_service_pb2 as rs

log = logging.getLogger(__name__)

LOADING = common_pb2.REPLICA_STATE_LOADING
READY = common_pb2.REPLICA_STATE_READY
FAILED = common_pb2.REPLICA_STATE_FAILED
DRAINING = common_pb2.REPLICA_STATE_DRAINING

Publish = Callable[[common_pb2.Replica], Awaitable[None]]

# A run that stayed up this long was healthy: the next crash restarts without a long backoff.
_HEALTHY_RUN_S = 60.0


def process_exit(proc: subprocess.Popen[bytes]) -> asyncio.Future[int]:
    """A future that resolves to the exit code when ``proc`` exits (reaping it).

    Waits on a pidfd with the event loop, not in a thread: a thread per live replica would
    exhaust asyncio's default executor on a node with many replicas.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    if proc.poll() is not None:
        done.set_result(proc.returncode)
        return done
    fd = os.pidfd_open(proc.pid)

    def exited() -> None:
        if proc.poll() is None:
            return  # woken without an exit; the pidfd stays readable once it happens
        loop.remove_reader(fd)
        os.close(fd)
        if not done.done():
            done.set_result(proc.returncode)

    def cancelled(fut: asyncio.Future[int]) -> None:
        if fut.cancelled():
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
                os.close(fd)

    loop.add_reader(fd, exited)
    done.add_done_callback(cancelled)
    return done


async def _call_quietly(call: Awaitable[object]) -> None:
    """An RPC to a replica process that may be dying: its failures do not matter here.

    Closing the channel under an RPC cancels it with CancelledError rather than RpcError; that
    one is swallowed too unless this task itself is being cancelled.
    """
    try:
        await call
    except grpc.RpcError:
        pass
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


@dataclass
class SupervisorSettings:
    """How a node agent supervises its replica processes.

    Args:
        run_dir: where each replica's spec, address file and log live.
        listen_host: the host replica processes bind (loopback unless told otherwise).
        advertise_host: the host clients dial, when it differs from ``listen_host``.
        wedge_timeout: seconds with requests in flight and no progress (or no report at all)
            before a replica counts as wedged and is restarted.
        heartbeat: seconds between the replica's reports when nothing changes.
        max_restarts: crashes within ``crash_window`` before the replica is FAILED for good.
        crash_window: seconds.
        backoff_max: the longest wait before a restart, in seconds.
        stop_grace: seconds a stopping replica gets between SIGTERM and SIGKILL.
        drain_timeout: seconds an undeployed replica's requests get to finish.
        env: extra environment variables for replica processes.
        tls: the agent's TLS settings: replica processes serve with them (given through
            ``LLMESH_TLS_*``), and the supervisor's channel to each replica uses them.
        insecure: replica processes may bind beyond loopback without TLS (``LLMESH_INSECURE``).
        token_file: the token records file replica processes check bearer tokens against
            (the agent keeps it current); None serves without tokens.
        token: the agent's own admin token, sent on its calls to the replicas.
        allow_remote_code: replicas may load models whose deploy asks for trust_remote_code.
    """

    run_dir: Path
    listen_host: str = "127.0.0.1"
    advertise_host: str = ""
    wedge_timeout: float = 30.0
    heartbeat: float = 1.0
    max_restarts: int = 5
    crash_window: float = 300.0
    backoff_max: float = 30.0
    stop_grace: float = 10.0
    drain_timeout: float = 30.0
    env: dict[str, str] = field(default_factory=dict)
    tls: TlsConfig | None = None
    insecure: bool = False
    token_file: Path | None = None
    token: str | None = field(default=None, repr=False)
    allow_remote_code: bool = False
    # Whether replica processes serve /metrics (a free port on listen_host).
    metrics: bool = True

    def tls_env(self) -> dict[str, str | None]:
        """What a replica's environment must say about TLS: set, or removed (None)."""
        out: dict[str, str | None] = dict.fromkeys(ENV_NAMES)
        if self.tls is not None:
            out.update(self.tls.to_env())
        out[INSECURE_ENV] = "1" if self.insecure else None
        return out


class ReplicaSupervisor:
    """Runs and watches the process of one base-model replica and the adapters riding on it.

    Args:
        assignment: the replica as assigned (model, index, generation, worker, devices).
        model: the model record.
        settings: the agent's supervision settings.
        publish: writes a replica's status to etcd (under the agent's lease).
        remove: deletes a replica's status from etcd.
    """

    def __init__(
        self,
        assignment: common_pb2.Replica,
        model: cp.Model,
        settings: SupervisorSettings,
        *,
        publish: Publish,
        remove: Publish,
    ) -> None:
        self.assignment = assignment
        self.model = model
        self.settings = settings
        self._publish = publish
        self._remove = remove
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.metrics_url = ""
        self.adapters: dict[tuple[str, int], tuple[common_pb2.Replica, cp.Model]] = {}
        self._loaded: set[tuple[str, int]] = set()
        self._published: dict[tuple[str, int], common_pb2.Replica] = {}
        self._channel: grpc.aio.Channel | None = None
        self._stub: replica_service_pb2_grpc.ReplicaServiceStub | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._crashes: deque[float] = deque()
        self._failure = ""  # why the engine failed to load, once it has
        self._adapter_lock = asyncio.Lock()
        self.restarts = 0
        name = f"{model.name}-{assignment.index}-g{assignment.generation}"
        self.dir = settings.run_dir / name
        self.log_path = self.dir / "replica.log"

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.assignment.model, self.assignment.generation, self.assignment.index)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else 0

    def state_name(self) -> str:
        """The state last published for the base replica (e.g. ``READY``), for metrics."""
        status = self._published.get((self.model.name, self.assignment.generation))
        state = status.state if status is not None else LOADING
        return enum_name(common_pb2.ReplicaState, state, "REPLICA_STATE_")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"supervise-{self.dir.name}")

    # ---- etcd ------------------------------------------------------------------------------

    def _status(
        self, base: common_pb2.Replica | None = None, **fields: object
    ) -> common_pb2.Replica:
        out = common_pb2.Replica()
        if base is not None:
            out.CopyFrom(base)
        else:
            out.model = self.assignment.model
            out.index = self.assignment.index
            out.generation = self.assignment.generation
        out.worker_id = self.assignment.worker_id
        out.address = self.address
        out.metrics_url = self.metrics_url
        out.pid = self.pid
        del out.devices[:]
        out.devices.extend(self.assignment.devices)
        for name, value in fields.items():
            setattr(out, name, value)
        return out

    async def _report(self, replica: common_pb2.Replica) -> None:
        key = (replica.model, replica.generation)
        old = self._published.get(key)
        if old is not None and old == replica:
            return
        self._published[key] = replica
        await self._publish(replica)

    async def _report_down(self, state: int, reason: str) -> None:
        """Take the base replica and its adapters out of routing (not READY), with the reason."""
        await self._report(self._status(state=state, reason=reason, inflight=0))
        for assignment, _ in self.adapters.values():
            await self._report(
                self._status(
                    assignment,
                    state=state,
                    reason=f"base model {self.model.name!r} replica: {reason}",
                    inflight=0,
                    address=self.address,
                )
            )

    # ---- adapters --------------------------------------------------------------------------

    async def add_adapter(self, assignment: common_pb2.Replica, model: cp.Model) -> None:
        """Serve an adapter from this replica's engine (now, and after every restart)."""
        key = (model.name, assignment.generation)
        self.adapters[key] = (assignment, model)
        if self._failure:
            # The base failed to load: the adapter cannot load either, say so at once.
            await self._report(
                self._status(
                    assignment,
                    state=FAILED,
                    reason=f"base model {self.model.name!r} replica failed: {self._failure}",
                    inflight=0,
                )
            )
            return
        async with self._adapter_lock:
            await self._load_adapters()

    async def remove_adapter(self, name: str, generation: int) -> None:
        """Drain an adapter's requests and unload it; its status leaves etcd."""
        async with self._adapter_lock:
            entry = self.adapters.pop((name, generation), None)
            if entry is None:
                return
            if (name, generation) in self._loaded and self._stub is not None:
                self._loaded.discard((name, generation))
                await _call_quietly(
                    self._stub.UnloadAdapter(
                        rs.UnloadAdapterRequest(model=name, generation=generation), timeout=60
                    )
                )
            published = self._published.pop((name, generation), None)
            await self._remove(published or self._status(entry[0]))

    async def _load_adapters(self) -> None:
        if self._stub is None:
            return
        for key, (assignment, model) in list(self.adapters.items()):
            if key in self._loaded:
                continue
            self._loaded.add(key)
            try:
                await self._stub.LoadAdapter(
                    rs.LoadAdapterRequest(model=model, assignment=assignment), timeout=30
                )
            except (grpc.RpcError, asyncio.CancelledError) as err:
                self._loaded.discard(key)
                if isinstance(err, asyncio.CancelledError):
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                log.warning("loading adapter %s into %s failed: %s", key[0], self.dir.name, err)

    # ---- the process -----------------------------------------------------------------------

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        address_file = self.dir / "address.json"
        address_file.unlink(missing_ok=True)
        share = self.model.gpus_per_replica if 0 < self.model.gpus_per_replica < 1 else 0.0
        host = self.settings.listen_host
        spec = ReplicaSpec(
            model=self.model,
            assignment=self.assignment,
            listen=f"[{host}]:0" if ":" in host else f"{host}:0",
            address_file=address_file,
            advertise_host=self.settings.advertise_host,
            gpu_share=share,
            token_file=self.settings.token_file,
            allow_remote_code=self.settings.allow_remote_code,
            metrics_listen=None if self.settings.metrics else "off",
        )
        spec_path = self.dir / "spec.json"
        spec_path.write_text(spec.to_json())
        # No etcd credentials: the replica has no etcd, and it runs the model's own code.
        env = without_etcd_credentials({**os.environ, **self.settings.env})
        env.pop("LLMESH_TOKEN", None)  # a replica calls nobody; the agent's token stays its own
        # The agent's own settings, explicitly: an inherited LLMESH_TLS_* must not make the
        # replica serve differently from what the agent dials.
        for name, value in self.settings.tls_env().items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        # The replica sees only its own devices, numbered as nvidia-smi numbers them; none at
        # all when it holds none.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(self.assignment.devices)
        log_file = open(self.log_path, "ab")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "llmesh.inference_worker.replica_process", str(spec_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                # Not a session of its own: on a small machine a busy-waiting engine (vLLM-CPU)
                # in the same autogroup as the replica's gRPC front starves it (measured: half
                # the throughput). The replica ignores SIGINT instead, so a terminal's Ctrl-C
                # reaches the agent, which drains and stops its replicas in order.
            )
        finally:
            log_file.close()

    async def _wait_address(
        self, proc: subprocess.Popen[bytes], exited: asyncio.Future[int]
    ) -> dict[str, str] | None:
        path = self.dir / "address.json"
        while not exited.done():
            if path.exists():
                return dict(json.loads(path.read_text()))
            await asyncio.wait([exited], timeout=0.05)
        return None

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    async def _run(self) -> None:
        backoff = 0.5
        reason = ""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            try:
                outcome = await self._run_once(reason)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("supervising replica %s failed", self.dir.name)
                await self._report_down(FAILED, f"the node agent could not run it: {exc}")
                return
            if self._stopping:
                return
            if outcome is None:
                # The engine failed to load: FAILED with its reason, no restart.
                await self._report_down(FAILED, self._failure)
                return
            now = loop.time()
            if now - started > _HEALTHY_RUN_S:
                backoff = 0.5
            self._crashes.append(now)
            while self._crashes and now - self._crashes[0] > self.settings.crash_window:
                self._crashes.popleft()
            if len(self._crashes) > self.settings.max_restarts:
                reason = (
                    f"{outcome}; restarted {len(self._crashes) - 1} times within "
                    f"{self.settings.crash_window:g} s, giving up. Last log lines:\n"
                    f"{self.log_tail()}"
                )
                log.warning("replica %s FAILED: %s", self.dir.name, outcome)
                await self._report_down(FAILED, reason)
                return
            reason = f"restarting: {outcome}"
            log.warning("replica %s: %s; restarting in %.1fs", self.dir.name, outcome, backoff)
            await self._report_down(LOADING, reason)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.settings.backoff_max)
            self.restarts += 1

    async def _run_once(self, reason: str) -> str | None:
        """Run the process until it dies or wedges.

        Returns:
            Why it ended, or None when it must not be restarted (its engine failed to load;
            the reason is in ``self._failure``).
        """
        self.address = ""
        self.metrics_url = ""
        self._loaded.clear()
        proc = self.proc = self._spawn()
        exited = process_exit(proc)
        await self._report(self._status(state=LOADING, reason=reason, inflight=0))
        outcome: str | None = None
        try:
            where = await self._wait_address(proc, exited)
            if where is None:
                return f"replica process exited with code {proc.returncode} before serving"
            self.address = where["address"]
            self.metrics_url = where.get("metrics_url", "")
            # The replica serves the agent's own certificate, which must therefore name the
            # loopback address dialled here (README, TLS): no target-name override, so a
            # certificate is never accepted for a name it does not carry.
            self._channel = aio_channel(
                where.get("control_address", self.address),
                self.settings.tls,
                CHANNEL_OPTIONS,
                aio_token_interceptors(self.settings.token),
            )
            self._stub = replica_service_pb2_grpc.ReplicaServiceStub(self._channel)
            outcome = await self._watch(proc, exited)
            if outcome is not None and not self._stopping:
                # Out of routing before the kill: a dying process may take a while to go.
                await self._report_down(LOADING, f"restarting: {outcome}")
            return outcome
        finally:
            self._stub = None
            if self._channel is not None:
                await self._channel.close(None)
                self._channel = None
            if not self._stopping and proc.poll() is None:
                # Wedged, or its engine failed: the process must not linger. (A stop sends
                # its own SIGTERM, then SIGKILL.)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
            if not self._stopping:
                done, _ = await asyncio.wait([exited], timeout=30)
                if not done:
                    log.error("replica %s pid %d survived SIGKILL", self.dir.name, proc.pid)

    async def _watch(
        self, proc: subprocess.Popen[bytes], exited: asyncio.Future[int]
    ) -> str | None:
        assert self._stub is not None
        stream = self._stub.WatchReplica(
            rs.WatchReplicaRequest(heartbeat_seconds=self.settings.heartbeat)
        )
        # The stream is read by its own task into a queue: cancelling a wait on a queue is
        # harmless, cancelling a read of the stream would end the call.
        inbox: asyncio.Queue[rs.WatchReplicaResponse | BaseException | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for message in stream:
                    inbox.put_nowait(message)
                inbox.put_nowait(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the watcher
                inbox.put_nowait(exc)

        reader = asyncio.create_task(read(), name=f"watch-{self.dir.name}")
        loop = asyncio.get_running_loop()
        last_report = loop.time()
        last_progress, progress_since = -1, loop.time()
        wedge = self.settings.wedge_timeout
        watching = wedge > 0  # 0 turns wedge detection off
        # Loading may hold the process's event loop for long stretches (imports, weights), so
        # silence counts as a wedge only once the replica has served.
        served = False
        try:
            while True:
                nxt = asyncio.ensure_future(inbox.get())
                done, _ = await asyncio.wait(
                    [nxt, exited],
                    timeout=min(wedge, 1.0) if watching else 1.0,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                now = loop.time()
                if exited in done:
                    nxt.cancel()
                    return f"replica process exited with code {proc.returncode}"
                if nxt not in done:
                    nxt.cancel()
                    if watching and served and now - last_report > wedge:
                        return f"replica process sent no report for {wedge:g} s (wedged)"
                    continue
                message = nxt.result()
                if message is None or isinstance(message, BaseException):
                    # A dying process breaks the stream a moment before its exit is seen.
                    await asyncio.wait([exited], timeout=1.0)
                    if exited.done():
                        return f"replica process exited with code {proc.returncode}"
                    if message is None:
                        return "replica process closed its status stream"
                    code = message.code().name if isinstance(message, grpc.RpcError) else message
                    return f"replica status stream failed: {code}"
                last_report = now
                served = served or any(
                    r.state == READY and r.model == self.model.name for r in message.replicas
                )
                if message.progress != last_progress or message.inflight == 0:
                    last_progress, progress_since = message.progress, now
                elif watching and now - progress_since > wedge:
                    return (
                        f"engine made no progress for {wedge:g} s with {message.inflight} "
                        "request(s) in flight (wedged)"
                    )
                if await self._relay(message):
                    return None
        finally:
            stream.cancel()
            reader.cancel()

    async def _relay(self, message: rs.WatchReplicaResponse) -> bool:
        """Publish what the process reports; True when its base replica FAILED to load."""
        base: common_pb2.Replica | None = None
        for replica in message.replicas:
            if replica.model == self.model.name and replica.index == self.assignment.index:
                base = replica
                continue
            # Only adapters the agent still wants: a late snapshot must not bring back the
            # status of one it has just removed.
            if (replica.model, replica.generation) in self.adapters:
                await self._report(self._status(replica))
        if base is None:
            return False
        if base.state == FAILED:
            self._failure = base.reason or "the engine failed to load"
            return True
        await self._report(self._status(base))
        if base.state == READY:
            async with self._adapter_lock:
                await self._load_adapters()
        return False

    # ---- stopping --------------------------------------------------------------------------

    async def stop(self, *, drain: float = 30.0, forget: bool = True) -> None:
        """Drain (bounded), stop the process (SIGTERM, then SIGKILL) and remove its statuses.

        Args:
            drain: seconds in-flight requests get to finish.
            forget: remove the statuses from etcd now; otherwise call :meth:`forget` later.
        """
        self._stopping = True
        proc = self.proc
        if self._stub is not None and proc is not None and proc.poll() is None:
            await self._report(self._status(state=DRAINING, inflight=0))
            await _call_quietly(
                self._stub.Drain(rs.DrainRequest(timeout_seconds=drain), timeout=drain + 5)
            )
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            exited = process_exit(proc)
            done, _ = await asyncio.wait([exited], timeout=self.settings.stop_grace)
            if not done:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.wait([exited], timeout=30)
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])
        if forget:
            await self.forget()

    async def forget(self) -> None:
        """Remove every status this supervisor published (the replica is gone)."""
        for replica in list(self._published.values()):
            await self._remove(replica)
        self._published.clear()
