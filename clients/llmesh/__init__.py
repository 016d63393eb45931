"""llmesh: a gRPC microservice mesh that serves and fine-tunes large language models.

Users import the Byzer-LLM compatible client from here::

    from llmesh import ByzerLLM
"""

from __future__ import annotations

__version__ = "0.1.0"

# Where each lazily imported public name lives. Lazy so that `import llmesh.v1...` in servers
# does not pull the SDK in.
_LAZY: dict[str, str] = {
    "ByzerLLM": "llmesh.client",
    "LLMResponse": "llmesh.client",
    "LLMRequest": "llmesh.client",
    "LLMFunctionCallResponse": "llmesh.client",
    "LLMClassResponse": "llmesh.client",
    "EventName": "llmesh.client",
    "InferBackend": "llmesh.client",
    "Role": "llmesh.client",
    "Template": "llmesh.templates",
    "Templates": "llmesh.templates",
    "prompt": "llmesh.decorators",
    "AsyncByzerLLM": "llmesh.aio",
    "TrainingJobFailed": "llmesh.client",
}

__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(module), name)
