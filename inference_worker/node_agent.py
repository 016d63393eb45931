"""The node agent: this machine's assignments in etcd, one supervised process per replica.

The control plane writes assignments (``{ns}/assignments/{worker}/{model}/{index}``, each with
the device ids it holds); :class:`AssignmentWatcher` follows them and :class:`NodeAgent` makes
the machine match: a :class:`~llmesh.inference_worker.replica_supervisor.ReplicaSupervisor`
(and so a replica process) per base-model replica, adapters loaded into the process of their
base replica with the same index, and processes drained and stopped when their assignment goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aetcd

from llmesh.common.etcd_keys import Keys, decode
from llmesh.common.worker_session import WorkerSession
from llmesh.inference_worker.replica_supervisor import ReplicaSupervisor, SupervisorSettings
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp

log = logging.getLogger(__name__)

ReplicaKey = tuple[str, int, int]  # (model, generation, index)


class NodeAgent:
    """Replica processes of one node, matched to the wanted assignments.

    Args:
        client: the agent's etcd client (reads model records).
        keys: the namespace's key layout.
        worker: this node's worker record.
        session: the lease its replicas' statuses are published under.
        settings: how replica processes are run and supervised.
    """

    def __init__(
        self,
        client: aetcd.Client,
        keys: Keys,
        worker: cp.Worker,
        session: WorkerSession,
        settings: SupervisorSettings,
    ) -> None:
        self.client = client
        self.keys = keys
        self.worker = worker
        self.session = session
        self.settings = settings
        self.supervisors: dict[ReplicaKey, ReplicaSupervisor] = {}
        # Adapter replica -> the supervisor of the base replica whose engine serves it.
        self.adapters: dict[ReplicaKey, ReplicaSupervisor] = {}
        self._stopping: set[ReplicaKey] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._wanted: dict[ReplicaKey, common_pb2.Replica] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    def _spawn(self, coro: object, name: str) -> None:
        task = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def replica_address(self, model: str, index: int = 0) -> str:
        """The address of the process serving ``model`` (a base model or an adapter)."""
        for key, sup in [*self.supervisors.items(), *self.adapters.items()]:
            if key[0] == model and key[2] == index and sup.address:
                return sup.address
        raise LookupError(f"no replica process of {model!r} replica {index} on this node")

    def supervisor_of(self, model: str, index: int = 0) -> ReplicaSupervisor:
        """The supervisor of the process serving ``model`` replica ``index``."""
        for key, sup in [*self.supervisors.items(), *self.adapters.items()]:
            if key[0] == model and key[2] == index:
                return sup
        raise LookupError(f"no replica process of {model!r} replica {index} on this node")

    async def converge(self, wanted: dict[ReplicaKey, common_pb2.Replica]) -> None:
        """Start, load, unload and stop so that this node serves exactly ``wanted``."""
        async with self._lock:
            if self._closed:
                return
            self._wanted = wanted
            await self._converge()

    async def _converge(self) -> None:
        wanted = self._wanted
        for key, base in list(self.adapters.items()):
            if key not in wanted:
                del self.adapters[key]
                self._spawn(base.remove_adapter(key[0], key[1]), name=f"unload-adapter-{key}")
            elif base.key in self._stopping or self.supervisors.get(base.key) is not base:
                # Its base replica is going away (e.g. re-placed): re-home it below.
                del self.adapters[key]
        for key in list(self.supervisors):
            if key not in wanted and key not in self._stopping:
                self._stopping.add(key)
                self._spawn(self._stop(key), name=f"stop-{key}")
        waiting = False
        for key, assignment in sorted(wanted.items()):
            if key in self.supervisors or key in self.adapters or key in self._stopping:
                continue
            got = await self.client.get(self.keys.model(assignment.model))
            if got is None:
                continue  # being undeployed; its assignment delete follows
            model = decode(got.value, cp.Model)
            if model.generation != assignment.generation:
                continue
            if model.base_model:
                base = self._base_for(model.base_model, assignment.index)
                if base is None:
                    waiting = True  # the base's assignment has not arrived yet
                    continue
                self.adapters[key] = base
                self._spawn(base.add_adapter(assignment, model), name=f"load-adapter-{key}")
                continue
            supervisor = ReplicaSupervisor(
                assignment,
                model,
                self.settings,
                publish=self.session.publish_replica,
                remove=self.session.remove_replica,
            )
            self.supervisors[key] = supervisor
            supervisor.start()
        if waiting and self._retry is None:
            loop = asyncio.get_running_loop()
            self._retry = loop.call_later(0.5, self._retry_converge)

    def _retry_converge(self) -> None:
        self._retry = None
        if not self._closed:
            self._spawn(self.converge(dict(self._wanted)), name="converge-retry")

    def _base_for(self, base_model: str, index: int) -> ReplicaSupervisor | None:
        found = [
            sup
            for key, sup in self.supervisors.items()
            if key[0] == base_model and key[2] == index and key not in self._stopping
        ]
        return max(found, key=lambda s: s.assignment.generation) if found else None

    async def _stop(self, key: ReplicaKey) -> None:
        supervisor = self.supervisors[key]
        try:
            await supervisor.stop(drain=self.settings.drain_timeout, forget=False)
        finally:
            if self.supervisors.get(key) is supervisor:
                del self.supervisors[key]
            # Its statuses go before a new supervisor may publish under the same keys; once
            # they are gone, a waiting undeploy returns.
            await supervisor.forget()
            self._stopping.discard(key)
        log.info("stopped replica %s %d (generation %d)", key[0], key[2], key[1])
        # Assigned again while draining (a re-placement keeps the generation): start anew.
        if key in self._wanted and not self._closed:
            await self.converge(dict(self._wanted))

    async def close(self, *, drain: float) -> None:
        """Drain and stop every replica process; wait for stops in progress."""
        async with self._lock:
            self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        for task in list(self._tasks):
            if not task.get_name().startswith(("stop-", "unload-")):
                task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.settings.drain_timeout + 45)
        await asyncio.gather(
            *(sup.stop(drain=drain) for sup in self.supervisors.values()),
            return_exceptions=True,
        )
        self.supervisors.clear()
        self.adapters.clear()


class AssignmentWatcher:
    """Follows this node's assignments in etcd and hands the wanted set to the agent."""

    def __init__(self, client: aetcd.Client, keys: Keys, worker_id: str, agent: NodeAgent) -> None:
        self.client = client
        self.keys = keys
        self.worker_id = worker_id
        self.agent = agent
        self._task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="assignment-watch")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        prefix = self.keys.worker_assignments(self.worker_id)
        backoff = 0.2
        while True:
            try:
                listing = await self.client.get_prefix(prefix)
                revision = listing.header.revision
                wanted: dict[ReplicaKey, common_pb2.Replica] = {}
                for kv in listing:
                    a = decode(kv.value, common_pb2.Replica)
                    wanted[(a.model, a.generation, a.index)] = a
                await self.agent.converge(dict(wanted))
                self.synced.set()
                watch = await self.client.watch_prefix(prefix, start_revision=revision + 1)
                backoff = 0.2
                try:
                    await self._follow(watch, prefix, wanted)
                finally:
                    # Unregister from etcd and aetcd, or the dead watch keeps queueing events.
                    with contextlib.suppress(Exception):
                        await watch.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd outage: keep serving, retry
                log.warning("assignment watch failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _follow(
        self, watch: object, prefix: bytes, wanted: dict[ReplicaKey, common_pb2.Replica]
    ) -> None:
        async for event in watch:  # type: ignore[attr-defined]
            key = event.kv.key
            if event.kind == aetcd.rtypes.EventKind.PUT:
                a = decode(event.kv.value, common_pb2.Replica)
                wanted[(a.model, a.generation, a.index)] = a
                # A new generation at the same index replaces the old one.
                for k in list(wanted):
                    if k[0] == a.model and k[2] == a.index and k[1] != a.generation:
                        wanted.pop(k)
            else:
                model, index = key.decode()[len(prefix.decode()) :].rsplit("/", 1)
                for k in list(wanted):
                    if k[0] == model and k[2] == int(index):
                        wanted.pop(k)
            await self.agent.converge(dict(wanted))
