"""Job events: JSON lines in ``{output_dir}/events.jsonl``, the one record of what a job did.

Rank 0 appends progress, evaluation, checkpoint and artifact events; any rank may append an
``error``; the launcher (:mod:`.launch`) appends the ``STARTING`` state and the final state.
Every line is one ``os.write`` on a file opened with ``O_APPEND``, so concurrent writers never
interleave inside a line, and each line is on disk before the writer goes on: a worker that
restarts, or a watcher that connects late, reads the whole story with :func:`read_events`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

__all__ = [
    "EVENTS_FILE",
    "KEYS",
    "EventType",
    "EventWriter",
    "JobState",
    "make_event",
    "parse_event_line",
    "read_events",
]

EVENTS_FILE = "events.jsonl"


class EventType(str, Enum):
    """The ``type`` of an event line."""

    STATE = "state"
    PROGRESS = "progress"
    EVAL = "eval"
    LOG = "log"
    CHECKPOINT = "checkpoint"
    RESUME = "resume"
    ARTIFACT = "artifact"
    ERROR = "error"
    DONE = "done"


class JobState(str, Enum):
    """Job states as they appear in ``state`` events and in the launcher's outcome."""

    STARTING = "STARTING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


# Keys each event type must carry (besides "type" and "time"). Optional extras:
#   state: job_id, kind, ranks (STARTING / RUNNING), reason, exit_code (final states);
#   error: rank (the rank that failed; absent when the launcher side failed the job);
#   log: source = "output" on lines taken from the processes' output (never in the file).
KEYS: dict[EventType, tuple[str, ...]] = {
    EventType.STATE: ("state",),
    EventType.PROGRESS: (
        "step",
        "total_steps",
        "epoch",
        "loss",
        "learning_rate",
        "samples_per_second",
        "eta_seconds",
    ),
    EventType.EVAL: ("step", "eval_loss"),
    EventType.LOG: ("line",),
    EventType.CHECKPOINT: ("step", "path"),
    EventType.RESUME: ("step", "path"),
    EventType.ARTIFACT: ("kind", "path"),
    EventType.ERROR: ("reason",),
    EventType.DONE: (),
}

ARTIFACT_KINDS = ("lora_adapter", "full_model")


def make_event(type_: EventType | str, **fields: Any) -> dict[str, Any]:
    """An event dict with its ``type`` and ``time``; raises ``ValueError`` on missing keys."""
    et = EventType(type_)
    missing = [k for k in KEYS[et] if k not in fields]
    if missing:
        raise ValueError(f"{et.value} event needs {', '.join(missing)}")
    if et is EventType.STATE:
        fields["state"] = JobState(fields["state"]).value
    return {"type": et.value, "time": fields.pop("time", time.time()), **fields}


def parse_event_line(line: str | bytes) -> dict[str, Any] | None:
    """One event from one line, or ``None`` for a blank, torn or foreign line."""
    try:
        ev = json.loads(line)
    except ValueError:
        return None
    if not isinstance(ev, dict) or ev.get("type") not in EventType._value2member_map_:
        return None
    return ev


class EventWriter:
    """Appends events to one ``events.jsonl``; safe to use from several processes at once.

    Args:
        output_dir: The job's output directory (created if missing).
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, type_: EventType | str, **fields: Any) -> dict[str, Any]:
        """Append one event and return it."""
        ev = make_event(type_, **fields)
        data = (json.dumps(ev, ensure_ascii=False, default=str) + "\n").encode()
        # A fresh O_APPEND descriptor per line: a single write() of a line lands whole at the
        # end even with other writers, and nothing stays buffered if this process is killed.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            # A writer killed mid-line (a full disk) left a torn line: start on a fresh one.
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            os.write(fd, data)
        finally:
            os.close(fd)
        return ev


def iter_event_file(path: str | Path, offset: int = 0) -> Iterator[tuple[dict[str, Any], int]]:
    """Complete event lines from ``offset``, each with the offset just past it.

    A last line without its newline is still being written: it is left for the next read.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            for raw in f:
                if not raw.endswith(b"\n"):
                    return
                offset += len(raw)
                ev = parse_event_line(raw)
                if ev is not None:
                    yield ev, offset
    except FileNotFoundError:
        return


def read_events(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every event a job (all its attempts) wrote into ``output_dir``, oldest first."""
    return [ev for ev, _ in iter_event_file(Path(output_dir) / EVENTS_FILE)]
