"""Driving every RPC of every llmesh service with generated messages against a live mesh.

:func:`rpcs` lists the RPCs straight from the service descriptors, so a new RPC is fuzzed
without anyone remembering to add it. :func:`plans` draws one case for an RPC: the request
message(s), which server gets it, and whether (and when) the client cancels. :func:`call` runs
a case with a plain synchronous channel and returns an :class:`Outcome`; :meth:`Outcome.problems`
says what is wrong with it (a status outside :data:`ALLOWED`, a status without a sentence, a
ChatSession request error likewise).

Which RPCs change state, and how the fuzz keeps them from wrecking the mesh it runs on:

* ``DeployModel`` / ``UndeployModel`` may only name throwaway models (``fuzz-*``) or invalid
  names; the inference worker's CPUs are all taken by the two fixture models, so a throwaway
  deploy stays PENDING (no replica processes are spawned), while a throwaway *adapter* deploy
  (``base_model`` "chat") is loaded into, and fails in, the real chat engine.
* ``CreateTrainingJob`` / ``CancelTrainingJob``: no trainer worker is registered in the control
  plane's namespace, so jobs stay QUEUED and nothing is launched; the trainer worker that
  ``TrainerService`` is fuzzed on lives in a namespace of its own.
* ``LoadAdapter`` / ``UnloadAdapter`` (replica control port) may only name throwaway models.
* ``Drain`` takes a replica out of service for good: it is fuzzed last, on the embedding replica
  only (see :data:`LAST`).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

from llmesh.v1 import (
    common_pb2,
    control_plane_service_pb2,
    inference_service_pb2,
    replica_service_pb2,
    trainer_service_pb2,
)

from .strategies import messages as message_strategy
from .strategies import text

SERVICES = (
    "llmesh.v1.ControlPlaneService",
    "llmesh.v1.InferenceService",
    "llmesh.v1.TrainerService",
    "llmesh.v1.ReplicaService",
)
# Mentioned so the generated modules register their descriptors before SERVICES are looked up.
_MODULES = (
    common_pb2,
    control_plane_service_pb2,
    inference_service_pb2,
    replica_service_pb2,
    trainer_service_pb2,
)

# Status codes a bad request may get; UNKNOWN and INTERNAL are bugs (and so is OK without a
# reply, which the channel would report as an error).
ALLOWED = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
        "UNIMPLEMENTED",
        "DEADLINE_EXCEEDED",
        "CANCELLED",
        "OUT_OF_RANGE",
        "ABORTED",
        "PERMISSION_DENIED",
    }
)
# How grpc reports a status that did not come from the server's handler.
TRANSPORT_ERRORS = (
    "Stream removed",
    "Received RST_STREAM",
    "Socket closed",
    "failed to connect",
    "Connection reset",
    "Received http2 header with status",
)
_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}

# Names the fixtures use; mutating RPCs must never name them.
PROTECTED = frozenset({"chat", "embed"})
THROWAWAY = tuple(f"fuzz-{i}" for i in range(4))
# RPCs that run after every other one (they take a replica out of service).
LAST = frozenset({"ReplicaService/Drain"})
MUTATING = frozenset(
    {
        "ControlPlaneService/DeployModel",
        "ControlPlaneService/UndeployModel",
        "ControlPlaneService/CreateTrainingJob",
        "ControlPlaneService/CancelTrainingJob",
        "ReplicaService/LoadAdapter",
        "ReplicaService/UnloadAdapter",
        "ReplicaService/Drain",
    }
)
# Most server-stream messages read before the client cancels (watches never end by themselves).
STREAM_READS = 4


@dataclass(frozen=True)
class Rpc:
    """One RPC: where it is served and what its messages look like."""

    service: str  # "ControlPlaneService"
    method: str
    client_streaming: bool
    server_streaming: bool
    request: type
    response: type

    @property
    def name(self) -> str:
        return f"{self.service}/{self.method}"

    def __str__(self) -> str:
        return self.name

    @property
    def path(self) -> str:
        return f"/llmesh.v1.{self.service}/{self.method}"


def rpcs() -> list[Rpc]:
    """Every RPC of every llmesh service, in proto order, the state-changing ones after."""
    pool = descriptor_pool.Default()
    out = []
    for full in SERVICES:
        service = pool.FindServiceByName(full)
        for m in service.methods:
            out.append(
                Rpc(
                    service=service.name,
                    method=m.name,
                    client_streaming=m.client_streaming,
                    server_streaming=m.server_streaming,
                    request=message_factory.GetMessageClass(m.input_type),
                    response=message_factory.GetMessageClass(m.output_type),
                )
            )
    return sorted(out, key=lambda r: (r.name in LAST, r.name in MUTATING))


@dataclass
class Targets:
    """Where each service is served, and the names worth biasing requests towards."""

    control_plane: str
    replicas: dict[str, str]  # model -> InferenceService address of its replica process
    replica_controls: dict[str, str]  # model -> ReplicaService (loopback) address
    trainer: str
    agent: str
    model_paths: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)

    def addresses(self, rpc: Rpc) -> list[str]:
        if rpc.service == "ControlPlaneService":
            return [self.control_plane]
        if rpc.service == "InferenceService":
            return list(self.replicas.values())
        if rpc.service == "TrainerService":
            return [self.trainer]
        if rpc.name in LAST:
            return [self.replica_controls["embed"]]
        return list(self.replica_controls.values())

    def health_addresses(self) -> list[str]:
        return [
            self.control_plane,
            self.agent,
            self.trainer,
            *self.replicas.values(),
            *self.replica_controls.values(),
        ]


def timeout_for(rpc: Rpc) -> float:
    """The client deadline of one case: short for watches, room to decode for generation."""
    if rpc.server_streaming and not rpc.client_streaming:
        return 1.5
    if rpc.method in ("Chat", "ChatSession", "Generate", "Embed", "Rerank"):
        return 6.0
    if rpc.method in ("DeployModel", "UndeployModel"):
        return 2.0
    return 10.0


# -- cases ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """One case: the request messages, the server, and when the client cancels."""

    requests: list[Any]
    address: str
    cancel_after_responses: int | None = None
    cancel_after_seconds: float | None = None

    def __repr__(self) -> str:  # hypothesis prints this for a failing case; keep it readable
        reqs = [_short(r) for r in self.requests]
        return (
            f"Plan(address={self.address!r}, cancel_after_responses="
            f"{self.cancel_after_responses}, cancel_after_seconds={self.cancel_after_seconds}, "
            f"requests={reqs})"
        )


def _short(msg: Any) -> str:
    s = str(msg).replace("\n", " ")
    return s if len(s) < 600 else s[:600] + f"... ({msg.ByteSize()} bytes)"


def _protect(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(THROWAWAY), strategy.filter(lambda s: s not in PROTECTED))


def request_strategy(rpc: Rpc, targets: Targets) -> st.SearchStrategy[Any]:
    """Request messages for ``rpc``: generic, with real names and paths mixed in."""
    names = st.sampled_from(sorted(targets.replicas))
    bias: dict[str, st.SearchStrategy[Any]] = {
        "model": names,
        "base_model": names,
        "model_path": st.sampled_from(targets.model_paths or ["/nonexistent"]),
        "base_model_path": st.sampled_from(targets.model_paths or ["/nonexistent"]),
        "role": st.sampled_from(["system", "user", "assistant", "tool"]),
        "backend": st.sampled_from(["transformers", "embedding", "rerank", "auto", ""]),
        # Most generation requests ask for a handful of tokens, so a case costs a fraction of
        # a second rather than a full context on a 2-core machine; the rest are arbitrary.
        "llmesh.v1.GenerationParams.max_tokens": st.integers(-2, 8),
    }
    if targets.job_ids:
        bias["id"] = bias["job_id"] = st.sampled_from(targets.job_ids)
    override: dict[str, st.SearchStrategy[Any]] = {}
    if rpc.name in MUTATING:
        bias.pop("model")  # Replica.model / UnloadAdapterRequest.model: see below
        protected = _protect(text())
        for key in ("llmesh.v1.Model.name", "llmesh.v1.Replica.model", "name", "model"):
            override[key] = protected
    if rpc.service == "InferenceService" or rpc.name in MUTATING:
        bias["name"] = names
    return message_strategy(rpc.request, bias=bias, override=override)


def _deepen(requests: list[Any], model: str, prompt: str) -> list[Any]:
    """Make the starts of a Chat / ChatSession case well-formed enough to reach the engine."""
    for i, msg in enumerate(requests):
        starts = []
        if isinstance(msg, inference_service_pb2.ChatRequest) and i == 0:
            if msg.WhichOneof("kind") != "start":
                msg.start.SetInParent()
            starts = [msg.start]
        elif isinstance(msg, inference_service_pb2.ChatSessionRequest):
            starts = [s.start for s in msg.starts]
        for start in starts:
            start.model = model
            if not start.messages:
                start.prompt = start.prompt or prompt
            elif start.prompt:
                start.ClearField("prompt")
            if isinstance(msg, inference_service_pb2.ChatSessionRequest):
                start.request_id = start.request_id or uuid.uuid4().hex[:8]
    return requests


def plans(rpc: Rpc, targets: Targets) -> st.SearchStrategy[Plan]:
    """Cases for ``rpc``: messages, server, and a client cancel in one case out of three."""
    one = request_strategy(rpc, targets)
    if rpc.client_streaming:
        requests = st.lists(one, max_size=4)
        if rpc.method in ("Chat", "ChatSession"):
            deep = st.tuples(
                st.lists(one, min_size=1, max_size=3),
                st.sampled_from(sorted(targets.replicas)),
                st.sampled_from(["Hi", "Tell me about the sky.", "x" * 3000]),
            ).map(lambda t: _deepen(*t))
            requests = st.one_of(requests, deep)
    else:
        requests = one.map(lambda m: [m])
    cancel = st.one_of(
        st.just((None, None)),
        st.just((None, None)),
        st.tuples(st.integers(0, 3), st.none()),
        st.tuples(st.none(), st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.2])),
    )
    return st.builds(
        lambda reqs, address, c: Plan(reqs, address, c[0], c[1]),
        requests,
        st.sampled_from(targets.addresses(rpc)),
        cancel,
    )


# -- running one case -----------------------------------------------------------------------


@dataclass
class Outcome:
    """What one case came back with."""

    rpc: str
    code: str  # "OK" or a status code name
    details: str = ""
    responses: int = 0
    client_cancelled: bool = False
    request_errors: list[tuple[int, str]] = field(default_factory=list)  # ChatSession
    seconds: float = 0.0

    def problems(self) -> list[str]:
        """What is wrong with this outcome (empty when it is acceptable)."""
        out = []
        if self.code != "OK":
            if self.code not in ALLOWED:
                out.append(f"{self.rpc} answered {self.code}: {self.details!r}")
            elif not self.details.strip():
                out.append(f"{self.rpc} answered {self.code} without a sentence")
            elif self.code not in ("DEADLINE_EXCEEDED", "CANCELLED") and self.details.startswith(
                TRANSPORT_ERRORS
            ):
                # Not the server's sentence: the connection broke, or the status did not fit
                # in the trailers (a server that died, or one that echoed a huge value).
                out.append(f"{self.rpc} got a transport error, not a status: {self.details!r}")
        for code, message in self.request_errors:
            name = _CODE_NAMES.get(code, f"code {code}")
            if name not in ALLOWED:
                out.append(f"{self.rpc} request error {name}: {message!r}")
            elif not message.strip():
                out.append(f"{self.rpc} request error {name} without a sentence")
        return out


def _collect(rpc: Rpc, response: Any, outcome: Outcome) -> None:
    outcome.responses += 1
    if isinstance(response, inference_service_pb2.ChatSessionResponse):
        outcome.request_errors.extend((e.code, e.message) for e in response.errors)


def call(rpc: Rpc, plan: Plan, *, channels: Channels) -> Outcome:
    """Run one case; never raises for an RPC error (that is the outcome)."""
    channel = channels.get(plan.address)
    outcome = Outcome(rpc.name, "OK")
    timeout = timeout_for(rpc)
    kwargs = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": rpc.response.FromString,
    }
    started = time.monotonic()
    timer: threading.Timer | None = None
    try:
        if not rpc.client_streaming and not rpc.server_streaming:
            future = channel.unary_unary(rpc.path, **kwargs).future(
                plan.requests[0], timeout=timeout
            )
            if plan.cancel_after_seconds is not None:
                timer = threading.Timer(plan.cancel_after_seconds, future.cancel)
                timer.start()
            try:
                _collect(rpc, future.result(), outcome)
            except grpc.FutureCancelledError:
                outcome.code, outcome.details = "CANCELLED", "cancelled by the client"
                outcome.client_cancelled = True
        else:
            if rpc.client_streaming:
                stream = channel.stream_stream(rpc.path, **kwargs)(
                    iter(plan.requests), timeout=timeout
                )
            else:
                stream = channel.unary_stream(rpc.path, **kwargs)(plan.requests[0], timeout=timeout)
            if plan.cancel_after_seconds is not None:
                timer = threading.Timer(plan.cancel_after_seconds, stream.cancel)
                timer.start()
            limit = plan.cancel_after_responses
            if limit is None and not rpc.client_streaming:
                limit = STREAM_READS
            if limit == 0:
                outcome.client_cancelled = True
                stream.cancel()
            for response in stream:
                _collect(rpc, response, outcome)
                if limit is not None and outcome.responses >= limit:
                    outcome.client_cancelled = True
                    stream.cancel()
                    break
    except grpc.RpcError as err:
        outcome.code = err.code().name
        outcome.details = err.details() or ""
    finally:
        if timer is not None:
            timer.cancel()
            if timer.finished.is_set() and outcome.code == "CANCELLED":
                outcome.client_cancelled = True
    outcome.seconds = time.monotonic() - started
    return outcome


class Channels:
    """One channel per address, reused across cases (a channel per case costs a handshake)."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}

    def get(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.insecure_channel(
                address,
                options=[
                    ("grpc.max_send_message_length", 64 * 1024 * 1024),
                    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ],
            )
        return self._channels[address]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


# -- the mesh under fuzz --------------------------------------------------------------------


def health(address: str, timeout: float = 10) -> str:
    """The grpc.health.v1 status of a server ("SERVING", ...)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@contextlib.contextmanager
def fuzz_mesh(
    mesh: Any, test_model_dir: Path, embedding_model_dir: Path, work_dir: Path
) -> Iterator[Targets]:
    """Start the mesh under fuzz on ``mesh`` (a ``tests.integration.conftest.Mesh``).

    A control plane; an inference worker whose 2 CPUs are taken by "chat" (transformers, the
    test model) and "embed" (the embedding engine); a trainer worker in a namespace of its
    own; one training job, QUEUED for good. Yields where everything is served.
    """
    from llmesh.trainer_worker.server import run_trainer_worker

    cp_address = mesh.start_control_plane()
    worker = mesh.start_worker("fuzz-w0", cpus=2)
    admin = _admin(cp_address)
    chat = control_plane_service_pb2.Model(
        name="chat",
        model_path=str(test_model_dir),
        backend="transformers",
        infer_params={"max_concurrency": "4", "max_queue": "8", "queue_timeout": "5"},
    )
    embed = control_plane_service_pb2.Model(
        name="embed", model_path=str(embedding_model_dir), backend="embedding"
    )
    for model in (chat, embed):
        admin.DeployModel(
            control_plane_service_pb2.DeployModelRequest(
                model=model, wait_ready=True, timeout_seconds=240
            ),
            timeout=250,
        )
    (work_dir / "data.jsonl").write_text('{"instruction": "Hi", "output": "Hello."}\n')
    job = admin.CreateTrainingJob(
        control_plane_service_pb2.CreateTrainingJobRequest(
            spec=trainer_service_pb2.TrainingJobSpec(
                kind=trainer_service_pb2.TRAINING_JOB_KIND_SFT,
                base_model_path=str(test_model_dir),
                data_path=str(work_dir / "data.jsonl"),
            )
        ),
        timeout=30,
    ).job

    async def start_trainer() -> Any:
        stack = contextlib.AsyncExitStack()
        trainer = await stack.enter_async_context(
            run_trainer_worker(
                etcd=mesh.etcd,
                namespace=mesh.namespace + "-trainer",
                worker_id="fuzz-t0",
                cpus=1,
                gpus=0,
                jobs_dir=work_dir / "jobs",
            )
        )
        return trainer, stack

    trainer, trainer_stack = mesh.call(start_trainer())
    try:
        controls = {}
        for name in ("chat", "embed"):
            sup = worker.agent.supervisor_of(name)
            controls[name] = json.loads((sup.dir / "address.json").read_text())["control_address"]
        yield Targets(
            control_plane=cp_address,
            replicas={name: worker.replica_address(name) for name in ("chat", "embed")},
            replica_controls=controls,
            trainer=trainer.address,
            agent=worker.address,
            model_paths=[str(test_model_dir), str(embedding_model_dir), str(work_dir)],
            job_ids=[job.id],
        )
    finally:
        mesh.call(trainer_stack.aclose())


def _admin(address: str) -> Any:
    from llmesh.v1 import control_plane_service_pb2_grpc

    return control_plane_service_pb2_grpc.ControlPlaneServiceStub(grpc.insecure_channel(address))


def check_survived(
    targets: Targets, idle: Callable[[str, str], Any], models: Sequence[str] = ("chat", "embed")
) -> list[str]:
    """Everything still serves, every replica is idle, the control plane lists the models.

    Args:
        targets: the mesh.
        idle: ``wait_replica_idle(address, model)`` (raises when requests are left over).
        models: replicas to check; leave out one that was drained on purpose.
    """
    problems = []
    for address in targets.health_addresses():
        try:
            status = health(address)
        except grpc.RpcError as err:
            status = f"{err.code().name}: {err.details()}"
        if status != "SERVING":
            problems.append(f"{address} health: {status}")
    for model in models:
        try:
            idle(targets.replicas[model], model)
        except (AssertionError, grpc.RpcError) as err:
            problems.append(f"replica of {model}: {err}")
    listed = _admin(targets.control_plane).ListModels(
        control_plane_service_pb2.ListModelsRequest(), timeout=10
    )
    ready = {
        m.name
        for m in listed.models
        if m.replicas and all(r.state == common_pb2.REPLICA_STATE_READY for r in m.replicas)
    }
    for model in models:
        if model not in ready:
            problems.append(f"control plane does not list {model} READY")
    return problems
