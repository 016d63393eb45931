"""A real mesh in a background thread: control plane(s) and inference workers on loopback.

The servers run on their own asyncio loop in a daemon thread, so tests can use the synchronous
SDK and plain gRPC stubs against them exactly as a user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import pytest

T = TypeVar("T")


def replica_stats(address: str, model: str) -> dict[str, str]:
    """What a replica process reports about ``model`` (GetModelMeta.extra): its counters,
    in-flight and tracked requests, the engine's live requests, pid and visible devices."""
    from llmesh.v1 import inference_service_pb2 as inf
    from llmesh.v1 import inference_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        return dict(stub.GetModelMeta(inf.GetModelMetaRequest(model=model), timeout=30).extra)


def wait_replica_idle(address: str, model: str, timeout: float = 10) -> dict[str, str]:
    """Wait until the replica holds no request: no slot taken, no id tracked, engine empty."""
    import time

    deadline = time.monotonic() + timeout
    stats: dict[str, str] = {}
    while time.monotonic() < deadline:
        stats = replica_stats(address, model)
        if (
            stats["inflight_requests"] == "0"
            and stats["tracked_request_ids"] == "0"
            and stats["engine_active_requests"] == "0"
        ):
            return stats
        time.sleep(0.02)
    raise AssertionError(f"replica of {model!r} still holds requests: {stats}")


class Mesh:
    """Runs control planes and workers on a private loop; every method is thread-safe.

    ``tls`` and ``etcd_security`` (both None: plaintext) are given to every server it starts.
    """

    def __init__(
        self, etcd: str, namespace: str, *, tls: Any = None, etcd_security: Any = None
    ) -> None:
        self.etcd = etcd
        self.namespace = namespace
        self.security = {"tls": tls, "etcd_security": etcd_security}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="mesh")
        self.thread.start()
        self.control_planes: dict[str, tuple[Any, contextlib.AsyncExitStack]] = {}
        self.workers: dict[str, tuple[Any, contextlib.AsyncExitStack]] = {}
        self.gateways: dict[str, tuple[Any, contextlib.AsyncExitStack]] = {}

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_control_plane(self, name: str = "cp0", listen: str = "127.0.0.1:0") -> str:
        from llmesh.control_plane.server import run_control_plane

        async def start() -> Any:
            stack = contextlib.AsyncExitStack()
            cp = await stack.enter_async_context(
                run_control_plane(
                    listen=listen, etcd=self.etcd, namespace=self.namespace, **self.security
                )
            )
            return cp, stack

        self.control_planes[name] = self.call(start())
        return self.control_planes[name][0].address

    def stop_control_plane(self, name: str = "cp0") -> None:
        _, stack = self.control_planes.pop(name)
        self.call(stack.aclose())

    def address(self, name: str = "cp0") -> str:
        return self.control_planes[name][0].address

    def start_worker(self, worker_id: str, **kwargs: Any) -> Any:
        from llmesh.inference_worker.server import run_inference_worker

        kwargs.setdefault("cpus", 4)
        kwargs.setdefault("lease_ttl", 2)
        kwargs.setdefault("drain_grace", 5)
        for key, value in self.security.items():
            kwargs.setdefault(key, value)

        async def start() -> Any:
            stack = contextlib.AsyncExitStack()
            worker = await stack.enter_async_context(
                run_inference_worker(
                    etcd=self.etcd, namespace=self.namespace, worker_id=worker_id, **kwargs
                )
            )
            return worker, stack

        self.workers[worker_id] = self.call(start())
        return self.workers[worker_id][0]

    def stop_worker(self, worker_id: str) -> None:
        _, stack = self.workers.pop(worker_id)
        self.call(stack.aclose())

    def start_gateway(self, name: str = "gw0", **kwargs: Any) -> Any:
        """An OpenAI-compatible gateway (uvicorn on this mesh's loop) in front of ``cp0``;
        returns its :class:`~llmesh.gateway.RunningGateway` (``.url``)."""
        from llmesh.gateway import run_gateway

        kwargs.setdefault("control_plane", self.address())
        kwargs.setdefault("listen", "127.0.0.1:0")
        kwargs.setdefault("tls", self.security["tls"])

        async def start() -> Any:
            stack = contextlib.AsyncExitStack()
            gateway = await stack.enter_async_context(run_gateway(**kwargs))
            return gateway, stack

        self.gateways[name] = self.call(start())
        return self.gateways[name][0]

    def stop_gateway(self, name: str = "gw0") -> None:
        _, stack = self.gateways.pop(name)
        self.call(stack.aclose())

    def replica_processes(self) -> list[tuple[str, str, str]]:
        """(worker id, model, address) of every running replica process, adapters included."""
        out = []
        for wid, (worker, _) in self.workers.items():
            agent = worker.agent
            for key, sup in [*agent.supervisors.items(), *agent.adapters.items()]:
                if sup.address:
                    out.append((wid, key[0], sup.address))
        return out

    def busy(self) -> bool:
        """Whether any replica holds a request (a slot, or state in its engine)."""
        for _, model, address in self.replica_processes():
            try:
                stats = replica_stats(address, model)
            except grpc.RpcError:
                continue  # not serving (loading, failed): holds nothing
            if stats["inflight_requests"] != "0" or stats["engine_active_requests"] != "0":
                return True
        return False

    def wait_idle(self, timeout: float = 5) -> bool:
        """Wait until no replica holds a request; False if one still does after ``timeout``."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.busy():
                return True
            time.sleep(0.05)
        return not self.busy()

    def served(self, model: str = "chat") -> dict[str, int]:
        """Requests each worker's replicas of ``model`` admitted since they loaded."""
        out: dict[str, int] = {}
        for wid, name, address in self.replica_processes():
            if name == model:
                count = int(replica_stats(address, model)["served_requests"])
                out[wid] = out.get(wid, 0) + count
        return out

    def close(self) -> None:
        for name in list(self.gateways):
            with contextlib.suppress(Exception):
                self.stop_gateway(name)
        for wid in list(self.workers):
            with contextlib.suppress(Exception):
                self.stop_worker(wid)
        for name in list(self.control_planes):
            with contextlib.suppress(Exception):
                self.stop_control_plane(name)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def mesh(etcd_server: Any, etcd_namespace: str) -> Iterator[Mesh]:
    """A fresh mesh (no control plane or workers started yet) in its own etcd namespace."""
    m = Mesh(etcd_server.endpoint, etcd_namespace)
    yield m
    m.close()


def console_spans(text: str) -> list[dict[str, Any]]:
    """The spans OpenTelemetry's console exporter printed (pretty JSON objects) in a log."""
    spans, decoder, i = [], json.JSONDecoder(), 0
    while (i := text.find('{\n    "name"', i)) != -1:
        try:
            span, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        spans.append(span)
        i = end
    return spans
