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

import aetcd

from llmesh.common.etcd_keys import Keys, encode
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp

log = logging.getLogger(__name__)


class WorkerSession:
    """Lease + keepalive + the keys published under the lease.

    Writes that fail (etcd briefly unreachable) are not lost: the key is marked dirty and the
    keepalive loop writes it again, every tick, until etcd takes it.

    Args:
        client: a connected aetcd client.
        keys: the namespace's key builder.
        worker: the worker record to publish.
        ttl: lease time-to-live in seconds; a dead worker leaves routing within ttl + ~1 s.
    """

    def __init__(
        self, client: aetcd.Client, keys: Keys, worker: cp.Worker, *, ttl: int = 5
    ) -> None:
        self.client = client
        self.keys = keys
        self.worker = worker
        self.ttl = max(2, int(ttl))
        self.lease: aetcd.Lease | None = None
        self.done = asyncio.Event()
        # What etcd should hold under our lease; a key absent here but in _dirty is a delete.
        self._published: dict[bytes, bytes] = {}
        self._dirty: set[bytes] = set()
        self._keepalive: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        # One flush at a time, so two writes of one key cannot land out of order.
        self._flush_lock = asyncio.Lock()

    async def __aenter__(self) -> WorkerSession:
        self._published[self.keys.worker(self.worker.id)] = encode(self.worker)
        await self._grant()
        await self._flush()
        if self._dirty:
            raise ConnectionError("etcd refused the worker record")
        self._keepalive = asyncio.create_task(self._keepalive_loop(), name="lease-keepalive")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _grant(self) -> None:
        lease = await asyncio.wait_for(self.client.lease(self.ttl), timeout=self.ttl)
        async with self._lock:
            self.lease = lease
            # Everything we hold must be written again under the new lease.
            self._dirty |= set(self._published)
        log.info("worker %s registered with lease %x (ttl %ss)", self.worker.id, lease.id, self.ttl)

    async def _write(self, key: bytes) -> bool:
        value = self._published.get(key)
        try:
            if value is None:
                await asyncio.wait_for(self.client.delete(key), timeout=self.ttl)
            else:
                await asyncio.wait_for(
                    self.client.put(key, value, lease=self.lease), timeout=self.ttl
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - retried by the keepalive loop
            log.warning("writing %s to etcd failed (%s); retrying", key.decode(), exc)
            return False
        return True

    async def _flush(self) -> None:
        """Write every dirty key; those that fail stay dirty for the next tick."""
        async with self._flush_lock:
            for key in list(self._dirty):
                self._dirty.discard(key)
                if not await self._write(key):
                    self._dirty.add(key)
                    return  # etcd is down; don't hammer it key by key

    async def _keepalive_loop(self) -> None:
        interval = self.ttl / 3
        while not self.done.is_set():
            await asyncio.sleep(interval)
            try:
                # Bounded by the interval: a refresh that takes longer is as good as lost.
                resp = await asyncio.wait_for(
                    self.client.refresh_lease(self.lease.id), timeout=interval
                )
                if getattr(resp, "TTL", 1) <= 0:
                    raise LookupError("lease expired")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: get a new lease
                if self.done.is_set():
                    return
                log.warning("lease keepalive failed (%r); re-registering", exc)
                try:
                    await self._grant()
                except asyncio.CancelledError:
                    raise
                except Exception as exc2:  # noqa: BLE001 - etcd down: keep trying
                    log.warning("re-register failed: %r", exc2)
                    continue
            if self._dirty:
                await self._flush()

    async def put(self, key: bytes, value: bytes) -> None:
        """Publish a key under the lease (written again after a failure or a lease loss)."""
        self._published[key] = value
        self._dirty.add(key)
        if not self.done.is_set():
            await self._flush()

    async def delete(self, key: bytes) -> None:
        """Remove a published key (retried like puts)."""
        self._published.pop(key, None)
        self._dirty.add(key)
        if not self.done.is_set():
            await self._flush()

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
