"""The ``rerank`` backend: cross-encoder scoring, with a documented bi-encoder fallback.

How a model directory is scored depends on its ``config.json``:

* ``architectures`` names a ``...ForSequenceClassification`` class → the model is a cross-encoder:
  each (query, document) pair goes through ``sentence_transformers.CrossEncoder`` together and
  the score is its relevance output (sigmoid of the single logit; for a multi-label head, the
  softmax probability of the last label). Method ``"cross-encoder"``. ``embed`` is
  unimplemented for such a model.
* anything else → **fallback**: the directory is loaded as a ``SentenceTransformer`` bi-encoder,
  query and documents are embedded separately and the score is the cosine similarity of their
  unit vectors. Method ``"bi-encoder-cosine"``. Less precise than a cross-encoder, but it lets
  any embedding model serve rerank requests; ``embed`` works too.

The method used travels back with every response, so callers can tell which one they got.

infer_params: the ``rerank`` table in :mod:`llmesh.common.backends`, the same keys as the
embedding backend (``max_concurrency``, ``device``, ``max_model_len``, ``batch_size``,
``torch_threads``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from llmesh.common.errors import FailedPrecondition, InvalidArgument, Unimplemented
from llmesh.inference_worker.engines.base import EngineConfig, ModelMeta
from llmesh.inference_worker.engines.embedding import EmbeddingEngine

log = logging.getLogger(__name__)

CROSS_ENCODER = "cross-encoder"
BI_ENCODER = "bi-encoder-cosine"


class RerankEngine(EmbeddingEngine):
    """Scores documents against a query; cross-encoder when the model is one (see module doc).

    Args:
        config: ``model_path`` is a local sequence-classification model (cross-encoder) or an
            embedding model (bi-encoder fallback).
    """

    backend = "rerank"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.method = ""

    def _load(self) -> Any:
        if not any(a.endswith("ForSequenceClassification") for a in self._architectures):
            self.method = BI_ENCODER
            log.info(
                "%s: %s is not a sequence classifier; reranking by bi-encoder cosine",
                self.config.model_name,
                self._path,
            )
            return super()._load()
        from sentence_transformers import CrossEncoder

        self.method = CROSS_ENCODER
        try:
            model = CrossEncoder(
                self._path,
                device=self._device,
                local_files_only=True,
                trust_remote_code=self._trust_remote_code,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise FailedPrecondition(
                f"model {self.config.model_name} at {self._path!r} cannot be loaded as a "
                f"cross-encoder: {exc}"
            ) from exc
        model.eval()
        self._apply_max_len(model)
        return model

    def meta(self) -> ModelMeta:
        """As for embedding models; ``embedding_dim`` is 0 for a cross-encoder."""
        if self.method == BI_ENCODER:
            out = super().meta()
            out.backend = self.backend
            return out
        model = self._require()
        return ModelMeta(
            backend=self.backend,
            architectures=list(self._architectures),
            max_model_len=int(model.max_seq_length or 0),
            support_stream=False,
            support_chat_template=False,
            embedding_dim=0,
            max_concurrency=self._max_concurrency,
            extra={"device": self._device, "rerank_method": self.method},
        )

    async def embed(self, texts: Sequence[str], *, normalize: bool) -> list[list[float]]:
        """Embeddings in bi-encoder mode; a cross-encoder has none to give."""
        self._require()
        if self.method == CROSS_ENCODER:
            raise Unimplemented(
                f"model {self.config.model_name} is a cross-encoder reranker and produces no "
                "embeddings; deploy an embedding model with backend embedding"
            )
        return await super().embed(texts, normalize=normalize)

    def _predict(self, query: str, documents: list[str]) -> list[float]:
        import numpy as np

        model = self._require()
        with self._run_lock:
            scores = model.predict(
                [(query, d) for d in documents],
                batch_size=self._batch_size,
                apply_softmax=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim == 2:  # several labels: the last one is "relevant" by convention
            scores = scores[:, -1]
        return scores.reshape(-1).tolist()

    async def rerank(self, query: str, documents: Sequence[str]) -> tuple[list[float], str]:
        """Scores in document order (higher is more relevant) and the method used."""
        self._require()
        if self.method != CROSS_ENCODER:
            return await super().rerank(query, documents)
        if not documents:
            raise InvalidArgument("documents is empty; give at least one document to rank")
        scores = await asyncio.to_thread(self._predict, query, [str(d) for d in documents])
        return scores, CROSS_ENCODER
