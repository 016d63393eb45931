"""Following a training job: the watch loop, its progress view, job tables and the loss curve.

:class:`JobTracker` folds a ``WatchTrainingJob`` stream into ``(job, event)`` pairs and
:class:`WatchLoop` resumes it after a broken stream; the ``format_*`` helpers, :class:`LossCurve`
and :func:`write_loss_png` are what ``llmesh job watch`` and ``llmesh jobs`` show.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmesh.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LLMeshError,
    Unavailable,
)
from llmesh.common.job_rules import is_final, kind_name, state_name
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import trainer_service_pb2 as tr


class JobTracker:
    """Folds ``WatchTrainingJob`` responses into the job as it is now.

    Events carry a sequence number; the tracker drops any it has seen (a resumed stream may
    repeat one) and knows where to resume (:attr:`last_sequence`).

    Args:
        job_id: the job.
        after_sequence: events up to this one were seen already.
    """

    def __init__(self, job_id: str, after_sequence: int = 0) -> None:
        self.job_id = job_id
        self.last_sequence = after_sequence
        self.job: tr.TrainingJob | None = None

    @property
    def final(self) -> bool:
        """True once the job is known to be SUCCEEDED, FAILED or CANCELLED."""
        return self.job is not None and is_final(self.job.state)

    def apply(
        self, response: cp.WatchTrainingJobResponse
    ) -> tuple[tr.TrainingJob, tr.TrainingJobEvent | None] | None:
        """Take one response; returns ``(job_now, event_or_None)``, or None for a repeat."""
        has_event = response.HasField("event")
        if has_event and response.event.sequence and response.event.sequence <= self.last_sequence:
            if response.HasField("job"):
                self.job = _newer(self.job, response.job)
            return None
        if response.HasField("job"):
            self.job = _newer(self.job, response.job)
        if self.job is None:
            self.job = tr.TrainingJob(id=self.job_id)
        if not has_event:
            return _copy(self.job), None
        event = response.event
        self.last_sequence = max(self.last_sequence, event.sequence)
        which = event.WhichOneof("event")
        if which == "progress":
            self.job.progress.CopyFrom(event.progress)
        elif which == "state_change":
            if not is_final(self.job.state) or is_final(event.state_change.state):
                self.job.state = event.state_change.state
            if event.state_change.reason:
                self.job.reason = event.state_change.reason
        elif which == "artifact":
            self.job.artifact.CopyFrom(event.artifact)
        return _copy(self.job), event


def _copy(job: tr.TrainingJob) -> tr.TrainingJob:
    # Callers keep what we yield; later events must not change it under them.
    out = tr.TrainingJob()
    out.CopyFrom(job)
    return out


def _newer(old: tr.TrainingJob | None, new: tr.TrainingJob) -> tr.TrainingJob:
    """The server's job record, never older than what the events already showed.

    A record relayed with an event may come from a control plane whose view of etcd lags the
    trainer's stream by a moment: it must not take back a state, the artifact or progress.
    """
    job = _copy(new)
    if old is None:
        return job
    if old.progress.step > job.progress.step:
        job.progress.CopyFrom(old.progress)
    if old.HasField("artifact") and not job.HasField("artifact"):
        job.artifact.CopyFrom(old.artifact)
    if _state_rank(old.state) > _state_rank(job.state):
        job.state, job.reason = old.state, old.reason or job.reason
        for stamp in ("start_time", "end_time"):
            if old.HasField(stamp) and not job.HasField(stamp):
                getattr(job, stamp).CopyFrom(getattr(old, stamp))
    return job


def _state_rank(state: int) -> int:
    # QUEUED < RUNNING < any final state; the states only ever move forward.
    return 3 if is_final(state) else int(state)


# -- rendering ----------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``; negative or unknown -> ``"?"``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_age(seconds: float) -> str:
    """A coarse age for tables: ``"42s"``, ``"5m"``, ``"3h"``, ``"2d"``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def format_progress(progress: tr.TrainingProgress, *, width: int = 24) -> str:
    """One progress-bar line: bar, step/total, percent, loss, lr, samples/s, ETA.

    Fields the trainer has not reported yet (zero) are left out, so a line before the first
    logged step reads ``[........]  0/40  0%``.

    Args:
        progress: the job's latest progress.
        width: characters inside the bar.
    """
    parts: list[str] = []
    if progress.total_steps > 0:
        fraction = min(1.0, max(0.0, progress.step / progress.total_steps))
        filled = int(fraction * width)
        parts.append("[" + "#" * filled + "." * (width - filled) + "]")
        parts.append(f"{progress.step}/{progress.total_steps}")
        parts.append(f"{int(fraction * 100)}%")
    else:
        parts.append(f"step {progress.step}")
    if progress.loss or progress.step:
        parts.append(f"loss {progress.loss:.4f}")
    if progress.HasField("eval_loss"):
        parts.append(f"eval {progress.eval_loss:.4f}")
    if progress.learning_rate:
        parts.append(f"lr {progress.learning_rate:.2e}")
    if progress.samples_per_second:
        parts.append(f"{progress.samples_per_second:.1f} samples/s")
    if progress.eta_seconds and progress.step < progress.total_steps:
        parts.append(f"ETA {format_duration(progress.eta_seconds)}")
    return "  ".join(parts)


def format_job_row(job: tr.TrainingJob, now: float | None = None) -> list[str]:
    """``llmesh jobs`` columns: id, kind, state, worker, step/total, loss, age."""
    now = time.time() if now is None else now
    p = job.progress
    if p.total_steps:
        steps = f"{p.step}/{p.total_steps}"
    else:
        steps = str(p.step) if p.step else "-"
    loss = f"{p.loss:.4f}" if p.step else "-"
    created = job.create_time.ToNanoseconds() / 1e9 if job.HasField("create_time") else math.nan
    return [
        job.id,
        kind_name(job.spec.kind),
        state_name(job.state),
        job.worker_id or "-",
        steps,
        loss,
        format_age(now - created),
    ]


class LossCurve:
    """Loss points of one job, one per step (a repeated step keeps its last value)."""

    def __init__(self) -> None:
        self.train: dict[int, float] = {}
        self.eval: dict[int, float] = {}

    def add(self, progress: tr.TrainingProgress) -> None:
        """Record a progress report; reports before the first step are ignored."""
        if progress.step <= 0:
            return
        if math.isfinite(progress.loss):
            self.train[progress.step] = progress.loss
        if progress.HasField("eval_loss") and math.isfinite(progress.eval_loss):
            self.eval[progress.step] = progress.eval_loss

    def __bool__(self) -> bool:
        return bool(self.train or self.eval)


def write_loss_png(
    path: str | Path,
    train: Iterable[tuple[float, float]],
    eval_points: Iterable[tuple[float, float]] = (),
    *,
    title: str = "",
) -> Path:
    """Draw step vs loss (and eval loss, when given) into a PNG file.

    Uses matplotlib's Agg canvas directly, so the caller's pyplot backend is left alone.

    Args:
        path: the PNG to write; its directory must exist.
        train: ``(step, loss)`` points.
        eval_points: ``(step, eval_loss)`` points.
        title: the chart title, e.g. the job id.

    Returns:
        The path written.

    Raises:
        InvalidArgument: there is no point to draw.
        FailedPrecondition: matplotlib is not installed.
    """
    train_pts = sorted(train)
    eval_pts = sorted(eval_points)
    if not train_pts and not eval_pts:
        raise InvalidArgument("no loss points to draw; the job reported no training steps")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise FailedPrecondition(
            "matplotlib is needed for the loss curve; install it with pip install 'llmesh[plot]'"
        ) from None
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train_pts:
        marker = "." if len(train_pts) < 50 else None  # few points: show where they are
        ax.plot(*zip(*train_pts, strict=True), label="train loss", marker=marker)
    if eval_pts:
        ax.plot(*zip(*eval_pts, strict=True), label="eval loss", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def parse_states(states: Iterable[str | int] | str | None) -> list[int]:
    """Job states by name (``"running"``, ``"RUNNING"``, the full enum name) or number.

    Raises:
        InvalidArgument: a name or number that is not a job state, listing the valid names.
    """
    if states is None:
        return []
    if isinstance(states, (str, int)):
        states = [states]
    by_value = names_by_value()
    names = list(by_value.values())
    out: list[int] = []
    for state in states:
        if isinstance(state, int) and not isinstance(state, bool) and state in by_value:
            out.append(state)
            continue
        text = str(state).strip().upper().removeprefix("TRAINING_JOB_STATE_")
        if text not in names:
            raise InvalidArgument(
                f"{state!r} is not a training job state; use one of {', '.join(names)}"
            )
        out.append(tr.TrainingJobState.Value(f"TRAINING_JOB_STATE_{text}"))
    return out


def names_by_value() -> dict[int, str]:
    """``{2: "RUNNING", ...}`` for every job state except UNSPECIFIED."""
    return {v: state_name(v) for v in tr.TrainingJobState.values() if v}


class WatchLoop:
    """The retry rules of a job watch, shared by the sync and the asyncio client.

    One ``WatchTrainingJob`` call after another, each resuming after the last event seen,
    until the job is final and a stream ended cleanly. An UNAVAILABLE control plane is retried
    with backoff ``reconnects`` times in a row; the caller's ``timeout`` bounds the whole watch.

    Args:
        job_id: the job.
        after_sequence: events up to this one were seen already.
        timeout: seconds for the whole watch; None for no limit.
        reconnects: UNAVAILABLE answers in a row before giving up.
        backoff_max: the longest pause between two calls, in seconds.
    """

    def __init__(
        self,
        job_id: str,
        after_sequence: int = 0,
        *,
        timeout: float | None = None,
        reconnects: int = 8,
        backoff_max: float = 3.0,
    ) -> None:
        if not job_id:
            raise InvalidArgument("watching a training job needs its id (see llmesh jobs)")
        self.tracker = JobTracker(job_id, after_sequence)
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.reconnects = reconnects
        self.backoff_max = backoff_max
        self.failures = 0

    def request(self) -> tuple[cp.WatchTrainingJobRequest, float | None]:
        """The next call's request and deadline (seconds left, None for none).

        Raises:
            DeadlineExceeded: the watch's timeout has passed.
        """
        remaining = None if self.deadline is None else self.deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(
                f"training job {self.tracker.job_id} did not end within {self.timeout:g}s; it "
                "keeps running (watch it again, or cancel it)"
            )
        request = cp.WatchTrainingJobRequest(
            id=self.tracker.job_id, after_sequence=self.tracker.last_sequence
        )
        return request, remaining

    def received(
        self, response: cp.WatchTrainingJobResponse
    ) -> tuple[tr.TrainingJob, tr.TrainingJobEvent | None] | None:
        """Take one message; returns what to yield, None for a repeated event."""
        self.failures = 0
        return self.tracker.apply(response)

    def failed(self, exc: LLMeshError) -> None:
        """A call failed: re-raise unless it is worth another call."""
        if isinstance(exc, DeadlineExceeded):
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return  # ours: request() raises with the job id
            raise exc
        if not isinstance(exc, Unavailable):
            raise exc
        self.failures += 1
        if self.failures > self.reconnects:
            raise exc

    def pause(self) -> float | None:
        """After a call: None when the watch is done, else seconds to wait before the next."""
        if self.tracker.final and self.failures == 0:
            return None
        # A clean end before the final state means a control plane went away and closed its
        # streams: resume, but never spin.
        self.failures = max(self.failures, 1)
        return min(self.backoff_max, 0.2 * 2 ** (self.failures - 1))


class ProgressView:
    """A progress bar on one stream, messages on another, without garbling either.

    On a terminal the bar is redrawn in place (``\\r``) and cleared before a message is
    printed, then drawn again below it; otherwise (a log file, a pipe) every new bar state is
    its own line, so the output reads as a log.

    Args:
        out: where messages go (log lines, states), normally stdout.
        err: where the bar goes, normally stderr.
        tty: redraw in place; None asks ``err.isatty()``.
        width: characters inside the bar.
    """

    def __init__(self, out: Any, err: Any, *, tty: bool | None = None, width: int = 24) -> None:
        self.out = out
        self.err = err
        self.tty = bool(err.isatty()) if tty is None else tty
        self.width = width
        self._line = ""  # the bar as last drawn

    def progress(self, progress: tr.TrainingProgress) -> None:
        """Show a new progress report."""
        line = format_progress(progress, width=self.width)
        if line == self._line:
            return
        self._line = line
        if self.tty:
            self.err.write("\r" + line + "\x1b[K")
        else:
            self.err.write(line + "\n")
        self.err.flush()

    def message(self, text: str) -> None:
        """Print a line above the bar."""
        if self.tty and self._line:
            self.err.write("\r\x1b[K")
            self.err.flush()
        self.out.write(text + "\n")
        self.out.flush()
        if self.tty and self._line:
            self.err.write(self._line + "\x1b[K")
            self.err.flush()

    def close(self) -> None:
        """End the bar's line so what follows starts on a fresh one."""
        if self.tty and self._line:
            self.err.write("\n")
            self.err.flush()
        self._line = ""
