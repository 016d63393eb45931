"""llmesh: a gRPC microservice mesh that serves and fine-tunes large language models.

Users import the Byzer-LLM compatible client from here::

    from llmesh import ByzerLLM
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["ByzerLLM", "LLMResponse", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import llmesh.v1...` in servers does not pull the SDK in.
    if name in ("ByzerLLM", "LLMResponse"):
        from llmesh import client

        return getattr(client, name)
    raise AttributeError(name)
