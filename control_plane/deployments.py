"""Writing desired state: deploy, undeploy and re-place replicas in revision-fenced transactions.

Every write compares the placement key's mod_revision with what the mirror read and bumps it,
so two control planes (or a control plane and its own stale mirror) never place against
capacity that changed underneath them: the loser's compare fails, it catches up to the winner's
revision and decides again. The counter stored in the placement key gives each new deployment
its generation.

A deploy whose replicas do not all fit now, but would fit on some live worker if it were empty,
is accepted: the replicas that fit are assigned and the others get a pending key; the reconcile
loop (:meth:`Deployer.place_pending`) assigns them when room frees up, deleting the pending key
in the same fenced transaction, so each replica is placed exactly once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from llmesh.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from llmesh.common.etcd import EtcdKV, Op, absent, delete_op, mod_revision_is, put_op
from llmesh.common.etcd_keys import Keys, encode
from llmesh.control_plane.placement import Slot, capacities, pending_reason, place, plan_replicas
from llmesh.control_plane.registry import Fence, Registry
from llmesh.control_plane.spec import describe_difference, same_spec
from llmesh.control_plane.views import current_replicas, with_replicas
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp

log = logging.getLogger(__name__)

_STATE = common_pb2.ReplicaState


class Deployer:
    """Deploys and undeploys models through fenced etcd transactions.

    Args:
        registry: the mirror to plan from and to wait on.
        kv: the etcd client to write with.
        keys: the namespace's key layout.
        max_attempts: how many times a write is retried after losing a race.
    """

    def __init__(
        self, registry: Registry, kv: EtcdKV, keys: Keys, *, max_attempts: int = 16
    ) -> None:
        self.registry = registry
        self.kv = kv
        self.keys = keys
        self.max_attempts = max_attempts

    def _bump(self, fence: Fence) -> tuple[int, Op]:
        counter = fence.counter + 1
        return counter, put_op(self.keys.placement, str(counter).encode())

    async def _catch_up(self, revision: int) -> None:
        try:
            await self.registry.wait_for_revision(revision)
        except Unavailable:
            # The write is committed either way; readers just see it a little later.
            log.warning("registry did not reach revision %d in time", revision)

    async def deploy(self, spec: cp.Model) -> cp.Model:
        """Deploy a normalized spec, or return the deployed model when it is the same spec.

        Returns:
            The model as stored (generation set, no replicas).

        Raises:
            AlreadyExists: a model with that name is deployed with a different spec.
            FailedPrecondition: no live worker could hold a replica even if it were empty (or
                none is registered); nothing is written. Replicas that only lack room NOW
                are recorded pending instead.
            Unavailable: etcd is unreachable.
        """
        name = spec.name
        # Decide on state at least as new as this call, so a worker that just registered or a
        # deployment another control plane just made is taken into account.
        await self.registry.sync()
        for _ in range(self.max_attempts):
            if spec.base_model:
                spec = self._adapter_spec(spec)
            existing = self.registry.models().get(name)
            if existing is not None:
                if same_spec(existing, spec):
                    return _copy(existing)
                raise AlreadyExists(
                    f"model {name!r} is already deployed with a different spec "
                    f"({describe_difference(existing, spec)}); undeploy it first"
                )
            fence = self.registry.fence()
            caps = capacities(
                self.registry.workers().values(),
                self.registry.all_assignments(),
                self.registry.models(),
            )
            waiting: list[int] = []
            if spec.base_model:
                # An adapter is served where its base model's replicas are, nowhere else, and
                # holds no devices of its own.
                plan = {i: Slot(w) for w, i in self.registry.assignments(spec.base_model)}
            else:
                plan, waiting = plan_replicas(spec, caps)
            generation, bump = self._bump(fence)
            stored = _copy(spec)
            stored.generation = generation
            ops = [bump, put_op(self.keys.model(name), encode(stored))]
            ops.extend(self._assign_ops(name, generation, plan))
            reason = pending_reason(spec, caps, plan) if waiting else ""
            for index in waiting:
                pending = common_pb2.Replica(
                    model=name,
                    index=index,
                    generation=generation,
                    state=_STATE.REPLICA_STATE_PENDING,
                    reason=reason,
                )
                ops.append(put_op(self.keys.pending(name, index), encode(pending)))
            for index in self.registry.pending(name):
                if index not in waiting:
                    # Left over from a deployment of the same name that is gone.
                    ops.append(delete_op(self.keys.pending(name, index)))
            compare = [
                mod_revision_is(self.keys.placement, fence.mod_revision),
                absent(self.keys.model(name)),
            ]
            if spec.base_model:
                base_revision = self.registry.model_revision(spec.base_model)
                compare.append(mod_revision_is(self.keys.model(spec.base_model), base_revision))
            response = await self.kv.txn(compare, ops)
            await self._catch_up(response.header.revision)
            if response.succeeded:
                log.info(
                    "deployed %s generation %d: %s%s",
                    name,
                    generation,
                    _describe_plan(plan),
                    f"; pending {waiting}: {reason}" if waiting else "",
                )
                return stored
            log.debug("deploy of %s lost a placement race; retrying", name)
        raise Unavailable(
            f"could not deploy {name!r}: placement changed under it {self.max_attempts} times "
            "in a row; retry"
        )

    def _assign_ops(self, name: str, generation: int, plan: dict[int, Slot]) -> list[Op]:
        """Puts of the assignments in ``plan``, each naming the devices it holds."""
        ops = []
        for index, (worker_id, devices) in sorted(plan.items()):
            assignment = common_pb2.Replica(
                model=name,
                index=index,
                worker_id=worker_id,
                generation=generation,
                devices=devices,
            )
            ops.append(put_op(self.keys.assignment(worker_id, name, index), encode(assignment)))
        return ops

    def _adapter_spec(self, spec: cp.Model) -> cp.Model:
        """The adapter's spec with its base model's backend and replica count filled in."""
        base = self.registry.models().get(spec.base_model)
        if base is None:
            raise FailedPrecondition(
                f"base model {spec.base_model!r} of adapter {spec.name!r} is not deployed; "
                "deploy the base model first"
            )
        if base.base_model:
            raise FailedPrecondition(
                f"{spec.base_model!r} is itself an adapter (of {base.base_model!r}); name a full "
                "model as base_model"
            )
        out = _copy(spec)
        out.backend = base.backend
        out.num_replicas = base.num_replicas
        return out

    def adapters_of(self, name: str) -> list[str]:
        """Deployed adapters whose base model is ``name``."""
        return sorted(m.name for m in self.registry.models().values() if m.base_model == name)

    async def undeploy(self, name: str) -> cp.Model:
        """Delete the model, its assignments and its pending replicas in one transaction.

        Returns:
            The spec that was undeployed.

        Raises:
            NotFound: no model of that name is deployed.
            Unavailable: etcd is unreachable.
        """
        await self.registry.sync()
        for _ in range(self.max_attempts):
            spec = self.registry.models().get(name)
            if spec is None:
                raise NotFound(f"model {name!r} is not deployed (ListModels shows what is)")
            adapters = self.adapters_of(name)
            if adapters:
                raise FailedPrecondition(
                    f"model {name!r} serves adapters {', '.join(adapters)}; undeploy them first"
                )
            spec = _copy(spec)
            fence = self.registry.fence()
            _, bump = self._bump(fence)
            ops = [bump, delete_op(self.keys.model(name))]
            for worker_id, index in self.registry.assignments(name):
                ops.append(delete_op(self.keys.assignment(worker_id, name, index)))
            for index in self.registry.pending(name):
                ops.append(delete_op(self.keys.pending(name, index)))
            response = await self.kv.txn(
                [
                    mod_revision_is(self.keys.placement, fence.mod_revision),
                    mod_revision_is(self.keys.model(name), self.registry.model_revision(name)),
                ],
                ops,
            )
            await self._catch_up(response.header.revision)
            if response.succeeded:
                log.info("undeployed %s generation %d", name, spec.generation)
                return spec
        raise Unavailable(
            f"could not undeploy {name!r}: placement changed under it {self.max_attempts} times "
            "in a row; retry"
        )

    async def replace(self, lost_workers: set[str]) -> int:
        """Move replicas assigned to ``lost_workers`` onto live workers with capacity.

        Replicas that fit nowhere stay where they are and are tried again next time.

        Returns:
            How many replicas were moved.
        """
        moved = 0
        models = self.registry.models()
        # Base models first: adapters then follow their base's new placement.
        names = sorted(
            self.registry.all_assignments(),
            key=lambda n: (bool(models[n].base_model) if n in models else False, n),
        )
        for name in names:
            for _ in range(self.max_attempts):
                result = await self._replace_model(name, lost_workers)
                if result is not None:
                    moved += result
                    break
        return moved

    async def _replace_model(self, name: str, lost: set[str]) -> int | None:
        """One fenced attempt for one model; None means the race was lost (retry)."""
        spec = self.registry.models().get(name)
        if spec is not None and spec.base_model:
            return await self._follow_base(spec)
        assignments = self.registry.assignments(name)
        moving = sorted((w, i) for w, i in assignments if w in lost)
        if spec is None or not moving:
            return 0
        fence = self.registry.fence()
        live = self.registry.workers()
        caps = capacities(live.values(), self.registry.all_assignments(), self.registry.models())
        hosting = Counter(w for w, _ in assignments if w not in lost and w in live)
        plan = place(spec, caps, indexes=[i for _, i in moving], hosting=hosting, partial=True)
        if not plan:
            log.warning(
                "cannot re-place replicas %s of %s: no live worker has room",
                [i for _, i in moving],
                name,
            )
            return 0
        _, bump = self._bump(fence)
        ops = [bump]
        for worker_id, index in moving:
            if index in plan:
                ops.append(delete_op(self.keys.assignment(worker_id, name, index)))
        ops.extend(self._assign_ops(name, spec.generation, plan))
        response = await self.kv.txn(
            [
                mod_revision_is(self.keys.placement, fence.mod_revision),
                mod_revision_is(self.keys.model(name), self.registry.model_revision(name)),
            ],
            ops,
        )
        await self._catch_up(response.header.revision)
        if not response.succeeded:
            return None
        log.info("re-placed %s replicas from lost workers: %s", name, _describe_plan(plan))
        return len(plan)

    async def place_pending(self) -> int:
        """Assign pending replicas that fit now; older deployments first.

        Each model is one fenced transaction that deletes the pending keys it places; stale
        pending keys (of a deployment that is gone) are deleted the same way. Adapters follow
        their base models to the new replicas in :meth:`follow_adapters`.

        Returns:
            How many replicas were placed.
        """
        placed = 0
        models = self.registry.models()
        names = sorted(
            self.registry.all_pending(),
            key=lambda n: (models[n].generation if n in models else 0, n),
        )
        for name in names:
            for _ in range(self.max_attempts):
                result = await self._place_pending_model(name)
                if result is not None:
                    placed += result
                    break
        return placed

    async def _place_pending_model(self, name: str) -> int | None:
        """One fenced attempt for one model; None means the race was lost (retry)."""
        spec = self.registry.models().get(name)
        pending = self.registry.pending(name)
        assigned = {i for _, i in self.registry.assignments(name)}
        stale = sorted(
            i
            for i, r in pending.items()
            if spec is None
            or spec.base_model
            or r.generation not in (0, spec.generation)
            or i >= spec.num_replicas
            or i in assigned
        )
        waiting = sorted(set(pending) - set(stale))
        fence = self.registry.fence()
        plan: dict[int, Slot] = {}
        if spec is not None and waiting:
            live = self.registry.workers()
            caps = capacities(
                live.values(), self.registry.all_assignments(), self.registry.models()
            )
            hosting = Counter(w for w, _ in self.registry.assignments(name) if w in live)
            plan = place(spec, caps, indexes=waiting, hosting=hosting, partial=True)
        if not plan and not stale:
            return 0
        _, bump = self._bump(fence)
        ops = [bump]
        ops.extend(delete_op(self.keys.pending(name, i)) for i in sorted([*stale, *plan]))
        if spec is not None:
            ops.extend(self._assign_ops(name, spec.generation, plan))
        response = await self.kv.txn(
            [
                mod_revision_is(self.keys.placement, fence.mod_revision),
                mod_revision_is(self.keys.model(name), self.registry.model_revision(name)),
            ],
            ops,
        )
        await self._catch_up(response.header.revision)
        if not response.succeeded:
            return None
        if plan:
            log.info("placed pending replicas of %s: %s", name, _describe_plan(plan))
        if stale:
            log.info("dropped stale pending replicas %s of %s", stale, name)
        return len(plan)

    async def follow_adapters(self) -> int:
        """Give every adapter its base model's placement; returns how many assignments it added."""
        added = 0
        for name in sorted(n for n, m in self.registry.models().items() if m.base_model):
            for _ in range(self.max_attempts):
                spec = self.registry.models().get(name)
                if spec is None:
                    break
                result = await self._follow_base(spec)
                if result is not None:
                    added += result
                    break
        return added

    async def _follow_base(self, spec: cp.Model) -> int | None:
        """Give an adapter exactly its base model's placement; None means a lost race."""
        name, base = spec.name, spec.base_model
        want = set(self.registry.assignments(base))
        have = set(self.registry.assignments(name))
        if want == have:
            return 0
        fence = self.registry.fence()
        _, bump = self._bump(fence)
        ops = [bump]
        for worker_id, index in sorted(have - want):
            ops.append(delete_op(self.keys.assignment(worker_id, name, index)))
        for worker_id, index in sorted(want - have):
            assignment = common_pb2.Replica(
                model=name, index=index, worker_id=worker_id, generation=spec.generation
            )
            ops.append(put_op(self.keys.assignment(worker_id, name, index), encode(assignment)))
        response = await self.kv.txn(
            [
                mod_revision_is(self.keys.placement, fence.mod_revision),
                mod_revision_is(self.keys.model(name), self.registry.model_revision(name)),
                mod_revision_is(self.keys.model(base), self.registry.model_revision(base)),
            ],
            ops,
        )
        await self._catch_up(response.header.revision)
        if not response.succeeded:
            return None
        log.info("adapter %s follows base model %s to %s", name, base, sorted(want))
        return len(want - have)

    async def wait_ready(self, name: str, generation: int, *, timeout: float) -> cp.Model:
        """Wait until every replica of this generation is READY.

        Raises:
            FailedPrecondition: a replica FAILED (with its reason), or the model was undeployed.
            DeadlineExceeded: not all READY in time; says which are not.
        """

        def check() -> cp.Model | None:
            spec = self.registry.models().get(name)
            if spec is None or spec.generation != generation:
                raise FailedPrecondition(f"model {name!r} was undeployed while waiting for it")
            replicas = current_replicas(self.registry, spec)
            for r in replicas:
                if r.state == _STATE.REPLICA_STATE_FAILED:
                    raise FailedPrecondition(
                        f"replica {r.index} of model {name!r} failed on worker {r.worker_id}: "
                        f"{r.reason or 'no reason given'}; the model stays deployed, undeploy it, "
                        "fix the cause and deploy again"
                    )
            ready = {r.index for r in replicas if r.state == _STATE.REPLICA_STATE_READY}
            if ready.issuperset(range(spec.num_replicas)):
                return with_replicas(self.registry, spec)
            return None

        try:
            return await self.registry.wait_until(check, timeout=timeout)
        except TimeoutError:
            spec = self.registry.models().get(name)
            pending = _describe_pending(
                current_replicas(self.registry, spec) if spec else [], want_ready=True
            )
            raise DeadlineExceeded(
                f"model {name!r} is deployed, but not every replica is READY after "
                f"{timeout:g} s ({pending}); it stays deployed: watch it with GetModel, or "
                "check the worker's log"
            ) from None

    async def wait_unloaded(self, name: str, generation: int, *, timeout: float) -> None:
        """Wait until no replica of ``name`` up to ``generation`` is published any more.

        Raises:
            DeadlineExceeded: some replicas are still unloading; names them.
        """

        def leftovers() -> list[common_pb2.Replica]:
            return sorted(
                (r for (_, gen, _), r in self.registry.replicas(name).items() if gen <= generation),
                key=lambda r: (r.index, r.worker_id),
            )

        try:
            await self.registry.wait_until(
                lambda: True if not leftovers() else None, timeout=timeout
            )
        except TimeoutError:
            raise DeadlineExceeded(
                f"model {name!r} is undeployed, but replicas are still unloading after "
                f"{timeout:g} s ({_describe_pending(leftovers(), want_ready=False)}); "
                "they finish on their own"
            ) from None


def _copy(model: cp.Model) -> cp.Model:
    out = cp.Model()
    out.CopyFrom(model)
    return out


def _describe_pending(replicas: Sequence[common_pb2.Replica], *, want_ready: bool) -> str:
    parts = []
    for r in replicas:
        if want_ready and r.state == _STATE.REPLICA_STATE_READY:
            continue
        if r.state == _STATE.REPLICA_STATE_PENDING:
            parts.append(f"replica {r.index} is PENDING: {r.reason}")
            continue
        if r.state == _STATE.REPLICA_STATE_UNSPECIFIED:
            # A placeholder: assigned to a worker that is not registered.
            parts.append(f"replica {r.index} waits for worker {r.worker_id} to register")
            continue
        state = _STATE.Name(r.state).removeprefix("REPLICA_STATE_")
        parts.append(f"replica {r.index} on {r.worker_id or '?'} is {state}")
    return "; ".join(parts) or "no replica has reported"


def _describe_plan(plan: dict[int, Slot]) -> str:
    """E.g. "0->w1[0,1], 1->w2" for the log."""
    return ", ".join(
        f"{i}->{w}" + (f"[{','.join(d)}]" if d else "") for i, (w, d) in sorted(plan.items())
    )
