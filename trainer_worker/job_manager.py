"""The jobs of one trainer worker: picked up from etcd, run by the job runner, recorded back.

The control plane creates a job record (``{ns}/jobs/{id}``, QUEUED), places it on a trainer
worker by setting ``worker_id``, and may set ``cancel_requested``. The :class:`JobManager` of
that worker watches the jobs prefix and takes it from there:

- QUEUED → RUNNING (``start_time``), then the runner's ranks run the job; progress goes to the
  record at most every ``progress_interval`` seconds (coalesced, the latest wins);
- the outcome is recorded once: SUCCEEDED with the artifact (record and ``{ns}/artifacts/{id}``
  in one transaction), FAILED with the reason, or CANCELLED.

Every write is a compare-and-swap on the record's mod_revision: read, decide, write if nobody
wrote in between, else read again and decide again. A record in a final state is never changed,
whoever put it there. etcd being down delays writes (they are retried); it never loses or
invents an outcome.

Each job has an event log (sequence numbers from 1) that :mod:`.servicer` streams: a
``state_change`` to RUNNING, the runner's events, and a final ``state_change``. The runner's
``events.jsonl`` in the job's output directory is the durable copy, so a restarted worker
rebuilds the same log, with the same numbers, from that file and the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
from google.protobuf.json_format import ParseError
from google.protobuf.timestamp_pb2 import Timestamp

from llmesh.common import job_rules as rules
from llmesh.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    LLMeshError,
    NotFound,
    Unavailable,
)
from llmesh.common.etcd_keys import Keys, decode, encode
from llmesh.trainer_worker.convert import output_dir_of, spec_to_runner_dict
from llmesh.trainer_worker.runner.events import EVENTS_FILE, iter_event_file, read_events
from llmesh.trainer_worker.runner.events import JobState as RunnerState
from llmesh.trainer_worker.runner.launch import JobProcess
from llmesh.trainer_worker.runner.launch import Outcome as RunnerOutcome
from llmesh.trainer_worker.runner.spec import JobSpec
from llmesh.v1 import trainer_service_pb2 as tr

log = logging.getLogger(__name__)

State = tr.TrainingJobState
QUEUED = State.TRAINING_JOB_STATE_QUEUED
RUNNING = State.TRAINING_JOB_STATE_RUNNING
SUCCEEDED = State.TRAINING_JOB_STATE_SUCCEEDED
FAILED = State.TRAINING_JOB_STATE_FAILED
CANCELLED = State.TRAINING_JOB_STATE_CANCELLED

CANCELLED_REASON = "cancelled on request"

_ARTIFACT_KINDS = {
    "lora_adapter": tr.ARTIFACT_KIND_LORA_ADAPTER,
    "full_model": tr.ARTIFACT_KIND_FULL_MODEL,
}


def restarted_reason(worker_id: str, output_dir: str) -> str:
    """Why a job found RUNNING on this worker id at startup is FAILED."""
    return (
        f"trainer worker {worker_id} restarted while the job was running; create the job again "
        f"to resume from its last checkpoint (with output_dir {output_dir})"
    )


def shutdown_reason(worker_id: str) -> str:
    """Why a job still running when its worker stops is FAILED."""
    return f"trainer worker {worker_id} shut down"


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _seconds(ts: Timestamp) -> float:
    return ts.ToNanoseconds() / 1e9


def is_final_event(event: tr.TrainingJobEvent) -> bool:
    """Whether ``event`` is the last of its job's log (the change to a final state)."""
    return event.WhichOneof("event") == "state_change" and rules.is_final(event.state_change.state)


# ---- the event log ---------------------------------------------------------------------------


class WatcherDropped(Exception):
    """A watcher fell more events behind than its queue holds and was cut off."""


class Subscription:
    """One watcher's bounded queue of live events.

    The job appends without ever waiting for a watcher: when the queue is full the watcher is
    dropped (the events it already has queued are still delivered, then it ends).

    Args:
        limit: the most events it may hold.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._events: deque[tr.TrainingJobEvent] = deque()
        self._wake = asyncio.Event()
        self.dropped = False
        self._error: Exception | None = None

    def push(self, event: tr.TrainingJobEvent) -> None:
        if self.dropped or self._error is not None:
            return
        if len(self._events) >= self.limit:
            self.dropped = True
        else:
            self._events.append(event)
        self._wake.set()

    def end(self, error: Exception) -> None:
        """No more events will come: after the queued ones, :meth:`next` raises ``error``."""
        if self._error is None:
            self._error = error
        self._wake.set()

    async def next(self) -> tr.TrainingJobEvent:
        """The next event; raises :class:`WatcherDropped` once dropped and drained."""
        while True:
            if self._events:
                return self._events.popleft()
            if self.dropped:
                raise WatcherDropped
            if self._error is not None:
                raise self._error
            self._wake.clear()
            await self._wake.wait()


class JobLog:
    """A job's events in order, numbered from 1, and the watchers following it.

    Args:
        queue_size: each watcher's queue bound.
    """

    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self.events: list[tr.TrainingJobEvent] = []
        self.complete = False
        self._subs: set[Subscription] = set()

    def append(self, when: float, **payload: Any) -> tr.TrainingJobEvent:
        """Add an event (exactly one payload field) and hand it to every watcher."""
        event = tr.TrainingJobEvent(sequence=len(self.events) + 1, time=_timestamp(when), **payload)
        self.events.append(event)
        if is_final_event(event):
            self.complete = True
        for sub in list(self._subs):
            sub.push(event)
        return event

    def subscribe(self, after: int) -> tuple[list[tr.TrainingJobEvent], Subscription | None]:
        """Events after ``after`` so far, and a subscription for the rest (None if complete)."""
        backlog = self.events[max(0, after) :]
        if self.complete:
            return backlog, None
        sub = Subscription(self.queue_size)
        self._subs.add(sub)
        return backlog, sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    @property
    def watchers(self) -> int:
        return len(self._subs)

    def end(self, error: Exception) -> None:
        """End every watcher with ``error`` (the log will not be completed by this process)."""
        for sub in list(self._subs):
            sub.end(error)
        self._subs.clear()


class EventMapper:
    """Turns the runner's event dicts into log entries, the same way live and on replay.

    Args:
        worker_id: this worker, for artifacts.
        base_model_path: the job's base model, for LoRA adapter artifacts.
    """

    def __init__(self, worker_id: str, base_model_path: str) -> None:
        self.worker_id = worker_id
        self.base_model_path = base_model_path
        self.progress: tr.TrainingProgress | None = None

    def payload(self, ev: dict[str, Any]) -> dict[str, Any] | None:
        """The event's ``TrainingJobEvent`` payload, or None for events the log leaves out.

        State and done events are left out: the log carries the states recorded in etcd.
        """
        kind = ev.get("type")
        try:
            if kind == "progress":
                p = tr.TrainingProgress(
                    step=int(ev.get("step") or 0),
                    total_steps=int(ev.get("total_steps") or 0),
                    epoch=float(ev.get("epoch") or 0.0),
                    loss=float(ev.get("loss") or 0.0),
                    learning_rate=float(ev.get("learning_rate") or 0.0),
                    samples_per_second=float(ev.get("samples_per_second") or 0.0),
                    eta_seconds=float(ev.get("eta_seconds") or 0.0),
                )
                if self.progress is not None and self.progress.HasField("eval_loss"):
                    p.eval_loss = self.progress.eval_loss  # the last evaluation still holds
                self.progress = p
                return {"progress": p}
            if kind == "eval":
                p = tr.TrainingProgress()
                if self.progress is not None:
                    p.CopyFrom(self.progress)
                p.eval_loss = float(ev["eval_loss"])
                self.progress = p
                return {"progress": p}
            if kind == "checkpoint":
                return {
                    "checkpoint": tr.TrainingCheckpoint(
                        step=int(ev.get("step") or 0), path=str(ev.get("path", ""))
                    )
                }
            if kind == "artifact":
                art_kind = _ARTIFACT_KINDS.get(str(ev.get("kind")), tr.ARTIFACT_KIND_UNSPECIFIED)
                return {"artifact": self.artifact(art_kind, str(ev.get("path", "")), ev)}
            if kind == "log":
                rank = ev.get("rank")
                prefix = f"[rank {rank}] " if rank is not None else ""
                return {"log_line": f"{prefix}{ev.get('line', '')}"}
            if kind == "error":
                rank = ev.get("rank")
                where = f" (rank {rank})" if rank is not None else ""
                return {"log_line": f"error{where}: {ev.get('reason', '')}"}
            if kind == "resume":
                return {
                    "log_line": f"resuming from the checkpoint of step {ev.get('step')} "
                    f"({ev.get('path')})"
                }
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("skipping a malformed %s event from the runner: %s", kind, exc)
        return None

    def artifact(
        self, kind: int, path: str, ev: dict[str, Any] | None = None
    ) -> tr.TrainingArtifact:
        art = tr.TrainingArtifact(kind=kind, path=path, worker_id=self.worker_id)  # type: ignore[arg-type]
        if kind == tr.ARTIFACT_KIND_LORA_ADAPTER:
            base = (ev or {}).get("base_model") or self.base_model_path
            art.base_model_path = str(base or "")
        return art


# ---- one job ---------------------------------------------------------------------------------


@dataclass
class JobRun:
    """What this worker knows and does about one job placed on it."""

    job_id: str
    record: tr.TrainingJob
    revision: int
    output_dir: str
    log: JobLog | None = None  # None: not in memory; rebuilt from events.jsonl on demand
    mapper: EventMapper | None = None
    proc: JobProcess | None = None
    task: asyncio.Task[None] | None = None
    writer: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    progress_dirty: asyncio.Event = field(default_factory=asyncio.Event)
    final: bool = False
    cancel_requested: bool = False
    shutdown: bool = False
    stopping: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        """Whether this process is driving the job (starting, running or recording it)."""
        return self.task is not None and not self.task.done()

    @property
    def progress(self) -> tr.TrainingProgress | None:
        return self.mapper.progress if self.mapper is not None else None


Outcome = tuple[int, str, tr.TrainingArtifact | None]


class JobManager:
    """Runs the jobs the control plane places on this worker and records their outcomes.

    Args:
        client: a connected aetcd client.
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
    ) -> None:
        self.client = client
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
            if revision > run.revision:
                run.record, run.revision = job, revision
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
        extra: Callable[[tr.TrainingJob], Sequence[Any]] | None = None,
    ) -> tuple[tr.TrainingJob | None, bool]:
        """Compare-and-swap the job record: read, ``mutate`` a copy, write if unchanged since.

        ``mutate`` returns the new record, or None to leave it as it is. ``extra`` gives more
        operations for the same transaction. Returns the record as it now is (None when it does
        not exist) and whether this call wrote it.
        """
        key = self.keys.job(run.job_id)
        while True:
            got = await self.client.get(key)
            if got is None:
                return None, False
            current = decode(got.value, tr.TrainingJob)
            current.id = run.job_id
            if got.mod_revision > run.revision:
                # Someone else's write (a cancel, a final state): the same reaction as to the
                # watch event, which may come later and then finds this revision taken in.
                run.record, run.revision = current, got.mod_revision
                self._react(run)
            new = tr.TrainingJob()
            new.CopyFrom(current)
            new = mutate(new)
            if new is None:
                return current, False
            ops = [self.client.transactions.put(key, encode(new))]
            if extra is not None:
                ops += list(extra(new))
            ok, responses = await self.client.transaction(
                compare=[self.client.transactions.mod(key) == got.mod_revision],
                success=ops,
                failure=[],
            )
            if ok:
                written = responses[0].response_put.header.revision
                if written > run.revision:
                    run.record, run.revision = new, written
                return new, True
            # Someone wrote in between (a cancel, a re-placement): read again, decide again.

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
            if rules.is_final(job.state) or not rules.can_move(job.state, state):
                return None
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

        def extra(job: tr.TrainingJob) -> list[Any]:
            if artifact is None:
                return []
            return [self.client.transactions.put(self.keys.artifact(run.job_id), encode(artifact))]

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
                run.log.end(_moved(run.job_id, record))
            return
        log.info(
            "job %s %s%s",
            run.job_id,
            rules.state_name(record.state),
            f": {record.reason}" if record.reason else "",
        )
        if run.log is not None and not run.log.complete:
            run.log.append(
                _seconds(record.end_time) if record.HasField("end_time") else time.time(),
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
            spec = JobSpec.from_dict(spec_to_runner_dict(job, jobs_dir=self.jobs_dir))
        except InvalidArgument as exc:
            return (FAILED, str(exc), None)  # QUEUED → FAILED: nothing was started
        record = await self._mark_running(run)
        if record is None:
            return None  # closing: leave it QUEUED for the next start of this worker
        if record.state != RUNNING or record.worker_id != self.worker_id:
            if record.state == QUEUED and record.cancel_requested:
                return (CANCELLED, CANCELLED_REASON, None)
            if not rules.is_final(record.state):
                # Re-placed (our lease lapsed; the reaper put it back in the queue): not ours.
                self._drop(run, _moved(run.job_id, record))
                return None
            return (record.state, record.reason, None)  # final already: adopted as recorded
        assert run.log is not None and run.mapper is not None
        start = _seconds(record.start_time)
        run.log.append(start, state_change=tr.TrainingStateChange(state=RUNNING))
        if self.closing:
            return (FAILED, shutdown_reason(self.worker_id), None)
        run.writer = asyncio.create_task(self._progress_writer(run), name=f"progress-{job.id}")
        # The log follows events.jsonl (this attempt: from its current end), not
        # proc.events(): that also yields raw process output, which is not in the file, and
        # the log must be rebuildable from the file with the same sequence numbers.
        events_path = Path(spec.output_dir) / EVENTS_FILE
        offset = await asyncio.to_thread(_file_size, events_path)
        proc = JobProcess(spec)  # raw output goes to {output_dir}/job.log
        try:
            await proc.start()
        except LLMeshError as exc:
            await self._follow(run, events_path, offset, start, None)  # the runner's error
            # The runner names the file, line and field; that sentence is the reason.
            return (FAILED, str(exc), None)
        run.proc = proc
        if run.cancel_requested or run.shutdown or rules.is_final(run.record.state):
            self._stop(run)
        waiter = asyncio.ensure_future(proc.wait())
        try:
            await self._follow(run, events_path, offset, start, waiter)
        finally:
            waiter.cancel()
        return self._outcome(run, waiter.result())

    async def _follow(
        self,
        run: JobRun,
        path: Path,
        offset: int,
        start: float,
        done: asyncio.Future[Any] | None,
    ) -> None:
        """Append the job's events from ``path`` (after ``offset``) until ``done``."""
        while True:
            finished = done is None or done.done()  # read first: the last drain misses nothing
            batch = await asyncio.to_thread(_read_events_from, path, offset)
            for ev, offset in batch:  # noqa: B007 - the offset carries to the next read
                self._on_runner_event(run, ev, start)
            if finished:
                return
            assert done is not None
            await asyncio.wait([done], timeout=self.poll_interval)

    def _on_runner_event(self, run: JobRun, ev: dict[str, Any], start: float) -> None:
        assert run.log is not None and run.mapper is not None
        when = float(ev.get("time") or time.time())
        if when < start:
            return  # an earlier attempt in the same output_dir
        payload = run.mapper.payload(ev)
        if payload is None:
            return
        run.log.append(when, **payload)
        if "progress" in payload:
            run.progress_dirty.set()

    def _outcome(self, run: JobRun, result: RunnerOutcome) -> Outcome:
        """The state to record from the runner's outcome and why the job ended."""
        assert run.mapper is not None
        if result.state is RunnerState.SUCCEEDED:
            # The runner only reports SUCCEEDED with an artifact; the base model is the spec's.
            kind = _ARTIFACT_KINDS.get(str(result.artifact_kind), tr.ARTIFACT_KIND_UNSPECIFIED)
            return (SUCCEEDED, "", run.mapper.artifact(kind, str(result.artifact_path or "")))
        if rules.is_final(run.record.state):
            return (run.record.state, run.record.reason, None)  # adopted
        if run.cancel_requested:
            return (CANCELLED, CANCELLED_REASON, None)
        if run.shutdown:
            return (FAILED, shutdown_reason(self.worker_id), None)
        if result.state is RunnerState.CANCELLED:
            # Only this worker cancels its jobs, and each cancel above has its reason.
            return (FAILED, "the job's processes were cancelled by the trainer worker", None)
        return (FAILED, result.reason or "the job's processes failed without a reason", None)

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
                run.log = self._rebuild(run, events)
                if run.log.complete:
                    self._finished.append(job_id)
                    self._trim_logs()
        return run.log

    def _rebuild(self, run: JobRun, events: list[dict[str, Any]]) -> JobLog:
        """The log as the live job built it: RUNNING, the runner's events, the final state."""
        job = run.record
        out = JobLog(self.watch_queue_size)
        mapper = EventMapper(self.worker_id, job.spec.base_model_path)
        if job.HasField("start_time"):
            start = _seconds(job.start_time)
            out.append(start, state_change=tr.TrainingStateChange(state=RUNNING))
            for ev in events:
                when = float(ev.get("time") or 0.0)
                if when < start:
                    continue
                payload = mapper.payload(ev)
                if payload is not None:
                    out.append(when, **payload)
        if rules.is_final(job.state):
            when = _seconds(job.end_time) if job.HasField("end_time") else time.time()
            out.append(
                when, state_change=tr.TrainingStateChange(state=job.state, reason=job.reason)
            )
        return out

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
            got = await self.client.get(self.keys.job(job_id))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise Unavailable(
                f"etcd is unreachable, and job {job_id!r} is not in this worker's memory: {exc}"
            ) from exc
        if got is None:
            raise NotFound(
                f"training job {job_id!r} does not exist; check the id "
                "(ControlPlaneService.ListTrainingJobs lists every job)"
            )
        job = decode(got.value, tr.TrainingJob)
        job.id = job_id
        if job.worker_id != self.worker_id:
            where = f"trainer worker {job.worker_id}" if job.worker_id else "no worker yet"
            raise NotFound(
                f"training job {job_id!r} is not on this trainer worker ({self.worker_id}); "
                f"it is placed on {where}: ask the control plane (GetTrainingJob) instead"
            )
        self._on_record(job, got.mod_revision)
        run = self.runs.get(job_id)
        if run is None:
            raise Unavailable(f"trainer worker {self.worker_id} is shutting down")
        return run


def _moved(job_id: str, record: tr.TrainingJob) -> FailedPrecondition:
    """Why a job's watchers here end when the job was placed on another worker."""
    return FailedPrecondition(
        f"training job {job_id!r} was moved to trainer worker "
        f"{record.worker_id or '(none yet)'}; watch it through the control plane"
    )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_events_from(path: Path, offset: int) -> list[tuple[dict[str, Any], int]]:
    """Complete event lines of ``path`` after ``offset``, each with the offset past it."""
    return list(iter_event_file(path, offset))
