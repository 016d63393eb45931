"""Placement and spec normalization: pure functions, no servers."""

from __future__ import annotations

import pytest

from llmesh.common.errors import FailedPrecondition, InvalidArgument
from llmesh.control_plane.placement import (
    Capacity,
    DeviceUse,
    Slot,
    capacities,
    device_ids,
    pending_reason,
    place,
    plan_replicas,
)
from llmesh.control_plane.spec import describe_difference, normalize, same_spec
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp


def caps(**workers: tuple[float, int]) -> dict[str, Capacity]:
    """Workers by id: (free cpus, free whole gpus); declared capacity is 8 CPUs, 2 GPUs."""
    out = {}
    for wid, (cpus, gpus) in workers.items():
        devices = [DeviceUse("0"), DeviceUse("1")]
        for i in range(2 - gpus):
            devices[i].held, devices[i].holders = 1.0, [f"other/{i}"]
        out[wid] = Capacity(wid, "inference", 8, devices, cpus_used=8 - cpus, gpus_used=2 - gpus)
    return out


def on(plan: dict[int, Slot]) -> dict[int, str]:
    """The worker of each placed index."""
    return {i: slot.worker_id for i, slot in plan.items()}


def spec(n: int = 1, cpus: float = 1.0, gpus: float = 0.0, name: str = "m") -> cp.Model:
    return cp.Model(name=name, num_replicas=n, cpus_per_replica=cpus, gpus_per_replica=gpus)


def test_spreads_before_doubling_up() -> None:
    assert on(place(spec(2), caps(a=(8, 0), b=(2, 0)))) == {0: "a", 1: "b"}
    assert on(place(spec(3), caps(a=(8, 0), b=(2, 0)))) == {0: "a", 1: "b", 2: "a"}


def test_doubles_up_only_when_no_other_worker_fits() -> None:
    assert on(place(spec(2), caps(a=(8, 0), b=(0.5, 0)))) == {0: "a", 1: "a"}


def test_ties_go_to_most_free_then_smallest_id() -> None:
    assert on(place(spec(1), caps(b=(4, 0), a=(4, 0), c=(2, 0)))) == {0: "a"}
    assert on(place(spec(1), caps(a=(2, 0), b=(4, 0)))) == {0: "b"}
    # GPU models prefer the worker with the most free GPUs even if it has fewer CPUs free.
    assert place(spec(1, gpus=1), caps(a=(8, 1), b=(2, 2))) == {0: Slot("b", ("0",))}


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
    trainer = {"t": Capacity.of(cp.Worker(id="t", kind="trainer", cpus=64, gpus=8))}
    with pytest.raises(FailedPrecondition, match="no inference worker"):
        place(spec(1), trainer)


def test_partial_and_hosting_for_re_placement() -> None:
    # Replica 1 moves; "a" already hosts replica 0, so "b" is preferred despite less room.
    plan = place(spec(2), caps(a=(8, 0), b=(1, 0)), indexes=[1], hosting={"a": 1})
    assert on(plan) == {1: "b"}
    assert on(place(spec(3, cpus=4), caps(a=(4, 0)), indexes=[0, 1], partial=True)) == {0: "a"}


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


# -- device ids -----------------------------------------------------------------------------


def _deploy_on(
    workers: list[cp.Worker],
    models: dict[str, cp.Model],
    assignments: dict[str, dict[tuple[str, int], common_pb2.Replica]],
    model: cp.Model,
) -> dict[int, Slot]:
    """Place ``model`` against what is assigned, then record its assignments like a deploy."""
    plan = place(model, capacities(workers, assignments, models), partial=True)
    models[model.name] = model
    assignments[model.name] = {
        (slot.worker_id, i): common_pb2.Replica(
            model=model.name, index=i, worker_id=slot.worker_id, devices=slot.devices
        )
        for i, slot in plan.items()
    }
    return plan


def test_device_ids_for_whole_and_shared_gpus() -> None:
    workers = [cp.Worker(id="w", cpus=16, gpus=4, kind="inference")]
    models: dict[str, cp.Model] = {}
    assignments: dict[str, dict[tuple[str, int], common_pb2.Replica]] = {}
    assert _deploy_on(workers, models, assignments, spec(1, gpus=1, name="one")) == {
        0: Slot("w", ("0",))
    }
    assert _deploy_on(workers, models, assignments, spec(1, gpus=2, name="two")) == {
        0: Slot("w", ("1", "2"))
    }
    # Two half-GPU replicas share the last device (best fit), and never touch whole ones.
    assert _deploy_on(workers, models, assignments, spec(2, gpus=0.5, name="half")) == {
        0: Slot("w", ("3",)),
        1: Slot("w", ("3",)),
    }
    # A fifth whole GPU does not fit: every device is held.
    assert _deploy_on(workers, models, assignments, spec(1, gpus=1, name="more")) == {}
    [cap] = capacities(workers, assignments, models).values()
    assert [(d.id, d.holders, d.free) for d in cap.devices] == [
        ("0", ["one/0"], 0.0),
        ("1", ["two/0"], 0.0),
        ("2", ["two/0"], 0.0),
        ("3", ["half/0", "half/1"], 0.0),
    ]
    assert cap.gpus_used == 4.0


def test_whole_gpu_replicas_never_share_an_id() -> None:
    workers = [cp.Worker(id="w", cpus=16, gpus=4, kind="inference")]
    plan = place(spec(4, gpus=1), capacities(workers, {}, {}))
    assert sorted(d for slot in plan.values() for d in slot.devices) == ["0", "1", "2", "3"]
    # A whole-GPU replica skips a device that a fractional replica holds a share of.
    held = {"f": {("w", 0): common_pb2.Replica(model="f", index=0, worker_id="w", devices=["0"])}}
    plan = place(spec(1, gpus=1), capacities(workers, held, {"f": spec(1, gpus=0.25, name="f")}))
    assert plan == {0: Slot("w", ("1",))}


def test_fraction_takes_the_best_fitting_device() -> None:
    cap = Capacity(
        "w",
        "inference",
        8,
        [DeviceUse("0", 0.7), DeviceUse("1", 0.5), DeviceUse("2"), DeviceUse("3", 0.5)],
    )
    assert cap.pick(0.3) == ("0",)  # 0.3 free: the tightest fit
    assert cap.pick(0.4) == ("1",)  # 0.5 free on 1 and 3: the lower id
    assert cap.pick(0.6) == ("2",)
    assert cap.pick(2) is None and cap.pick(1) == ("2",) and cap.pick(0) == ()


def test_declared_devices_and_implicit_ids() -> None:
    declared = cp.Worker(
        id="w", cpus=4, devices=[cp.Device(id="10"), cp.Device(id="2"), cp.Device(id="mig-a")]
    )
    assert device_ids(declared) == ["2", "10", "mig-a"]
    assert device_ids(cp.Worker(id="w", gpus=3)) == ["0", "1", "2"]
    assert device_ids(cp.Worker(id="w")) == []
    plan = place(spec(1, gpus=2), capacities([declared], {}, {}))
    assert plan == {0: Slot("w", ("2", "10"))}


def test_assignments_without_device_ids_get_them_after_named_ones() -> None:
    # Written before assignments named devices: it is counted on the lowest device left free.
    workers = [cp.Worker(id="w", cpus=8, gpus=2, kind="inference")]
    models = {"old": spec(1, gpus=1, name="old"), "new": spec(1, gpus=1, name="new")}
    assignments = {
        "old": {("w", 0): common_pb2.Replica(model="old", index=0, worker_id="w")},
        "new": {("w", 0): common_pb2.Replica(model="new", index=0, worker_id="w", devices=["0"])},
    }
    [cap] = capacities(workers, assignments, models).values()
    assert [(d.id, d.holders) for d in cap.devices] == [("0", ["new/0"]), ("1", ["old/0"])]


def test_plan_pends_what_lacks_room_now_and_fails_what_never_fits() -> None:
    workers = [cp.Worker(id="w1", cpus=8, gpus=2, kind="inference")]
    models = {"chat": spec(1, gpus=1, name="chat"), "emb": spec(1, gpus=1, name="emb")}
    assignments = {
        name: {("w1", 0): common_pb2.Replica(model=name, index=0, worker_id="w1", devices=[d])}
        for name, d in (("chat", "0"), ("emb", "1"))
    }
    current = capacities(workers, assignments, models)
    wanted = spec(2, gpus=1, name="big")
    assert plan_replicas(wanted, current) == ({}, [0, 1])
    reason = pending_reason(wanted, current)
    assert "worker w1 has 2 GPUs, both held by chat/0 and emb/0" in reason
    assert "1 CPUs and 1 whole GPU" in reason
    # The replicas placed along with the pending ones count as holders too.
    free_one = capacities(workers, {"chat": assignments["chat"]}, models)
    plan, waiting = plan_replicas(wanted, free_one)
    assert (plan, waiting) == ({0: Slot("w1", ("1",))}, [1])
    assert "2 GPUs, both held by big/0 and chat/0" in pending_reason(wanted, free_one, plan)
    # Too big for w1 even when it is empty: the deploy fails at once.
    with pytest.raises(FailedPrecondition, match="no live inference worker is big enough"):
        plan_replicas(spec(1, gpus=3, name="huge"), current)
    with pytest.raises(FailedPrecondition, match="no inference worker is registered"):
        plan_replicas(spec(1, name="any"), {})
    # A share of a device: the reason names who holds the shares.
    half = capacities(
        workers,
        {
            "h": {
                ("w1", i): common_pb2.Replica(index=i, worker_id="w1", devices=[str(i)])
                for i in (0, 1)
            }
        },
        {"h": spec(2, gpus=0.75, name="h")},
    )
    assert "2 GPUs, none with a 0.5 share free (held by h/0 and h/1)" in pending_reason(
        spec(1, gpus=0.5), half
    )


def test_pending_reason_names_cpu_holders() -> None:
    workers = [cp.Worker(id="w1", cpus=2, kind="inference")]
    assignments = {"a": {("w1", 0): common_pb2.Replica(index=0, worker_id="w1")}}
    current = capacities(workers, assignments, {"a": spec(1, cpus=1.5, name="a")})
    assert "worker w1 has 2 CPUs, 0.5 free (held by a/0)" in pending_reason(spec(1), current)


@pytest.mark.parametrize("gpus", [0.0, 0.25, 0.5, 1.0, 2.0, 8.0])
def test_normalize_accepts_whole_gpus_and_shares(gpus: float) -> None:
    assert (
        normalize(cp.Model(name="m", model_path="/m", gpus_per_replica=gpus)).gpus_per_replica
        == gpus
    )


@pytest.mark.parametrize("gpus", [1.5, 2.25, -0.5])
def test_normalize_rejects_partial_gpus_above_one(gpus: float) -> None:
    with pytest.raises(InvalidArgument) as info:
        normalize(cp.Model(name="m", model_path="/m", gpus_per_replica=gpus))
    message = str(info.value)
    assert "model.gpus_per_replica must be 0 or more" in message
    assert "a fraction below 1 for a share of one GPU" in message
    assert "a whole number of GPUs" in message and f"got {gpus:g}" in message


def test_pending_reason_counts_free_and_held_devices() -> None:
    workers = [cp.Worker(id="w1", cpus=8, gpus=4, kind="inference")]
    assignments = {
        name: {("w1", 0): common_pb2.Replica(index=0, worker_id="w1", devices=[d])}
        for name, d in (("a", "0"), ("b", "2"))
    }
    models = {"a": spec(1, gpus=1, name="a"), "b": spec(1, gpus=1, name="b")}
    current = capacities(workers, assignments, models)
    reason = pending_reason(spec(1, gpus=3, name="c"), current)
    assert "worker w1 has 4 GPUs, 2 free and 2 held by a/0 and b/0" in reason
