"""The ``auto`` backend: pick the engine from the model directory and what is installed.

Rules, first match wins:

* a sequence classifier (``config.json`` architectures ending ``ForSequenceClassification``, or a
  sentence-transformers ``CrossEncoder`` save) → ``rerank`` (cross-encoder);
* a sentence-transformers model (``modules.json`` / ``config_sentence_transformers.json``) →
  ``embedding``;
* a causal LM (architectures ending ``ForCausalLM`` / ``LMHeadModel`` /
  ``ForConditionalGeneration``) → ``vllm`` when vLLM imports, finds a device and lists the
  architecture in its model registry, else ``transformers``;
* anything else → ``InvalidArgument`` saying what was found.

The choice and its reason are logged when the replica loads and reported by ``meta()`` as
``extra["auto_backend_reason"]``; ``meta().backend`` is the chosen engine's name.
infer_params go to the chosen engine unchanged, so keys it does not accept are refused (a deploy
with backend auto may use the keys of any backend auto picks, see
:data:`llmesh.common.backends.AUTO_BACKENDS`).

Choosing between vLLM and transformers imports vLLM's model registry (seconds, and torch), so
for causal LMs it happens in ``start()`` off the event loop, never in the constructor.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from llmesh.common.backends import AUTO_CAUSAL_BACKENDS, check_infer_params
from llmesh.common.errors import FailedPrecondition, InvalidArgument
from llmesh.inference_worker.engines.base import (
    Engine,
    EngineConfig,
    GenerationChunk,
    ModelMeta,
    SamplingParams,
    load_model,
)

log = logging.getLogger(__name__)

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_ST_FILES = ("modules.json", "config_sentence_transformers.json")


@dataclasses.dataclass(frozen=True)
class Detected:
    """What the model directory is: ``kind`` is a backend name or ``"causal-lm"``."""

    kind: str
    reason: str
    architecture: str = ""


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def detect(config: EngineConfig, *, backends: Sequence[str] = ()) -> Detected:
    """Classify ``config.model_path`` from its files alone (cheap: reads JSON, imports nothing).

    Args:
        config: The model record; only ``model_name`` and ``model_path`` are read.
        backends: Backend names for the error message.

    Raises:
        InvalidArgument: not a directory, or nothing in it says which engine serves it.
    """
    valid = ", ".join(b for b in backends if b != "auto") or "transformers, vllm, ..."
    path = os.path.abspath(os.path.expanduser(config.model_path or ""))
    if not config.model_path or not os.path.isdir(path):
        raise InvalidArgument(
            f"backend auto cannot choose an engine for model {config.model_name}: model_path "
            f"{config.model_path!r} is not a directory on this worker; models load from local "
            "HuggingFace-layout directories"
        )
    hf = _read_json(os.path.join(path, "config.json"))
    archs = [str(a) for a in ((hf or {}).get("architectures") or []) if isinstance(a, str)]
    st_files = [f for f in _ST_FILES if os.path.isfile(os.path.join(path, f))]
    st_type = str((_read_json(os.path.join(path, _ST_FILES[1])) or {}).get("model_type") or "")

    classifier = next((a for a in archs if a.endswith("ForSequenceClassification")), "")
    if classifier:
        return Detected("rerank", f"{classifier} is a sequence classifier (cross-encoder)")
    if st_files and st_type == "CrossEncoder":
        return Detected("rerank", "sentence-transformers CrossEncoder model")
    if st_files and st_type in ("", "SentenceTransformer"):
        return Detected("embedding", f"sentence-transformers model ({', '.join(st_files)})")
    causal = next((a for a in archs if a.endswith(CAUSAL_SUFFIXES)), "")
    if causal:
        return Detected("causal-lm", f"{causal} is a causal LM", causal)

    if hf is None:
        found = "no readable config.json"
        if st_files:
            found += f" ({', '.join(st_files)} present)"
    else:
        found = f"config.json architectures {archs or 'missing'}"
        if st_type:
            found += f", sentence-transformers model_type {st_type!r}"
    raise InvalidArgument(
        f"backend auto cannot choose an engine for model {config.model_name} at "
        f"{config.model_path!r}: found {found}. auto recognises sentence-transformers models "
        "(embedding), ...ForSequenceClassification (rerank) and ...ForCausalLM / LMHeadModel / "
        f"ForConditionalGeneration (vllm or transformers); deploy with an explicit backend "
        f"({valid}) instead"
    )


def vllm_support(architecture: str) -> tuple[bool, str]:
    """Whether vLLM here can serve ``architecture``, and why, without starting an engine.

    Imports vLLM and its model registry (seconds on first call); callers run it off the loop.
    """
    try:
        # Our vLLM module sets vLLM's environment defaults (spawned workers, quiet logs); they
        # must be in place before vLLM is first imported.
        importlib.import_module("llmesh.inference_worker.engines.vllm_engine")
        import vllm
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install: not usable
        return False, f"vLLM is not usable on this worker ({type(exc).__name__}: {exc})"
    version = str(getattr(vllm, "__version__", "unknown"))
    try:
        from vllm.platforms import current_platform

        if current_platform.is_unspecified():
            return False, f"vLLM {version} finds no device it can run on here"
        try:
            from vllm.model_executor.models import ModelRegistry
        except ImportError:  # older layouts export it at the top level only
            from vllm import ModelRegistry
        supported = architecture in ModelRegistry.get_supported_archs()
    except Exception as exc:  # noqa: BLE001 - a registry we cannot read: do not bet on vLLM
        return False, f"vLLM {version}'s model registry is unreadable ({type(exc).__name__})"
    if supported:
        return True, f"{architecture} is supported by vLLM {version}"
    return False, f"{architecture} is not supported by vLLM {version}"


def choose_backend(config: EngineConfig, *, backends: Sequence[str] = ()) -> tuple[str, str]:
    """The backend ``auto`` picks for a model and the reason, e.g.
    ``("vllm", "auto: vllm (LlamaForCausalLM is supported by vLLM 0.32.0)")``.

    Blocking (may import vLLM); the engine calls it from a thread.

    Raises:
        InvalidArgument: the directory matches no rule (see the module docstring).
    """
    found = detect(config, backends=backends)
    if found.kind != "causal-lm":
        return found.kind, f"auto: {found.kind} ({found.reason})"
    ok, why = vllm_support(found.architecture)
    backend = "vllm" if ok else "transformers"
    return backend, f"auto: {backend} ({why})"


class AutoEngine(Engine):
    """Chooses an engine for the model directory (module docstring) and delegates to it.

    Args:
        config: The model record with ``backend="auto"``; ``infer_params`` go to the chosen
            engine.
        engines: ``create_engine``-style factory for a concrete backend.
        backends: Backend names, for error messages.

    Raises:
        InvalidArgument: the directory matches no rule, or (for embedding / rerank models, known
            here already) infer_params the chosen engine does not accept. For causal LMs the
            keys are checked against both generative engines here and against the chosen one
            at ``start()``.
    """

    backend = "auto"

    def __init__(
        self,
        config: EngineConfig,
        *,
        engines: Any,
        backends: Sequence[str] = (),
    ) -> None:
        super().__init__(config)
        self._make = engines
        self._backends = tuple(backends)
        self.inner: Engine | None = None
        self.chosen = ""
        self.reason = ""
        found = detect(config, backends=backends)
        if found.kind != "causal-lm":
            self._build(found.kind, f"auto: {found.kind} ({found.reason})")
        else:
            # A causal LM: refuse keys (and values) neither generative engine takes before
            # anything loads; the one chosen at start() checks its own keys again.
            check_infer_params(
                "auto",
                config.infer_params,
                model=config.model_name,
                among=AUTO_CAUSAL_BACKENDS,
            )

    def _build(self, backend: str, reason: str) -> Engine:
        inner = self._make(dataclasses.replace(self.config, backend=backend))
        self.inner, self.chosen, self.reason = inner, backend, reason
        return inner

    def _require(self) -> Engine:
        if self.inner is None:
            raise FailedPrecondition(
                f"model {self.config.model_name} is not loaded (engine not started or stopped)"
            )
        return self.inner

    @property  # type: ignore[override]  # read-only here: the chosen engine decides
    def supports_resume(self) -> bool:
        """Whether the chosen engine continues requests (False before it is chosen)."""
        return self.inner is not None and self.inner.supports_resume

    @property
    def max_concurrency(self) -> int:
        if self.inner is not None:
            return self.inner.max_concurrency
        return super().max_concurrency

    async def start(self) -> None:
        """Choose (causal LMs: off the loop, it may import vLLM), log the choice, start it."""
        inner = self.inner
        if inner is None:
            # Under the model-load lock: importing vLLM imports (and patches) transformers and
            # torch, which must not overlap another replica's load in this process.
            backend, reason = await load_model(_choose, self.config, self._backends)
            inner = self._build(backend, reason)
        log.info("model %s: %s", self.config.model_name, self.reason)
        await inner.start()

    async def stop(self) -> None:
        if self.inner is not None:
            await self.inner.stop()

    def meta(self) -> ModelMeta:
        out = self._require().meta()
        out.extra = {**out.extra, "auto_backend_reason": self.reason}
        return out

    def generate(
        self, request_id: str, prompt: str, params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        return self._require().generate(request_id, prompt, params)

    async def abort(self, request_id: str) -> bool:
        return False if self.inner is None else await self.inner.abort(request_id)

    def active_requests(self) -> set[str]:
        return set() if self.inner is None else self.inner.active_requests()

    async def add_lora(self, name: str, path: str) -> None:
        await self._require().add_lora(name, path)

    async def remove_lora(self, name: str) -> None:
        await self._require().remove_lora(name)

    def loras(self) -> list[str]:
        return [] if self.inner is None else self.inner.loras()

    async def embed(self, texts: Sequence[str], *, normalize: bool) -> list[list[float]]:
        return await self._require().embed(texts, normalize=normalize)

    async def rerank(self, query: str, documents: Sequence[str]) -> tuple[list[float], str]:
        return await self._require().rerank(query, documents)

    async def tokenize(self, text: str, *, add_special_tokens: bool) -> tuple[list[int], list[str]]:
        return await self._require().tokenize(text, add_special_tokens=add_special_tokens)

    async def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool
    ) -> str:
        return await self._require().apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt
        )

    async def count_prompt_tokens(self, prompt: str) -> int:
        return await self._require().count_prompt_tokens(prompt)


def _choose(config: EngineConfig, backends: Sequence[str]) -> tuple[str, str]:
    return choose_backend(config, backends=backends)
