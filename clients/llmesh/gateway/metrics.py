"""The gateway's Prometheus metrics, served on its own ``/metrics``.

A pure ASGI middleware counts every request by route and HTTP status, times it to its last
byte (a stream's end, not its first event) and keeps the in-flight gauge; the chat and
completion handlers add the time to the first token of streams and the client disconnects.
Names carry the ``llmesh:`` prefix like every other llmesh process; routes are the gateway's
own paths (anything else is ``other``), so label values stay bounded.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmesh.common.metrics import E2E_BUCKETS, TTFT_BUCKETS

#: Paths counted under their own name; any other path is counted as ``other``.
ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/rerank",
        "/rerank",
        "/v2/rerank",
        "/v1/models",
        "/health",
        "/metrics",
    }
)


class GatewayMetrics:
    """The gateway's metric set, in a registry of its own.

    Args:
        registry: where to register (a fresh one by default, so several gateways in one
            process, as in tests, do not collide).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmesh:gateway_requests",
            "HTTP requests answered, by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "llmesh:gateway_request_duration_seconds",
            "Time from a request's arrival to its last byte (a stream's end), by route.",
            ["route"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "llmesh:gateway_requests_in_flight",
            "Requests being answered now, by route.",
            ["route"],
            registry=r,
        )
        self.ttft = Histogram(
            "llmesh:gateway_time_to_first_token_seconds",
            "Time from a streamed completion's arrival to its first token, by route.",
            ["route"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.disconnects = Counter(
            "llmesh:gateway_client_disconnects",
            "Requests whose client went away before the answer was complete, by route.",
            ["route"],
            registry=r,
        )

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts, times and gauges every HTTP request (see :class:`GatewayMetrics`).

    Args:
        app: the application.
        metrics: where to record.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        started = time.perf_counter()
        status = 500
        gauge = self.metrics.in_flight.labels(route)
        gauge.inc()

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            gauge.dec()
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
