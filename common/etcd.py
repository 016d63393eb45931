"""A thin asyncio etcd v3 client for the control plane, over aetcd's generated stubs.

aetcd's high-level ``Client`` hides three things the registry depends on: the response header of
a transaction (its revision, for read-your-writes), whole watch responses (etcd sends one
revision's events together, so applying a response applies a transaction atomically), and watch
progress requests (to learn that the mirror has caught up with a revision that touched other
namespaces). So this module talks to etcd's KV and Watch services directly through the stubs
aetcd ships, and turns transport failures into :class:`llmesh.errors.Unavailable`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import aetcd
import grpc
from aetcd import rpc, watcher
from aetcd.utils import prefix_range_end

from llmesh.common.errors import FailedPrecondition, Internal, Unavailable
from llmesh.common.etcd_keys import parse_endpoint
from llmesh.common.etcd_security import EtcdSecurity, EtcdToken, etcd_channel, is_stale_token

log = logging.getLogger(__name__)

# Keepalive finds a dead etcd behind a silent network; etcd's default enforcement allows pings
# every 5 s, and only while a stream (our watch) is open.
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]

# A worker's aetcd client: without keepalives a half-open connection to etcd hangs its
# assignment and job watches for minutes.
WORKER_CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
}


class _CheckedWatcher(watcher.Watcher):
    """aetcd's watcher, except that a watch etcd refuses at creation is an error.

    etcd refuses a new watch on an open stream whose token it no longer knows (the token
    expired or etcd restarted since the stream opened; a missing permission too) with a single
    response that has both ``created`` and ``canceled`` set. aetcd 1.0 takes that for a created
    watch, which then never delivers an event. Here it raises :class:`WatchEnded` instead:
    aetcd then ends the whole stream and fails the pending ``watch`` call with it, the token is
    dropped, and the caller's retry opens a new stream that authenticates again.
    """

    def __init__(self, *args: Any, token: EtcdToken | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._token = token

    async def _handle_response(self, response: rpc.WatchResponse) -> None:
        # A compacted start revision also comes as created+canceled; aetcd reports that one.
        if response.created and response.canceled and not response.compact_revision:
            if self._token is not None and is_stale_token(None, response.cancel_reason):
                self._token.forget()
            raise WatchEnded(
                f"etcd refused the watch: {response.cancel_reason or 'no reason given'}; "
                "watch again (a stale token is renewed on the next attempt), and check the "
                "etcd user's read permission on the key if it keeps failing"
            )
        await super()._handle_response(response)


class _SecuredClient(aetcd.Client):
    """aetcd's client on a channel from :func:`etcd_channel`.

    aetcd 1.0 opens a plaintext channel in ``connect`` (it has user/password but no TLS), so
    this is its ``connect`` with that one line replaced; authentication is the channel's
    token interceptor, which also refreshes a token etcd has forgotten. Its watcher is
    :class:`_CheckedWatcher`, so a watch refused for a stale token fails instead of hanging.
    """

    def __init__(self, *args: object, security: EtcdSecurity | None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._security = security

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            self.channel, token = etcd_channel(
                f"{self._host}:{self._port}", self._security, list(self._options.items())
            )
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = _CheckedWatcher(
                rpc.WatchStub(self.channel),
                timeout=self._timeout,
                metadata=self.metadata,
                token=token,
            )
            self._connected.set()
        finally:
            self._is_connecting = False


def worker_client(
    endpoint: str | None = None, *, security: EtcdSecurity | None = None
) -> aetcd.Client:
    """The aetcd client a worker uses for its lease, watches and record writes.

    Args:
        endpoint: etcd ``host:port``; None means ``LLMESH_ETCD`` or 127.0.0.1:2379.
        security: TLS and user/password for etcd; None for plaintext without authentication.
    """
    host, port = parse_endpoint(endpoint)
    if security is None:
        return aetcd.Client(host=host, port=port, timeout=10, options=WORKER_CHANNEL_OPTIONS)
    return _SecuredClient(
        host=host, port=port, timeout=10, options=WORKER_CHANNEL_OPTIONS, security=security
    )


_OUTAGE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}

KeyValue = rpc.KeyValue
TxnResponse = rpc.TxnResponse
WatchResponse = rpc.WatchResponse
Op = rpc.RequestOp
Compare = rpc.Compare


class WatchCompacted(Exception):
    """The watch's start revision was compacted away; the caller must list again."""


class WatchEnded(Exception):
    """etcd closed or cancelled the watch stream."""


def put_op(key: bytes, value: bytes) -> Op:
    """A transaction operation writing ``key``."""
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))


def delete_op(key: bytes) -> Op:
    """A transaction operation deleting exactly ``key``."""
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))


def get_op(key: bytes) -> Op:
    """A transaction operation reading exactly ``key``."""
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))


def mod_revision_is(key: bytes, revision: int) -> Compare:
    """Compare: ``key`` was last written at ``revision`` (0 means it does not exist)."""
    return rpc.Compare(
        key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=revision
    )


def absent(key: bytes) -> Compare:
    """Compare: ``key`` does not exist."""
    return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.VERSION, version=0)


class EtcdKV:
    """KV and Watch calls against one etcd endpoint.

    Args:
        endpoint: ``host:port`` of etcd; None means ``LLMESH_ETCD`` or 127.0.0.1:2379.
        timeout: deadline for each unary call, in seconds.
        security: TLS and user/password for etcd; None for plaintext without authentication.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = 5.0,
        security: EtcdSecurity | None = None,
    ) -> None:
        host, port = parse_endpoint(endpoint)
        self.endpoint = f"{host}:{port}"
        self.timeout = timeout
        self.security = security
        self._token: EtcdToken | None = None
        self._channel: grpc.aio.Channel | None = None
        self._kv: rpc.KVStub | None = None
        self._watch: rpc.WatchStub | None = None

    def _stubs(self) -> tuple[rpc.KVStub, rpc.WatchStub]:
        # Created lazily: grpc.aio channels belong to the loop that is running when they are made.
        if self._channel is None:
            self._channel, self._token = etcd_channel(
                self.endpoint, self.security, _CHANNEL_OPTIONS
            )
            self._kv = rpc.KVStub(self._channel)
            self._watch = rpc.WatchStub(self._channel)
        assert self._kv is not None and self._watch is not None
        return self._kv, self._watch

    async def close(self) -> None:
        """Close the channel; open watches end with :class:`WatchEnded`."""
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    def _translate(self, err: grpc.aio.AioRpcError) -> Exception:
        if err.code() in _OUTAGE_CODES:
            return Unavailable(
                f"etcd at {self.endpoint} is unreachable ({err.code().name}: {err.details()}); "
                "retry once it is back"
            )
        details = err.details() or ""
        if (
            err.code()
            in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
            )
            or is_stale_token(err.code(), details)
            or "authentication failed" in details
        ):
            return FailedPrecondition(
                f"etcd at {self.endpoint} refused llmesh's credentials ({details}); check "
                "--etcd-user / --etcd-password (or LLMESH_ETCD_USER / LLMESH_ETCD_PASSWORD) "
                "and the user's role"
            )
        return Internal(f"etcd at {self.endpoint} failed: {err.code().name}: {err.details()}")

    async def range_prefix(
        self,
        prefix: bytes,
        *,
        timeout: float | None = None,
        limit: int = 0,
        newest_first: bool = False,
    ) -> rpc.RangeResponse:
        """Every key under ``prefix`` in one consistent read (header.revision is its revision).

        ``limit`` caps the keys returned (0: all); ``newest_first`` sorts by key, descending.
        """
        kv, _ = self._stubs()
        request = rpc.RangeRequest(key=prefix, range_end=prefix_range_end(prefix), limit=limit)
        if newest_first:
            request.sort_order = rpc.RangeRequest.DESCEND
            request.sort_target = rpc.RangeRequest.KEY
        try:
            return await kv.Range(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as err:
            raise self._translate(err) from err

    async def get(self, key: bytes, *, timeout: float | None = None) -> rpc.RangeResponse:
        """Read one key (``kvs`` is empty when it does not exist)."""
        kv, _ = self._stubs()
        try:
            return await kv.Range(rpc.RangeRequest(key=key), timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as err:
            raise self._translate(err) from err

    async def current_revision(self, *, timeout: float | None = None) -> int:
        """The store's revision now: every write committed before this call is at or below it."""
        kv, _ = self._stubs()
        # A count-only read of a key nobody writes is the cheapest linearizable request.
        request = rpc.RangeRequest(key=b"\0llmesh-revision-probe", count_only=True)
        try:
            response = await kv.Range(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as err:
            raise self._translate(err) from err
        return response.header.revision

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
        *,
        timeout: float | None = None,
    ) -> rpc.TxnResponse:
        """One etcd transaction; ``header.revision`` is the revision it wrote (or saw)."""
        kv, _ = self._stubs()
        request = rpc.TxnRequest(
            compare=list(compare), success=list(success), failure=list(failure)
        )
        try:
            return await kv.Txn(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as err:
            raise self._translate(err) from err

    def watch(self, prefix: bytes, *, start_revision: int) -> WatchStream:
        """A watch on every key under ``prefix`` from ``start_revision`` (inclusive)."""
        _, watch = self._stubs()
        return WatchStream(self, watch, prefix, start_revision)


class WatchStream:
    """One etcd watch, used as ``async with kv.watch(...) as stream: await stream.read()``."""

    def __init__(self, kv: EtcdKV, stub: rpc.WatchStub, prefix: bytes, start_revision: int) -> None:
        self._kv = kv
        self._stub = stub
        self._prefix = prefix
        self._start_revision = start_revision
        self._call: grpc.aio.StreamStreamCall | None = None

    async def __aenter__(self) -> WatchStream:
        self._call = self._stub.Watch()
        create = rpc.WatchCreateRequest(
            key=self._prefix,
            range_end=prefix_range_end(self._prefix),
            start_revision=self._start_revision,
        )
        try:
            await self._call.write(rpc.WatchRequest(create_request=create))
            first = await self._read_raw()
        except BaseException:
            self._call.cancel()
            raise
        if first.compact_revision:
            self._call.cancel()
            raise WatchCompacted(
                f"revision {self._start_revision} is compacted (oldest {first.compact_revision})"
            )
        if not first.created or first.canceled:
            self._call.cancel()
            token = self._kv._token
            if token is not None and is_stale_token(None, first.cancel_reason):
                # etcd refuses a watch in its first message, not with a status: the next
                # attempt must authenticate again.
                token.forget()
            raise WatchEnded(f"etcd refused the watch: {first.cancel_reason or first}")
        if first.events:  # never seen in practice, but do not drop them if etcd sends any
            self._pending: WatchResponse | None = first
        else:
            self._pending = None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def _read_raw(self) -> WatchResponse:
        assert self._call is not None
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise self._kv._translate(err) from err
        if response is grpc.aio.EOF:
            raise WatchEnded("etcd closed the watch stream")
        return response

    async def read(self) -> WatchResponse:
        """The next response: events of one or more revisions, or a progress notification.

        Raises:
            WatchCompacted: etcd compacted past what this watch had not yet delivered.
            WatchEnded: etcd cancelled the watch.
            Unavailable: the connection to etcd broke.
        """
        if self._pending is not None:
            response, self._pending = self._pending, None
            return response
        response = await self._read_raw()
        if response.compact_revision:
            raise WatchCompacted(f"etcd compacted the watch at {response.compact_revision}")
        if response.canceled:
            raise WatchEnded(f"etcd cancelled the watch: {response.cancel_reason}")
        return response

    async def request_progress(self) -> None:
        """Ask etcd to report the revision this watch has delivered everything up to.

        etcd answers with an empty response whose header carries the revision, but only when
        the watch is caught up; callers retry.
        """
        if self._call is None:
            return
        try:
            await self._call.write(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError) as err:
            log.debug("watch progress request failed: %s", err)
