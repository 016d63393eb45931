"""An asyncio face for :class:`~llmesh.client.ByzerLLM`: every call as a coroutine.

``AsyncByzerLLM`` wraps a ``ByzerLLM`` (made for you, or yours) and runs the very same
operations (see :mod:`llmesh.sdk.ops`) on the client's async transport: every call in
:data:`ASYNC_CALLS` (``chat_oai``, ``chat``, ``emb``, ``deploy``, ``sft``, ...) is a coroutine
whose requests are grpc.aio calls on the running loop, so an event loop never blocks on the
mesh (``chat_oai``'s
prompt building, parsing and tool execution run on a worker thread). Streams
(``stream_chat_oai`` / ``async_stream_chat_oai``, ``watch_training_job``) are grpc.aio streams;
leaving one early cancels the request on the worker. ``setup_*`` methods stay synchronous
(they only record settings) and return the async client, so fluent chains keep working
(``setup_template`` is a coroutine: ``"auto"`` asks the meta)::

    llm = AsyncByzerLLM().setup_default_model_name("chat")
    (answer,) = await llm.chat_oai([{"role": "user", "content": "hi"}])
    async for text, meta in llm.stream_chat_oai([{"role": "user", "content": "hi"}]):
        ...

The calls share the sync client's settings, channels, route cache and retry logic.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from llmesh.client import ByzerLLM, SingleOutputMeta
from llmesh.sdk.ops import steps_of

#: ByzerLLM methods that talk to the mesh; each becomes a coroutine here.
ASYNC_CALLS = (
    "chat_oai",
    "chat",
    "raw_chat",
    "emb",
    "emb_query",
    "emb_rerank",
    "tokenize",
    "apply_chat_template",
    "get_meta",
    "abort",
    "deploy",
    "undeploy",
    "is_model_exist",
    "get_model",
    "list_models",
    "list_workers",
    "setup_template",
    # training jobs; with detached=False (and merge_lora, wait_training_job) the wait for the
    # job's end is a grpc.aio job watch too.
    "sft",
    "pretrain",
    "merge_lora",
    "raw_sft",
    "raw_pretrain",
    "raw_merge_lora",
    "create_training_job",
    "get_training_job",
    "list_training_jobs",
    "cancel_training_job",
    "wait_training_job",
    "deploy_adapter",
)


class AsyncByzerLLM:
    """Byzer-LLM's client API with coroutines instead of blocking calls.

    Args:
        control_plane: ``host:port`` of the control plane (see :class:`ByzerLLM`).
        llm: an existing sync client to wrap instead of making one (it is not closed by
            :meth:`close` then).
        **kwargs: options for the ``ByzerLLM`` made here.
    """

    def __init__(
        self, control_plane: str | None = None, *, llm: ByzerLLM | None = None, **kwargs: Any
    ) -> None:
        self._owned = llm is None
        self.sync = llm if llm is not None else ByzerLLM(control_plane, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.sync, name)
        if name in ASYNC_CALLS:
            operation = steps_of(attr)
            if operation is None:
                raise TypeError(f"ByzerLLM.{name} is not an operation; it cannot run async")
            run_steps, offload = operation
            transport = self.sync.aio_transport

            @functools.wraps(attr, updated=())
            async def call(*args: Any, **kwargs: Any) -> Any:
                result = await transport.run(run_steps(*args, **kwargs), offload=offload)
                return self if result is self.sync else result

            call.__signature__ = inspect.signature(attr)  # type: ignore[attr-defined]
            return call
        if callable(attr) and name.startswith("setup"):

            @functools.wraps(attr, updated=())
            def setup(*args: Any, **kwargs: Any) -> Any:
                result = attr(*args, **kwargs)
                return self if result is self.sync else result

            return setup
        return attr

    def stream_chat_oai(
        self,
        conversations: Sequence[Mapping[str, Any]],
        model: str | None = None,
        role_mapping: Mapping[str, Any] | None = None,
        llm_config: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[tuple[str, SingleOutputMeta]]:
        """:meth:`ByzerLLM.stream_chat_oai` as an async iterator of ``(text_so_far, meta)``."""
        return self.sync.async_stream_chat_oai(
            conversations, role_mapping=role_mapping, model=model, llm_config=llm_config
        )

    def async_stream_chat_oai(
        self,
        conversations: Sequence[Mapping[str, Any]],
        role_mapping: Mapping[str, Any] | None = None,
        model: str | None = None,
        llm_config: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[tuple[str, SingleOutputMeta]]:
        """Byzer-LLM's name (and argument order) for :meth:`stream_chat_oai`."""
        return self.stream_chat_oai(
            conversations, model=model, role_mapping=role_mapping, llm_config=llm_config
        )

    def watch_training_job(
        self, job_id: str, after_sequence: int = 0, *, timeout: float | None = None
    ) -> AsyncIterator[tuple[Any, Any]]:
        """:meth:`ByzerLLM.watch_training_job` as an async iterator of ``(job, event)``.

        A grpc.aio stream on the running loop (see :meth:`ByzerLLM.async_watch_training_job`);
        leaving the ``async for`` ends the watch, the job keeps running.
        """
        return self.sync.async_watch_training_job(job_id, after_sequence, timeout=timeout)

    async def close(self) -> None:
        """Close this loop's grpc.aio channels, and the wrapped client when this object made it."""
        await self.sync.aclose_async_channels()
        if self._owned:
            await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncByzerLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["ASYNC_CALLS", "AsyncByzerLLM"]
