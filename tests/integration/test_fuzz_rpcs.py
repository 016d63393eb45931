"""Bad input at scale, bounded for CI: every RPC of every service with generated messages.

Messages come from the protos' descriptors (tests/fuzz/strategies.py): arbitrary field values,
wrong oneof choices, huge strings, lists and maps, unknown models, unknown enum values, and
client cancels at random points. Every failure must be a defined status code with a sentence
(never UNKNOWN or INTERNAL); afterwards every server still answers health checks, the replicas
hold no request, and the control plane still lists its models READY. How the state-changing
RPCs are kept from wrecking the mesh is in tests/fuzz/driver.py; they run after the others,
and Drain runs last of all.

Reproducible: derandomized, no example database. ``benchmarks/fuzz.py`` runs 10,000 cases.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings

from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import inference_service_pb2 as inf
from llmesh.v1 import replica_service_pb2 as rs
from llmesh.v1 import trainer_service_pb2 as tr
from tests.fuzz import driver

from .conftest import Mesh, wait_replica_idle

# Cases per RPC: generation RPCs cost the most, watches and lookups the least.
EXAMPLES = {
    "InferenceService/Chat": 20,
    "InferenceService/ChatSession": 20,
    "InferenceService/Generate": 12,
}
DEFAULT_EXAMPLES = 10

RPCS = driver.rpcs()

HUGE = "\U000433cc" * 300_000  # 1.2 MB of UTF-8, 3.6 MB once percent-encoded in a trailer

# Cases the fuzz found (and one found writing it), kept as explicit examples of the RPC's fuzz
# and checked for their exact status by test_found_bugs_stay_fixed: (rpc, request, code).
FOUND: list[tuple[str, Any, str]] = [
    # A sentence echoing a huge name overflowed the client's 16 KiB trailer limit: the caller
    # got RESOURCE_EXHAUSTED "received metadata size exceeds hard limit", not the sentence.
    ("ControlPlaneService/GetModel", cp.GetModelRequest(name=HUGE), "NOT_FOUND"),
    ("InferenceService/Tokenize", inf.TokenizeRequest(model=HUGE), "NOT_FOUND"),
    (
        "ControlPlaneService/DeployModel",
        cp.DeployModelRequest(model=cp.Model(name=HUGE)),
        "INVALID_ARGUMENT",
    ),
    # A job id too big for an etcd request was reported as "etcd is unreachable" (UNAVAILABLE)
    # by the trainer worker; the control plane (NOT_FOUND from memory) now refuses it the same.
    ("TrainerService/GetJob", tr.GetJobRequest(job_id="x" * 2_000_000), "INVALID_ARGUMENT"),
    ("TrainerService/WatchJob", tr.WatchJobRequest(job_id="x" * 2_000_000), "INVALID_ARGUMENT"),
    (
        "ControlPlaneService/CancelTrainingJob",
        cp.CancelTrainingJobRequest(id="x" * 2_000_000),
        "INVALID_ARGUMENT",
    ),
    # LoadAdapter hosted the adapter under assignment.model: naming a model it was not (here a
    # base model of the process) made the adapter take that model's requests.
    (
        "ReplicaService/LoadAdapter",
        rs.LoadAdapterRequest(
            model=cp.Model(name="fuzz-adapter", base_model="chat", model_path="/nowhere"),
            assignment=common_pb2.Replica(model="chat", generation=99),
        ),
        "INVALID_ARGUMENT",
    ),
    (
        "ReplicaService/LoadAdapter",
        rs.LoadAdapterRequest(
            model=cp.Model(name="chat", base_model="embed", model_path="/nowhere"),
            assignment=common_pb2.Replica(model="chat", generation=99),
        ),
        "INVALID_ARGUMENT",
    ),
]


@pytest.fixture(scope="module")
def fuzzed(
    etcd_server: Any,
    test_model_dir: Path,
    embedding_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[driver.Targets, driver.Channels]]:
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-fuzz-{uuid.uuid4().hex[:6]}")
    channels = driver.Channels()
    try:
        with driver.fuzz_mesh(
            mesh, test_model_dir, embedding_model_dir, tmp_path_factory.mktemp("fuzz")
        ) as targets:
            yield targets, channels
    finally:
        channels.close()
        mesh.close()


def _fuzz(rpc: driver.Rpc, targets: driver.Targets, channels: driver.Channels) -> None:
    @settings(
        max_examples=EXAMPLES.get(rpc.name, DEFAULT_EXAMPLES),
        deadline=None,
        database=None,
        derandomize=True,
        # A failure shrinks against the live mesh; a few hundred calls at most.
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(plan=driver.plans(rpc, targets))
    def case(plan: driver.Plan) -> None:
        outcome = driver.call(rpc, plan, channels=channels)
        assert not outcome.problems(), outcome.problems()

    for name, request, _ in FOUND:
        if name == rpc.name:
            case = example(plan=driver.Plan([request], _address(rpc, request, targets)))(case)
    case()


def _address(rpc: driver.Rpc, request: Any, targets: driver.Targets) -> str:
    if rpc.name == "ReplicaService/LoadAdapter":
        return targets.replica_controls["chat"]
    return targets.addresses(rpc)[0]


@pytest.mark.parametrize("rpc", [r for r in RPCS if r.name not in driver.LAST], ids=str)
def test_every_rpc_answers_bad_input_with_a_defined_status(
    rpc: driver.Rpc, fuzzed: tuple[driver.Targets, driver.Channels]
) -> None:
    _fuzz(rpc, *fuzzed)


@pytest.mark.parametrize("found", FOUND, ids=[f"{f[0]}-{i}" for i, f in enumerate(FOUND)])
def test_found_bugs_stay_fixed(
    found: tuple[str, Any, str], fuzzed: tuple[driver.Targets, driver.Channels]
) -> None:
    name, request, code = found
    targets, channels = fuzzed
    rpc = next(r for r in RPCS if r.name == name)
    outcome = driver.call(
        rpc, driver.Plan([request], _address(rpc, request, targets)), channels=channels
    )
    assert outcome.code == code, outcome
    assert not outcome.problems()


def test_the_mesh_survived_the_fuzz(fuzzed: tuple[driver.Targets, driver.Channels]) -> None:
    targets, _ = fuzzed
    assert driver.check_survived(targets, wait_replica_idle) == []


@pytest.mark.parametrize("rpc", [r for r in RPCS if r.name in driver.LAST], ids=str)
def test_draining_rpcs_last(
    rpc: driver.Rpc, fuzzed: tuple[driver.Targets, driver.Channels]
) -> None:
    targets, channels = fuzzed
    _fuzz(rpc, targets, channels)
    # The drained replica (embed) takes no requests now; everything else still works.
    assert driver.check_survived(targets, wait_replica_idle, models=("chat",)) == []
