"""Run a job as child processes and follow it: the API a trainer worker uses.

::

    proc = JobProcess(spec, log_path=out / "job.log")
    await proc.start()                  # checks spec and data first; raises on bad input
    async for ev in proc.events():      # events.jsonl as it grows, plus process output lines
        ...
    outcome = await proc.wait()         # Outcome(state, reason, artifact_path, artifact_kind)
    await proc.cancel(grace_s=10)       # SIGTERM the process group, SIGKILL what is left

Training jobs run under the DeepSpeed launcher (``python -m deepspeed.launcher.launch``, the
per-node launcher the ``deepspeed`` CLI runs on a single host), which starts one
``llmesh.trainer_worker.runner.train`` process per rank; merge_lora jobs run one
``llmesh.trainer_worker.runner.merge`` process. Either way the first child leads a new process
group (``start_new_session``) so cancel reaches every rank and every helper they start, and it
runs through ``llmesh.common.process`` so it gets SIGTERM if the worker dies; ranks ask for
the same (PR_SET_PDEATHSIG) about the launcher above them, so nothing trains on as an orphan.
Every process of a job has ``LLMESH_JOB_ID`` in its environment.

What a job leaves in its ``output_dir``::

    job.json        the validated spec the processes read
    events.jsonl    every event of every attempt (read_events)
    job.log         the processes' raw output (unless log_path points elsewhere)
    checkpoints/    DeepSpeed checkpoints step-N/ and DeepSpeed's ``latest`` (resume reads it)
    adapter/        the LoRA adapter (PEFT layout + tokenizer), or
    model/          the full model (HuggingFace layout + tokenizer)
    .job.lock       held while a JobProcess runs the job: one runner per output_dir
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import IO, Any

from llmesh.common.errors import FailedPrecondition, InvalidArgument, LLMeshError
from llmesh.common.etcd_security import without_etcd_credentials
from llmesh.common.process import free_port, guarded
from llmesh.trainer_worker.runner.data import (
    check_pretrain_data,
    check_template,
    load_sft_rows,
    resolve_sft_file,
    val_count,
)
from llmesh.trainer_worker.runner.events import (
    EVENTS_FILE,
    EventType,
    EventWriter,
    JobState,
    iter_event_file,
    read_events,
)
from llmesh.trainer_worker.runner.spec import JobSpec, resolve_batch_config

__all__ = [
    "JOB_ENV",
    "SPEC_FILE",
    "JobProcess",
    "Outcome",
    "check_job",
    "ds_shm_segment",
    "ds_shm_segments",
    "group_pids",
    "job_pids",
    "outcome_from_events",
    "read_events",
]

log = logging.getLogger(__name__)

SPEC_FILE = "job.json"
LOCK_FILE = ".job.lock"
JOB_ENV = "LLMESH_JOB_ID"  # set in every process of a job; how leftovers can be found
_TAIL_LINES = 40
_MAX_LINES = 10_000
_POLL_S = 0.2
_MASTER_ADDR = "127.0.0.1"
# DeepSpeed's CPU allreduce keeps one ~66 MB POSIX shared-memory segment per rank, named
# f"{prefix}_{uid}_{master_addr}_{master_port}_{rank}" (deepspeed/ops/csrc/cpu/comm/shm.cpp),
# and never unlinks it: each finished CPU job would pin world_size × 66 MB of RAM in /dev/shm
# until reboot (the suite once filled 19 GiB and starved vLLM).
_DS_SHM_PREFIX = "deepspeed_allreduce_buffer"
_SHM_DIR = Path("/dev/shm")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a job ended.

    Args:
        state: SUCCEEDED, FAILED or CANCELLED.
        reason: Why it failed (or was cancelled); empty on success.
        artifact_path: The LoRA adapter or model directory written, if any.
        artifact_kind: ``lora_adapter`` or ``full_model``.
        exit_code: The launcher's exit status (negative: killed by that signal).
    """

    state: JobState
    reason: str = ""
    artifact_path: str | None = None
    artifact_kind: str | None = None
    exit_code: int | None = None


# -- checks before launch -----------------------------------------------------------------------


def _model_dir(key: str, path: str | None, marker: str = "config.json") -> Path:
    d = Path(path or "").expanduser()
    if not d.is_dir():
        raise InvalidArgument(f"{key} {path} is not a directory")
    if not (d / marker).is_file():
        raise InvalidArgument(f"{key} {path} has no {marker}; point it at a HuggingFace directory")
    return d


def _weight_names(model_dir: Path) -> set[str] | None:
    """Tensor names of a safetensors checkpoint, read from the headers (no torch needed)."""
    index = model_dir / "model.safetensors.index.json"
    try:
        if index.is_file():
            return set(json.loads(index.read_text())["weight_map"])
        single = model_dir / "model.safetensors"
        if not single.is_file():
            return None
        with open(single, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            return {k for k in json.loads(f.read(size)) if k != "__metadata__"}
    except (OSError, ValueError, KeyError):
        return None  # unusual layout: the ranks will report a bad name themselves


def _check_target_modules(base: Path, targets: list[str] | None) -> None:
    if not targets:
        return
    names = _weight_names(base)
    if names is None:
        return
    modules = {n.rsplit(".", 1)[0] for n in names if n.endswith(".weight")}
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    missing = [t for t in targets if t not in leaves and t not in modules]
    if missing:
        raise InvalidArgument(
            f"job spec field 'lora.target_modules': {', '.join(missing)} not found in "
            f"{base}; its layers are named {', '.join(sorted(leaves))}"
        )


def check_job(spec: JobSpec) -> dict[str, Any]:
    """Everything that can be checked before starting a process; returns a short summary.

    Reads the whole data.jsonl of an sft job (a bad line names itself here, not minutes into
    a run); for pretraining, jsonl rows are checked and .txt files only sniffed.

    Raises:
        InvalidArgument: a missing path, a bad data line, inconsistent batch settings.
        FailedPrecondition: the data needs a chat template the tokenizer does not have.
    """
    summary: dict[str, Any] = {"kind": spec.kind}
    if spec.kind == "merge_lora":
        _model_dir("base_model_path", spec.base_model_path)
        _model_dir("adapter_path", spec.adapter_path, "adapter_config.json")
        return summary
    resolve_batch_config(
        spec.deepspeed_config,
        micro=spec.hyperparameters.per_device_train_batch_size,
        accumulation=spec.hyperparameters.gradient_accumulation_steps,
        world=spec.num_ranks,
    )
    if spec.kind == "sft":
        base = _model_dir("base_model_path", spec.base_model_path)
        if spec.training_method == "lora":
            _check_target_modules(base, spec.lora.target_modules)
        rows = load_sft_rows(spec.data_path)  # type: ignore[arg-type]
        name = resolve_sft_file(spec.data_path).name  # type: ignore[arg-type]
        check_template(rows, spec.template, base, file_name=name)
        n_val = val_count(len(rows), spec.hyperparameters.val_set_size)
        summary.update(rows=len(rows), val_rows=n_val)
        return summary
    # pretrain
    if spec.base_model_path:
        _model_dir("base_model_path", spec.base_model_path)
    if spec.tokenizer_path:
        tok = Path(spec.tokenizer_path).expanduser()
        if not tok.is_dir():
            raise InvalidArgument(f"tokenizer_path {spec.tokenizer_path} is not a directory")
    if isinstance(spec.model_config, dict):
        if not spec.model_config.get("model_type"):
            raise InvalidArgument(
                "job spec field 'model_config' needs a model_type (e.g. 'llama') for AutoConfig"
            )
    elif isinstance(spec.model_config, str):
        p = Path(spec.model_config).expanduser()
        if not (p.is_file() or (p / "config.json").is_file()):
            raise InvalidArgument(
                f"job spec field 'model_config' {spec.model_config} is neither a config.json "
                "nor a directory with one"
            )
    summary["files"] = check_pretrain_data(spec.data_path)  # type: ignore[arg-type]
    return summary


# -- processes ----------------------------------------------------------------------------------


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, from /proc."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the command name (which may contain spaces and parentheses).
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and fields[0] != b"Z" and int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


def job_pids(job_id: str) -> list[int]:
    """Live processes whose environment marks them as part of job ``job_id``."""
    needle = f"{JOB_ENV}={job_id}".encode()
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if needle in env and stat[stat.rfind(b")") + 2 :][:1] != b"Z":
            out.append(int(entry.name))
    return out


def ds_shm_segment(master_addr: str, master_port: int | str, rank: int) -> Path:
    """The /dev/shm file DeepSpeed's CPU allreduce creates for one rank of a job."""
    return _SHM_DIR / f"{_DS_SHM_PREFIX}_{os.getuid()}_{master_addr}_{master_port}_{rank}"


def ds_shm_segments(master_port: int, num_ranks: int) -> list[Path]:
    """The /dev/shm files DeepSpeed's CPU allreduce creates for one job's ranks."""
    return [ds_shm_segment(_MASTER_ADDR, master_port, rank) for rank in range(num_ranks)]


def _world_info(num_ranks: int, visible_devices: str) -> str:
    # The worker gives a GPU job its devices in CUDA_VISIBLE_DEVICES; the launcher sets it
    # again per node from this list, so pass the real ids rather than 0..n-1.
    visible = [d for d in visible_devices.split(",") if d.strip()]
    ids: list[Any] = visible[:num_ranks] if len(visible) >= num_ranks else list(range(num_ranks))
    if ids and all(str(i).isdigit() for i in ids):
        ids = [int(i) for i in ids]
    return base64.urlsafe_b64encode(json.dumps({"localhost": ids}).encode()).decode()


def _threads_per_rank(spec: JobSpec) -> int:
    if spec.threads_per_rank > 0:
        return spec.threads_per_rank
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    # One rank per core group; more OpenMP threads than cores makes every rank wait on the
    # others' barriers.
    return max(1, cores // max(1, spec.num_ranks if spec.kind != "merge_lora" else 1))


def outcome_from_events(events: list[dict[str, Any]]) -> Outcome | None:
    """The outcome recorded in a job's events (its last final state), or ``None`` if none yet.

    A worker that restarts uses this on ``read_events(output_dir)`` to learn how a job it was
    running ended.
    """
    final: dict[str, Any] | None = None
    artifact: dict[str, Any] | None = None
    for ev in events:
        if ev.get("type") == EventType.ARTIFACT.value:
            artifact = ev
        elif ev.get("type") == EventType.STATE.value:
            if ev.get("state") in (s.value for s in JobState if s.terminal):
                final = ev
            elif ev.get("state") == JobState.STARTING.value:
                final, artifact = None, None  # a new attempt
    if final is None:
        return None
    state = JobState(final["state"])
    ok = state is JobState.SUCCEEDED and artifact is not None
    return Outcome(
        state=state,
        reason=str(final.get("reason", "")),
        artifact_path=artifact["path"] if ok and artifact else None,
        artifact_kind=artifact["kind"] if ok and artifact else None,
        exit_code=final.get("exit_code"),
    )


class JobProcess:
    """One attempt of a job, run as child processes.

    Args:
        spec: A :class:`JobSpec` or a dict for :meth:`JobSpec.from_dict`.
        log_path: File that receives the processes' raw stdout/stderr (appended); default
            ``{output_dir}/job.log``.
        env: Extra environment for the processes.
        python: The interpreter to run (default: this one).
    """

    def __init__(
        self,
        spec: JobSpec | Mapping[str, Any],
        *,
        log_path: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.spec = spec if isinstance(spec, JobSpec) else JobSpec.from_dict(spec)
        self.output_dir = Path(self.spec.output_dir)
        self.log_path = Path(log_path) if log_path else self.output_dir / "job.log"
        self._env = dict(env or {})
        self._python = python
        self._proc: asyncio.subprocess.Process | None = None
        self._events_offset = 0
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        # Process output as log events, for events() consumers; bounded, a chatty job must not
        # grow the worker without limit (job.log has everything).
        self._lines: collections.deque[dict[str, Any]] = collections.deque(maxlen=_MAX_LINES)
        self._lines_total = 0
        self._changed = asyncio.Event()
        self._finished = asyncio.Event()
        self._outcome: Outcome | None = None
        self._cancelled = False
        self._supervisor: asyncio.Task[None] | None = None
        self._lock_file: IO[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._started = False
        self._master_port: int | None = None

    # -- properties ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The launcher's pid, which is also the job's process group id."""
        return self._proc.pid if self._proc else None

    @property
    def master_port(self) -> int | None:
        """The rendezvous port of a training job's ranks (``None`` before start, merge jobs)."""
        return self._master_port

    @property
    def outcome(self) -> Outcome | None:
        """The outcome once the job has ended, else ``None``."""
        return self._outcome

    @property
    def events_path(self) -> Path:
        return self.output_dir / EVENTS_FILE

    # -- start --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the job, then start its processes.

        Raises:
            InvalidArgument: bad spec or data (e.g. ``data.jsonl line 7: field 'output' is
                missing ...``); nothing is started, and the failure is recorded as the job's
                outcome and in events.jsonl.
            FailedPrecondition: the job cannot run as asked (no chat template, output_dir in
                use by another running job, already started).
        """
        if self._started:
            raise FailedPrecondition(f"job {self.spec.job_id} was already started")
        self._started = True
        try:
            await asyncio.to_thread(check_job, self.spec)
            self._take_lock()
        except LLMeshError as exc:
            self._fail_before_launch(str(exc))
            raise
        except OSError as exc:
            self._fail_before_launch(f"cannot use output_dir {self.output_dir}: {exc}")
            raise FailedPrecondition(
                f"cannot use output_dir {self.output_dir}: {exc.strerror}"
            ) from exc
        spec_path = self.output_dir / SPEC_FILE
        spec_path.write_text(self.spec.to_json())
        try:
            self._events_offset = self.events_path.stat().st_size
        except FileNotFoundError:
            self._events_offset = 0
        writer = EventWriter(self.output_dir)
        writer.emit(
            EventType.STATE,
            state=JobState.STARTING,
            job_id=self.spec.job_id,
            kind=self.spec.kind,
            ranks=self.spec.num_ranks if self.spec.kind != "merge_lora" else 1,
        )
        cmd = self._command(spec_path)
        self._log_file = self._open_log()
        self._log_file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self._child_env(),
                cwd=str(self.output_dir),
                start_new_session=True,  # its own process group: cancel reaches every rank
                limit=1 << 20,
            )
        except OSError as exc:
            self._log_file.close()
            reason = f"cannot start the job's processes: {exc}"
            self._finish(Outcome(JobState.FAILED, reason))
            raise FailedPrecondition(reason) from exc
        log.info("job %s started: pid %d, %s", self.spec.job_id, self._proc.pid, " ".join(cmd))
        self._supervisor = asyncio.create_task(self._supervise(), name=f"job-{self.spec.job_id}")

    def _take_lock(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.output_dir / LOCK_FILE, "ab")  # held (locked) for the job's life
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise FailedPrecondition(
                f"output_dir {self.output_dir} is in use by another running job; wait for it "
                "or choose another output_dir"
            ) from None
        self._lock_file = f

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _fail_before_launch(self, reason: str) -> None:
        """Record a failure that happened before any process started."""
        with contextlib.suppress(OSError):
            writer = EventWriter(self.output_dir)
            writer.emit(EventType.ERROR, reason=reason)
            writer.emit(EventType.STATE, state=JobState.FAILED, reason=reason)
        self._outcome = Outcome(JobState.FAILED, reason)
        self._finished.set()
        self._release_lock()

    def _command(self, spec_path: Path) -> list[str]:
        py = self._python
        if self.spec.kind == "merge_lora":
            inner = [py, "-u", "-m", "llmesh.trainer_worker.runner.merge", "--spec", str(spec_path)]
        else:
            inner = [
                py,
                "-u",
                "-m",
                "deepspeed.launcher.launch",
                "--world_info="
                + _world_info(
                    self.spec.num_ranks, self._child_env().get("CUDA_VISIBLE_DEVICES", "")
                ),
                f"--master_addr={_MASTER_ADDR}",
                f"--master_port={self._new_master_port()}",
                "--module",
                "--no_local_rank",  # ranks read LOCAL_RANK from the environment
                "llmesh.trainer_worker.runner.train",
                "--spec",
                str(spec_path),
            ]
        # guarded(): the launcher gets SIGTERM when this process dies, even by SIGKILL.
        cmd = guarded(inner)
        cmd[0] = py
        return cmd

    def _new_master_port(self) -> int:
        self._master_port = free_port()
        return self._master_port

    def _remove_shm_segments(self, made_before: float) -> None:
        """Unlink the job's DeepSpeed allreduce segments once none of its processes is left.

        Only segments made before ``made_before`` (when the job's launcher exited): once this
        job's ranks are gone its port is free, and a job started since may already have made
        segments under the same names; unlinking those would leave its peers waiting forever.
        """
        if self._master_port is None:
            return
        for path in ds_shm_segments(self._master_port, self.spec.num_ranks):
            try:
                if path.stat().st_mtime <= made_before:
                    path.unlink()
            except FileNotFoundError:
                pass  # the rank unlinked it itself (the usual case)
            except OSError as exc:
                log.warning(
                    "job %s: cannot remove %s (~66 MB of shared memory until reboot): %s; "
                    "remove it by hand",
                    self.spec.job_id,
                    path,
                    exc,
                )

    def _child_env(self) -> dict[str, str]:
        # No etcd credentials: ranks run user-supplied training code and never talk to etcd.
        env = without_etcd_credentials(os.environ)
        threads = str(_threads_per_rank(self.spec))
        env.update(
            {
                JOB_ENV: self.spec.job_id,
                "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads,
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        # Models come from local directories; never reach for a hub at training time.
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "DS_ACCELERATOR" not in env and not Path("/dev/nvidiactl").exists():
            env["DS_ACCELERATOR"] = "cpu"  # saves DeepSpeed's probe and its warning
        env.update(without_etcd_credentials(self._env))
        # Nor the worker's token: ranks call no llmesh server, and they run user-given code.
        env.pop("LLMESH_TOKEN", None)
        return env

    # -- supervision --------------------------------------------------------------------------

    async def _supervise(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        try:
            try:
                await self._pump_output(proc.stdout)
            except OSError as exc:  # the log file broke (disk full): keep supervising
                log.error("job %s: cannot record its output: %s", self.spec.job_id, exc)
                await proc.stdout.read()
            rc = await proc.wait()
            ended = time.time()
            # Ranks whose launcher died get SIGTERM from PR_SET_PDEATHSIG; anything else of the
            # group (a compiler, a stuck rank) must not outlive the job either.
            await self._reap_group(proc.pid, grace_s=5.0)
            self._remove_shm_segments(made_before=ended)
            self._finish(self._decide(rc))
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            # The ranks may still hold the mappings; unlinking only drops the names, and the
            # memory goes once they are dead.
            self._remove_shm_segments(made_before=time.time())
            raise

    def _open_log(self) -> IO[bytes]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        return open(self.log_path, "ab", buffering=0)  # unbuffered: the log is live

    async def _pump_output(self, stream: asyncio.StreamReader) -> None:
        assert self._log_file is not None
        with self._log_file as logf:
            while True:
                try:
                    raw = await stream.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    raw = await stream.read(1 << 20)  # an endless line: take it in chunks
                if not raw:
                    return
                logf.write(raw)
                # Progress bars redraw with \r: keep only what the terminal would show.
                text = raw.decode("utf-8", "replace").rstrip("\n").rsplit("\r", 1)[-1].rstrip()
                if not text:
                    continue
                self._tail.append(text)
                self._lines.append(
                    {"type": "log", "time": time.time(), "line": text, "source": "output"}
                )
                self._lines_total += 1
                self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _reap_group(self, pgid: int, *, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        sent_kill = False
        while True:
            left = await asyncio.to_thread(group_pids, pgid)
            if not left:
                return
            if time.monotonic() >= deadline:
                if sent_kill:
                    log.error("job %s: processes %s survive SIGKILL", self.spec.job_id, left)
                    return
                log.warning("job %s: killing leftover processes %s", self.spec.job_id, left)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                sent_kill, deadline = True, time.monotonic() + 10.0
            await asyncio.sleep(0.1)

    def _attempt_events(self) -> list[dict[str, Any]]:
        return [ev for ev, _ in iter_event_file(self.events_path, self._events_offset)]

    def _decide(self, rc: int) -> Outcome:
        events = self._attempt_events()
        done = any(e["type"] == EventType.DONE.value for e in events)
        if self._cancelled and not (rc == 0 and done):
            return Outcome(JobState.CANCELLED, "cancelled", exit_code=rc)
        errors = [e for e in events if e["type"] == EventType.ERROR.value]
        artifacts = [e for e in events if e["type"] == EventType.ARTIFACT.value]
        if rc == 0 and done and artifacts:
            last = artifacts[-1]
            return Outcome(JobState.SUCCEEDED, "", last["path"], last["kind"], rc)
        if errors:
            # Rank 0's error first: other ranks often fail only because rank 0 went away.
            errors.sort(key=lambda e: e.get("rank", 0) != 0)
            reason = str(errors[0]["reason"])
        elif rc < 0:
            reason = f"the job's processes were killed by {signal.Signals(-rc).name}"
        else:
            tail = " | ".join(list(self._tail)[-5:])
            reason = f"the job's processes exited with code {rc}" + (
                f"; last output: {tail}" if tail else ""
            )
        return Outcome(JobState.FAILED, reason, exit_code=rc)

    def _finish(self, outcome: Outcome) -> None:
        fields: dict[str, Any] = {"state": outcome.state}
        if outcome.reason:
            fields["reason"] = outcome.reason
        if outcome.exit_code is not None:
            fields["exit_code"] = outcome.exit_code
        with contextlib.suppress(OSError):
            EventWriter(self.output_dir).emit(EventType.STATE, **fields)
        self._outcome = outcome
        self._release_lock()
        self._finished.set()
        self._notify()
        log.info("job %s %s %s", self.spec.job_id, outcome.state.value, outcome.reason)

    # -- public API ---------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """This attempt's events as they happen, ending once the job has ended.

        Yields the lines rank 0 (and the launcher side) append to events.jsonl, starting with
        this attempt's STARTING state and ending with its final state, interleaved with the
        processes' output lines as ``log`` events with ``"source": "output"`` (those are not
        in events.jsonl; the raw output is in ``log_path``). Several consumers may iterate at
        once.
        """
        if not self._started:
            raise FailedPrecondition(f"job {self.spec.job_id} has not been started")
        offset = self._events_offset
        seen_lines = 0
        while True:
            changed = self._changed
            finished = self._finished.is_set()  # read first: the final drain misses nothing
            batch = list(iter_event_file(self.events_path, offset))
            if batch:
                offset = batch[-1][1]
            for ev, _ in batch:
                yield ev
            while seen_lines < self._lines_total:
                first_kept = self._lines_total - len(self._lines)
                seen_lines = max(seen_lines, first_kept)  # a slow consumer skips the oldest
                line = self._lines[seen_lines - first_kept]
                seen_lines += 1
                yield line
            if finished:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), _POLL_S)

    async def wait(self) -> Outcome:
        """Wait for the job to end; returns its outcome."""
        if not self._started:
            raise FailedPrecondition(f"job {self.spec.job_id} has not been started")
        await self._finished.wait()
        if self._supervisor is not None:
            await asyncio.shield(self._supervisor)
        assert self._outcome is not None
        return self._outcome

    async def cancel(self, grace_s: float = 10) -> Outcome:
        """Stop every process of the job and return the outcome.

        SIGTERM goes to the whole process group, SIGKILL after ``grace_s`` to whatever is
        left; returns once no process of the group is alive. Cancelling a job that has
        already ended returns its outcome unchanged.
        """
        if self._proc is None or self._finished.is_set():
            if not self._started:
                self._started = True
                self._cancelled = True
                self._finish(Outcome(JobState.CANCELLED, "cancelled before start"))
            return await self.wait()
        self._cancelled = True
        pgid = self._proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while await asyncio.to_thread(group_pids, pgid):
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                deadline = float("inf")
            await asyncio.sleep(0.05)
        return await self.wait()
