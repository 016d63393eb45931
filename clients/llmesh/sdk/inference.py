"""Embeddings, rerank, tokenizer, chat template, model meta and abort.

Each method is an operation (see :mod:`llmesh.sdk.ops`): ``ByzerLLM`` runs it with blocking
calls, ``AsyncByzerLLM`` awaits the same steps over grpc.aio.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llmesh.common.errors import InvalidArgument, LLMeshError
from llmesh.llm_config import as_float, byzer_flags
from llmesh.route_cache import CONTROL_CALL_TIMEOUT_S, WORKER_CALL_TIMEOUT_S
from llmesh.sdk.ops import LiveAddresses, Steps, WorkerAt, WorkerCall, operation, steps
from llmesh.sdk.results import meta_dict, normalize_pairs, rerank_output, to_chat_messages
from llmesh.sdk.settings import Settings
from llmesh.sdk.shapes import LLMRequest, LLMResponse
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import inference_service_pb2 as inf


class InferenceMixin(Settings):
    """The model calls that are not chat: ``emb``, ``emb_rerank``, ``tokenize``, ``get_meta``..."""

    def _init_inference(self) -> None:
        #: Model meta by name, dropped when the model is deployed or undeployed again.
        self.meta_cache: dict[str, dict[str, Any]] = {}

    @operation
    def emb(
        self,
        model: str | None,
        request: LLMRequest | Sequence[str] | str,
        extract_params: Mapping[str, Any] | None = None,
    ) -> Steps[list[LLMResponse]]:
        """Embed one text or several.

        Args:
            model: the embedding model; defaults to ``setup_default_emb_model_name``.
            request: an :class:`LLMRequest` (``instruction`` is one text or a list), a list of
                texts, or one text.
            extract_params: ``normalize`` / ``normalize_embeddings`` (bool) scales vectors to
                unit length; ``timeout_s`` sets a deadline. ``gen.`` prefixes are accepted.

        Returns:
            One :class:`LLMResponse` per text, in order, with the vector (list of floats) in
            ``output``.
        """
        name = self._model_or_default(
            model, self.default_emb_model_name, "setup_default_emb_model_name"
        )
        if isinstance(request, LLMRequest):
            instruction = request.instruction
        else:
            instruction = request
        texts = [instruction] if isinstance(instruction, str) else list(instruction)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidArgument("emb needs one text or a non-empty list of texts")
        flags = byzer_flags(self._config_for(name, extract_params))
        normalize = bool(flags.get("normalize_embeddings", flags.get("normalize", False)))
        timeout = as_float("timeout_s", flags["timeout_s"]) if "timeout_s" in flags else None
        req = inf.EmbedRequest(model=name, texts=texts, normalize=normalize)
        response = yield WorkerCall(name, cp.PURPOSE_EMBEDDING, "Embed", req, timeout)
        if len(response.embeddings) != len(texts):
            raise InvalidArgument(
                f"the worker returned {len(response.embeddings)} vectors for {len(texts)} texts"
            )
        out = []
        for text, vector in zip(texts, response.embeddings, strict=True):
            meta: dict[str, Any] = {}
            if len(texts) == 1:
                meta = {
                    "input_tokens_count": response.usage.prompt_tokens,
                    "generated_tokens_count": 0,
                }
            out.append(
                LLMResponse(
                    output=list(vector.values),
                    input={"instruction": text, "embedding": True},
                    metadata=meta,
                )
            )
        return out

    @operation
    def emb_query(self, v: str, model: str | None = None) -> Steps[list[LLMResponse]]:
        """Embed one text; returns ``[LLMResponse(output=vector, ...)]``.

        Args:
            v: the text.
            model: the embedding model; defaults to ``setup_default_emb_model_name``.
        """
        return (yield from steps(self.emb)(model=model, request=LLMRequest(instruction=v)))

    @operation
    def emb_rerank(
        self,
        model: str | None = None,
        sentence_pairs: Sequence[Sequence[str]] | Sequence[str] = (),
        extract_params: Mapping[str, Any] | None = None,
    ) -> Steps[list[LLMResponse]]:
        """Score (query, passage) pairs.

        Args:
            model: the rerank model; defaults to ``setup_default_re_rank_model_name``.
            sentence_pairs: one ``(query, passage)`` pair or a list of them; pairs may have
                different queries.
            extract_params: ``timeout_s`` sets a deadline.

        Returns:
            ``[LLMResponse(output=...)]`` where output is ``((query, passage), score)`` for one
            pair, or a list of those sorted by score, best first, as Byzer-LLM's rerank models
            returned. ``metadata["method"]`` says how the worker scored.
        """
        name = self._model_or_default(
            model, self.default_rerank_model_name, "setup_default_re_rank_model_name"
        )
        if not sentence_pairs:
            raise InvalidArgument("emb_rerank needs sentence_pairs: one (query, passage) or a list")
        pairs, single = normalize_pairs(sentence_pairs)
        flags = byzer_flags(self._config_for(name, extract_params))
        timeout = as_float("timeout_s", flags["timeout_s"]) if "timeout_s" in flags else None
        # One Rerank call per distinct query, then the scores go back to their pairs.
        by_query: dict[str, list[int]] = {}
        for i, (query, _) in enumerate(pairs):
            by_query.setdefault(query, []).append(i)
        scores: list[float] = [0.0] * len(pairs)
        methods: set[str] = set()
        for query, indexes in by_query.items():
            req = inf.RerankRequest(
                model=name, query=query, documents=[pairs[i][1] for i in indexes]
            )
            response = yield WorkerCall(name, cp.PURPOSE_RERANK, "Rerank", req, timeout)
            if len(response.scores) != len(indexes):
                raise InvalidArgument(
                    f"the worker returned {len(response.scores)} scores for {len(indexes)} passages"
                )
            for i, score in zip(indexes, response.scores, strict=True):
                scores[i] = float(score)
            if response.method:
                methods.add(response.method)
        return [
            LLMResponse(
                output=rerank_output(pairs, scores, single=single),
                input={"instruction": sentence_pairs, "embedding": True, "embed_rerank": True},
                metadata={"method": ",".join(sorted(methods))} if methods else {},
            )
        ]

    @operation
    def tokenize(
        self, model: str | None, s: str, llm_config: Mapping[str, Any] | None = None
    ) -> Steps[list[LLMResponse]]:
        """Tokenize a text with the model's tokenizer.

        Args:
            model: the model; defaults to ``setup_default_model_name``.
            s: the text.
            llm_config: ``add_special_tokens`` (default True, as the tokenizer's own default).

        Returns:
            ``[LLMResponse(output=[token_ids], ...)]`` (a batch of one, as Byzer-LLM returned),
            with the token strings in ``metadata["tokens"]``.
        """
        name = self._model_or_default(model, self.default_model_name, "setup_default_model_name")
        flags = byzer_flags(llm_config)
        req = inf.TokenizeRequest(
            model=name, text=s, add_special_tokens=bool(flags.get("add_special_tokens", True))
        )
        response = yield WorkerCall(
            name, cp.PURPOSE_TOKENIZER, "Tokenize", req, WORKER_CALL_TIMEOUT_S
        )
        return [
            LLMResponse(
                output=[list(response.token_ids)],
                input={"instruction": s, "tokenizer": True},
                metadata={"tokens": list(response.tokens)},
            )
        ]

    @operation
    def apply_chat_template(
        self,
        model: str | None,
        s: str | Sequence[Mapping[str, Any]],
        llm_config: Mapping[str, Any] | None = None,
    ) -> Steps[str]:
        """Render messages with the model's chat template.

        Args:
            model: the model; defaults to ``setup_default_model_name``.
            s: the messages as a JSON string (as Byzer-LLM takes them) or as a list of dicts.
            llm_config: ``add_generation_prompt`` (default True) appends the assistant opener.

        Returns:
            The rendered prompt.
        """
        name = self._model_or_default(model, self.default_model_name, "setup_default_model_name")
        if isinstance(s, str):
            try:
                conversations = json.loads(s)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(
                    f"apply_chat_template expects a JSON list of messages: {exc}"
                ) from None
        else:
            conversations = s
        flags = byzer_flags(llm_config)
        req = inf.ApplyChatTemplateRequest(
            model=name,
            messages=to_chat_messages(conversations),
            add_generation_prompt=bool(flags.get("add_generation_prompt", True)),
        )
        response = yield WorkerCall(
            name, cp.PURPOSE_APPLY_CHAT_TEMPLATE, "ApplyChatTemplate", req, WORKER_CALL_TIMEOUT_S
        )
        return response.prompt

    @operation
    def get_meta(
        self, model: str | None, llm_config: Mapping[str, Any] | None = None
    ) -> Steps[dict[str, Any]]:
        """Describe a model (cached per model until it is deployed or undeployed again).

        Args:
            model: the model; defaults to ``setup_default_model_name``.
            llm_config: accepted for compatibility; unused.

        Returns:
            A dict with ``model_deploy_type``, ``backend``, ``architectures``,
            ``max_model_len``, ``support_stream``, ``support_chat_template``,
            ``message_format``, ``embedding_dim``, ``model_path``, ``max_concurrency`` and any
            engine-specific extras.
        """
        name = self._model_or_default(model, self.default_model_name, "setup_default_model_name")
        cached = self.meta_cache.get(name)
        if cached is not None:
            return cached
        req = inf.GetModelMetaRequest(model=name)
        response = yield WorkerCall(
            name, cp.PURPOSE_META, "GetModelMeta", req, WORKER_CALL_TIMEOUT_S
        )
        meta = meta_dict(response)
        self.meta_cache[name] = meta
        return meta

    @operation
    def abort(self, request_id: str, model: str | None = None) -> Steps[bool]:
        """Abort a running request on every worker that hosts the model.

        Args:
            request_id: the id the request was started with (``llm_config["gen.request_id"]``,
                or ``metadata["request_id"]`` of a stream).
            model: the model; defaults to ``setup_default_model_name``.

        Returns:
            True when a worker found the request and stopped it.

        Raises:
            Unavailable (or another error): every worker hosting the model failed to answer.
        """
        name = self._model_or_default(model, self.default_model_name, "setup_default_model_name")
        if not request_id:
            raise InvalidArgument("abort needs the request_id of a running request")
        addresses = yield LiveAddresses(name)
        aborted = False
        errors: list[LLMeshError] = []
        for address in addresses:
            try:
                response = yield WorkerAt(
                    address,
                    "Abort",
                    inf.AbortRequest(request_id=request_id),
                    CONTROL_CALL_TIMEOUT_S,
                )
                aborted = aborted or response.aborted
            except LLMeshError as exc:
                errors.append(exc)
        if errors and len(errors) == len(addresses):
            raise errors[-1]
        return aborted
