"""An OpenAI-compatible HTTP gateway in front of the mesh (``llmesh gateway``).

A stateless FastAPI application on uvicorn that forwards ``/v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings``, ``/v1/rerank`` and ``/v1/models`` to the mesh through
the SDK's async transport (routing, retries, mid-stream failover), with the caller's bearer
token; errors come back in OpenAI's JSON shape (:mod:`llmesh.gateway.errors`).

    async with run_gateway(control_plane="127.0.0.1:50051") as gw:
        ...  # openai.OpenAI(base_url=gw.url + "/v1", api_key=token)

The names below load FastAPI and uvicorn on first use only, so the CLI (which names the
defaults) starts without them.
"""

from __future__ import annotations

from typing import Any

#: Where ``llmesh gateway`` (and ``llmesh up``'s gateway) listens by default.
DEFAULT_GATEWAY_LISTEN = "127.0.0.1:8000"

_LAZY = {
    "GatewaySettings": "llmesh.gateway.app",
    "create_app": "llmesh.gateway.app",
    "RunningGateway": "llmesh.gateway.server",
    "run_gateway": "llmesh.gateway.server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llmesh.gateway' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "DEFAULT_GATEWAY_LISTEN",
    "GatewaySettings",
    "RunningGateway",
    "create_app",
    "run_gateway",
]
