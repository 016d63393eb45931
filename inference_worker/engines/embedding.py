"""The ``embedding`` backend: sentence-transformers bi-encoders from a local directory.

infer_params: the ``embedding`` table in :mod:`llmesh.common.backends` (``max_concurrency``,
``device``, ``max_model_len``, ``batch_size``, ``torch_threads``). Requests are admitted up to
``max_concurrency`` but encoding runs one batch at a time per replica, since concurrent batches
only compete for the same cores; inputs longer than ``max_model_len`` are truncated, as
sentence-transformers does.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from llmesh.common.backends import DEFAULT_MAX_CONCURRENCY, check_infer_params
from llmesh.common.errors import FailedPrecondition, InvalidArgument
from llmesh.inference_worker.engines.base import Engine, EngineConfig, ModelMeta, load_model
from llmesh.inference_worker.engines.transformers_engine import check_model_dir, resolve_device

log = logging.getLogger(__name__)


def read_architectures(path: str) -> list[str]:
    """``architectures`` from a model directory's config.json (empty when absent)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            value = json.load(f).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [str(a) for a in value] if isinstance(value, list) else []


class EmbeddingEngine(Engine):
    """Sentence embeddings with ``SentenceTransformer``; reranks by bi-encoder cosine too.

    Args:
        config: ``model_path`` is a local sentence-transformers (or plain HF encoder)
            directory; see the module docstring for ``infer_params``.
    """

    backend = "embedding"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        # self.backend: "embedding", or "rerank" for the subclass (the same keys).
        params = check_infer_params(self.backend, config.infer_params, model=config.model_name)
        self._params = params
        self._max_concurrency: int = params.get("max_concurrency", DEFAULT_MAX_CONCURRENCY)
        self._max_len_param: int | None = params.get("max_model_len")
        self._batch_size: int = params.get("batch_size", 32)
        self._torch_threads: int | None = params.get("torch_threads")
        # Only when the deploy asked and the worker allowed it (see remote_code.py).
        self._trust_remote_code: bool = params.get("trust_remote_code", False)
        self._model: Any = None
        self._device = "cpu"
        self._path = ""
        self._architectures: list[str] = []
        # One encode at a time: batches on the same cores gain nothing from overlapping, and
        # the fast tokenizer's padding/truncation state is not safe to change concurrently.
        self._run_lock = threading.Lock()

    @property
    def max_concurrency(self) -> int:
        """Requests admitted at once (infer_param ``max_concurrency``, default 8)."""
        return self._max_concurrency

    async def start(self) -> None:
        """Load the model from its local directory in a worker thread."""
        if self._model is not None:
            return
        self._path = check_model_dir(self.config)
        self._device = resolve_device(self._params)
        if self._torch_threads is not None:
            import torch

            torch.set_num_threads(self._torch_threads)
        self._architectures = read_architectures(self._path)
        self._model = await load_model(self._load)
        log.info("loaded %s (%s) from %s", self.config.model_name, self.backend, self._path)

    def _load(self) -> Any:
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(
                self._path,
                device=self._device,
                local_files_only=True,
                trust_remote_code=self._trust_remote_code,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise FailedPrecondition(
                f"model {self.config.model_name} at {self._path!r} cannot be loaded by "
                f"sentence-transformers: {exc}"
            ) from exc
        model.eval()
        self._apply_max_len(model)
        return model

    def _apply_max_len(self, model: Any) -> None:
        if self._max_len_param is None:
            return
        limit = model.max_seq_length
        if limit and self._max_len_param > limit:
            raise InvalidArgument(
                f"infer_params max_model_len={self._max_len_param} exceeds what model "
                f"{self.config.model_name} accepts ({limit} tokens); use at most {limit}"
            )
        model.max_seq_length = self._max_len_param

    async def stop(self) -> None:
        """Free the model (requests in flight finish their current batch first)."""
        model, self._model = self._model, None
        if model is None:
            return
        # Wait for an encode in progress rather than pulling the weights from under it.
        await asyncio.to_thread(self._run_lock.acquire)
        self._run_lock.release()
        del model
        if self._device.startswith("cuda"):
            import torch

            # Only CUDA needs the memory back at once; a full collection stalls the worker.
            gc.collect()
            torch.cuda.empty_cache()

    def _require(self) -> Any:
        model = self._model
        if model is None:
            raise FailedPrecondition(
                f"model {self.config.model_name} is not loaded (engine not started or stopped)"
            )
        return model

    def meta(self) -> ModelMeta:
        """Backend, embedding dimension, max_model_len (max_seq_length) and architectures."""
        model = self._require()
        return ModelMeta(
            backend=self.backend,
            architectures=list(self._architectures),
            max_model_len=int(model.max_seq_length or 0),
            support_stream=False,
            support_chat_template=False,
            embedding_dim=int(model.get_embedding_dimension() or 0),
            max_concurrency=self._max_concurrency,
            extra={"device": self._device, "rerank_method": "bi-encoder-cosine"},
        )

    def _encode(self, texts: list[str], normalize: bool) -> Any:
        """A (len(texts), dim) float32 numpy array."""
        model = self._require()
        with self._run_lock:
            return model.encode(
                texts,
                batch_size=self._batch_size,
                normalize_embeddings=normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            )

    async def embed(self, texts: Sequence[str], *, normalize: bool) -> list[list[float]]:
        """One vector per text, in order; ``normalize`` scales each to unit length.

        Raises:
            InvalidArgument: ``texts`` is empty.
        """
        self._require()
        if not texts:
            raise InvalidArgument("texts is empty; give at least one text to embed")
        vectors = await asyncio.to_thread(self._encode, [str(t) for t in texts], normalize)
        return vectors.tolist()

    async def rerank(self, query: str, documents: Sequence[str]) -> tuple[list[float], str]:
        """Cosine similarity of the query and each document embedding ("bi-encoder-cosine")."""
        self._require()
        if not documents:
            raise InvalidArgument("documents is empty; give at least one document to rank")
        vectors = await asyncio.to_thread(self._encode, [query, *[str(d) for d in documents]], True)
        # Unit vectors: the dot product is the cosine.
        return (vectors[1:] @ vectors[0]).tolist(), "bi-encoder-cosine"

    def _tokenizer(self) -> Any:
        tokenizer = getattr(self._require(), "tokenizer", None)
        if tokenizer is None:
            raise FailedPrecondition(f"model {self.config.model_name} has no tokenizer")
        return tokenizer

    def _tokenize(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[str]]:
        tokenizer = self._tokenizer()
        with self._run_lock:
            ids = list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
        return ids, [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]

    async def tokenize(self, text: str, *, add_special_tokens: bool) -> tuple[list[int], list[str]]:
        """Token ids and pieces from the model's tokenizer (before truncation)."""
        return await asyncio.to_thread(self._tokenize, text, add_special_tokens)
