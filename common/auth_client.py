"""Attaching a bearer token to every call a channel makes (unary and streams, sync and aio).

A client interceptor on the channel is the one place: every stub made on it sends
``authorization: Bearer <token>`` without each call site passing metadata. Used by the SDK
(``ByzerLLM(token=...)`` / ``LLMESH_TOKEN``) and by the node agent on its replica channels.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import Any

import grpc

from llmesh.common.auth import METADATA_KEY, TOKEN_ENV


def token_from_env(token: str | None = None) -> str | None:
    """``token`` when given (stripped, None if blank), else ``LLMESH_TOKEN``, else None."""
    value = token if token is not None else os.environ.get(TOKEN_ENV, "")
    value = value.strip()
    return value or None


def _with_token(metadata: Sequence[tuple[str, Any]] | None, token: str) -> list[tuple[str, Any]]:
    entries = [(k, v) for k, v in (metadata or ()) if k.lower() != METADATA_KEY]
    entries.append((METADATA_KEY, f"Bearer {token}"))
    return entries


class _SyncDetails(
    collections.namedtuple(
        "_SyncDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _SyncTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _SyncDetails(
            d.method,
            d.timeout,
            _with_token(d.metadata, self._token),
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def sync_channel_with_token(channel: grpc.Channel, token: str | None) -> grpc.Channel:
    """``channel`` sending ``token`` on every call (the channel itself when ``token`` is None)."""
    if not token:
        return channel
    return grpc.intercept_channel(channel, _SyncTokenInterceptor(token))


def _aio_details(d: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        d.method,
        d.timeout,
        grpc.aio.Metadata(*_with_token(list(d.metadata or ()), token)),
        d.credentials,
        d.wait_for_ready,
    )


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._token), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._token), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_aio_details(details, self._token), request_iterator)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_aio_details(details, self._token), request_iterator)


def aio_token_interceptors(token: str | None) -> list[grpc.aio.ClientInterceptor] | None:
    """Interceptors for ``grpc.aio.*_channel(..., interceptors=...)`` sending ``token``.

    None when ``token`` is None, so channels without a token stay uninstrumented.
    """
    if not token:
        return None
    return [
        _AioUnaryUnary(token),
        _AioUnaryStream(token),
        _AioStreamUnary(token),
        _AioStreamStream(token),
    ]
