"""The SDK's side of routing: channels, a per-model route cache fed by WatchModel, and the one
place where gRPC errors become llmesh exceptions.

The control plane is not on the per-token path. For each model the client uses, a daemon thread
holds a ``WatchModel`` stream open and keeps the model's replica set in memory (a snapshot, then
one message per change). Requests pick a replica locally with the same
:class:`~llmesh.common.routing.Selector` the control plane uses, and go straight to the worker.
While the watch is broken the last known replica set stays in use (the workers may well be
fine) and the thread reconnects with backoff.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from llmesh.common.auth_client import sync_channel_with_token
from llmesh.common.errors import FailedPrecondition, LLMeshError, NotFound, from_rpc_error
from llmesh.common.grpc_server import CHANNEL_OPTIONS
from llmesh.common.routing import PURPOSE_NAMES, RouteDecision, Selector
from llmesh.common.tls import TlsConfig
from llmesh.common.tls import channel as channel_to
from llmesh.common.tracing import client_span
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
ReplicaId = tuple[str, str, int]  # (model, worker_id, index), as routing.Selector counts them

#: How long ``pick`` waits for a new watch's first snapshot before asking AssignWorker instead.
FIRST_SNAPSHOT_TIMEOUT_S = 2.0
#: How long a worker that answered UNAVAILABLE is avoided when other replicas exist.
DOWN_FOR_S = 5.0
#: Deadline of the AssignWorker / GetModel fallbacks.
CONTROL_CALL_TIMEOUT_S = 10.0
# Small unary worker calls (tokenize, chat template, meta): a stuck worker must not hang them.
WORKER_CALL_TIMEOUT_S = 30.0
_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 5.0


@contextlib.contextmanager
def rpc_errors() -> Iterator[None]:
    """Translate any ``grpc.RpcError`` raised inside the block into an llmesh exception.

    This is the SDK's only use of :func:`llmesh.errors.from_rpc_error`: every call the client
    makes, unary or streaming, control plane or worker, runs inside this block.
    """
    try:
        yield
    except grpc.RpcError as err:
        raise from_rpc_error(err) from err


def call_unary(
    method: Callable[..., T],
    request: Any,
    *,
    name: str,
    timeout: float | None = None,
    address: str = "",
) -> T:
    """Make one unary call with a client span, trace metadata and translated errors.

    Args:
        method: a stub method, e.g. ``stub.GetModel``.
        request: the request message.
        name: span name, e.g. ``"ControlPlaneService/GetModel"``.
        timeout: deadline in seconds; None for no deadline.
        address: the server's ``host:port``, for the span's ``server.address``.
    """
    with rpc_errors(), client_span(name, address) as metadata:
        return method(request, metadata=metadata, timeout=timeout)


class ChannelPool:
    """One cached, thread-safe gRPC channel per address.

    Args:
        options: gRPC channel options.
        tls: TLS for every channel (None: plaintext).
        token: a bearer token every call on these channels carries (None: none).
    """

    def __init__(
        self,
        options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
        tls: TlsConfig | None = None,
        *,
        token: str | None = None,
    ) -> None:
        self._options = list(options)
        self._tls = tls
        self._token = token
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def get(self, address: str) -> grpc.Channel:
        """Return the channel to ``address``, opening it on first use."""
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = sync_channel_with_token(
                    channel_to(address, self._tls, self._options), self._token
                )
                self._channels[address] = channel
            return channel

    def close(self) -> None:
        """Close every channel; calls still running on them are cancelled."""
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


class _ModelWatch:
    """What the cache knows about one model, kept current by one watch thread."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.replicas: list[common_pb2.Replica] | None = None  # None until the first snapshot
        self.generation = 0
        self.stale = True
        self.error: LLMeshError | None = None
        # Set once the first snapshot arrived or the first attempt failed, so pickers never
        # wait out the whole timeout against a control plane that is plainly down.
        self.settled = threading.Event()
        self.stopped = False
        self.call: Any = None
        self.thread: threading.Thread | None = None


def replica_id(replica: common_pb2.Replica) -> ReplicaId:
    """The identity the SDK uses to exclude a replica it already tried."""
    return (replica.model, replica.worker_id, replica.index)


def _ready(replicas: Sequence[common_pb2.Replica]) -> bool:
    return any(r.state == common_pb2.REPLICA_STATE_READY for r in replicas)


class RouteCache:
    """Per-model replica sets from WatchModel streams, and local replica selection.

    Args:
        control_plane: channel to the control plane.
        selector: the selector to use; one is made when not given.
        first_snapshot_timeout: seconds ``pick`` waits for a new watch's first snapshot before
            falling back to one AssignWorker call.
        down_for: seconds a worker that answered UNAVAILABLE is avoided.
    """

    def __init__(
        self,
        control_plane: grpc.Channel,
        *,
        selector: Selector | None = None,
        first_snapshot_timeout: float = FIRST_SNAPSHOT_TIMEOUT_S,
        down_for: float = DOWN_FOR_S,
    ) -> None:
        self._stub = cp_grpc.ControlPlaneServiceStub(control_plane)
        # The SDK ends every request it counts, so its own counts are exact (see Selector).
        self.selector = selector or Selector(own_counts=True)
        self.first_snapshot_timeout = first_snapshot_timeout
        self.down_for = down_for
        self._watches: dict[str, _ModelWatch] = {}
        self._down: dict[str, float] = {}  # worker address -> monotonic time it may be tried again
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._rng = random.Random()

    # -- watching -------------------------------------------------------------------------

    def _watch(self, model: str) -> _ModelWatch:
        with self._lock:
            if self._closed.is_set():
                raise FailedPrecondition("the client is closed; create a new ByzerLLM")
            watch = self._watches.get(model)
            if watch is None:
                watch = _ModelWatch(model)
                self._watches[model] = watch
                watch.thread = threading.Thread(
                    target=self._run, args=(watch,), name=f"llmesh-watch-{model}", daemon=True
                )
                watch.thread.start()
            return watch

    def _stopping(self, watch: _ModelWatch) -> bool:
        return self._closed.is_set() or watch.stopped

    def _run(self, watch: _ModelWatch) -> None:
        backoff = _BACKOFF_MIN_S
        while not self._stopping(watch):
            try:
                with rpc_errors(), client_span("ControlPlaneService/WatchModel") as metadata:
                    call = self._stub.WatchModel(
                        cp.WatchModelRequest(name=watch.model), metadata=metadata
                    )
                    watch.call = call
                    if self._stopping(watch):  # close() may have run before call was stored
                        call.cancel()
                    for response in call:
                        backoff = _BACKOFF_MIN_S
                        if response.deleted:
                            log.debug("model %s was undeployed; dropping its routes", watch.model)
                            self._drop(watch)
                            return
                        self._apply(watch, response.model)
                # The server ended the stream without saying why (it is shutting down): the
                # next control plane replica will carry on.
                watch.stale = True
            except LLMeshError as exc:
                if self._stopping(watch):
                    return
                if isinstance(exc, NotFound):
                    # Not deployed (or undeployed while the stream was down): stop watching, so
                    # a mistyped name does not keep a thread; the next request starts afresh.
                    watch.error = exc
                    self._drop(watch)
                    return
                watch.stale = True
                watch.error = exc
                watch.settled.set()
                log.debug("watch of model %s broke (%s); reconnecting", watch.model, exc)
            except Exception:  # a daemon thread must not die silently
                log.exception("watch of model %s failed unexpectedly", watch.model)
                watch.stale = True
                watch.settled.set()
            if self._closed.wait(backoff * (0.5 + self._rng.random())):
                return
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _apply(self, watch: _ModelWatch, model: cp.Model) -> None:
        with self._lock:
            watch.replicas = list(model.replicas)
            watch.generation = model.generation
            watch.stale = False
            watch.error = None
        watch.settled.set()

    def _drop(self, watch: _ModelWatch) -> None:
        with self._lock:
            watch.stopped = True
            if self._watches.get(watch.model) is watch:
                del self._watches[watch.model]
        watch.settled.set()

    def forget(self, model: str) -> None:
        """Stop watching ``model`` and drop what is known about it (e.g. after undeploy)."""
        with self._lock:
            watch = self._watches.pop(model, None)
        if watch is not None:
            watch.stopped = True
            if watch.call is not None:
                watch.call.cancel()
            watch.settled.set()

    def is_stale(self, model: str) -> bool:
        """True when the model's watch is not connected (the routes may be out of date)."""
        with self._lock:
            watch = self._watches.get(model)
        return watch is None or watch.stale

    def close(self) -> None:
        """Stop every watch thread."""
        self._closed.set()
        with self._lock:
            watches, self._watches = list(self._watches.values()), {}
        for watch in watches:
            watch.stopped = True
            if watch.call is not None:
                watch.call.cancel()
        for watch in watches:
            if watch.thread is not None and watch.thread is not threading.current_thread():
                watch.thread.join(timeout=1.0)

    # -- reading --------------------------------------------------------------------------

    def _snapshot(self, model: str) -> tuple[list[common_pb2.Replica] | None, int]:
        watch = self._watch(model)
        if not watch.settled.is_set():
            watch.settled.wait(self.first_snapshot_timeout)
        with self._lock:
            return (list(watch.replicas) if watch.replicas is not None else None), watch.generation

    def replicas(self, model: str) -> list[common_pb2.Replica]:
        """Every known replica of ``model`` (any state); asks GetModel when nothing is cached."""
        replicas, _ = self._snapshot(model)
        if replicas is not None:
            return replicas
        response = call_unary(
            self._stub.GetModel,
            cp.GetModelRequest(name=model),
            name="ControlPlaneService/GetModel",
            timeout=CONTROL_CALL_TIMEOUT_S,
        )
        return list(response.model.replicas)

    def pick(
        self,
        model: str,
        *,
        purpose: int = cp.PURPOSE_CHAT,
        policy: int = cp.LOAD_BALANCE_POLICY_LEAST_LOADED,
        purpose_pins: Mapping[str, int] | None = None,
        pinned_replica: int | None = None,
        affinity_key: str = "",
        exclude: frozenset[ReplicaId] | set[ReplicaId] = frozenset(),
        start: bool = False,
        decision: RouteDecision | None = None,
    ) -> common_pb2.Replica:
        """Choose the replica that serves one request.

        Args:
            model: the model name.
            purpose: a ``llmesh.v1.Purpose`` value, for pins by purpose.
            policy: a ``llmesh.v1.LoadBalancePolicy`` value.
            purpose_pins: purpose name to replica index (Byzer-LLM's pin_model_worker_mapping).
            pinned_replica: pin this request to one replica index.
            affinity_key: requests with the same key go to the same replica.
            exclude: replicas this request already tried; never chosen again.
            start: count the request on the chosen replica in the same step as the choice
                (end it with :meth:`finished`), so concurrent picks see each other.
            decision: filled in with why the replica was chosen (tracing only).

        Raises:
            NotFound, FailedPrecondition: no replica can take the request.
            Unavailable: the control plane is unreachable and nothing is cached for the model.
        """
        if decision is not None:
            decision.reset()
        replicas, generation = self._snapshot(model)
        if replicas is None:
            replica = self._assign(
                model, purpose, policy, purpose_pins, pinned_replica, affinity_key
            )
            if replica_id(replica) in exclude:
                raise FailedPrecondition(
                    f"no other replica of model {model!r} can take the request"
                )
            if start:
                self.selector.started(replica)
            if decision is not None:
                decision.rule = "control-plane"
                decision.chose(replica)
            return replica
        pinned = pinned_replica is not None or bool(
            purpose_pins and PURPOSE_NAMES.get(purpose, "chat") in purpose_pins
        )
        candidates = self.candidates(replicas, generation, exclude=exclude, keep_down=pinned)
        return self.selector.select(
            model,
            candidates,
            purpose=purpose,
            policy=policy,
            pinned_replica=pinned_replica,
            purpose_pins=purpose_pins,
            affinity_key=affinity_key,
            start=start,
            decision=decision,
        )

    def settled(self, model: str) -> bool:
        """True when :meth:`pick` for ``model`` will not block: its routes are cached (a
        watch that failed has none, and picking would ask the control plane)."""
        with self._lock:
            watch = self._watches.get(model)
            return watch is not None and watch.settled.is_set() and watch.replicas is not None

    def candidates(
        self,
        replicas: Sequence[common_pb2.Replica],
        generation: int = 0,
        *,
        exclude: frozenset[ReplicaId] | set[ReplicaId] = frozenset(),
        keep_down: bool = False,
    ) -> list[common_pb2.Replica]:
        """Filter a replica set before selection.

        Replicas of the model's current generation are preferred while any of them is READY
        (older ones may still be draining after a redeploy). Excluded replicas are dropped.
        Replicas on workers marked down are dropped too, unless that leaves nothing READY: a
        down mark is a hint for choosing among alternatives, not a reason to fail.
        """
        pool = list(replicas)
        if generation:
            current = [r for r in pool if r.generation == generation]
            if _ready(current):
                pool = current
        pool = [r for r in pool if replica_id(r) not in exclude]
        if keep_down:
            return pool
        now = time.monotonic()
        with self._lock:
            up = [r for r in pool if self._down.get(r.address, 0.0) <= now]
        return up if _ready(up) else pool

    def _assign(
        self,
        model: str,
        purpose: int,
        policy: int,
        purpose_pins: Mapping[str, int] | None,
        pinned_replica: int | None,
        affinity_key: str,
    ) -> common_pb2.Replica:
        request = cp.AssignWorkerRequest(
            model=model,
            purpose=purpose,
            policy=policy,
            purpose_pins=dict(purpose_pins or {}),
            affinity_key=affinity_key,
        )
        if pinned_replica is not None:
            request.pinned_replica = pinned_replica
        response = call_unary(
            self._stub.AssignWorker,
            request,
            name="ControlPlaneService/AssignWorker",
            timeout=CONTROL_CALL_TIMEOUT_S,
        )
        return response.replica

    # -- feedback from requests -----------------------------------------------------------

    def mark_down(self, address: str, seconds: float | None = None) -> None:
        """Avoid the worker at ``address`` for a while (it answered UNAVAILABLE)."""
        with self._lock:
            self._down[address] = time.monotonic() + (self.down_for if seconds is None else seconds)

    def is_down(self, address: str) -> bool:
        """True while ``address`` is marked down."""
        with self._lock:
            return self._down.get(address, 0.0) > time.monotonic()

    def started(self, replica: common_pb2.Replica) -> None:
        """Count a request sent to ``replica``; least-loaded sees it before the worker does."""
        self.selector.started(replica)

    def finished(self, replica: common_pb2.Replica) -> None:
        """Stop counting a request counted by :meth:`started`."""
        self.selector.finished(replica)
