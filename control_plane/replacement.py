"""The reconcile loop: replicas whose worker stays gone are placed on live workers.

A worker that dies loses its lease and its keys, but its assignments are durable: it gets them
back if it returns within the grace period. After that the replicas move, in the same fenced
transaction style as a deploy, so several control planes may run the loop at once.
"""

from __future__ import annotations

import asyncio
import logging

from llmesh.control_plane.deployments import Deployer
from llmesh.control_plane.registry import Registry

log = logging.getLogger(__name__)


class LostWorkerReplacer:
    """Moves replicas off workers that have been gone for longer than ``grace`` seconds.

    Args:
        registry: the mirror to watch.
        deployer: writes the moves.
        grace: how long a worker may be gone before its replicas move.
        interval: how often to look, in seconds.
    """

    def __init__(
        self, registry: Registry, deployer: Deployer, *, grace: float = 30.0, interval: float = 1.0
    ) -> None:
        self.registry = registry
        self.deployer = deployer
        self.grace = grace
        self.interval = interval
        # When this control plane first saw each assigned worker missing. A restart forgets it,
        # which only delays a move by one grace period.
        self._missing_since: dict[str, float] = {}

    async def run(self) -> None:
        """Look every ``interval`` seconds until cancelled."""
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - one bad pass must not stop the loop
                log.warning("reconcile pass failed: %s", err)
            await asyncio.sleep(self.interval)

    async def tick(self) -> int:
        """One pass; returns how many replicas were moved."""
        if not self.registry.connected:
            return 0  # the last known state may list workers that died meanwhile, or vice versa
        now = asyncio.get_running_loop().time()
        live = self.registry.workers()
        assigned = {
            w for per_model in self.registry.all_assignments().values() for w, _ in per_model
        }
        missing = assigned - set(live)
        for worker_id in list(self._missing_since):
            if worker_id not in missing:
                del self._missing_since[worker_id]
        for worker_id in missing:
            self._missing_since.setdefault(worker_id, now)
        lost = {w for w, since in self._missing_since.items() if now - since >= self.grace}
        if not lost:
            return 0
        return await self.deployer.replace(lost)
