"""Training jobs on the control plane, against a real etcd and a real gRPC server.

The trainer worker's etcd side is played by SimWorker (kind "trainer"): its registration under a
real lease, and the record writes a trainer worker makes (QUEUED -> RUNNING), done the way the
worker does them. The real trainer worker is tested in test_trainer_worker.py and end to end in
the train -> serve tests.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aetcd
import grpc
import pytest

from llmesh.common import job_rules as rules
from llmesh.common.etcd_keys import Keys, decode, encode
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import trainer_service_pb2 as tr

from .test_control_plane import SimWorker, control_plane, eventually, rpc_error

pytestmark = pytest.mark.integration

S = tr.TrainingJobState
Code = grpc.StatusCode


def sft_spec(**fields: Any) -> tr.TrainingJobSpec:
    fields.setdefault("kind", tr.TRAINING_JOB_KIND_SFT)
    fields.setdefault("base_model_path", "/models/base")
    fields.setdefault("data_path", "/data/qa")
    return tr.TrainingJobSpec(**fields)


async def create(stub: Any, spec: tr.TrainingJobSpec | None = None, **kw: Any) -> tr.TrainingJob:
    request = cp.CreateTrainingJobRequest(spec=spec or sft_spec(), **kw)
    return (await stub.CreateTrainingJob(request)).job


async def get(stub: Any, job_id: str) -> tr.TrainingJob:
    return (await stub.GetTrainingJob(cp.GetTrainingJobRequest(id=job_id))).job


async def trainer(etcd: aetcd.Client, keys: Keys, wid: str, cpus: float = 2) -> SimWorker:
    return await SimWorker(etcd, keys, wid, cpus=cpus, kind="trainer").start(ttl=30)


async def worker_writes(
    etcd: aetcd.Client, keys: Keys, job_id: str, change: Any, *, revision: int | None = None
) -> bool:
    """A compare-and-swap of the job record, as the trainer worker writes it."""
    found = await etcd.get(keys.job(job_id))
    job = decode(found.value, tr.TrainingJob)
    change(job)
    ok, _ = await etcd.transaction(
        compare=[etcd.transactions.mod(keys.job(job_id)) == (revision or found.mod_revision)],
        success=[etcd.transactions.put(keys.job(job_id), encode(job))],
        failure=[],
    )
    return ok


@pytest.fixture
async def etcd(etcd_server: Any) -> Any:
    from llmesh.common.etcd_keys import parse_endpoint

    host, port = parse_endpoint(etcd_server.endpoint)
    async with aetcd.Client(host=host, port=port) as client:
        yield client


@pytest.fixture
def keys(etcd_namespace: str) -> Keys:
    return Keys(etcd_namespace)


@pytest.fixture
async def plane(etcd_server: Any, etcd_namespace: str) -> Any:
    async with control_plane(etcd_server.endpoint, etcd_namespace) as p:
        yield p


async def test_create_is_queued_and_idempotent_by_request_id(plane: Any) -> None:
    first = await create(plane.stub, request_id="req-1")
    assert first.state == S.TRAINING_JOB_STATE_QUEUED and first.id.startswith("sft-")
    assert first.create_time.seconds > 0 and not first.worker_id
    again = await create(plane.stub, request_id="req-1")
    assert again.id == first.id
    other = await create(plane.stub, request_id="req-2")
    assert other.id != first.id
    assert (await get(plane.stub, first.id)).request_id == "req-1"


async def test_concurrent_creates_with_one_request_id_make_one_job(plane: Any) -> None:
    jobs = await asyncio.gather(*(create(plane.stub, request_id="same") for _ in range(8)))
    assert len({j.id for j in jobs}) == 1
    listed = (await plane.stub.ListTrainingJobs(cp.ListTrainingJobsRequest())).jobs
    assert [j.id for j in listed] == [jobs[0].id]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (tr.TrainingJobSpec(), "spec.kind is not set"),
        (tr.TrainingJobSpec(kind=tr.TRAINING_JOB_KIND_SFT, data_path="/d"), "base_model_path"),
        (sft_spec(hyperparameters={"learning_rat": "1e-4"}), "unknown hyperparameter"),
        (sft_spec(hyperparameters={"learning_rate": "fast"}), "is not a number"),
        # Aliases are the SDK's to resolve; past it the canonical name is named.
        (sft_spec(hyperparameters={"epoches": "2"}), "canonical name 'num_train_epochs'"),
        (sft_spec(deepspeed_config_json="{zero"), "not valid JSON"),
        (sft_spec(template="vicuna"), "spec.template 'vicuna' is unknown"),
    ],
)
async def test_bad_spec_is_invalid_argument(
    plane: Any, spec: tr.TrainingJobSpec, match: str
) -> None:
    err = await rpc_error(create(plane.stub, spec))
    assert err.code() == Code.INVALID_ARGUMENT
    assert match in (err.details() or "")


async def test_unknown_job_is_not_found(plane: Any) -> None:
    err = await rpc_error(get(plane.stub, "sft-nope"))
    assert err.code() == Code.NOT_FOUND and "llmesh jobs" in (err.details() or "")
    err = await rpc_error(plane.stub.GetTrainingJob(cp.GetTrainingJobRequest()))
    assert err.code() == Code.INVALID_ARGUMENT


async def test_jobs_wait_for_capacity_then_place_on_trainers_only(
    plane: Any, etcd: aetcd.Client, keys: Keys
) -> None:
    await SimWorker(etcd, keys, "inf", cpus=8).start()  # inference workers never get jobs
    big = await create(plane.stub, sft_spec(num_ranks=2))
    small = await create(plane.stub, sft_spec(num_ranks=1))
    await asyncio.sleep(0.3)
    waiting = await get(plane.stub, big.id)
    assert not waiting.worker_id and "none is live" in waiting.reason
    await trainer(etcd, keys, "t1", cpus=2)

    async def placed() -> bool:
        return bool((await get(plane.stub, big.id)).worker_id)

    await eventually(placed, what="the oldest job placed")
    assert (await get(plane.stub, big.id)).worker_id == "t1"
    await asyncio.sleep(0.3)
    waiting = await get(plane.stub, small.id)
    assert not waiting.worker_id, "t1 is full (2 of 2 CPUs)"
    assert "to free up" in waiting.reason
    assert not (await get(plane.stub, big.id)).reason  # cleared when placed

    # The worker finishes the big job; the small one takes the freed CPUs.
    def succeed(job: tr.TrainingJob) -> None:
        job.state = S.TRAINING_JOB_STATE_SUCCEEDED

    assert await worker_writes(etcd, keys, big.id, succeed)

    async def small_placed() -> bool:
        return (await get(plane.stub, small.id)).worker_id == "t1"

    await eventually(small_placed, what="the queued job placed once CPUs freed")


async def test_cancel_queued_running_and_final(plane: Any, etcd: aetcd.Client, keys: Keys) -> None:
    queued = await create(plane.stub, sft_spec(gpus=1))  # no trainer has a GPU: stays queued
    got = (await plane.stub.CancelTrainingJob(cp.CancelTrainingJobRequest(id=queued.id))).job
    assert got.state == S.TRAINING_JOB_STATE_CANCELLED and got.end_time.seconds > 0
    assert "before it started" in got.reason

    await trainer(etcd, keys, "t1")
    job = await create(plane.stub)

    async def placed() -> tr.TrainingJob | None:
        j = await get(plane.stub, job.id)
        return j if j.worker_id else None

    await eventually(placed)

    def running(j: tr.TrainingJob) -> None:
        j.state = S.TRAINING_JOB_STATE_RUNNING

    assert await worker_writes(etcd, keys, job.id, running)
    await plane.server.registry.sync()
    got = (await plane.stub.CancelTrainingJob(cp.CancelTrainingJobRequest(id=job.id))).job
    assert got.state == S.TRAINING_JOB_STATE_RUNNING and got.cancel_requested

    def cancelled(j: tr.TrainingJob) -> None:
        j.state = S.TRAINING_JOB_STATE_CANCELLED
        j.reason = "cancelled on request"

    assert await worker_writes(etcd, keys, job.id, cancelled)
    await plane.server.registry.sync()
    got = (await plane.stub.CancelTrainingJob(cp.CancelTrainingJobRequest(id=job.id))).job
    assert got.state == S.TRAINING_JOB_STATE_CANCELLED and got.reason == "cancelled on request"


async def test_dead_trainer_fails_its_running_job_exactly_once_with_two_control_planes(
    etcd_server: Any, etcd_namespace: str, etcd: aetcd.Client, keys: Keys
) -> None:
    endpoint = etcd_server.endpoint
    async with (
        control_plane(endpoint, etcd_namespace, job_reap_grace=0.5) as a,
        control_plane(endpoint, etcd_namespace, job_reap_grace=0.5) as b,
    ):
        t1 = await trainer(etcd, keys, "t1")
        running = await create(a.stub)
        placed_only = await create(a.stub)

        async def both_placed() -> bool:
            jobs = [await get(a.stub, running.id), await get(a.stub, placed_only.id)]
            return all(j.worker_id == "t1" for j in jobs)

        await trainer(etcd, keys, "t0", cpus=0)  # a trainer without room changes nothing
        await eventually(both_placed)

        def start(j: tr.TrainingJob) -> None:
            j.state = S.TRAINING_JOB_STATE_RUNNING

        assert await worker_writes(etcd, keys, running.id, start)
        seen_running = (await etcd.get(keys.job(running.id))).mod_revision
        await t1.revoke()

        async def failed() -> tr.TrainingJob | None:
            j = await get(b.stub, running.id)
            return j if j.state == S.TRAINING_JOB_STATE_FAILED else None

        job = await eventually(failed, what="the running job FAILED")
        assert "trainer worker t1 went away" in job.reason and job.end_time.seconds > 0
        # The placed-but-not-started job went back to the queue (no trainer has room now).
        assert not (await get(a.stub, placed_only.id)).worker_id
        assert (await get(a.stub, placed_only.id)).state == S.TRAINING_JOB_STATE_QUEUED

        # Exactly once: both control planes reaped, one write landed; it stays put, and a
        # worker write based on the RUNNING record it last read loses its compare.
        failed_at = (await etcd.get(keys.job(running.id))).mod_revision
        await asyncio.sleep(0.5)
        assert (await etcd.get(keys.job(running.id))).mod_revision == failed_at

        def succeed(j: tr.TrainingJob) -> None:
            j.state = S.TRAINING_JOB_STATE_SUCCEEDED

        assert not await worker_writes(etcd, keys, running.id, succeed, revision=seen_running)
        assert (await get(a.stub, running.id)).state == S.TRAINING_JOB_STATE_FAILED


async def test_jobs_survive_a_control_plane_restart(etcd_server: Any, etcd_namespace: str) -> None:
    async with control_plane(etcd_server.endpoint, etcd_namespace) as a:
        job = await create(a.stub, request_id="keep")
    async with control_plane(etcd_server.endpoint, etcd_namespace) as b:
        assert (await get(b.stub, job.id)).state == S.TRAINING_JOB_STATE_QUEUED
        assert (await create(b.stub, request_id="keep")).id == job.id
        states = [S.TRAINING_JOB_STATE_QUEUED]
        listed = await b.stub.ListTrainingJobs(cp.ListTrainingJobsRequest(states=states))
        assert [j.id for j in listed.jobs] == [job.id]
        none = [S.TRAINING_JOB_STATE_RUNNING]
        listed = await b.stub.ListTrainingJobs(cp.ListTrainingJobsRequest(states=none))
        assert not listed.jobs


async def test_watch_of_a_queued_job_ends_when_it_is_cancelled(plane: Any) -> None:
    job = await create(plane.stub, sft_spec(gpus=4))
    call = plane.stub.WatchTrainingJob(cp.WatchTrainingJobRequest(id=job.id))
    first = await call.read()
    assert first.job.id == job.id and first.job.state == S.TRAINING_JOB_STATE_QUEUED
    await plane.stub.CancelTrainingJob(cp.CancelTrainingJobRequest(id=job.id))
    last = await asyncio.wait_for(call.read(), 10)
    assert last.job.state == S.TRAINING_JOB_STATE_CANCELLED
    assert await asyncio.wait_for(call.read(), 10) == grpc.aio.EOF
    assert rules.is_final(last.job.state)


async def test_too_big_job_says_why_it_waits(plane: Any, etcd: aetcd.Client, keys: Keys) -> None:
    await trainer(etcd, keys, "t1", cpus=2)
    job = await create(plane.stub, sft_spec(num_ranks=4))

    async def explained() -> tr.TrainingJob | None:
        j = await get(plane.stub, job.id)
        return j if "no live trainer worker has that many" in j.reason else None

    j = await eventually(explained)
    assert j.state == S.TRAINING_JOB_STATE_QUEUED and "t1, has 2 CPUs" in j.reason


async def test_trainer_back_within_grace_keeps_its_running_job(
    etcd_server: Any, etcd_namespace: str, etcd: aetcd.Client, keys: Keys
) -> None:
    async with control_plane(etcd_server.endpoint, etcd_namespace, job_reap_grace=3) as p:
        t1 = await trainer(etcd, keys, "t1")
        job = await create(p.stub)

        async def placed() -> bool:
            return (await get(p.stub, job.id)).worker_id == "t1"

        await eventually(placed)

        def start(j: tr.TrainingJob) -> None:
            j.state = S.TRAINING_JOB_STATE_RUNNING

        assert await worker_writes(etcd, keys, job.id, start)
        await t1.revoke()  # a blip: the lease lapses, the worker registers again at once
        await asyncio.sleep(0.5)
        await trainer(etcd, keys, "t1")
        await asyncio.sleep(3.5)
        assert (await get(p.stub, job.id)).state == S.TRAINING_JOB_STATE_RUNNING


async def test_cancel_asked_then_worker_lost_before_start_ends_cancelled(
    plane: Any, etcd: aetcd.Client, keys: Keys
) -> None:
    t1 = await trainer(etcd, keys, "t1")
    job = await create(plane.stub)

    async def placed() -> bool:
        return (await get(plane.stub, job.id)).worker_id == "t1"

    await eventually(placed)
    asked = (await plane.stub.CancelTrainingJob(cp.CancelTrainingJobRequest(id=job.id))).job
    assert asked.cancel_requested and asked.state == S.TRAINING_JOB_STATE_QUEUED
    await t1.revoke()

    async def cancelled() -> tr.TrainingJob | None:
        j = await get(plane.stub, job.id)
        return j if j.state == S.TRAINING_JOB_STATE_CANCELLED else None

    j = await eventually(cancelled)
    assert "went away before the job started" in j.reason


async def test_gpu_jobs_get_distinct_device_ids(plane: Any, etcd: aetcd.Client, keys: Keys) -> None:
    """A trainer worker with 3 GPUs: a 2-GPU job and a 1-GPU job hold different ids, a third
    job waits, and takes the ids a finished job gives back."""
    await SimWorker(etcd, keys, "t-gpu", cpus=8, gpus=3, kind="trainer").start(ttl=30)
    two = await create(plane.stub, sft_spec(gpus=2))
    one = await create(plane.stub, sft_spec(gpus=1))

    async def placed(job_id: str) -> tr.TrainingJob | None:
        j = await get(plane.stub, job_id)
        return j if j.worker_id else None

    two, one = await eventually(lambda: placed(two.id)), await eventually(lambda: placed(one.id))
    assert len(two.devices) == 2 and len(one.devices) == 1
    assert sorted([*two.devices, *one.devices]) == ["0", "1", "2"]
    waiting = await create(plane.stub, sft_spec(gpus=1))
    await plane.server.registry.sync()
    assert not (await get(plane.stub, waiting.id)).worker_id

    def done(j: tr.TrainingJob) -> None:
        j.state = S.TRAINING_JOB_STATE_SUCCEEDED

    assert await worker_writes(etcd, keys, one.id, done)
    later = await eventually(lambda: placed(waiting.id))
    assert list(later.devices) == list(one.devices)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(plane.stub, sft_spec(gpus=1.5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "whole GPUs" in err.value.details()
