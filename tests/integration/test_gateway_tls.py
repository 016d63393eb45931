"""The gateway's transport security: HTTPS (and mTLS) with `llmesh certs init` certificates,
and the bind check that keeps a plaintext, unauthenticated gateway on loopback.

The mesh behind the HTTPS gateway serves TLS too (server certificates from the same CA, client
certificates not required): the gateway's one :class:`~llmesh.common.tls.TlsConfig` serves
HTTPS and secures its channels into the mesh, as every llmesh process does.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmesh import ByzerLLM
from llmesh.cli import main as cli_main
from llmesh.common.tls import InsecureBind, TlsConfig

from .conftest import Mesh

HELLO = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("gw-certs")
    assert cli_main(["certs", "init", str(directory)]) == 0
    return directory


def _server_tls(certs: Path, *, require: bool = False) -> TlsConfig:
    return TlsConfig(
        cert=certs / "control-plane.pem",
        key=certs / "control-plane.key",
        ca=certs / "ca.pem",
        require_client_cert=require,
    )


def _trusting(certs: Path, *, client_cert: bool = False) -> ssl.SSLContext:
    """What an HTTPS caller of the gateway uses: our CA (and the user's client certificate)."""
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if client_cert:
        context.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    return context


@pytest.fixture(scope="module")
def https_mesh(etcd_server: Any, certs: Path, test_model_dir: Path) -> Iterator[Mesh]:
    mesh = Mesh(
        etcd_server.endpoint, f"/llmesh-gwtls-{uuid.uuid4().hex[:6]}", tls=_server_tls(certs)
    )
    llm = None
    try:
        address = mesh.start_control_plane()
        mesh.start_worker("w0", cpus=2)
        llm = ByzerLLM(control_plane=address, tls=_server_tls(certs))
        llm.setup_num_workers(1).setup_cpus_per_worker(1).setup_infer_backend("transformers")
        llm.deploy(str(test_model_dir), "custom/llama", "chat", {"max_concurrency": 2})
        yield mesh
    finally:
        if llm is not None:
            llm.close()
        mesh.close()


def test_openai_client_over_https(https_mesh: Mesh, certs: Path) -> None:
    gateway = https_mesh.start_gateway("https")
    try:
        assert gateway.url.startswith("https://127.0.0.1:")
        http = httpx.Client(verify=_trusting(certs), timeout=60)
        client = openai.OpenAI(
            base_url=gateway.url + "/v1", api_key="unused", max_retries=0, http_client=http
        )
        whole = client.chat.completions.create(
            model="chat", messages=HELLO, max_tokens=12, temperature=0
        )
        assert whole.choices[0].message.content
        streamed = client.chat.completions.create(
            model="chat", messages=HELLO, max_tokens=12, temperature=0, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == whole.choices[0].message.content
        assert "chat" in {m.id for m in client.models.list()}
        assert http.get(gateway.url + "/health").json()["status"] == "ok"
        # The server certificate is checked: a client without our CA refuses it.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(gateway.url + "/health", timeout=10)
        # And it speaks only TLS.
        with pytest.raises(httpx.HTTPError):
            httpx.get(gateway.url.replace("https://", "http://") + "/health", timeout=10)
    finally:
        https_mesh.stop_gateway("https")


def test_mtls_gateway_asks_callers_for_a_certificate(https_mesh: Mesh, certs: Path) -> None:
    gateway = https_mesh.start_gateway("mtls", tls=_server_tls(certs, require=True))
    try:
        with_cert = httpx.Client(verify=_trusting(certs, client_cert=True), timeout=60)
        client = openai.OpenAI(
            base_url=gateway.url + "/v1", api_key="unused", max_retries=0, http_client=with_cert
        )
        r = client.chat.completions.create(model="chat", messages=HELLO, max_tokens=4)
        assert r.choices[0].message.content is not None
        without = httpx.Client(verify=_trusting(certs), timeout=10)
        with pytest.raises(httpx.HTTPError):
            without.get(gateway.url + "/health").raise_for_status()
    finally:
        https_mesh.stop_gateway("mtls")


# -- the bind check ----------------------------------------------------------------------------


def test_a_non_loopback_bind_needs_tls_and_auth(certs: Path) -> None:
    from llmesh.gateway import run_gateway

    async def start(**kwargs: Any) -> str:
        async with run_gateway(control_plane="127.0.0.1:1", listen="0.0.0.0:0", **kwargs) as gw:
            return gw.url

    with pytest.raises(InsecureBind) as refused:
        asyncio.run(start())
    message = str(refused.value)
    assert "refusing to listen on 0.0.0.0:0" in message
    assert "--tls-cert" in message and "--auth" in message and "--insecure" in message
    # TLS alone is not enough: anyone reaching the address could use it.
    with pytest.raises(InsecureBind, match="--auth"):
        asyncio.run(start(tls=_server_tls(certs)))
    # TLS and --auth: only when the mesh is known to check the tokens (here it cannot be
    # asked; test_gateway_auth starts one against a mesh that does). mTLS: it starts.
    with pytest.raises(InsecureBind, match=r"cannot tell whether the mesh at 127\.0\.0\.1:1"):
        asyncio.run(start(tls=_server_tls(certs), require_token=True))
    assert asyncio.run(start(tls=_server_tls(certs, require=True))).startswith("https://")
    # --insecure: no probe, it starts.
    assert asyncio.run(start(require_token=True, insecure=True)).startswith("http://")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LLMESH_")}


def test_cli_gateway_refuses_a_non_loopback_bind_then_starts_with_insecure() -> None:
    cmd = [sys.executable, "-m", "llmesh", "gateway", "--control-plane", "127.0.0.1:1"]
    cmd += ["--listen", "0.0.0.0:0"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_env())
    assert refused.returncode == 1, refused.stderr
    assert "refusing to listen on 0.0.0.0:0" in refused.stderr
    assert "--insecure" in refused.stderr and "--tls-cert" in refused.stderr
    assert "--auth" in refused.stderr

    child = subprocess.Popen(
        [*cmd, "--insecure"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        match = re.search(r"http://0\.0\.0\.0:(\d+)/v1", line)
        assert match, (line, child.poll())
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{match.group(1)}/health", timeout=10)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        # It serves; the control plane it points at does not exist.
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
    finally:
        child.terminate()
        _, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert "INSECURE" in err
