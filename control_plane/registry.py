"""The registry: an in-memory mirror of one llmesh namespace in etcd.

etcd is the only state. The mirror lists the namespace at revision R, then watches it from R+1,
applying each watch response (one or more whole revisions) atomically. When the watch breaks it
reconnects with backoff and lists again, which also covers compaction. Readers get the last
known state even while etcd is unreachable; writers use :meth:`Registry.wait_for_revision` to
read their own writes.

Everything runs on the event loop: the mirror changes only inside the sync task, between awaits,
so a reader that does not await sees one consistent revision.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from google.protobuf.json_format import ParseError

from llmesh.common.errors import Unavailable
from llmesh.common.etcd import EtcdKV, KeyValue, WatchCompacted, WatchResponse, WatchStream
from llmesh.common.etcd_keys import Keys, decode
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import trainer_service_pb2 as tr

log = logging.getLogger(__name__)

T = TypeVar("T")

# (worker_id, index) of an assignment within one model.
AssignmentId = tuple[str, int]
# (worker_id, generation, index) of a published replica status within one model.
ReplicaId = tuple[str, int, int]


@dataclass(frozen=True)
class Fence:
    """The placement key as the mirror saw it: compare its mod_revision to fence a write."""

    mod_revision: int = 0
    counter: int = 0


@dataclass(frozen=True)
class Change:
    """What one applied batch of etcd events touched; passed to subscribers.

    Attributes:
        models: names of models whose spec, assignments or replicas may have changed.
        replicas: replica status entries that were written (their new value) or deleted.
        jobs: ids of training jobs whose record was written or deleted.
        workers: ids of workers that registered, changed or went away.
        everything: the mirror was listed again; treat every model as changed.
        placement: a model spec, an assignment, a pending replica, a worker or the placement
            fence changed (not only replica statuses or jobs), so room may have freed up.
    """

    models: frozenset[str] = frozenset()
    replicas: tuple[common_pb2.Replica, ...] = ()
    everything: bool = False
    jobs: frozenset[str] = frozenset()
    workers: frozenset[str] = frozenset()
    placement: bool = False

    def affects(self, model: str) -> bool:
        """Whether ``model`` may look different after this change."""
        return self.everything or model in self.models


Listener = Callable[[Change], None]


@dataclass
class MirrorState:
    """The decoded contents of one namespace; built and changed only by the registry."""

    models: dict[str, cp.Model] = field(default_factory=dict)
    model_revisions: dict[str, int] = field(default_factory=dict)
    workers: dict[str, cp.Worker] = field(default_factory=dict)
    assignments: dict[str, dict[AssignmentId, common_pb2.Replica]] = field(default_factory=dict)
    replicas: dict[str, dict[ReplicaId, common_pb2.Replica]] = field(default_factory=dict)
    pending: dict[str, dict[int, common_pb2.Replica]] = field(default_factory=dict)
    fence: Fence = Fence()
    jobs: dict[str, tr.TrainingJob] = field(default_factory=dict)
    job_revisions: dict[str, int] = field(default_factory=dict)
    # worker id -> model -> how many assignments and replica statuses of that model it holds.
    # An index, because a worker key's change must find its models: scanning every model for
    # each of them cost ~9 ms per worker at 10,000 models, ~9 s of the listing at 1,000 workers.
    worker_models: dict[str, dict[str, int]] = field(default_factory=dict)

    def models_on_worker(self, worker_id: str) -> set[str]:
        """Models with an assignment or a replica status on ``worker_id``."""
        return set(self.worker_models.get(worker_id, ()))

    def count_on_worker(self, worker_id: str, model: str, delta: int) -> None:
        """Add ``delta`` to the entries ``worker_id`` holds for ``model`` (see worker_models)."""
        per_worker = self.worker_models.setdefault(worker_id, {})
        held = per_worker.get(model, 0) + delta
        if held > 0:
            per_worker[model] = held
        else:
            per_worker.pop(model, None)
            if not per_worker:
                del self.worker_models[worker_id]


class _Batch:
    """Collects what a batch of events changed while it is applied."""

    def __init__(self) -> None:
        self.models: set[str] = set()
        self.replicas: list[common_pb2.Replica] = []
        self.jobs: set[str] = set()
        self.workers: set[str] = set()
        self.placement = False

    def change(self) -> Change:
        return Change(
            models=frozenset(self.models),
            replicas=tuple(self.replicas),
            jobs=frozenset(self.jobs),
            workers=frozenset(self.workers),
            placement=self.placement,
        )


def _apply(state: MirrorState, keys: Keys, key: bytes, kv: KeyValue | None, batch: _Batch) -> None:
    """Apply one put (``kv`` given) or delete (``kv`` None) of ``key`` to ``state``."""
    try:
        rest = key.decode()[len(keys.ns) + 1 :]
    except UnicodeDecodeError:
        return
    parts = rest.split("/")
    kind = parts[0]
    if kind in ("workers", "assignments"):
        # A pending replica's reason names the workers and who holds their room.
        batch.models.update(state.pending)
    if kind in ("placement", "models", "workers", "assignments", "pending"):
        batch.placement = True
    try:
        if kind == "placement" and len(parts) == 1:
            if kv is None:
                state.fence = Fence()
            else:
                try:
                    counter = int(kv.value.decode().strip() or 0)
                except ValueError:
                    log.warning("placement counter %r is not a number; counting from 0", kv.value)
                    counter = 0
                state.fence = Fence(mod_revision=kv.mod_revision, counter=counter)
        elif kind == "models" and len(parts) == 2:
            name = parts[1]
            batch.models.add(name)
            state.models.pop(name, None)
            state.model_revisions.pop(name, None)
            if kv is not None:
                model = decode(kv.value, cp.Model)
                model.name = name
                del model.replicas[:]
                state.models[name] = model
                state.model_revisions[name] = kv.mod_revision
        elif kind == "workers" and len(parts) == 2:
            worker_id = parts[1]
            batch.models.update(state.models_on_worker(worker_id))
            batch.workers.add(worker_id)
            state.workers.pop(worker_id, None)
            if kv is not None:
                worker = decode(kv.value, cp.Worker)
                worker.id = worker_id
                state.workers[worker_id] = worker
        elif kind == "assignments" and len(parts) == 4:
            worker_id, model_name, index = parts[1], parts[2], int(parts[3])
            batch.models.add(model_name)
            per_model = state.assignments.setdefault(model_name, {})
            if per_model.pop((worker_id, index), None) is not None:
                state.count_on_worker(worker_id, model_name, -1)
            if kv is not None:
                replica = decode(kv.value, common_pb2.Replica)
                replica.model, replica.worker_id, replica.index = model_name, worker_id, index
                per_model[(worker_id, index)] = replica
                state.count_on_worker(worker_id, model_name, 1)
            if not per_model:
                del state.assignments[model_name]
        elif kind == "pending" and len(parts) == 3:
            model_name, index = parts[1], int(parts[2])
            batch.models.add(model_name)
            waiting = state.pending.setdefault(model_name, {})
            waiting.pop(index, None)
            if kv is not None:
                replica = decode(kv.value, common_pb2.Replica)
                replica.model, replica.index = model_name, index
                replica.state = common_pb2.REPLICA_STATE_PENDING
                waiting[index] = replica
            if not waiting:
                del state.pending[model_name]
        elif kind == "replicas" and len(parts) == 5:
            model_name, worker_id = parts[1], parts[2]
            generation, index = int(parts[3]), int(parts[4])
            batch.models.add(model_name)
            per_model_r = state.replicas.setdefault(model_name, {})
            old = per_model_r.pop((worker_id, generation, index), None)
            if old is not None:
                state.count_on_worker(worker_id, model_name, -1)
            if kv is not None:
                replica = decode(kv.value, common_pb2.Replica)
                replica.model, replica.worker_id = model_name, worker_id
                replica.generation, replica.index = generation, index
                per_model_r[(worker_id, generation, index)] = replica
                state.count_on_worker(worker_id, model_name, 1)
                batch.replicas.append(replica)
            elif old is not None:
                batch.replicas.append(old)
            if not per_model_r:
                del state.replicas[model_name]
        elif kind == "jobs" and len(parts) == 2:
            job_id = parts[1]
            batch.jobs.add(job_id)
            state.jobs.pop(job_id, None)
            state.job_revisions.pop(job_id, None)
            if kv is not None:
                job = decode(kv.value, tr.TrainingJob)
                job.id = job_id
                state.jobs[job_id] = job
                state.job_revisions[job_id] = kv.mod_revision
    except (ParseError, ValueError) as err:
        # A value this version cannot read is treated as absent rather than stopping the mirror.
        log.warning("ignoring unreadable etcd key %s: %s", key.decode(errors="replace"), err)


def _mirror(keys: Keys, kvs: Sequence[KeyValue], abandon: threading.Event) -> MirrorState:
    """A fresh state holding ``kvs``, a listing of the namespace; stops early (returning a
    partial state nobody will use) once ``abandon`` is set."""
    state = MirrorState()
    batch = _Batch()  # what a listing changed is everything; nobody reads this batch
    for i, kv in enumerate(kvs):
        if i % 1000 == 0 and abandon.is_set():
            break
        _apply(state, keys, kv.key, kv, batch)
    return state


class Registry(ABC):
    """The control plane's view of the namespace: models, workers, assignments, replicas.

    Accessors return read-only mappings of the current state; do not keep them across awaits
    and do not mutate the messages in them.
    """

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._changed = asyncio.Event()

    @abstractmethod
    async def start(self, *, timeout: float = 10.0) -> None:
        """Load the namespace and keep following it; raises Unavailable if etcd stays away."""

    @abstractmethod
    async def close(self) -> None:
        """Stop following etcd."""

    @property
    @abstractmethod
    def revision(self) -> int:
        """The etcd revision the mirror reflects completely."""

    @property
    @abstractmethod
    def connected(self) -> bool:
        """Whether the watch on etcd is up (when False the state is the last known one)."""

    @abstractmethod
    def models(self) -> Mapping[str, cp.Model]:
        """Deployed models by name (desired state; no replicas, generation set)."""

    @abstractmethod
    def model_revision(self, name: str) -> int:
        """The mod_revision of the model's key, 0 when it is not deployed."""

    @abstractmethod
    def workers(self) -> Mapping[str, cp.Worker]:
        """Live workers by id, as they registered (no usage filled)."""

    @abstractmethod
    def assignments(self, model: str) -> Mapping[AssignmentId, common_pb2.Replica]:
        """The model's assignments by (worker_id, index)."""

    @abstractmethod
    def all_assignments(self) -> Mapping[str, Mapping[AssignmentId, common_pb2.Replica]]:
        """Assignments of every model, by model then (worker_id, index)."""

    @abstractmethod
    def replicas(self, model: str) -> Mapping[ReplicaId, common_pb2.Replica]:
        """Published replica statuses of the model, every generation, by (worker, gen, index)."""

    @abstractmethod
    def pending(self, model: str) -> Mapping[int, common_pb2.Replica]:
        """The model's replicas waiting for room (no assignment yet), by index."""

    @abstractmethod
    def all_pending(self) -> Mapping[str, Mapping[int, common_pb2.Replica]]:
        """Pending replicas of every model, by model then index."""

    @abstractmethod
    def fence(self) -> Fence:
        """The placement fence as of :attr:`revision`."""

    @abstractmethod
    def jobs(self) -> Mapping[str, tr.TrainingJob]:
        """Training job records by id."""

    @abstractmethod
    def job_revision(self, job_id: str) -> int:
        """The mod_revision of the job's record, 0 when there is none."""

    @abstractmethod
    async def wait_for_revision(self, revision: int, *, timeout: float = 5.0) -> None:
        """Return once the mirror reflects ``revision``; raise Unavailable on timeout."""

    @abstractmethod
    async def sync(self, *, timeout: float = 2.0) -> None:
        """Return once the mirror holds every write committed to etcd before this call."""

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` after each applied change; returns a function that unsubscribes.

        Listeners run inside the sync task and must not block: set an event and return.
        """
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def _notify(self, change: Change | None) -> None:
        """Wake :meth:`wait_until` callers and, for a real change, the listeners."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        if change is None:
            return
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                log.exception("registry listener %r failed", listener)

    async def wait_until(self, check: Callable[[], T | None], *, timeout: float) -> T:
        """Re-run ``check`` after every change until it returns non-None.

        ``check`` may raise to stop waiting. Raises TimeoutError after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = check()
            if result is not None:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout:g} s")
            event = self._changed  # taken before awaiting, so no change slips by unseen
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                pass


class EtcdRegistry(Registry):
    """The registry backed by a real etcd: list, then watch, reconnecting with backoff.

    Args:
        kv: the etcd client.
        keys: the namespace's key layout.
        backoff: first reconnect delay in seconds; doubles up to ``max_backoff``.
        max_backoff: longest reconnect delay in seconds.
    """

    def __init__(
        self,
        kv: EtcdKV,
        keys: Keys,
        *,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
    ) -> None:
        super().__init__()
        self.kv = kv
        self.keys = keys
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._state = MirrorState()
        self._revision = 0
        self._stream: WatchStream | None = None
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_error: BaseException | None = None
        self._watching = False
        self._progress_at = 0.0
        self._listed_keys: int | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, *, timeout: float = 10.0) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"registry {self.keys.ns}")
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout)
        except asyncio.TimeoutError:
            await self.close()
            if self._listed_keys is not None and self._last_error is None:
                raise Unavailable(
                    f"etcd at {self.kv.endpoint} answered with {self._listed_keys:,} keys, but "
                    f"loading them took longer than {timeout:g} s; give the control plane a "
                    "longer startup timeout (llmesh control-plane --startup-timeout SECONDS)"
                ) from None
            raise Unavailable(
                f"could not load the registry from etcd at {self.kv.endpoint} within "
                f"{timeout:g} s ({self._last_error}); is etcd running?"
            ) from None

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        delay = self._backoff
        while True:
            self._watching = False
            try:
                await self._list_and_watch()
            except asyncio.CancelledError:
                raise
            except WatchCompacted as err:
                # Not an outage: list again right away from the current revision.
                log.info("registry watch fell behind compaction (%s); listing again", err)
                continue
            except Exception as err:  # noqa: BLE001 - any failure means: reconnect and re-list
                self._last_error = err
                if self._watching:
                    delay = self._backoff  # it was healthy until now: try again soon
                log.warning(
                    "registry lost etcd at %s (%s); retrying in %.1f s",
                    self.kv.endpoint,
                    err,
                    delay,
                )
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._max_backoff)

    async def _list_and_watch(self) -> None:
        listing = await self.kv.range_prefix(self.keys.root)
        self._listed_keys = len(listing.kvs)
        self._last_error = None  # etcd answered: a timeout from here on is slow loading
        # Decoding is ~20 µs a key (1.8 s for 100,000 keys on a 2-vCPU machine), and a re-list
        # after a compaction or an outage happens while serving: build the new state in a
        # thread so the event loop keeps answering from the old one meanwhile.
        abandon = threading.Event()
        try:
            state = await asyncio.to_thread(_mirror, self.keys, listing.kvs, abandon)
        finally:
            # Cancelled (close, a startup timeout): the thread stops at its next check instead
            # of decoding the rest, which would hold up the process's exit.
            abandon.set()
        start = listing.header.revision + 1
        async with self.kv.watch(self.keys.root, start_revision=start) as stream:
            # Swap the state in only once the watch is up, so a failed attempt keeps serving
            # the last known state rather than a half-synced one.
            self._state = state
            self._revision = listing.header.revision
            self._stream = stream
            self._loaded.set()
            log.info(
                "registry loaded %d models, %d workers at revision %d",
                len(state.models),
                len(state.workers),
                self._revision,
            )
            self._notify(Change(everything=True))
            self._watching = True
            try:
                while True:
                    self._on_response(await stream.read())
            finally:
                self._stream = None

    def _on_response(self, response: WatchResponse) -> None:
        batch = _Batch()
        for event in response.events:
            deleted = event.type == event.DELETE
            _apply(self._state, self.keys, event.kv.key, None if deleted else event.kv, batch)
        if response.events:
            # Not header.revision: while etcd catches up an unsynced watcher it sends a partial
            # batch stamped with the store's current revision, with more events to follow.
            self._revision = max(self._revision, response.events[-1].kv.mod_revision)
        elif not response.created and not response.canceled:
            # An empty response is a progress notification; etcd sends those only to synced
            # watchers, so everything up to header.revision has been delivered.
            self._revision = max(self._revision, response.header.revision)
        self._notify(batch.change() if response.events else None)

    # -- reads -----------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def connected(self) -> bool:
        return self._stream is not None

    def models(self) -> Mapping[str, cp.Model]:
        return MappingProxyType(self._state.models)

    def model_revision(self, name: str) -> int:
        return self._state.model_revisions.get(name, 0)

    def workers(self) -> Mapping[str, cp.Worker]:
        return MappingProxyType(self._state.workers)

    def assignments(self, model: str) -> Mapping[AssignmentId, common_pb2.Replica]:
        return MappingProxyType(self._state.assignments.get(model, {}))

    def all_assignments(self) -> Mapping[str, Mapping[AssignmentId, common_pb2.Replica]]:
        return MappingProxyType(self._state.assignments)

    def replicas(self, model: str) -> Mapping[ReplicaId, common_pb2.Replica]:
        return MappingProxyType(self._state.replicas.get(model, {}))

    def pending(self, model: str) -> Mapping[int, common_pb2.Replica]:
        return MappingProxyType(self._state.pending.get(model, {}))

    def all_pending(self) -> Mapping[str, Mapping[int, common_pb2.Replica]]:
        return MappingProxyType(self._state.pending)

    def fence(self) -> Fence:
        return self._state.fence

    def jobs(self) -> Mapping[str, tr.TrainingJob]:
        return MappingProxyType(self._state.jobs)

    def job_revision(self, job_id: str) -> int:
        return self._state.job_revisions.get(job_id, 0)

    # -- read-your-writes ------------------------------------------------------------------

    async def wait_for_revision(self, revision: int, *, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._revision < revision:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Unavailable(
                    f"the control plane's view of etcd is behind (at revision {self._revision}, "
                    f"need {revision}); retry shortly"
                )
            # The revision may belong to keys outside the namespace, which the watch never
            # reports; a progress request makes etcd confirm how far the watch has got.
            if self._stream is not None and loop.time() - self._progress_at >= 0.05:
                self._progress_at = loop.time()
                await self._stream.request_progress()
            event = self._changed
            try:
                await asyncio.wait_for(event.wait(), min(remaining, 0.25))
            except asyncio.TimeoutError:
                pass

    async def sync(self, *, timeout: float = 2.0) -> None:
        revision = await self.kv.current_revision(timeout=timeout)
        await self.wait_for_revision(revision, timeout=timeout)
