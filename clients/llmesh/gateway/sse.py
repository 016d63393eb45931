"""Server-sent events: the response that streams them and the per-token encoders.

The gateway is benchmarked against ``vllm serve``, so the per-token path is kept small: each
batch of deltas the SDK hands over (everything the replica produced since the last one)
becomes one SSE event, built from a prefix and suffix fixed per request and the JSON-escaped
new text in between; no dict is built and no generic JSON encoder runs per token.

:class:`SSEResponse` owns the stream's lifetime: it watches for the client's disconnect while
it streams, and however the stream ends (done, client gone, send failed) it closes the event
generator, which closes the SDK stream, which cancels the request on the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
]


def event(payload: dict[str, Any]) -> bytes:
    """One SSE event carrying ``payload`` as JSON (for the rare, non-token events)."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class TokenEvents:
    """The token events of one choice: ``prefix + escaped text + suffix``.

    Args:
        head: the chunk's fields before ``choices`` (id, object, created, model), as JSON
            object members without braces.
        index: the choice's index.
        chat: chat chunks (``delta.content``) rather than text completion chunks (``text``).
        token_ids: add the new token ids to each event (vLLM's ``return_token_ids``).
    """

    __slots__ = ("_ids_suffix", "_prefix", "_suffix", "chat", "head", "index", "token_ids")

    def __init__(self, head: str, index: int, *, chat: bool, token_ids: bool = False) -> None:
        self.head = head
        self.index = index
        self.chat = chat
        self.token_ids = token_ids
        field = '"delta":{"content":' if chat else '"text":'
        close = "}" if chat else ""
        self._prefix = f'data: {{{head},"choices":[{{"index":{index},{field}'.encode()
        self._suffix = f'{close},"logprobs":null,"finish_reason":null}}]}}\n\n'.encode()
        self._ids_suffix = f'{close},"logprobs":null,"finish_reason":null,"token_ids":'.encode()

    def text(self, delta: str, ids: list[int] | None = None) -> bytes:
        """The event for new text (and its token ids when asked for)."""
        escaped = encode_basestring(delta).encode()
        if self.token_ids and ids is not None:
            return (
                self._prefix
                + escaped
                + self._ids_suffix
                + ("[" + ",".join(map(str, ids)) + "]}]}\n\n").encode()
            )
        return self._prefix + escaped + self._suffix

    def role(self) -> bytes:
        """A chat stream's first event: the assistant role, no text yet."""
        return (
            f'data: {{{self.head},"choices":[{{"index":{self.index},'
            '"delta":{"role":"assistant","content":""},"logprobs":null,'
            '"finish_reason":null}]}\n\n'
        ).encode()

    def finish(self, reason: str | None, extra_delta: dict[str, Any] | None = None) -> bytes:
        """The event that ends the choice with its finish reason."""
        choice: dict[str, Any] = {"index": self.index}
        if self.chat:
            choice["delta"] = extra_delta or {}
        else:
            choice["text"] = ""
        choice["logprobs"] = None
        choice["finish_reason"] = reason
        body = json.dumps({"choices": [choice]}, ensure_ascii=False)
        return f"data: {{{self.head},{body[1:]}\n\n".encode()

    def usage(self, usage: dict[str, int]) -> bytes:
        """``stream_options.include_usage``'s last event: no choices, the token counts."""
        return f'data: {{{self.head},"choices":[],"usage":{json.dumps(usage)}}}\n\n'.encode()


class SSEResponse(Response):
    """Streams ``events`` as ``text/event-stream``; a client that goes away stops the stream.

    The event generator is closed in every case (``aclose``), so whatever it holds (the SDK
    stream, and through it the request on the replica) is released at once, not when the
    garbage collector finds it.

    Args:
        events: the encoded events.
        on_close: awaited last, however the response ends (even when ``events`` never
            started): releases what the stream holds.
    """

    def __init__(
        self,
        events: AsyncIterator[bytes],
        *,
        on_close: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        super().__init__(status_code=200)
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            await self._serve(receive, send)
        finally:
            if self.on_close is not None:
                await self.on_close()

    async def _serve(self, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self._stream(send))
        watching = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((streaming, watching), return_when=asyncio.FIRST_COMPLETED)
        finally:
            # The client left (watching done), the stream ended (streaming done), or this
            # handler was cancelled: in each case stop the other side and close the events.
            for task in (streaming, watching):
                task.cancel()
            for task in (streaming, watching):
                with contextlib.suppress(asyncio.CancelledError, OSError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await self.events.aclose()  # type: ignore[attr-defined]

    async def _stream(self, send: Send) -> None:
        async for chunk in self.events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive: Receive) -> None:
    """Return when the client disconnects."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
