"""Engine adapters and the factory that picks one by backend name.

Importing this package is cheap on purpose: engine modules (and torch) load only in
:func:`create_engine`. The backend names and the infer_params each accepts live in
:mod:`llmesh.common.backends`.
"""

from __future__ import annotations

import importlib

from llmesh.common.backends import BACKENDS, ENGINE_BACKENDS
from llmesh.common.errors import InvalidArgument
from llmesh.inference_worker.engines.base import Engine, EngineConfig

__all__ = ["BACKENDS", "create_engine"]

# backend name -> (module, class); modules are imported on first use.
_ENGINES: dict[str, tuple[str, str]] = {
    "transformers": ("llmesh.inference_worker.engines.transformers_engine", "TransformersEngine"),
    "embedding": ("llmesh.inference_worker.engines.embedding", "EmbeddingEngine"),
    "rerank": ("llmesh.inference_worker.engines.rerank", "RerankEngine"),
    "vllm": ("llmesh.inference_worker.engines.vllm_engine", "VLLMEngine"),
    "deepspeed": ("llmesh.inference_worker.engines.deepspeed_engine", "DeepSpeedEngine"),
}

assert tuple(_ENGINES) == ENGINE_BACKENDS, "engines and llmesh.common.backends disagree"


def create_engine(config: EngineConfig) -> Engine:
    """Build (not start) the engine for ``config.backend``.

    ``backend="auto"`` returns an :class:`~llmesh.inference_worker.engines.auto.AutoEngine`
    that picks one of the others from the model directory and delegates to it.

    Args:
        config: The model record: name, local path, backend and infer_params.

    Raises:
        InvalidArgument: unknown backend, infer_params the engine does not accept, or (auto) a
            directory no rule recognises.
    """
    if config.backend == "auto":
        from llmesh.inference_worker.engines.auto import AutoEngine

        return AutoEngine(config, engines=create_engine, backends=BACKENDS)
    try:
        module_name, class_name = _ENGINES[config.backend]
    except KeyError:
        raise InvalidArgument(
            f"unknown backend {config.backend!r} for model {config.model_name}; "
            f"valid backends are {', '.join(BACKENDS)}"
        ) from None
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(config)
