"""Channels, replica choice and retries, shared by the sync and the async transport.

:class:`Router` owns what one client holds open: the sync channels (one per address), the
grpc.aio channels and chat sessions (per event loop and address), the I/O loop thread the sync
API runs its sessions on, and the route cache that follows each model's
replicas. Both transports pick replicas and count retries through it, so the two retry the
same way: :class:`Attempts` is the per-request bookkeeping and :class:`Attempt` one try on one
replica.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

import grpc

from llmesh.common.auth_client import aio_token_interceptors
from llmesh.common.errors import (
    FailedPrecondition,
    LLMeshError,
    ResourceExhausted,
    Unavailable,
)
from llmesh.common.grpc_server import CHANNEL_OPTIONS
from llmesh.common.routing import RouteDecision
from llmesh.common.tls import TlsConfig, aio_channel, connect_hint
from llmesh.route_cache import ChannelPool, ReplicaId, RouteCache, replica_id
from llmesh.sdk.sessions import IoLoop, Sessions
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc
from llmesh.v1 import inference_service_pb2 as inf
from llmesh.v1 import inference_service_pb2_grpc as inf_grpc

log = logging.getLogger(__name__)

#: Replica states that may still be running a request (what ``abort`` asks).
LIVE_STATES = (common_pb2.REPLICA_STATE_READY, common_pb2.REPLICA_STATE_DRAINING)


class AioChannels:
    """grpc.aio channels per event loop and address (aio objects belong to their loop).

    Args:
        tls: TLS for every channel (None: plaintext).
        token: a bearer token every call on these channels carries (None: none).
    """

    def __init__(self, tls: TlsConfig | None = None, token: str | None = None) -> None:
        self._tls = tls
        self._interceptors = aio_token_interceptors(token)
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def get(self, address: str) -> grpc.aio.Channel:
        """The running loop's channel to ``address``, opened on first use.

        Args:
            address: ``host:port``.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            channels = self._by_loop.setdefault(loop, {})
            channel = channels.get(address)
            if channel is None:
                channel = aio_channel(address, self._tls, CHANNEL_OPTIONS, self._interceptors)
                channels[address] = channel
            return channel

    async def close(self) -> None:
        """Close the running loop's channels."""
        with self._lock:
            channels = self._by_loop.pop(asyncio.get_running_loop(), {})
        for channel in channels.values():
            await channel.close()


class Attempts:
    """Retry bookkeeping for one request.

    UNAVAILABLE before any output: the worker is marked down and the request is retried once
    on another replica. RESOURCE_EXHAUSTED: every other READY replica is tried in turn. When no
    replica is left, the last worker error is raised.
    """

    def __init__(self) -> None:
        self.tried: set[ReplicaId] = set()
        self.retried_unavailable = False
        self.last_error: LLMeshError | None = None

    def failed(self, routes: RouteCache, replica: common_pb2.Replica, exc: LLMeshError) -> None:
        """Record a failed attempt; re-raise ``exc`` when no retry is allowed.

        Args:
            routes: the route cache, told when a worker is unreachable.
            replica: the replica that failed.
            exc: why.
        """
        self.tried.add(replica_id(replica))
        if isinstance(exc, Unavailable):
            routes.mark_down(replica.address)
            if self.retried_unavailable:
                raise exc
            self.retried_unavailable = True
        elif not isinstance(exc, ResourceExhausted):
            raise exc
        log.debug("replica %s of %s failed (%s); trying another", replica.index, replica.model, exc)
        self.last_error = exc


class Failover:
    """Mid-stream failover of one chat request: what it generated so far and where it moved.

    When a stream breaks with UNAVAILABLE after output arrived (the replica died, its
    connection reset, it was stopped), the request is started again on another READY replica
    with ``ChatStart.resume_token_ids`` set to every token id received so far; that replica
    continues from exactly there, so the caller's stream goes on without a repeat or a gap.

    Args:
        start: the request (its ``resume_token_ids`` are set here on each move).
        max_migrations: moves allowed; 0 turns failover off.
        routes: the route cache, told to avoid the replica that failed.
        counts: where moves are counted per (model, outcome).
        on_migrate: called once per move (the caller's metadata counts them).
    """

    def __init__(
        self,
        start: inf.ChatStart,
        max_migrations: int,
        routes: RouteCache,
        counts: collections.Counter[tuple[str, str]],
        on_migrate: Callable[[], None] | None = None,
    ) -> None:
        self.start = start
        self.max_migrations = max_migrations
        self.routes = routes
        self.counts = counts
        self.on_migrate = on_migrate
        self.generated: list[int] = []
        self.migrations = 0
        #: The failure that made the request move last (raised if the move cannot be made).
        self.cause: LLMeshError | None = None

    def received(self, batch: list[inf.ChatResponse]) -> None:
        """Remember the token ids of a batch of responses."""
        for response in batch:
            self.generated.extend(response.token_ids)

    def move(self, attempts: Attempts, replica: common_pb2.Replica, exc: BaseException) -> bool:
        """Whether the request moves to another replica after ``exc`` broke its stream on
        ``replica``; when it does, the next start carries the resume record."""
        if (
            not isinstance(exc, Unavailable)
            or not self.generated
            or self.migrations >= self.max_migrations
        ):
            if self.migrations and self.generated:
                self.counts[(self.start.model, "failed")] += 1
            return False
        attempts.tried.add(replica_id(replica))
        attempts.retried_unavailable = False  # the new replica gets its own retry before output
        # With no replica left to move to, the pick raises this failure.
        attempts.last_error = exc
        self.routes.mark_down(replica.address)
        del self.start.resume_token_ids[:]
        self.start.resume_token_ids.extend(self.generated)
        self.migrations += 1
        self.cause = exc
        log.info(
            "request %s on %s replica %d broke after %d tokens (%s); moving it",
            self.start.request_id,
            replica.model,
            replica.index,
            len(self.generated),
            exc,
        )
        if self.on_migrate is not None:
            self.on_migrate()
        return True

    def refused(self, exc: LLMeshError) -> LLMeshError:
        """The error to raise when a resumed start failed with ``exc`` before output: the
        original failure when the new replica cannot continue the request."""
        if self.migrations and isinstance(exc, FailedPrecondition) and self.cause is not None:
            self.counts[(self.start.model, "failed")] += 1
            return self.cause
        return exc

    def finished(self) -> None:
        """The request ended well; count it if it had moved."""
        if self.migrations:
            self.counts[(self.start.model, "resumed")] += 1


def name_worker(replica: common_pb2.Replica, exc: LLMeshError) -> LLMeshError:
    """Say which worker was unreachable; grpc's own message names only a socket error.

    Args:
        replica: the replica the call went to.
        exc: the error it ended with; returned as it is unless it is UNAVAILABLE.
    """
    if not isinstance(exc, Unavailable):
        return exc
    named = Unavailable(
        f"worker {replica.worker_id or '?'} at {replica.address} "
        f"(model {replica.model!r} replica {replica.index}) is unavailable: {exc}"
    )
    named.__cause__ = exc.__cause__
    return named


class Attempt:
    """One try of a request on one replica, as a ``with`` block around the call.

    Ends the count of the request on the replica that :meth:`Router.pick` started. When the
    block fails with UNAVAILABLE or RESOURCE_EXHAUSTED before any output (``received`` still
    False) the error is recorded in ``attempts`` and swallowed, so the caller's loop tries
    another replica; after output, or when no retry is left, it is raised with the worker
    named.

    Args:
        routes: the route cache.
        attempts: the request's retry bookkeeping.
        replica: the replica this try goes to.
    """

    def __init__(self, routes: RouteCache, attempts: Attempts, replica: common_pb2.Replica) -> None:
        self.routes = routes
        self.attempts = attempts
        self.replica = replica
        #: Set by the caller once the replica sent output; a failure after that is not retried.
        self.received = False

    def __enter__(self) -> Attempt:
        # The request was counted on the replica when it was picked (Router.pick).
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        try:
            if not isinstance(exc, (Unavailable, ResourceExhausted)):
                return False
            named = name_worker(self.replica, exc)
            if self.received:
                raise named from exc
            self.attempts.failed(self.routes, self.replica, named)
            return True  # retry on another replica
        finally:
            self.routes.finished(self.replica)


class Router:
    """A client's channels and route cache, shared by its sync and async transports.

    Args:
        control_plane: ``host:port`` of the control plane.
        policy: returns the load-balance policy to pick with (it may change between calls).
        pins: returns the replica pins for a purpose.
        first_route_timeout: how long the first request for a model waits for its route
            stream; None for the route cache's default.
        tls: TLS for every channel (control plane and replicas); None for plaintext.
        token: the bearer token every call carries; None sends none.
    """

    def __init__(
        self,
        control_plane: str,
        *,
        policy: Callable[[], int],
        pins: Callable[[int], dict[str, int]],
        first_route_timeout: float | None = None,
        tls: TlsConfig | None = None,
        token: str | None = None,
    ) -> None:
        self.control_plane = control_plane
        self.tls = tls
        self._policy = policy
        self._pins = pins
        self.pool = ChannelPool(tls=tls, token=token)
        route_kwargs = {}
        if first_route_timeout is not None:
            route_kwargs["first_snapshot_timeout"] = first_route_timeout
        self.routes = RouteCache(self.pool.get(control_plane), **route_kwargs)
        self.aio_channels = AioChannels(tls, token)
        #: Chat sessions per (event loop, worker address).
        self.sessions = Sessions(self.aio_worker)
        #: The event loop thread the sync API runs its sessions on.
        self.io = IoLoop()
        #: Mid-stream failovers per (model, outcome: "resumed" or "failed").
        self.migrations: collections.Counter[tuple[str, str]] = collections.Counter()
        self.closed = False

    def close(self) -> None:
        """Stop the route watches and close the sync channels. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self.io.close(self._close_io)
        self.routes.close()
        self.pool.close()

    async def _close_io(self) -> None:
        await self.sessions.close()
        await self.aio_channels.close()

    def check_open(self) -> None:
        """Raise FailedPrecondition once the client is closed."""
        if self.closed:
            raise FailedPrecondition("this ByzerLLM client is closed; create a new one")

    def unavailable_control_plane(self, exc: Unavailable) -> Unavailable:
        """An outage of the control plane, naming the address that was tried."""
        return Unavailable(
            f"the control plane at {self.control_plane} is unavailable: {exc}"
            + connect_hint(str(exc), self.tls)
        )

    def pick(
        self,
        model: str,
        purpose: int,
        attempts: Attempts,
        affinity_key: str = "",
        decision: RouteDecision | None = None,
    ) -> common_pb2.Replica:
        """A replica for the next try of a request (may block on a model's first routes).

        The request is counted on the replica in the same step as the choice (so a burst of
        concurrent picks spreads evenly); run the try in :meth:`attempt`, which ends the count.

        Args:
            model: the model.
            purpose: a ``Purpose`` value, for pins.
            attempts: the request's retry bookkeeping; replicas tried already are skipped.
            affinity_key: requests with the same key go to the same replica.
            decision: filled in with why the replica was chosen (tracing only).

        Raises:
            LLMeshError: no replica is left; the last worker error when there was one.
        """
        try:
            return self.routes.pick(
                model,
                purpose=purpose,
                policy=self._policy(),
                purpose_pins=self._pins(purpose),
                affinity_key=affinity_key,
                exclude=attempts.tried,
                start=True,
                decision=decision,
            )
        except LLMeshError as exc:
            # Having run out of replicas to retry on, report why the last one failed.
            if attempts.last_error is not None:
                raise attempts.last_error from None
            if isinstance(exc, Unavailable):  # only the control plane is asked while picking
                raise self.unavailable_control_plane(exc) from exc
            raise

    def attempt(self, attempts: Attempts, replica: common_pb2.Replica) -> Attempt:
        """One try on ``replica`` (see :class:`Attempt`)."""
        return Attempt(self.routes, attempts, replica)

    def failover(
        self,
        start: inf.ChatStart,
        max_migrations: int,
        on_migrate: Callable[[], None] | None = None,
    ) -> Failover:
        """Failover bookkeeping for one chat request (see :class:`Failover`)."""
        return Failover(start, max_migrations, self.routes, self.migrations, on_migrate)

    def live_addresses(self, model: str) -> list[str]:
        """Addresses of the workers with a READY or DRAINING replica of ``model``."""
        try:
            replicas = self.routes.replicas(model)
        except Unavailable as exc:
            raise self.unavailable_control_plane(exc) from exc
        return sorted({r.address for r in replicas if r.address and r.state in LIVE_STATES})

    def worker(self, address: str) -> inf_grpc.InferenceServiceStub:
        """A sync stub for the worker at ``address``."""
        self.check_open()
        return inf_grpc.InferenceServiceStub(self.pool.get(address))

    def aio_worker(self, address: str) -> inf_grpc.InferenceServiceStub:
        """A grpc.aio stub for the worker at ``address`` on the running loop."""
        self.check_open()
        return inf_grpc.InferenceServiceStub(self.aio_channels.get(address))

    def control(self) -> cp_grpc.ControlPlaneServiceStub:
        """A sync stub for the control plane."""
        self.check_open()
        return cp_grpc.ControlPlaneServiceStub(self.pool.get(self.control_plane))

    def aio_control(self) -> cp_grpc.ControlPlaneServiceStub:
        """A grpc.aio stub for the control plane on the running loop."""
        self.check_open()
        return cp_grpc.ControlPlaneServiceStub(self.aio_channels.get(self.control_plane))
