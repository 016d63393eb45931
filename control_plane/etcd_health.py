"""The control plane's health follows etcd: NOT_SERVING while etcd cannot take writes.

The control plane answers reads from its mirror of etcd, so it could keep saying SERVING through
an etcd outage, yet every deploy, undeploy and job change would fail. A load balancer or an
operator asking ``grpc.health.v1`` should hear the truth: a probe (a linearizable read, which
needs the same quorum as a write) runs every ``interval`` seconds; after ``failures`` failed
probes in a row the server's health is NOT_SERVING (one slow answer, a compaction or a leader
election, does not flap it), and the next good probe brings it back to SERVING. The same probe
feeds ``llmesh:etcd_reachable`` and ``llmesh:etcd_request_duration_seconds``. Write RPCs
themselves answer UNAVAILABLE naming etcd during the outage (``EtcdKV``), and reads keep
answering from the mirror, which is what clients' routes need.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from llmesh.common.etcd import EtcdKV
from llmesh.common.grpc_server import Server

if TYPE_CHECKING:
    from llmesh.common.metrics import ControlPlaneMetrics

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0
PROBE_FAILURES = 2


class EtcdHealth:
    """Probes etcd and sets ``server``'s health accordingly.

    Args:
        kv: the control plane's etcd client.
        server: the gRPC server whose health to set.
        interval: seconds between probes.
        timeout: seconds a probe may take before it counts as failed.
        failures: failed probes in a row that make etcd count as unreachable.
        metrics: where to record each probe (reachability and round-trip time), if anywhere.

    Attributes:
        reachable: whether etcd counts as reachable (no ``failures`` failed probes in a row).
        reason: why etcd counts as unreachable ("" while it is reachable).
    """

    def __init__(
        self,
        kv: EtcdKV,
        server: Server,
        *,
        interval: float = PROBE_INTERVAL_S,
        timeout: float = PROBE_TIMEOUT_S,
        failures: int = PROBE_FAILURES,
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        self.kv = kv
        self.server = server
        self.interval = interval
        self.timeout = timeout
        self.failures = max(1, failures)
        self.metrics = metrics
        self.reachable = True
        self.reason = ""
        self._failed = 0  # failed probes in a row

    async def probe(self) -> bool:
        """Probe once; set the health when reachability changed. Returns reachability."""
        began = time.perf_counter()
        try:
            await self.kv.current_revision(timeout=self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means etcd cannot take writes
            if self.metrics is not None:
                self.metrics.etcd_reachable.set(0)
            self._failed += 1
            reason = str(exc) or type(exc).__name__
            if self._failed < self.failures:
                log.info("etcd probe failed (%d in a row): %s", self._failed, reason)
                return self.reachable
            if self.reachable:
                log.warning("etcd unreachable, health NOT_SERVING: %s", reason)
                await self.server.set_not_serving()
            self.reachable, self.reason = False, reason
            return False
        if self.metrics is not None:
            self.metrics.etcd_latency.observe(time.perf_counter() - began)
            self.metrics.etcd_reachable.set(1)
        self._failed = 0
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
