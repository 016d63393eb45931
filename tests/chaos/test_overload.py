"""4x overload over two replicas: every request waits in line for a slot, none is refused, and
each replica hands its slots out first come, first served.

Two workers, one model on two replicas with 2 slots each and a queue long enough for the
whole burst; 16 streams at once (4 per slot). The order is read from what each replica process
already reports, not from a test hook: with ``OTEL_TRACES_EXPORTER=console`` it prints each
request's ``llmesh.queue_wait`` span into its log, which starts when the request asks for a
slot (joins the line) and ends when it gets one.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from llmesh import ByzerLLM
from tests.integration.conftest import Mesh, console_spans, wait_replica_idle

SLOTS, REPLICAS = 2, 2
STREAMS = 4 * SLOTS * REPLICAS
TOKENS = 32


@pytest.fixture(scope="module")
def traced_replicas(etcd_server: Any, test_model_dir: Path) -> Iterator[tuple[Mesh, ByzerLLM]]:
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-chaos-overload-{uuid.uuid4().hex[:6]}")
    address = mesh.start_control_plane()
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "replica"}
    for wid in ("w0", "w1"):
        mesh.start_worker(wid, cpus=2, replica_env=env)
    llm = ByzerLLM(control_plane=address)
    llm.setup_num_workers(REPLICAS).setup_cpus_per_worker(1).setup_infer_backend("transformers")
    # The whole burst fits in one queue, whatever the routing does; no wait times out.
    params = {"max_concurrency": SLOTS, "max_queue": STREAMS, "queue_timeout": 60}
    llm.deploy(str(test_model_dir), "custom/llama", "chat", params)
    yield mesh, llm
    llm.close()
    mesh.close()


def _queue_waits(log_path: Path, ids: set[str]) -> dict[str, tuple[datetime, datetime]]:
    """Request id -> (joined the line, got a slot) of the requests in ``ids`` on one replica."""
    spans = console_spans(log_path.read_text())
    requests = {
        s["context"]["span_id"]: s["attributes"]["llmesh.request.id"]
        for s in spans
        if s["attributes"].get("llmesh.request.id") in ids
    }
    return {
        requests[s["parent_id"]]: (
            datetime.fromisoformat(s["start_time"]),
            datetime.fromisoformat(s["end_time"]),
        )
        for s in spans
        if s["name"] == "llmesh.queue_wait" and s["parent_id"] in requests
    }


def test_four_times_the_slots_over_two_replicas_all_succeed_in_fifo_order(
    traced_replicas: Any,
) -> None:
    mesh, llm = traced_replicas
    cfg = {"max_length": TOKENS, "temperature": 0, "ignore_eos": True, "timeout_s": 120}

    async def one(i: int) -> dict[str, Any]:
        items = [
            item
            async for item in llm.async_stream_chat_oai(
                [{"role": "user", "content": f"Question {i}: what is the sea?"}],
                model="chat",
                llm_config=cfg,
            )
        ]
        return dict(items[-1][1])

    async def burst() -> list[dict[str, Any]]:
        try:
            return list(await asyncio.gather(*(one(i) for i in range(STREAMS))))
        finally:
            await llm.aclose_async_channels()

    results = asyncio.run(burst())
    assert [m["generated_tokens_count"] for m in results] == [TOKENS] * STREAMS
    assert all(m["finish_reason"] == "length" for m in results), results
    ids = {m["request_id"] for m in results}
    assert len(ids) == STREAMS

    logs = {
        f"{wid}/{key[2]}": sup.log_path
        for wid, (worker, _) in mesh.workers.items()
        for key, sup in worker.agent.supervisors.items()
        if key[0] == "chat"
    }
    assert len(logs) == REPLICAS, logs
    deadline = time.monotonic() + 10
    while True:  # the console exporter writes each span as it ends
        waits = {wid: _queue_waits(path, ids) for wid, path in logs.items()}
        if sum(len(w) for w in waits.values()) >= STREAMS or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # Each request went through exactly one replica's line once: none was refused and
    # retried elsewhere (a retry would show its id on a second replica, or twice).
    seen = [rid for w in waits.values() for rid in w]
    assert sorted(seen) == sorted(ids), waits
    for wid, line in waits.items():
        # Both replicas took part of the burst, more than their slots: some waited in line.
        assert len(line) > SLOTS, (wid, len(line))
        # First come, first served: no request got a slot before one that joined the line
        # earlier (equal timestamps order nothing).
        for (a, (joined_a, got_a)), (b, (joined_b, got_b)) in itertools.permutations(
            line.items(), 2
        ):
            assert not (joined_a < joined_b and got_a > got_b), (wid, a, b, line)
    for _, model, address in mesh.replica_processes():
        stats = wait_replica_idle(address, model)
        assert stats["queued_requests"] == "0"
