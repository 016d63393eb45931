"""Worker registration in etcd: a lease, its keepalive, and the keys published under it.

A :class:`WorkerSession` is the worker's presence in the mesh. Everything it publishes (the
worker record and its replicas' status) hangs off one lease, so when the process dies etcd
deletes it all within the TTL and routing forgets the worker. If the lease is lost while the
process lives (a long etcd outage), the session grants a new one and re-publishes every key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aetcd

from llmesh.store import Keys, encode
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp

log = logging.getLogger(__name__)


class WorkerSession:
    """Lease + keepalive + the keys published under the lease.

    Args:
        client: a connected aetcd client.
        keys: the namespace's key builder.
        worker: the worker record to publish.
        ttl: lease time-to-live in seconds; a dead worker leaves routing within ttl + ~1 s.
        on_reregister: called after a lost lease was replaced, so callers can re-publish.
    """

    def __init__(
        self,
        client: aetcd.Client,
        keys: Keys,
        worker: cp.Worker,
        *,
        ttl: int = 5,
        on_reregister: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.worker = worker
        self.ttl = max(2, int(ttl))
        self.lease: aetcd.Lease | None = None
        self.done = asyncio.Event()
        self._published: dict[bytes, bytes] = {}
        self._keepalive: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> WorkerSession:
        await self._grant_and_publish()
        self._keepalive = asyncio.create_task(self._keepalive_loop(), name="lease-keepalive")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _grant_and_publish(self) -> None:
        async with self._lock:
            self.lease = await self.client.lease(self.ttl)
            self._published[self.keys.worker(self.worker.id)] = encode(self.worker)
            for key, value in list(self._published.items()):
                await self.client.put(key, value, lease=self.lease)
        log.info(
            "worker %s registered with lease %x (ttl %ss)", self.worker.id, self.lease.id, self.ttl
        )

    async def _keepalive_loop(self) -> None:
        interval = self.ttl / 3
        while not self.done.is_set():
            await asyncio.sleep(interval)
            try:
                resp = await self.client.refresh_lease(self.lease.id)
                if getattr(resp, "TTL", 1) <= 0:
                    raise LookupError("lease expired")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: get a new lease
                if self.done.is_set():
                    return
                log.warning("lease keepalive failed (%s); re-registering", exc)
                try:
                    await self._grant_and_publish()
                except asyncio.CancelledError:
                    raise
                except Exception as exc2:  # noqa: BLE001 - etcd down: keep trying
                    log.warning("re-register failed: %s", exc2)

    async def put(self, key: bytes, value: bytes) -> None:
        """Publish a key under the lease (remembered, re-published after a lease loss)."""
        self._published[key] = value
        if self.done.is_set():
            return
        try:
            await self.client.put(key, value, lease=self.lease)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the keepalive loop re-publishes later
            log.warning("publishing %s failed: %s", key.decode(), exc)

    async def delete(self, key: bytes) -> None:
        self._published.pop(key, None)
        with contextlib.suppress(Exception):
            await self.client.delete(key)

    async def publish_replica(self, replica: common_pb2.Replica) -> None:
        key = self.keys.replica(replica.model, replica.worker_id, replica.generation, replica.index)
        await self.put(key, encode(replica))

    async def remove_replica(self, replica: common_pb2.Replica) -> None:
        await self.delete(
            self.keys.replica(replica.model, replica.worker_id, replica.generation, replica.index)
        )

    async def close(self) -> None:
        """Stop the keepalive, then revoke the lease (bounded by the TTL)."""
        if self.done.is_set():
            return
        self.done.set()
        if self._keepalive:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._keepalive
        if self.lease is not None:
            try:
                await asyncio.wait_for(self.client.revoke_lease(self.lease.id), timeout=self.ttl)
            except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001
                log.warning("lease revoke failed (%s); etcd expires it within %ss", exc, self.ttl)
