"""The ControlPlaneService servicer: admin API and routing, answered from the registry."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from llmesh.common import tracing
from llmesh.common.auth import check_unscoped, scoped_caller
from llmesh.common.errors import InvalidArgument, NotFound, Unavailable, Unimplemented, rpc_handler
from llmesh.common.job_rules import check_job_id_length
from llmesh.common.metrics import ControlPlaneMetrics, routing_policy_name, routing_reason
from llmesh.common.routing import RouteDecision, Selector
from llmesh.control_plane.deployments import Deployer
from llmesh.control_plane.job_scheduler import JobScheduler
from llmesh.control_plane.registry import Change, Registry
from llmesh.control_plane.spec import normalize
from llmesh.control_plane.views import with_replicas, worker_views
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc

log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT = 300.0
DEFAULT_UNDEPLOY_TIMEOUT = 60.0
# A watcher waits this long after a change before sending, so a burst (a worker flipping several
# replicas, a txn and the statuses it triggers) goes out as one message.
WATCH_COALESCE_SECONDS = 0.05


class ControlPlaneServicer(cp_grpc.ControlPlaneServiceServicer):
    """Implements llmesh.v1.ControlPlaneService.

    Args:
        registry: the mirror of etcd every read is served from.
        deployer: writes deployments to etcd.
        jobs: creates, cancels and watches training jobs; None answers the job RPCs with
            UNIMPLEMENTED.
        selector: picks replicas for AssignWorker; one per control plane so round-robin and
            least-loaded see all of this control plane's assignments.
        metrics: where AssignWorker counts its decisions (a private registry when None).
    """

    def __init__(
        self,
        registry: Registry,
        deployer: Deployer,
        *,
        jobs: JobScheduler | None = None,
        selector: Selector | None = None,
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics or ControlPlaneMetrics()
        self.deployer = deployer
        self.jobs = jobs
        self.selector = selector or Selector()
        self._closing = asyncio.Event()
        self._watchers: set[asyncio.Event] = set()
        # Each model's view (spec + replicas), built once per change of the model rather than
        # once per AssignWorker call and once per watcher: with 1,000 watchers on a model, one
        # change used to build and serialize the same view 1,000 times. Dropped in _on_change
        # by the same test that wakes WatchModel (Change.affects).
        self._views: dict[str, _View] = {}
        self._unsubscribe = registry.subscribe(self._on_change)

    def _on_change(self, change: Change) -> None:
        if change.everything:
            self._views.clear()
        else:
            for name in change.models:
                self._views.pop(name, None)
        # A worker's newly published in-flight count already includes the requests this control
        # plane sent it, so its local count starts over.
        if change.everything:
            self.selector.local_inflight.clear()
        for replica in change.replicas:
            self.selector.observed(replica)

    def _view(self, spec: cp.Model) -> _View:
        """The model as the API shows it, shared until the model changes; never mutate it."""
        view = self._views.get(spec.name)
        # `spec is` guards against a spec swapped without a change notice (none is known).
        if view is None or view.spec is not spec:
            view = _View(spec, with_replicas(self.registry, spec))
            # Not an adapter's: its PENDING placeholders follow its base model's, and a change
            # to those names only the base. Not after close(): nothing would drop it then.
            if not spec.base_model and not self._closing.is_set():
                self._views[spec.name] = view
        return view

    def close(self) -> None:
        """Stop accepting watches and end the open ones (they get UNAVAILABLE and reconnect)."""
        self._closing.set()
        self._unsubscribe()
        self._views.clear()
        for event in self._watchers:
            event.set()

    async def _lookup(self, name: str) -> cp.Model:
        """The model's spec, or NotFound once etcd confirms it is not deployed."""
        if not name:
            raise InvalidArgument('name is required: the model\'s name, e.g. "chat"')
        spec = self.registry.models().get(name)
        if spec is None and self.registry.connected:
            # The mirror may not have seen a deploy made through another control plane a moment
            # ago; a miss is rare enough to afford a linearizable check.
            try:
                await self.registry.sync(timeout=1.0)
            except Unavailable as err:
                log.debug("sync before NOT_FOUND failed: %s", err)
            spec = self.registry.models().get(name)
        if spec is None and not self.registry.connected:
            raise Unavailable(
                f"model {name!r} is not in this control plane's last known state and etcd is "
                "unreachable, so it may have been deployed since; retry when etcd is back"
            )
        if spec is None:
            raise NotFound(
                f"model {name!r} is not deployed; deploy it first (llmesh deploy --model {name} "
                "...) or see ListModels"
            )
        return spec

    @rpc_handler
    async def DeployModel(
        self, request: cp.DeployModelRequest, context: grpc.aio.ServicerContext
    ) -> cp.DeployModelResponse:
        if not request.HasField("model"):
            raise InvalidArgument(
                "model is required: pass at least model.name and model.model_path"
            )
        if request.timeout_seconds < 0:
            raise InvalidArgument(
                f"timeout_seconds must be 0 (default 300) or more, got {request.timeout_seconds:g}"
            )
        spec = normalize(request.model)
        stored = await self.deployer.deploy(spec)
        if request.wait_ready:
            timeout = request.timeout_seconds or DEFAULT_READY_TIMEOUT
            model = await self.deployer.wait_ready(stored.name, stored.generation, timeout=timeout)
        else:
            model = with_replicas(self.registry, stored)
        return cp.DeployModelResponse(model=model)

    @rpc_handler
    async def UndeployModel(
        self, request: cp.UndeployModelRequest, context: grpc.aio.ServicerContext
    ) -> cp.UndeployModelResponse:
        if not request.name:
            raise InvalidArgument("name is required: the model to undeploy")
        if request.timeout_seconds < 0:
            raise InvalidArgument(
                f"timeout_seconds must be 0 (default 60) or more, got {request.timeout_seconds:g}"
            )
        removed = await self.deployer.undeploy(request.name)
        if request.wait:
            await self.deployer.wait_unloaded(
                removed.name,
                removed.generation,
                timeout=request.timeout_seconds or DEFAULT_UNDEPLOY_TIMEOUT,
            )
        return cp.UndeployModelResponse()

    @rpc_handler
    async def GetModel(
        self, request: cp.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> cp.GetModelResponse:
        spec = await self._lookup(request.name)
        return cp.GetModelResponse(model=with_replicas(self.registry, spec))

    @rpc_handler
    async def ListModels(
        self, request: cp.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> cp.ListModelsResponse:
        models = self.registry.models()
        scoped = scoped_caller()
        names = [n for n in sorted(models) if scoped is None or scoped.may_use(n)]
        return cp.ListModelsResponse(
            models=[with_replicas(self.registry, models[name]) for name in names]
        )

    @rpc_handler
    async def ListWorkers(
        self, request: cp.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> cp.ListWorkersResponse:
        workers = worker_views(self.registry)
        scoped = scoped_caller()
        if scoped is not None:
            # A scoped token sees every worker (capacity is not any model's) but only the
            # replicas and device holders ("model/index") of its own models.
            def mine(label: str) -> bool:
                return scoped.may_use(label.rsplit("/", 1)[0])

            for worker in workers:
                kept = [r for r in worker.replicas if mine(r)]
                del worker.replicas[:]
                worker.replicas.extend(kept)
                for device in worker.devices:
                    held = [h for h in device.holders if mine(h)]
                    del device.holders[:]
                    device.holders.extend(held)
        return cp.ListWorkersResponse(workers=workers)

    @rpc_handler
    async def AssignWorker(
        self, request: cp.AssignWorkerRequest, context: grpc.aio.ServicerContext
    ) -> cp.AssignWorkerResponse:
        policy = routing_policy_name(request.policy)
        decision = RouteDecision() if tracing.enabled() else None  # for the span only
        try:
            spec = await self._lookup(request.model)
            replica = self.selector.select(
                spec.name,
                self._view(spec).model.replicas,
                purpose=request.purpose,
                policy=request.policy,
                pinned_replica=request.pinned_replica
                if request.HasField("pinned_replica")
                else None,
                purpose_pins=dict(request.purpose_pins),
                affinity_key=request.affinity_key,
                decision=decision,
            )
        except Exception:
            self.metrics.routed(policy, "refused")
            raise
        self.metrics.routed(policy, routing_reason(request))
        tracing.record_route(tracing.current_span(decision), decision)
        self.selector.started(replica)
        return cp.AssignWorkerResponse(replica=replica)  # a copy: the view stays as it is

    @rpc_handler
    async def WatchModel(
        self, request: cp.WatchModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cp.WatchModelResponse]:
        if self._closing.is_set():
            raise Unavailable("the control plane is shutting down; watch through another one")
        spec = await self._lookup(request.name)
        name, generation = spec.name, spec.generation
        # One "something changed" flag per watcher: the registry never waits for a slow client;
        # the watcher sends the newest snapshot when it is ready for the next message.
        dirty = asyncio.Event()

        def on_change(change: Change) -> None:
            if change.affects(name):
                dirty.set()

        unsubscribe = self.registry.subscribe(on_change)
        self._watchers.add(dirty)
        try:
            last_sent: bytes | None = None
            last_model = spec
            while True:
                dirty.clear()
                current = self.registry.models().get(name)
                if current is None or current.generation != generation:
                    # A new generation is a new deployment: this stream's deployment has ended.
                    yield cp.WatchModelResponse(model=last_model, deleted=True)
                    return
                view = self._view(current)
                if view.data != last_sent:
                    yield view.response
                    last_sent, last_model = view.data, view.model
                await dirty.wait()
                if self._closing.is_set():
                    raise Unavailable("the control plane is shutting down; watch again")
                await asyncio.sleep(WATCH_COALESCE_SECONDS)
        finally:
            self._watchers.discard(dirty)
            unsubscribe()

    # -- training jobs -----------------------------------------------------------------------

    def _scheduler(self) -> JobScheduler:
        if self.jobs is None:
            raise Unimplemented("this control plane was started without training jobs")
        return self.jobs

    @rpc_handler
    async def CreateTrainingJob(
        self, request: cp.CreateTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> cp.CreateTrainingJobResponse:
        job = await self._scheduler().create(request.spec, request.request_id)
        return cp.CreateTrainingJobResponse(job=job)

    @rpc_handler
    async def GetTrainingJob(
        self, request: cp.GetTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> cp.GetTrainingJobResponse:
        check_unscoped("training jobs")
        return cp.GetTrainingJobResponse(job=self._scheduler().get(_job_id(request.id)))

    @rpc_handler
    async def ListTrainingJobs(
        self, request: cp.ListTrainingJobsRequest, context: grpc.aio.ServicerContext
    ) -> cp.ListTrainingJobsResponse:
        if scoped_caller() is not None:
            return cp.ListTrainingJobsResponse()  # none visible to a scoped token; see Get
        return cp.ListTrainingJobsResponse(jobs=self._scheduler().list(list(request.states)))

    @rpc_handler
    async def CancelTrainingJob(
        self, request: cp.CancelTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> cp.CancelTrainingJobResponse:
        job = await self._scheduler().cancel(_job_id(request.id))
        return cp.CancelTrainingJobResponse(job=job)

    @rpc_handler
    async def WatchTrainingJob(
        self, request: cp.WatchTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cp.WatchTrainingJobResponse]:
        if self._closing.is_set():
            raise Unavailable("the control plane is shutting down; watch through another one")
        if request.after_sequence < 0:
            raise InvalidArgument("after_sequence must be >= 0 (0 sends the whole history)")
        check_unscoped("training jobs")
        async for response in self._scheduler().watch(_job_id(request.id), request.after_sequence):
            if self._closing.is_set():
                raise Unavailable("the control plane is shutting down; watch again")
            yield response


class _View:
    """One model's API view and, once asked for, its serialization and its watch message."""

    __slots__ = ("_data", "_response", "model", "spec")

    def __init__(self, spec: cp.Model, model: cp.Model) -> None:
        self.spec = spec
        self.model = model
        self._data: bytes | None = None
        self._response: cp.WatchModelResponse | None = None

    @property
    def response(self) -> cp.WatchModelResponse:
        """The WatchModel message carrying the view (building one copies the whole model)."""
        if self._response is None:
            self._response = cp.WatchModelResponse(model=self.model)
        return self._response

    @property
    def data(self) -> bytes:
        """The view serialized deterministically (WatchModel sends only when it differs)."""
        if self._data is None:
            self._data = self.model.SerializeToString(deterministic=True)
        return self._data


def _job_id(job_id: str) -> str:
    if not job_id:
        raise InvalidArgument("id is required: the training job's id, as CreateTrainingJob gave it")
    return check_job_id_length(job_id)
