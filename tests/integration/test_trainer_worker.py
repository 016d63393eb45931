"""Trainer worker against a real etcd, real gRPC and real training processes.

The test plays the control plane's part: it writes job records into etcd itself (QUEUED, with
``worker_id`` set, as CreateTrainingJob + placement do in production) and sets
``cancel_requested`` the way CancelTrainingJob does. Everything else is the real thing: the
worker registers under a lease, runs MERGE_LORA and SFT jobs through the job runner (DeepSpeed
launcher, CPU), records outcomes with compare-and-swap writes and streams events over gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aetcd
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.common import job_rules as rules
from llmesh.common.errors import FailedPrecondition
from llmesh.common.etcd_keys import Keys, decode, encode, parse_endpoint
from llmesh.trainer_worker.job_manager import JobLog, JobManager, WatcherDropped
from llmesh.trainer_worker.runner.events import EVENTS_FILE
from llmesh.trainer_worker.runner.launch import job_pids
from llmesh.trainer_worker.server import TrainerWorker, run_trainer_worker
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import trainer_service_pb2 as tr
from llmesh.v1 import trainer_service_pb2_grpc

S = tr.TrainingJobState
WORKER_ID = "tw-1"

ROWS = [
    {"instruction": "What color is the sky?", "output": "The sky is blue on a clear day."},
    {"instruction": "What color is grass?", "output": "Grass is green."},
    {"instruction": "What color is snow?", "output": "Snow is white."},
    {"instruction": "What do cats like?", "output": "Cats like to sleep in the sun."},
]


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
async def etcd(etcd_server: Any) -> AsyncIterator[aetcd.Client]:
    host, port = parse_endpoint(etcd_server.endpoint)
    client = aetcd.Client(host=host, port=port, timeout=10)
    yield client
    await client.close()


@pytest.fixture
def keys(etcd_namespace: str) -> Keys:
    return Keys(etcd_namespace)


@pytest.fixture(scope="module")
def adapter_dir(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small PEFT LoRA adapter on the test model, for MERGE_LORA jobs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(test_model_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    return path


@contextlib.asynccontextmanager
async def trainer_worker(
    etcd_server: Any, namespace: str, jobs_dir: Path, **kwargs: Any
) -> AsyncIterator[TrainerWorker]:
    kwargs.setdefault("worker_id", WORKER_ID)
    kwargs.setdefault("cpus", 2)
    kwargs.setdefault("gpus", 0)
    kwargs.setdefault("lease_ttl", 2)
    kwargs.setdefault("cancel_grace", 3)
    async with run_trainer_worker(
        etcd=etcd_server.endpoint, namespace=namespace, jobs_dir=jobs_dir, **kwargs
    ) as worker:
        await asyncio.wait_for(worker.manager.synced.wait(), 10)
        yield worker


@pytest.fixture
async def worker(etcd_server: Any, etcd_namespace: str, tmp_path: Path) -> AsyncIterator[Any]:
    async with trainer_worker(etcd_server, etcd_namespace, tmp_path / "jobs") as w:
        yield w


@pytest.fixture
async def stub(worker: TrainerWorker) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        yield trainer_service_pb2_grpc.TrainerServiceStub(channel)


# ---- the control plane's part, played by the test ---------------------------------------------


async def create_job(
    etcd: aetcd.Client,
    keys: Keys,
    job_id: str,
    spec: tr.TrainingJobSpec,
    *,
    worker_id: str = WORKER_ID,
    state: int = S.TRAINING_JOB_STATE_QUEUED,
    **fields: Any,
) -> tr.TrainingJob:
    """Write a placed job record, as CreateTrainingJob + placement do in production."""
    job = tr.TrainingJob(
        id=job_id, spec=spec, state=state, worker_id=worker_id, create_time=rules.now(), **fields
    )
    await etcd.put(keys.job(job_id), encode(job))
    return job


async def read_job(etcd: aetcd.Client, keys: Keys, job_id: str) -> tuple[tr.TrainingJob, int]:
    got = await etcd.get(keys.job(job_id))
    assert got is not None, f"job {job_id} has no record"
    return decode(got.value, tr.TrainingJob), got.mod_revision


async def change_job(
    etcd: aetcd.Client, keys: Keys, job_id: str, change: Callable[[tr.TrainingJob], None]
) -> int:
    """The control plane's way to write a record: compare-and-swap; returns its revision."""
    while True:
        job, rev = await read_job(etcd, keys, job_id)
        change(job)
        ok, responses = await etcd.transaction(
            compare=[etcd.transactions.mod(keys.job(job_id)) == rev],
            success=[etcd.transactions.put(keys.job(job_id), encode(job))],
            failure=[],
        )
        if ok:
            return int(responses[0].response_put.header.revision)


async def set_cancel_requested(etcd: aetcd.Client, keys: Keys, job_id: str) -> int:
    """CancelTrainingJob's write: a compare-and-swap setting cancel_requested."""

    def cancel(job: tr.TrainingJob) -> None:
        job.cancel_requested = True

    return await change_job(etcd, keys, job_id, cancel)


async def hold_back_watch(manager: JobManager) -> None:
    """Stop the worker's etcd watch, as a broken stream does until it reconnects.

    The worker's own reads and writes of etcd go on; ``manager.start()`` watches again
    (listing first, as after a reconnect).
    """
    task = manager._watch_task
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def wait_job(
    etcd: aetcd.Client,
    keys: Keys,
    job_id: str,
    pred: Callable[[tr.TrainingJob], bool],
    timeout: float = 120,
) -> tr.TrainingJob:
    deadline = time.monotonic() + timeout
    while True:
        job, _ = await read_job(etcd, keys, job_id)
        if pred(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not get there in {timeout}s; it is {job}")
        await asyncio.sleep(0.1)


def final(job: tr.TrainingJob) -> bool:
    return rules.is_final(job.state)


async def watch(stub: Any, job_id: str, after: int = 0) -> list[tr.TrainingJobEvent]:
    call = stub.WatchJob(tr.WatchJobRequest(job_id=job_id, after_sequence=after), timeout=180)
    return [resp.event async for resp in call]


def merge_spec(test_model_dir: Path, adapter_dir: Path) -> tr.TrainingJobSpec:
    return tr.TrainingJobSpec(
        kind=tr.TRAINING_JOB_KIND_MERGE_LORA,
        base_model_path=str(test_model_dir),
        adapter_path=str(adapter_dir),
    )


def sft_spec(model: Path, data: Path, **hyperparameters: str) -> tr.TrainingJobSpec:
    spec = tr.TrainingJobSpec(
        kind=tr.TRAINING_JOB_KIND_SFT,
        base_model_path=str(model),
        data_path=str(data),
        method=tr.TRAINING_METHOD_LORA,
        lora=tr.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        num_ranks=1,
    )
    spec.hyperparameters.update(
        {"per_device_train_batch_size": "2", "cutoff_len": "256", "logging_steps": "1"}
    )
    spec.hyperparameters.update(hyperparameters)
    return spec


def rank_pids(job_id: str, *, ranks_only: bool = False) -> list[int]:
    """Live processes of the job: the runner marks each with LLMESH_JOB_ID in its environment.

    ``ranks_only``: just the training ranks (the DeepSpeed launcher gives them LOCAL_RANK).
    """
    pids = []
    needle = f"LLMESH_JOB_ID={job_id}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if ranks_only and not any(v.startswith(b"LOCAL_RANK=") for v in environ):
            continue
        if needle in environ and state != b"Z":
            pids.append(int(entry))
    return pids


def environ_of(pid: int) -> bytes:
    """The environment ``pid`` started with (empty if it has exited since)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def kinds(events: list[tr.TrainingJobEvent]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


# ---- tests ------------------------------------------------------------------------------------


async def test_registers_as_trainer(
    worker: TrainerWorker, etcd: aetcd.Client, keys: Keys, stub: Any
) -> None:
    got = await etcd.get(keys.worker(WORKER_ID))
    assert got is not None and got.lease != 0, "the worker record must hang off a lease"
    record = decode(got.value, cp.Worker)
    assert (record.kind, record.address, record.cpus, record.gpus) == (
        "trainer",
        worker.address,
        2.0,
        0.0,
    )
    async with grpc.aio.insecure_channel(worker.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="llmesh.v1.TrainerService"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetJob(tr.GetJobRequest(job_id="no-such-job"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-job" in err.value.details() and "does not exist" in err.value.details()


async def test_merge_lora_succeeds_stays_final_and_survives_a_restart(
    etcd_server: Any,
    etcd_namespace: str,
    etcd: aetcd.Client,
    keys: Keys,
    tmp_path: Path,
    test_model_dir: Path,
    adapter_dir: Path,
) -> None:
    jobs_dir = tmp_path / "jobs"
    async with trainer_worker(etcd_server, etcd_namespace, jobs_dir) as worker:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = trainer_service_pb2_grpc.TrainerServiceStub(channel)
            await create_job(etcd, keys, "merge-1", merge_spec(test_model_dir, adapter_dir))
            events = await watch(stub, "merge-1")  # from the start, live: ends by itself
            job = await wait_job(etcd, keys, "merge-1", final)
            got = (await stub.GetJob(tr.GetJobRequest(job_id="merge-1"))).job
            replay = await watch(stub, "merge-1", after=2)

            # A final record is never changed: a late cancel leaves it SUCCEEDED. The worker
            # handles watch events in order, so once it has recorded a job created after the
            # cancel, it has seen the cancel too (and must have left merge-1 alone).
            await set_cancel_requested(etcd, keys, "merge-1")
            spec = merge_spec(test_model_dir, adapter_dir)
            await create_job(etcd, keys, "after-1", spec, cancel_requested=True)
            await wait_job(etcd, keys, "after-1", final, timeout=30)
            await asyncio.sleep(0.5)
            late, _ = await read_job(etcd, keys, "merge-1")
            assert late.cancel_requested
            expected = tr.TrainingJob()
            expected.CopyFrom(job)
            expected.cancel_requested = True
            assert late == expected

    assert job.state == S.TRAINING_JOB_STATE_SUCCEEDED, job.reason
    assert job.HasField("start_time") and job.HasField("end_time")
    assert job.end_time.ToNanoseconds() >= job.start_time.ToNanoseconds()
    art = job.artifact
    assert art.kind == tr.ARTIFACT_KIND_FULL_MODEL and art.worker_id == WORKER_ID
    assert Path(art.path).is_relative_to(jobs_dir / "merge-1")  # default output_dir
    assert (Path(art.path) / "config.json").is_file()
    stored = await etcd.get(keys.artifact("merge-1"))
    assert stored is not None and decode(stored.value, tr.TrainingArtifact) == art
    assert got == job  # GetJob: the record as the worker knows it

    # The log: RUNNING first, the artifact, SUCCEEDED last; numbered from 1 without gaps.
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[0].state_change.state == S.TRAINING_JOB_STATE_RUNNING
    assert events[-1].state_change.state == S.TRAINING_JOB_STATE_SUCCEEDED
    assert [e.artifact for e in events if e.HasField("artifact")] == [art]
    assert kinds(events).count("state_change") == 2
    assert replay == events[2:]

    # A restarted worker (same id, same jobs dir) rebuilds the same log from events.jsonl.
    async with trainer_worker(etcd_server, etcd_namespace, jobs_dir) as worker:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = trainer_service_pb2_grpc.TrainerServiceStub(channel)
            assert await watch(stub, "merge-1") == events
            assert await watch(stub, "merge-1", after=len(events)) == []
            assert (await stub.GetJob(tr.GetJobRequest(job_id="merge-1"))).job == late


async def test_sft_lora_streams_progress_artifact_and_final_state(
    worker: TrainerWorker,
    stub: Any,
    etcd: aetcd.Client,
    keys: Keys,
    test_model_dir: Path,
    sft_data: Path,
) -> None:
    await create_job(etcd, keys, "sft-1", sft_spec(test_model_dir, sft_data, max_steps="3"))
    events = await watch(stub, "sft-1")
    job = await wait_job(etcd, keys, "sft-1", final)
    assert job.state == S.TRAINING_JOB_STATE_SUCCEEDED, job.reason
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.step for p in progress if not p.HasField("eval_loss")][-1] == 3
    assert all(p.total_steps == 3 and p.loss > 0 for p in progress)
    assert job.progress.step == 3  # the last progress lands in the record with the outcome
    (art,) = [e.artifact for e in events if e.HasField("artifact")]
    assert art == job.artifact
    assert art.kind == tr.ARTIFACT_KIND_LORA_ADAPTER
    assert art.base_model_path == str(test_model_dir)
    assert (Path(art.path) / "adapter_config.json").is_file()
    assert kinds(events)[0] == "state_change" and events[-1].state_change.state == job.state


async def test_bad_data_fails_with_line_and_field(
    worker: TrainerWorker,
    stub: Any,
    etcd: aetcd.Client,
    keys: Keys,
    tmp_path: Path,
    test_model_dir: Path,
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"instruction": "no answer"}) + "\n")
    await create_job(etcd, keys, "bad-1", sft_spec(test_model_dir, data, max_steps="1"))
    job = await wait_job(etcd, keys, "bad-1", final, timeout=60)
    assert job.state == S.TRAINING_JOB_STATE_FAILED
    assert "line 2" in job.reason and "'output'" in job.reason, job.reason
    events = await watch(stub, "bad-1")
    assert events[-1].state_change.reason == job.reason


async def test_cancel_while_running_stops_every_rank(
    worker: TrainerWorker,
    stub: Any,
    etcd: aetcd.Client,
    keys: Keys,
    test_model_dir: Path,
    sft_data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = f"cancel-{uuid.uuid4().hex[:8]}"  # unique: /proc is shared with other tests
    spec = sft_spec(test_model_dir, sft_data, max_steps="10000")
    # The worker holds the etcd password (`llmesh up` passes it in the environment) and may
    # hold a token; the ranks run user training code and must inherit neither.
    secret = f"etcd-secret-{uuid.uuid4().hex}"
    token = f"llmesh-token-{uuid.uuid4().hex}"
    monkeypatch.setenv("LLMESH_ETCD_PASSWORD", secret)
    monkeypatch.setenv("LLMESH_TOKEN", token)
    await create_job(etcd, keys, job_id, spec)
    # Training for real: its progress reaches the record (written by the worker while RUNNING).
    running = await wait_job(etcd, keys, job_id, lambda j: j.progress.step >= 1)
    assert running.state == S.TRAINING_JOB_STATE_RUNNING and running.progress.total_steps == 10000
    ranks = rank_pids(job_id, ranks_only=True)
    assert ranks, "no rank process is running"
    assert not any(secret.encode() in environ_of(pid) for pid in ranks)
    assert not any(token.encode() in environ_of(pid) for pid in ranks)
    await set_cancel_requested(etcd, keys, job_id)
    job = await wait_job(etcd, keys, job_id, final, timeout=60)
    assert (job.state, job.reason) == (S.TRAINING_JOB_STATE_CANCELLED, "cancelled on request")
    assert rank_pids(job_id) == []
    events = await watch(stub, job_id)
    assert events[-1].state_change.state == S.TRAINING_JOB_STATE_CANCELLED


async def test_restart_fails_orphans_and_cancels_queued(
    etcd_server: Any,
    etcd_namespace: str,
    etcd: aetcd.Client,
    keys: Keys,
    tmp_path: Path,
    test_model_dir: Path,
    adapter_dir: Path,
) -> None:
    spec = merge_spec(test_model_dir, adapter_dir)
    # Left behind by this worker id's previous life, and a job cancelled before it started.
    await create_job(
        etcd, keys, "orphan-1", spec, state=S.TRAINING_JOB_STATE_RUNNING, start_time=rules.now()
    )
    await create_job(etcd, keys, "queued-cancel", spec, cancel_requested=True)
    # Placed on another worker: not ours to touch.
    await create_job(etcd, keys, "elsewhere", spec, worker_id="tw-other")
    async with trainer_worker(etcd_server, etcd_namespace, tmp_path / "jobs") as worker:
        orphan = await wait_job(etcd, keys, "orphan-1", final, timeout=30)
        cancelled = await wait_job(etcd, keys, "queued-cancel", final, timeout=30)
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = trainer_service_pb2_grpc.TrainerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetJob(tr.GetJobRequest(job_id="elsewhere"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert "tw-other" in err.value.details()
            events = await watch(stub, "orphan-1")
    assert orphan.state == S.TRAINING_JOB_STATE_FAILED
    assert orphan.reason.startswith(
        f"trainer worker {WORKER_ID} restarted while the job was running; create the job "
        "again to resume from its last checkpoint"
    )
    assert (cancelled.state, cancelled.reason) == (
        S.TRAINING_JOB_STATE_CANCELLED,
        "cancelled on request",
    )
    assert not cancelled.HasField("start_time"), "a job cancelled while QUEUED never starts"
    assert not (tmp_path / "jobs" / "queued-cancel").exists()
    assert [e.state_change.state for e in events] == [
        S.TRAINING_JOB_STATE_RUNNING,
        S.TRAINING_JOB_STATE_FAILED,
    ]
    elsewhere, _ = await read_job(etcd, keys, "elsewhere")
    assert elsewhere.state == S.TRAINING_JOB_STATE_QUEUED


async def test_shutdown_stops_ranks_and_records_failed(
    etcd_server: Any,
    etcd_namespace: str,
    etcd: aetcd.Client,
    keys: Keys,
    tmp_path: Path,
    test_model_dir: Path,
    sft_data: Path,
) -> None:
    job_id = f"stop-{uuid.uuid4().hex[:8]}"  # unique: /proc is shared with other tests
    async with trainer_worker(etcd_server, etcd_namespace, tmp_path / "jobs"):
        spec = sft_spec(test_model_dir, sft_data, max_steps="10000")
        await create_job(etcd, keys, job_id, spec)
        deadline = time.monotonic() + 60
        while not rank_pids(job_id, ranks_only=True):
            assert time.monotonic() < deadline, "no rank process of the job appeared"
            await asyncio.sleep(0.1)
    job, _ = await read_job(etcd, keys, job_id)
    assert (job.state, job.reason) == (
        S.TRAINING_JOB_STATE_FAILED,
        f"trainer worker {WORKER_ID} shut down",
    )
    assert rank_pids(job_id) == []
    assert await etcd.get(keys.worker(WORKER_ID)) is None, "the lease is revoked on shutdown"


async def test_slow_watcher_is_dropped_without_blocking_the_job() -> None:
    log = JobLog(queue_size=3)
    log.append(time.time(), state_change=tr.TrainingStateChange(state=S.TRAINING_JOB_STATE_RUNNING))
    backlog, slow = log.subscribe(after=0)
    _, fast = log.subscribe(after=1)
    assert [e.sequence for e in backlog] == [1] and slow is not None and fast is not None
    for step in range(1, 6):  # never waits for the watchers
        log.append(time.time(), progress=tr.TrainingProgress(step=step))
        assert (await fast.next()).progress.step == step
    # The slow one gets what fit in its queue, then is told it was dropped.
    assert [(await slow.next()).sequence for _ in range(3)] == [2, 3, 4]
    with pytest.raises(WatcherDropped):
        await slow.next()


async def test_cancel_or_final_state_first_seen_by_the_progress_writer_stops_the_ranks(
    worker: TrainerWorker,
    stub: Any,
    etcd: aetcd.Client,
    keys: Keys,
    test_model_dir: Path,
    sft_data: Path,
) -> None:
    """Any read of the record may be the first to see a cancel or a final state written by the
    control plane: the progress writer reads it about every second, before the watch event is
    handled (which then brings a revision the worker holds already). Either way the ranks stop.
    """
    tag = uuid.uuid4().hex[:8]  # unique: /proc is shared with other tests
    cancelled, reaped = f"pw-cancel-{tag}", f"pw-reaped-{tag}"
    spec = sft_spec(test_model_dir, sft_data, max_steps="10000")
    for job_id in (cancelled, reaped):
        await create_job(etcd, keys, job_id, spec)
    for job_id in (cancelled, reaped):
        await wait_job(etcd, keys, job_id, lambda j: j.progress.step >= 1)

    await hold_back_watch(worker.manager)  # only the worker's own reads see what follows
    cancel_revision = await set_cancel_requested(etcd, keys, cancelled)
    reason = f"trainer worker {WORKER_ID} went away (its etcd lease expired) while the job ran"

    def reap(job: tr.TrainingJob) -> None:  # the control plane's reaper
        job.state = S.TRAINING_JOB_STATE_FAILED
        job.reason = reason
        job.end_time.CopyFrom(rules.now())

    await change_job(etcd, keys, reaped, reap)
    reaped_record, reaped_revision = await read_job(etcd, keys, reaped)
    deadline = time.monotonic() + 30
    while rank_pids(cancelled) or rank_pids(reaped):
        assert time.monotonic() < deadline, "the ranks train on: the change was never acted on"
        await asyncio.sleep(0.2)
    job = await wait_job(etcd, keys, cancelled, final, timeout=30)
    assert (job.state, job.reason) == (S.TRAINING_JOB_STATE_CANCELLED, "cancelled on request")
    _, revision = await read_job(etcd, keys, cancelled)
    assert revision > cancel_revision

    worker.manager.start()  # the watch is back (listing first): nothing more to do
    cancelled_events = await watch(stub, cancelled)
    reaped_events = await watch(stub, reaped)
    assert cancelled_events[-1].state_change.state == S.TRAINING_JOB_STATE_CANCELLED
    assert (reaped_events[-1].state_change.state, reaped_events[-1].state_change.reason) == (
        S.TRAINING_JOB_STATE_FAILED,
        reason,
    )
    assert await read_job(etcd, keys, reaped) == (reaped_record, reaped_revision)  # adopted


async def test_job_moved_away_while_starting_ends_its_watchers(
    worker: TrainerWorker,
    stub: Any,
    etcd: aetcd.Client,
    keys: Keys,
    test_model_dir: Path,
    adapter_dir: Path,
) -> None:
    """The worker's lease lapsed and the reaper re-placed a QUEUED job before the worker, late,
    saw it placed here: the worker leaves it alone, and whoever watches its log is told."""
    manager = worker.manager
    job_id = f"moved-{uuid.uuid4().hex[:8]}"
    await hold_back_watch(manager)
    await create_job(etcd, keys, job_id, merge_spec(test_model_dir, adapter_dir))
    placed = await etcd.get(keys.job(job_id))
    assert placed is not None

    def replace(job: tr.TrainingJob) -> None:  # reaper: back to the queue; then placement
        job.worker_id = "tw-other"

    await change_job(etcd, keys, job_id, replace)
    # The lagging watch event (placed here) arrives; a watcher subscribes to the new job's log.
    manager._on_kv(keys.job(job_id), placed.value, placed.mod_revision)
    backlog, sub = (await manager.open_log(job_id)).subscribe(after=0)
    assert backlog == [] and sub is not None
    with pytest.raises(FailedPrecondition, match="moved to trainer worker tw-other"):
        await asyncio.wait_for(sub.next(), 10)  # ends (it used to wait forever)
    assert job_id not in manager.runs
    record, _ = await read_job(etcd, keys, job_id)
    assert (record.state, record.worker_id) == (S.TRAINING_JOB_STATE_QUEUED, "tw-other")
    assert not record.HasField("start_time")
    manager.start()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await watch(stub, job_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "tw-other" in err.value.details()


async def test_driver_failure_stops_the_ranks(
    worker: TrainerWorker,
    stub: Any,
    etcd: aetcd.Client,
    keys: Keys,
    test_model_dir: Path,
    sft_data: Path,
) -> None:
    """If following the job fails (here: an event whose time is not a number), the job is
    recorded FAILED and its ranks are stopped first; none trains on unsupervised."""
    job_id = f"odd-{uuid.uuid4().hex[:8]}"  # unique: /proc is shared with other tests
    await create_job(etcd, keys, job_id, sft_spec(test_model_dir, sft_data, max_steps="10000"))
    try:
        deadline = time.monotonic() + 60
        while not rank_pids(job_id, ranks_only=True):
            assert time.monotonic() < deadline, "no rank process of the job appeared"
            await asyncio.sleep(0.1)
        odd = json.dumps({"type": "log", "time": "soon", "line": "odd"}) + "\n"
        fd = os.open(worker.manager.jobs_dir / job_id / EVENTS_FILE, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, odd.encode())
        finally:
            os.close(fd)
        job = await wait_job(etcd, keys, job_id, final, timeout=60)
        assert job.state == S.TRAINING_JOB_STATE_FAILED
        assert job.reason.startswith("the trainer worker failed running the job: ValueError")
        assert job_pids(job_id) == [], "ranks outlived the job's FAILED record"
        events = await watch(stub, job_id)
        assert events[-1].state_change.reason == job.reason
    finally:
        for pid in job_pids(job_id):  # never leave a rank behind, even when this test fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
