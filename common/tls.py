"""TLS and mutual TLS for every llmesh server and channel, and the exposure check.

One :class:`TlsConfig` per process serves both its gRPC server and its outgoing channels: the
certificate and key it presents (as a server, and as a client certificate when it dials a
peer that requires one), the CA it trusts, and whether its server demands client
certificates (mTLS). ``llmesh certs init`` makes component certificates that carry both the
serverAuth and clientAuth usages, so one pair does both jobs (the users' ``client`` certificate
has clientAuth only).

Plaintext is the no-TLS case of the same code path: :func:`channel` and :func:`aio_channel`
are the only places llmesh opens a gRPC channel, and ``tls=None`` gives an insecure one.
Certificate checks use the host of the address dialled, so a certificate must name it (a
DNS or IP subjectAltName) — no ``grpc.ssl_target_name_override``.

:func:`check_bind` is the one exposure rule: loopback binds (and Unix sockets) are always fine;
anything else (``0.0.0.0`` and ``::`` included) needs TLS and authentication, or an explicit
``--insecure``. Required client certificates (mTLS) count as authentication.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from llmesh.common.errors import FailedPrecondition

log = logging.getLogger(__name__)

CERT_ENV = "LLMESH_TLS_CERT"
KEY_ENV = "LLMESH_TLS_KEY"
CA_ENV = "LLMESH_TLS_CA"
REQUIRE_CLIENT_CERT_ENV = "LLMESH_TLS_REQUIRE_CLIENT_CERT"
#: Every variable :meth:`TlsConfig.from_env` reads.
ENV_NAMES = (CERT_ENV, KEY_ENV, CA_ENV, REQUIRE_CLIENT_CERT_ENV)
#: Set (to 1) for processes a server started with ``--insecure`` spawns (replica processes).
INSECURE_ENV = "LLMESH_INSECURE"

_TRUE = ("1", "true", "yes", "on")

#: What the exposure refusal offers as authentication: one place to change when more land.
AUTHENTICATION_OPTIONS = (
    "client certificates (--tls-require-client-cert, i.e. mTLS) or bearer tokens (--auth)"
)


def env_flag(value: str | None) -> bool:
    """Whether an environment variable's value means "on" (1, true, yes, on)."""
    return (value or "").strip().lower() in _TRUE


class InsecureBind(FailedPrecondition):
    """A server was asked to listen beyond loopback without TLS and authentication."""


@dataclass(frozen=True)
class TlsConfig:
    """A process's TLS settings, for its server and for the channels it opens.

    Args:
        cert: PEM certificate (chain) this process presents; a server needs it, a client
            presents it when the server requires client certificates.
        key: PEM private key of ``cert``.
        ca: PEM CA bundle to trust: the peers' certificates must chain to it. None on a
            client means the system's trusted roots; on a server it is required with
            ``require_client_cert``.
        require_client_cert: the server refuses clients without a certificate from ``ca``.
    """

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError(
                "TLS needs the certificate and its key together: pass both --tls-cert and "
                f"--tls-key (or {CERT_ENV} and {KEY_ENV})"
            )
        if self.require_client_cert and self.ca is None:
            raise ValueError(
                "requiring client certificates needs the CA that signs them: pass --tls-ca "
                f"(or {CA_ENV})"
            )
        for name, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if path is not None and not Path(path).is_file():
                raise ValueError(
                    f"TLS {name} file {path} does not exist; make one with "
                    "`llmesh certs init DIR` or point at your organisation's"
                )

    @classmethod
    def resolve(
        cls,
        *,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        ca: str | Path | None = None,
        require_client_cert: bool | None = None,
        env: Mapping[str, str] | None = None,
    ) -> TlsConfig | None:
        """Settings from explicit values, each falling back to its ``LLMESH_TLS_*`` variable.

        ``cert`` and ``key`` fall back together: when either is given, neither variable is
        read.

        Returns:
            None when neither names a certificate nor a CA (plaintext).
        """
        env = os.environ if env is None else env
        # The certificate and key are one pair: given either explicitly, the environment
        # supplies neither (a flag's certificate with another pair's key cannot work).
        if not cert and not key:
            cert, key = env.get(CERT_ENV), env.get(KEY_ENV)
        cert, key = cert or None, key or None
        ca = ca or env.get(CA_ENV) or None
        if require_client_cert is None:
            require_client_cert = env_flag(env.get(REQUIRE_CLIENT_CERT_ENV))
        if cert is None and key is None and ca is None:
            if require_client_cert:
                raise ValueError(
                    "--tls-require-client-cert needs TLS: pass --tls-cert, --tls-key and --tls-ca"
                )
            return None
        return cls(
            cert=Path(cert).expanduser() if cert else None,
            key=Path(key).expanduser() if key else None,
            ca=Path(ca).expanduser() if ca else None,
            require_client_cert=bool(require_client_cert),
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TlsConfig | None:
        """Settings from ``LLMESH_TLS_CERT`` / ``_KEY`` / ``_CA`` / ``_REQUIRE_CLIENT_CERT``."""
        return cls.resolve(env=env)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TlsConfig | None:
        """Settings from the flags :func:`add_tls_arguments` added, with env fallbacks."""
        return cls.resolve(
            cert=getattr(args, "tls_cert", None),
            key=getattr(args, "tls_key", None),
            ca=getattr(args, "tls_ca", None),
            require_client_cert=getattr(args, "tls_require_client_cert", None) or None,
        )

    def to_env(self) -> dict[str, str]:
        """The ``LLMESH_TLS_*`` variables that make :meth:`from_env` give these settings."""
        env = {REQUIRE_CLIENT_CERT_ENV: "1" if self.require_client_cert else "0"}
        for name, path in ((CERT_ENV, self.cert), (KEY_ENV, self.key), (CA_ENV, self.ca)):
            if path is not None:
                env[name] = str(Path(path).absolute())
        return env

    def to_argv(self) -> list[str]:
        """The command-line flags that give these settings to an ``llmesh`` subcommand."""
        argv: list[str] = []
        for flag, path in (
            ("--tls-cert", self.cert),
            ("--tls-key", self.key),
            ("--tls-ca", self.ca),
        ):
            if path is not None:
                argv += [flag, str(Path(path).absolute())]
        if self.require_client_cert:
            argv.append("--tls-require-client-cert")
        return argv

    @functools.cached_property
    def _pem(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        # Read once: the SDK opens a channel per replica address. Rotating certificates means
        # restarting the process (or making a new client). The first read blocks briefly; it
        # happens when a server is built or a client's first channel opens (startup), and the
        # files are small local PEMs, so it stays on the loop rather than in a thread.
        def read(path: Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return read(self.cert), read(self.key), read(self.ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for a server: present ``cert``, and demand client certificates when set.

        Raises:
            ValueError: no certificate and key to serve with.
        """
        cert, key, ca = self._pem
        if cert is None or key is None:
            raise ValueError(
                f"TLS is configured (a CA: --tls-ca or {CA_ENV}) but a server needs its own "
                f"certificate and key too: pass --tls-cert and --tls-key (or {CERT_ENV} and "
                f"{KEY_ENV}; `llmesh certs init DIR` makes a set), or unset the TLS settings "
                "to serve plaintext on loopback"
            )
        return grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=ca if self.require_client_cert else None,
            require_client_auth=self.require_client_cert,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for a channel: trust ``ca`` and present ``cert`` as a client certificate."""
        cert, key, ca = self._pem
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )


def https_files(tls: TlsConfig | None) -> dict[str, str | None]:
    """``certfile``/``keyfile`` for an HTTP endpoint served beside a gRPC server with ``tls``
    (``/metrics``): the same certificate, so a TLS server's metrics are not plaintext."""
    if tls is None or tls.cert is None or tls.key is None:
        return {"certfile": None, "keyfile": None}
    return {"certfile": str(tls.cert), "keyfile": str(tls.key)}


def channel(
    address: str, tls: TlsConfig | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A blocking gRPC channel to ``address``: TLS with ``tls``, plaintext when it is None."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.channel_credentials(), options=list(options))


def aio_channel(
    address: str,
    tls: TlsConfig | None,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address``: TLS with ``tls``, plaintext when it is None."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(
        address, tls.channel_credentials(), options=list(options), interceptors=interceptors
    )


def connect_hint(details: str, tls: TlsConfig | None) -> str:
    """A sentence on what TLS setting may be wrong, for a client that could not connect.

    gRPC reports a refused handshake as a plain "Socket closed" when the server hung up
    (plaintext to a TLS server, no client certificate, one from another CA), so the hint is
    worded as a possibility unless the handshake itself named the failure.
    """
    if "handshake" in details.lower() or "TSI_" in details or "SSL" in details:
        return (
            f" The TLS handshake failed: check that the CA (--tls-ca / {CA_ENV}) signed the "
            "server's certificate and that the certificate names the host dialled."
        )
    if "Socket closed" not in details:
        return ""
    if tls is None:
        return (
            f" If the server uses TLS, set {CA_ENV} (and {CERT_ENV} / {KEY_ENV} when it "
            "requires client certificates)."
        )
    if tls.cert is None:
        return (
            f" If the server requires client certificates, set {CERT_ENV} and {KEY_ENV} "
            "(or --tls-cert / --tls-key)."
        )
    return (
        " If the server requires client certificates, check that yours is signed by the CA "
        "it trusts."
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP or a name) reaches only this machine.

    ``0.0.0.0``, ``::`` and the empty host bind every interface, so they are not loopback; a
    name counts when every address it resolves to is loopback.
    """
    host = host.strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def check_bind(listen: str, *, tls: TlsConfig | None, authenticated: bool, insecure: bool) -> None:
    """Refuse to expose a server beyond loopback without TLS and authentication.

    Runs once, at server construction: the name lookup in :func:`is_loopback` may block
    briefly, which is acceptable before the server starts (never on a serving path).

    Args:
        listen: the ``host:port`` the server is about to bind, or ``unix:PATH``.
        tls: the server's TLS settings (None: plaintext).
        authenticated: callers must authenticate: client certificates are required (mTLS)
            or a bearer-token interceptor is installed.
        insecure: the operator passed ``--insecure``: start anyway, with a loud warning.

    Raises:
        InsecureBind: a non-loopback bind lacks TLS or authentication and ``insecure`` is off.
    """
    # A Unix socket is reachable only through the file system of this machine: local.
    if listen.startswith(("unix:", "unix-abstract:")):
        return
    host = listen.rpartition(":")[0]
    if is_loopback(host):
        return
    missing = []
    if tls is None or tls.cert is None:
        missing.append("TLS (--tls-cert, --tls-key and --tls-ca; `llmesh certs init DIR`)")
    if not authenticated:
        missing.append(f"authentication ({AUTHENTICATION_OPTIONS})")
    if not missing:
        return
    if insecure:
        log.warning(
            "INSECURE: serving on %s, beyond loopback, without %s. Anyone who can reach this "
            "address can use it. Started anyway because --insecure was given.",
            listen,
            " and ".join(missing),
        )
        return
    raise InsecureBind(
        f"refusing to listen on {listen} (beyond loopback) without {' and '.join(missing)}; "
        "pass them, bind 127.0.0.1, or pass --insecure to start anyway"
    )


def add_tls_arguments(parser: argparse.ArgumentParser, *, server: bool = True) -> None:
    """Add ``--tls-cert --tls-key --tls-ca`` (and, for servers, ``--tls-require-client-cert``
    and ``--insecure``) to a subcommand; each falls back to its ``LLMESH_TLS_*`` variable."""
    parser.add_argument(
        "--tls-cert", default=None, help=f"PEM certificate to present (default ${CERT_ENV})"
    )
    parser.add_argument("--tls-key", default=None, help=f"PEM key of --tls-cert (${KEY_ENV})")
    parser.add_argument(
        "--tls-ca", default=None, help=f"PEM CA bundle to trust (default ${CA_ENV})"
    )
    if server:
        parser.add_argument(
            "--tls-require-client-cert",
            action="store_true",
            default=None,
            help=f"mTLS: refuse clients without a certificate from --tls-ca "
            f"(${REQUIRE_CLIENT_CERT_ENV})",
        )
        parser.add_argument(
            "--insecure",
            action="store_true",
            help="start even when binding beyond loopback without TLS and authentication "
            "(mTLS or tokens)",
        )
