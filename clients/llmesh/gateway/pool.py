"""The SDK clients the gateway talks to the mesh with: one per caller token.

The mesh checks tokens itself (each server, including scoped tokens on every chat request),
and a chat session to a replica is authenticated once, when it opens, with the token of its
channel. So the gateway keeps one :class:`~llmesh.client.ByzerLLM` per bearer token it has
seen recently (its channels, sessions and route watches carry that token) and forwards each
request on the client of the caller's token. It never checks or stores tokens beyond this
bounded cache: a token the mesh refuses fails there, in the mesh's words, and ages out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

from llmesh.client import ByzerLLM
from llmesh.common.tls import TlsConfig

log = logging.getLogger(__name__)

#: How many tokens' clients stay open at once; the least recently used one is closed first.
DEFAULT_MAX_CLIENTS = 64


class ClientPool:
    """SDK clients by caller token, least recently used closed beyond ``max_clients``.

    All methods run on the gateway's event loop.

    Args:
        control_plane: ``host:port`` of the control plane.
        tls: TLS for the gateway's channels into the mesh (None: plaintext).
        max_clients: the most clients (tokens) kept open.
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
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, token: str | None) -> ByzerLLM:
        """The client that sends ``token`` (None or "": no token) on every call."""
        key = token or ""
        client = self._clients.get(key)
        if client is not None:
            self._clients.move_to_end(key)
            return client
        # token="" sends none (ByzerLLM would otherwise fall back to $LLMESH_TOKEN, and the
        # gateway must never lend its own environment's token to an anonymous caller).
        client = ByzerLLM(self.control_plane, tls=self.tls, token=key)
        self._clients[key] = client
        while len(self._clients) > self.max_clients:
            _, old = self._clients.popitem(last=False)
            task = asyncio.get_running_loop().create_task(self._close(old))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return client

    async def _close(self, client: ByzerLLM) -> None:
        # Requests still running on it keep their sessions until they end: close gently.
        with contextlib.suppress(Exception):
            await client.aclose_async_channels()
        await asyncio.to_thread(client.close)

    async def close(self) -> None:
        """Close every client (at gateway shutdown)."""
        clients, self._clients = list(self._clients.values()), collections.OrderedDict()
        await asyncio.gather(*(self._close(c) for c in clients), *self._closing)
