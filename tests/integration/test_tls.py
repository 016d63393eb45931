"""A mesh with mutual TLS on every hop, etcd included, from `llmesh certs init` certificates.

etcd runs with ``--client-cert-auth``; the control plane, the inference worker, its replica
processes and the SDK all present certificates from the same CA and require them. Clients
without a certificate, with one from another CA, or in plaintext are refused.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmesh import ByzerLLM
from llmesh.cli import main as cli_main
from llmesh.common.errors import Unavailable
from llmesh.common.etcd import EtcdKV
from llmesh.common.etcd_security import EtcdSecurity
from llmesh.common.local_etcd import LocalEtcd
from llmesh.common.tls import TlsConfig, channel
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc

from .conftest import Mesh

HELLO = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates made by the CLI, as an operator would: ``llmesh certs init DIR``."""
    directory = tmp_path_factory.mktemp("certs")
    assert cli_main(["certs", "init", str(directory)]) == 0
    return directory


def _tls(certs: Path, name: str, *, require: bool = True) -> TlsConfig:
    return TlsConfig(
        cert=certs / f"{name}.pem",
        key=certs / f"{name}.key",
        ca=certs / "ca.pem",
        require_client_cert=require,
    )


@pytest.fixture(scope="module")
def tls_etcd(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """etcd serving TLS only, demanding client certificates from our CA."""
    etcd = LocalEtcd(
        tmp_path_factory.mktemp("tls-etcd") / "data", log_level="error", tls=_tls(certs, "etcd")
    )
    etcd.start()
    yield etcd
    etcd.stop()


@pytest.fixture(scope="module")
def tls_mesh(
    certs: Path, tls_etcd: LocalEtcd, test_model_dir: Path, embedding_model_dir: Path
) -> Iterator[tuple[Mesh, ByzerLLM]]:
    """Control plane + one inference worker, all mTLS; chat and embedding models deployed
    through the mTLS SDK (the deploy path)."""
    etcd_security = EtcdSecurity(
        ca=certs / "ca.pem", cert=certs / "client.pem", key=certs / "client.key"
    )
    mesh = Mesh(
        tls_etcd.endpoint,
        f"/llmesh-tls-{uuid.uuid4().hex[:6]}",
        tls=_tls(certs, "control-plane"),
        etcd_security=etcd_security,
    )
    address = mesh.start_control_plane()
    mesh.start_worker("w0", cpus=2, tls=_tls(certs, "inference-worker"))
    llm = ByzerLLM(control_plane=address, tls=_tls(certs, "client", require=False))
    llm.setup_num_workers(1).setup_cpus_per_worker(1).setup_infer_backend("transformers")
    llm.deploy(str(test_model_dir), "custom/llama", "chat", {"max_concurrency": 2})
    llm.setup_cpus_per_worker(0.5).setup_infer_backend("embedding")
    llm.deploy(str(embedding_model_dir), "custom/auto", "emb", {})
    yield mesh, llm
    llm.close()
    mesh.close()


def test_chat_streams_over_mtls(tls_mesh: Any) -> None:
    _, llm = tls_mesh
    items = list(llm.stream_chat_oai(HELLO, model="chat", llm_config={"max_length": 8}))
    assert len(items) >= 2
    assert items[-1][1]["finish_reason"] in ("stop", "length")


def test_async_chat_over_mtls(tls_mesh: Any) -> None:
    """The async transport (grpc.aio channels, chat sessions) presents the certificate too."""
    import asyncio

    _, llm = tls_mesh

    async def run() -> list[Any]:
        return [
            item
            async for item in llm.async_stream_chat_oai(
                HELLO, model="chat", llm_config={"max_length": 4}
            )
        ]

    assert asyncio.run(run())


def test_embeddings_over_mtls(tls_mesh: Any) -> None:
    _, llm = tls_mesh
    (vector,) = [r.output for r in llm.emb("emb", ["A man is eating food."])]
    assert len(vector) == 384


def test_replica_processes_serve_tls_only(tls_mesh: Any, certs: Path) -> None:
    """The replica process (spawned by the agent, settings passed explicitly) refuses a
    plaintext client and a client without a certificate."""
    mesh, _ = tls_mesh
    ((_, _, address),) = [r for r in mesh.replica_processes() if r[1] == "chat"]
    from llmesh.v1 import inference_service_pb2 as inf
    from llmesh.v1 import inference_service_pb2_grpc as inf_grpc

    for tls in (None, TlsConfig(ca=certs / "ca.pem")):
        with channel(address, tls) as ch:
            with pytest.raises(grpc.RpcError) as err:
                inf_grpc.InferenceServiceStub(ch).GetModelMeta(
                    inf.GetModelMetaRequest(model="chat"), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with channel(address, _tls(certs, "client", require=False)) as ch:
        meta = inf_grpc.InferenceServiceStub(ch).GetModelMeta(
            inf.GetModelMetaRequest(model="chat"), timeout=10
        )
        assert meta.extra["served_requests"]


@pytest.mark.parametrize("client", ["plaintext", "no client certificate", "another CA"])
def test_control_plane_refuses_clients_without_our_certificate(
    tls_mesh: Any, certs: Path, tmp_path: Path, client: str
) -> None:
    """What the SDK surfaces: Unavailable, saying the control plane is unavailable and why."""
    mesh, _ = tls_mesh
    tls: TlsConfig | None = None
    if client == "no client certificate":
        tls = TlsConfig(ca=certs / "ca.pem")
    elif client == "another CA":
        assert cli_main(["certs", "init", str(tmp_path / "other")]) == 0
        tls = _tls(tmp_path / "other", "client", require=False)
    with ByzerLLM(control_plane=mesh.address(), tls=tls) as stranger:
        with pytest.raises(Unavailable) as err:
            stranger.list_models()
    message = str(err.value)
    assert "control plane" in message and mesh.address() in message
    # And a sentence on which TLS setting to fix.
    hint = {
        "plaintext": "set LLMESH_TLS_CA",
        "no client certificate": "set LLMESH_TLS_CERT and LLMESH_TLS_KEY",
        "another CA": "The TLS handshake failed",
    }[client]
    assert hint in message


def test_etcd_refuses_clients_without_a_certificate(tls_etcd: LocalEtcd, certs: Path) -> None:
    import asyncio

    async def revision(security: EtcdSecurity | None) -> int:
        kv = EtcdKV(tls_etcd.endpoint, timeout=3, security=security)
        try:
            return await kv.current_revision()
        finally:
            await kv.close()

    for security in (None, EtcdSecurity(ca=certs / "ca.pem")):
        with pytest.raises(Unavailable):
            asyncio.run(revision(security))
    good = EtcdSecurity(ca=certs / "ca.pem", cert=certs / "client.pem", key=certs / "client.key")
    assert asyncio.run(revision(good)) > 0


def test_cli_worker_refuses_non_loopback_bind_without_tls(tmp_path: Path) -> None:
    """The real command: 0.0.0.0 is beyond loopback; it exits before touching etcd."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmesh",
            "trainer-worker",
            *("--listen", "0.0.0.0:0", "--gpus", "0", "--etcd", "127.0.0.1:1"),
            *("--jobs-dir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "refusing to listen on 0.0.0.0:0" in result.stderr
    assert "--insecure" in result.stderr and "--tls-cert" in result.stderr


def test_cli_refuses_to_send_the_etcd_password_in_clear(tmp_path: Path) -> None:
    """The real command: a password, no --etcd-ca, an etcd beyond loopback; it exits before
    binding or dialling anything."""
    import os

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmesh",
            "trainer-worker",
            *("--gpus", "0", "--etcd", "10.255.255.1:2379", "--etcd-user", "root"),
            *("--jobs-dir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LLMESH_ETCD_PASSWORD": "pw"},
    )
    assert result.returncode == 1, result.stderr
    assert "refusing to send the etcd password to 10.255.255.1:2379 in clear" in result.stderr
    assert "--etcd-ca" in result.stderr and "--insecure" in result.stderr


def test_control_plane_listed_workers_are_reachable(tls_mesh: Any, certs: Path) -> None:
    """A raw stub with the client certificate works (what grpcurl -cacert -cert -key does)."""
    mesh, _ = tls_mesh
    with channel(mesh.address(), _tls(certs, "client", require=False)) as ch:
        workers = cp_grpc.ControlPlaneServiceStub(ch).ListWorkers(
            cp.ListWorkersRequest(), timeout=10
        )
    assert [w.id for w in workers.workers] == ["w0"]


def test_cli_client_commands_take_tls_flags(
    tls_mesh: Any, certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mesh, _ = tls_mesh
    base = ["models", "--control_plane", mesh.address(), "--tls-ca", str(certs / "ca.pem")]
    client = ["--tls-cert", str(certs / "client.pem"), "--tls-key", str(certs / "client.key")]
    assert cli_main([*base, *client]) == 0
    assert "chat" in capsys.readouterr().out
    assert cli_main(base) == 1  # no client certificate: refused, one error line
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unavailable" in err
