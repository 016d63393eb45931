"""The reconcile loop: pending replicas are placed once room frees up, and replicas whose
worker stays gone are moved to live workers.

A deploy records the replicas that found no room as pending; each pass places those that fit
now (an undeploy freed room, a worker joined). A worker that dies loses its lease and its keys,
but its assignments are durable: it gets them back if it returns within the grace period. After
that the replicas move. Adapters then follow their base models' replicas. All of it happens in
the same fenced transaction style as a deploy, so several control planes may run the loop at
once and each replica is placed exactly once.
"""

from __future__ import annotations

import asyncio
import logging

from llmesh.control_plane.deployments import Deployer
from llmesh.control_plane.registry import Change, Registry

log = logging.getLogger(__name__)


class LostWorkerReplacer:
    """Places pending replicas, and moves replicas off workers gone for ``grace`` seconds.

    Args:
        registry: the mirror to watch.
        deployer: writes the placements and moves.
        grace: how long a worker may be gone before its replicas move; None never moves them
            (pending replicas are still placed).
        interval: the longest time between two passes, in seconds; a change to models,
            assignments, pending replicas or workers starts a pass sooner.
    """

    def __init__(
        self,
        registry: Registry,
        deployer: Deployer,
        *,
        grace: float | None = 30.0,
        interval: float = 1.0,
    ) -> None:
        self.registry = registry
        self.deployer = deployer
        self.grace = grace
        self.interval = interval
        # When this control plane first saw each assigned worker missing. A restart forgets it,
        # which only delays a move by one grace period.
        self._missing_since: dict[str, float] = {}
        self._wake = asyncio.Event()

    def _on_change(self, change: Change) -> None:
        # Not on replica statuses alone: workers publish those often, and they free no room.
        if change.everything or change.placement:
            self._wake.set()

    async def run(self) -> None:
        """Look after every relevant change, and at least every ``interval`` seconds, until
        cancelled."""
        unsubscribe = self.registry.subscribe(self._on_change)
        try:
            while True:
                self._wake.clear()  # before the pass, so a change during it starts another
                try:
                    await self.tick()
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # noqa: BLE001 - one bad pass must not stop the loop
                    log.warning("reconcile pass failed: %s", err)
                # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that arrives as the event fires.
                waiter = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({waiter}, timeout=self.interval)
                finally:
                    waiter.cancel()
        finally:
            unsubscribe()

    async def tick(self) -> int:
        """One pass; returns how many replicas were placed or moved."""
        if not self.registry.connected:
            return 0  # the last known state may list workers that died meanwhile, or vice versa
        moved = 0
        if self.grace is not None:
            moved += await self._replace_lost(self.grace)
        if self.registry.all_pending():
            moved += await self.deployer.place_pending()
        # Adapters follow base replicas that were just placed (here or by another control
        # plane); a no-op without writes when every adapter already matches its base.
        await self.deployer.follow_adapters()
        return moved

    async def _replace_lost(self, grace: float) -> int:
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
        lost = {w for w, since in self._missing_since.items() if now - since >= grace}
        if not lost:
            return 0
        return await self.deployer.replace(lost)
