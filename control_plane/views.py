"""Building the API's read models (Model with replicas, Worker with usage) from the registry.

A model's ``replicas`` are the published statuses of its current generation, plus a placeholder
for each assignment whose worker has not published a status yet:

* ``REPLICA_STATE_LOADING`` (reason empty): the assigned worker is live and has not reported
  yet; it is picking the assignment up or loading the model.
* ``REPLICA_STATE_UNSPECIFIED`` (reason says so): the assigned worker is not registered, because
  it died or has not started. It may come back; otherwise the reconcile loop moves the replica.

* ``REPLICA_STATE_PENDING`` (no worker_id; reason says why, naming the workers and who holds
  their room): no live worker has room for the replica now; the reconcile loop places it once
  room frees up. An adapter's replica is PENDING while its base model's replica is.

Placeholders carry model, index, worker_id and generation (and the worker's address when
known), never ``inflight``; AssignWorker never picks them because they are not READY. Every
replica shows the device ids its assignment holds when the worker's own status lacks them.
"""

from __future__ import annotations

from llmesh.control_plane.placement import capacities, pending_reason
from llmesh.control_plane.registry import Registry
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp


def current_replicas(registry: Registry, spec: cp.Model) -> list[common_pb2.Replica]:
    """The replicas of the model's current generation, sorted by (index, worker_id)."""
    generation = spec.generation
    workers = registry.workers()
    assignments = registry.assignments(spec.name)
    out: dict[tuple[str, int], common_pb2.Replica] = {}
    for (worker_id, gen, index), status in registry.replicas(spec.name).items():
        if gen != generation:
            continue  # an older deployment draining, or a newer one the mirror is ahead on
        replica = common_pb2.Replica()
        replica.CopyFrom(status)
        if not replica.address and worker_id in workers:
            replica.address = workers[worker_id].address
        assigned = assignments.get((worker_id, index))
        if not replica.devices and assigned is not None:
            replica.devices.extend(assigned.devices)
        out[(worker_id, index)] = replica
    for (worker_id, index), assignment in assignments.items():
        if (worker_id, index) in out or assignment.generation not in (0, generation):
            continue
        placeholder = common_pb2.Replica(
            model=spec.name,
            index=index,
            worker_id=worker_id,
            generation=generation,
            devices=assignment.devices,
        )
        worker = workers.get(worker_id)
        if worker is not None:
            placeholder.state = common_pb2.REPLICA_STATE_LOADING
            placeholder.address = worker.address
        else:
            placeholder.state = common_pb2.REPLICA_STATE_UNSPECIFIED
            placeholder.reason = (
                f"worker {worker_id} is not registered (it stopped, or has not started yet)"
            )
        out[(worker_id, index)] = placeholder
    assigned_indexes = {index for _, index in out}
    for index, reason in _pending(registry, spec).items():
        if index not in assigned_indexes:
            out[("", index)] = common_pb2.Replica(
                model=spec.name,
                index=index,
                generation=generation,
                state=common_pb2.REPLICA_STATE_PENDING,
                reason=reason,
            )
    return sorted(out.values(), key=lambda r: (r.index, r.worker_id))


def _pending(registry: Registry, spec: cp.Model) -> dict[int, str]:
    """Pending replica indexes of the model's current generation and why each waits."""
    if spec.base_model:
        # An adapter waits wherever its base model's replica waits.
        base = registry.models().get(spec.base_model)
        if base is None:
            return {}
        return {
            index: f"base model {base.name}'s replica {index} is PENDING: {reason}"
            for index, reason in _pending(registry, base).items()
        }
    waiting = [
        index
        for index, replica in registry.pending(spec.name).items()
        if replica.generation in (0, spec.generation)
    ]
    if not waiting:
        return {}
    caps = capacities(registry.workers().values(), registry.all_assignments(), registry.models())
    reason = pending_reason(spec, caps)  # the same for every replica of one model
    return dict.fromkeys(sorted(waiting), reason)


def model_view(registry: Registry, name: str) -> cp.Model | None:
    """The model with its replicas, or None when it is not deployed."""
    spec = registry.models().get(name)
    if spec is None:
        return None
    return with_replicas(registry, spec)


def with_replicas(registry: Registry, spec: cp.Model) -> cp.Model:
    """A copy of ``spec`` with ``replicas`` filled from the registry."""
    model = cp.Model()
    model.CopyFrom(spec)
    del model.replicas[:]
    model.replicas.extend(current_replicas(registry, spec))
    return model


def worker_views(registry: Registry) -> list[cp.Worker]:
    """Live workers sorted by id, with cpus_used, gpus_used, replicas ("model/index") and
    each device's holders and free share."""
    caps = capacities(registry.workers().values(), registry.all_assignments(), registry.models())
    out = []
    for worker_id in sorted(registry.workers()):
        worker = cp.Worker()
        worker.CopyFrom(registry.workers()[worker_id])
        cap = caps[worker_id]
        worker.cpus_used = cap.cpus_used
        worker.gpus_used = cap.gpus_used
        del worker.replicas[:]
        worker.replicas.extend(cap.replicas)
        declared = {d.id: d for d in worker.devices}
        del worker.devices[:]
        for use in cap.devices:
            device = worker.devices.add()
            if use.id in declared:
                device.CopyFrom(declared[use.id])
                del device.holders[:]
            device.id = use.id
            device.holders.extend(use.holders)
            device.free = use.free
        if not worker.gpus and cap.devices:
            worker.gpus = len(cap.devices)  # a worker that listed devices but gave no count
        out.append(worker)
    return out
