"""Client operations written once and run by either transport.

An operation is a generator function ("steps"): it builds requests and shapes results, and
``yield``\\ s an op below whenever it needs the mesh; the transport running it performs the op
and sends back the answer (or throws the error in). :class:`~llmesh.sdk.transport.SyncTransport`
performs ops with blocking gRPC calls, :class:`~llmesh.sdk.transport.AsyncTransport` with
grpc.aio on the running event loop; the steps do not know which. That is how ``ByzerLLM`` and
``AsyncByzerLLM`` share every method without a copy per transport (as vLLM's engine-core
clients share one front end).

:func:`operation` turns steps into a ``ByzerLLM`` method (run on the sync transport) that keeps
the steps as ``method.steps``; :func:`async_operation` makes the coroutine twin;
``yield from steps(self.other)(...)`` runs another operation inside one.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Concatenate, ParamSpec, TypeVar, overload

from llmesh.llm_config import GenerationConfig
from llmesh.v1 import inference_service_pb2 as inf
from llmesh.v1 import trainer_service_pb2 as tr

T = TypeVar("T")
C = TypeVar("C")
P = ParamSpec("P")
#: An operation's steps: yields ops, is sent their results, returns the operation's result.
Steps = Generator[Any, Any, T]
#: A method written as steps, and the method it becomes.
StepsMethod = Callable[Concatenate[C, P], Steps[T]]
SyncMethod = Callable[Concatenate[C, P], T]


@dataclasses.dataclass(frozen=True)
class WorkerCall:
    """One unary ``InferenceService`` call on a replica of ``model``, retried on another.

    Attributes:
        model: the model.
        purpose: a ``Purpose`` value (pins and selection).
        method: the RPC, e.g. ``"Embed"``.
        request: the request message.
        timeout: deadline in seconds, or None.
    """

    model: str
    purpose: int
    method: str
    request: Any
    timeout: float | None = None


@dataclasses.dataclass(frozen=True)
class WorkerAt:
    """One unary ``InferenceService`` call to the worker at ``address`` (no routing)."""

    address: str
    method: str
    request: Any
    timeout: float | None = None


@dataclasses.dataclass(frozen=True)
class LiveAddresses:
    """The addresses of the workers with a live replica of ``model`` (a list of str)."""

    model: str


@dataclasses.dataclass(frozen=True)
class ControlCall:
    """One unary ``ControlPlaneService`` call; an outage names the control plane."""

    method: str
    request: Any
    timeout: float | None = None


@dataclasses.dataclass(frozen=True)
class ChatStream:
    """A whole chat request (on its replica's ChatSession); each response goes to ``sink``.

    Retried on another replica before any output, as the transports' ``chat_batches``.
    """

    model: str
    start: inf.ChatStart
    config: GenerationConfig
    sink: Callable[[inf.ChatResponse], None]
    #: Called each time the request moves to another replica mid-stream.
    on_migrate: Callable[[], None] | None = None


@dataclasses.dataclass(frozen=True)
class WatchJob:
    """Follow a training job to its end; each ``(job, event)`` goes to ``sink``.

    The result is the last job seen, or None when the stream carried none.
    """

    job_id: str
    timeout: float | None
    sink: Callable[[tr.TrainingJob, tr.TrainingJobEvent | None], None] | None = None


@dataclasses.dataclass(frozen=True)
class Sleep:
    """Wait this many seconds (between retries)."""

    seconds: float


@dataclasses.dataclass(frozen=True)
class Gather:
    """Run several steps concurrently; the result is the list of their results, in order."""

    steps: tuple[Steps[Any], ...]


def _signature(func: Callable[..., Any]) -> inspect.Signature:
    """``func``'s signature with ``Steps[T]`` shown as ``T``, what callers get back."""
    signature = inspect.signature(func)
    returns = signature.return_annotation
    if isinstance(returns, str) and returns.startswith("Steps[") and returns.endswith("]"):
        returns = returns[len("Steps[") : -1]
    return signature.replace(return_annotation=returns)


@overload
def operation(func: StepsMethod[C, P, T]) -> SyncMethod[C, P, T]: ...


@overload
def operation(
    *, offload: bool = False
) -> Callable[[StepsMethod[C, P, T]], SyncMethod[C, P, T]]: ...


def operation(func: Any = None, *, offload: bool = False) -> Any:
    """Make a client method from steps: calling it runs them on ``self.transport``.

    The method keeps the steps' name, docstring and parameters; the steps stay reachable as
    ``method.steps`` (see :func:`steps` and :func:`async_operation`).

    Args:
        func: the steps, a generator function taking ``self``.
        offload: the async transport runs the code between ops on a worker thread (for
            operations that run user code or parse large answers, such as ``chat_oai``).
    """

    def wrap(func: Callable[..., Steps[Any]]) -> Callable[..., Any]:
        @functools.wraps(func)
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self.transport.run(func(self, *args, **kwargs))

        signature = _signature(func)
        run.__signature__ = signature  # type: ignore[attr-defined]
        run.__annotations__ = {**func.__annotations__, "return": signature.return_annotation}
        run.steps = func  # type: ignore[attr-defined]
        run.offload = offload  # type: ignore[attr-defined]
        return run

    return wrap if func is None else wrap(func)


def async_operation(
    method: SyncMethod[C, P, T], doc: str
) -> Callable[Concatenate[C, P], Coroutine[Any, Any, T]]:
    """The coroutine twin of an :func:`operation`: the same steps on ``self.aio_transport``.

    Args:
        method: the operation.
        doc: the twin's docstring.
    """
    func = method.steps  # type: ignore[attr-defined]
    offload = method.offload  # type: ignore[attr-defined]

    # updated=(): the twin is not itself an operation, so it does not take over ``steps``.
    @functools.wraps(method, updated=())
    async def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await self.aio_transport.run(func(self, *args, **kwargs), offload=offload)

    run.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]
    run.__doc__ = doc
    return run


def steps(method: Callable[..., T]) -> Callable[..., Steps[T]]:
    """The steps of a bound operation, to ``yield from`` inside another operation.

    Args:
        method: e.g. ``self.get_meta``.
    """
    return functools.partial(method.steps, method.__self__)  # type: ignore[attr-defined]


def steps_of(method: Any) -> tuple[Callable[..., Steps[Any]], bool] | None:
    """``(steps, offload)`` of a bound operation, or None for any other attribute.

    Args:
        method: an attribute of a client.
    """
    func = getattr(method, "steps", None)
    self = getattr(method, "__self__", None)
    if func is None or self is None:
        return None
    return functools.partial(func, self), bool(getattr(method, "offload", False))
