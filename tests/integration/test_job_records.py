"""The one compare-and-swap of job records (llmesh.common.job_records) against a real etcd."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from llmesh.common.errors import FailedPrecondition, Unavailable
from llmesh.common.etcd import EtcdKV, put_op
from llmesh.common.etcd_keys import Keys, encode
from llmesh.common.job_records import read_job, swap_job
from llmesh.v1 import trainer_service_pb2 as tr

S = tr.TrainingJobState


@pytest.fixture
async def kv(etcd_server: Any) -> AsyncIterator[EtcdKV]:
    client = EtcdKV(etcd_server.endpoint)
    yield client
    await client.close()


async def put_job(kv: EtcdKV, keys: Keys, job: tr.TrainingJob) -> None:
    await kv.txn([], [put_op(keys.job(job.id), encode(job))])


async def test_swap_writes_and_rereads_after_a_lost_race(kv: EtcdKV, etcd_namespace: str) -> None:
    keys = Keys(etcd_namespace)
    await put_job(kv, keys, tr.TrainingJob(id="j1", state=S.TRAINING_JOB_STATE_QUEUED))
    seen: list[bool] = []

    async def cancel_behind_its_back() -> None:
        job, _ = await read_job(kv, keys, "j1")
        assert job is not None
        job.cancel_requested = True
        await put_job(kv, keys, job)

    pending = [cancel_behind_its_back()]

    def place(job: tr.TrainingJob) -> tr.TrainingJob | None:
        seen.append(job.cancel_requested)
        if job.cancel_requested:
            return None  # decided again on what won: a cancelled job is not placed
        job.worker_id = "w1"
        return job

    async def read() -> tuple[tr.TrainingJob | None, int]:
        current = await read_job(kv, keys, "j1")
        if pending:  # another writer gets in between this read and the write
            await pending.pop()
        return current

    swapped = await swap_job(kv, keys, "j1", place, read=read)
    assert seen == [False, True] and not swapped.written
    assert swapped.record is not None and swapped.record.cancel_requested
    assert not swapped.record.worker_id

    def start(job: tr.TrainingJob) -> tr.TrainingJob:
        job.state = S.TRAINING_JOB_STATE_RUNNING
        return job

    swapped = await swap_job(kv, keys, "j1", start)
    job, revision = await read_job(kv, keys, "j1")
    assert swapped.written and job == swapped.record and revision == swapped.revision
    assert job is not None and job.state == S.TRAINING_JOB_STATE_RUNNING


async def test_final_records_never_change_and_moves_follow_the_rules(
    kv: EtcdKV, etcd_namespace: str
) -> None:
    keys = Keys(etcd_namespace)
    await put_job(kv, keys, tr.TrainingJob(id="done", state=S.TRAINING_JOB_STATE_SUCCEEDED))
    calls: list[str] = []

    def fail(job: tr.TrainingJob) -> tr.TrainingJob:
        calls.append(job.id)
        job.state = S.TRAINING_JOB_STATE_FAILED
        return job

    swapped = await swap_job(kv, keys, "done", fail)
    assert not swapped.written and calls == []
    assert swapped.record is not None and swapped.record.state == S.TRAINING_JOB_STATE_SUCCEEDED

    await put_job(kv, keys, tr.TrainingJob(id="q", state=S.TRAINING_JOB_STATE_QUEUED))

    def succeed(job: tr.TrainingJob) -> tr.TrainingJob:
        job.state = S.TRAINING_JOB_STATE_SUCCEEDED  # QUEUED -> SUCCEEDED skips RUNNING
        return job

    with pytest.raises(FailedPrecondition, match="cannot go from QUEUED to SUCCEEDED"):
        await swap_job(kv, keys, "q", succeed)
    missing = await swap_job(kv, keys, "nope", fail)
    assert missing.record is None and not missing.written


async def test_retries_are_bounded_and_an_outage_is_unavailable(
    kv: EtcdKV, etcd_namespace: str
) -> None:
    keys = Keys(etcd_namespace)
    await put_job(kv, keys, tr.TrainingJob(id="busy", state=S.TRAINING_JOB_STATE_QUEUED))
    attempts = 0

    async def read() -> tuple[tr.TrainingJob | None, int]:
        nonlocal attempts
        attempts += 1
        current = await read_job(kv, keys, "busy")
        job = current[0]
        assert job is not None
        job.reason = f"bumped {attempts}"
        await put_job(kv, keys, job)  # every attempt loses its race
        return current

    def change(job: tr.TrainingJob) -> tr.TrainingJob:
        job.worker_id = "w1"
        return job

    with pytest.raises(Unavailable, match="changed under each of 3 attempts"):
        await swap_job(kv, keys, "busy", change, read=read, attempts=3)
    assert attempts == 3

    dead = EtcdKV("127.0.0.1:1", timeout=1.0)
    try:
        with pytest.raises(Unavailable, match="unreachable"):
            await swap_job(dead, keys, "busy", change)
    finally:
        await dead.close()
