"""Mid-stream failover under a real fault: SIGKILL a replica process while streams run.

Two workers, one model on two replicas (transformers engine). The same requests are run once
without a fault (the reference) and once with one replica killed after every stream has
produced output: no request fails, and every answer is identical to the reference, because
the streams on the killed replica move to the other one and continue from the exact token
where they broke.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from llmesh import ByzerLLM
from llmesh.common import tracing
from llmesh.common.errors import DeadlineExceeded
from llmesh.inference_worker.replica_process import STALL_ENV
from llmesh.v1 import common_pb2
from tests.chaos.procs import Child, inference_worker
from tests.integration.conftest import Mesh, replica_stats

STREAMS = 16
TOKENS = 300
# 60 integers: long enough that a kill lands inside the JSON.
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "values": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 999},
                "minItems": 60,
                "maxItems": 60,
            }
        },
        "required": ["values"],
    }
)


@pytest.fixture(scope="module")
def two_replicas(etcd_server: Any, test_model_dir: Path) -> Iterator[tuple[Mesh, ByzerLLM]]:
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-chaos-{uuid.uuid4().hex[:6]}")
    address = mesh.start_control_plane()
    mesh.start_worker("w0", cpus=2)
    mesh.start_worker("w1", cpus=2)
    llm = ByzerLLM(control_plane=address)
    llm.setup_num_workers(2).setup_cpus_per_worker(1).setup_infer_backend("transformers")
    llm.deploy(str(test_model_dir), "custom/llama", "chat", {"max_concurrency": STREAMS})
    yield mesh, llm
    llm.close()
    mesh.close()


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Story number {i}: tell me about the sea and ships."}]


def _config(i: int, sampling: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {"max_length": TOKENS, "ignore_eos": True, "timeout_s": 120}
    if sampling == "greedy":
        cfg["temperature"] = 0
    else:
        cfg.update({"temperature": 1.0, "top_p": 0.9, "seed": 1000 + i})
    return cfg


async def _run_all(
    llm: ByzerLLM, sampling: str, kill: Any = None, model: str = "chat"
) -> list[tuple[str, dict[str, Any]]]:
    """Run the streams concurrently; ``kill()`` once every stream has produced output."""
    started = [asyncio.Event() for _ in range(STREAMS)]

    async def one(i: int) -> tuple[str, dict[str, Any]]:
        item: tuple[str, Any] = ("", {})
        async for item in llm.async_stream_chat_oai(
            _messages(i), model=model, llm_config=_config(i, sampling)
        ):
            if item[1].get("generated_tokens_count", 0) >= 10:
                started[i].set()
        return item[0], dict(item[1])

    async def killer() -> None:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        await asyncio.to_thread(kill)

    tasks = [asyncio.create_task(one(i)) for i in range(STREAMS)]
    try:
        if kill is not None:
            await killer()
        return list(await asyncio.gather(*tasks))
    finally:
        await llm.aclose_async_channels()


def _kill_replica(mesh: Mesh, worker_id: str) -> Any:
    def kill() -> None:
        address = mesh.workers[worker_id][0].replica_address("chat")
        os.kill(int(replica_stats(address, "chat")["pid"]), signal.SIGKILL)

    return kill


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_killing_a_replica_under_load_fails_nothing_and_changes_no_answer(
    two_replicas: Any, sampling: str, span_exporter: Any
) -> None:
    mesh, llm = two_replicas
    reference = asyncio.run(_run_all(llm, sampling))
    assert all(m["generated_tokens_count"] == TOKENS for _, m in reference)
    assert mesh.wait_idle(30)
    # Traced: each moved request's span records the move as a routing decision.
    span_exporter.clear()
    tracing.enable()
    try:
        results = asyncio.run(_run_all(llm, sampling, kill=_kill_replica(mesh, "w0")))
    finally:
        tracing.disable()
    moved = [m for _, m in results if m["migrations"]]
    requests = [s for s in span_exporter.get_finished_spans() if s.name == "chat chat"]
    assert len(requests) == STREAMS
    reasons = [[e.attributes["llmesh.route.reason"] for e in s.events] for s in requests]
    moves = [r for r in reasons if "migration" in r]
    assert len(moves) == len(moved), reasons
    for r in moves:  # the first pick by the policy, then the move to the live replica
        assert r[0] == "least-loaded" and r[-1] == "migration", r
    # Both replicas had streams (least-loaded spreads them), so the kill moved some.
    assert moved, results
    for (text, meta), (ref_text, ref_meta) in zip(results, reference, strict=True):
        assert meta["finish_reason"] == ref_meta["finish_reason"] == "length"
        assert meta["generated_tokens_count"] == TOKENS
        assert text == ref_text
    assert llm.migration_counts()[("chat", "resumed")] >= len(moved)
    _wait_ready(llm)  # the agent restarts the killed replica; the next case needs both


def _wait_ready(llm: ByzerLLM, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        replicas = llm.get_model("chat").replicas
        if len(replicas) == 2 and all(r.state == common_pb2.REPLICA_STATE_READY for r in replicas):
            return
        time.sleep(0.5)
    raise AssertionError("the killed replica did not come back READY")


@pytest.fixture
def agent_mesh(
    etcd_server: Any, test_model_dir: Path, tmp_path: Path
) -> Iterator[tuple[Mesh, ByzerLLM, Child]]:
    """w0 a node agent in its own process (so it can be SIGKILLed), w1 in-process."""
    namespace = f"/llmesh-chaos-agent-{uuid.uuid4().hex[:6]}"
    mesh = Mesh(etcd_server.endpoint, namespace)
    address = mesh.start_control_plane()
    agent = inference_worker(etcd_server.endpoint, namespace, "w0", tmp_path)
    mesh.start_worker("w1", cpus=2)
    llm = ByzerLLM(control_plane=address)
    llm.setup_num_workers(2).setup_cpus_per_worker(1).setup_infer_backend("transformers")
    llm.deploy(str(test_model_dir), "custom/llama", "chat", {"max_concurrency": STREAMS})
    yield mesh, llm, agent
    llm.close()
    agent.kill()
    mesh.close()


AGENT_KINDS = ("greedy", "seeded", "json")


def _agent_kind(i: int) -> str:
    # By pairs: least-loaded sends the two requests of a pair to different replicas (the
    # second goes to the one the first did not load), so every kind runs on the one that dies.
    return AGENT_KINDS[(i // 2) % len(AGENT_KINDS)]


async def _mixed_all(llm: ByzerLLM, kill: Any = None) -> list[tuple[str, str, dict[str, Any]]]:
    """STREAMS requests at once, greedy, seeded and JSON-schema ones mixed: ``(kind, answer,
    metadata)`` each; ``kill()`` once every streamed one has produced output."""
    streamed = [i for i in range(STREAMS) if _agent_kind(i) != "json"]
    started = {i: asyncio.Event() for i in streamed}

    async def one(i: int) -> tuple[str, str, dict[str, Any]]:
        kind = _agent_kind(i)
        if kind == "json":
            (resp,) = await llm.async_chat_oai(
                _messages(i),
                model="chat",
                response_class=SCHEMA,
                llm_config={"temperature": 0, "max_length": 600, "timeout_s": 120},
            )
            return kind, str(resp.response.output), dict(resp.response.metadata)
        item: tuple[str, Any] = ("", {})
        async for item in llm.async_stream_chat_oai(
            _messages(i), model="chat", llm_config=_config(i, kind)
        ):
            if item[1].get("generated_tokens_count", 0) >= 10:
                started[i].set()
        return kind, item[0], dict(item[1])

    tasks = [asyncio.create_task(one(i)) for i in range(STREAMS)]
    try:
        if kill is not None:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), 60)
            await asyncio.to_thread(kill)
        return list(await asyncio.gather(*tasks))
    finally:
        await llm.aclose_async_channels()


def test_killing_a_node_agent_under_load_fails_nothing_and_changes_no_answer(
    agent_mesh: Any,
) -> None:
    """SIGKILL the agent: its replica processes die with it (PDEATHSIG), and their streams
    move to the other worker's replica. Greedy, seeded and JSON-schema requests run together,
    so one kill (and one mesh) covers the three ways a resumed request must decode."""
    _, llm, agent = agent_mesh
    reference = asyncio.run(_mixed_all(llm))
    results = asyncio.run(_mixed_all(llm, kill=agent.kill))
    assert agent.proc.returncode == -signal.SIGKILL
    for kind in AGENT_KINDS:  # each kind had a request on the killed agent's replica
        assert any(m["migrations"] for k, _, m in results if k == kind), (kind, results)
    assert [t for _, t, _ in results] == [t for _, t, _ in reference]
    schema = json.loads(SCHEMA)
    for kind, text, meta in results:
        if kind == "json":
            jsonschema.validate(json.loads(text), schema)
        else:
            assert meta["generated_tokens_count"] == TOKENS
            assert meta["finish_reason"] == "length"


def test_a_wedged_replicas_requests_move_and_it_is_restarted(
    etcd_server: Any, test_model_dir: Path
) -> None:
    """The engine of w0's replica stops producing (a hung kernel): the agent sees no progress
    for 2 s, kills and restarts it, and its streams continue on w1's replica."""
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-chaos-wedge-{uuid.uuid4().hex[:6]}")
    try:
        address = mesh.start_control_plane()
        mesh.start_worker("w1", cpus=2)
        with ByzerLLM(control_plane=address) as llm:
            llm.setup_num_workers(1).setup_cpus_per_worker(1).setup_infer_backend("transformers")
            llm.deploy(str(test_model_dir), "custom/llama", "ref", {"max_concurrency": STREAMS})
            reference = asyncio.run(_run_all(llm, "greedy", model="ref"))
            llm.undeploy("ref", wait=True)
            # After 40 chunks in its process, w0's engine stops producing output for good.
            mesh.start_worker("w0", cpus=2, wedge_timeout=2, replica_env={STALL_ENV: "40"})
            llm.setup_num_workers(2)
            llm.deploy(str(test_model_dir), "custom/llama", "chat", {"max_concurrency": STREAMS})
            first = {r.worker_id: r.pid for r in llm.get_model("chat").replicas}
            results = asyncio.run(_run_all(llm, "greedy"))
            assert any(m["migrations"] for _, m in results), results
            assert [t for t, _ in results] == [t for t, _ in reference]
            deadline = time.monotonic() + 60
            while True:
                now = {r.worker_id: r for r in llm.get_model("chat").replicas}
                if now["w0"].pid not in (0, first["w0"]):
                    break  # restarted in a new process
                assert time.monotonic() < deadline, now
                time.sleep(0.5)
    finally:
        mesh.close()


async def _structured_all(llm: ByzerLLM, kill: Any = None) -> list[str]:
    """8 JSON-schema answers at once; ``kill()`` once w0's replica is decoding some of them."""

    async def one(i: int) -> str:
        (resp,) = await llm.async_chat_oai(
            _messages(i),
            model="chat",
            response_class=SCHEMA,
            llm_config={"temperature": 0, "max_length": 600, "timeout_s": 120},
        )
        return str(resp.response.output)

    async def killer() -> None:
        await asyncio.to_thread(kill)

    tasks = [asyncio.create_task(one(i)) for i in range(8)]
    try:
        if kill is not None:
            await killer()
        return list(await asyncio.gather(*tasks))
    finally:
        await llm.aclose_async_channels()


def test_a_json_schema_answer_split_by_a_kill_still_matches_the_schema_and_is_unchanged(
    two_replicas: Any,
) -> None:
    mesh, llm = two_replicas
    _wait_ready(llm)
    reference = asyncio.run(_structured_all(llm))
    schema = json.loads(SCHEMA)
    for text in reference:
        jsonschema.validate(json.loads(text), schema)

    def kill_while_decoding() -> None:
        address = mesh.workers["w0"][0].replica_address("chat")
        deadline = time.monotonic() + 30
        while int(replica_stats(address, "chat")["engine_active_requests"]) == 0:
            assert time.monotonic() < deadline, "no request reached w0's replica"
            time.sleep(0.01)
        time.sleep(0.2)  # some tokens out, the JSON not finished
        os.kill(int(replica_stats(address, "chat")["pid"]), signal.SIGKILL)

    before = llm.migration_counts().get(("chat", "resumed"), 0)
    results = asyncio.run(_structured_all(llm, kill=kill_while_decoding))
    assert results == reference  # so each answer validates against the schema too
    assert llm.migration_counts().get(("chat", "resumed"), 0) > before
    _wait_ready(llm)


def test_a_moved_request_still_ends_at_its_one_deadline(
    etcd_server: Any, test_model_dir: Path
) -> None:
    """``timeout_s`` bounds the whole request: a stream that breaks halfway through its
    deadline moves with only what is left of it, so it ends at the one deadline, not a full
    ``timeout_s`` after the move.

    Both replicas' engines stop producing after 20 chunks (the wedge test's stall), so the
    request can finish on neither, however fast the machine: it ends by its deadline, and
    when is what the test measures. The agents' wedge timeout (30 s) is far past it.
    """
    timeout = 10.0
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-chaos-deadline-{uuid.uuid4().hex[:6]}")
    try:
        address = mesh.start_control_plane()
        for wid in ("w0", "w1"):
            mesh.start_worker(wid, cpus=2, replica_env={STALL_ENV: "20"})
        with ByzerLLM(control_plane=address) as llm:
            llm.setup_num_workers(2).setup_cpus_per_worker(1).setup_infer_backend("transformers")
            llm.deploy(str(test_model_dir), "custom/llama", "chat", {})
            addresses = [a for _, model, a in mesh.replica_processes() if model == "chat"]
            assert len(addresses) == 2

            def kill_its_replica(until: float) -> None:
                # On a loaded machine the request may reach its engine only after a while
                # (a fresh replica's first call): wait for it, up to ``until``.
                while time.monotonic() < until:
                    for replica in addresses:
                        stats = replica_stats(replica, "chat")
                        # In flight, not "in the engine": the engine may have finished all
                        # 1000 tokens while the stalled stream holds the request.
                        if int(stats["inflight_requests"]):
                            os.kill(int(stats["pid"]), signal.SIGKILL)
                            return
                    time.sleep(0.05)
                raise AssertionError("the request reached no replica in time")

            async def run() -> tuple[float, float, int]:
                loop = asyncio.get_running_loop()
                begun, tokens = loop.time(), 0
                config = {"max_length": 1000, "ignore_eos": True, "timeout_s": timeout}

                async def kill_halfway() -> float:
                    await asyncio.sleep(timeout / 2)
                    # At least 2 s before the deadline: a clock restarted by the move would
                    # then end the request 2 s or more past it, beyond the bound below.
                    until = time.monotonic() + timeout / 2 - 2.0
                    await asyncio.to_thread(kill_its_replica, until)
                    return loop.time() - begun

                killer = asyncio.create_task(kill_halfway())
                try:
                    with pytest.raises(DeadlineExceeded):
                        async for _, meta in llm.async_stream_chat_oai(
                            _messages(0), model="chat", llm_config=config
                        ):
                            tokens = meta["generated_tokens_count"]
                    return await killer, loop.time() - begun, tokens
                finally:
                    killer.cancel()
                    await llm.aclose_async_channels()

            killed, ended, tokens = asyncio.run(run())
            assert 0 < tokens < 1000
            # It moved once (the kill), then failed where it moved to (by its deadline).
            assert llm.migration_counts() == {("chat", "failed"): 1}, llm.migration_counts()
            # Ends at its deadline (the worker enforces what was left of it), well before
            # killed + timeout (15 s or more), where a clock restarted by the move would end it.
            assert timeout - 0.5 <= ended <= timeout + 1.5, (killed, ended)
    finally:
        mesh.close()
