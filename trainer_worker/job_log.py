"""A training job's event log on its trainer worker, and the watchers following it.

Each job has a log of ``TrainingJobEvent`` s numbered from 1 that
:mod:`llmesh.trainer_worker.servicer` streams: a ``state_change`` to RUNNING, the runner's
events (:class:`EventMapper` turns them into log entries), and a final ``state_change``. The
runner's ``events.jsonl`` in the job's output directory is the durable copy, so a restarted
worker rebuilds the same log, with the same numbers, from that file and the record
(:func:`rebuild_log`). A watcher that falls too far behind is dropped, never waited for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from llmesh.common import job_rules as rules
from llmesh.v1 import trainer_service_pb2 as tr

__all__ = [
    "ARTIFACT_KINDS",
    "EventMapper",
    "JobLog",
    "Subscription",
    "WatcherDropped",
    "is_final_event",
    "rebuild_log",
    "seconds",
]

log = logging.getLogger(__name__)

RUNNING = tr.TrainingJobState.TRAINING_JOB_STATE_RUNNING

#: The runner's artifact kinds as the contract names them.
ARTIFACT_KINDS = {
    "lora_adapter": tr.ARTIFACT_KIND_LORA_ADAPTER,
    "full_model": tr.ARTIFACT_KIND_FULL_MODEL,
}


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def seconds(ts: Timestamp) -> float:
    """A protobuf Timestamp as seconds since the epoch."""
    return ts.ToNanoseconds() / 1e9


def is_final_event(event: tr.TrainingJobEvent) -> bool:
    """Whether ``event`` is the last of its job's log (the change to a final state)."""
    return event.WhichOneof("event") == "state_change" and rules.is_final(event.state_change.state)


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
                art_kind = ARTIFACT_KINDS.get(str(ev.get("kind")), tr.ARTIFACT_KIND_UNSPECIFIED)
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


def rebuild_log(
    job: tr.TrainingJob, events: list[dict[str, Any]], worker_id: str, queue_size: int
) -> JobLog:
    """The log as the live job built it: RUNNING, the runner's events, the final state.

    Args:
        job: the job's record (its start_time cuts off earlier attempts' events).
        events: the runner's events, as :func:`~llmesh.trainer_worker.runner.read_events`
            reads them from the job's output directory.
        worker_id: this worker, for artifacts.
        queue_size: each watcher's queue bound.
    """
    out = JobLog(queue_size)
    mapper = EventMapper(worker_id, job.spec.base_model_path)
    if job.HasField("start_time"):
        start = seconds(job.start_time)
        out.append(start, state_change=tr.TrainingStateChange(state=RUNNING))
        for ev in events:
            when = float(ev.get("time") or 0.0)
            if when < start:
                continue
            payload = mapper.payload(ev)
            if payload is not None:
                out.append(when, **payload)
    if rules.is_final(job.state):
        when = seconds(job.end_time) if job.HasField("end_time") else time.time()
        out.append(when, state_change=tr.TrainingStateChange(state=job.state, reason=job.reason))
    return out
