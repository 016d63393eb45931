"""Outages of the mesh's own parts under load: the control plane SIGKILLed, etcd SIGSTOPped.

Neither is on the data path (the SDK routes from its watch cache and streams straight to the
replicas), so inference requests keep succeeding; admin calls that need etcd answer
UNAVAILABLE with a sentence meanwhile, and everything reconverges afterwards. This module runs
its own etcd, so freezing it does not touch the rest of the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmesh import ByzerLLM
from llmesh.common.errors import LLMeshError, Unavailable
from llmesh.common.local_etcd import LocalEtcd
from llmesh.v1 import common_pb2
from tests.chaos.procs import Child, control_plane
from tests.integration.conftest import Mesh

STREAMS = 16


@pytest.fixture(scope="module")
def own_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    server = LocalEtcd(tmp_path_factory.mktemp("chaos-etcd") / "data", log_level="error")
    server.start()
    yield server
    with contextlib.suppress(ProcessLookupError, AttributeError):
        os.kill(server.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
    server.stop()


@pytest.fixture(scope="module")
def outage_mesh(
    own_etcd: LocalEtcd, test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    namespace = f"/llmesh-outage-{uuid.uuid4().hex[:6]}"
    log_dir = tmp_path_factory.mktemp("chaos-logs")
    cp = control_plane(own_etcd.endpoint, namespace, log_dir)
    mesh = Mesh(own_etcd.endpoint, namespace)
    mesh.start_worker("w0", cpus=2)
    mesh.start_worker("w1", cpus=2)
    llm = ByzerLLM(control_plane=cp.address)
    llm.setup_num_workers(2).setup_cpus_per_worker(1).setup_infer_backend("transformers")
    llm.deploy(str(test_model_dir), "custom/llama", "chat", {"max_concurrency": STREAMS})
    state = {"mesh": mesh, "llm": llm, "cp": cp, "etcd": own_etcd, "ns": namespace, "logs": log_dir}
    yield state
    llm.close()
    state["cp"].kill()
    mesh.close()


def _ask(llm: ByzerLLM, i: int, tokens: int) -> dict[str, Any]:
    (resp,) = llm.chat_oai(
        [{"role": "user", "content": f"Question {i}: what is the sea?"}],
        model="chat",
        llm_config={"max_length": tokens, "temperature": 0, "ignore_eos": True, "timeout_s": 120},
    )
    return resp.metadata


def test_killing_the_control_plane_under_load_fails_no_request(outage_mesh: Any) -> None:
    llm: ByzerLLM = outage_mesh["llm"]
    cp: Child = outage_mesh["cp"]
    assert _ask(llm, 0, 4)["generated_tokens_count"] == 4  # routes cached

    async def load() -> list[int]:
        async def one(i: int) -> int:
            meta: dict[str, Any] = {}
            async for _, meta in llm.async_stream_chat_oai(
                [{"role": "user", "content": f"Story {i}"}],
                model="chat",
                llm_config={"max_length": 300, "ignore_eos": True, "temperature": 0},
            ):
                if meta["generated_tokens_count"] >= 20 and cp.proc.poll() is None:
                    cp.proc.send_signal(signal.SIGKILL)
            return int(meta["generated_tokens_count"])

        try:
            return list(await asyncio.gather(*(one(i) for i in range(STREAMS))))
        finally:
            await llm.aclose_async_channels()

    assert asyncio.run(load()) == [300] * STREAMS
    assert cp.proc.wait(10) == -signal.SIGKILL
    # New requests keep routing from the cache while no control plane runs.
    assert _ask(llm, 1, 4)["generated_tokens_count"] == 4
    # A new control plane picks up where etcd says.
    new = control_plane(outage_mesh["etcd"].endpoint, outage_mesh["ns"], outage_mesh["logs"])
    outage_mesh["cp"] = new
    with ByzerLLM(control_plane=new.address) as fresh:
        replicas = fresh.get_model("chat").replicas
        assert len(replicas) == 2
        assert all(r.state == common_pb2.REPLICA_STATE_READY for r in replicas)
        assert _ask(fresh, 2, 4)["generated_tokens_count"] == 4


def test_freezing_etcd_under_load_fails_no_inference_request(outage_mesh: Any) -> None:
    etcd: LocalEtcd = outage_mesh["etcd"]
    cp: Child = outage_mesh["cp"]  # the one running now (the previous test replaced it)
    with ByzerLLM(control_plane=cp.address) as llm:
        _freeze_etcd_under_load(llm, etcd, cp)


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait until every thread of ``pid`` is stopped: SIGSTOP takes effect asynchronously, and
    etcd was measured answering a request 0.5 ms after ``kill`` returned (4 times in 40)."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):  # a thread that just exited
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                states.append(stat.rsplit(")", 1)[1].split()[0])
        if all(state in ("T", "t") for state in states):  # t: stopped under a tracer
            return
        assert time.monotonic() < deadline, f"etcd (pid {pid}) did not stop: {states}"
        time.sleep(0.001)


FROZEN_STREAMS = 8
FROZEN_TOKENS = 32


async def _streams_until(llm: ByzerLLM, end: float) -> tuple[list[dict[str, Any]], list[Any]]:
    """FROZEN_STREAMS streams at once, each started again as soon as it ends, until ``end``:
    the metadata of every answer, and every failure."""
    answers: list[dict[str, Any]] = []
    failures: list[Any] = []
    config = {
        "max_length": FROZEN_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "timeout_s": 60,
    }

    async def lane(n: int) -> None:
        i = 0
        while time.monotonic() < end:
            try:
                items = [
                    item
                    async for item in llm.async_stream_chat_oai(
                        [{"role": "user", "content": f"Story {n}-{i}: the sea"}],
                        model="chat",
                        llm_config=config,
                    )
                ]
                answers.append(items[-1][1])
            except Exception as exc:  # noqa: BLE001 - counted, the test asserts none
                failures.append(exc)
            i += 1

    try:
        await asyncio.gather(*(lane(n) for n in range(FROZEN_STREAMS)))
    finally:
        await llm.aclose_async_channels()
    return answers, failures


def _freeze_etcd_under_load(llm: ByzerLLM, etcd: LocalEtcd, cp: Child) -> None:
    pid = etcd.proc.pid  # type: ignore[union-attr]
    freeze = float(os.environ.get("LLMESH_CHAOS_ETCD_FREEZE_S", "30"))
    assert _ask(llm, 0, 4)["generated_tokens_count"] == 4
    admin_error: LLMeshError | None = None
    os.kill(pid, signal.SIGSTOP)
    try:
        _wait_stopped(pid)  # inside: a failed wait still resumes etcd below
        end = time.monotonic() + freeze
        with ByzerLLM(control_plane=cp.address) as admin:
            try:
                # Needs an etcd write: refused with a sentence, not hung.
                admin.undeploy("chat-that-does-not-exist", wait=False)
            except LLMeshError as exc:
                admin_error = exc
        # Streams at once for the whole freeze, not one request after another.
        answers, failures = asyncio.run(_streams_until(llm, end))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert not failures, failures[:3]
    assert len(answers) >= FROZEN_STREAMS, answers  # every lane finished at least one
    for meta in answers:  # each with its full output
        assert meta["generated_tokens_count"] == FROZEN_TOKENS, meta
        assert meta["finish_reason"] == "length", meta
    assert isinstance(admin_error, Unavailable) and "etcd" in str(admin_error), admin_error
    # Reconverged: both replicas READY in etcd's view, a deploy goes through, requests work.
    deadline = time.monotonic() + 60
    while True:
        replicas = llm.get_model("chat").replicas
        if len(replicas) == 2 and all(r.state == common_pb2.REPLICA_STATE_READY for r in replicas):
            break
        assert time.monotonic() < deadline, replicas
        time.sleep(0.5)
    assert _ask(llm, 99, 8)["generated_tokens_count"] == 8
