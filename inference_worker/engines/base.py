"""The engine seam: one async interface in front of every inference library.

The inference servicer knows only :class:`Engine`. Engines raise ``llmesh.errors`` exceptions
(or ``ValueError`` for bad input); the servicer translates them to gRPC statuses.
"""

from __future__ import annotations

import abc
import asyncio
import math
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from llmesh.common.backends import DEFAULT_MAX_CONCURRENCY, check_infer_params
from llmesh.common.errors import InvalidArgument, Unimplemented

T = TypeVar("T")

# transformers builds models on the "meta" device by patching torch globally while it loads, so
# two loads in one process at once corrupt each other ("Cannot copy out of meta tensor").
# Every engine loads through load_model(), one at a time per process.
_MODEL_LOAD_LOCK = threading.Lock()


def _locked(fn: Callable[..., T], *args: Any) -> T:
    with _MODEL_LOAD_LOCK:
        return fn(*args)


def prompt_room(n_prompt: int, max_model_len: int, model_name: str) -> int:
    """Tokens left for generation after a prompt, or InvalidArgument when there are none."""
    if n_prompt == 0:
        raise InvalidArgument("the prompt is empty and the tokenizer adds no BOS; give text")
    room = max_model_len - n_prompt
    if room < 1:
        raise InvalidArgument(
            f"prompt has {n_prompt} tokens but model {model_name} accepts at most "
            f"{max_model_len - 1} (context {max_model_len}, with room for at least one "
            "generated token); shorten it or lower the history you send"
        )
    return room


async def load_model(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking model-loading function in a thread, one load per process at a time."""
    return await asyncio.to_thread(_locked, fn, *args)


@dataclass
class StructuredOutput:
    """A shape the output must have, enforced while decoding (StructuredOutput in common.proto).

    Exactly one field is set: ``json_schema`` (JSON Schema as JSON text), ``regex`` (the whole
    output matches it) or ``choice`` (the output is exactly one of the strings). Engines
    validate it and raise ``InvalidArgument`` naming the offending field.
    """

    json_schema: str = ""
    regex: str = ""
    choice: list[str] = field(default_factory=list)


@dataclass
class SamplingParams:
    """Generation parameters with engine defaults applied (see GenerationParams in common.proto)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    repetition_penalty: float = 1.0
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    structured_output: StructuredOutput | None = None
    # Name of a LoRA adapter loaded with Engine.add_lora; None decodes with the base model.
    lora: str | None = None
    # Token ids another replica generated before it was lost (ChatStart.resume_token_ids):
    # the engine continues after them as if it had generated them itself.
    resume_token_ids: list[int] = field(default_factory=list)


def check_sampling_params(params: SamplingParams, *, vocab_size: int) -> bool:
    """Refuse sampling parameters out of GenerationParams' ranges; returns ``extra.ignore_eos``.

    Args:
        params: The request's parameters with engine defaults applied.
        vocab_size: The model's vocabulary size, bounding ``stop_token_ids``.

    Raises:
        InvalidArgument: naming the first bad field, its value and the accepted range.
    """

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
        if not 0 <= tid < vocab_size:
            raise bad("stop_token_ids", tid, f"token ids are in [0, {vocab_size})")
    if params.seed is not None and not -(2**63) <= int(params.seed) < 2**64:
        raise bad("seed", params.seed, "it must fit in 64 bits")
    ignore_eos = params.extra.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("extra.ignore_eos", ignore_eos, "it must be true or false")
    return ignore_eos


@dataclass
class GenerationChunk:
    """What an engine yields while generating.

    Intermediate chunks carry new text (``delta``, possibly several tokens merged) and their
    token ids. The last chunk has ``finish_reason`` set ("stop", "length", "stop_string" or
    "aborted") and the token counts.
    """

    delta: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class ModelMeta:
    """What GetModelMeta reports."""

    backend: str
    architectures: list[str] = field(default_factory=list)
    max_model_len: int = 0
    support_stream: bool = False
    support_chat_template: bool = False
    embedding_dim: int = 0
    max_concurrency: int = 1
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineConfig:
    """How to build an engine: what the control plane's Model record says."""

    model_name: str
    model_path: str
    backend: str
    infer_params: Mapping[str, str] = field(default_factory=dict)


class Engine(abc.ABC):
    """One loaded model. Lifecycle: ``await start()`` once, use, ``await stop()`` once.

    Operations an engine does not offer raise :class:`llmesh.errors.Unimplemented`.
    """

    #: ``generate`` honours ``SamplingParams.resume_token_ids`` (mid-stream failover lands here).
    supports_resume: bool = False

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @property
    def max_concurrency(self) -> int:
        """Requests one replica serves at once; more are refused with RESOURCE_EXHAUSTED."""
        params = check_infer_params(self.config.backend, self.config.infer_params)
        return int(params.get("max_concurrency", DEFAULT_MAX_CONCURRENCY))

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model. Raises with a clear message when the directory is unusable."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Abort everything in flight and free the model."""

    @abc.abstractmethod
    def meta(self) -> ModelMeta:
        """Describe the loaded model."""

    def generate(
        self, request_id: str, prompt: str, params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        """Stream a generation for a raw prompt.

        Deltas that pile up while the consumer is slow are merged into one chunk (a bounded
        per-request buffer), never queued without bound. Closing the iterator early (the
        consumer's ``aclose()`` or a cancelled task) aborts the request in the engine.
        """
        raise Unimplemented(f"backend {self.config.backend!r} does not generate text")

    async def abort(self, request_id: str) -> bool:
        """Stop a running request; True when one was found. Its stream ends with "aborted"."""
        return False

    def active_requests(self) -> set[str]:
        """Ids of requests the engine holds state for (tests assert it is empty after aborts)."""
        return set()

    async def add_lora(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter into the running model, unmerged, for requests that name it.

        Requests choose it with ``SamplingParams.lora = name``; requests without one keep
        getting the base model's output.

        Args:
            name: The adapter's name (letters, digits, '.', '_', '-').
            path: A local directory written by ``PeftModel.save_pretrained``
                (``adapter_config.json`` plus ``adapter_model.safetensors`` or ``.bin``).

        Raises:
            AlreadyExists: an adapter with this name is loaded.
            FailedPrecondition: naming the path and what is wrong: not a PEFT LoRA directory,
                layers the model does not have, a rank above the engine's ``max_lora_rank``,
                or an engine deployed without adapter support.
            ResourceExhausted: the engine holds ``max_loras`` adapters already.
            Unimplemented: this backend serves no adapters.
        """
        raise Unimplemented(
            f"backend {self.config.backend!r} cannot load LoRA adapters; deploy model "
            f"{self.config.model_name} with backend transformers or vllm to serve adapters"
        )

    async def remove_lora(self, name: str) -> None:
        """Unload an adapter; new requests naming it get NotFound.

        Requests already decoding with it finish with it (the worker drains them first).

        Raises:
            NotFound: no adapter with this name is loaded.
            Unimplemented: this backend serves no adapters.
        """
        raise Unimplemented(
            f"backend {self.config.backend!r} cannot load LoRA adapters, so there is none to remove"
        )

    def loras(self) -> list[str]:
        """Names of the loaded adapters (empty for backends without adapter support)."""
        return []

    async def embed(self, texts: Sequence[str], *, normalize: bool) -> list[list[float]]:
        raise Unimplemented(f"backend {self.config.backend!r} does not embed")

    async def rerank(self, query: str, documents: Sequence[str]) -> tuple[list[float], str]:
        """Scores in document order and the method used ("cross-encoder" / "bi-encoder-cosine")."""
        raise Unimplemented(f"backend {self.config.backend!r} does not rerank")

    async def tokenize(self, text: str, *, add_special_tokens: bool) -> tuple[list[int], list[str]]:
        raise Unimplemented(f"backend {self.config.backend!r} has no tokenizer")

    async def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool
    ) -> str:
        raise Unimplemented(f"backend {self.config.backend!r} has no chat template")

    async def count_prompt_tokens(self, prompt: str) -> int:
        """Tokens in a prompt, for the context-length check before generating."""
        ids, _ = await self.tokenize(prompt, add_special_tokens=True)
        return len(ids)
