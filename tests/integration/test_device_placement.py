"""Device ids in placement and PENDING replicas, against a real etcd and a real control plane.

Workers are simulated the way tests/integration/test_control_plane.py does it: their Worker key
and replica statuses are written under a real etcd lease, and their assignments are read back.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aetcd
import grpc

from llmesh.common.etcd_keys import Keys, decode, encode
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc
from tests.integration import test_control_plane as base
from tests.integration.test_control_plane import (
    LOADING,
    READY,
    SimWorker,
    control_plane,
    deploy,
    eventually,
    rpc_error,
)

# The fixtures of test_control_plane.py: a real etcd client, the namespace's keys, and a
# control plane with a client stub.
etcd = base.etcd
keys = base.keys
plane = base.plane
stub = base.stub

PENDING = common_pb2.REPLICA_STATE_PENDING
Code = grpc.StatusCode
Stub = cp_grpc.ControlPlaneServiceStub


async def get_model(stub: Stub, name: str) -> cp.Model:
    return (await stub.GetModel(cp.GetModelRequest(name=name))).model


async def list_workers(stub: Stub) -> dict[str, cp.Worker]:
    return {w.id: w for w in (await stub.ListWorkers(cp.ListWorkersRequest())).workers}


async def undeploy(stub: Stub, name: str) -> None:
    await stub.UndeployModel(cp.UndeployModelRequest(name=name))


async def pending_keys(etcd: aetcd.Client, keys: Keys) -> list[str]:
    return sorted(kv.key.decode() for kv in await etcd.get_prefix(keys.pending_replicas))


def holders(worker: cp.Worker) -> dict[str, list[str]]:
    return {d.id: list(d.holders) for d in worker.devices}


async def placed(stub: Stub, name: str, n: int) -> cp.Model | None:
    """The model once ``n`` replicas are assigned (none PENDING), else None."""
    model = await get_model(stub, name)
    states = [r.state for r in model.replicas]
    return model if len(states) == n and PENDING not in states else None


async def test_device_ids_pending_and_placed_once_room_frees(
    stub: Stub, etcd: aetcd.Client, keys: Keys
) -> None:
    w1 = await SimWorker(etcd, keys, "w1", cpus=16, gpus=4).start()

    # 1, 2 and 0.5 (x2) GPUs on a 4-GPU worker: distinct whole devices, the halves share one.
    one = await deploy(stub, "one", gpus_per_replica=1)
    two = await deploy(stub, "two", gpus_per_replica=2)
    half = await deploy(stub, "half", gpus_per_replica=0.5, num_replicas=2)
    assert [list(r.devices) for r in one.replicas] == [["0"]]
    assert [list(r.devices) for r in two.replicas] == [["1", "2"]]
    assert [list(r.devices) for r in half.replicas] == [["3"], ["3"]]
    assigned = await w1.assignments()
    assert {k: list(a.devices) for k, a in assigned.items()} == {
        ("one", 0): ["0"],
        ("two", 0): ["1", "2"],
        ("half", 0): ["3"],
        ("half", 1): ["3"],
    }
    worker = (await list_workers(stub))["w1"]
    assert holders(worker) == {
        "0": ["one/0"],
        "1": ["two/0"],
        "2": ["two/0"],
        "3": ["half/0", "half/1"],
    }
    assert [d.free for d in worker.devices] == [0.0, 0.0, 0.0, 0.0]
    assert (worker.gpus_used, worker.cpus_used, worker.gpus) == (4.0, 4.0, 4.0)

    # A published status without devices shows the assignment's.
    await w1.publish("two", 0, READY)
    await eventually(lambda: _state(stub, "two", READY), what="two/0 READY")
    assert [list(r.devices) for r in (await get_model(stub, "two")).replicas] == [["1", "2"]]

    # One more whole GPU: accepted, PENDING, the reason names every holder; nothing assigned.
    more = await deploy(stub, "more", gpus_per_replica=1)
    [waiting] = more.replicas
    assert (waiting.state, waiting.worker_id, list(waiting.devices)) == (PENDING, "", [])
    assert "worker w1 has 4 GPUs, all held by half/0, half/1, one/0 and two/0" in waiting.reason
    assert await pending_keys(etcd, keys) == [f"{keys.ns}/pending/more/0"]
    assert ("more", 0) not in await w1.assignments()
    listed = {m.name: m for m in (await stub.ListModels(cp.ListModelsRequest())).models}
    assert listed["more"].replicas[0].state == PENDING

    # wait_ready waits, and its deadline message says why.
    request = cp.DeployModelRequest(
        model=cp.Model(name="more", model_path="/models/tiny", gpus_per_replica=1),
        wait_ready=True,
        timeout_seconds=0.3,
    )
    err = await rpc_error(stub.DeployModel(request))
    assert err.code() == Code.DEADLINE_EXCEEDED
    assert "replica 0 is PENDING" in err.details() and "held by half/0" in err.details()

    # Undeploying "one" frees device 0: the pending replica is placed there, no new deploy call.
    stream = stub.WatchModel(cp.WatchModelRequest(name="more"))
    assert (await stream.read()).model.replicas[0].state == PENDING
    await undeploy(stub, "one")
    moved = await w1.assignment("more", 0)
    assert list(moved.devices) == ["0"] and moved.generation == more.generation
    assert await pending_keys(etcd, keys) == []
    update = await asyncio.wait_for(stream.read(), 5)
    while update.model.replicas[0].state == PENDING:
        update = await asyncio.wait_for(stream.read(), 5)
    assert update.model.replicas[0].state == LOADING
    assert (update.model.replicas[0].worker_id, list(update.model.replicas[0].devices)) == (
        "w1",
        ["0"],
    )
    stream.cancel()
    assert holders((await list_workers(stub))["w1"])["0"] == ["more/0"]

    # Never fits (8 GPUs on a 4-GPU worker): fails at once and writes nothing.
    err = await rpc_error(deploy(stub, "huge", gpus_per_replica=8))
    assert err.code() == Code.FAILED_PRECONDITION
    assert "no live inference worker is big enough" in err.details()
    assert "w1 has 12/16 CPUs and 0/4 GPUs free" in err.details()
    assert (await rpc_error(get_model(stub, "huge"))).code() == Code.NOT_FOUND
    assert await pending_keys(etcd, keys) == []


async def _state(stub: Stub, name: str, state: int) -> bool:
    return [r.state for r in (await get_model(stub, name)).replicas] == [state]


async def test_some_replicas_placed_the_rest_pending_and_undeploy_drops_them(
    stub: Stub, etcd: aetcd.Client, keys: Keys
) -> None:
    w1 = await SimWorker(etcd, keys, "w1", cpus=8, gpus=2).start()
    await deploy(stub, "chat", gpus_per_replica=1)
    trio = await deploy(stub, "trio", gpus_per_replica=1, num_replicas=3)
    assert [(r.index, r.state, list(r.devices)) for r in trio.replicas] == [
        (0, LOADING, ["1"]),
        (1, PENDING, []),
        (2, PENDING, []),
    ]
    assert "worker w1 has 2 GPUs, both held by chat/0 and trio/0" in trio.replicas[1].reason
    assert len(await pending_keys(etcd, keys)) == 2

    # A second worker joins: one pending replica goes there (the other still waits).
    w2 = await SimWorker(etcd, keys, "w2", cpus=8, gpus=1).start()
    on_w2 = await w2.assignment("trio", 1)
    assert list(on_w2.devices) == ["0"]
    assert await pending_keys(etcd, keys) == [f"{keys.ns}/pending/trio/2"]

    # Undeploy removes the assignments and the pending key in one go.
    await undeploy(stub, "trio")
    assert await pending_keys(etcd, keys) == []
    assert list(await w1.assignments()) == [("chat", 0)]
    assert not await w2.assignments()


async def test_declared_devices_keep_their_ids_and_details(
    stub: Stub, etcd: aetcd.Client, keys: Keys
) -> None:
    lease = await etcd.lease(30)
    devices = [
        cp.Device(id="7", name="NVIDIA H100 80GB HBM3", memory_bytes=80 << 30),
        cp.Device(id="3", name="NVIDIA H100 80GB HBM3", memory_bytes=80 << 30),
    ]
    worker = cp.Worker(id="node", address="127.0.0.1:1", cpus=8, kind="inference", devices=devices)
    await etcd.put(keys.worker("node"), encode(worker), lease=lease)
    first = await deploy(stub, "a", gpus_per_replica=0.25)
    second = await deploy(stub, "b", gpus_per_replica=1)
    assert [list(r.devices) for r in first.replicas] == [["3"]]  # lowest id first
    assert [list(r.devices) for r in second.replicas] == [["7"]]  # 3 is partly held
    listed = (await list_workers(stub))["node"]
    assert [(d.id, list(d.holders), d.free) for d in listed.devices] == [
        ("3", ["a/0"], 0.75),
        ("7", ["b/0"], 0.0),
    ]
    assert listed.devices[0].name == "NVIDIA H100 80GB HBM3"
    assert listed.devices[0].memory_bytes == 80 << 30
    assert listed.gpus == 2  # counted from the declared devices
    stored = decode((await etcd.get(keys.assignment("node", "b", 0))).value, common_pb2.Replica)
    assert list(stored.devices) == ["7"]
    await lease.revoke()


async def test_an_adapter_waits_with_its_base_and_follows_it(
    stub: Stub, etcd: aetcd.Client, keys: Keys
) -> None:
    w1 = await SimWorker(etcd, keys, "w1", cpus=8, gpus=1).start()
    await deploy(stub, "holder", gpus_per_replica=1)
    await deploy(stub, "base", gpus_per_replica=1)
    adapter = await deploy(stub, "lora", model_path="/adapters/a", base_model="base")
    [waiting] = adapter.replicas
    assert waiting.state == PENDING and "base model base's replica 0 is PENDING" in waiting.reason
    await undeploy(stub, "holder")
    base = await w1.assignment("base", 0)
    follower = await w1.assignment("lora", 0)
    assert list(base.devices) == ["0"] and not follower.devices  # an adapter holds no device
    assert await eventually(lambda: placed(stub, "lora", 1), what="adapter placed")


async def test_two_control_planes_place_a_pending_replica_once(
    etcd_server: Any, etcd_namespace: str, etcd: aetcd.Client, keys: Keys
) -> None:
    w1 = await SimWorker(etcd, keys, "w1", cpus=8, gpus=1).start()
    w2 = await SimWorker(etcd, keys, "w2", cpus=8, gpus=1).start()
    async with (
        control_plane(etcd_server.endpoint, etcd_namespace) as a,
        control_plane(etcd_server.endpoint, etcd_namespace) as b,
    ):
        await deploy(a.stub, "x", gpus_per_replica=1)
        await deploy(b.stub, "y", gpus_per_replica=1)
        [waiting] = (await deploy(a.stub, "z", gpus_per_replica=1)).replicas
        assert waiting.state == PENDING
        freed = (await get_model(b.stub, "x")).replicas[0].worker_id
        # Both control planes run the loop; the fenced swap lets exactly one place it.
        await undeploy(b.stub, "x")
        for p in (a, b):
            assert await eventually(lambda p=p: placed(p.stub, "z", 1), what="z placed")
        on = {w.id: await w.assignments() for w in (w1, w2)}
        assert [k for k in on[freed] if k[0] == "z"] == [("z", 0)]
        assert sum(k[0] == "z" for assigned in on.values() for k in assigned) == 1
        assert await pending_keys(etcd, keys) == []
