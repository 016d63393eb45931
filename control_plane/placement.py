"""Placement: which workers and which devices get a model's replicas. Pure functions, no I/O.

A worker declares CPUs and devices: ``Worker.devices`` (ids), or, for a worker that only gives
a count (``gpus`` = N, no devices list), the implicit ids "0".."N-1". Every assignment on a
worker reserves its model's ``cpus_per_replica`` and holds the device ids it names
(``Replica.devices``). ``gpus_per_replica`` says which devices a replica gets:

* 0: no device.
* a whole number k >= 1: k distinct devices, each wholly free before; the lowest ids first.
* a fraction 0 < g < 1: a share g of ONE device; best fit (the device whose free share is
  smallest but still >= g, then the lowest id), so two 0.5 replicas share one device.

Replicas of one model spread over distinct workers first; two land on one worker only when no
other worker has room. Among equal candidates the worker with the most free capacity wins, then
the smallest worker id, so two control planes planning from the same state choose the same
workers and the same device ids.

A replica that fits nowhere now but would fit on some live worker if that worker were empty
waits PENDING (:func:`plan_replicas`, :func:`pending_reason`); one that would fit on no live
worker even then fails the deploy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from llmesh.common.errors import FailedPrecondition
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp

INFERENCE_KINDS = ("inference", "")  # "" is a worker that did not say; treat it as inference

# Capacities are sums of floats like 0.1; compare with a little slack.
_EPSILON = 1e-9


def device_order(device_id: str) -> tuple[int, int, str]:
    """Sort key for device ids: numeric ids by number ("2" before "10"), then the others."""
    return (0, int(device_id), "") if device_id.isdigit() else (1, 0, device_id)


def device_ids(worker: cp.Worker) -> list[str]:
    """The worker's device ids, lowest first.

    Args:
        worker: a registered worker; its ``devices`` when listed, else ids "0".."gpus-1".
    """
    if worker.devices:
        ids = {d.id for d in worker.devices if d.id}
    else:
        ids = {str(i) for i in range(int(worker.gpus + _EPSILON))}
    return sorted(ids, key=device_order)


def device_share(gpus: float) -> float:
    """The share of each held device a replica needing ``gpus`` takes: 1 unless a fraction.

    Args:
        gpus: the model's ``gpus_per_replica``; 0 (a device listed anyway) holds it wholly.
    """
    return gpus if 0 < gpus < 1 else 1.0


class Slot(NamedTuple):
    """Where one replica goes: a worker and the device ids it holds there."""

    worker_id: str
    devices: tuple[str, ...] = ()


@dataclass
class DeviceUse:
    """One device of a worker and who holds how much of it."""

    id: str
    held: float = 0.0
    holders: list[str] = field(default_factory=list)  # "model/index"

    @property
    def free(self) -> float:
        """Share of the device nobody holds, from 0 to 1."""
        return max(0.0, 1.0 - self.held)


@dataclass
class Capacity:
    """A live worker's declared and reserved resources."""

    worker_id: str
    kind: str
    cpus: float
    devices: list[DeviceUse] = field(default_factory=list)  # lowest id first
    cpus_used: float = 0.0
    gpus_used: float = 0.0
    replicas: list[str] = field(default_factory=list)  # "model/index"

    @classmethod
    def of(cls, worker: cp.Worker) -> Capacity:
        """An empty capacity for a registered worker."""
        return cls(
            worker_id=worker.id,
            kind=worker.kind,
            cpus=worker.cpus,
            devices=[DeviceUse(i) for i in device_ids(worker)],
        )

    @property
    def gpus(self) -> int:
        return len(self.devices)

    @property
    def free_cpus(self) -> float:
        return self.cpus - self.cpus_used

    @property
    def free_gpus(self) -> float:
        return sum(d.free for d in self.devices)

    def pick(self, gpus: float) -> tuple[str, ...] | None:
        """The device ids one more replica needing ``gpus`` would hold; None when none fit."""
        if gpus <= 0:
            return ()
        if gpus < 1:
            fitting = [d for d in self.devices if d.free + _EPSILON >= gpus]
            if not fitting:
                return None
            best = min(fitting, key=lambda d: (round(d.free, 9), device_order(d.id)))
            return (best.id,)
        wanted = round(gpus)
        free = [d.id for d in self.devices if d.held <= _EPSILON]
        return tuple(free[:wanted]) if len(free) >= wanted else None

    def fits(self, cpus: float, gpus: float) -> bool:
        """Whether one more replica needing ``cpus``/``gpus`` fits."""
        return cpus <= self.free_cpus + _EPSILON and self.pick(gpus) is not None

    def reserve(self, cpus: float, gpus: float, label: str, devices: Sequence[str]) -> None:
        """Count a replica needing ``cpus``/``gpus`` as placed here, holding ``devices``."""
        self.cpus_used += cpus
        self.gpus_used += gpus
        self.replicas.append(label)
        self.hold(devices, gpus, label)

    def hold(self, devices: Sequence[str], gpus: float, label: str) -> None:
        """Mark ``devices`` as held by ``label`` (each by ``device_share(gpus)``)."""
        by_id = {d.id: d for d in self.devices}
        for device_id in devices:
            device = by_id.get(device_id)
            if device is None:
                continue  # the worker no longer declares it; nothing to hold
            device.held += device_share(gpus)
            device.holders.append(label)

    def copy(self) -> Capacity:
        """A deep copy, to plan on without changing this one."""
        return Capacity(
            worker_id=self.worker_id,
            kind=self.kind,
            cpus=self.cpus,
            devices=[DeviceUse(d.id, d.held, list(d.holders)) for d in self.devices],
            cpus_used=self.cpus_used,
            gpus_used=self.gpus_used,
            replicas=list(self.replicas),
        )

    def empty(self) -> Capacity:
        """The same worker with nothing placed on it."""
        return Capacity(
            self.worker_id, self.kind, self.cpus, [DeviceUse(d.id) for d in self.devices]
        )

    def describe(self) -> str:
        return (
            f"{self.worker_id} has {_num(max(self.free_cpus, 0))}/{_num(self.cpus)} CPUs and "
            f"{_num(max(self.free_gpus, 0))}/{_num(self.gpus)} GPUs free"
        )


def capacities(
    workers: Iterable[cp.Worker],
    assignments: Mapping[str, Mapping[object, common_pb2.Replica]],
    models: Mapping[str, cp.Model],
    *,
    exclude: tuple[str, Iterable[int]] | None = None,
) -> dict[str, Capacity]:
    """Capacity of each live worker, with what the assignments on it reserve and hold.

    An assignment written before assignments named their devices (a GPU model, no ``devices``)
    is given the devices it would get now, after every assignment that names its own, so
    counts and ids stay consistent.

    Args:
        workers: live workers.
        assignments: assignments by model, then any key.
        models: model specs by name (an assignment's reservation comes from its model).
        exclude: (model, indexes) whose assignments are being moved and so reserve nothing.
    """
    out = {w.id: Capacity.of(w) for w in workers}
    skip_model, skip_indexes = (exclude[0], set(exclude[1])) if exclude else ("", set())
    unnamed: list[tuple[Capacity, float, str]] = []
    for model_name in sorted(assignments):
        model = models.get(model_name)
        for replica in sorted(assignments[model_name].values(), key=_replica_order):
            cap = out.get(replica.worker_id)
            if cap is None:
                continue
            if model_name == skip_model and replica.index in skip_indexes:
                continue
            cpus = model.cpus_per_replica if model else 0.0
            gpus = model.gpus_per_replica if model else 0.0
            label = f"{model_name}/{replica.index}"
            cap.reserve(cpus, gpus, label, replica.devices)
            if gpus > 0 and not replica.devices:
                unnamed.append((cap, gpus, label))
    for cap, gpus, label in unnamed:
        cap.hold(cap.pick(gpus) or (), gpus, label)
    for cap in out.values():
        cap.replicas.sort(key=_label_order)
        for device in cap.devices:
            device.holders.sort(key=_label_order)
    return out


def _replica_order(replica: common_pb2.Replica) -> tuple[int, str]:
    return replica.index, replica.worker_id


def _label_order(label: str) -> tuple[str, int]:
    model, _, index = label.rpartition("/")
    return model, int(index) if index.isdigit() else -1


def place(
    model: cp.Model,
    workers: Mapping[str, Capacity],
    *,
    indexes: Sequence[int] | None = None,
    hosting: Mapping[str, int] | None = None,
    partial: bool = False,
) -> dict[int, Slot]:
    """Choose a worker and devices for each replica index of ``model``.

    Args:
        model: the normalized model spec (cpus/gpus per replica, num_replicas).
        workers: capacities of live workers; not modified.
        indexes: which replica indexes to place; default all of them.
        hosting: replicas of this model already on each worker (for re-placing some of them).
        partial: skip the indexes that fit nowhere instead of raising.

    Returns:
        index -> Slot (only the placed indexes when ``partial``).

    Raises:
        FailedPrecondition: some replica fits nowhere; the message says what was needed and
            what each worker has free.
    """
    if indexes is None:
        indexes = range(model.num_replicas)
    cpus, gpus = model.cpus_per_replica, model.gpus_per_replica
    pool = {wid: c.copy() for wid, c in workers.items() if c.kind in INFERENCE_KINDS}
    count = dict.fromkeys(pool, 0)
    for wid, n in (hosting or {}).items():
        if wid in count:
            count[wid] = n
    plan: dict[int, Slot] = {}
    for index in indexes:
        fitting = [c for c in pool.values() if c.fits(cpus, gpus)]
        if not fitting:
            if partial:
                continue
            raise FailedPrecondition(_no_capacity(model, len(plan), len(indexes), workers))
        # Fewest replicas of this model first (spread), then most free GPUs when the model needs
        # GPUs, then most free CPUs, then the smallest id.
        best = min(
            fitting,
            key=lambda c: (
                count[c.worker_id],
                -round(c.free_gpus, 9) if gpus > 0 else 0.0,
                -round(c.free_cpus, 9),
                c.worker_id,
            ),
        )
        devices = best.pick(gpus) or ()
        best.reserve(cpus, gpus, f"{model.name}/{index}", devices)
        count[best.worker_id] += 1
        plan[index] = Slot(best.worker_id, devices)
    return plan


def could_ever_fit(model: cp.Model, workers: Mapping[str, Capacity]) -> bool:
    """Whether one replica of ``model`` fits on some live inference worker if it were empty."""
    return any(
        c.kind in INFERENCE_KINDS and c.empty().fits(model.cpus_per_replica, model.gpus_per_replica)
        for c in workers.values()
    )


def plan_replicas(
    model: cp.Model, workers: Mapping[str, Capacity]
) -> tuple[dict[int, Slot], list[int]]:
    """Place the replicas that fit now; the others wait PENDING if they could ever fit.

    Args:
        model: the normalized model spec.
        workers: capacities of live workers; not modified.

    Returns:
        (index -> Slot for the replicas placed now, indexes that wait PENDING).

    Raises:
        FailedPrecondition: no inference worker is registered, or none is big enough for one
            replica even with nothing else on it; the message says what each worker has.
    """
    plan = place(model, workers, partial=True)
    waiting = [i for i in range(model.num_replicas) if i not in plan]
    if waiting and not could_ever_fit(model, workers):
        raise FailedPrecondition(_no_capacity(model, len(plan), model.num_replicas, workers))
    return plan, waiting


def pending_reason(
    model: cp.Model, workers: Mapping[str, Capacity], placed: Mapping[int, Slot] | None = None
) -> str:
    """Why a replica of ``model`` waits: per worker that could hold it, what it has, who holds it.

    Args:
        model: the normalized model spec.
        workers: capacities of live workers; not modified.
        placed: replicas of ``model`` being placed along with it (not yet in ``workers``).
    """
    cpus, gpus = model.cpus_per_replica, model.gpus_per_replica
    if placed:
        workers = {wid: c.copy() for wid, c in workers.items()}
        for index, (worker_id, devices) in placed.items():
            if worker_id in workers:
                workers[worker_id].reserve(cpus, gpus, f"{model.name}/{index}", devices)
    need = f"{_num(cpus)} CPUs" + (f" and {_gpu_need(gpus)}" if gpus > 0 else "")
    candidates = sorted(
        (c for c in workers.values() if c.kind in INFERENCE_KINDS and c.empty().fits(cpus, gpus)),
        key=lambda c: c.worker_id,
    )
    if not candidates:
        return (
            f"waiting for an inference worker with room for {need}: no live worker is big "
            "enough; it is placed when one registers"
        )
    parts = [_shortage(c, cpus, gpus) for c in candidates]
    return f"waiting for room for {need}: {'; '.join(parts)}; it is placed once room frees up"


def _shortage(cap: Capacity, cpus: float, gpus: float) -> str:
    """What ``cap`` lacks for one replica, naming who holds it."""
    pieces = []
    if gpus > 0 and cap.pick(gpus) is None:
        n = cap.gpus
        held = [d for d in cap.devices if d.held > _EPSILON]
        holders = _and(_unique(h for d in held for h in d.holders))
        gpu_word = f"{n} GPU" + ("" if n == 1 else "s")
        if gpus < 1:
            pieces.append(f"{gpu_word}, none with a {_num(gpus)} share free (held by {holders})")
        elif len(held) == n:
            every = "held" if n == 1 else "both held" if n == 2 else "all held"
            pieces.append(f"{gpu_word}, {every} by {holders}")
        else:
            pieces.append(f"{gpu_word}, {n - len(held)} free and {len(held)} held by {holders}")
    if cpus > cap.free_cpus + _EPSILON:
        holders = _and(cap.replicas)
        pieces.append(
            f"{_num(cap.cpus)} CPUs, {_num(max(cap.free_cpus, 0))} free (held by {holders})"
        )
    if not pieces:
        return f"worker {cap.worker_id} has room now (the replica is being placed)"
    return f"worker {cap.worker_id} has " + ", and ".join(pieces)


def _gpu_need(gpus: float) -> str:
    if gpus < 1:
        return f"a {_num(gpus)} share of one GPU"
    return f"{_num(gpus)} whole GPU" + ("" if gpus == 1 else "s")


def _unique(items: Iterable[str]) -> list[str]:
    return sorted(set(items), key=_label_order)


def _and(items: Sequence[str]) -> str:
    if not items:
        return "nobody"
    if len(items) == 1:
        return items[0]
    return f"{', '.join(items[:-1])} and {items[-1]}"


def _no_capacity(model: cp.Model, placed: int, wanted: int, workers: Mapping[str, Capacity]) -> str:
    need = (
        f"{wanted} replica(s) of model {model.name!r}, each needing "
        f"{_num(model.cpus_per_replica)} CPUs and {_num(model.gpus_per_replica)} GPUs"
    )
    inference = sorted(
        (c for c in workers.values() if c.kind in INFERENCE_KINDS), key=lambda c: c.worker_id
    )
    if not inference:
        return (
            f"cannot place {need}: no inference worker is registered; start one "
            "(llmesh inference-worker) and deploy again"
        )
    have = "; ".join(c.describe() for c in inference)
    if not could_ever_fit(model, workers):
        return (
            f"cannot place {need}: no live inference worker is big enough for one replica even "
            f"with nothing else on it ({have}); add a bigger worker or ask for fewer resources "
            "per replica"
        )
    return (
        f"cannot place {need}: only {placed} fit on the live workers ({have}); add workers, "
        "undeploy another model or ask for fewer resources per replica"
    )


def _num(x: float) -> str:
    return f"{x:g}"
