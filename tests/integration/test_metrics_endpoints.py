"""Every server kind serves /metrics, and a real mesh's traffic shows up in it.

One module-scoped mesh (control plane, node agent with a real replica process on the test
model, trainer worker) answers every test here: each scrapes the real endpoints over HTTP.
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmesh.v1 import common_pb2, inference_service_pb2_grpc
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc
from llmesh.v1 import inference_service_pb2 as inf

from .conftest import Mesh

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
CHAT = {"model_name": "chat", "replica": "0"}


def scrape(url: str) -> Samples:
    """Every sample on a /metrics page, keyed by (name, labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def wait_for(check: Callable[[], Any], what: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            assert got, f"timed out waiting for {what}"
            return got
        time.sleep(0.05)


class Running:
    """The module's mesh and where to reach each of its servers."""

    def __init__(self, mesh: Mesh, trainer: Any, replica: common_pb2.Replica) -> None:
        self.mesh = mesh
        self.trainer = trainer
        self.replica = replica
        self.cp_stub = cp_grpc.ControlPlaneServiceStub(grpc.insecure_channel(mesh.address()))
        self.inf_stub = inference_service_pb2_grpc.InferenceServiceStub(
            grpc.insecure_channel(replica.address)
        )

    def replica_metrics(self) -> Samples:
        return scrape(self.replica.metrics_url)


def _params(max_tokens: int) -> common_pb2.GenerationParams:
    params = common_pb2.GenerationParams(max_tokens=max_tokens, temperature=0.0)
    params.extra.update({"ignore_eos": True})
    return params


@pytest.fixture(scope="module")
def running(etcd_server: Any, test_model_dir: Path) -> Iterator[Running]:
    from llmesh.trainer_worker.server import run_trainer_worker

    mesh = Mesh(etcd_server.endpoint, f"/llmesh-metrics-{uuid.uuid4().hex[:6]}")
    try:
        mesh.start_control_plane()
        mesh.start_worker("w-metrics")

        async def start_trainer() -> tuple[Any, contextlib.AsyncExitStack]:
            stack = contextlib.AsyncExitStack()
            trainer = await stack.enter_async_context(
                run_trainer_worker(
                    etcd=mesh.etcd,
                    namespace=mesh.namespace,
                    worker_id="t-metrics",
                    jobs_dir=str(test_model_dir.parent / "metrics-jobs"),
                    lease_ttl=2,
                )
            )
            return trainer, stack

        trainer, trainer_stack = mesh.call(start_trainer())
        stub = cp_grpc.ControlPlaneServiceStub(grpc.insecure_channel(mesh.address()))
        model = cp.Model(name="chat", model_path=str(test_model_dir), backend="transformers")
        # One slot and one queue place: the third concurrent request is RESOURCE_EXHAUSTED.
        model.infer_params.update({"max_concurrency": "1", "max_queue": "1"})
        deployed = stub.DeployModel(
            cp.DeployModelRequest(model=model, wait_ready=True, timeout_seconds=180)
        ).model
        (replica,) = deployed.replicas
        yield Running(mesh, trainer, replica)
        mesh.call(trainer_stack.aclose())
    finally:
        mesh.close()


def test_replica_url_is_published_and_every_server_serves_metrics(running: Running) -> None:
    mesh = running.mesh
    control_plane = mesh.control_planes["cp0"][0]
    worker = mesh.workers["w-metrics"][0]
    workers = {w.id: w for w in running.cp_stub.ListWorkers(cp.ListWorkersRequest()).workers}
    # Published where operators look: the worker records and the replica's status.
    assert workers["w-metrics"].metrics_url == worker.metrics.url
    assert workers["t-metrics"].metrics_url == running.trainer.metrics.url
    assert running.replica.metrics_url.startswith("http://127.0.0.1:")
    urls = {
        control_plane.metrics.url,
        worker.metrics.url,
        running.trainer.metrics.url,
        running.replica.metrics_url,
    }
    assert len(urls) == 4  # a port of its own each

    got = scrape(control_plane.metrics.url)
    assert value(got, "llmesh:models") == 1
    assert value(got, "llmesh:replicas", model_name="chat", state="READY") == 1
    assert value(got, "llmesh:workers", kind="inference") == 1
    assert value(got, "llmesh:workers", kind="trainer") == 1
    assert value(got, "llmesh:etcd_reachable") == 1
    assert value(got, "llmesh:etcd_request_duration_seconds_count") >= 1

    got = scrape(worker.metrics.url)
    process = {**CHAT, "generation": str(running.replica.generation)}
    assert value(got, "llmesh:replica_process_up", **process) == 1
    assert value(got, "llmesh:replica_process_state", **process, state="READY") == 1
    assert value(got, "llmesh:replica_restarts_total", **process) == 0

    got = scrape(running.trainer.metrics.url)
    assert any(name == "process_resident_memory_bytes" for name, _ in got)

    got = running.replica_metrics()
    assert value(got, "llmesh:num_requests_running", **CHAT) == 0
    assert value(got, "llmesh:num_requests_waiting", **CHAT) == 0


def test_chat_traffic_fills_latencies_tokens_and_finish_reasons(running: Running) -> None:
    before = running.replica_metrics()
    start = inf.ChatStart(model="chat", prompt="hello", params=_params(6))
    for _ in range(2):
        out = list(running.inf_stub.Chat(iter([inf.ChatRequest(start=start)]), timeout=60))
        assert out[-1].finished
    usage = out[-1].usage
    after = running.replica_metrics()

    def grew(name: str, **extra: str) -> float:
        return (value(after, name, **CHAT, **extra) or 0) - (
            value(before, name, **CHAT, **extra) or 0
        )

    assert grew("llmesh:request_success_total", finished_reason="length") == 2
    assert grew("llmesh:time_to_first_token_seconds_count") == 2
    assert grew("llmesh:e2e_request_latency_seconds_count") == 2
    assert grew("llmesh:request_queue_time_seconds_count") == 2
    assert grew("llmesh:inter_token_latency_seconds_count") >= 2  # one per step after the 1st
    assert grew("llmesh:generation_tokens_total") == 2 * usage.completion_tokens == 12
    assert grew("llmesh:prompt_tokens_total") == 2 * usage.prompt_tokens > 0

    # A request that continues one another replica started counts as a migration here.
    resumed = inf.ChatStart(model="chat", prompt="hello", params=_params(6))
    resumed.resume_token_ids.extend([t for r in out for t in r.token_ids][:3])
    out = list(running.inf_stub.Chat(iter([inf.ChatRequest(start=resumed)]), timeout=60))
    assert out[-1].usage.completion_tokens == 6  # the client sees one request of 6 tokens
    before, after = after, running.replica_metrics()
    assert grew("llmesh:request_migrations_total") == 1
    # ... of which 3 were generated (and counted) where it started: 3 are new here.
    assert grew("llmesh:generation_tokens_total") == 3
    assert grew("llmesh:prompt_tokens_total") == usage.prompt_tokens  # prefilled again here

    # The unary Generate RPC counts its prompts too.
    running.inf_stub.Generate(
        inf.GenerateRequest(model="chat", prompts=["a", "b"], params=_params(3)), timeout=60
    )
    before, after = after, running.replica_metrics()
    assert grew("llmesh:request_success_total", finished_reason="length") == 2
    assert grew("llmesh:generation_tokens_total") == 6


def test_aborts_are_counted_by_how(running: Running) -> None:
    stub = running.inf_stub
    before = running.replica_metrics()

    def aborted(how: str) -> float:
        got = running.replica_metrics()
        return value(got, "llmesh:request_aborted_total", **CHAT, how=how) or 0

    base = {h: aborted(h) for h in ("cancel", "abort", "disconnect", "deadline")}

    # cancel: a cancel message on the Chat stream after the first output.
    start = inf.ChatStart(model="chat", prompt="hello", params=_params(2000), request_id="c1")
    cancel_sent: list[bool] = []

    def requests() -> Iterator[inf.ChatRequest]:
        yield inf.ChatRequest(start=start)
        while not cancel_sent:
            time.sleep(0.01)
        yield inf.ChatRequest(cancel=inf.ChatCancel())

    call = stub.Chat(requests(), timeout=60)
    next(call)
    cancel_sent.append(True)
    last = list(call)[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_ABORTED

    # abort: the Abort RPC by request id.
    start = inf.ChatStart(model="chat", prompt="hello", params=_params(2000), request_id="a1")
    call = stub.Chat(iter([inf.ChatRequest(start=start)]), timeout=60)
    next(call)
    assert stub.Abort(inf.AbortRequest(request_id="a1")).aborted
    assert list(call)[-1].finish_reason == common_pb2.FINISH_REASON_ABORTED

    # disconnect: the client cancels the call.
    start = inf.ChatStart(model="chat", prompt="hello", params=_params(2000), request_id="d1")
    call = stub.Chat(iter([inf.ChatRequest(start=start)]), timeout=60)
    next(call)
    call.cancel()

    # deadline: a session request's own timeout.
    start = inf.ChatStart(model="chat", prompt="hello", params=_params(2000), request_id="t1")
    session = stub.ChatSession(
        iter([inf.ChatSessionRequest(starts=[inf.SessionStart(start=start, timeout_ms=300)])]),
        timeout=60,
    )
    errors = [e for message in session for e in message.errors]
    assert errors and errors[0].code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]

    for how in base:
        wait_for(lambda how=how: aborted(how) == base[how] + 1, f"one more {how} abort")
    after = running.replica_metrics()
    grown = (value(after, "llmesh:request_success_total", **CHAT, finished_reason="abort") or 0) - (
        value(before, "llmesh:request_success_total", **CHAT, finished_reason="abort") or 0
    )
    assert grown == 4


def test_a_full_queue_counts_resource_exhausted_and_waiting(running: Running) -> None:
    stub = running.inf_stub

    def exhausted() -> float:
        got = running.replica_metrics()
        return value(got, "llmesh:resource_exhausted_total", **CHAT, reason="queue_full") or 0

    base = exhausted()
    calls = []
    for i in range(2):
        start = inf.ChatStart(model="chat", prompt="hi", params=_params(2000), request_id=f"q{i}")
        calls.append(stub.Chat(iter([inf.ChatRequest(start=start)]), timeout=60))
    next(calls[0])  # running
    got = wait_for(
        lambda: (
            (m := running.replica_metrics())
            and value(m, "llmesh:num_requests_waiting", **CHAT) == 1
            and m
        ),
        "the second request to wait in the queue",
    )
    assert value(got, "llmesh:num_requests_running", **CHAT) == 1
    third = inf.ChatStart(model="chat", prompt="hi", params=_params(4), request_id="q2")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Chat(iter([inf.ChatRequest(start=third)]), timeout=60))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exhausted() == base + 1

    def disconnects() -> float:
        got = running.replica_metrics()
        return value(got, "llmesh:request_aborted_total", **CHAT, how="disconnect") or 0

    gone = disconnects()
    calls[1].cancel()  # gone while still in the queue: an abort by disconnect too
    wait_for(lambda: disconnects() == gone + 1, "the queued request's disconnect")
    calls[0].cancel()
    wait_for(lambda: disconnects() == gone + 2, "the running request's disconnect")
    wait_for(
        lambda: value(running.replica_metrics(), "llmesh:num_requests_running", **CHAT) == 0,
        "the slot to free",
    )


def test_assign_worker_counts_routing_decisions(running: Running) -> None:
    stub = running.cp_stub
    url = running.mesh.control_planes["cp0"][0].metrics.url

    def decisions(policy: str, reason: str) -> float:
        return value(scrape(url), "llmesh:routing_decisions_total", policy=policy, reason=reason)

    base = {
        key: decisions(*key) or 0
        for key in [("least_loaded", "policy"), ("round_robin", "pinned"), ("random", "refused")]
    }
    stub.AssignWorker(cp.AssignWorkerRequest(model="chat"))
    stub.AssignWorker(cp.AssignWorkerRequest(model="chat"))
    stub.AssignWorker(
        cp.AssignWorkerRequest(
            model="chat", policy=cp.LOAD_BALANCE_POLICY_ROUND_ROBIN, pinned_replica=0
        )
    )
    with pytest.raises(grpc.RpcError):
        stub.AssignWorker(
            cp.AssignWorkerRequest(model="no-such", policy=cp.LOAD_BALANCE_POLICY_RANDOM)
        )
    assert decisions("least_loaded", "policy") == base[("least_loaded", "policy")] + 2
    assert decisions("round_robin", "pinned") == base[("round_robin", "pinned")] + 1
    assert decisions("random", "refused") == base[("random", "refused")] + 1


def test_failed_requests_are_counted_by_code(running: Running) -> None:
    stub = running.inf_stub

    def errors(code: str) -> float:
        got = running.replica_metrics()
        return value(got, "llmesh:request_errors_total", **CHAT, code=code) or 0

    base = errors("INVALID_ARGUMENT")
    # A chat request whose messages do not render (an unknown role): refused in the slot.
    start = inf.ChatStart(model="chat", messages=[common_pb2.ChatMessage(role="robot")])
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Chat(iter([inf.ChatRequest(start=start)]), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert errors("INVALID_ARGUMENT") == base + 1
    # A Generate prompt longer than the model's context (2048 tokens): the engine refuses it.
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(
            inf.GenerateRequest(model="chat", prompts=["hello " * 3000], params=_params(3)),
            timeout=60,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert errors("INVALID_ARGUMENT") == base + 2


def test_generate_observes_queue_time_and_counts_stopped_siblings_as_cancel(
    running: Running, test_model_dir: Path
) -> None:
    """Generate measures each prompt from before its slot (queue time observed), and when one
    prompt of a batch fails the siblings the call stops count as ``cancel``, not disconnect."""
    stub = running.inf_stub
    before = running.replica_metrics()
    stub.Generate(inf.GenerateRequest(model="chat", prompts=["a", "b"], params=_params(2)))
    after = running.replica_metrics()
    queued = (value(after, "llmesh:request_queue_time_seconds_count", **CHAT) or 0) - (
        value(before, "llmesh:request_queue_time_seconds_count", **CHAT) or 0
    )
    assert queued == 2

    # Two slots: the batch runs in two lanes; the too-long prompt fails and stops the other.
    model = cp.Model(name="batch", model_path=str(test_model_dir), backend="transformers")
    model.infer_params.update({"max_concurrency": "2"})
    deployed = running.cp_stub.DeployModel(
        cp.DeployModelRequest(model=model, wait_ready=True, timeout_seconds=180)
    ).model
    try:
        (replica,) = deployed.replicas
        labels = {"model_name": "batch", "replica": str(replica.index)}
        batch = inference_service_pb2_grpc.InferenceServiceStub(
            channel := grpc.insecure_channel(replica.address)
        )
        with channel, pytest.raises(grpc.RpcError) as err:
            batch.Generate(
                inf.GenerateRequest(
                    model="batch", prompts=["hello", "hello " * 3000], params=_params(100000)
                ),
                timeout=60,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        got = wait_for(
            lambda: (
                (m := scrape(replica.metrics_url))
                and value(m, "llmesh:request_aborted_total", **labels, how="cancel") == 1
                and m
            ),
            "the stopped sibling to count as a cancel",
        )
        assert value(got, "llmesh:request_aborted_total", **labels, how="disconnect") == 0
        assert value(got, "llmesh:request_errors_total", **labels, code="INVALID_ARGUMENT") == 1
    finally:
        running.cp_stub.UndeployModel(cp.UndeployModelRequest(name="batch"))


def test_adapter_requests_count_as_the_adapters_until_it_is_unloaded(
    running: Running, test_model_dir: Path, tmp_path: Path
) -> None:
    """An adapter's requests wait in its base's queue but count as the adapter's waiting; its
    series leave the page when it is unloaded."""
    from .test_lora_mesh import make_adapter

    adapter = make_adapter(test_model_dir, tmp_path / "lora", seed=3)
    model = cp.Model(name="chat-lora", model_path=str(adapter), base_model="chat")
    running.cp_stub.DeployModel(
        cp.DeployModelRequest(model=model, wait_ready=True, timeout_seconds=120)
    )
    lora = {"model_name": "chat-lora", "replica": "0"}
    stub = running.inf_stub
    calls = []
    try:
        # The base's only slot is taken; the adapter's request waits in the base's queue.
        start = inf.ChatStart(model="chat", prompt="hi", params=_params(2000), request_id="b0")
        calls.append(stub.Chat(iter([inf.ChatRequest(start=start)]), timeout=60))
        next(calls[0])
        start = inf.ChatStart(model="chat-lora", prompt="hi", params=_params(4), request_id="l0")
        calls.append(stub.Chat(iter([inf.ChatRequest(start=start)]), timeout=60))
        got = wait_for(
            lambda: (
                (m := running.replica_metrics())
                and value(m, "llmesh:num_requests_waiting", **lora) == 1
                and m
            ),
            "the adapter's request to wait as the adapter's",
        )
        assert value(got, "llmesh:num_requests_waiting", **CHAT) == 0
        assert value(got, "llmesh:num_requests_running", **CHAT) == 1
    finally:
        for call in calls:
            call.cancel()
        wait_for(
            lambda: value(running.replica_metrics(), "llmesh:num_requests_running", **CHAT) == 0,
            "the slot to free",
        )
        running.cp_stub.UndeployModel(cp.UndeployModelRequest(name="chat-lora"))
    # Unloaded: its series leave the page (LoRA churn must not grow it forever).
    wait_for(
        lambda: (
            not any(
                ("model_name", "chat-lora") in labels for _, labels in running.replica_metrics()
            )
        ),
        "the adapter's series to leave the page",
    )
    assert value(running.replica_metrics(), "llmesh:num_requests_running", **CHAT) == 0


def test_a_call_whose_grpc_deadline_expires_counts_as_deadline(running: Running) -> None:
    """A Chat call cut off by its own gRPC deadline (here while it waits for the only slot)
    is a ``deadline`` abort, not a ``disconnect``."""
    stub = running.inf_stub

    def aborted(how: str) -> float:
        got = running.replica_metrics()
        return value(got, "llmesh:request_aborted_total", **CHAT, how=how) or 0

    base = {how: aborted(how) for how in ("deadline",)}
    start = inf.ChatStart(model="chat", prompt="hi", params=_params(2000), request_id="g0")
    holder = stub.Chat(iter([inf.ChatRequest(start=start)]), timeout=60)
    next(holder)  # holds the slot until cancelled below
    try:
        start = inf.ChatStart(model="chat", prompt="hi", params=_params(4), request_id="g1")
        # It waits behind the holder (thousands of tokens, seconds) when its deadline passes.
        call = stub.Chat(iter([inf.ChatRequest(start=start)]), timeout=1)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: aborted("deadline") == base["deadline"] + 1, "the deadline abort")
    finally:
        holder.cancel()
    wait_for(
        lambda: value(running.replica_metrics(), "llmesh:num_requests_running", **CHAT) == 0,
        "the slot to free",
    )
    assert aborted("deadline") == base["deadline"] + 1  # counted once: not a disconnect too
