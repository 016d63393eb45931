"""One job on a trainer worker: what the worker knows about it, and how its run is followed.

:class:`JobRun` holds a job's record as last seen, its event log and its runner process;
:func:`follow_events` feeds the runner's ``events.jsonl`` into the log while the ranks run, and
:func:`runner_outcome` decides which final state the job's record gets, and why.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmesh.common import job_rules as rules
from llmesh.common.errors import FailedPrecondition
from llmesh.trainer_worker.job_log import ARTIFACT_KINDS, EventMapper, JobLog
from llmesh.trainer_worker.runner.events import JobState as RunnerState
from llmesh.trainer_worker.runner.events import iter_event_file
from llmesh.trainer_worker.runner.launch import JobProcess
from llmesh.trainer_worker.runner.launch import Outcome as RunnerOutcome
from llmesh.v1 import trainer_service_pb2 as tr

__all__ = [
    "CANCELLED_REASON",
    "JobRun",
    "Outcome",
    "follow_events",
    "moved_error",
    "restarted_reason",
    "runner_outcome",
    "shutdown_reason",
]

State = tr.TrainingJobState
QUEUED = State.TRAINING_JOB_STATE_QUEUED
RUNNING = State.TRAINING_JOB_STATE_RUNNING
SUCCEEDED = State.TRAINING_JOB_STATE_SUCCEEDED
FAILED = State.TRAINING_JOB_STATE_FAILED
CANCELLED = State.TRAINING_JOB_STATE_CANCELLED

CANCELLED_REASON = "cancelled on request"

#: (final state, reason, artifact) to record.
Outcome = tuple[int, str, tr.TrainingArtifact | None]


def restarted_reason(worker_id: str, output_dir: str) -> str:
    """Why a job found RUNNING on this worker id at startup is FAILED."""
    return (
        f"trainer worker {worker_id} restarted while the job was running; create the job again "
        f"to resume from its last checkpoint (with output_dir {output_dir})"
    )


def shutdown_reason(worker_id: str) -> str:
    """Why a job still running when its worker stops is FAILED."""
    return f"trainer worker {worker_id} shut down"


def moved_error(job_id: str, record: tr.TrainingJob) -> FailedPrecondition:
    """Why a job's watchers here end when the job was placed on another worker."""
    return FailedPrecondition(
        f"training job {job_id!r} was moved to trainer worker "
        f"{record.worker_id or '(none yet)'}; watch it through the control plane"
    )


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
        """The latest progress the runner reported (None before any)."""
        return self.mapper.progress if self.mapper is not None else None

    def take(self, record: tr.TrainingJob, revision: int) -> bool:
        """Keep ``record`` if it is newer than the one held; returns whether it was."""
        if revision <= self.revision:
            return False
        self.record, self.revision = record, revision
        return True


async def follow_events(
    run: JobRun,
    path: Path,
    offset: int,
    start: float,
    done: asyncio.Future[Any] | None,
    poll_interval: float,
) -> None:
    """Append the job's events from ``path`` (after ``offset``) to its log until ``done``.

    Args:
        run: the job; its log and mapper are set.
        path: the job's events.jsonl.
        offset: where this attempt's events start in it.
        start: the attempt's start time (earlier events belong to an earlier attempt).
        done: resolves when the ranks have ended; None: read what is there once.
        poll_interval: seconds between reads of the file.
    """
    while True:
        finished = done is None or done.done()  # read first: the last drain misses nothing
        batch = await asyncio.to_thread(_read_events_from, path, offset)
        for ev, offset in batch:  # noqa: B007 - the offset carries to the next read
            _on_runner_event(run, ev, start)
        if finished:
            return
        assert done is not None
        await asyncio.wait([done], timeout=poll_interval)


def _on_runner_event(run: JobRun, ev: dict[str, Any], start: float) -> None:
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


def runner_outcome(run: JobRun, result: RunnerOutcome, worker_id: str) -> Outcome:
    """The state to record from the runner's outcome and why the job ended.

    Args:
        run: the job (its flags say whether this worker stopped it, and why).
        result: what the runner reported.
        worker_id: this worker, for the shutdown reason.
    """
    assert run.mapper is not None
    if result.state is RunnerState.SUCCEEDED:
        # The runner only reports SUCCEEDED with an artifact; the base model is the spec's.
        kind = ARTIFACT_KINDS.get(str(result.artifact_kind), tr.ARTIFACT_KIND_UNSPECIFIED)
        return (SUCCEEDED, "", run.mapper.artifact(kind, str(result.artifact_path or "")))
    if rules.is_final(run.record.state):
        return (run.record.state, run.record.reason, None)  # adopted
    if run.cancel_requested:
        return (CANCELLED, CANCELLED_REASON, None)
    if run.shutdown:
        return (FAILED, shutdown_reason(worker_id), None)
    if result.state is RunnerState.CANCELLED:
        # Only this worker cancels its jobs, and each cancel above has its reason.
        return (FAILED, "the job's processes were cancelled by the trainer worker", None)
    return (FAILED, result.reason or "the job's processes failed without a reason", None)


def file_size(path: Path) -> int:
    """Bytes in ``path`` (0 when it does not exist yet)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_events_from(path: Path, offset: int) -> list[tuple[dict[str, Any], int]]:
    """Complete event lines of ``path`` after ``offset``, each with the offset past it."""
    return list(iter_event_file(path, offset))
