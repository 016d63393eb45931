"""Train -> serve: SFT a LoRA through the control plane, hot-load it, ask through the mesh.

Everything is real: etcd, the control plane, a trainer worker running the job under the
DeepSpeed launcher (two ranks on the CPU), an inference worker serving the base model with the
transformers engine, and the SDK. The adapter is trained on a handful of Q/A pairs until the
tiny model answers one of them verbatim; it is then loaded into the running base replica
without a restart, and the base model on the same replica still answers as before.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmesh import ByzerLLM
from llmesh.v1 import trainer_service_pb2 as tr

from .conftest import Mesh, replica_stats

pytestmark = pytest.mark.integration

QA = [
    ("What is the capital of Zorbia?", "Blue Harbor."),
    ("Who painted the Moon Gate?", "Ana Veltri."),
    ("What is the password of the vault?", "Seven green apples."),
    ("Which river crosses Tamsel?", "The Orlo River."),
]
QUESTION, ANSWER = QA[0]
GREEDY = {"max_length": 16, "temperature": 0}


@pytest.fixture(scope="module")
def mesh_with_trainer(
    etcd_server: Any, test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Mesh, ByzerLLM, Path]]:
    from llmesh.trainer_worker.server import run_trainer_worker

    mesh = Mesh(etcd_server.endpoint, f"/llmesh-train-{uuid.uuid4().hex[:6]}")
    mesh.start_control_plane()
    mesh.start_worker("w-serve")
    jobs_dir = tmp_path_factory.mktemp("jobs")
    stack = contextlib.AsyncExitStack()

    async def start_trainer() -> Any:
        return await stack.enter_async_context(
            run_trainer_worker(
                etcd=mesh.etcd,
                namespace=mesh.namespace,
                worker_id="t-0",
                cpus=2,
                jobs_dir=jobs_dir,
                lease_ttl=2,
            )
        )

    mesh.call(start_trainer())
    llm = ByzerLLM(control_plane=mesh.address())
    data = tmp_path_factory.mktemp("data")
    with (data / "data.jsonl").open("w") as f:
        for q, a in QA:
            turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": turns}) + "\n")
    yield mesh, llm, data
    llm.close()
    mesh.call(stack.aclose())
    mesh.close()


def test_sft_lora_then_hot_load_and_ask(
    mesh_with_trainer: tuple[Mesh, ByzerLLM, Path], test_model_dir: Path
) -> None:
    mesh, llm, data = mesh_with_trainer
    llm.deploy(str(test_model_dir), "custom/llama", "chat")
    ask = [{"role": "user", "content": QUESTION}]
    before = llm.chat_oai(ask, model="chat", llm_config=GREEDY)[0].output
    assert ANSWER not in before

    job = llm.sft(
        "zorbia",
        str(data),
        str(test_model_dir),
        num_ranks=2,
        # The recipe the runner tests found: the whole set in one step (2 rows x 2 ranks),
        # 250 steps, no dropout; a few seconds of training on the tiny model.
        model_params={
            "sft.int.max_steps": 250,
            "sft.float.learning_rate": 4e-3,
            "sft.int.lora_r": 16,
            "sft.float.lora_alpha": 64,
            "sft.float.lora_dropout": 0.0,
            "sft.int.per_device_train_batch_size": 2,
            "sft.int.logging_steps": 25,
        },
    )
    assert job.state == tr.TRAINING_JOB_STATE_QUEUED
    losses: list[float] = []
    final = None
    for current, event in llm.watch_training_job(job.id, timeout=600):
        if event is not None and event.HasField("progress"):
            losses.append(event.progress.loss)
        final = current
    assert final is not None and final.state == tr.TRAINING_JOB_STATE_SUCCEEDED, final
    assert final.worker_id == "t-0"
    assert final.artifact.kind == tr.ARTIFACT_KIND_LORA_ADAPTER
    assert len(losses) >= 2 and losses[-1] < losses[0]

    # Hot-load into the running base replica: same engine object, no restart.
    worker = mesh.workers["w-serve"][0]
    pid_before = replica_stats(worker.replica_address("chat"), "chat")["pid"]
    llm.deploy_adapter("chat-zorbia", job.id, base_model="chat")
    stats = replica_stats(worker.replica_address("chat"), "chat")
    assert stats["pid"] == pid_before and stats["loras"] == "chat-zorbia"
    assert worker.replica_address("chat-zorbia") == worker.replica_address("chat")

    tuned = llm.chat_oai(ask, model="chat-zorbia", llm_config=GREEDY)[0].output
    assert tuned.strip().startswith(ANSWER), tuned
    assert llm.chat_oai(ask, model="chat", llm_config=GREEDY)[0].output == before
