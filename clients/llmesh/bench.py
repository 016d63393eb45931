"""``llmesh bench``: a serving load generator in the style of ``vllm bench serve``.

One invocation runs the same load (the same prompts, output lengths and concurrency levels)
against up to four ways of serving the same local model, one after another (never two engines
at once):

``asyncllm``
    vLLM v1 ``AsyncLLM`` in this process, driven directly: the limit for anything in front of it.
``mesh-vllm``
    The full mesh: etcd, a control plane and one inference worker, each a child process (the
    servers ``llmesh up`` runs), the model deployed with backend ``vllm``, requests streamed
    with the SDK (``ByzerLLM.async_stream_chat_oai``: route from the control plane's watch
    cache, then a bidi gRPC ``Chat`` stream straight to the worker).
``vllm-serve``
    vLLM's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``) driven
    over HTTP streaming (``/v1/completions``, server-sent events) with aiohttp.
``mesh-transformers``
    The mesh again, with the ``transformers`` engine.

The three vLLM modes get the same engine settings (``max_num_seqs``, ``max_model_len``,
``gpu_memory_utilization``, ``dtype``, eager mode, no per-request logging, no stats logging).

Load: ``--num-requests`` requests per concurrency level, at most ``--concurrency`` in flight,
issued at once or at ``--request-rate`` requests/s with Poisson arrivals (exponential gaps from
a seeded generator). Prompts are synthetic: random token ids from the model's tokenizer (special
tokens excluded), decoded to text and adjusted until the text encodes to exactly
``--input-len`` tokens, ending in a newline (so the mesh's ``empty`` role mapping sends the very
same text as a raw prompt). They depend only on ``--seed``; every mode gets the same ones, and
each concurrency level (and the warm-up) gets its own, so vLLM's prefix cache never serves a
prompt twice within a mode. The engines add BOS, so the prompt is ``input-len + 1`` tokens there.
With ``--ignore-eos`` (the default) every request produces exactly ``--output-len`` tokens.

Metrics, measured the same way in every mode, in this process:

- TTFT: from just before the request is sent (for the mesh: before the SDK call, so route
  lookup and stream set-up count) to the first delta that carries a token.
- ITL: the gaps between consecutive token-carrying deltas, pooled over all requests. A delta
  may carry several tokens (engines and the mesh merge deltas when a consumer lags); tokens are
  counted from token ids (vLLM outputs, the mesh's ``ChatResponse.token_ids``,
  ``return_token_ids`` on the OpenAI server) and the final usage.
- TPOT per request: ``(e2e - ttft) / (output_tokens - 1)``, where e2e runs to the end of the
  stream; requests with fewer than two output tokens have none.
- Output tokens/s and requests/s: completed output tokens (requests) over the wall time of the
  level, from the first send to the last completion.
- CPU: CPU seconds per output token spent by this process (``bench``: the load generator,
  and vLLM's frontend in ``asyncllm`` mode), by vLLM's engine processes (``engine``) and by the
  other servers started here (``server``: the mesh's processes, the OpenAI server), plus how
  many cores the rest of the machine kept busy meanwhile (other load skews every number).

Results go to ``OUT/NAME.json``, ``OUT/NAME.md`` (markdown tables) and ``OUT/NAME.png``
(matplotlib chart, ``pip install 'llmesh[plot]'``). The report prints the mesh's ratios against
in-process ``AsyncLLM`` and against ``vllm serve`` and whether each target is met; it never
fails on a missed target (it is a benchmark, not a test).

Entry points that run this must be guarded by ``if __name__ == "__main__":``: vLLM spawns
processes.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmesh.common.errors import FailedPrecondition, InvalidArgument, LLMeshError, Unavailable
from llmesh.i18n import t as _t

#: Modes in report order, with the label the tables and the chart use.
MODES: dict[str, str] = {
    "asyncllm": "in-process AsyncLLM",
    "mesh-vllm": "mesh (vllm)",
    "vllm-serve": "vllm serve (HTTP)",
    "mesh-transformers": "mesh (transformers)",
}
#: Run order: the two mesh modes share one local mesh, so they run back to back.
_RUN_ORDER = ("asyncllm", "mesh-vllm", "mesh-transformers", "vllm-serve")

#: Defaults for a real machine, and the ``--quick`` preset for smoke runs.
DEFAULTS: dict[str, Any] = {
    "concurrency": [1, 8, 32, 128],
    "num_requests": None,  # per level: max(16, 4 x concurrency)
    "input_len": 512,
    "output_len": 128,
    "warmup": 4,
}
QUICK: dict[str, Any] = {
    "concurrency": [1, 4],
    "num_requests": 4,
    "input_len": 32,
    "output_len": 16,
    "warmup": 1,
}

#: Targets from the issue: (key, description, threshold).
THROUGHPUT_RATIO_TARGET = 0.97  # mesh-vllm / asyncllm output tok/s, at every concurrency
TTFT_P50_ADDED_MS_TARGET = 1.0  # mesh-vllm TTFT p50 - asyncllm TTFT p50, at every concurrency
TTFT_P99_ADDED_MS_TARGET = 5.0  # same for p99
SERVE_RATIO_TARGET = 1.2  # mesh-vllm / vllm-serve output tok/s at SERVE_RATIO_STREAMS
SERVE_RATIO_STREAMS = 32

_BENCH_MODEL = "bench"


# -- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolating linearly between ranks.

    The same definition as ``numpy.percentile``'s default (and ``vllm bench serve``'s).

    Args:
        values: the samples, in any order.
        q: the percentile, from 0 (the minimum) to 100 (the maximum).

    Returns:
        The percentile, or NaN when ``values`` is empty.

    Raises:
        ValueError: ``q`` is outside [0, 100].
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} is outside [0, 100]")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def tpot(e2e: float, ttft: float, output_tokens: int) -> float | None:
    """Time per output token after the first: ``(e2e - ttft) / (output_tokens - 1)``.

    Args:
        e2e: seconds from send to the end of the stream.
        ttft: seconds from send to the first token.
        output_tokens: tokens the request produced.

    Returns:
        Seconds per token, or None when the request produced fewer than two tokens.
    """
    if output_tokens < 2:
        return None
    return (e2e - ttft) / (output_tokens - 1)


@dataclasses.dataclass
class RequestResult:
    """What one streamed request measured (times in seconds from the send)."""

    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = dataclasses.field(default_factory=list)
    deltas: int = 0
    error: str = ""


class StreamClock:
    """Times one request: create it right before sending, call :meth:`delta` per token-carrying
    message, :meth:`finish` at the end of the stream."""

    def __init__(self) -> None:
        self.result = RequestResult()
        self._t0 = time.perf_counter()
        self._last: float | None = None

    def delta(self, tokens: int) -> None:
        """A message with ``tokens`` new tokens arrived now."""
        now = time.perf_counter()
        if self._last is None:
            self.result.ttft = now - self._t0
        else:
            self.result.itls.append(now - self._last)
        self._last = now
        self.result.deltas += 1
        self.result.output_tokens += tokens

    def finish(self, *, output_tokens: int | None = None, prompt_tokens: int = 0) -> RequestResult:
        """The stream ended; ``output_tokens`` from the final usage overrides the delta count."""
        result = self.result
        result.e2e = time.perf_counter() - self._t0
        if output_tokens is not None:
            result.output_tokens = output_tokens
        result.prompt_tokens = prompt_tokens
        result.ok = result.deltas > 0
        if not result.ok:
            result.error = "the stream ended without any token"
        return result

    def fail(self, exc: BaseException) -> RequestResult:
        """The request failed with ``exc``."""
        self.result.e2e = time.perf_counter() - self._t0
        self.result.ok = False
        self.result.error = f"{type(exc).__name__}: {exc}"[:300]
        return self.result


def _ms(values: Sequence[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if math.isnan(value) else 1000 * value


def _mean_ms(values: Sequence[float]) -> float | None:
    return 1000 * sum(values) / len(values) if values else None


def summarize(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    """Aggregate one level's requests into the reported numbers.

    Args:
        results: every request of the level, failed ones included.
        duration: wall seconds from the first send to the last completion.

    Returns:
        A flat dict: counts, ``output_tok_s``, ``requests_s``, and ``{ttft,tpot,itl,e2e}_
        {mean,p50,p99}_ms`` (None where there is no sample), ``tokens_per_delta``, and up to
        three distinct ``errors``.
    """
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    deltas = sum(r.deltas for r in ok)
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for r in ok if (t := tpot(r.e2e, r.ttft, r.output_tokens)) is not None],
        "itl": [gap for r in ok for gap in r.itls],
        "e2e": [r.e2e for r in ok],
    }
    summary: dict[str, Any] = {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "input_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / duration if duration > 0 else 0.0,
        "requests_s": len(ok) / duration if duration > 0 else 0.0,
        "tokens_per_delta": output_tokens / deltas if deltas else None,
    }
    for name, values in series.items():
        summary[f"{name}_mean_ms"] = _mean_ms(values)
        summary[f"{name}_p50_ms"] = _ms(values, 50)
        summary[f"{name}_p99_ms"] = _ms(values, 99)
    summary["errors"] = sorted({r.error for r in results if not r.ok})[:3]
    return summary


# -- load generation ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A synthetic prompt: ``text`` encodes to ``tokens`` tokens (without BOS) and ends in a
    newline; ``mesh_content`` is what the mesh sends so that its ``empty`` role mapping
    renders exactly ``text``."""

    text: str
    tokens: int

    @property
    def mesh_content(self) -> str:
        return self.text[:-1]


def synthetic_prompts(tokenizer: Any, count: int, input_len: int, seed: int) -> list[Prompt]:
    """``count`` prompts of ``input_len`` tokens made of random non-special tokens.

    Random ids are decoded and re-encoded until the text encodes to exactly ``input_len``
    tokens (BPE merges across the random pieces change the count); the few that do not settle
    within 50 rounds keep the closest length found.

    Args:
        tokenizer: the model's HuggingFace tokenizer.
        count: how many prompts.
        input_len: tokens per prompt, without the BOS the engines add.
        seed: the same seed gives the same prompts.
    """
    rng = random.Random(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    # Byte-level BPE has tokens that are parts of a UTF-8 character: alone they decode to U+FFFD,
    # which re-encodes as different tokens and keeps the length from settling.
    vocab = [
        i
        for i in range(len(tokenizer))
        if i not in special and (piece := tokenizer.decode([i])) and "\ufffd" not in piece
    ]
    if not vocab:
        raise InvalidArgument("the model's tokenizer has no ordinary tokens to build prompts from")

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    def as_prompt(ids: Sequence[int]) -> str:
        text = tokenizer.decode(list(ids), skip_special_tokens=True)
        # Leading whitespace is easily lost in a re-encode; a trailing newline is the shape
        # every mode can send verbatim (see Prompt.mesh_content).
        text = text.lstrip()
        return text if text.endswith("\n") else text + "\n"

    prompts: list[Prompt] = []
    for _ in range(count):
        ids = rng.choices(vocab, k=input_len)
        best: tuple[int, str] | None = None
        for _ in range(50):
            text = as_prompt(ids)
            got = encode(text)
            if best is None or abs(len(got) - input_len) < abs(best[0] - input_len):
                best = (len(got), text)
            if len(got) == input_len:
                break
            if len(got) > input_len:
                ids = got[: input_len - 1]
            else:
                ids = got[:-1] + rng.choices(vocab, k=input_len - len(got) + 1)
        assert best is not None
        prompts.append(Prompt(text=best[1], tokens=best[0]))
    return prompts


async def run_level(
    send: Callable[[Prompt, str], Any],
    prompts: Sequence[Prompt],
    *,
    concurrency: int,
    request_rate: float,
    seed: int,
    tag: str,
) -> tuple[list[RequestResult], float]:
    """Issue every prompt through ``send`` with at most ``concurrency`` in flight.

    Requests arrive at once (``request_rate`` infinite) or with exponential gaps of mean
    ``1 / request_rate`` seconds; either way the semaphore caps what is in flight.

    Args:
        send: ``await send(prompt, request_id)`` streams one request and returns its
            :class:`RequestResult` (it catches its own errors).
        prompts: one request per prompt.
        concurrency: streams in flight at most.
        request_rate: requests per second (Poisson), or ``math.inf``.
        seed: seeds the arrival gaps.
        tag: prefix of the request ids.

    Returns:
        The results in prompt order and the wall time from the first send to the last
        completion.
    """
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, prompt: Prompt) -> RequestResult:
        async with gate:
            return await send(prompt, f"{tag}-{i}")

    t0 = time.perf_counter()
    tasks = []
    for i, prompt in enumerate(prompts):
        if i and math.isfinite(request_rate):
            await asyncio.sleep(rng.expovariate(request_rate))
        tasks.append(asyncio.create_task(one(i, prompt)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - t0


# -- settings ----------------------------------------------------------------------------------


@dataclasses.dataclass
class BenchSettings:
    """Everything one run needs, resolved from the command line."""

    model: Path
    model_desc: str
    modes: list[str]
    concurrency: list[int]
    num_requests: dict[int, int]
    request_rate: float
    input_len: int
    output_len: int
    ignore_eos: bool
    seed: int
    warmup: int
    max_num_seqs: int
    max_model_len: int
    gpu_memory_utilization: float
    dtype: str
    enforce_eager: bool
    out: Path
    name: str
    startup_timeout: float
    command: str

    def requests_for(self, concurrency: int) -> int:
        """Requests at one level: from ``--num-requests``, else max(16, 4 x concurrency)."""
        return self.num_requests.get(concurrency) or max(16, 4 * concurrency)

    def vllm_infer_params(self) -> dict[str, str]:
        """infer_params for the mesh's vllm backend that match the in-process engine args."""
        return {
            "max_concurrency": str(max(self.concurrency)),
            "max_num_seqs": str(self.max_num_seqs),
            "max_model_len": str(self.max_model_len),
            "gpu_memory_utilization": str(self.gpu_memory_utilization),
            "dtype": self.dtype,
            "enforce_eager": str(self.enforce_eager).lower(),
        }

    def vllm_engine_kwargs(self) -> dict[str, Any]:
        """AsyncEngineArgs for in-process AsyncLLM: what the mesh's vllm engine builds from
        :meth:`vllm_infer_params` (see ``llmesh.inference_worker.engines.vllm_engine``)."""
        return {
            "model": str(self.model),
            "tokenizer": str(self.model),
            "served_model_name": _BENCH_MODEL,
            "dtype": self.dtype,
            "tensor_parallel_size": 1,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_num_seqs": self.max_num_seqs,
            "max_model_len": self.max_model_len,
            "enable_lora": False,
            "enforce_eager": self.enforce_eager,
            "enable_log_requests": False,
            "disable_log_stats": True,
        }

    def vllm_serve_args(self, port: int) -> list[str]:
        """The OpenAI server's command line with the same engine settings."""
        return [
            *("--model", str(self.model), "--served-model-name", _BENCH_MODEL),
            *("--host", "127.0.0.1", "--port", str(port)),
            *("--dtype", self.dtype, "--tensor-parallel-size", "1"),
            *("--gpu-memory-utilization", str(self.gpu_memory_utilization)),
            *("--max-num-seqs", str(self.max_num_seqs)),
            *("--max-model-len", str(self.max_model_len)),
            "--enforce-eager" if self.enforce_eager else "--no-enforce-eager",
            # Like the mesh: no per-request or periodic stats logging on the serving path.
            "--disable-log-stats",
            "--disable-uvicorn-access-log",
        ]

    def sampling(self) -> dict[str, Any]:
        """The one sampling setup: greedy, exactly ``output_len`` tokens with ignore_eos."""
        return {
            "temperature": 0.0,
            "max_tokens": self.output_len,
            "ignore_eos": self.ignore_eos,
        }


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
        self.model = f"{_BENCH_MODEL}-{engine}"
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

    async def request(self, prompt: Prompt, request_id: str) -> RequestResult:
        payload = {
            "model": _BENCH_MODEL,
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


# -- where the CPU goes ---------------------------------------------------------------------------

#: CPU roles: this process (load generator; in ``asyncllm`` also vLLM's frontend), vLLM's engine
#: processes (EngineCore and its workers), and every other process we started (the mesh's
#: worker, control plane and etcd; the OpenAI server).
CPU_ROLES = ("bench", "server", "engine")


@dataclasses.dataclass
class CpuSnapshot:
    """CPU seconds of this process tree by role, and of the whole machine, at one moment."""

    at: float
    roles: dict[str, float]
    machine_busy: float | None


def cpu_snapshot() -> CpuSnapshot:
    """CPU time used so far by this process and, from /proc, by its descendants and by the
    machine as a whole (descendants zero and machine None where there is no /proc)."""
    now = time.perf_counter()
    roles = dict.fromkeys(CPU_ROLES, 0.0)
    # This process exactly (/proc counts in clock ticks, too coarse for short levels).
    roles["bench"] = time.process_time()
    proc = Path("/proc")
    if not proc.is_dir():
        return CpuSnapshot(now, roles, None)
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    info: dict[int, tuple[str, float]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm, _, rest = stat.partition("(")[2].rpartition(")")
        fields = rest.split()
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        info[pid] = (comm, (int(fields[11]) + int(fields[12])) / tick)
    me = os.getpid()
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    todo = [me]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        if pid not in info:
            continue
        if pid == me:
            continue
        comm, cpu = info[pid]
        roles["engine" if comm.startswith("VLLM::") else "server"] += cpu
    busy = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        values = [int(v) for v in (proc / "stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(values) - values[3] - values[4]) / tick  # all but idle and iowait
    return CpuSnapshot(now, roles, busy)


def cpu_usage(before: CpuSnapshot, after: CpuSnapshot, output_tokens: int) -> dict[str, Any]:
    """CPU spent between two snapshots: seconds and ms per output token by role, and how many
    cores the rest of the machine kept busy meanwhile (other load skews every number).

    A process that exited in between loses its share; none should during a level.
    """
    wall = after.at - before.at
    used = {r: max(0.0, after.roles[r] - before.roles[r]) for r in CPU_ROLES}
    others = None
    if before.machine_busy is not None and after.machine_busy is not None and wall > 0:
        others = max(0.0, (after.machine_busy - before.machine_busy - sum(used.values())) / wall)
    return {
        "cpu_s": used,
        "cpu_ms_per_token": {
            r: (1000 * v / output_tokens if output_tokens else None) for r, v in used.items()
        },
        "other_load_cores": others,
    }


# -- running a mode ------------------------------------------------------------------------------


def _prompt_sets(settings: BenchSettings) -> tuple[list[Prompt], dict[int, list[Prompt]]]:
    """The warm-up prompts and each level's prompts, the same for every mode."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(settings.model))
    warmup = synthetic_prompts(tokenizer, settings.warmup, settings.input_len, settings.seed)
    levels = {
        c: synthetic_prompts(
            tokenizer, settings.requests_for(c), settings.input_len, settings.seed + 1000 * (i + 1)
        )
        for i, c in enumerate(settings.concurrency)
    }
    return warmup, levels


async def _bench_mode(
    backend: Backend,
    settings: BenchSettings,
    warmup: Sequence[Prompt],
    levels: Mapping[int, Sequence[Prompt]],
) -> dict[str, Any]:
    """Start ``backend``, warm it up, run every level, stop it."""
    report: dict[str, Any] = {"levels": {}}
    t0 = time.perf_counter()
    try:
        await _measure(backend, settings, warmup, levels, report, t0)
    except BaseException:
        # Keep the error that stopped the mode, not one from tearing it down.
        with contextlib.suppress(Exception):
            await backend.stop()
        raise
    await backend.stop()
    return report


async def _measure(
    backend: Backend,
    settings: BenchSettings,
    warmup: Sequence[Prompt],
    levels: Mapping[int, Sequence[Prompt]],
    report: dict[str, Any],
    t0: float,
) -> None:
    """Start ``backend``, warm it up and run every level into ``report``."""
    await backend.start()
    report["startup_s"] = time.perf_counter() - t0
    _say(f"{backend.mode}: up in {report['startup_s']:.1f} s")
    if warmup:
        results, _ = await run_level(
            backend.request,
            warmup,
            concurrency=min(len(warmup), max(settings.concurrency)),
            request_rate=math.inf,
            seed=settings.seed,
            tag=f"{backend.mode}-warmup",
        )
        failed = [r.error for r in results if not r.ok]
        if failed:
            raise Unavailable(f"warm-up requests failed: {failed[0]}")
    for concurrency, prompts in levels.items():
        cpu_before = cpu_snapshot()
        results, duration = await run_level(
            backend.request,
            prompts,
            concurrency=concurrency,
            request_rate=settings.request_rate,
            seed=settings.seed + concurrency,
            tag=f"{backend.mode}-c{concurrency}",
        )
        summary = summarize(results, duration)
        summary.update(cpu_usage(cpu_before, cpu_snapshot(), summary["output_tokens"]))
        report["levels"][str(concurrency)] = summary
        _say(_level_line(backend.mode, concurrency, summary))


def _level_line(mode: str, concurrency: int, s: Mapping[str, Any]) -> str:
    line = (
        f"{mode:>17} c={concurrency:<4} {s['output_tok_s']:9.1f} tok/s "
        f"{s['requests_s']:7.2f} req/s  TTFT p50 {_fmt(s['ttft_p50_ms'])} "
        f"p99 {_fmt(s['ttft_p99_ms'])} ms  TPOT p50 {_fmt(s['tpot_p50_ms'])} ms  "
        f"ITL p50 {_fmt(s['itl_p50_ms'])} ms"
    )
    if s["failed"]:
        line += f"  FAILED {s['failed']}/{s['requests']}: {s['errors'][0]}"
    return line


def _say(text: str) -> None:
    print(text, flush=True)


def run_benchmark(settings: BenchSettings) -> dict[str, Any]:
    """Run every selected mode in turn; returns the report (also written to disk).

    A mode that fails to start or dies is recorded with its error and the others still run.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if any(m in settings.modes for m in ("asyncllm", "mesh-vllm", "vllm-serve")):
        # Sets vLLM's logging level and the spawn start method (this process gets gRPC
        # threads in the mesh modes; forking after that is unsafe) before vLLM is imported.
        import llmesh.inference_worker.engines.vllm_engine  # noqa: F401

    warmup, levels = _prompt_sets(settings)
    # Server logs stay out of the results directory (it may be committed); they are kept for
    # a look after a failure, and their place is in the report.
    logs = Path(tempfile.mkdtemp(prefix=f"llmesh-bench-{settings.name}-logs-"))
    _say(f"server logs: {logs}")
    modes: dict[str, Any] = {}
    cluster: MeshCluster | None = None
    try:
        for mode in [m for m in _RUN_ORDER if m in settings.modes]:
            _say(f"== {mode}: {MODES[mode]}")
            try:
                if mode.startswith("mesh-"):
                    if cluster is None:
                        cluster = MeshCluster(settings, logs)
                        cluster.start()
                    backend: Backend = MeshBackend(settings, cluster, mode.removeprefix("mesh-"))
                else:
                    if cluster is not None:  # never two engines (or their idle mesh) at once
                        cluster.stop()
                        cluster = None
                    if mode == "asyncllm":
                        backend = AsyncLLMBackend(settings)
                    else:
                        backend = VLLMServeBackend(settings, logs / "vllm-serve.log")
                modes[mode] = asyncio.run(_bench_mode(backend, settings, warmup, levels))
            except (LLMeshError, OSError, RuntimeError, ImportError, ValueError) as exc:
                message = f"{type(exc).__name__}: {exc}"
                _say(f"{mode} failed: {message}")
                modes[mode] = {"error": message, "levels": {}}
                if mode.startswith("mesh-") and cluster is not None and not _alive(cluster):
                    cluster.stop()
                    cluster = None
    finally:
        if cluster is not None:
            cluster.stop()
    report = {
        "meta": {**_meta(settings, warmup, levels), "logs": str(logs)},
        "modes": modes,
        "targets": evaluate_targets(modes, settings.concurrency),
    }
    write_report(report, settings.out, settings.name)
    return report


def _alive(cluster: MeshCluster) -> bool:
    return all(p is not None and p.poll() is None for p in (cluster.worker, cluster.control_plane))


# -- targets and report --------------------------------------------------------------------------


def _level(modes: Mapping[str, Any], mode: str, concurrency: int) -> Mapping[str, Any] | None:
    level = modes.get(mode, {}).get("levels", {}).get(str(concurrency))
    if not level or not level.get("completed"):
        return None
    return level


def evaluate_targets(modes: Mapping[str, Any], concurrency: Sequence[int]) -> list[dict[str, Any]]:
    """The issue's targets, checked against this run's numbers.

    - mesh-vllm output tok/s >= 0.97 x asyncllm at every concurrency;
    - mesh-vllm TTFT p50 at most 1 ms, p99 at most 5 ms above asyncllm's;
    - mesh-vllm output tok/s >= 1.2 x vllm-serve at 32 streams (at the largest measured
      concurrency when 32 was not measured).

    Returns:
        One dict per check: ``check``, ``streams``, ``value``, ``target`` (text), ``met``
        (None when a mode needed for it is missing).
    """
    checks: list[dict[str, Any]] = []

    def add(check: str, streams: int, value: float | None, target: str, met: bool | None) -> None:
        checks.append(
            {"check": check, "streams": streams, "value": value, "target": target, "met": met}
        )

    for c in concurrency:
        mesh, base = _level(modes, "mesh-vllm", c), _level(modes, "asyncllm", c)
        if mesh is None or base is None:
            for check, target in (
                ("mesh / AsyncLLM output tok/s", f">= {THROUGHPUT_RATIO_TARGET}"),
                ("mesh - AsyncLLM TTFT p50 (ms)", f"<= {TTFT_P50_ADDED_MS_TARGET}"),
                ("mesh - AsyncLLM TTFT p99 (ms)", f"<= {TTFT_P99_ADDED_MS_TARGET}"),
            ):
                add(check, c, None, target, None)
            continue
        ratio = mesh["output_tok_s"] / base["output_tok_s"] if base["output_tok_s"] else None
        add(
            "mesh / AsyncLLM output tok/s",
            c,
            ratio,
            f">= {THROUGHPUT_RATIO_TARGET}",
            None if ratio is None else ratio >= THROUGHPUT_RATIO_TARGET,
        )
        for q, limit in (("p50", TTFT_P50_ADDED_MS_TARGET), ("p99", TTFT_P99_ADDED_MS_TARGET)):
            added = mesh[f"ttft_{q}_ms"] - base[f"ttft_{q}_ms"]
            add(f"mesh - AsyncLLM TTFT {q} (ms)", c, added, f"<= {limit}", added <= limit)
    at = SERVE_RATIO_STREAMS if SERVE_RATIO_STREAMS in concurrency else max(concurrency)
    mesh, serve = _level(modes, "mesh-vllm", at), _level(modes, "vllm-serve", at)
    ratio = (
        mesh["output_tok_s"] / serve["output_tok_s"]
        if mesh is not None and serve is not None and serve["output_tok_s"]
        else None
    )
    add(
        "mesh / vllm serve output tok/s",
        at,
        ratio,
        f">= {SERVE_RATIO_TARGET}",
        None if ratio is None else ratio >= SERVE_RATIO_TARGET,
    )
    return checks


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[met]


def markdown_report(report: Mapping[str, Any]) -> str:
    """The results and target checks as markdown tables (what the README shows)."""
    meta = report["meta"]
    lines = [
        f"Model: {meta['model']}. Load: {meta['load']}.",
        f"Machine: {meta['machine']}.",
        "",
        "| streams | mode | output tok/s | req/s | TTFT p50 (ms) | TTFT p99 (ms) "
        "| TPOT p50 (ms) | ITL p50 (ms) | ITL p99 (ms) | failed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in meta["concurrency"]:
        for mode, label in MODES.items():
            data = report["modes"].get(mode)
            if data is None:
                continue
            s = data.get("levels", {}).get(str(c))
            if s is None:
                lines.append(f"| {c} | {label} | failed: {data.get('error', '?')[:80]} |||||||")
                continue
            lines.append(
                f"| {c} | {label} | {s['output_tok_s']:.1f} | {s['requests_s']:.2f} "
                f"| {_fmt(s['ttft_p50_ms'])} | {_fmt(s['ttft_p99_ms'])} "
                f"| {_fmt(s['tpot_p50_ms'], 2)} | {_fmt(s['itl_p50_ms'], 2)} "
                f"| {_fmt(s['itl_p99_ms'], 2)} | {s['failed']}/{s['requests']} |"
            )
    lines += _cpu_table(report)
    lines += ["", "| target | streams | measured | target | met |", "|---|---:|---:|---|---|"]
    for t in report["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:+.2f}"
        if t["value"] is not None and "/" in t["check"]:
            value = f"{t['value']:.3f}"
        lines.append(
            f"| {t['check']} | {t['streams']} | {value} | {t['target']} | {_met(t['met'])} |"
        )
    return "\n".join(lines) + "\n"


def _cpu_table(report: Mapping[str, Any]) -> list[str]:
    """CPU ms per output token by role, and the machine's other load, per level and mode."""
    rows = []
    for c in report["meta"]["concurrency"]:
        for mode, label in MODES.items():
            s = report["modes"].get(mode, {}).get("levels", {}).get(str(c))
            per = (s or {}).get("cpu_ms_per_token")
            if not per or None in per.values():
                continue
            cells = " | ".join(f"{per[r]:.3f}" for r in CPU_ROLES)
            rows.append(
                f"| {c} | {label} | {cells} | {sum(per.values()):.3f} "
                f"| {_fmt(s.get('other_load_cores'), 2)} |"
            )
    if not rows:
        return []
    return [
        "",
        "CPU ms per output token: bench = the load generator (with vLLM's frontend in "
        "AsyncLLM mode); server = the mesh's processes or the OpenAI server; engine = vLLM's "
        "EngineCore and workers. Other load = cores kept busy by other processes meanwhile.",
        "",
        "| streams | mode | bench | server | engine | total | other load (cores) |",
        "|---:|---|---:|---:|---:|---:|---:|",
        *rows,
    ]


def write_chart(report: Mapping[str, Any], path: Path) -> bool:
    """Output tok/s, TTFT p50 and TPOT p50 against concurrency, one line per mode.

    Returns:
        False (and prints why) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogFormatter
    except ImportError:
        _say("matplotlib is not installed, so no chart: pip install 'llmesh[plot]'")
        return False
    panels = (
        ("output_tok_s", "output tokens/s", False),
        ("ttft_p50_ms", "TTFT p50 (ms)", True),
        ("tpot_p50_ms", "TPOT p50 (ms)", True),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    for ax, (key, title, log_y) in zip(axes, panels, strict=True):
        for mode, label in MODES.items():
            levels = report["modes"].get(mode, {}).get("levels", {})
            points = [(int(c), s[key]) for c, s in levels.items() if s.get(key) is not None]
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
            # Plain numbers (20, not 2x10^1); minor ticks labelled only on short ranges.
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.yaxis.set_minor_formatter(
                LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4))
            )
        ax.set_xticks(
            report["meta"]["concurrency"], [str(c) for c in report["meta"]["concurrency"]]
        )
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"llmesh bench: {report['meta']['model']}; {report['meta']['load']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(report: Mapping[str, Any], out: Path, name: str) -> None:
    """Write NAME.json, NAME.md and NAME.png into ``out`` and print the tables and verdicts."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_report(report)
    (out / f"{name}.md").write_text(table)
    write_chart(report, out / f"{name}.png")
    _say("")
    _say(table)
    for t in report["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        _say(f"{t['check']} at {t['streams']} streams: {value} (target {t['target']}): {verdict}")
    _say(f"results: {out / name}.{{json,md,png}}")


# -- environment ---------------------------------------------------------------------------------


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 2**20:.0f} GiB RAM"
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = "no GPU"
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{cores} cores {cpu}{mem}, {gpu}, {platform.system()} {platform.release()}"


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("vllm", "torch", "transformers", "grpc", "aiohttp"):
        with contextlib.suppress(Exception):
            module = __import__(name)
            versions[name] = str(getattr(module, "__version__", "?"))
    with contextlib.suppress(Exception):
        from llmesh import __version__

        versions["llmesh"] = __version__
    return versions


def _meta(
    settings: BenchSettings, warmup: Sequence[Prompt], levels: Mapping[int, Sequence[Prompt]]
) -> dict[str, Any]:
    tokens = [p.tokens for ps in levels.values() for p in ps]
    rate = "all at once" if math.isinf(settings.request_rate) else f"{settings.request_rate}/s"
    per_level = ", ".join(f"{c}: {len(p)}" for c, p in levels.items())
    return {
        "model": settings.model_desc,
        "model_path": str(settings.model),
        "load": (
            f"prompts {settings.input_len} tokens (+BOS), outputs {settings.output_len} tokens"
            f"{' (ignore_eos)' if settings.ignore_eos else ''}, requests per level {per_level}, "
            f"arrivals {rate}"
        ),
        "machine": _machine(),
        "versions": _versions(),
        "command": settings.command,
        "concurrency": settings.concurrency,
        "num_requests": {str(c): len(p) for c, p in levels.items()},
        "warmup_requests": len(warmup),
        "input_len": settings.input_len,
        "prompt_tokens_exact": sum(t == settings.input_len for t in tokens),
        "prompt_tokens_total": len(tokens),
        "output_len": settings.output_len,
        "ignore_eos": settings.ignore_eos,
        "request_rate": None if math.isinf(settings.request_rate) else settings.request_rate,
        "seed": settings.seed,
        "vllm": {
            "max_num_seqs": settings.max_num_seqs,
            "max_model_len": settings.max_model_len,
            "gpu_memory_utilization": settings.gpu_memory_utilization,
            "dtype": settings.dtype,
            "enforce_eager": settings.enforce_eager,
        },
        "modes": {m: MODES[m] for m in settings.modes},
    }


# -- models --------------------------------------------------------------------------------------


def _cache_dir(given: str | None) -> Path:
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmesh" / "bench"


def bench_model(preset: str, cache: Path) -> tuple[Path, str]:
    """Build (once, cached) the preset model; returns its path and a description.

    ``tiny`` is the llmesh test model (Llama, 2 layers, hidden 128, trained a little on a toy
    corpus). ``small`` is a random Llama with the test model's tokenizer, 8 layers, hidden 1024
    (about 100M parameters): enough work per token that engine time, not Python overhead,
    dominates on a CPU.
    """
    from llmesh.testing import make_test_model

    base = make_test_model(cache / "tiny-llama")
    if preset == "tiny":
        return base, "llmesh test model (Llama, 2 layers, hidden 128, vocab 1.5k)"
    out = cache / "small-llama"
    desc = "random Llama, 8 layers, hidden 1024, head_dim 128 (~100M parameters, float32)"
    if (out / "config.json").exists():
        return out, desc
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(base)
    config.update(
        {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "torch_dtype": "float32",
        }
    )
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix=".small-llama-", dir=cache))
    LlamaForCausalLM(config).save_pretrained(tmp)
    for f in base.iterdir():  # tokenizer, chat template, generation config
        if (
            f.is_file()
            and f.name not in ("config.json", "model.safetensors")
            and (not f.name.startswith("."))
        ):
            shutil.copy(f, tmp / f.name)
    os.replace(tmp, out)
    return out, desc


def _model_max_len(model: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((model / "config.json").read_text())
        value = config.get("max_position_embeddings")
        return int(value) if value else None
    return None


# -- command line --------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    if text.strip() == "0":
        return 0
    return _positive_int(text)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected requests per second or 'inf', got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0 (or inf), got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser`` (``llmesh bench`` and benchmarks/serving.py)."""
    p = parser.add_argument
    p(
        "--model",
        default=None,
        metavar="PATH",
        help=_t(
            "local HuggingFace-layout model directory (default: build --model-preset)",
            "本地 HuggingFace 格式的模型目录（默认：构建 --model-preset 指定的模型）",
        ),
    )
    p(
        "--model-preset",
        choices=("tiny", "small"),
        default="tiny",
        help=_t(
            "model to build when --model is not given: tiny = the llmesh test model, "
            "small = a random 8-layer Llama (~100M parameters) (default: %(default)s)",
            "未给 --model 时构建的模型：tiny = llmesh 测试模型，small = 随机初始化的 8 层 "
            "Llama（约 1 亿参数）（默认：%(default)s）",
        ),
    )
    p(
        "--cache-dir",
        default=None,
        help=_t(
            "where preset models are built (default: ~/.cache/llmesh/bench)",
            "构建预设模型的目录（默认：~/.cache/llmesh/bench）",
        ),
    )
    p(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=None,
        metavar="MODE",
        help=_t(
            "what to measure (default: all): " + ", ".join(f"{k} = {v}" for k, v in MODES.items()),
            "要测的方式（默认：全部）：asyncllm = 进程内 AsyncLLM，mesh-vllm = 网格（vllm），"
            "vllm-serve = vLLM 自带的 OpenAI 服务（HTTP），"
            "mesh-transformers = 网格（transformers）",
        ),
    )
    p(
        "--concurrency",
        nargs="+",
        type=_positive_int,
        default=None,
        metavar="N",
        help=_t(
            "concurrent streams, one level each (default: 1 8 32 128; --quick: 1 4)",
            "并发流数，每个值测一轮（默认：1 8 32 128；--quick：1 4）",
        ),
    )
    p(
        "--num-requests",
        nargs="+",
        type=_positive_int,
        default=None,
        metavar="N",
        help=_t(
            "requests per level: one count for all, or one per --concurrency value "
            "(default: max(16, 4 x concurrency); --quick: 4)",
            "每轮的请求数：一个值用于所有轮，或按 --concurrency 逐个给出"
            "（默认：max(16, 4 x 并发数)；--quick：4）",
        ),
    )
    p(
        "--request-rate",
        type=_rate,
        default=math.inf,
        help=_t(
            "requests per second with Poisson arrivals, or inf to send all at once (default: inf)",
            "每秒请求数（泊松到达），inf 表示一次全部发出（默认：inf）",
        ),
    )
    p(
        "--input-len",
        type=_positive_int,
        default=None,
        help=_t(
            "prompt length in tokens (default: 512; --quick: 32)",
            "提示词长度（token 数）（默认：512；--quick：32）",
        ),
    )
    p(
        "--output-len",
        type=_positive_int,
        default=None,
        help=_t(
            "tokens to generate per request (default: 128; --quick: 16)",
            "每个请求生成的 token 数（默认：128；--quick：16）",
        ),
    )
    p(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=_t(
            "keep generating past EOS so every request yields --output-len tokens (default: on)",
            "遇到 EOS 也继续生成，使每个请求都生成 --output-len 个 token（默认：开）",
        ),
    )
    p(
        "--seed",
        type=int,
        default=0,
        help=_t(
            "seed of prompts and arrivals (default: 0)", "提示词和到达时间的随机种子（默认：0）"
        ),
    )
    p(
        "--warmup",
        type=_non_negative_int,
        default=None,
        help=_t(
            "warm-up requests per mode, not measured (default: 4; --quick: 1)",
            "每种方式的预热请求数，不计入结果（默认：4；--quick：1）",
        ),
    )
    p(
        "--max-num-seqs",
        type=_positive_int,
        default=None,
        help=_t(
            "vLLM batch size (default: the largest --concurrency)",
            "vLLM 的批大小（默认：最大的 --concurrency）",
        ),
    )
    p(
        "--max-model-len",
        type=_positive_int,
        default=None,
        help=_t(
            "context length given to every engine (default: input + output + 16, "
            "at most the model's)",
            "每个引擎的上下文长度（默认：输入 + 输出 + 16，不超过模型自身的）",
        ),
    )
    p(
        "--gpu-memory-utilization",
        type=_fraction,
        default=None,
        help=_t(
            "vLLM memory fraction (host memory on the CPU build) (default: 0.9 GPU, 0.2 CPU)",
            "vLLM 可用的内存比例（CPU 版本指主机内存）（默认：GPU 0.9，CPU 0.2）",
        ),
    )
    p(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16"),
        help=_t("model dtype for every engine (default: auto)", "所有引擎的模型精度（默认：auto）"),
    )
    p(
        "--out",
        default="bench-results",
        help=_t(
            "directory for NAME.json, NAME.md and NAME.png (default: %(default)s)",
            "写入 NAME.json、NAME.md 和 NAME.png 的目录（默认：%(default)s）",
        ),
    )
    p(
        "--name",
        default="serving",
        help=_t(
            "file name stem of the results (default: %(default)s)",
            "结果文件名（默认：%(default)s）",
        ),
    )
    p(
        "--startup-timeout",
        type=float,
        default=600.0,
        help=_t(
            "seconds an engine or server may take to come up (default: %(default)s)",
            "引擎或服务启动的最长等待秒数（默认：%(default)s）",
        ),
    )
    p(
        "--quick",
        action="store_true",
        help=_t(
            "smoke-run preset: concurrency 1 4, 4 requests per level, 32-token prompts, "
            "16-token outputs, 1 warm-up request (explicit options still win)",
            "冒烟测试预设：并发 1 4，每轮 4 个请求，32 token 提示词，16 token 输出，"
            "1 个预热请求（显式给出的选项优先）",
        ),
    )


def settings_from_args(
    args: argparse.Namespace, argv: Sequence[str] | None = None, prog: str = "llmesh bench"
) -> BenchSettings:
    """Resolve the options (explicit > ``--quick`` > defaults), build or check the model.

    ``argv`` and ``prog`` are only recorded (the command line in the report); ``argv`` defaults
    to this process's arguments after the ``bench`` subcommand.

    Raises:
        InvalidArgument: a model directory that is not one, or lengths that do not fit the
            context.
    """
    preset = QUICK if args.quick else DEFAULTS
    if argv is None:
        argv = sys.argv[1:]
        if "bench" in argv:
            argv = argv[argv.index("bench") + 1 :]

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return preset[name] if value is None else value

    given_concurrency = list(pick("concurrency"))
    if len(set(given_concurrency)) != len(given_concurrency):
        raise InvalidArgument(
            f"--concurrency {' '.join(map(str, given_concurrency))} repeats a value; "
            "give each level once"
        )
    num_requests = _requests_per_level(pick("num_requests"), given_concurrency)
    concurrency = sorted(given_concurrency)
    input_len, output_len = int(pick("input_len")), int(pick("output_len"))
    if args.model:
        model = Path(args.model).expanduser().resolve()
        if not (model / "config.json").is_file():
            raise InvalidArgument(
                f"--model {args.model} is not a model directory (no config.json there); give a "
                "local HuggingFace-layout directory, or leave --model out to build the test model"
            )
        desc = model.name
    else:
        model, desc = bench_model(args.model_preset, _cache_dir(args.cache_dir))
    limit = _model_max_len(model)
    need = input_len + output_len + 1  # + BOS
    max_model_len = args.max_model_len or (min(need + 15, limit) if limit else need + 15)
    if need > max_model_len or (limit and need > limit):
        raise InvalidArgument(
            f"--input-len {input_len} + --output-len {output_len} + BOS needs {need} tokens of "
            f"context, more than {min(max_model_len, limit or max_model_len)}; shorten them"
            + ("" if args.max_model_len is None else " or raise --max-model-len")
        )
    cuda = _cuda()
    gpu_mem = args.gpu_memory_utilization or (0.9 if cuda else 0.2)
    modes = [m for m in MODES if m in (args.modes or list(MODES))]
    return BenchSettings(
        model=model,
        model_desc=desc,
        modes=modes,
        concurrency=concurrency,
        num_requests=num_requests,
        request_rate=args.request_rate,
        input_len=input_len,
        output_len=output_len,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
        warmup=int(pick("warmup")),
        max_num_seqs=args.max_num_seqs or max(concurrency),
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_mem,
        dtype=args.dtype,
        # As the mesh's vllm engine decides it: eager on CPU (compiling costs minutes there).
        enforce_eager=not cuda,
        out=Path(args.out).expanduser(),
        name=args.name,
        startup_timeout=args.startup_timeout,
        command=shlex.join([*prog.split(), *argv]),
    )


def _requests_per_level(given: int | list[int] | None, concurrency: list[int]) -> dict[int, int]:
    """``--num-requests``: nothing (the default rule), one count for all levels, or one count
    per ``--concurrency`` value in the order given."""
    if given is None:
        return {}
    counts = [given] if isinstance(given, int) else list(given)
    if len(counts) == 1:
        return dict.fromkeys(concurrency, counts[0])
    if len(counts) != len(concurrency):
        raise InvalidArgument(
            f"--num-requests has {len(counts)} values for {len(concurrency)} --concurrency "
            "levels; give one count for all levels or one per level"
        )
    return dict(zip(concurrency, counts, strict=True))


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed ``args`` (``llmesh bench``'s handler).

    Returns:
        0 when every mode ran, 1 when one failed (its error is in the report). Missed targets
        do not change it.
    """
    settings = settings_from_args(
        args, getattr(args, "bench_argv", None), getattr(args, "bench_prog", "llmesh bench")
    )
    report = run_benchmark(settings)
    failed = [m for m, d in report["modes"].items() if d.get("error")]
    if failed:
        print(f"error: mode(s) {', '.join(failed)} failed; see the report", file=sys.stderr)
        return 1
    return 0


def build_parser(prog: str = "llmesh bench") -> argparse.ArgumentParser:
    """The benchmark's own parser (for ``main``)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "llmesh bench",
    default_out: str | None = None,
) -> int:
    """Run ``llmesh bench`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Args:
        argv: the options.
        prog: the command's name in usage lines and in the report.
        default_out: a different default for ``--out``.
    """
    parser = build_parser(prog)
    if default_out is not None:
        parser.set_defaults(out=default_out)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    args.bench_argv, args.bench_prog = argv, prog
    try:
        return run(args)
    except LLMeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
