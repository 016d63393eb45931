"""Training jobs on the control plane: create, place, cancel, reap, watch.

A job is one etcd record (``{ns}/jobs/{id}``, a TrainingJob). The control plane creates it
QUEUED, places it on a trainer worker with free capacity (``worker_id``), asks for a cancel
(``cancel_requested``) and fails it when its worker goes away; the trainer worker moves it to
RUNNING and to its final state. Every write here is the shared compare-and-swap of
:mod:`llmesh.common.job_records` (placement also compares the placement fence), and no write
leaves a final state, so with several control planes and the worker racing, each outcome is
recorded exactly once.

Progress and log lines live on the trainer worker (TrainerService.WatchJob); WatchTrainingJob
relays them and takes state changes from etcd, so a watch survives a worker that dies: the
stream ends with the FAILED record the reaper wrote.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from llmesh.common import job_rules as rules
from llmesh.common.auth import forward_metadata
from llmesh.common.errors import NotFound, Unavailable
from llmesh.common.etcd import Compare, EtcdKV, Op, absent, mod_revision_is, put_op
from llmesh.common.etcd_keys import Keys, decode, encode
from llmesh.common.grpc_server import CHANNEL_OPTIONS
from llmesh.common.job_records import swap_job
from llmesh.common.tls import TlsConfig, aio_channel
from llmesh.common.training_spec import validate_spec
from llmesh.control_plane.registry import Change, Registry
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import trainer_service_pb2 as tr
from llmesh.v1 import trainer_service_pb2_grpc as tr_grpc

log = logging.getLogger(__name__)

State = tr.TrainingJobState
TRAINER_KIND = "trainer"
# How often the scheduler looks again even when nothing changed (a missed notification, or
# etcd back after an outage).
_TICK_S = 2.0
# After a job's record turns final (or moves to another worker), how long the relay of the old
# worker's event stream may still run so its last events (artifact, final state) get through.
_RELAY_DRAIN_S = 5.0
DEFAULT_REAP_GRACE_S = 30.0


def _new_id(spec: tr.TrainingJobSpec) -> str:
    return f"{rules.kind_name(spec.kind).lower().replace('_', '-')}-{uuid.uuid4().hex[:10]}"


class JobScheduler:
    """Creates, places, cancels and reaps training jobs (see the module docstring).

    Args:
        registry: the etcd mirror (jobs and workers).
        kv: the etcd client to write with.
        keys: the namespace's key layout.
        max_attempts: how many times a compare-and-swap is retried after losing a race.
        reap_grace: seconds a trainer worker may be gone (lease lapsed) before its RUNNING jobs
            are recorded FAILED; a worker back within it (a network blip) keeps them. Jobs
            placed there but not started go back to the queue at once.
        tls: TLS for the channels to trainer workers (WatchJob relays); None for plaintext.
    """

    def __init__(
        self,
        registry: Registry,
        kv: EtcdKV,
        keys: Keys,
        *,
        max_attempts: int = 16,
        reap_grace: float = DEFAULT_REAP_GRACE_S,
        tls: TlsConfig | None = None,
    ) -> None:
        self.registry = registry
        self.tls = tls
        self.kv = kv
        self.keys = keys
        self.max_attempts = max_attempts
        self.reap_grace = reap_grace
        self._wake = asyncio.Event()
        self._missing_since: dict[str, float] = {}

    # -- reads -------------------------------------------------------------------------------

    def get(self, job_id: str) -> tr.TrainingJob:
        """The job record; NotFound names the id and how to list jobs."""
        job = self.registry.jobs().get(job_id)
        if job is None:
            if not self.registry.connected:
                raise Unavailable(
                    f"training job {job_id!r} is not in the control plane's last view of etcd, "
                    "and etcd is unreachable; retry once it is back"
                )
            raise NotFound(f"training job {job_id!r} does not exist; `llmesh jobs` lists the jobs")
        out = tr.TrainingJob()
        out.CopyFrom(job)
        return out

    def list(self, states: Sequence[int] = ()) -> list[tr.TrainingJob]:
        """Jobs, newest first, optionally only those in ``states``."""
        wanted = set(states)
        jobs = [j for j in self.registry.jobs().values() if not wanted or j.state in wanted]
        jobs.sort(key=lambda j: (j.create_time.ToNanoseconds(), j.id), reverse=True)
        out = []
        for job in jobs:
            copy = tr.TrainingJob()
            copy.CopyFrom(job)
            out.append(copy)
        return out

    # -- writes ------------------------------------------------------------------------------

    async def _catch_up(self, revision: int) -> None:
        try:
            await self.registry.wait_for_revision(revision)
        except Unavailable:
            log.warning("registry did not reach revision %d in time", revision)

    async def create(self, spec: tr.TrainingJobSpec, request_id: str = "") -> tr.TrainingJob:
        """Store a new QUEUED job, or return the job an earlier call with ``request_id`` made.

        Raises:
            InvalidArgument: the spec can never run (see
                ``llmesh.common.training_spec.validate_spec``).
            Unavailable: etcd is unreachable.
        """
        validate_spec(spec)
        rules.check_job_id_length(request_id, "request_id")
        if spec.deepspeed_config_json:
            # Stored normalized, so a retried create with reformatted JSON is the same spec.
            spec.deepspeed_config_json = json.dumps(
                json.loads(spec.deepspeed_config_json), sort_keys=True
            )
        for _ in range(self.max_attempts):
            if request_id:
                existing = await self._by_request(request_id)
                if existing is not None:
                    return existing
            job = tr.TrainingJob(
                id=_new_id(spec),
                spec=spec,
                state=State.TRAINING_JOB_STATE_QUEUED,
                create_time=rules.now(),
                request_id=request_id,
            )
            compare = [absent(self.keys.job(job.id))]
            ops = [put_op(self.keys.job(job.id), encode(job))]
            if request_id:
                compare.append(absent(self.keys.job_request(request_id)))
                ops.append(put_op(self.keys.job_request(request_id), job.id.encode()))
            response = await self.kv.txn(compare, ops)
            await self._catch_up(response.header.revision)
            if response.succeeded:
                log.info("created training job %s (%s)", job.id, rules.kind_name(spec.kind))
                self._wake.set()
                return self.registry.jobs().get(job.id) or job
        raise Unavailable("could not create the training job (id races); retry")

    async def _by_request(self, request_id: str) -> tr.TrainingJob | None:
        found = await self.kv.get(self.keys.job_request(request_id))
        if not found.kvs:
            return None
        job_id = found.kvs[0].value.decode()
        await self._catch_up(found.header.revision)
        job = self.registry.jobs().get(job_id)
        if job is None:
            raw = await self.kv.get(self.keys.job(job_id))
            if not raw.kvs:
                return None  # the record was deleted by hand; make a new job
            job = decode(raw.kvs[0].value, tr.TrainingJob)
            job.id = job_id
        return job

    async def _update(
        self,
        job_id: str,
        change: Callable[[tr.TrainingJob], tr.TrainingJob | None],
        *,
        fenced: bool = False,
    ) -> tr.TrainingJob:
        """Compare-and-swap the job record (:func:`llmesh.common.job_records.swap_job`).

        Reads come from the mirror, which each transaction's revision is awaited in, so a
        lost race is decided again on what won. With ``fenced`` the write also compares and
        bumps the placement fence (used when placing).
        """

        async def read() -> tuple[tr.TrainingJob, int]:
            return self.get(job_id), self.registry.job_revision(job_id)

        def fence(_: tr.TrainingJob) -> tuple[list[Compare], list[Op]]:
            current = self.registry.fence()
            return (
                [mod_revision_is(self.keys.placement, current.mod_revision)],
                [put_op(self.keys.placement, str(current.counter + 1).encode())],
            )

        swapped = await swap_job(
            self.kv,
            self.keys,
            job_id,
            change,
            read=read,
            extra=fence if fenced else None,
            after_txn=self._catch_up,
            attempts=self.max_attempts,
        )
        assert swapped.record is not None  # read() raises NotFound instead
        return swapped.record

    async def cancel(self, job_id: str) -> tr.TrainingJob:
        """Cancel: a job not running yet ends CANCELLED now, a running one is asked to stop.

        A job already in a final state is returned unchanged (cancel is idempotent).
        """
        workers = self.registry.workers()

        def change(job: tr.TrainingJob) -> tr.TrainingJob | None:
            if rules.is_final(job.state):
                return None
            gone = bool(job.worker_id) and job.worker_id not in workers
            if job.state == State.TRAINING_JOB_STATE_QUEUED and (not job.worker_id or gone):
                return _finish(
                    job, State.TRAINING_JOB_STATE_CANCELLED, "cancelled before it started"
                )
            if gone:
                return _finish(
                    job,
                    State.TRAINING_JOB_STATE_CANCELLED,
                    f"cancelled; its trainer worker {job.worker_id} had already gone away",
                )
            if job.cancel_requested:
                return None
            job.cancel_requested = True
            return job

        job = await self._update(job_id, change)
        log.info("cancel of training job %s: %s", job_id, rules.state_name(job.state))
        return job

    # -- scheduling --------------------------------------------------------------------------

    def _free(self) -> dict[str, tuple[float, float]]:
        """Free (cpus, gpus) of every live trainer worker, after its active jobs."""
        free = {
            w.id: (w.cpus, w.gpus)
            for w in self.registry.workers().values()
            if w.kind == TRAINER_KIND
        }
        for job in self.registry.jobs().values():
            if job.worker_id in free and job.state in rules.ACTIVE_STATES:
                cpus, gpus = free[job.worker_id]
                free[job.worker_id] = (cpus - rules.default_cpus(job.spec), gpus - job.spec.gpus)
        return free

    def _free_devices(self, worker_id: str) -> list[str]:
        """GPU ids of a trainer worker that no active job holds, lowest first."""
        worker = self.registry.workers().get(worker_id)
        if worker is None:
            return []
        ids = [d.id for d in worker.devices] or [str(i) for i in range(int(worker.gpus))]
        held: set[str] = set()
        unnamed = 0  # GPUs of jobs placed before jobs named their devices
        for job in self.registry.jobs().values():
            if job.worker_id == worker_id and job.state in rules.ACTIVE_STATES:
                held.update(job.devices)
                if not job.devices:
                    unnamed += int(job.spec.gpus)
        free = [i for i in ids if i not in held]
        return free[unnamed:]

    async def schedule(self) -> int:
        """Place queued jobs (oldest first) on trainer workers with room; returns how many.

        A job that fits nowhere now waits; smaller jobs behind it may go first.
        """
        placed = 0
        waiting = sorted(
            (
                j
                for j in self.registry.jobs().values()
                if j.state == State.TRAINING_JOB_STATE_QUEUED
                and not j.worker_id
                and not j.cancel_requested
            ),
            key=lambda j: (j.create_time.ToNanoseconds(), j.id),
        )
        for queued in waiting:
            need_cpus, need_gpus = rules.default_cpus(queued.spec), queued.spec.gpus
            fits = [
                (cpus, gpus, wid)
                for wid, (cpus, gpus) in self._free().items()
                if cpus + 1e-9 >= need_cpus and gpus + 1e-9 >= need_gpus
            ]
            if not fits:
                await self._explain_wait(queued.id, need_cpus, need_gpus)
                continue
            # Most free CPUs first: spreads jobs, like replica placement.
            _, _, worker_id = max(fits, key=lambda f: (f[0], f[1], f[2]))

            def change(
                job: tr.TrainingJob,
                worker_id: str = worker_id,
                need: tuple[float, float] = (need_cpus, need_gpus),
            ) -> tr.TrainingJob | None:
                if job.state != State.TRAINING_JOB_STATE_QUEUED or job.worker_id:
                    return None
                # Re-checked on every attempt: after a lost fence race another control plane
                # may have used the room this worker had.
                free = self._free().get(worker_id)
                if free is None or free[0] + 1e-9 < need[0] or free[1] + 1e-9 < need[1]:
                    return None
                # The GPUs themselves, not a count: two jobs never get the same id.
                devices = self._free_devices(worker_id)[: int(need[1])]
                if len(devices) < int(need[1]):
                    return None
                del job.devices[:]
                job.devices.extend(devices)
                job.worker_id = worker_id
                job.reason = ""
                return job

            job = await self._update(queued.id, change, fenced=True)
            if job.worker_id == worker_id:
                placed += 1
                log.info("placed training job %s on trainer worker %s", job.id, worker_id)
        return placed

    async def _explain_wait(self, job_id: str, cpus: float, gpus: float) -> None:
        """Say in the record why a queued job waits (written only when the reason changes)."""
        trainers = [w for w in self.registry.workers().values() if w.kind == TRAINER_KIND]
        if not trainers:
            reason = "waiting for a trainer worker to register (none is live)"
        elif all(w.cpus + 1e-9 < cpus or w.gpus + 1e-9 < gpus for w in trainers):
            most = max(trainers, key=lambda w: (w.gpus, w.cpus))
            reason = (
                f"waiting: the job needs {cpus:g} CPUs and {gpus:g} GPUs but no live trainer "
                f"worker has that many (the largest, {most.id}, has {most.cpus:g} CPUs and "
                f"{most.gpus:g} GPUs); lower num_ranks / cpus / gpus or add a bigger worker"
            )
        else:
            reason = f"waiting for {cpus:g} CPUs and {gpus:g} GPUs to free up on a trainer worker"

        def change(job: tr.TrainingJob) -> tr.TrainingJob | None:
            if job.state != State.TRAINING_JOB_STATE_QUEUED or job.reason == reason:
                return None
            job.reason = reason
            return job

        await self._update(job_id, change)

    async def reap(self) -> int:
        """Handle jobs whose trainer worker went away; returns how many records changed.

        A job placed but not started goes back to the queue; a running one FAILED with the
        reason (its ranks died with the worker: they run with PDEATHSIG).
        """
        changed = 0
        workers = self.registry.workers()
        now = asyncio.get_running_loop().time()
        for worker_id in list(self._missing_since):
            if worker_id in workers:
                del self._missing_since[worker_id]
        for job in list(self.registry.jobs().values()):
            if job.state not in rules.ACTIVE_STATES:
                continue
            if not job.worker_id:
                if job.cancel_requested:
                    # Its worker went away before it started; nobody else will end it.
                    await self._update(job.id, _cancel_unplaced)
                    changed += 1
                continue
            if job.worker_id in workers:
                continue
            lost = job.worker_id
            since = self._missing_since.setdefault(lost, now)
            overdue = now - since >= self.reap_grace

            def change(
                job: tr.TrainingJob, lost: str = lost, overdue: bool = overdue
            ) -> tr.TrainingJob | None:
                if job.worker_id != lost or lost in self.registry.workers():
                    return None
                if job.state == State.TRAINING_JOB_STATE_QUEUED:
                    if job.cancel_requested:
                        return _cancel_unplaced(job)
                    job.worker_id = ""
                    del job.devices[:]
                    return job
                if job.state == State.TRAINING_JOB_STATE_RUNNING and overdue:
                    return _finish(
                        job,
                        State.TRAINING_JOB_STATE_FAILED,
                        f"trainer worker {lost} went away (its etcd lease expired) while the "
                        "job was running; create the job again to resume from its last "
                        "checkpoint",
                    )
                return None

            before = job.state
            after = await self._update(job.id, change)
            if after.state != before or after.worker_id != lost:
                changed += 1
                log.warning(
                    "training job %s lost trainer worker %s: now %s",
                    job.id,
                    lost,
                    rules.state_name(after.state),
                )
        return changed

    async def run(self) -> None:
        """Schedule and reap on every relevant change, and every couple of seconds."""

        def on_change(change: Change) -> None:
            if change.jobs or change.workers or change.everything:
                self._wake.set()

        unsubscribe = self.registry.subscribe(on_change)
        try:
            while True:
                await _wait(self._wake, _TICK_S)
                self._wake.clear()
                if not self.registry.connected:
                    continue
                try:
                    await self.reap()
                    await self.schedule()
                except (Unavailable, NotFound) as exc:
                    log.info("job scheduler pass skipped: %s", exc)
                except Exception:  # one bad pass must not stop scheduling
                    log.exception("job scheduler pass failed; retrying in %gs", _TICK_S)
        finally:
            unsubscribe()

    # -- watching ----------------------------------------------------------------------------

    async def watch(
        self, job_id: str, after_sequence: int = 0
    ) -> AsyncIterator[cp.WatchTrainingJobResponse]:
        """The job now, then its events relayed from the trainer worker, until it is final.

        State changes come from etcd (the worker's stream may die with the worker); progress,
        logs, checkpoints and the artifact from the worker's TrainerService.WatchJob.
        """
        job = self.get(job_id)
        yield cp.WatchTrainingJobResponse(job=job)
        last_state = job.state
        sequence = after_sequence
        changed = asyncio.Event()

        def on_change(change: Change) -> None:
            if job_id in change.jobs or change.everything or change.workers:
                changed.set()

        unsubscribe = self.registry.subscribe(on_change)
        try:
            while True:
                current = self.registry.jobs().get(job_id)
                if current is None:
                    raise NotFound(f"training job {job_id!r} was deleted while being watched")
                worker = self.registry.workers().get(current.worker_id)
                if worker is not None and worker.address:
                    # Relay the worker's events until its stream ends, the record turns final
                    # or the job moves; state changes are re-sent with the record.
                    relay = self._relay(worker.address, job_id, sequence, worker.id)
                    async for response in relay:
                        sequence = max(sequence, response.event.sequence)
                        yield response
                current = self.registry.jobs().get(job_id)
                if current is not None and current.state != last_state:
                    last_state = current.state
                    copy = tr.TrainingJob()
                    copy.CopyFrom(current)
                    yield cp.WatchTrainingJobResponse(job=copy)
                if current is not None and rules.is_final(current.state):
                    return
                changed.clear()
                await _wait(changed, _TICK_S)
        finally:
            unsubscribe()

    async def _relay(
        self, address: str, job_id: str, after_sequence: int, worker_id: str
    ) -> AsyncIterator[cp.WatchTrainingJobResponse]:
        """The worker's WatchJob stream, cut off a few seconds after etcd says it is over.

        The worker may be alive but stuck, or cut off from etcd while the control plane has
        recorded the job FAILED: etcd decides when this watch ends, not the worker's stream.
        """
        changed = asyncio.Event()

        def on_change(change: Change) -> None:
            if job_id in change.jobs or worker_id in change.workers or change.everything:
                changed.set()

        def over() -> bool:
            job = self.registry.jobs().get(job_id)
            return (
                job is None
                or rules.is_final(job.state)
                or job.worker_id != worker_id
                or worker_id not in self.registry.workers()
            )

        loop = asyncio.get_running_loop()
        deadline: float | None = None
        unsubscribe = self.registry.subscribe(on_change)
        async with aio_channel(address, self.tls, CHANNEL_OPTIONS) as channel:
            stub = tr_grpc.TrainerServiceStub(channel)
            # The caller's own token: the worker checks the same rights (none when off).
            call = stub.WatchJob(
                tr.WatchJobRequest(job_id=job_id, after_sequence=after_sequence),
                metadata=forward_metadata(),
            )
            read: asyncio.Future[Any] | None = None
            try:
                while True:
                    if deadline is None and over():
                        deadline = loop.time() + _RELAY_DRAIN_S
                    if deadline is not None and loop.time() >= deadline:
                        return
                    if read is None:
                        read = asyncio.ensure_future(call.read())
                    changed.clear()
                    waiter = asyncio.ensure_future(changed.wait())
                    timeout = _TICK_S if deadline is None else max(0.0, deadline - loop.time())
                    await asyncio.wait(
                        {read, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                    waiter.cancel()
                    if not read.done():
                        continue
                    message, read = read.result(), None
                    if message is grpc.aio.EOF:
                        return
                    response = cp.WatchTrainingJobResponse(event=message.event)
                    if message.event.HasField("state_change"):
                        current = self.registry.jobs().get(job_id)
                        if current is not None:
                            response.job.CopyFrom(current)
                    yield response
            except grpc.aio.AioRpcError as err:
                # The worker died or dropped us; etcd's record says what happened next.
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    log.info("watch of job %s on %s ended: %s", job_id, address, err.code().name)
            finally:
                unsubscribe()
                if read is not None:
                    read.cancel()
                call.cancel()


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds.

    Not ``asyncio.wait_for``: on Python 3.10/3.11 it can swallow a cancellation that arrives
    as the event fires, and a loop built on it then never stops (seen as a hung shutdown).
    """
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


def _cancel_unplaced(job: tr.TrainingJob) -> tr.TrainingJob | None:
    if job.state != State.TRAINING_JOB_STATE_QUEUED:
        return None
    return _finish(
        job,
        State.TRAINING_JOB_STATE_CANCELLED,
        "cancelled; its trainer worker went away before the job started",
    )


def _finish(job: tr.TrainingJob, state: int, reason: str) -> tr.TrainingJob:
    # swap_job refuses a move the job rules do not allow (FailedPrecondition).
    job.state = state
    job.reason = reason
    job.end_time.CopyFrom(rules.now())
    return job
