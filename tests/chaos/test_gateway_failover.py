"""SIGKILL of the replica under a completion streamed through the gateway: it still finishes.

Two workers, the chat model on two replicas. A greedy completion is streamed with the official
``openai`` client; once it has produced output, the replica process serving it is killed. The
SDK underneath the gateway moves the request to the other replica with the tokens it had, so
the client sees one uninterrupted stream, identical to an unfailed run.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from llmesh import ByzerLLM
from tests.integration.conftest import Mesh, replica_stats

TOKENS = 800
MESSAGES = [{"role": "user", "content": "Tell me about the sea and ships."}]


@pytest.fixture(scope="module")
def two_replicas(etcd_server: Any, test_model_dir: Path) -> Iterator[tuple[Mesh, ByzerLLM, str]]:
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-gwchaos-{uuid.uuid4().hex[:6]}")
    llm = None
    try:
        address = mesh.start_control_plane()
        mesh.start_worker("w0", cpus=2)
        mesh.start_worker("w1", cpus=2)
        llm = ByzerLLM(control_plane=address)
        llm.setup_num_workers(2).setup_cpus_per_worker(1).setup_infer_backend("transformers")
        llm.deploy(str(test_model_dir), "custom/llama", "chat", {"max_concurrency": 4})
        yield mesh, llm, mesh.start_gateway().url
    finally:
        if llm is not None:
            llm.close()
        mesh.close()


def _stream(client: openai.OpenAI) -> Any:
    return client.chat.completions.create(
        model="chat",
        messages=MESSAGES,
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )


def test_sigkill_of_the_replica_under_a_streamed_completion(two_replicas: Any) -> None:
    mesh, llm, url = two_replicas
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    reference = "".join(c.choices[0].delta.content or "" for c in _stream(client) if c.choices)
    assert mesh.wait_idle(10)

    chunks = []
    killed = None
    for chunk in _stream(client):
        chunks.append(chunk)
        if killed is None and len(chunks) == 2:
            for replica in llm.get_model("chat").replicas:
                stats = replica_stats(replica.address, "chat")
                if stats["inflight_requests"] != "0":
                    killed = replica.worker_id
                    os.kill(int(stats["pid"]), signal.SIGKILL)
                    break
    assert killed is not None, "no replica was serving the stream"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == TOKENS
    # It really moved: the SDK client of the caller's token ("unused") counts the migration.
    gateway = mesh.gateways["gw0"][0].app.state.gateway
    assert gateway.pool.get("unused").migration_counts() == {("chat", "resumed"): 1}
