"""The control plane against a real etcd, a real gRPC server and a real grpc.aio client.

Inference workers are played by :class:`SimWorker`, which writes exactly the keys a worker
writes (its Worker key and its replica statuses) under a real etcd lease, and reads its
assignments the way a worker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aetcd
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmesh.common.etcd_keys import Keys, decode, encode, parse_endpoint
from llmesh.control_plane.server import ControlPlane, run_control_plane
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc

READY = common_pb2.REPLICA_STATE_READY
LOADING = common_pb2.REPLICA_STATE_LOADING
FAILED = common_pb2.REPLICA_STATE_FAILED
Code = grpc.StatusCode


class SimWorker:
    """An inference worker's etcd side: registration and replica statuses under a real lease."""

    def __init__(
        self,
        client: aetcd.Client,
        keys: Keys,
        worker_id: str,
        *,
        cpus: float = 4.0,
        gpus: float = 0.0,
        kind: str = "inference",
    ) -> None:
        self.client = client
        self.keys = keys
        self.id = worker_id
        self.address = f"127.0.0.1:{40000 + sum(map(ord, worker_id))}"
        self.cpus, self.gpus, self.kind = cpus, gpus, kind
        self.lease: Any = None

    async def start(self, *, ttl: int = 30) -> SimWorker:
        self.lease = await self.client.lease(ttl)
        worker = cp.Worker(
            id=self.id, address=self.address, cpus=self.cpus, gpus=self.gpus, kind=self.kind
        )
        await self.client.put(self.keys.worker(self.id), encode(worker), lease=self.lease)
        return self

    async def assignments(self) -> dict[tuple[str, int], common_pb2.Replica]:
        found = await self.client.get_prefix(self.keys.worker_assignments(self.id))
        out = {}
        for kv in found:
            replica = decode(kv.value, common_pb2.Replica)
            out[(replica.model, replica.index)] = replica
        return out

    async def assignment(self, model: str, index: int) -> common_pb2.Replica:
        async def found() -> common_pb2.Replica | None:
            return (await self.assignments()).get((model, index))

        return await eventually(found, what=f"assignment {model}/{index} on {self.id}")

    async def publish(
        self,
        model: str,
        index: int,
        state: int = READY,
        *,
        inflight: int = 0,
        max_concurrency: int = 8,
        reason: str = "",
    ) -> common_pb2.Replica:
        assigned = await self.assignment(model, index)
        replica = common_pb2.Replica(
            model=model,
            index=index,
            worker_id=self.id,
            address=self.address,
            state=state,
            reason=reason,
            inflight=inflight,
            max_concurrency=max_concurrency,
            generation=assigned.generation,
        )
        key = self.keys.replica(model, self.id, assigned.generation, index)
        await self.client.put(key, encode(replica), lease=self.lease)
        return replica

    async def unload(self, model: str, index: int, generation: int) -> None:
        await self.client.delete(self.keys.replica(model, self.id, generation, index))

    async def revoke(self) -> None:
        await self.lease.revoke()


async def eventually(
    probe: Callable[[], Awaitable[Any]], *, timeout: float = 5.0, what: str = "condition"
) -> Any:
    """Poll ``probe`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


@dataclass
class Plane:
    """A running control plane and a client stub connected to it."""

    server: ControlPlane
    stub: cp_grpc.ControlPlaneServiceStub
    channel: grpc.aio.Channel


@asynccontextmanager
async def control_plane(endpoint: str, namespace: str, **kwargs: Any) -> AsyncIterator[Plane]:
    kwargs.setdefault("reconcile_grace", None)
    kwargs.setdefault("grace", 0.2)
    async with run_control_plane(
        listen="127.0.0.1:0", etcd=endpoint, namespace=namespace, **kwargs
    ) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield Plane(server, cp_grpc.ControlPlaneServiceStub(channel), channel)


@pytest.fixture
async def etcd(etcd_server: Any) -> AsyncIterator[aetcd.Client]:
    host, port = parse_endpoint(etcd_server.endpoint)
    async with aetcd.Client(host=host, port=port) as client:
        yield client


@pytest.fixture
def keys(etcd_namespace: str) -> Keys:
    return Keys(etcd_namespace)


@pytest.fixture
async def plane(etcd_server: Any, etcd_namespace: str) -> AsyncIterator[Plane]:
    async with control_plane(etcd_server.endpoint, etcd_namespace) as p:
        yield p


@pytest.fixture
def stub(plane: Plane) -> cp_grpc.ControlPlaneServiceStub:
    return plane.stub


def model(name: str = "chat", **fields: Any) -> cp.Model:
    fields.setdefault("model_path", "/models/tiny")
    return cp.Model(name=name, **fields)


async def deploy(
    stub: cp_grpc.ControlPlaneServiceStub, name: str = "chat", **fields: Any
) -> cp.Model:
    response = await stub.DeployModel(cp.DeployModelRequest(model=model(name, **fields)))
    return response.model


async def workers(
    etcd: aetcd.Client, keys: Keys, *specs: tuple[str, float], ttl: int = 30
) -> list[SimWorker]:
    return [await SimWorker(etcd, keys, wid, cpus=cpus).start(ttl=ttl) for wid, cpus in specs]


async def assign(stub: cp_grpc.ControlPlaneServiceStub, **fields: Any) -> common_pb2.Replica:
    fields.setdefault("model", "chat")
    return (await stub.AssignWorker(cp.AssignWorkerRequest(**fields))).replica


# -- DeployModel ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "model.name is required"),
        ({"name": "a/b"}, "model.name 'a/b' is not valid"),
        ({"name": "has space"}, "model.name 'has space' is not valid"),
        ({"model_path": ""}, "model.model_path is required"),
        ({"backend": "tensorflow"}, "model.backend 'tensorflow' is not supported"),
        ({"num_replicas": -1}, "model.num_replicas must be at least 1"),
        ({"cpus_per_replica": -2}, "model.cpus_per_replica must be a positive number"),
        ({"gpus_per_replica": -1}, "model.gpus_per_replica must be 0 or more"),
        ({"infer_params": {"": "x"}}, "model.infer_params has an empty key"),
    ],
)
async def test_deploy_rejects_invalid_fields(
    stub: cp_grpc.ControlPlaneServiceStub, fields: dict[str, Any], message: str
) -> None:
    spec = model(**{"name": "chat", **fields}) if "name" in fields else model(**fields)
    err = await rpc_error(stub.DeployModel(cp.DeployModelRequest(model=spec)))
    assert err.code() == Code.INVALID_ARGUMENT
    assert message in err.details()
    assert not (await stub.ListModels(cp.ListModelsRequest())).models


async def test_deploy_without_model_and_with_negative_timeout(
    stub: cp_grpc.ControlPlaneServiceStub,
) -> None:
    err = await rpc_error(stub.DeployModel(cp.DeployModelRequest()))
    assert err.code() == Code.INVALID_ARGUMENT and "model is required" in err.details()
    request = cp.DeployModelRequest(model=model(), timeout_seconds=-1)
    err = await rpc_error(stub.DeployModel(request))
    assert err.code() == Code.INVALID_ARGUMENT and "timeout_seconds" in err.details()


async def test_deploy_fills_defaults_and_places_placeholders(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    [w1] = await workers(etcd, keys, ("w1", 4))
    deployed = await deploy(stub, "chat", infer_params={"max_model_len": "128"})
    assert deployed.backend == "transformers"
    assert deployed.num_replicas == 1 and deployed.cpus_per_replica == 1.0
    assert deployed.generation >= 1
    [replica] = deployed.replicas
    # The worker has not reported yet: a LOADING placeholder naming the worker.
    assert (replica.index, replica.worker_id, replica.state) == (0, "w1", LOADING)
    assert replica.generation == deployed.generation and replica.address == w1.address
    stored = decode((await etcd.get(keys.model("chat"))).value, cp.Model)
    assert stored.generation == deployed.generation and not stored.replicas
    assert dict(stored.infer_params) == {"max_model_len": "128"}
    assignment = await w1.assignment("chat", 0)
    assert assignment.worker_id == "w1" and assignment.generation == deployed.generation


async def test_placement_spreads_replicas_over_workers(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    await workers(etcd, keys, ("w1", 4), ("w2", 4))
    deployed = await deploy(stub, "chat", num_replicas=2)
    assert sorted(r.worker_id for r in deployed.replicas) == ["w1", "w2"]
    assert sorted(r.index for r in deployed.replicas) == [0, 1]


async def test_placement_doubles_up_only_when_no_other_worker_fits(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    await workers(etcd, keys, ("w1", 4), ("w2", 1))
    first = await deploy(stub, "a", num_replicas=2)
    assert sorted(r.worker_id for r in first.replicas) == ["w1", "w2"]
    # w2 is full now: both replicas of "b" go to w1.
    second = await deploy(stub, "b", num_replicas=2)
    assert [r.worker_id for r in second.replicas] == ["w1", "w1"]


async def test_placement_without_capacity_fails_and_writes_nothing(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    err = await rpc_error(stub.DeployModel(cp.DeployModelRequest(model=model("lonely"))))
    assert err.code() == Code.FAILED_PRECONDITION
    assert "no inference worker is registered" in err.details()

    await workers(etcd, keys, ("w1", 2), ("w2", 2))
    await deploy(stub, "chat", num_replicas=2)
    before = await etcd.get_prefix(keys.root)
    # 3 CPUs fit on no worker even when it is empty: that fails at once (a replica that only
    # lacks room now waits PENDING instead; see test_device_placement.py).
    err = await rpc_error(
        stub.DeployModel(cp.DeployModelRequest(model=model("big", cpus_per_replica=3)))
    )
    assert err.code() == Code.FAILED_PRECONDITION
    details = err.details()
    assert "needing 3 CPUs and 0 GPUs" in details and "no live inference worker is big" in details
    assert "w1 has 1/2 CPUs and 0/0 GPUs free" in details and "w2 has 1/2 CPUs" in details
    after = await etcd.get_prefix(keys.root)
    assert [(kv.key, kv.mod_revision) for kv in after] == [
        (kv.key, kv.mod_revision) for kv in before
    ]
    err = await rpc_error(stub.GetModel(cp.GetModelRequest(name="big")))
    assert err.code() == Code.NOT_FOUND


async def test_placement_respects_gpus(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    await SimWorker(etcd, keys, "cpu-only", cpus=16).start()
    await SimWorker(etcd, keys, "gpu", cpus=4, gpus=1).start()
    deployed = await deploy(stub, "llm", gpus_per_replica=1)
    assert [(r.worker_id, list(r.devices)) for r in deployed.replicas] == [("gpu", ["0"])]
    # The only GPU is held: the second GPU model is accepted and waits, naming the holder; the
    # CPU-only worker is never a candidate.
    [waiting] = (await deploy(stub, "llm2", gpus_per_replica=1)).replicas
    assert waiting.state == common_pb2.REPLICA_STATE_PENDING and not waiting.worker_id
    assert "worker gpu has 1 GPU, held by llm/0" in waiting.reason
    assert "cpu-only" not in waiting.reason
    assert not await etcd.get_prefix(keys.worker_assignments("cpu-only"))


async def test_redeploy_is_idempotent_and_a_different_spec_already_exists(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    await workers(etcd, keys, ("w1", 4))
    first = await deploy(stub, "chat", backend="", infer_params={"max_concurrency": "1"})
    again = await deploy(
        stub, "chat", backend="transformers", infer_params={"max_concurrency": "1"}
    )
    assert again.generation == first.generation
    assert len(await SimWorker(etcd, keys, "w1").assignments()) == 1
    err = await rpc_error(
        stub.DeployModel(cp.DeployModelRequest(model=model("chat", num_replicas=2)))
    )
    assert err.code() == Code.ALREADY_EXISTS
    assert "num_replicas 1 -> 2" in err.details() and "undeploy it first" in err.details()
    await stub.UndeployModel(cp.UndeployModelRequest(name="chat"))
    redeployed = await deploy(stub, "chat", num_replicas=1)
    assert redeployed.generation > first.generation


async def test_deploy_wait_ready_returns_when_replicas_are_ready(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    w1, w2 = await workers(etcd, keys, ("w1", 4), ("w2", 4))
    request = cp.DeployModelRequest(model=model("chat", num_replicas=2), wait_ready=True)
    call = asyncio.ensure_future(stub.DeployModel(request, timeout=10))
    await w1.publish("chat", 0, LOADING)
    await asyncio.sleep(0.1)
    assert not call.done()
    await w1.publish("chat", 0, READY)
    await asyncio.sleep(0.1)
    assert not call.done()
    await w2.publish("chat", 1, READY)
    deployed = (await call).model
    assert [(r.index, r.state) for r in deployed.replicas] == [(0, READY), (1, READY)]


async def test_deploy_wait_ready_fails_with_the_reason(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    [w1] = await workers(etcd, keys, ("w1", 4))
    request = cp.DeployModelRequest(model=model("chat"), wait_ready=True)
    call = asyncio.ensure_future(stub.DeployModel(request, timeout=10))
    await w1.publish("chat", 0, FAILED, reason="config.json not found in /models/tiny")
    err = await rpc_error(call)
    assert err.code() == Code.FAILED_PRECONDITION
    assert "replica 0 of model 'chat' failed on worker w1" in err.details()
    assert "config.json not found" in err.details()


async def test_deploy_wait_ready_times_out_naming_the_pending_replicas(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    await workers(etcd, keys, ("w1", 4))
    request = cp.DeployModelRequest(model=model("chat"), wait_ready=True, timeout_seconds=0.3)
    err = await rpc_error(stub.DeployModel(request))
    assert err.code() == Code.DEADLINE_EXCEEDED
    assert "replica 0 on w1 is LOADING" in err.details()
    # The deployment stays.
    assert (await stub.GetModel(cp.GetModelRequest(name="chat"))).model.name == "chat"


# -- UndeployModel ---------------------------------------------------------------------------


async def test_undeploy(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    err = await rpc_error(stub.UndeployModel(cp.UndeployModelRequest(name="nope")))
    assert err.code() == Code.NOT_FOUND and "'nope' is not deployed" in err.details()

    w1, w2 = await workers(etcd, keys, ("w1", 4), ("w2", 4))
    deployed = await deploy(stub, "chat", num_replicas=2)
    gen = deployed.generation
    await w1.publish("chat", 0, READY)
    await w2.publish("chat", 1, READY)

    # The worker's side: an assignment deleted means drain, unload, delete the replica key.
    async def worker_unloads(worker: SimWorker, index: int) -> None:
        await eventually(lambda: _no(worker.assignments()), what="assignment deleted")
        await asyncio.sleep(0.2)
        await worker.unload("chat", index, gen)

    unloads = [asyncio.ensure_future(worker_unloads(w, i)) for w, i in ((w1, 0), (w2, 1))]
    started = time.monotonic()
    await stub.UndeployModel(cp.UndeployModelRequest(name="chat", wait=True, timeout_seconds=5))
    assert time.monotonic() - started >= 0.2  # it waited for the replicas to unload
    await asyncio.gather(*unloads)
    assert not await etcd.get_prefix(keys.model_replicas("chat"))
    assert await etcd.get(keys.model("chat")) is None
    assert not await etcd.get_prefix(keys.assignments)
    workers_now = (await stub.ListWorkers(cp.ListWorkersRequest())).workers
    assert [(w.id, w.cpus_used, list(w.replicas)) for w in workers_now] == [
        ("w1", 0, []),
        ("w2", 0, []),
    ]


async def test_undeploy_wait_times_out_naming_leftover_replicas(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    [w1] = await workers(etcd, keys, ("w1", 4))
    await deploy(stub, "chat")
    await w1.publish("chat", 0, READY)
    request = cp.UndeployModelRequest(name="chat", wait=True, timeout_seconds=0.3)
    err = await rpc_error(stub.UndeployModel(request))
    assert err.code() == Code.DEADLINE_EXCEEDED
    assert "replica 0 on w1 is READY" in err.details()
    err = await rpc_error(stub.GetModel(cp.GetModelRequest(name="chat")))
    assert err.code() == Code.NOT_FOUND


async def _no(coro: Awaitable[Any]) -> bool:
    return not await coro


# -- reads -----------------------------------------------------------------------------------


async def test_get_and_list_models_and_workers(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    w2, w1 = await workers(etcd, keys, ("w2", 8), ("w1", 4))
    await SimWorker(etcd, keys, "trainer", cpus=64, kind="trainer").start()
    await deploy(stub, "zeta", num_replicas=2, cpus_per_replica=2)
    await deploy(stub, "alpha", cpus_per_replica=1.5)
    # Placement: zeta/0 -> w2 (most free CPUs), zeta/1 -> w1 (spread), alpha/0 -> w2.
    await w2.publish("zeta", 0, READY, inflight=3)
    await eventually(lambda: _ready_count(stub, 1, "zeta"), what="zeta/0 READY")

    listed = (await stub.ListModels(cp.ListModelsRequest())).models
    assert [m.name for m in listed] == ["alpha", "zeta"]
    zeta = (await stub.GetModel(cp.GetModelRequest(name="zeta"))).model
    assert [r.index for r in zeta.replicas] == [0, 1]
    assert zeta.replicas[0].state == READY and zeta.replicas[0].inflight == 3
    assert zeta.replicas[1].state == LOADING

    listed_workers = (await stub.ListWorkers(cp.ListWorkersRequest())).workers
    by_id = {w.id: w for w in listed_workers}
    assert [w.id for w in listed_workers] == ["trainer", "w1", "w2"]
    assert by_id["trainer"].cpus_used == 0 and not by_id["trainer"].replicas
    # w2 (8 CPUs) takes zeta/0 and alpha; w1 (4 CPUs) takes zeta/1.
    assert (by_id["w2"].cpus_used, list(by_id["w2"].replicas)) == (3.5, ["alpha/0", "zeta/0"])
    assert (by_id["w1"].cpus_used, list(by_id["w1"].replicas)) == (2.0, ["zeta/1"])
    assert by_id["w1"].address == w1.address and by_id["w1"].cpus == 4


# -- AssignWorker ----------------------------------------------------------------------------


async def test_assign_worker_errors(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    err = await rpc_error(assign(stub, model="nope"))
    assert err.code() == Code.NOT_FOUND and "'nope' is not deployed" in err.details()
    err = await rpc_error(assign(stub, model=""))
    assert err.code() == Code.INVALID_ARGUMENT

    [w1] = await workers(etcd, keys, ("w1", 4))
    await deploy(stub, "chat")
    err = await rpc_error(assign(stub))
    assert err.code() == Code.FAILED_PRECONDITION and "no READY replica" in err.details()
    await w1.publish("chat", 0, FAILED, reason="out of memory")
    err = await eventually(lambda: _assign_error(stub), what="FAILED visible")
    assert "out of memory" in err.details()


async def _assign_error(stub: cp_grpc.ControlPlaneServiceStub) -> grpc.aio.AioRpcError | None:
    err = await rpc_error(assign(stub))
    return err if "FAILED" in err.details() else None


async def _two_ready(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys, **inflight: int
) -> list[SimWorker]:
    w1, w2 = await workers(etcd, keys, ("w1", 4), ("w2", 4))
    await deploy(stub, "chat", num_replicas=2)
    await w1.publish("chat", 0, READY, inflight=inflight.get("w1", 0))
    await w2.publish("chat", 1, READY, inflight=inflight.get("w2", 0))
    await eventually(lambda: _ready_count(stub, 2), what="two READY replicas")
    return [w1, w2]


async def _ready_count(stub: cp_grpc.ControlPlaneServiceStub, n: int, name: str = "chat") -> bool:
    got = (await stub.GetModel(cp.GetModelRequest(name=name))).model
    return sum(r.state == READY for r in got.replicas) == n


async def test_assign_round_robin_alternates(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    await _two_ready(stub, etcd, keys)
    rr = cp.LOAD_BALANCE_POLICY_ROUND_ROBIN
    picks = [(await assign(stub, policy=rr)).index for _ in range(6)]
    assert set(picks) == {0, 1}
    assert all(a != b for a, b in itertools.pairwise(picks))


async def test_assign_random_hits_both(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    await _two_ready(stub, etcd, keys)
    policy = cp.LOAD_BALANCE_POLICY_RANDOM
    picks = [(await assign(stub, policy=policy)).worker_id for _ in range(60)]
    assert set(picks) == {"w1", "w2"}


async def test_assign_least_loaded_follows_published_inflight(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    w1, w2 = await _two_ready(stub, etcd, keys, w1=6, w2=1)
    picks = [(await assign(stub)).worker_id for _ in range(4)]
    assert picks == ["w2"] * 4  # 1 + 4 local assignments still below 6
    # The workers publish new counts; those already include what this control plane sent.
    await w1.publish("chat", 0, READY, inflight=0)
    await w2.publish("chat", 1, READY, inflight=7)

    async def prefers_w1() -> bool:
        return (await assign(stub, policy=cp.LOAD_BALANCE_POLICY_LEAST_LOADED)).worker_id == "w1"

    await eventually(prefers_w1, what="w1 preferred")
    assert all([(await assign(stub)).worker_id == "w1" for _ in range(3)])


async def test_assign_pins_by_replica_and_by_purpose(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    await _two_ready(stub, etcd, keys)
    for _ in range(5):
        assert (await assign(stub, pinned_replica=1)).index == 1
        assert (await assign(stub, pinned_replica=0)).index == 0
        pins = {"embedding": 1, "chat": 0}
        embedding = await assign(stub, purpose=cp.PURPOSE_EMBEDDING, purpose_pins=pins)
        assert embedding.index == 1
        assert (await assign(stub, purpose=cp.PURPOSE_CHAT, purpose_pins=pins)).index == 0
    err = await rpc_error(assign(stub, pinned_replica=7))
    assert err.code() == Code.FAILED_PRECONDITION and "replica 7" in err.details()


async def test_affinity_sticks_and_moves_only_when_its_replica_goes(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    sims = {w.id: w for w in await _two_ready(stub, etcd, keys)}
    homes = {}
    for key in ("user-1", "user-2", "user-3", "user-4", "user-5", "user-6"):
        picks = {(await assign(stub, affinity_key=key)).worker_id for _ in range(5)}
        assert len(picks) == 1, f"{key} moved between {picks}"
        homes[key] = picks.pop()
    gone = homes["user-1"]
    stay = next(w for w in sims if w != gone)
    await sims[gone].revoke()
    await eventually(lambda: _ready_count(stub, 1), what="one replica left")
    for key, home in homes.items():
        picked = (await assign(stub, affinity_key=key)).worker_id
        # Keys whose replica stayed do not move; the others land on the survivor.
        assert picked == (home if home == stay else stay)


async def test_revoked_lease_leaves_routing_at_once(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    w1, _ = await _two_ready(stub, etcd, keys)
    await w1.revoke()
    started = time.monotonic()

    async def only_w2() -> bool:
        picks = {(await assign(stub, policy=cp.LOAD_BALANCE_POLICY_ROUND_ROBIN)).worker_id}
        picks.add((await assign(stub, policy=cp.LOAD_BALANCE_POLICY_ROUND_ROBIN)).worker_id)
        return picks == {"w2"}

    await eventually(only_w2, timeout=1.0, what="w1 out of routing")
    assert time.monotonic() - started < 1.0
    listed = [w.id for w in (await stub.ListWorkers(cp.ListWorkersRequest())).workers]
    assert listed == ["w2"]
    # The assignment is durable: GetModel shows the replica as waiting for its worker.
    replicas = (await stub.GetModel(cp.GetModelRequest(name="chat"))).model.replicas
    placeholder = next(r for r in replicas if r.worker_id == "w1")
    assert placeholder.state == common_pb2.REPLICA_STATE_UNSPECIFIED
    assert "w1 is not registered" in placeholder.reason


async def test_expired_lease_leaves_routing_within_ttl_plus_one_second(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    [steady] = await workers(etcd, keys, ("steady", 4))
    granted = time.monotonic()
    mortal = await SimWorker(etcd, keys, "mortal", cpus=8).start(ttl=2)  # never kept alive
    await deploy(stub, "chat", num_replicas=2)
    await steady.publish("chat", 1, READY)
    await mortal.publish("chat", 0, READY)
    await eventually(lambda: _ready_count(stub, 2), what="two READY replicas")

    async def mortal_gone() -> bool:
        picks = {(await assign(stub, pinned_replica=1)).worker_id}
        got = await stub.GetModel(cp.GetModelRequest(name="chat"))
        return picks == {"steady"} and not any(
            r.worker_id == "mortal" and r.state == READY for r in got.model.replicas
        )

    await eventually(mortal_gone, timeout=4.0, what="mortal out of routing")
    assert time.monotonic() - granted <= 2 + 1
    err = await rpc_error(assign(stub, pinned_replica=0))
    assert err.code() == Code.FAILED_PRECONDITION


# -- WatchModel ------------------------------------------------------------------------------


async def test_watch_model_sends_snapshot_updates_and_deleted(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    err = await rpc_error(_first(stub.WatchModel(cp.WatchModelRequest(name="nope"))))
    assert err.code() == Code.NOT_FOUND

    [w1] = await workers(etcd, keys, ("w1", 4))
    await deploy(stub, "chat")
    stream = stub.WatchModel(cp.WatchModelRequest(name="chat"))
    snapshot = await stream.read()
    assert not snapshot.deleted
    assert [(r.worker_id, r.state) for r in snapshot.model.replicas] == [("w1", LOADING)]

    await w1.publish("chat", 0, LOADING)
    await w1.publish("chat", 0, READY)
    update = await stream.read()
    while update.model.replicas[0].state != READY:  # LOADING may or may not be coalesced away
        update = await stream.read()
    assert update.model.replicas[0].address == w1.address

    # A burst of in-flight updates is coalesced; the last value always arrives.
    for n in range(1, 21):
        await w1.publish("chat", 0, READY, inflight=n)
    seen = 0
    while True:
        update = await asyncio.wait_for(stream.read(), 3)
        seen += 1
        if update.model.replicas[0].inflight == 20:
            break
    assert seen < 20

    await stub.UndeployModel(cp.UndeployModelRequest(name="chat"))
    last = await stream.read()
    assert last.deleted and last.model.name == "chat"
    assert await stream.read() is grpc.aio.EOF
    assert (await stream.code()) == Code.OK


async def _first(stream: Any) -> Any:
    async for message in stream:
        return message
    return None


async def test_slow_watcher_does_not_block_the_control_plane(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    [w1] = await workers(etcd, keys, ("w1", 4))
    await deploy(stub, "chat")
    stream = stub.WatchModel(cp.WatchModelRequest(name="chat"))
    await stream.read()  # then read nothing for a while
    for n in range(50):
        await w1.publish("chat", 0, READY, inflight=n)
    await eventually(lambda: _ready_count(stub, 1), what="READY via GetModel")
    assert (await assign(stub)).worker_id == "w1"
    latest = await stream.read()
    while latest.model.replicas[0].inflight != 49:
        latest = await asyncio.wait_for(stream.read(), 3)
    stream.cancel()


# -- several control planes, restarts --------------------------------------------------------


async def test_restart_loses_nothing(
    etcd_server: Any, etcd_namespace: str, etcd: aetcd.Client, keys: Keys
) -> None:
    w1, w2 = await workers(etcd, keys, ("w1", 4), ("w2", 4))
    async with control_plane(etcd_server.endpoint, etcd_namespace) as first:
        deployed = await deploy(first.stub, "chat", num_replicas=2)
        await w1.publish("chat", 0, READY)
        await w2.publish("chat", 1, READY)
        await eventually(lambda: _ready_count(first.stub, 2), what="READY")
    async with control_plane(etcd_server.endpoint, etcd_namespace) as second:
        got = (await second.stub.GetModel(cp.GetModelRequest(name="chat"))).model
        assert got.generation == deployed.generation
        assert [(r.index, r.state) for r in got.replicas] == [(0, READY), (1, READY)]
        picks = {(await assign(second.stub)).index for _ in range(10)}
        assert picks <= {0, 1} and picks
        again = await deploy(second.stub, "chat", num_replicas=2)
        assert again.generation == deployed.generation
        workers_now = (await second.stub.ListWorkers(cp.ListWorkersRequest())).workers
        assert [w.cpus_used for w in workers_now] == [1, 1]


async def test_shutdown_ends_open_watches_with_unavailable(
    etcd_server: Any, etcd_namespace: str, etcd: aetcd.Client, keys: Keys
) -> None:
    await workers(etcd, keys, ("w1", 4))
    async with contextlib.AsyncExitStack() as stack:
        p = await stack.enter_async_context(
            control_plane(etcd_server.endpoint, etcd_namespace, grace=5)
        )
        await deploy(p.stub, "chat")
        channel = grpc.aio.insecure_channel(p.server.address)
        stream = cp_grpc.ControlPlaneServiceStub(channel).WatchModel(
            cp.WatchModelRequest(name="chat")
        )
        await stream.read()
        started = time.monotonic()
        await stack.aclose()  # the control plane drains with a watch open
        assert time.monotonic() - started < 2  # the watch did not hold the drain to its grace
        err = await rpc_error(stream.read())
        assert err.code() == Code.UNAVAILABLE and "shutting down" in err.details()
        await channel.close()


async def test_two_control_planes_share_one_etcd(
    etcd_server: Any, etcd_namespace: str, etcd: aetcd.Client, keys: Keys
) -> None:
    [w1] = await workers(etcd, keys, ("w1", 1))
    async with (
        control_plane(etcd_server.endpoint, etcd_namespace) as a,
        control_plane(etcd_server.endpoint, etcd_namespace) as b,
    ):
        await deploy(a.stub, "chat")
        # b answers at once, even if its watch has not delivered the deploy yet.
        got = (await b.stub.GetModel(cp.GetModelRequest(name="chat"))).model
        assert got.replicas[0].worker_id == "w1"
        await w1.publish("chat", 0, READY)
        await eventually(lambda: _ready_count(b.stub, 1), what="READY on b")
        assert (await assign(b.stub)).worker_id == "w1"

        # Both race for the last CPU: the fenced transaction lets exactly one win it; the other
        # is accepted and waits PENDING for that CPU.
        await stub_undeploy(a.stub, "chat")
        results = await asyncio.gather(deploy(a.stub, "m1"), deploy(b.stub, "m2"))
        states = sorted((r.replicas[0].state, r.name) for r in results)
        assert [s for s, _ in states] == [LOADING, common_pb2.REPLICA_STATE_PENDING], results
        assert len(await etcd.get_prefix(keys.assignments)) == 1
        assert len(await etcd.get_prefix(keys.pending_replicas)) == 1
        workers_now = (await a.stub.ListWorkers(cp.ListWorkersRequest())).workers
        assert [w.cpus_used for w in workers_now] == [1]

        # Idempotent deploys of the same spec through both agree on one generation.
        await stub_undeploy(a.stub, states[1][1])  # the pending one: nothing moves
        await stub_undeploy(a.stub, states[0][1])
        assert not await etcd.get_prefix(keys.pending_replicas)
        x, y = await asyncio.gather(deploy(a.stub, "same"), deploy(b.stub, "same"))
        assert x.generation == y.generation
        assert len(await etcd.get_prefix(keys.assignments)) == 1


async def stub_undeploy(stub: cp_grpc.ControlPlaneServiceStub, name: str) -> None:
    await stub.UndeployModel(cp.UndeployModelRequest(name=name))


async def _models(stub: cp_grpc.ControlPlaneServiceStub) -> list[cp.Model]:
    return list((await stub.ListModels(cp.ListModelsRequest())).models)


async def test_reconcile_moves_replicas_off_a_lost_worker(
    etcd_server: Any, etcd_namespace: str, etcd: aetcd.Client, keys: Keys
) -> None:
    [doomed] = await workers(etcd, keys, ("doomed", 4))
    async with control_plane(etcd_server.endpoint, etcd_namespace, reconcile_grace=0.3) as p:
        deployed = await deploy(p.stub, "chat")
        assert deployed.replicas[0].worker_id == "doomed"
        [spare] = await workers(etcd, keys, ("spare", 4))
        await doomed.revoke()
        moved = await spare.assignment("chat", 0)
        assert moved.generation == deployed.generation
        assert not await etcd.get_prefix(keys.worker_assignments("doomed"))
        await spare.publish("chat", 0, READY)
        await eventually(lambda: _ready_count(p.stub, 1), what="READY on spare")
        assert (await assign(p.stub)).worker_id == "spare"


# -- etcd outage -----------------------------------------------------------------------------


async def test_etcd_outage_degrades_and_recovers(tmp_path: Any, etcd_namespace: str) -> None:
    from llmesh.common.local_etcd import LocalEtcd

    server = LocalEtcd(tmp_path / "etcd", log_level="error")
    server.start()
    try:
        host, port = parse_endpoint(server.endpoint)
        keys = Keys(etcd_namespace)
        async with (
            aetcd.Client(host=host, port=port) as client,
            control_plane(server.endpoint, etcd_namespace) as p,
        ):
            [w1] = await workers(client, keys, ("w1", 4), ttl=60)
            await deploy(p.stub, "chat")
            await w1.publish("chat", 0, READY)
            await eventually(lambda: _ready_count(p.stub, 1), what="READY")

            server.stop()
            await eventually(
                lambda: _is(not p.server.registry.connected), what="registry disconnected"
            )
            # Routing keeps working from the last known state; writes fail clearly.
            assert (await assign(p.stub)).worker_id == "w1"
            err = await rpc_error(deploy(p.stub, "other"))
            assert err.code() == Code.UNAVAILABLE and "etcd" in err.details()

            server.start()
            await eventually(
                lambda: _is(p.server.registry.connected), timeout=15, what="registry back"
            )
            await deploy(p.stub, "other")
            assert {m.name for m in await _models(p.stub)} == {"chat", "other"}
    finally:
        server.stop()


async def _is(value: bool) -> bool:
    return value


# -- health and reflection -------------------------------------------------------------------


async def test_health_and_reflection(plane: Plane) -> None:
    health = health_pb2_grpc.HealthStub(plane.channel)
    for service in ("", "llmesh.v1.ControlPlaneService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(plane.channel)
    call = reflection.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    names = {s.name for s in reply.list_services_response.service}
    assert "llmesh.v1.ControlPlaneService" in names
    assert "grpc.health.v1.Health" in names
    await call.write(
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="llmesh.v1.ControlPlaneService"
        )
    )
    reply = await call.read()
    assert reply.file_descriptor_response.file_descriptor_proto
    await call.done_writing()
