"""Call helpers: the cancel grace and a bridge from blocking iterators to asyncio.

:func:`iterate_in_thread` lets asyncio code consume any blocking iterator.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

#: How long closing a stream early waits for the worker's final (ABORTED) message before the
#: request is given up on.
CANCEL_GRACE_S = 2.0

_DONE = object()


async def iterate_in_thread(iterator: Iterator[T]) -> AsyncIterator[T]:
    """Consume a blocking iterator on a helper thread and yield its items on the event loop.

    Leaving early closes the iterator (on the helper thread, once it hands over its next
    item), so a stream is cancelled on the worker.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
    stop = threading.Event()

    def put(item: Any, exc: BaseException | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            loop.call_soon_threadsafe(items.put_nowait, (item, exc))

    def pump() -> None:
        try:
            for item in iterator:
                if stop.is_set():
                    break
                put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
            put(_DONE, exc)
            return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        put(_DONE)

    thread = threading.Thread(target=pump, name="llmesh-aio-stream", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = await items.get()
            if item is _DONE:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
