"""How llmesh reaches a secured etcd: client TLS and etcd's own user/password authentication.

Both etcd clients (the control plane's :class:`~llmesh.common.etcd.EtcdKV` and the workers'
aetcd client) open their channel with :func:`etcd_channel`, so they honour the same settings.

etcd's authentication is a token: ``Auth.Authenticate(name, password)`` returns one, and every
call carries it as the ``token`` metadata. :class:`EtcdToken`'s interceptors add it to every call
on the channel and, when etcd answers that the token is invalid or expired (etcd forgets its
"simple" tokens on restart and after their TTL), authenticates again and retries a unary call
once; a stream fails and its caller's retry gets the fresh token.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aetcd import rpc

from llmesh.common.errors import FailedPrecondition
from llmesh.common.etcd_keys import parse_endpoint
from llmesh.common.tls import TlsConfig, aio_channel, is_loopback

log = logging.getLogger(__name__)

CA_ENV = "LLMESH_ETCD_CA"
CERT_ENV = "LLMESH_ETCD_CERT"
KEY_ENV = "LLMESH_ETCD_KEY"
USER_ENV = "LLMESH_ETCD_USER"
PASSWORD_ENV = "LLMESH_ETCD_PASSWORD"
#: Prefix of every etcd security variable above (``LLMESH_ETCD`` alone is the endpoint).
ENV_PREFIX = "LLMESH_ETCD_"

_AUTHENTICATE = "/etcdserverpb.Auth/Authenticate"
# etcd's words for a token it no longer knows or no longer honours (rpctypes
# ErrInvalidAuthToken and friends). "revision of auth store is old" (ErrAuthOldRevision) comes
# after any user or role change: the token predates it, and a new one fixes it.
_STALE_TOKEN = (
    "invalid auth token",
    "auth token is expired",
    "user name is empty",
    "revision of auth store is old",
)


@dataclass(frozen=True)
class EtcdSecurity:
    """How to reach etcd: TLS (trust ``ca``, present ``cert``/``key``) and user/password.

    Args:
        ca: PEM CA that signed etcd's server certificate; None with ``cert`` set means the
            system roots.
        cert: PEM client certificate, for an etcd run with ``--client-cert-auth``.
        key: PEM key of ``cert``.
        user: etcd user name (etcd with ``auth enable``).
        password: that user's password.
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs or tracebacks

    def __post_init__(self) -> None:
        if (self.user is None) != (self.password is None):
            raise ValueError(
                "etcd authentication needs the user and the password together: pass both "
                f"--etcd-user and --etcd-password (or {USER_ENV} and {PASSWORD_ENV})"
            )
        if (self.cert is None) != (self.key is None):
            raise ValueError(
                "a client certificate for etcd needs its key: pass both --etcd-cert and "
                f"--etcd-key (or {CERT_ENV} and {KEY_ENV})"
            )
        self.tls  # noqa: B018 - validate the files now, not at the first call

    @property
    def tls(self) -> TlsConfig | None:
        """The channel's TLS settings; None for plaintext."""
        if self.ca is None and self.cert is None and self.key is None:
            return None
        return TlsConfig(cert=self.cert, key=self.key, ca=self.ca)

    @classmethod
    def resolve(
        cls,
        *,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        user: str | None = None,
        password: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> EtcdSecurity | None:
        """Settings from explicit values, each falling back to its ``LLMESH_ETCD_*`` variable.

        ``cert`` and ``key`` fall back together: when either is given, neither variable is
        read.

        Returns:
            None when nothing is set (plaintext, no authentication).
        """
        env = os.environ if env is None else env
        # The certificate and key are one pair: given either explicitly, the environment
        # supplies neither.
        if not cert and not key:
            cert, key = env.get(CERT_ENV), env.get(KEY_ENV)
        values = {
            "ca": ca or env.get(CA_ENV) or None,
            "cert": cert or None,
            "key": key or None,
        }
        user = user or env.get(USER_ENV) or None
        password = password or env.get(PASSWORD_ENV) or None
        if not any(values.values()) and user is None and password is None:
            return None
        paths = {k: Path(v).expanduser() if v else None for k, v in values.items()}
        return cls(**paths, user=user, password=password)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EtcdSecurity | None:
        """Settings from the flags :func:`add_etcd_arguments` added, with env fallbacks."""
        return cls.resolve(
            ca=getattr(args, "etcd_ca", None),
            cert=getattr(args, "etcd_cert", None),
            key=getattr(args, "etcd_key", None),
            user=getattr(args, "etcd_user", None),
            password=getattr(args, "etcd_password", None),
        )

    def to_argv(self) -> list[str]:
        """Flags giving these settings to an ``llmesh`` subcommand (the password goes by env:
        see :meth:`secret_env`, so it never shows in ``ps``)."""
        argv: list[str] = []
        for flag, path in (
            ("--etcd-ca", self.ca),
            ("--etcd-cert", self.cert),
            ("--etcd-key", self.key),
        ):
            if path is not None:
                argv += [flag, str(Path(path).absolute())]
        if self.user is not None:
            argv += ["--etcd-user", self.user]
        return argv

    def secret_env(self) -> dict[str, str]:
        """The environment a child needs besides :meth:`to_argv`: the etcd password."""
        return {PASSWORD_ENV: self.password} if self.password is not None else {}


class CleartextPassword(FailedPrecondition):
    """The etcd password would cross the network unencrypted."""


def check_etcd_credentials(
    endpoint: str | None, security: EtcdSecurity | None, *, insecure: bool
) -> None:
    """Refuse to send the etcd password in clear text beyond this machine.

    etcd's ``Authenticate`` call carries the password itself, so user/password without TLS
    to etcd is only acceptable on loopback, or when the operator passed ``--insecure``.
    Runs once at startup (the loopback check may resolve a name).

    Args:
        endpoint: etcd's ``host:port`` (None: ``LLMESH_ETCD`` or the default).
        security: how the process reaches etcd.
        insecure: the process runs with ``--insecure``: allow it, with a warning.

    Raises:
        CleartextPassword: a password, no TLS, a non-loopback etcd and no ``--insecure``.
    """
    if security is None or security.password is None or security.tls is not None:
        return
    host, port = parse_endpoint(endpoint)
    if is_loopback(host):
        return
    if insecure:
        log.warning(
            "INSECURE: sending the etcd password to %s:%s without TLS; started anyway because "
            "--insecure was given.",
            host,
            port,
        )
        return
    raise CleartextPassword(
        f"refusing to send the etcd password to {host}:{port} in clear text: pass --etcd-ca "
        f"(or {CA_ENV}) to reach etcd over TLS, or pass --insecure to send it anyway"
    )


def without_etcd_credentials(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without any ``LLMESH_ETCD_*`` variable, for processes that never talk to etcd.

    Replica processes and training ranks run user-supplied models and code: they must not
    inherit the agent's etcd password (nor its etcd client key), which would let them rewrite
    the whole mesh's state.
    """
    return {name: value for name, value in env.items() if not name.startswith(ENV_PREFIX)}


class EtcdToken:
    """etcd's auth token for one channel: fetched on first use, fetched again when stale.

    Args:
        user: etcd user name.
        password: its password.
        timeout: deadline of the Authenticate call, in seconds.
        max_age: seconds a token is used before a new one is fetched. etcd's simple tokens
            live 5 minutes (``--auth-token-ttl``) and vanish when etcd restarts; a stream
            refused for its token cannot be retried here, so tokens are renewed well before
            etcd would expire them, and dropped when a call or stream is refused.
    """

    def __init__(
        self, user: str, password: str, *, timeout: float = 5.0, max_age: float = 60.0
    ) -> None:
        self.user = user
        self.password = password
        self.timeout = timeout
        self.max_age = max_age
        self.channel: grpc.aio.Channel | None = None  # set by etcd_channel
        self._token: str | None = None
        self._fetched = 0.0
        self._lock = asyncio.Lock()
        # The loop keeps only weak references to tasks: hold the stream checks until done.
        self._checks: set[asyncio.Future[None]] = set()

    def _usable(self, stale: str | None) -> bool:
        return (
            self._token is not None
            and self._token != stale
            and time.monotonic() - self._fetched < self.max_age
        )

    async def get(self, stale: str | None = None) -> str:
        """The current token; a new one when there is none, it is old, or it is ``stale``."""
        if self._usable(stale):
            assert self._token is not None
            return self._token
        async with self._lock:
            # Another call may have refreshed it while this one waited.
            if not self._usable(stale):
                assert self.channel is not None
                try:
                    response = await rpc.AuthStub(self.channel).Authenticate(
                        rpc.AuthenticateRequest(name=self.user, password=self.password),
                        timeout=self.timeout,
                    )
                except grpc.aio.AioRpcError as err:
                    if (
                        err.code() == grpc.StatusCode.FAILED_PRECONDITION
                        and "authentication is not enabled" in (err.details() or "")
                    ):
                        raise FailedPrecondition(
                            "etcd has authentication disabled but llmesh was given etcd "
                            f"credentials: drop --etcd-user / --etcd-password ({USER_ENV} / "
                            f"{PASSWORD_ENV}), or enable it in etcd (`etcdctl auth enable`)"
                        ) from err
                    raise
                self._token = response.token
                self._fetched = time.monotonic()
            assert self._token is not None
            return self._token

    def forget(self, token: str | None = None) -> None:
        """``token`` (None: the current one) was refused: the next call authenticates again."""
        if token is None or self._token == token:
            self._token = None

    def watch_call(self, call: Any, token: str) -> Any:
        """Forget ``token`` when the stream ``call`` ends refused for it."""

        async def check() -> None:
            try:
                code, details = await call.code(), await call.details()
            except Exception:  # noqa: BLE001 - a cancelled call has nothing to tell
                return
            if is_stale_token(code, details):
                self.forget(token)

        def schedule(_: Any) -> None:
            task = asyncio.ensure_future(check())
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

        call.add_done_callback(schedule)
        return call

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """One interceptor per call kind (grpc.aio files each under a single kind)."""
        return [_UnaryUnary(self), _UnaryStream(self), _StreamStream(self)]


def _with_token(
    details: grpc.aio.ClientCallDetails, token: str, timeout: float | None = None
) -> grpc.aio.ClientCallDetails:
    """``details`` carrying ``token``; ``timeout`` (when given) replaces its deadline."""
    metadata = [(k, v) for k, v in (details.metadata or ()) if k != "token"]
    metadata.append(("token", token))
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout if timeout is None else timeout,
        metadata=grpc.aio.Metadata(*metadata),
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


def _is_authenticate(details: grpc.aio.ClientCallDetails) -> bool:
    method = details.method
    if isinstance(method, bytes):
        method = method.decode()
    return method == _AUTHENTICATE


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """Token on every unary call; a call refused for a stale token is retried once."""

    def __init__(self, token: EtcdToken) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if _is_authenticate(details):
            return await continuation(details, request)
        started = time.monotonic()
        token = await self.token.get()
        call = await continuation(_with_token(details, token), request)
        try:
            await call
        except grpc.aio.AioRpcError as err:
            if not stale_token(err):
                raise
            token = await self.token.get(stale=token)
            # The retry gets what is left of the caller's deadline, not a second one.
            remaining = None
            if details.timeout is not None:
                remaining = details.timeout - (time.monotonic() - started)
                if remaining <= 0:
                    raise
            call = await continuation(_with_token(details, token, remaining), request)
        return call


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    """Token on every server stream (a stale one fails the stream; its retry gets a new one)."""

    def __init__(self, token: EtcdToken) -> None:
        self.token = token

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        token = await self.token.get()
        call = await continuation(_with_token(details, token), request)
        return self.token.watch_call(call, token)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    """Token on every bidi stream (watches, lease keepalives)."""

    def __init__(self, token: EtcdToken) -> None:
        self.token = token

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        token = await self.token.get()
        call = await continuation(_with_token(details, token), request_iterator)
        return self.token.watch_call(call, token)


def is_stale_token(code: grpc.StatusCode | None, details: str | None) -> bool:
    """Whether a status (or a watch's cancel reason, with ``code`` None) says etcd refused
    the call because its auth token is missing, unknown or expired."""
    if code not in (None, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
        return False
    return any(s in (details or "") for s in _STALE_TOKEN)


def stale_token(err: grpc.RpcError) -> bool:
    """Whether etcd refused a call because its auth token is unknown or expired."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else ""
    return code is not None and is_stale_token(code, details)


def etcd_channel(
    target: str,
    security: EtcdSecurity | None,
    options: Sequence[tuple[str, Any]] = (),
) -> tuple[grpc.aio.Channel, EtcdToken | None]:
    """A grpc.aio channel to etcd with the given TLS and authentication (None: neither).

    Returns:
        The channel, and its token when etcd authentication is on (to :meth:`EtcdToken.forget`
        one a watch was refused for).
    """
    token = None
    if security is not None and security.user is not None and security.password is not None:
        token = EtcdToken(security.user, security.password)
    channel = aio_channel(
        target,
        security.tls if security is not None else None,
        options,
        interceptors=token.interceptors() if token is not None else None,
    )
    if token is not None:
        token.channel = channel
    return channel, token


def add_etcd_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--etcd-ca --etcd-cert --etcd-key --etcd-user --etcd-password`` to a subcommand."""
    parser.add_argument("--etcd-ca", default=None, help=f"CA of etcd's certificate (${CA_ENV})")
    parser.add_argument(
        "--etcd-cert", default=None, help=f"client certificate for etcd (${CERT_ENV})"
    )
    parser.add_argument("--etcd-key", default=None, help=f"key of --etcd-cert (${KEY_ENV})")
    parser.add_argument("--etcd-user", default=None, help=f"etcd user name (${USER_ENV})")
    parser.add_argument(
        "--etcd-password",
        default=None,
        help=f"etcd password (prefer ${PASSWORD_ENV}: flags show in ps)",
    )
