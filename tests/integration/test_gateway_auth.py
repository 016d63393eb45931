"""The gateway forwards the caller's bearer token; the mesh (run with ``--auth``) judges it.

A control plane and an inference worker that require tokens, a chat model, and two gateways:
one that passes every request on (the mesh refuses what it must), one that refuses requests
without a token itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmesh.cli import main as cli_main
from llmesh.client import ByzerLLM
from llmesh.common.auth import ROLE_ADMIN, ROLE_USER, new_token
from llmesh.common.auth_store import EtcdTokens
from llmesh.common.etcd import EtcdKV
from llmesh.common.etcd_keys import Keys
from llmesh.common.tls import InsecureBind, TlsConfig

from .conftest import Mesh

HELLO = [{"role": "user", "content": "Hi"}]


async def _put_tokens(etcd: str, namespace: str) -> dict[str, str]:
    kv = EtcdKV(etcd)
    store = EtcdTokens(kv, Keys(namespace))
    tokens = {}
    for label, role, models in (
        ("admin", ROLE_ADMIN, ()),
        ("user", ROLE_USER, ()),
        ("chat-only", ROLE_USER, ("chat",)),
        ("other-only", ROLE_USER, ("other",)),
    ):
        token, record = new_token(f"gateway {label}", role, models)
        await store.add(record)
        tokens[label] = token
    await kv.close()
    return tokens


@pytest.fixture(scope="module")
def auth_gw(etcd_server: Any, test_model_dir: Path) -> Iterator[tuple[dict[str, str], str, str]]:
    from llmesh.control_plane.server import run_control_plane

    namespace = f"/llmesh-gwauth-{uuid.uuid4().hex[:6]}"
    mesh = Mesh(etcd_server.endpoint, namespace)
    llm = None
    try:
        tokens = mesh.call(_put_tokens(etcd_server.endpoint, namespace))

        async def start_cp() -> Any:
            stack = contextlib.AsyncExitStack()
            cp = await stack.enter_async_context(
                run_control_plane(
                    listen="127.0.0.1:0", etcd=etcd_server.endpoint, namespace=namespace, auth=True
                )
            )
            return cp, stack

        mesh.control_planes["cp0"] = mesh.call(start_cp())
        mesh.start_worker("w0", auth=True)
        llm = ByzerLLM(control_plane=mesh.address(), token=tokens["admin"])
        llm.setup_num_workers(1).setup_infer_backend("transformers")
        llm.deploy(str(test_model_dir), "custom/llama", "chat", {"max_concurrency": 4})
        open_gw = mesh.start_gateway("open")
        strict_gw = mesh.start_gateway("strict", require_token=True)
        yield tokens, open_gw.url, strict_gw.url
    finally:
        if llm is not None:
            llm.close()
        mesh.close()


def _post(url: str, token: str | None, model: str = "chat") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"model": model, "messages": HELLO, "max_tokens": 4}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def _error(r: httpx.Response) -> dict[str, Any]:
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_tokens_pass_through_to_the_mesh(auth_gw: Any) -> None:
    tokens, url, _ = auth_gw
    client = openai.OpenAI(base_url=url + "/v1", api_key=tokens["user"], max_retries=0)
    r = client.chat.completions.create(model="chat", messages=HELLO, max_tokens=4)
    assert r.choices[0].message.content is not None
    scoped = openai.OpenAI(base_url=url + "/v1", api_key=tokens["chat-only"], max_retries=0)
    streamed = list(
        scoped.chat.completions.create(model="chat", messages=HELLO, max_tokens=4, stream=True)
    )
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")
    assert "chat" in {m.id for m in scoped.models.list()}


def test_missing_or_unknown_token_is_401(auth_gw: Any) -> None:
    _, url, _ = auth_gw
    r = _post(url, None)
    assert r.status_code == 401 and _error(r)["type"] == "authentication_error"
    r = _post(url, "llmesh_0000000000zz_" + "z" * 43)
    assert r.status_code == 401
    bad = openai.OpenAI(base_url=url + "/v1", api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="chat", messages=HELLO, max_tokens=4)


def test_a_token_scoped_to_another_model_is_403(auth_gw: Any) -> None:
    tokens, url, _ = auth_gw
    r = _post(url, tokens["other-only"])
    assert r.status_code == 403, r.text
    assert _error(r)["type"] == "permission_error"
    client = openai.OpenAI(base_url=url + "/v1", api_key=tokens["other-only"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="chat", messages=HELLO, max_tokens=4, stream=True)


def test_a_gateway_that_requires_tokens_refuses_none_itself(auth_gw: Any) -> None:
    tokens, _, strict = auth_gw
    r = _post(strict, None)
    assert r.status_code == 401 and _error(r)["code"] == "missing_api_key"
    assert _post(strict, tokens["user"]).status_code == 200
    # Health is open: a load balancer probes it without a token.
    assert httpx.get(strict + "/health", timeout=10).status_code == 200


def test_auth_beyond_loopback_only_in_front_of_a_mesh_that_checks_tokens(
    auth_gw: Any, etcd_server: Any, tmp_path: Path
) -> None:
    """--auth on the gateway only refuses requests without a token; the mesh checks them. So
    a non-loopback gateway with --auth starts only in front of a mesh that refuses a call
    without a token, and is refused in front of one that answers it."""
    from llmesh.gateway import run_gateway
    from llmesh.gateway.pool import ClientPool
    from llmesh.gateway.server import mesh_checks_tokens

    _, url, _ = auth_gw
    certs = tmp_path / "certs"
    assert cli_main(["certs", "init", str(certs)]) == 0
    gateway_tls = TlsConfig(cert=certs / "control-plane.pem", key=certs / "control-plane.key")
    strict_cp = httpx.get(url + "/health", timeout=10).json()["control_plane"]
    open_mesh = Mesh(etcd_server.endpoint, f"/llmesh-gwopen-{uuid.uuid4().hex[:6]}")
    try:
        open_cp = open_mesh.start_control_plane()

        async def checks(address: str) -> bool:
            pool = ClientPool(address)
            try:
                return await mesh_checks_tokens(pool, address)
            finally:
                await pool.close()

        assert asyncio.run(checks(strict_cp)) is True
        assert asyncio.run(checks(open_cp)) is False

        async def start(control_plane: str) -> str:
            async with run_gateway(
                control_plane=control_plane,
                listen="0.0.0.0:0",
                require_token=True,
                tls=gateway_tls,
                mesh_tls=None,  # the test meshes are plaintext
            ) as gw:
                return gw.url

        with pytest.raises(InsecureBind, match="answers calls without a token"):
            asyncio.run(start(open_cp))
        assert asyncio.run(start(strict_cp)).startswith("https://")
    finally:
        open_mesh.close()
