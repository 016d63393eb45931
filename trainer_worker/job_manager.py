"""The jobs of one trainer worker: picked up from etcd, run by the job runner, recorded back.

The control plane creates a job record (``{ns}/jobs/{id}``, QUEUED), places it on a trainer
worker by setting ``worker_id``, and may set ``cancel_requested``. The :class:`JobManager` of
that worker watches the jobs prefix and takes it from there:

- QUEUED → RUNNING (``start_time``), then the runner's ranks run the job; progress goes to the
  record at most every ``progress_interval`` seconds (coalesced, the latest wins);
- the outcome is recorded once: SUCCEEDED with the artifact (record and ``{ns}/artifacts/{id}``
  in one transaction), FAILED with the reason, or CANCELLED.

Every write is the compare-and-swap of :func:`llmesh.common.job_records.swap_job` (the one the
control plane uses too): read, decide, write if nobody wrote in between, else read again and
decide again. A record in a final state is never changed, whoever put it there. etcd being down
delays writes (they are retried here until it is back); it never loses or invents an outcome.

Each job's event log (:mod:`.job_log`) is what :mod:`.servicer` streams; :mod:`.job_run` holds
what this worker knows about one job and how its runner is followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aetcd
from google.protobuf.json_format import ParseError

from llmesh.common import job_rules as rules
from llmesh.common.errors import (
    InvalidArgument,
    LLMeshError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from llmesh.common.etcd import EtcdKV, Op, put_op
from llmesh.common.etcd_keys import Keys, decode, encode
from llmesh.common.job_records import read_job, swap_job
from llmesh.common.training_spec import validate_spec
from llmesh.trainer_worker.convert import output_dir_of, spec_to_runner_dict
from llmesh.trainer_worker.job_log import (
    EventMapper,
    JobLog,
    WatcherDropped,
    rebuild_log,
    seconds,
)
from llmesh.trainer_worker.job_run import (
    CANCELLED,
    CANCELLED_REASON,
    FAILED,
    QUEUED,
    RUNNING,
    JobRun,
    Outcome,
    file_size,
    follow_events,
    moved_error,
    restarted_reason,
    runner_outcome,
    shutdown_reason,
)
from llmesh.trainer_worker.path_policy import PathPolicy
from llmesh.trainer_worker.runner.events import EVENTS_FILE, read_events
from llmesh.trainer_worker.runner.launch import JobProcess
from llmesh.trainer_worker.runner.spec import JobSpec
from llmesh.v1 import trainer_service_pb2 as tr

# JobLog and WatcherDropped live in job_log; tests import them from here too.
__all__ = ["JobLog", "JobManager", "WatcherDropped"]

log = logging.getLogger(__name__)


class JobManager:
    """Runs the jobs the control plane places on this worker and records their outcomes.

    Args:
        client: a connected aetcd client, for the watch of the jobs prefix.
        kv: the etcd client job records are read and written with.
        keys: the namespace's keys.
        worker_id: this worker's id (jobs with this ``worker_id`` are ours).
        jobs_dir: default parent of job output directories.
        progress_interval: progress is written to the record at most this often (seconds).
        cancel_grace: seconds the ranks get to stop after SIGTERM before they are killed.
        watch_queue_size: events a WatchJob caller may lag behind before it is dropped.
        write_timeout: on shutdown, how long the final writes may wait for etcd.
        keep_logs: finished jobs whose event logs stay in memory (the rest are re-read from
            their events.jsonl when watched).
        poll_interval: how often a running job's events.jsonl is read for new events.
    """

    def __init__(
        self,
        client: aetcd.Client,
        kv: EtcdKV,
        keys: Keys,
        worker_id: str,
        jobs_dir: str | Path,
        *,
        progress_interval: float = 1.0,
        cancel_grace: float = 10.0,
        watch_queue_size: int = 1024,
        write_timeout: float = 10.0,
        keep_logs: int = 32,
        poll_interval: float = 0.2,
        path_policy: PathPolicy | None = None,
    ) -> None:
        self.client = client
        #: Where jobs' paths must lie (None: anywhere).
        self.path_policy = path_policy
        self.kv = kv
        self.keys = keys
        self.worker_id = worker_id
        self.jobs_dir = Path(jobs_dir)
        self.progress_interval = progress_interval
        self.cancel_grace = cancel_grace
        self.watch_queue_size = watch_queue_size
        self.write_timeout = write_timeout
        self.keep_logs = keep_logs
        self.poll_interval = poll_interval
        self.runs: dict[str, JobRun] = {}
        self.synced = asyncio.Event()
        self.closing = False
        self._watch_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._finished: deque[str] = deque()  # finished jobs whose logs are in memory, oldest 1st

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """List and watch the jobs prefix in the background."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._watch_task = asyncio.create_task(self._watch_loop(), name="jobs-watch")

    async def close(self) -> None:
        """Stop taking jobs, stop the running ones and record them FAILED ("shut down").

        Bounded: the ranks get ``cancel_grace`` seconds before they are killed, the final
        writes ``write_timeout`` seconds of etcd; no rank process outlives this call.
        """
        self.closing = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
        active = [run for run in self.runs.values() if run.active]
        for run in active:
            run.shutdown = True
            self._stop(run)
        tasks = [run.task for run in active if run.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.cancel_grace + self.write_timeout + 5)
        for run in active:
            if run.task is not None and not run.task.done():
                log.warning("job %s did not wind down in time; killing its ranks", run.job_id)
                run.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await run.task
            if run.proc is not None:
                # Whatever happened above, the ranks must not outlive the worker.
                with contextlib.suppress(Exception):
                    await run.proc.cancel(grace_s=0)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.write_timeout)
        for run in self.runs.values():
            if run.writer is not None:
                run.writer.cancel()
            if run.log is not None and not run.log.complete:
                run.log.end(
                    Unavailable(
                        f"trainer worker {self.worker_id} shut down before job {run.job_id} "
                        "reached a final state here; follow it through the control plane "
                        "(WatchTrainingJob)"
                    )
                )

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- reading etcd ------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        prefix = self.keys.jobs
        backoff = 0.2
        while True:
            try:
                listing = await self.client.get_prefix(prefix)
                revision = listing.header.revision
                seen: set[str] = set()
                for kv in listing:
                    job_id = self._on_kv(kv.key, kv.value, kv.mod_revision)
                    if job_id:
                        seen.add(job_id)
                for job_id in [j for j in self.runs if j not in seen]:
                    self._on_deleted(job_id)  # deleted while the watch was down
                self.synced.set()
                watch = await self.client.watch_prefix(prefix, start_revision=revision + 1)
                backoff = 0.2
                try:
                    async for event in watch:
                        if event.kind == aetcd.rtypes.EventKind.PUT:
                            self._on_kv(event.kv.key, event.kv.value, event.kv.mod_revision)
                        else:
                            self._on_deleted(event.kv.key[len(prefix) :].decode())
                finally:
                    # Unregister from etcd and aetcd, or the dead watch keeps queueing events.
                    with contextlib.suppress(Exception):
                        await watch.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd outage: keep running jobs, retry
                log.warning("jobs watch failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _on_kv(self, key: bytes, value: bytes, revision: int) -> str | None:
        job_id = key[len(self.keys.jobs) :].decode()
        try:
            job = decode(value, tr.TrainingJob)
        except (ParseError, ValueError) as exc:
            log.warning("ignoring unreadable job record %s: %s", key.decode(), exc)
            return None
        job.id = job_id
        self._on_record(job, revision)
        return job_id

    def _on_deleted(self, job_id: str) -> None:
        run = self.runs.get(job_id)
        if run is None:
            return
        if run.active:
            # Nobody can read its outcome any more: stop the ranks, record nothing.
            log.warning("job %s was deleted from etcd while running here; stopping it", job_id)
            run.cancel_requested = True
            self._stop(run)
        else:
            self._drop(run, NotFound(f"training job {job_id!r} was deleted"))

    def _drop(self, run: JobRun, error: Exception) -> None:
        """Forget a job; its watchers end with ``error`` unless its log is complete.

        Every path that removes a run goes through here: a WatchJob stream must always end.
        """
        self.runs.pop(run.job_id, None)
        if run.log is not None and not run.log.complete:
            run.log.end(error)

    def _on_record(self, job: tr.TrainingJob, revision: int) -> None:
        """React to a record as etcd holds it at ``revision``; idempotent, never blocks."""
        run = self.runs.get(job.id)
        if run is not None:
            run.take(job, revision)
            # React even to a revision we hold already: any read of the record (the progress
            # writer's, every second) may have taken it in before this watch event came.
            self._react(run)
            return
        if job.worker_id != self.worker_id or self.closing:
            return
        run = JobRun(job.id, job, revision, output_dir_of(job, self.jobs_dir))
        self.runs[job.id] = run
        if rules.is_final(job.state):
            run.final = True  # ran here before; its log is rebuilt when someone asks
            return
        if job.state == RUNNING:
            # Nobody in this process runs it: the worker restarted under the job.
            if job.cancel_requested:
                outcome: Outcome = (CANCELLED, CANCELLED_REASON, None)
            else:
                outcome = (FAILED, restarted_reason(self.worker_id, run.output_dir), None)
            log.warning("job %s was RUNNING here before a restart; recording it", job.id)
            run.task = self._spawn(self._record_final(run, outcome), f"orphan-{job.id}")
            return
        if job.state == QUEUED:
            run.log = JobLog(self.watch_queue_size)
            run.mapper = EventMapper(self.worker_id, job.spec.base_model_path)
            run.cancel_requested = job.cancel_requested
            run.task = self._spawn(self._drive(run), f"job-{job.id}")

    def _react(self, run: JobRun) -> None:
        """Act on what others wrote into ``run.record``: a cancel, or a final state.

        Called whenever a newer record is taken in, by the watch or by any read of
        :meth:`_update`; idempotent (each reaction happens once), never blocks.
        """
        job = run.record
        if rules.is_final(job.state):
            # (Our own final write can come back before its txn call returns; by then the
            # ranks have ended, so only a job still running was finalized by someone else.)
            if not run.final and run.proc is not None and run.proc.outcome is None:
                # Recorded final by someone else (the control plane, after our lease
                # lapsed): stop the ranks; the driver then adopts the recorded outcome.
                if run.stopping is None:
                    log.warning(
                        "job %s was recorded %s elsewhere; stopping its ranks",
                        job.id,
                        rules.state_name(job.state),
                    )
                self._stop(run)
            return
        if job.cancel_requested and not run.cancel_requested and run.active:
            log.info("job %s: cancel requested", job.id)
            run.cancel_requested = True
            self._stop(run)

    # ---- writing etcd ------------------------------------------------------------------------

    async def _update(
        self,
        run: JobRun,
        mutate: Callable[[tr.TrainingJob], tr.TrainingJob | None],
        extra: Callable[[tr.TrainingJob], Sequence[Op]] | None = None,
    ) -> tuple[tr.TrainingJob | None, bool]:
        """Compare-and-swap the job record (:func:`llmesh.common.job_records.swap_job`).

        ``mutate`` returns the new record, or None to leave it as it is. ``extra`` gives more
        operations for the same transaction. Returns the record as it now is (None when it does
        not exist) and whether this call wrote it.

        Raises:
            Unavailable: etcd is unreachable, or others won every race (callers retry).
        """

        async def read() -> tuple[tr.TrainingJob | None, int]:
            current, revision = await read_job(self.kv, self.keys, run.job_id)
            if current is not None and run.take(current, revision):
                # Someone else's write (a cancel, a final state): the same reaction as to the
                # watch event, which may come later and then finds this revision taken in.
                self._react(run)
            return current, revision

        swapped = await swap_job(
            self.kv,
            self.keys,
            run.job_id,
            mutate,
            read=read,
            extra=None if extra is None else (lambda job: ((), extra(job))),
        )
        if swapped.written and swapped.record is not None:
            run.take(swapped.record, swapped.revision)
        return swapped.record, swapped.written

    async def _mark_running(self, run: JobRun) -> tr.TrainingJob | None:
        """QUEUED → RUNNING with start_time, retried through etcd outages.

        Returns the record after the attempt (RUNNING if this call moved it), or None when the
        worker closes first (the job stays QUEUED and is picked up after a restart).
        """

        def mutate(job: tr.TrainingJob) -> tr.TrainingJob | None:
            if job.worker_id != self.worker_id or job.state != QUEUED or job.cancel_requested:
                return None
            job.state = RUNNING
            job.start_time.CopyFrom(rules.now())
            return job

        backoff = 0.2
        while not self.closing:
            try:
                record, _ = await self._update(run, mutate)
                return record
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd outage: the job waits, retried
                log.warning("job %s: cannot mark it RUNNING (%s); retrying", run.job_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        return None

    async def _record_final(self, run: JobRun, outcome: Outcome) -> None:
        """Record the outcome once (unless the record is final already), then end the log."""
        state, reason, artifact = outcome

        def mutate(job: tr.TrainingJob) -> tr.TrainingJob | None:
            if not rules.can_move(job.state, state):
                return None  # (swap_job never hands over a final record)
            if job.worker_id != self.worker_id:
                return None  # placed elsewhere meanwhile: not ours to record
            job.state = state  # type: ignore[assignment]
            job.reason = reason
            job.end_time.CopyFrom(rules.now())
            if run.progress is not None:
                job.progress.CopyFrom(run.progress)
            if artifact is not None:
                job.artifact.CopyFrom(artifact)
            return job

        def extra(job: tr.TrainingJob) -> list[Op]:
            if artifact is None:
                return []
            return [put_op(self.keys.artifact(run.job_id), encode(artifact))]

        deadline: float | None = None
        backoff = 0.2
        while True:
            if self.closing and deadline is None:
                deadline = time.monotonic() + self.write_timeout
            try:
                async with run.lock:
                    # The lock orders this after any progress write in flight; none follows.
                    record, _ = await self._update(run, mutate, extra)
                    run.final = record is None or rules.is_final(record.state)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd outage: retry, bounded on shutdown
                if deadline is not None and time.monotonic() > deadline:
                    log.error(
                        "job %s: could not record %s (%s); the control plane fails jobs of "
                        "workers that are gone",
                        run.job_id,
                        rules.state_name(state),
                        exc,
                    )
                    return
                log.warning(
                    "job %s: cannot record %s (%s); retrying",
                    run.job_id,
                    rules.state_name(state),
                    exc,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        if run.writer is not None:
            run.writer.cancel()
        if record is None:
            log.warning("job %s: its record vanished before the outcome was recorded", run.job_id)
            if run.log is not None:
                run.log.end(NotFound(f"training job {run.job_id!r} was deleted"))
            return
        if not rules.is_final(record.state):
            # Not ours any more (re-placed): nothing to record here.
            if run.log is not None:
                run.log.end(moved_error(run.job_id, record))
            return
        log.info(
            "job %s %s%s",
            run.job_id,
            rules.state_name(record.state),
            f": {record.reason}" if record.reason else "",
        )
        if run.log is not None and not run.log.complete:
            run.log.append(
                seconds(record.end_time) if record.HasField("end_time") else time.time(),
                state_change=tr.TrainingStateChange(state=record.state, reason=record.reason),
            )
            self._finished.append(run.job_id)
            self._trim_logs()

    async def _progress_writer(self, run: JobRun) -> None:
        """Write the latest progress to the record, at most every ``progress_interval`` s."""
        while True:
            await run.progress_dirty.wait()
            async with run.lock:
                if run.final:
                    return
                run.progress_dirty.clear()
                progress = run.progress
                if progress is None:
                    continue

                def mutate(job: tr.TrainingJob, p: tr.TrainingProgress = progress) -> Any:
                    if job.state != RUNNING or job.worker_id != self.worker_id:
                        return None
                    job.progress.CopyFrom(p)
                    return job

                try:
                    await self._update(run, mutate)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - progress is best effort; next tick
                    log.warning("job %s: progress write failed (%s)", run.job_id, exc)
                    run.progress_dirty.set()
            await asyncio.sleep(self.progress_interval)

    # ---- running a job -----------------------------------------------------------------------

    async def _drive(self, run: JobRun) -> None:
        """Start the job, follow it, record its outcome."""
        try:
            outcome = await self._execute(run)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("job %s: the trainer worker failed running it", run.job_id)
            outcome = (FAILED, f"the trainer worker failed running the job: {exc!r}", None)
            if run.proc is not None:
                # The ranks may still be training: stop them before the outcome is recorded
                # (close() only stops jobs still being driven, and this one no longer is).
                try:
                    await run.proc.cancel(grace_s=self.cancel_grace)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("job %s: cannot stop its processes", run.job_id)
        if outcome is not None:
            await self._record_final(run, outcome)

    async def _execute(self, run: JobRun) -> Outcome | None:
        job = run.record
        if run.cancel_requested:
            return (CANCELLED, CANCELLED_REASON, None)  # QUEUED → CANCELLED: never started
        try:
            # The one check of a spec (canonical names only), then the runner's own typing.
            validate_spec(job.spec)
            spec = JobSpec.from_dict(spec_to_runner_dict(job, jobs_dir=self.jobs_dir))
            if self.path_policy is not None:
                self.path_policy.check(job.spec, run.output_dir)
        except (InvalidArgument, PermissionDenied) as exc:
            return (FAILED, str(exc), None)  # QUEUED → FAILED: nothing was started
        record = await self._mark_running(run)
        if record is None:
            return None  # closing: leave it QUEUED for the next start of this worker
        if record.state != RUNNING or record.worker_id != self.worker_id:
            if record.state == QUEUED and record.cancel_requested:
                return (CANCELLED, CANCELLED_REASON, None)
            if not rules.is_final(record.state):
                # Re-placed (our lease lapsed; the reaper put it back in the queue): not ours.
                self._drop(run, moved_error(run.job_id, record))
                return None
            return (record.state, record.reason, None)  # final already: adopted as recorded
        assert run.log is not None and run.mapper is not None
        start = seconds(record.start_time)
        run.log.append(start, state_change=tr.TrainingStateChange(state=RUNNING))
        if self.closing:
            return (FAILED, shutdown_reason(self.worker_id), None)
        run.writer = asyncio.create_task(self._progress_writer(run), name=f"progress-{job.id}")
        # The log follows events.jsonl (this attempt: from its current end), not
        # proc.events(): that also yields raw process output, which is not in the file, and
        # the log must be rebuildable from the file with the same sequence numbers.
        events_path = Path(spec.output_dir) / EVENTS_FILE
        offset = await asyncio.to_thread(file_size, events_path)
        # Its ranks see only the GPUs placement gave the job (none for a CPU job on a GPU host).
        env = {"CUDA_VISIBLE_DEVICES": ",".join(record.devices)} if record.devices else {}
        proc = JobProcess(spec, env=env)  # raw output goes to {output_dir}/job.log
        try:
            await proc.start()
        except LLMeshError as exc:
            # The runner's error event, and what it logged before it.
            await follow_events(run, events_path, offset, start, None, self.poll_interval)
            # The runner names the file, line and field; that sentence is the reason.
            return (FAILED, str(exc), None)
        run.proc = proc
        if run.cancel_requested or run.shutdown or rules.is_final(run.record.state):
            self._stop(run)
        waiter = asyncio.ensure_future(proc.wait())
        try:
            await follow_events(run, events_path, offset, start, waiter, self.poll_interval)
        finally:
            waiter.cancel()
        return runner_outcome(run, waiter.result(), self.worker_id)

    def _stop(self, run: JobRun) -> None:
        """Stop the job's ranks (SIGTERM, then SIGKILL after ``cancel_grace``), once."""
        if run.proc is None or run.stopping is not None:
            return  # not started yet: the driver checks the flags right after start()
        run.stopping = self._spawn(run.proc.cancel(grace_s=self.cancel_grace), f"stop-{run.job_id}")

    # ---- reading jobs (the servicer) ---------------------------------------------------------

    async def get_job(self, job_id: str) -> tr.TrainingJob:
        """The job as this worker knows it: its record, with the freshest progress.

        Raises:
            NotFound: the job does not exist, or is not placed on this worker.
        """
        run = self.runs.get(job_id) or await self._lookup(job_id)
        job = tr.TrainingJob()
        job.CopyFrom(run.record)
        if run.progress is not None and not rules.is_final(job.state):
            job.progress.CopyFrom(run.progress)
        return job

    async def open_log(self, job_id: str) -> JobLog:
        """The job's event log, rebuilt from its output directory if it is not in memory.

        Raises:
            NotFound: the job does not exist, or is not placed on this worker.
        """
        run = self.runs.get(job_id) or await self._lookup(job_id)
        if run.log is not None:
            return run.log
        async with run.load_lock:
            if run.log is None:
                events = await asyncio.to_thread(read_events, run.output_dir)
                run.log = rebuild_log(run.record, events, self.worker_id, self.watch_queue_size)
                if run.log.complete:
                    self._finished.append(job_id)
                    self._trim_logs()
        return run.log

    def _trim_logs(self) -> None:
        """Keep the logs of at most ``keep_logs`` finished jobs in memory (others: on disk)."""
        while len(self._finished) > self.keep_logs:
            job_id = self._finished.popleft()
            run = self.runs.get(job_id)
            if run is not None and run.log is not None and run.log.complete:
                if run.log.watchers == 0:
                    run.log = None

    async def _lookup(self, job_id: str) -> JobRun:
        """A job this process has not seen yet: ask etcd (the watch may lag a write)."""
        try:
            job, revision = await read_job(self.kv, self.keys, job_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise Unavailable(
                f"etcd is unreachable, and job {job_id!r} is not in this worker's memory: {exc}"
            ) from exc
        if job is None:
            raise NotFound(
                f"training job {job_id!r} does not exist; check the id "
                "(ControlPlaneService.ListTrainingJobs lists every job)"
            )
        if job.worker_id != self.worker_id:
            where = f"trainer worker {job.worker_id}" if job.worker_id else "no worker yet"
            raise NotFound(
                f"training job {job_id!r} is not on this trainer worker ({self.worker_id}); "
                f"it is placed on {where}: ask the control plane (GetTrainingJob) instead"
            )
        self._on_record(job, revision)
        run = self.runs.get(job_id)
        if run is None:
            raise Unavailable(f"trainer worker {self.worker_id} is shutting down")
        return run
