"""The ways of serving the model under test, one :class:`Backend` each: vLLM's ``AsyncLLM`` in
this process, the mesh (a local etcd, control plane and inference worker as child processes,
with the vllm or transformers engine), and vLLM's OpenAI server over HTTP; plus starting and
stopping their child processes."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmesh.bench.load_generator import Prompt, RequestResult, StreamClock
from llmesh.bench.settings import BENCH_MODEL, BenchSettings
from llmesh.common.errors import FailedPrecondition, LLMeshError, Unavailable

# -- the backends under test ---------------------------------------------------------------------


class Backend(abc.ABC):
    """One way of serving the model: start, stream requests, stop."""

    mode = ""

    @abc.abstractmethod
    async def start(self) -> None:
        """Bring the engine up (model loaded, ready for requests)."""

    @abc.abstractmethod
    async def request(self, prompt: Prompt, request_id: str) -> RequestResult:
        """Stream one request and time it (errors are returned in the result, not raised)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Shut the engine down."""


class AsyncLLMBackend(Backend):
    """vLLM's ``AsyncLLM`` in this process, called directly: the baseline."""

    mode = "asyncllm"

    def __init__(self, settings: BenchSettings) -> None:
        self.settings = settings
        self.engine: Any = None
        self.params: Any = None

    async def start(self) -> None:
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        from llmesh.inference_worker.engines.vllm_engine import _engine_args

        args = _engine_args(AsyncEngineArgs, self.settings.vllm_engine_kwargs())
        self.engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        # The same SamplingParams the mesh's vllm engine builds for these settings.
        self.params = SamplingParams(
            n=1,
            **self.settings.sampling(),
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True,
        )

    async def request(self, prompt: Prompt, request_id: str) -> RequestResult:
        clock = StreamClock()
        prompt_tokens = 0
        try:
            async for out in self.engine.generate(prompt.text, self.params, request_id):
                if out.prompt_token_ids and not prompt_tokens:
                    prompt_tokens = len(out.prompt_token_ids)
                seq = out.outputs[0] if out.outputs else None
                if seq is not None and (seq.token_ids or seq.text):
                    clock.delta(len(seq.token_ids))
        except Exception as exc:  # noqa: BLE001 - a benchmark records failures, then goes on
            return clock.fail(exc)
        return clock.finish(prompt_tokens=prompt_tokens)

    async def stop(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)


class MeshCluster:
    """A local mesh for the mesh modes: etcd, a control plane and one inference worker, each a
    child process (the same servers ``llmesh up`` runs), plus an SDK client. The mesh modes
    deploy their model on it one after another.

    Unlike ``llmesh up``, the servers stay in this process's session (see :func:`_spawn`).
    """

    def __init__(self, settings: BenchSettings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.etcd: Any = None
        self.control_plane: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.llm: Any = None
        self.address = ""

    def start(self) -> None:
        from llmesh.client import ByzerLLM
        from llmesh.common.local_etcd import LocalEtcd
        from llmesh.common.process import free_port, guarded

        self.etcd = LocalEtcd(self.logs / "etcd")
        self.etcd.start()
        self.address = f"127.0.0.1:{free_port()}"
        mesh = [sys.executable, "-m", "llmesh"]
        self.control_plane = _spawn(
            guarded(
                [*mesh, "control-plane", "--listen", self.address, "--etcd", self.etcd.endpoint]
            ),
            self.logs / "control-plane.log",
        )
        self.worker = _spawn(
            guarded(
                [
                    *mesh,
                    "inference-worker",
                    *("--etcd", self.etcd.endpoint, "--listen", "127.0.0.1:0"),
                    # Names this run's worker (the e2e test looks for leftovers by it).
                    *("--worker-id", f"bench-{os.getpid()}"),
                ]
            ),
            self.logs / "inference-worker.log",
        )
        self.llm = ByzerLLM(control_plane=self.address)
        children = {
            "control plane": (self.control_plane, self.logs / "control-plane.log"),
            "worker": (self.worker, self.logs / "inference-worker.log"),
        }
        deadline = time.monotonic() + self.settings.startup_timeout
        while True:
            for name, (proc, log) in children.items():
                if proc.poll() is not None:
                    raise FailedPrecondition(
                        f"the mesh's {name} exited with code {proc.returncode} while starting:"
                        f"\n{_tail(log)}"
                    )
            with contextlib.suppress(LLMeshError):
                if self.llm.list_workers():
                    return
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"the mesh's worker did not register within "
                    f"{self.settings.startup_timeout:.0f} s:\n{_tail(children['worker'][1])}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        if self.llm is not None:
            with contextlib.suppress(Exception):
                self.llm.close()
            self.llm = None
        # The order `llmesh up` stops in: the worker drains (and stops its vLLM engine), then
        # the control plane, then etcd.
        _stop_process(self.worker, signal.SIGTERM, grace=60)
        _stop_process(self.control_plane, signal.SIGTERM, grace=30)
        self.worker = self.control_plane = None
        if self.etcd is not None:
            self.etcd.stop()
            self.etcd = None


class MeshBackend(Backend):
    """The model deployed on the mesh, streamed through the SDK's grpc.aio path."""

    def __init__(self, settings: BenchSettings, cluster: MeshCluster, engine: str) -> None:
        self.settings = settings
        self.cluster = cluster
        self.engine = engine
        self.mode = f"mesh-{engine}"
        self.model = f"{BENCH_MODEL}-{engine}"
        self.config = settings.sampling()

    async def start(self) -> None:
        from llmesh.templates import EMPTY_ROLE_MAPPING, render_with_role_mapping

        # The raw-prompt path: Prompt.text must reach the engine verbatim in every mode.
        probe = Prompt("a b\n", 0)
        rendered = render_with_role_mapping(
            [{"role": "user", "content": probe.mesh_content}], EMPTY_ROLE_MAPPING
        )
        if rendered != probe.text:
            raise FailedPrecondition(
                f"the SDK's empty role mapping renders {rendered!r} for {probe.text!r}; the mesh "
                "would not get the same prompt text as the other modes"
            )
        self.role_mapping = EMPTY_ROLE_MAPPING
        if self.engine == "vllm":
            params = self.settings.vllm_infer_params()
        else:
            params = {
                "max_concurrency": str(max(self.settings.concurrency)),
                "max_model_len": str(self.settings.max_model_len),
            }
            if self.settings.dtype != "auto":  # else the engine's default (float32 on CPU)
                params["dtype"] = self.settings.dtype
        llm = self.cluster.llm
        await asyncio.to_thread(
            lambda: llm.setup_infer_backend(self.engine).deploy(
                str(self.settings.model),
                "custom/auto",
                self.model,
                params,
                wait=True,
                timeout=self.settings.startup_timeout,
            )
        )

    async def request(self, prompt: Prompt, request_id: str) -> RequestResult:
        clock = StreamClock()
        seen = 0
        meta: Mapping[str, Any] = {}
        stream = self.cluster.llm.async_stream_chat_oai(
            [{"role": "user", "content": prompt.mesh_content}],
            role_mapping=self.role_mapping,
            model=self.model,
            llm_config={**self.config, "request_id": request_id},
        )
        try:
            async for _text, meta in stream:
                count = int(meta.get("generated_tokens_count") or 0)
                if count > seen:
                    clock.delta(count - seen)
                    seen = count
        except Exception as exc:  # noqa: BLE001 - a benchmark records failures, then goes on
            return clock.fail(exc)
        return clock.finish(
            output_tokens=int(meta.get("generated_tokens_count") or seen),
            prompt_tokens=int(meta.get("input_tokens_count") or 0),
        )

    async def stop(self) -> None:
        llm = self.cluster.llm
        await llm.aclose_async_channels()
        await asyncio.to_thread(llm.undeploy, self.model, wait=True, timeout=120.0)


class VLLMServeBackend(Backend):
    """vLLM's OpenAI-compatible server in a child process, streamed over HTTP."""

    mode = "vllm-serve"

    def __init__(self, settings: BenchSettings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: Any = None
        self.url = ""

    async def start(self) -> None:
        import aiohttp

        from llmesh.common.process import free_port, guarded

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            *self.settings.vllm_serve_args(port),
        ]
        self.proc = _spawn(guarded(cmd), self.log_path)
        deadline = time.monotonic() + self.settings.startup_timeout
        while not await asyncio.to_thread(_http_ok, f"{base}/health"):
            if self.proc.poll() is not None:
                raise FailedPrecondition(
                    f"the vLLM OpenAI server exited with code {self.proc.returncode} while "
                    f"starting:\n{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"the vLLM OpenAI server was not healthy within "
                    f"{self.settings.startup_timeout:.0f} s:\n{_tail(self.log_path)}"
                )
            await asyncio.sleep(0.5)
        self.url = f"{base}/v1/completions"
        # No pool limit: the load generator's semaphore is the only cap, as in the other modes.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        )

    #: The model name requests carry.
    served_model = BENCH_MODEL

    async def request(self, prompt: Prompt, request_id: str) -> RequestResult:
        payload = {
            "model": self.served_model,
            "prompt": prompt.text,
            **self.settings.sampling(),
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        headers = {"X-Request-Id": request_id}
        clock = StreamClock()
        usage: Mapping[str, Any] = {}
        try:
            async with self.session.post(self.url, json=payload, headers=headers) as resp:
                if resp.status != 200:
                    body = (await resp.text())[:300]
                    raise Unavailable(f"HTTP {resp.status}: {body}")
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        ids = choice.get("token_ids") or ()
                        if ids or choice.get("text"):
                            clock.delta(len(ids))
        except Exception as exc:  # noqa: BLE001 - a benchmark records failures, then goes on
            return clock.fail(exc)
        completion = usage.get("completion_tokens")
        return clock.finish(
            output_tokens=None if completion is None else int(completion),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
        )

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        await asyncio.to_thread(_stop_process, self.proc, signal.SIGTERM, 60)
        self.proc = None


class GatewayBackend(VLLMServeBackend):
    """The mesh's OpenAI-compatible gateway (a child ``llmesh gateway``) in front of the model
    deployed on the mesh with the vllm engine, driven by the very load generator (HTTP
    ``/v1/completions``, SSE, ``return_token_ids``) that drives ``vllm serve``."""

    mode = "gateway"
    served_model = f"{BENCH_MODEL}-vllm"

    def __init__(self, settings: BenchSettings, cluster: MeshCluster, log_path: Path) -> None:
        super().__init__(settings, log_path)
        self.deployment = MeshBackend(settings, cluster, "vllm")
        self.cluster = cluster

    async def start(self) -> None:
        import aiohttp

        from llmesh.common.process import free_port, guarded

        await self.deployment.start()
        base = f"http://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "llmesh", "gateway", "--control-plane"]
        cmd += [self.cluster.address, "--listen", base.removeprefix("http://")]
        self.proc = _spawn(guarded(cmd), self.log_path)
        deadline = time.monotonic() + self.settings.startup_timeout
        while not await asyncio.to_thread(_http_ok, f"{base}/health"):
            if self.proc.poll() is not None:
                raise FailedPrecondition(
                    f"the gateway exited with code {self.proc.returncode} while starting:"
                    f"\n{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise Unavailable(f"the gateway was not healthy in time:\n{_tail(self.log_path)}")
            await asyncio.sleep(0.2)
        self.url = f"{base}/v1/completions"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        )

    async def stop(self) -> None:
        await super().stop()
        await self.deployment.stop()


# -- child processes ---------------------------------------------------------------------------


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a server child with its output in ``log_path``, in its own process group.

    Not in its own session (``llmesh up`` starts its workers with one): with the kernel's
    autogroup scheduling every session is a separate CPU group, and on a small CPU machine
    the vLLM engine's busy-waiting processes then starve the server process in their group,
    which delivers a whole stream at once at the end. Keeping every child in our session puts
    all modes under the same scheduling as in-process AsyncLLM, whose engine shares our group.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    # A process group of its own: a terminal's Ctrl-C reaches only us, and stopping the group
    # also stops vLLM's engine processes (Python 3.11+; earlier, the child alone).
    group: dict[str, Any] = {"process_group": 0} if sys.version_info >= (3, 11) else {}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, **group
        )


def _stop_process(proc: subprocess.Popen[bytes] | None, sig: int, grace: float) -> None:
    """Signal a child (and its process group), then SIGKILL them after ``grace`` seconds."""
    if proc is None:
        return
    own_group = _pgid(proc.pid) == proc.pid
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if own_group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    # Grandchildren (vLLM's engine processes) may outlive their parent.
    if own_group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(_read(path).splitlines()[-lines:]) + f"\n(full log: {path})"


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError):
        return False
