"""TLS settings, the exposure rule and the certificates `llmesh certs init` makes."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from llmesh.common.certs import COMPONENTS, init_certs
from llmesh.common.etcd_security import EtcdSecurity
from llmesh.common.grpc_server import Server
from llmesh.common.tls import InsecureBind, TlsConfig, check_bind, is_loopback


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    init_certs(directory, hosts=["mesh.example.org", "10.1.2.3"])
    return directory


def test_certs_init_makes_a_ca_and_a_pair_per_component(certs: Path) -> None:
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (certs.stat().st_mode & 0o777) == 0o700
    for name in COMPONENTS:
        cert = x509.load_pem_x509_certificate((certs / f"{name}.pem").read_bytes())
        assert cert.issuer == ca.subject
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert (certs / f"{name}.key").stat().st_mode & 0o077 == 0  # keys are private
        if name == "client":
            # Handed to users: client authentication only, no host names, so it cannot
            # impersonate a server.
            assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
            with pytest.raises(x509.ExtensionNotFound):
                cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            continue
        assert ExtendedKeyUsageOID.SERVER_AUTH in usages
        assert ExtendedKeyUsageOID.CLIENT_AUTH in usages
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        assert {"localhost", "mesh.example.org"} <= set(dns)
        assert {"127.0.0.1", "::1", "10.1.2.3"} <= ips


def test_certs_init_will_not_replace_a_ca_unless_forced(certs: Path) -> None:
    before = (certs / "ca.pem").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        init_certs(certs)
    assert (certs / "ca.pem").read_bytes() == before


def test_certs_init_force_rewrites_keys_private_and_never_through_a_symlink(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "certs"
    init_certs(directory)
    (directory / "control-plane.key").chmod(0o644)  # an operator's slip, or an old umask
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not a key")
    (directory / "client.key").unlink()
    (directory / "client.key").symlink_to(elsewhere)
    directory.chmod(0o755)
    init_certs(directory, force=True)
    for name in ("ca", *COMPONENTS):
        key = directory / f"{name}.key"
        assert not key.is_symlink() and key.stat().st_mode & 0o777 == 0o600, name
    assert elsewhere.read_text() == "not a key"
    assert directory.stat().st_mode & 0o777 == 0o700


def test_settings_come_from_flags_then_env(certs: Path) -> None:
    env = {
        "LLMESH_TLS_CERT": str(certs / "client.pem"),
        "LLMESH_TLS_KEY": str(certs / "client.key"),
        "LLMESH_TLS_CA": str(certs / "ca.pem"),
        "LLMESH_TLS_REQUIRE_CLIENT_CERT": "true",
    }
    config = TlsConfig.resolve(env=env)
    assert config is not None and config.require_client_cert
    assert config.cert == certs / "client.pem"
    # A flag wins over its variable; the variables a config gives round-trip.
    flagged = TlsConfig.resolve(cert=certs / "etcd.pem", key=certs / "etcd.key", env=env)
    assert flagged is not None and flagged.cert == certs / "etcd.pem"
    assert TlsConfig.from_env(config.to_env()) == config
    assert TlsConfig.resolve(env={}) is None


def test_a_flagged_cert_or_key_never_pairs_with_the_environment(certs: Path) -> None:
    """--tls-cert with LLMESH_TLS_KEY of another pair would be a mismatched pair: a flag for
    either one means the environment gives neither (so the missing half is named)."""
    env = {
        "LLMESH_TLS_CERT": str(certs / "client.pem"),
        "LLMESH_TLS_KEY": str(certs / "client.key"),
        "LLMESH_ETCD_CERT": str(certs / "client.pem"),
        "LLMESH_ETCD_KEY": str(certs / "client.key"),
    }
    with pytest.raises(ValueError, match="--tls-key"):
        TlsConfig.resolve(cert=certs / "etcd.pem", env=env)
    with pytest.raises(ValueError, match="--tls-key"):
        TlsConfig.resolve(key=certs / "etcd.key", env=env)
    with pytest.raises(ValueError, match="--etcd-key"):
        EtcdSecurity.resolve(cert=certs / "etcd.pem", env=env)
    both = EtcdSecurity.resolve(cert=certs / "etcd.pem", key=certs / "etcd.key", env=env)
    assert both is not None and (both.cert, both.key) == (certs / "etcd.pem", certs / "etcd.key")


def test_incomplete_settings_say_what_to_pass(certs: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--tls-key"):
        TlsConfig(cert=certs / "client.pem")
    with pytest.raises(ValueError, match="--tls-ca"):
        TlsConfig(cert=certs / "client.pem", key=certs / "client.key", require_client_cert=True)
    with pytest.raises(ValueError, match="certs init"):
        TlsConfig(ca=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="--tls-cert"):
        TlsConfig(ca=certs / "ca.pem").server_credentials()
    with pytest.raises(ValueError, match="--etcd-password"):
        EtcdSecurity(user="root")


def test_etcd_password_stays_out_of_repr() -> None:
    security = EtcdSecurity(user="root", password="hunter2-secret")
    assert "root" in repr(security) and "hunter2-secret" not in repr(security)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("", False),
        ("10.1.2.3", False),
    ],
)
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_non_loopback_bind_needs_tls_and_authentication(
    certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tls = TlsConfig(cert=certs / "control-plane.pem", key=certs / "control-plane.key")
    check_bind("127.0.0.1:0", tls=None, authenticated=False, insecure=False)
    with pytest.raises(InsecureBind, match=r"--tls-cert.*--insecure"):
        check_bind("0.0.0.0:50051", tls=None, authenticated=False, insecure=False)
    with pytest.raises(InsecureBind, match=r"authentication \(client certificates"):
        check_bind("0.0.0.0:50051", tls=tls, authenticated=False, insecure=False)
    check_bind("0.0.0.0:50051", tls=tls, authenticated=True, insecure=False)
    # A Unix socket is local whatever its path.
    check_bind("unix:/tmp/llmesh.sock", tls=None, authenticated=False, insecure=False)
    with caplog.at_level(logging.WARNING, logger="llmesh.common.tls"):
        check_bind("0.0.0.0:50051", tls=None, authenticated=False, insecure=True)
    assert "INSECURE" in caplog.text


def test_server_refuses_wildcard_bind_and_starts_with_insecure() -> None:
    with pytest.raises(InsecureBind):
        Server([], listen="0.0.0.0:0")

    async def start_insecure() -> int:
        server = Server([], listen="0.0.0.0:0", insecure=True)
        await server.start()
        await server.stop(0)
        return server.port

    assert asyncio.run(start_insecure()) > 0


def test_full_mtls_binds_beyond_loopback_without_insecure(certs: Path) -> None:
    """Required client certificates are authentication: 0.0.0.0 serves without --insecure
    (and answers an mTLS client); TLS that lets anyone in still refuses."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from llmesh.common.tls import aio_channel

    mtls = TlsConfig(
        cert=certs / "control-plane.pem",
        key=certs / "control-plane.key",
        ca=certs / "ca.pem",
        require_client_cert=True,
    )
    client = TlsConfig(cert=certs / "client.pem", key=certs / "client.key", ca=certs / "ca.pem")

    async def serve() -> int:
        server = Server([], listen="0.0.0.0:0", tls=mtls)
        await server.start()
        try:
            async with aio_channel(f"127.0.0.1:{server.port}", client) as ch:
                reply = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
            return reply.status
        finally:
            await server.stop(0)

    assert asyncio.run(serve()) == health_pb2.HealthCheckResponse.SERVING
    one_way = TlsConfig(cert=mtls.cert, key=mtls.key, ca=mtls.ca, require_client_cert=False)
    with pytest.raises(InsecureBind, match="--tls-require-client-cert"):
        Server([], listen="0.0.0.0:0", tls=one_way)


@pytest.mark.parametrize(
    ("code", "details"),
    [
        ("UNAUTHENTICATED", "etcdserver: invalid auth token"),
        # After any user or role change (etcd's ErrGRPCAuthOldRevision): a new token fixes it.
        ("INVALID_ARGUMENT", "etcdserver: revision of auth store is old"),
        (None, "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"),
    ],
)
def test_what_counts_as_a_stale_etcd_token(code: str | None, details: str) -> None:
    import grpc

    from llmesh.common.etcd_security import is_stale_token

    status = None if code is None else grpc.StatusCode[code]
    assert is_stale_token(status, details)
    assert not is_stale_token(grpc.StatusCode.PERMISSION_DENIED, details)
    assert not is_stale_token(status, "etcdserver: permission denied")


def test_etcd_password_never_crosses_the_network_in_clear(
    certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from llmesh.common.etcd_security import CleartextPassword, check_etcd_credentials

    password = EtcdSecurity(user="root", password="pw")
    with pytest.raises(CleartextPassword, match=r"10\.1\.2\.3:2379.*--etcd-ca.*--insecure"):
        check_etcd_credentials("10.1.2.3:2379", password, insecure=False)
    check_etcd_credentials("127.0.0.1:2379", password, insecure=False)  # loopback: fine
    check_etcd_credentials("localhost:2379", password, insecure=False)
    tls = EtcdSecurity(ca=certs / "ca.pem", user="root", password="pw")
    check_etcd_credentials("10.1.2.3:2379", tls, insecure=False)  # over TLS: fine
    check_etcd_credentials("10.1.2.3:2379", None, insecure=False)  # no password to leak
    with caplog.at_level(logging.WARNING, logger="llmesh.common.etcd_security"):
        check_etcd_credentials("10.1.2.3:2379", password, insecure=True)
    assert "INSECURE" in caplog.text
