"""Placement: which workers get a model's replicas. Pure functions, no I/O.

A worker declares CPUs and GPUs; every assignment on it reserves its model's
``cpus_per_replica`` / ``gpus_per_replica``. Replicas of one model spread over distinct workers
first; two land on one worker only when no other worker has room. Among equal candidates the
worker with the most free capacity wins, then the smallest worker id, so two control planes
planning from the same state choose the same workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from llmesh.common.errors import FailedPrecondition
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp

INFERENCE_KINDS = ("inference", "")  # "" is a worker that did not say; treat it as inference

# Capacities are sums of floats like 0.1; compare with a little slack.
_EPSILON = 1e-9


@dataclass
class Capacity:
    """A live worker's declared and reserved resources."""

    worker_id: str
    kind: str
    cpus: float
    gpus: float
    cpus_used: float = 0.0
    gpus_used: float = 0.0
    replicas: list[str] = field(default_factory=list)  # "model/index"

    @property
    def free_cpus(self) -> float:
        return self.cpus - self.cpus_used

    @property
    def free_gpus(self) -> float:
        return self.gpus - self.gpus_used

    def fits(self, cpus: float, gpus: float) -> bool:
        """Whether one more replica needing ``cpus``/``gpus`` fits."""
        return cpus <= self.free_cpus + _EPSILON and gpus <= self.free_gpus + _EPSILON

    def reserve(self, cpus: float, gpus: float, label: str) -> None:
        self.cpus_used += cpus
        self.gpus_used += gpus
        self.replicas.append(label)

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
    """Capacity of each live worker, with what the assignments on it reserve.

    Args:
        workers: live workers.
        assignments: assignments by model, then any key.
        models: model specs by name (an assignment's reservation comes from its model).
        exclude: (model, indexes) whose assignments are being moved and so reserve nothing.
    """
    out = {w.id: Capacity(worker_id=w.id, kind=w.kind, cpus=w.cpus, gpus=w.gpus) for w in workers}
    skip_model, skip_indexes = (exclude[0], set(exclude[1])) if exclude else ("", set())
    for model_name, per_model in assignments.items():
        model = models.get(model_name)
        for replica in per_model.values():
            cap = out.get(replica.worker_id)
            if cap is None:
                continue
            if model_name == skip_model and replica.index in skip_indexes:
                continue
            cpus = model.cpus_per_replica if model else 0.0
            gpus = model.gpus_per_replica if model else 0.0
            cap.reserve(cpus, gpus, f"{model_name}/{replica.index}")
    for cap in out.values():
        cap.replicas.sort(key=_label_order)
    return out


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
) -> dict[int, str]:
    """Choose a worker for each replica index of ``model``.

    Args:
        model: the normalized model spec (cpus/gpus per replica, num_replicas).
        workers: capacities of live workers; not modified.
        indexes: which replica indexes to place; default all of them.
        hosting: replicas of this model already on each worker (for re-placing some of them).
        partial: skip the indexes that fit nowhere instead of raising.

    Returns:
        index -> worker_id (only the placed indexes when ``partial``).

    Raises:
        FailedPrecondition: some replica fits nowhere; the message says what was needed and
            what each worker has free.
    """
    if indexes is None:
        indexes = range(model.num_replicas)
    cpus, gpus = model.cpus_per_replica, model.gpus_per_replica
    pool = {
        wid: Capacity(c.worker_id, c.kind, c.cpus, c.gpus, c.cpus_used, c.gpus_used, [])
        for wid, c in workers.items()
        if c.kind in INFERENCE_KINDS
    }
    count = dict.fromkeys(pool, 0)
    for wid, n in (hosting or {}).items():
        if wid in count:
            count[wid] = n
    plan: dict[int, str] = {}
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
                -c.free_gpus if gpus > 0 else 0.0,
                -c.free_cpus,
                c.worker_id,
            ),
        )
        best.reserve(cpus, gpus, f"{model.name}/{index}")
        count[best.worker_id] += 1
        plan[index] = best.worker_id
    return plan


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
    return (
        f"cannot place {need}: only {placed} fit on the live workers ({have}); add workers, "
        "undeploy another model or ask for fewer resources per replica"
    )


def _num(x: float) -> str:
    return f"{x:g}"
