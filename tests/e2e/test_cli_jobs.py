"""Training jobs end to end: SDK and CLI against a real control plane and trainer worker.

``llmesh control-plane``, ``llmesh trainer-worker`` and ``llmesh inference-worker`` run as
child processes on a real etcd; jobs are real (DeepSpeed launcher on CPU, PEFT): a MERGE_LORA
of a peft adapter made on the test model, and 1-rank LoRA SFT runs of a few steps. The SDK
(``ByzerLLM.sft`` / ``merge_lora`` / job helpers / ``deploy_adapter``) and the CLI (``llmesh
sft``, ``jobs``, ``job get|cancel|watch``, ``merge-lora``) drive them as a user would.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmesh import AsyncByzerLLM, ByzerLLM
from llmesh.common.errors import InvalidArgument, NotFound
from llmesh.common.process import free_port
from llmesh.training import TrainingJobFailed
from llmesh.v1 import trainer_service_pb2 as tr

from .conftest import Proc

S = tr.TrainingJobState
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ROWS = [
    {"instruction": "What color is the sky?", "output": "The sky is blue on a clear day."},
    {"instruction": "What color is grass?", "output": "Grass is green."},
    {"instruction": "What color is snow?", "output": "Snow is white."},
    {"instruction": "What do cats like?", "output": "Cats like to sleep in the sun."},
]
# A few quick steps on the tiny model; Byzer-LLM's typed spelling on purpose.
FEW_STEPS = {
    "sft.int.max_steps": "3",
    "sft.int.per_device_train_batch_size": "2",
    "sft.int.cutoff_len": "128",
    "sft.int.logging_steps": "1",
    "sft.int.lora_rank": "4",
    "sft.list.target_modules": '["q_proj", "v_proj"]',
}
CLI_FEW_STEPS = [
    "max_steps=3",
    "per_device_train_batch_size=2",
    "cutoff_len=128",
    "logging_steps=1",
    "lora_r=4",
    "target_modules=q_proj,v_proj",
]


@dataclass
class JobsMesh:
    address: str
    common: list[str]
    jobs_dir: Path
    log_dir: Path
    procs: list[Proc]

    def start(self, *args: str, name: str) -> Proc:
        proc = Proc(list(args), self.log_dir, name)
        self.procs.append(proc)
        return proc


@pytest.fixture(scope="module")
def jobs_mesh(etcd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobsMesh]:
    """A control plane and one trainer worker (2 CPUs) as child processes, for the module."""
    base = tmp_path_factory.mktemp("jobs-mesh")
    namespace = f"/llmesh-jobs-{uuid.uuid4().hex[:8]}"
    common = ["--etcd", etcd_server.endpoint, "--namespace", namespace]
    address = f"127.0.0.1:{free_port()}"
    mesh = JobsMesh(address, common, base / "jobs", base, [])
    try:
        control = mesh.start("control-plane", "--listen", address, *common, name="cp")
        control.wait_healthy(address)
        trainer = mesh.start(
            "trainer-worker",
            *common,
            "--worker-id",
            "trainer-0",
            "--cpus",
            "2",
            "--gpus",
            "0",
            "--lease-ttl",
            "3",
            "--cancel-grace",
            "3",
            "--jobs-dir",
            str(mesh.jobs_dir),
            name="trainer",
        )
        trainer.wait_output("serving on", timeout=90)
        with ByzerLLM(address) as llm:
            deadline = time.monotonic() + 30
            while not any(w.kind == "trainer" for w in llm.list_workers()):
                assert time.monotonic() < deadline, "the trainer worker never registered"
                time.sleep(0.2)
        yield mesh
    finally:
        for proc in reversed(mesh.procs):
            proc.stop(timeout=30)
            proc.kill_tree()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Byzer-LLM's layout: a directory holding data.jsonl."""
    path = tmp_path_factory.mktemp("sft-data")
    (path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    return path


@pytest.fixture(scope="module")
def adapter_dir(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small PEFT LoRA adapter on the test model (random B, so merging changes weights)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(test_model_dir)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


def llmesh(
    mesh: JobsMesh, *args: str, cwd: Path, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run the ``llmesh`` CLI against the mesh (address from $LLMESH_CONTROL_PLANE)."""
    return subprocess.run(
        [sys.executable, "-m", "llmesh", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "LLMESH_CONTROL_PLANE": mesh.address, "LANG": "en_US.UTF-8"},
    )


def job_id_from(stdout: str) -> str:
    line = next(x for x in stdout.splitlines() if x.startswith("Training job "))
    return line.split()[2]


# -- SDK ----------------------------------------------------------------------------------------


def test_sdk_merge_lora_returns_the_target_and_jobs_are_listed(
    jobs_mesh: JobsMesh, test_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "merged"
    with ByzerLLM(jobs_mesh.address) as llm:
        started = time.time()
        merged = Path(llm.merge_lora("merge", str(test_model_dir), str(adapter_dir), str(target)))
        assert merged.parent == target  # the model inside the target, next to the job's log
        assert (merged / "config.json").is_file()
        assert list(merged.glob("*.safetensors"))
        (job,) = [
            j
            for j in llm.list_training_jobs("succeeded")
            if j.spec.kind == tr.TRAINING_JOB_KIND_MERGE_LORA and j.spec.output_dir == str(target)
        ]
        assert job.create_time.ToNanoseconds() / 1e9 >= started - 5
        assert job.artifact.kind == tr.ARTIFACT_KIND_FULL_MODEL
        assert llm.get_training_job(job.id) == job
        assert job.id not in {j.id for j in llm.list_training_jobs(["running", "queued"])}
        # A finished job cannot be cancelled any more; asking changes nothing.
        assert llm.cancel_training_job(job.id).state == S.TRAINING_JOB_STATE_SUCCEEDED
        # A full model is not an adapter: deploy_adapter says what to do instead.
        with pytest.raises(InvalidArgument, match="full model"):
            llm.deploy_adapter("merged", job.id, "chat")
        with pytest.raises(NotFound, match="no-such-job"):
            llm.get_training_job("no-such-job")


def test_sdk_create_is_idempotent_by_request_id(
    jobs_mesh: JobsMesh, test_model_dir: Path, adapter_dir: Path
) -> None:
    with ByzerLLM(jobs_mesh.address) as llm:
        spec = tr.TrainingJobSpec(
            kind=tr.TRAINING_JOB_KIND_MERGE_LORA,
            base_model_path=str(test_model_dir),
            adapter_path=str(adapter_dir),
        )
        key = f"retry-{uuid.uuid4().hex}"
        first = llm.create_training_job(spec, request_id=key)
        again = llm.create_training_job(spec, request_id=key)
        other = llm.create_training_job(spec)  # a fresh key each call: a second job
        assert again.id == first.id and other.id != first.id
        assert first.request_id == key
        for job_id in (first.id, other.id):
            done = llm.wait_training_job(job_id, timeout=240)
            assert done.artifact.path.startswith(str(jobs_mesh.jobs_dir))


def test_sdk_sft_detached_watch_and_deploy_adapter(
    jobs_mesh: JobsMesh, test_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    with ByzerLLM(jobs_mesh.address) as llm:
        before = time.monotonic()
        job = llm.sft(
            "tiny-sft",
            str(data_dir),
            str(test_model_dir),
            str(tmp_path / "stage"),
            "custom/llama",
            1,
            0,
            detached=True,
            model_params=FEW_STEPS,
        )
        assert time.monotonic() - before < 10  # detached: back at once, not after training
        assert job.state in (S.TRAINING_JOB_STATE_QUEUED, S.TRAINING_JOB_STATE_RUNNING)
        assert job.spec.hyperparameters["max_steps"] == "3"
        assert job.spec.lora.r == 4

        seen = list(llm.watch_training_job(job.id, timeout=240))
        final, _ = seen[-1]
        assert final.state == S.TRAINING_JOB_STATE_SUCCEEDED, final.reason
        events = [e for _, e in seen if e is not None]
        sequences = [e.sequence for e in events]
        assert sequences == sorted(set(sequences))  # in order, none repeated
        steps = [e.progress.step for e in events if e.HasField("progress")]
        assert steps and steps[-1] == 3
        assert final.progress.step == 3 and final.progress.total_steps == 3
        assert final.artifact.kind == tr.ARTIFACT_KIND_LORA_ADAPTER
        assert final.artifact.path.startswith(str(tmp_path / "stage"))
        assert (Path(final.artifact.path) / "adapter_config.json").is_file()
        # Resuming after an event replays only what came later.
        tail = [e for _, e in llm.watch_training_job(job.id, sequences[-2]) if e is not None]
        assert [e.sequence for e in tail] == sequences[-1:]
        assert llm.wait_training_job(job.id).id == job.id

        async def replay() -> tuple[list[Any], tr.TrainingJob]:
            async with AsyncByzerLLM(jobs_mesh.address) as allm:
                items = [item async for item in allm.watch_training_job(job.id)]
                return items, await allm.get_training_job(job.id)

        items, got = asyncio.run(replay())  # the asyncio client, over grpc.aio
        assert [e.sequence for _, e in items if e is not None] == sequences
        assert items[-1][0].state == got.state == S.TRAINING_JOB_STATE_SUCCEEDED

        # Serve the trained adapter on a base model, by job id.
        worker = jobs_mesh.start(
            "inference-worker",
            *jobs_mesh.common,
            "--worker-id",
            "infer-0",
            "--cpus",
            "2",
            name="infer",
        )
        worker.wait_output("serving on", timeout=90)
        llm.setup_num_workers(1).setup_cpus_per_worker(1)
        llm.deploy(str(test_model_dir), "custom/auto", "chat", timeout=120)
        llm.deploy_adapter("chat-tuned", job.id, "chat", timeout=120)
        assert llm.get_model("chat-tuned").base_model == "chat"
        (answer,) = llm.chat_oai(
            [{"role": "user", "content": "What color is grass?"}],
            model="chat-tuned",
            llm_config={"max_length": 8, "temperature": 0},
        )
        assert answer.output
        llm.undeploy("chat-tuned")
        llm.undeploy("chat")


def test_sdk_failed_and_cancelled_jobs_raise_with_the_reason(
    jobs_mesh: JobsMesh, test_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-data-here"
    with ByzerLLM(jobs_mesh.address) as llm:
        with pytest.raises(TrainingJobFailed) as failed:
            llm.sft("bad", str(missing), str(test_model_dir), detached=False, timeout=240)
        assert failed.value.state == "FAILED"
        assert str(missing) in failed.value.job.reason
        assert str(missing) in str(failed.value)

        long_run = {**FEW_STEPS, "sft.int.max_steps": "100000"}
        job = llm.sft("long", str(data_dir), str(test_model_dir), model_params=long_run)
        watch = llm.watch_training_job(job.id, timeout=240)
        # The first progress report: the ranks are training now. Leaving ends the stream.
        current = next(j for j, e in watch if e is not None and e.HasField("progress"))
        watch.close()
        assert current.state == S.TRAINING_JOB_STATE_RUNNING
        assert llm.cancel_training_job(job.id).cancel_requested
        with pytest.raises(TrainingJobFailed) as cancelled:
            llm.wait_training_job(job.id, timeout=120)
        assert cancelled.value.state == "CANCELLED"
        assert llm.get_training_job(job.id).state == S.TRAINING_JOB_STATE_CANCELLED


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_sft_watches_to_the_end_and_writes_the_loss_png(
    jobs_mesh: JobsMesh, test_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    png = tmp_path / "curve.png"
    run = llmesh(
        jobs_mesh,
        "sft",
        "--name",
        "cli-sft",
        "--model_path",
        str(test_model_dir),
        "--data_dir",
        str(data_dir),
        "--num_cpus",
        "1",
        "--model_params",
        *CLI_FEW_STEPS,
        "--loss-png",
        str(png),
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    job_id = job_id_from(run.stdout)
    assert f"Job {job_id} SUCCEEDED; lora adapter: " in run.stdout
    assert f"Loss curve written to {png}" in run.stdout
    assert png.read_bytes()[:8] == PNG_MAGIC
    # stderr is not a terminal here: one progress line per update, the last one complete.
    bars = [line for line in run.stderr.splitlines() if line.startswith("[")]
    assert bars and bars[-1].startswith("[########################]  3/3  100%  loss ")
    assert "\r" not in run.stderr

    table = llmesh(jobs_mesh, "jobs", "--state", "succeeded", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["ID", "KIND", "STATE", "WORKER", "STEP", "LOSS", "AGE"]
    (row,) = [r.split() for r in rows if r.split()[0] == job_id]
    assert row[1:5] == ["SFT", "SUCCEEDED", "trainer-0", "3/3"]
    assert float(row[5]) > 0

    # Watching a finished job replays it: exit 0 and the PNG under its default name.
    watch = llmesh(jobs_mesh, "job", "watch", job_id, cwd=tmp_path)
    assert watch.returncode == 0, watch.stdout + watch.stderr
    default_png = tmp_path / f"{job_id}-loss.png"
    assert f"Loss curve written to {job_id}-loss.png" in watch.stdout
    assert default_png.read_bytes()[:8] == PNG_MAGIC

    got = llmesh(jobs_mesh, "job", "get", job_id, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert "state:" in got.stdout and "SUCCEEDED" in got.stdout
    assert "max_steps=3" in got.stdout
    as_json = json.loads(llmesh(jobs_mesh, "job", "get", job_id, "--json", cwd=tmp_path).stdout)
    assert as_json["id"] == job_id and as_json["state"] == "TRAINING_JOB_STATE_SUCCEEDED"


def test_cli_detach_cancel_and_watch_exit_1(
    jobs_mesh: JobsMesh, test_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    run = llmesh(
        jobs_mesh,
        "sft",
        "--model_path",
        str(test_model_dir),
        "--data_dir",
        str(data_dir),
        "--model_params",
        *CLI_FEW_STEPS,
        "max_steps=100000",
        "--detach",
        cwd=tmp_path,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    job_id = job_id_from(run.stdout)
    assert f"Follow it with: llmesh job watch {job_id}" in run.stdout
    cancel = llmesh(jobs_mesh, "job", "cancel", job_id, cwd=tmp_path)
    assert cancel.returncode == 0, cancel.stderr
    assert f"Cancel of job {job_id} requested" in cancel.stdout
    watch = llmesh(jobs_mesh, "job", "watch", job_id, cwd=tmp_path)
    assert watch.returncode == 1, watch.stdout + watch.stderr
    assert f"Job {job_id} CANCELLED: " in watch.stderr
    again = llmesh(jobs_mesh, "job", "cancel", job_id, cwd=tmp_path)
    assert f"Job {job_id} already ended CANCELLED" in again.stdout
    missing = llmesh(jobs_mesh, "job", "watch", "no-such-job", cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: ") and "no-such-job" in missing.stderr


def test_cli_merge_lora(
    jobs_mesh: JobsMesh, test_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "merged"
    run = llmesh(
        jobs_mesh,
        "merge-lora",
        "--model_path",
        str(test_model_dir),
        "--adapter_path",
        str(adapter_dir),
        "--target_path",
        str(target),
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    job_id = job_id_from(run.stdout)
    assert f"Job {job_id} SUCCEEDED; full model: {target}/" in run.stdout
    assert "Loss curve" not in run.stdout + run.stderr  # a merge has no loss to draw
    assert list(target.glob("*/config.json"))
