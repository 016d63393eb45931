"""The SDK clients the gateway talks to the mesh with: one per caller token.

The mesh checks tokens itself (each server, including scoped tokens on every chat request),
and a chat session to a replica is authenticated once, when it opens, with the token of its
channel. So the gateway keeps one :class:`~llmesh.client.ByzerLLM` per bearer token it has
seen recently (its channels, sessions and route watches carry that token) and forwards each
request on the client of the caller's token. It never checks or stores tokens beyond this
bounded cache: a token the mesh refuses fails there, in the mesh's words, and ages out.

A request leases its client (:meth:`ClientPool.lease`) for its whole life, a streamed one
until the stream ends or its caller goes away. Only idle clients are closed: closing one that
still carries requests would cancel them, and an accepted request is never lost to the cache.
While every client is busy the pool holds more than ``max_clients`` and closes the extra ones
as they go idle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator

from llmesh.client import ByzerLLM
from llmesh.common.tls import TlsConfig

log = logging.getLogger(__name__)

#: How many tokens' clients stay open at once; the least recently used idle one is closed first.
DEFAULT_MAX_CLIENTS = 64


class ClientPool:
    """SDK clients by caller token; beyond ``max_clients`` the least recently used idle one
    is closed.

    All methods run on the gateway's event loop.

    Args:
        control_plane: ``host:port`` of the control plane.
        tls: TLS for the gateway's channels into the mesh (None: plaintext).
        max_clients: the most clients (tokens) kept open while some are idle.
    """

    def __init__(
        self,
        control_plane: str,
        *,
        tls: TlsConfig | None = None,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self.control_plane = control_plane
        self.tls = tls
        self.max_clients = max(1, max_clients)
        self._clients: collections.OrderedDict[str, ByzerLLM] = collections.OrderedDict()
        #: Running requests per token; a token listed here is never closed.
        self._leases: collections.Counter[str] = collections.Counter()
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, token: str | None) -> ByzerLLM:
        """The client that sends ``token`` (None or "": no token) on every call.

        Not held: it may be closed at the next await once it is idle and the pool is full.
        Requests use :meth:`lease`.
        """
        key = token or ""
        client = self._clients.get(key)
        if client is not None:
            self._clients.move_to_end(key)
            return client
        # token="" sends none (ByzerLLM would otherwise fall back to $LLMESH_TOKEN, and the
        # gateway must never lend its own environment's token to an anonymous caller).
        client = ByzerLLM(self.control_plane, tls=self.tls, token=key)
        self._clients[key] = client
        self._evict_idle()
        return client

    @contextlib.asynccontextmanager
    async def lease(self, token: str | None) -> AsyncIterator[ByzerLLM]:
        """Hold the client of ``token`` for the block: it stays open until the block exits.

        Args:
            token: the caller's bearer token (None or "": no token).
        """
        key = token or ""
        self._leases[key] += 1
        try:
            yield self.get(key)
        finally:
            self._leases[key] -= 1
            if self._leases[key] <= 0:
                del self._leases[key]
            self._evict_idle()

    def _evict_idle(self) -> None:
        extra = len(self._clients) - self.max_clients
        if extra <= 0:
            return
        idle = [key for key in self._clients if key not in self._leases][:extra]
        for key in idle:
            task = asyncio.get_running_loop().create_task(self._close(self._clients.pop(key)))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close(self, client: ByzerLLM) -> None:
        with contextlib.suppress(Exception):
            await client.aclose_async_channels()
        await asyncio.to_thread(client.close)

    async def close(self) -> None:
        """Close every client (at gateway shutdown)."""
        clients, self._clients = list(self._clients.values()), collections.OrderedDict()
        await asyncio.gather(*(self._close(c) for c in clients), *self._closing)
