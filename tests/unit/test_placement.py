"""Placement and spec normalization: pure functions, no servers."""

from __future__ import annotations

import pytest

from llmesh.common.errors import FailedPrecondition, InvalidArgument
from llmesh.control_plane.placement import Capacity, capacities, place
from llmesh.control_plane.spec import describe_difference, normalize, same_spec
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp


def caps(**workers: tuple[float, float]) -> dict[str, Capacity]:
    """Workers by id: (free cpus, free gpus); declared capacity is 8 CPUs, 2 GPUs."""
    return {
        wid: Capacity(wid, "inference", 8, 2, cpus_used=8 - cpus, gpus_used=2 - gpus)
        for wid, (cpus, gpus) in workers.items()
    }


def spec(n: int = 1, cpus: float = 1.0, gpus: float = 0.0, name: str = "m") -> cp.Model:
    return cp.Model(name=name, num_replicas=n, cpus_per_replica=cpus, gpus_per_replica=gpus)


def test_spreads_before_doubling_up() -> None:
    assert place(spec(2), caps(a=(8, 0), b=(2, 0))) == {0: "a", 1: "b"}
    assert place(spec(3), caps(a=(8, 0), b=(2, 0))) == {0: "a", 1: "b", 2: "a"}


def test_doubles_up_only_when_no_other_worker_fits() -> None:
    assert place(spec(2), caps(a=(8, 0), b=(0.5, 0))) == {0: "a", 1: "a"}


def test_ties_go_to_most_free_then_smallest_id() -> None:
    assert place(spec(1), caps(b=(4, 0), a=(4, 0), c=(2, 0))) == {0: "a"}
    assert place(spec(1), caps(a=(2, 0), b=(4, 0))) == {0: "b"}
    # GPU models prefer the worker with the most free GPUs even if it has fewer CPUs free.
    assert place(spec(1, gpus=1), caps(a=(8, 1), b=(2, 2))) == {0: "b"}


def test_no_capacity_names_the_need_and_the_workers() -> None:
    with pytest.raises(FailedPrecondition) as info:
        place(spec(3, cpus=4, name="big"), caps(a=(4, 0), b=(5, 0)))
    message = str(info.value)
    assert "3 replica(s) of model 'big', each needing 4 CPUs and 0 GPUs" in message
    assert "only 2 fit" in message
    assert "a has 4/8 CPUs and 0/2 GPUs free; b has 5/8 CPUs" in message
    with pytest.raises(FailedPrecondition, match="no inference worker is registered"):
        place(spec(1), {})


def test_non_inference_workers_are_not_used() -> None:
    trainer = {"t": Capacity("t", "trainer", 64, 8)}
    with pytest.raises(FailedPrecondition, match="no inference worker"):
        place(spec(1), trainer)


def test_partial_and_hosting_for_re_placement() -> None:
    # Replica 1 moves; "a" already hosts replica 0, so "b" is preferred despite less room.
    assert place(spec(2), caps(a=(8, 0), b=(1, 0)), indexes=[1], hosting={"a": 1}) == {1: "b"}
    assert place(spec(3, cpus=4), caps(a=(4, 0)), indexes=[0, 1], partial=True) == {0: "a"}


def test_capacities_count_assignments_by_model_spec() -> None:
    workers = [
        cp.Worker(id="w1", cpus=4, gpus=1, kind="inference"),
        cp.Worker(id="w2", cpus=4, kind="inference"),
    ]
    models = {"m": spec(2, cpus=1.5, gpus=0.5), "n": spec(1, cpus=1, name="n")}
    assignments = {
        "m": {
            ("w1", 0): common_pb2.Replica(model="m", index=0, worker_id="w1"),
            ("w1", 10): common_pb2.Replica(model="m", index=10, worker_id="w1"),
            ("gone", 1): common_pb2.Replica(model="m", index=1, worker_id="gone"),
        },
        "n": {("w1", 2): common_pb2.Replica(model="n", index=2, worker_id="w1")},
    }
    out = capacities(workers, assignments, models)
    assert (out["w1"].cpus_used, out["w1"].gpus_used) == (4.0, 1.0)
    assert out["w1"].replicas == ["m/0", "m/10", "n/2"]
    assert (out["w2"].cpus_used, out["w2"].replicas) == (0, [])
    assert set(out) == {"w1", "w2"}


def test_normalize_fills_defaults() -> None:
    out = normalize(cp.Model(name="chat", model_path="/m", replicas=[common_pb2.Replica()]))
    assert (out.backend, out.num_replicas, out.cpus_per_replica, out.gpus_per_replica) == (
        "transformers",
        1,
        1.0,
        0.0,
    )
    assert not out.replicas and out.generation == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "model.name is required"),
        ({"name": " chat"}, "is not valid"),
        ({"name": ".."}, "is not valid"),
        ({"name": "x" * 201}, "at most 200"),
        ({"model_path": " "}, "model.model_path is required"),
        ({"backend": "onnx"}, "model.backend 'onnx' is not supported"),
        ({"num_replicas": -3}, "model.num_replicas must be at least 1, got -3"),
        ({"cpus_per_replica": float("nan")}, "model.cpus_per_replica"),
        ({"gpus_per_replica": float("inf")}, "model.gpus_per_replica"),
        ({"infer_params": {" ": "v"}}, "model.infer_params has an empty key"),
        ({"infer_params": {"max_len": "8"}}, "unknown infer_params key 'max_len'"),
        (
            {"backend": "vllm", "infer_params": {"enforce_eager": "sometimes"}},
            "infer_params enforce_eager='sometimes' is not a boolean",
        ),
    ],
)
def test_normalize_rejects(fields: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"name": "chat", "model_path": "/m", **fields}
    with pytest.raises(InvalidArgument, match=message.replace(".", r"\.").replace("(", r"\(")):
        normalize(cp.Model(**base))  # type: ignore[arg-type]


def test_same_spec_ignores_generation_and_replicas() -> None:
    a = normalize(cp.Model(name="m", model_path="/m", infer_params={"dtype": "half"}))
    b = normalize(cp.Model(name="m", model_path="/m", backend="transformers", num_replicas=1))
    b.infer_params["dtype"] = "half"
    b.generation = 7
    assert same_spec(a, b)
    c = normalize(cp.Model(name="m", model_path="/other", infer_params={"dtype": "bf16"}))
    assert not same_spec(a, c)
    assert describe_difference(a, c) == (
        "model_path '/m' -> '/other', infer_params {'dtype': 'half'} -> {'dtype': 'bf16'}"
    )
