"""The replicas a replica process hosts: one engine, the LoRA adapters riding on it, their slots.

:class:`ReplicaManager` loads the engine, counts requests against its concurrency limit, keeps
the request-id index for ``Abort``, and reports each replica's state (LOADING → READY / FAILED,
DRAINING) and in-flight count to a :class:`StatusSink`: in a replica process that is the board
its node agent watches (``ReplicaService.WatchReplica``), which publishes it in etcd.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from llmesh.common.auth import current_principal
from llmesh.common.backends import (
    DEFAULT_QUEUE_FACTOR,
    DEFAULT_QUEUE_TIMEOUT_S,
    check_infer_params,
)
from llmesh.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from llmesh.common.metrics import ReplicaMetrics
from llmesh.inference_worker.engines.base import Engine, EngineConfig
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp

log = logging.getLogger(__name__)

READY = common_pb2.REPLICA_STATE_READY
LOADING = common_pb2.REPLICA_STATE_LOADING
FAILED = common_pb2.REPLICA_STATE_FAILED
DRAINING = common_pb2.REPLICA_STATE_DRAINING

ReplicaKey = tuple[str, int, int]  # (model, generation, index)


class AbortedWhileQueued(Exception):
    """A request left the admission queue by cancel or Abort before it reached the engine."""


@dataclass(eq=False)
class _Waiter:
    """One request in a replica's admission queue; ``granted`` resolves when it gets a slot.

    ``replica`` is the replica the request is for: an adapter's requests wait in their base's
    queue but count as the adapter's waiting requests.
    """

    request_id: str | None
    granted: asyncio.Future[None]
    replica: ReplicaKey | None = None


class StatusSink(Protocol):
    """Where a replica's status goes each time it changes."""

    async def publish_replica(self, replica: common_pb2.Replica) -> None: ...

    async def remove_replica(self, replica: common_pb2.Replica) -> None: ...


@dataclass
class HostedReplica:
    """One engine instance serving one replica of a model."""

    status: common_pb2.Replica
    model: cp.Model
    engine: Engine | None = None
    inflight: int = 0
    served: int = 0  # requests admitted since load, for stats and tests
    aborted: int = 0  # streams that ended "aborted" (cancel, Abort, disconnect, deadline, stop)
    request_ids: set[str] = field(default_factory=set)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    # A LoRA adapter replica shares its base replica's engine and names itself in every
    # request; it never starts or stops the engine.
    lora: str | None = None
    base: HostedReplica | None = None
    # Requests on this replica's engine, its adapters' included (the engine's real load).
    engine_load: int = 0
    # The admission queue of the engine (on the base replica; adapters wait in their base's):
    # requests beyond max_concurrency wait here in FIFO order for a slot.
    queue: collections.deque[_Waiter] = field(default_factory=collections.deque)
    max_queue: int = 0
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_S
    # Mean seconds a request holds a slot (moving average), for the back-off a full queue names.
    hold_s: float = 1.0

    @property
    def key(self) -> ReplicaKey:
        return (self.status.model, self.status.generation, self.status.index)

    @property
    def ready(self) -> bool:
        return self.status.state == READY and self.engine is not None


class ReplicaManager:
    """The replicas of one replica process, their concurrency slots and the request-id index.

    Args:
        session: where replica status goes.
        engine_factory: builds an engine from an EngineConfig (``engines.create_engine``).
        publish_interval: in-flight counts are published at most this often, in seconds.
    """

    def __init__(
        self,
        session: StatusSink,
        engine_factory: Callable[[EngineConfig], Engine],
        *,
        publish_interval: float = 0.2,
        drain_timeout: float = 30.0,
        adapter_wait: float = 600.0,
        metrics: ReplicaMetrics | None = None,
    ) -> None:
        self.session = session
        self.engine_factory = engine_factory
        self.publish_interval = publish_interval
        self.drain_timeout = drain_timeout
        self.adapter_wait = adapter_wait
        self.replicas: dict[ReplicaKey, HostedReplica] = {}
        self.requests: dict[str, HostedReplica] = {}
        # Request id -> the token id that started it ("" without tokens): Abort by id is for
        # the request's own caller (or an admin), see InferenceServicer.Abort.
        self.owners: dict[str, str] = {}
        # Output chunks produced by the engine since start: the agent's sign of life for it.
        self.progress = 0
        # Set by drain_all: the process is stopping, so calls cut off now end by shutdown.
        self.stopping = False
        self._dirty: set[ReplicaKey] = set()
        self._dirty_event = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._publisher = asyncio.create_task(self._publish_loop(), name="load-publisher")
        self.metrics = metrics or ReplicaMetrics()
        self.metrics.watch_load(asyncio.get_running_loop(), self._load_sample)

    def _load_sample(self) -> list[tuple[str, int, int, int]]:
        """(model, index, running, waiting) per replica, for the metrics (read at scrape)."""
        waiting: dict[ReplicaKey, int] = {}
        for r in self.replicas.values():
            for waiter in r.queue:  # a base's queue holds its adapters' waiters too
                key = waiter.replica or r.key
                waiting[key] = waiting.get(key, 0) + 1
        return [
            (r.status.model, r.status.index, r.inflight, waiting.get(key, 0))
            for key, r in self.replicas.items()
        ]

    # ---- lookups used by the servicer -------------------------------------------------------

    def find(self, model: str, replica: int | None = None) -> HostedReplica:
        """The READY replica of ``model`` with the fewest in-flight requests (or the pinned one)."""
        hosted = [r for r in self.replicas.values() if r.status.model == model]
        if replica is not None:
            hosted = [r for r in hosted if r.status.index == replica]
        if not hosted:
            where = f"replica {replica} of model" if replica is not None else "model"
            raise NotFound(
                f"{where} {model!r} is not served by this replica process; ask the control plane "
                "(AssignWorker) which worker serves it"
            )
        ready = [r for r in hosted if r.ready]
        if not ready:
            r = max(hosted, key=lambda h: h.status.generation)
            state = common_pb2.ReplicaState.Name(r.status.state).removeprefix("REPLICA_STATE_")
            if r.status.state == DRAINING:
                # Retryable: the client should go to another replica (its routes lag a little).
                raise Unavailable(
                    f"model {model!r} is draining on this replica process; retry on another replica"
                )
            reason = f": {r.status.reason}" if r.status.reason else ""
            raise FailedPrecondition(f"model {model!r} is {state} on this replica process{reason}")
        newest = max(r.status.generation for r in ready)
        return min((r for r in ready if r.status.generation == newest), key=lambda r: r.inflight)

    @contextlib.asynccontextmanager
    async def slot(
        self, replica: HostedReplica, request_id: str | None = None
    ) -> AsyncIterator[None]:
        """Hold one of the replica's concurrency slots for the duration of a request.

        When all ``max_concurrency`` slots are taken the request waits in the replica's FIFO
        admission queue (``max_queue`` long, at most ``queue_timeout`` seconds); a slot that
        frees goes to the head of the queue directly.

        Raises:
            Unavailable: the replica is draining (or started draining while the request waited).
            ResourceExhausted: the queue is full, or the wait ran past ``queue_timeout``.
            AlreadyExists: ``request_id`` is running (or waiting) already.
            AbortedWhileQueued: cancelled by :meth:`abort` while waiting.
        """
        if not replica.ready:
            raise Unavailable(
                f"model {replica.status.model!r} is draining on this replica process; "
                "retry on another replica"
            )
        if request_id is not None and request_id in self.requests:
            raise AlreadyExists(
                f"request id {request_id!r} is already running; use a unique request_id"
            )
        # Adapters share their base replica's engine, so they share its slots and its queue.
        owner = replica.base or replica
        if request_id is not None:
            self.requests[request_id] = replica
            principal = current_principal()  # the caller's, inherited by the request's task
            self.owners[request_id] = principal.id if principal is not None else ""
            replica.request_ids.add(request_id)
        try:
            if owner.engine_load >= replica.status.max_concurrency or owner.queue:
                await self._wait_in_line(replica, owner, request_id)
            else:
                owner.engine_load += 1
        except BaseException:
            if request_id is not None:
                self.requests.pop(request_id, None)
                self.owners.pop(request_id, None)
                replica.request_ids.discard(request_id)
            raise
        replica.inflight += 1
        replica.served += 1
        replica.idle.clear()
        self._mark(replica)
        began = time.monotonic()
        try:
            yield
        finally:
            replica.inflight -= 1
            if request_id is not None:
                self.requests.pop(request_id, None)
                self.owners.pop(request_id, None)
                replica.request_ids.discard(request_id)
            if replica.inflight == 0:
                replica.idle.set()
            owner.hold_s += (time.monotonic() - began - owner.hold_s) * 0.1
            self._release(owner)
            self._mark(replica)

    async def _wait_in_line(
        self, replica: HostedReplica, owner: HostedReplica, request_id: str | None
    ) -> None:
        """Queue for one of ``owner``'s engine slots; returns holding it."""
        if len(owner.queue) >= owner.max_queue:
            limit = replica.status.max_concurrency
            backoff = max(0.1, owner.hold_s * (len(owner.queue) + 1) / max(limit, 1))
            self.metrics.resource_exhausted(
                replica.status.model, replica.status.index, "queue_full"
            )
            raise ResourceExhausted(
                f"model {replica.status.model!r} replica {replica.status.index} is full: "
                f"{owner.engine_load} requests running (max_concurrency {limit}) and "
                f"{len(owner.queue)} waiting (max_queue {owner.max_queue}); back off about "
                f"{backoff:.1f} s and retry, deploy more replicas (--num_workers) or raise "
                "infer_params max_concurrency / max_queue"
            )
        waiter = _Waiter(request_id, asyncio.get_running_loop().create_future(), replica.key)
        owner.queue.append(waiter)
        self._mark(replica)
        try:
            async with asyncio.timeout(owner.queue_timeout):
                await waiter.granted
        except BaseException as exc:
            granted = waiter.granted
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                self._release(owner)  # granted just as the wait ended: pass the slot on
            if isinstance(exc, TimeoutError):
                self.metrics.resource_exhausted(
                    replica.status.model, replica.status.index, "queue_timeout"
                )
                raise ResourceExhausted(
                    f"request {request_id or '?'} waited {owner.queue_timeout:g} s in the queue "
                    f"of model {replica.status.model!r} replica {replica.status.index} without "
                    "a free slot; retry later or on another replica, or deploy more replicas"
                ) from None
            raise
        finally:
            with contextlib.suppress(ValueError):
                owner.queue.remove(waiter)
            self._mark(replica)

    def _release(self, owner: HostedReplica) -> None:
        """Give a freed slot of ``owner``'s engine to the head of its queue, or free it."""
        while owner.queue:
            waiter = owner.queue.popleft()
            if not waiter.granted.done():
                waiter.granted.set_result(None)  # the slot moves over: engine_load stays
                return
        owner.engine_load -= 1

    def fail_queue(self, owner: HostedReplica, error: BaseException) -> None:
        """Fail every request waiting for ``owner``'s engine (it is draining or unloading)."""
        while owner.queue:
            waiter = owner.queue.popleft()
            if not waiter.granted.done():
                waiter.granted.set_exception(error)

    async def abort(self, request_id: str) -> bool:
        """Stop a request by id: take it out of its queue, or abort it in the engine."""
        replica = self.requests.get(request_id)
        if replica is None:
            return False
        owner = replica.base or replica
        for waiter in owner.queue:
            if waiter.request_id == request_id and not waiter.granted.done():
                waiter.granted.set_exception(AbortedWhileQueued(request_id))
                return True
        if replica.engine is None:
            return False
        return await replica.engine.abort(request_id)

    def queued(self, replica: HostedReplica) -> int:
        """Requests waiting for ``replica``'s engine (its base's queue for an adapter)."""
        return len((replica.base or replica).queue)

    # ---- load / unload ----------------------------------------------------------------------

    def _mark(self, replica: HostedReplica) -> None:
        self._dirty.add(replica.key)
        self._dirty_event.set()

    async def _publish_loop(self) -> None:
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            keys, self._dirty = self._dirty, set()
            for key in keys:
                r = self.replicas.get(key)
                if r is None:
                    continue
                queued = self.queued(r)
                if r.status.inflight != r.inflight or r.status.queued != queued:
                    r.status.inflight = r.inflight
                    r.status.queued = queued
                    await self.session.publish_replica(r.status)
            # Rate-limit: under load the count changes per request, etcd needn't see each one.
            await asyncio.sleep(self.publish_interval)

    def spawn(self, coro: object, name: str) -> None:
        task = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adapter_engine(self, hosted: HostedReplica) -> HostedReplica | None:
        """Wait for the READY base replica an adapter replica rides on (same index).

        Returns None when the adapter was unassigned meanwhile; raises FailedPrecondition
        when the base failed or does not come up.
        """
        base, index = hosted.model.base_model, hosted.status.index
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.adapter_wait
        while True:
            if self.replicas.get(hosted.key) is not hosted:
                return None
            candidates = [
                r
                for r in self.replicas.values()
                if r.status.model == base and r.status.index == index and r.base is None
            ]
            ready = [r for r in candidates if r.ready]
            if ready:
                return max(ready, key=lambda r: r.status.generation)
            failed = [r for r in candidates if r.status.state == FAILED]
            if failed:
                raise FailedPrecondition(
                    f"base model {base!r} replica {index} failed on this replica process: "
                    f"{failed[0].status.reason}"
                )
            if loop.time() > deadline:
                raise FailedPrecondition(
                    f"base model {base!r} replica {index} was not READY in this replica "
                    f"process within {self.adapter_wait:g} s"
                )
            await asyncio.sleep(0.1)

    async def _load_adapter(self, hosted: HostedReplica) -> None:
        status, model = hosted.status, hosted.model
        try:
            base = await self._adapter_engine(hosted)
            if base is None:
                return
            # A previous deployment of this adapter may still be draining on the same engine
            # (undeploy without wait, then deploy again): its name is free once it unloads.
            while any(
                r is not hosted and r.base is base and r.lora == model.name
                for r in self.replicas.values()
            ):
                if self.replicas.get(hosted.key) is not hosted:
                    return
                await asyncio.sleep(0.1)
            if not base.ready:
                raise FailedPrecondition(
                    f"base model {model.base_model!r} replica {status.index} is unloading"
                )
            assert base.engine is not None
            await base.engine.add_lora(model.name, model.model_path)
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - any load error is reported as FAILED
            log.warning("loading adapter %s replica %d failed: %s", model.name, status.index, exc)
            if self.replicas.get(hosted.key) is not hosted:
                return
            status.state = FAILED
            status.reason = str(exc) or type(exc).__name__
            await self.session.publish_replica(status)
            return
        if self.replicas.get(hosted.key) is not hosted or not base.ready:
            with contextlib.suppress(Exception):
                await base.engine.remove_lora(model.name)
            if self.replicas.get(hosted.key) is hosted:
                status.state = FAILED
                status.reason = (
                    f"base model {model.base_model!r} replica {status.index} unloaded while the "
                    "adapter was loading"
                )
                await self.session.publish_replica(status)
            return
        hosted.engine, hosted.base, hosted.lora = base.engine, base, model.name
        status.max_concurrency = base.status.max_concurrency
        status.state = READY
        await self.session.publish_replica(status)
        log.info("adapter %s READY on %s replica %d", model.name, base.status.model, status.index)

    async def load(self, assignment: common_pb2.Replica, model: cp.Model, address: str) -> None:
        """Load one replica: publish LOADING, start the engine, publish READY or FAILED.

        An adapter (``model.base_model`` set) is loaded into the running engine of this
        worker's replica of the base model with the same index, without a restart.
        """
        status = common_pb2.Replica(
            model=assignment.model,
            index=assignment.index,
            worker_id=assignment.worker_id,
            address=address,
            state=LOADING,
            generation=assignment.generation,
        )
        hosted = HostedReplica(status=status, model=model)
        hosted.idle.set()
        if hosted.key in self.replicas:
            return
        self.replicas[hosted.key] = hosted
        await self.session.publish_replica(status)
        log.info(
            "loading %s replica %d (%s, %s)",
            model.name,
            status.index,
            model.backend,
            model.model_path,
        )
        if model.base_model:
            await self._load_adapter(hosted)
            return
        engine: Engine | None = None
        try:
            engine = self.engine_factory(
                EngineConfig(
                    model_name=model.name,
                    model_path=model.model_path,
                    backend=model.backend or "transformers",
                    infer_params=dict(model.infer_params),
                )
            )
            await engine.start()
        except BaseException as exc:
            # A half-loaded engine may hold weights: free them before reporting.
            if engine is not None:
                with contextlib.suppress(Exception):
                    await engine.stop()
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
            log.warning("loading %s replica %d failed: %s", model.name, status.index, exc)
            if self.replicas.get(hosted.key) is not hosted:
                return  # unassigned meanwhile: nothing to report, its key is already gone
            status.state = FAILED
            status.reason = str(exc) or type(exc).__name__
            await self.session.publish_replica(status)
            return
        if self.replicas.get(hosted.key) is not hosted:
            # Unassigned while loading: free it at once.
            await engine.stop()
            return
        hosted.engine = engine
        status.max_concurrency = engine.max_concurrency
        params = check_infer_params(model.backend or "transformers", dict(model.infer_params))
        hosted.max_queue = int(
            params.get("max_queue", DEFAULT_QUEUE_FACTOR * status.max_concurrency)
        )
        hosted.queue_timeout = float(params.get("queue_timeout", DEFAULT_QUEUE_TIMEOUT_S))
        status.state = READY
        await self.session.publish_replica(status)
        log.info("%s replica %d READY", model.name, status.index)

    async def unload(self, key: ReplicaKey, *, drain: bool = True) -> None:
        """Stop routing to a replica, let in-flight requests finish (bounded), free it."""
        hosted = self.replicas.get(key)
        if hosted is None:
            return
        if hosted.base is None and hosted.status.state == READY:
            # Not ready any more: no adapter starts riding on it from here on.
            hosted.status.state = DRAINING
            await self.session.publish_replica(hosted.status)
        if hosted.base is None:
            self.fail_queue(hosted, _draining(hosted))
        # Adapters riding on this replica's engine go first (each drains its own requests).
        riders = [r.key for r in self.replicas.values() if r.base is hosted]
        for rider in riders:
            await self.unload(rider, drain=drain)
        if hosted.engine is not None and drain:
            hosted.status.state = DRAINING
            await self.session.publish_replica(hosted.status)
            try:
                await asyncio.wait_for(hosted.idle.wait(), timeout=self.drain_timeout)
            except asyncio.TimeoutError:
                log.warning("%s replica %d: drain timed out, aborting", key[0], key[2])
        # One that attached meanwhile (it loaded before the base stopped being READY).
        for rider in [r.key for r in self.replicas.values() if r.base is hosted]:
            await self.unload(rider, drain=drain)
        self.replicas.pop(key, None)
        try:
            if hosted.base is not None and hosted.engine is not None and hosted.lora:
                # Its requests have drained; the base model and other adapters keep serving.
                with contextlib.suppress(NotFound):
                    await hosted.engine.remove_lora(hosted.lora)
            elif hosted.engine is not None:
                await hosted.engine.stop()
        finally:
            await self.session.remove_replica(hosted.status)
            if hosted.base is not None and not any(
                r.status.model == key[0] and r.status.index == key[2]
                for r in self.replicas.values()
            ):
                # An adapter's series go with it (LoRA churn would grow them forever), unless
                # another generation of it still serves here under the same labels.
                self.metrics.forget(key[0], key[2])
        log.info("unloaded %s replica %d (generation %d)", key[0], key[2], key[1])

    async def drain_all(self, timeout: float) -> None:
        """Report every replica DRAINING and wait (bounded) for in-flight requests to end."""
        self.stopping = True
        for hosted in list(self.replicas.values()):
            if hosted.status.state == READY:
                hosted.status.state = DRAINING
                await self.session.publish_replica(hosted.status)
            if hosted.base is None:
                self.fail_queue(hosted, _draining(hosted))
        waits = [h.idle.wait() for h in self.replicas.values()]
        if waits:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), timeout=timeout)

    async def close(self, unload_timeout: float = 30.0) -> None:
        """Stop publishing, cancel loads, let unloads in progress finish, stop what is left."""
        self._publisher.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            # An unload cancelled mid-way would leave its engine (and vLLM's processes) running.
            if not task.get_name().startswith("unload-"):
                task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=unload_timeout)
        for hosted in list(self.replicas.values()):
            if hosted.engine is not None and hosted.base is None:
                with contextlib.suppress(Exception):
                    await hosted.engine.stop()
        self.replicas.clear()


def _draining(hosted: HostedReplica) -> Unavailable:
    return Unavailable(
        f"model {hosted.status.model!r} replica {hosted.status.index} started draining while "
        "the request waited for a slot; retry on another replica"
    )
