"""The control plane's health follows etcd: NOT_SERVING while etcd cannot take writes.

The control plane answers reads from its mirror of etcd, so it could keep saying SERVING through
an etcd outage, yet every deploy, undeploy and job change would fail. A load balancer or an
operator asking ``grpc.health.v1`` should hear the truth: a probe (a linearizable read, which
needs the same quorum as a write) runs every ``interval`` seconds; after a failed probe the
server's health is NOT_SERVING, and the next good probe brings it back to SERVING. Write RPCs
themselves answer UNAVAILABLE naming etcd during the outage (``EtcdKV``), and reads keep
answering from the mirror, which is what clients' routes need.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from llmesh.common.etcd import EtcdKV
from llmesh.common.grpc_server import Server

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0


class EtcdHealth:
    """Probes etcd and sets ``server``'s health accordingly.

    Args:
        kv: the control plane's etcd client.
        server: the gRPC server whose health to set.
        interval: seconds between probes.
        timeout: seconds a probe may take before etcd counts as unreachable.

    Attributes:
        reachable: whether the last probe succeeded.
        reason: why etcd counts as unreachable ("" while it is reachable).
    """

    def __init__(
        self,
        kv: EtcdKV,
        server: Server,
        *,
        interval: float = PROBE_INTERVAL_S,
        timeout: float = PROBE_TIMEOUT_S,
    ) -> None:
        self.kv = kv
        self.server = server
        self.interval = interval
        self.timeout = timeout
        self.reachable = True
        self.reason = ""

    async def probe(self) -> bool:
        """Probe once; set the health when reachability changed. Returns reachability."""
        try:
            await self.kv.current_revision(timeout=self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means etcd cannot take writes
            reason = str(exc) or type(exc).__name__
            if self.reachable:
                log.warning("etcd unreachable, health NOT_SERVING: %s", reason)
                await self.server.set_not_serving()
            self.reachable, self.reason = False, reason
            return False
        if not self.reachable:
            log.warning("etcd at %s reachable again, health SERVING", self.kv.endpoint)
            await self.server.set_serving()
        self.reachable, self.reason = True, ""
        return True

    async def run(self) -> None:
        """Probe until cancelled."""
        while True:
            await self.probe()
            await asyncio.sleep(self.interval)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[EtcdHealth]:
        """Probe in a task for the duration of the block (stopped before the server drains,
        so that a good probe cannot turn a draining server back to SERVING)."""
        task = asyncio.create_task(self.run(), name="etcd-health")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
