"""An OpenAI-compatible HTTP gateway in front of the mesh (``llmesh gateway``).

A stateless FastAPI application on uvicorn that forwards ``/v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings``, ``/v1/rerank`` and ``/v1/models`` to the mesh through
the SDK's async transport (routing, retries, mid-stream failover), with the caller's bearer
token; errors come back in OpenAI's JSON shape (:mod:`llmesh.gateway.errors`).

    async with run_gateway(control_plane="127.0.0.1:50051") as gw:
        ...  # openai.OpenAI(base_url=gw.url + "/v1", api_key=token)
"""

from llmesh.gateway.app import GatewaySettings, create_app
from llmesh.gateway.server import DEFAULT_GATEWAY_LISTEN, RunningGateway, run_gateway

__all__ = [
    "DEFAULT_GATEWAY_LISTEN",
    "GatewaySettings",
    "RunningGateway",
    "create_app",
    "run_gateway",
]
