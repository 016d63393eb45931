"""Prometheus metrics: the endpoint every server serves, and the metric set of each process kind.

Every llmesh server (control plane, node agent, replica process, trainer worker) serves
``/metrics`` on a port of its own, bound like its gRPC server (loopback unless told otherwise;
port 0 picks a free one) and on by default; over HTTPS with the server's certificate when the
server has TLS. It asks for no token (Prometheus scrapes it as is), so plain HTTP beyond
loopback needs ``--insecure``. The endpoint is prometheus_client's
threaded HTTP server, so a scrape never runs on the server's event loop; values that live in
loop-owned state (replica states, queue lengths, job progress) are read on the loop at scrape
time by a :class:`SnapshotCollector`, so a scrape sees one consistent picture.

Names follow vLLM's where they mean the same thing (``vllm:time_to_first_token_seconds`` →
``llmesh:time_to_first_token_seconds``, ...); everything is prefixed ``llmesh:``. A replica
process also exports what lives in prometheus_client's global registry: the process collector
and, for the ``vllm`` backend, vLLM's own ``vllm:*`` engine metrics.

Hot path: a request resolves its label children once (:meth:`ReplicaMetrics.request`); per
engine chunk it does one ``perf_counter`` and one histogram observation, as vLLM does per
engine step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import Collector

from llmesh.common.routing import PURPOSE_NAMES
from llmesh.common.tls import InsecureBind, is_loopback
from llmesh.v1 import control_plane_service_pb2 as cp

log = logging.getLogger(__name__)

# ``--metrics-listen off`` (or ``--no-metrics``) turns the endpoint off.
METRICS_OFF = "off"

# vLLM's buckets (vllm/v1/metrics/buckets.py) so dashboards for both read alike; inter-token
# and queue times get a few finer buckets, since CPU test models and idle queues sit below
# vLLM's smallest.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
QUEUE_BUCKETS = (
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
ETCD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Seconds a client of an HTTPS endpoint may take for the TLS handshake and each read or
# write after it (per connection thread; a stalled client only holds its own thread).
TLS_HANDSHAKE_TIMEOUT_S = 10.0

# Inter-token latency observations per output chunk at most: a chunk of N tokens is N
# observations of gap / N, and Histogram.observe takes one value per call.
ITL_MAX_OBSERVATIONS = 64

# Seconds between two warnings of one collector about a snapshot it left out.
WARN_INTERVAL_S = 60.0

# How an aborted request ended (``llmesh:request_aborted_total{how}``).
ABORT_HOWS = ("cancel", "abort", "disconnect", "deadline", "shutdown")


def enum_name(enum: Any, value: int, prefix: str = "") -> str:
    """The name of a protobuf enum ``value`` without ``prefix``, or ``UNKNOWN``.

    A record written by a newer llmesh can carry a value this one does not know; a sampler
    must not fail the scrape over it.
    """
    try:
        name: str = enum.Name(value)
    except ValueError:
        return "UNKNOWN"
    return name.removeprefix(prefix)


# ---- the endpoint ------------------------------------------------------------------------------


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT; give e.g. 127.0.0.1:9100 or 'off'")
    return host.strip("[]"), int(port)


def metrics_address(server_host: str, listen: str | None) -> str | None:
    """Where a server's /metrics binds: ``listen``, or a free port on the server's own host.

    Args:
        server_host: the host the server's gRPC port is bound to.
        listen: ``HOST:PORT`` from ``--metrics-listen``; None for the default; ``"off"`` or an
            empty string for no endpoint.

    Returns:
        ``HOST:PORT`` to bind, or None when metrics are off.
    """
    if listen is None:
        host = server_host or "127.0.0.1"
        return f"[{host}]:0" if ":" in host else f"{host}:0"
    if listen.strip().lower() in ("", METRICS_OFF):
        return None
    split_host_port(listen)  # refuse a malformed value before anything starts
    return listen


class _Forward:
    """Hands on what prometheus_client's global registry holds (process stats, vLLM's metrics).

    It has no ``describe``: the registry then cannot check its names against ours, which is
    right, since they are a different family set that only meets on the page.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return self._registry.collect()


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape (one a second per Prometheus)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _text_format_app(served: Collector) -> Callable[..., Any]:
    """prometheus_client's WSGI app, always answering in the text format (0.0.4).

    prometheus_client 0.26 writes OpenMetrics sample names with ``:`` turned into ``_``
    (``llmesh:x_total`` became ``llmesh_x_total``) when Prometheus asks for OpenMetrics, as
    2.42 does; the text format keeps the names as declared (vLLM's ``vllm:*`` too).
    """
    app = make_wsgi_app(served)  # type: ignore[arg-type]

    def text_only(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        environ.pop("HTTP_ACCEPT", None)
        return app(environ, start_response)

    return text_only


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP endpoint.

    Attributes:
        host: the host it is bound to.
        port: the port it is bound to.
        url: what to scrape, e.g. ``http://127.0.0.1:40123/metrics``.
    """

    host: str
    port: int
    url: str
    _server: Any
    _thread: Any

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics(
    registry: CollectorRegistry,
    listen: str | None,
    *,
    advertise_host: str = "",
    certfile: str | None = None,
    keyfile: str | None = None,
    include_global: bool = True,
    insecure: bool = False,
) -> MetricsEndpoint | None:
    """Serve ``registry`` (plus the global registry) at ``http(s)://listen/metrics``.

    /metrics asks for no token (Prometheus scrapes it as is), so beyond loopback it must at
    least be HTTPS: a plain-HTTP bind beyond loopback is refused unless ``insecure``.

    Args:
        registry: the process kind's own metrics.
        listen: ``HOST:PORT`` to bind (port 0: a free one); None serves nothing.
        advertise_host: host to put in the URL when it differs from the bound one.
        certfile: PEM certificate; with ``keyfile`` the endpoint speaks HTTPS.
        keyfile: PEM private key of ``certfile``.
        include_global: also serve prometheus_client's global registry (process and platform
            collectors, vLLM's engine metrics).
        insecure: the operator passed ``--insecure``: serve plain HTTP beyond loopback (warns).

    Returns:
        The running endpoint, or None when ``listen`` is None.

    Raises:
        InsecureBind: plain HTTP beyond loopback without ``insecure``.
        OSError: the address cannot be bound.
        ssl.SSLError: ``certfile`` / ``keyfile`` do not load (nothing is bound then).
    """
    if listen is None:
        return None
    host, port = split_host_port(listen)
    if not (certfile and keyfile) and not is_loopback(host):
        if not insecure:
            raise InsecureBind(
                f"refusing to serve /metrics on {listen} (beyond loopback) over plain HTTP; "
                "give the server TLS (--tls-cert, --tls-key) so /metrics is HTTPS, bind it to "
                "loopback (--metrics-listen 127.0.0.1:0), or pass --insecure"
            )
        log.warning("INSECURE: /metrics on %s over plain HTTP, beyond loopback", listen)
    tls: ssl.SSLContext | None = None
    if certfile and keyfile:
        # Before binding: a certificate that does not load leaves no socket behind.
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(certfile, keyfile)
    served: Collector = registry
    if include_global:
        served = CollectorRegistry(auto_describe=False)
        served.register(_Forward(registry))  # type: ignore[arg-type]
        served.register(_Forward(REGISTRY))  # type: ignore[arg-type]

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def finish_request(self, request: Any, client_address: Any) -> None:
            if tls is None:
                super().finish_request(request, client_address)
                return
            # The TLS handshake runs here, in the connection's own thread: on a wrapped
            # listening socket it would run in the accept loop, where one client that
            # connects and stalls would hold up every other scrape.
            request.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
            try:
                conn = tls.wrap_socket(request, server_side=True)
            except OSError as exc:  # ssl.SSLError, a timeout, a reset: this client only
                log.debug("metrics TLS handshake with %s failed: %s", client_address, exc)
                return
            try:
                super().finish_request(conn, client_address)
            finally:
                conn.close()

    try:
        server = make_server(
            host or "127.0.0.1", port, _text_format_app(served), Server, _QuietHandler
        )
    except OSError as exc:
        raise OSError(
            f"cannot serve metrics on {listen} ({exc}); pick a free port with --metrics-listen "
            "HOST:PORT, or turn metrics off with --no-metrics"
        ) from exc
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    bound_port = int(server.server_address[1])
    url_host = advertise_host or host or "127.0.0.1"
    if url_host in ("0.0.0.0", "::"):
        url_host = socket.gethostname()
    if ":" in url_host:
        url_host = f"[{url_host}]"
    scheme = "https" if tls is not None else "http"
    url = f"{scheme}://{url_host}:{bound_port}/metrics"
    log.info("metrics on %s", url)
    return MetricsEndpoint(host=host, port=bound_port, url=url, _server=server, _thread=thread)


class SnapshotCollector:
    """Metrics built on an event loop at scrape time, from state that only that loop touches.

    The HTTP thread asks the loop to run ``build`` and waits (bounded) for the result, so the
    families describe one moment of the loop's state and the loop never shares its dicts with
    another thread mid-change. A ``build`` that raises (or a loop too busy to answer in time)
    leaves only these families out: the rest of the page is still served.

    Args:
        loop: the loop that owns the state ``build`` reads.
        build: returns the metric families; runs on ``loop``.
        timeout: seconds a scrape waits for a busy loop before it leaves these families out.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        build: Callable[[], list[Metric]],
        timeout: float = 2.0,
    ) -> None:
        self.loop = loop
        self.build = build
        self.timeout = timeout
        self._warned = -WARN_INTERVAL_S  # monotonic time of the last warning
        self._quiet = 0  # warnings left out since then

    def collect(self) -> Iterable[Metric]:
        try:
            same_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            same_loop = False
        if same_loop:  # a scrape from the loop's own thread (tests)
            try:
                return self.build()
            except Exception as exc:  # noqa: BLE001 - one broken sampler must not fail the page
                self._skipped(str(exc) or type(exc).__name__, exc)
                return []
        if self.loop.is_closed():
            return []
        result: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(self.build())
            except Exception as exc:  # noqa: BLE001 - reported to the scraping thread
                result.set_exception(exc)

        try:
            self.loop.call_soon_threadsafe(run)
            return result.result(self.timeout)
        except concurrent.futures.TimeoutError:
            self._skipped("the event loop is busy", None)
        except Exception as exc:  # noqa: BLE001 - one broken sampler must not fail the page
            self._skipped(str(exc) or type(exc).__name__, exc)
        return []

    def _skipped(self, why: str, exc: BaseException | None) -> None:
        """Log a left-out snapshot, at most once per :data:`WARN_INTERVAL_S` per collector.

        Prometheus scrapes every few seconds: a sampler that keeps failing (or a loop that
        stays busy) would otherwise write a warning per scrape.
        """
        now = time.monotonic()
        if now - self._warned < WARN_INTERVAL_S:
            self._quiet += 1
            return
        more = f" ({self._quiet} more since the last warning)" if self._quiet else ""
        self._warned, self._quiet = now, 0
        log.warning("metrics snapshot left out of the page: %s%s", why, more, exc_info=exc)


# ---- replica processes ------------------------------------------------------------------------

_REPLICA_LABELS = ("model_name", "replica")


class _ReplicaChildren:
    """The label children of one (model, replica), resolved once and shared by its requests."""

    __slots__ = (
        "_labels",
        "_m",
        "aborted",
        "e2e",
        "errors",
        "exhausted",
        "generation",
        "itl",
        "migrations",
        "prompt",
        "queue",
        "success",
        "ttft",
    )

    def __init__(self, m: ReplicaMetrics, labels: tuple[str, str]) -> None:
        self.ttft = m.ttft.labels(*labels)
        self.itl = m.itl.labels(*labels)
        self.e2e = m.e2e.labels(*labels)
        self.queue = m.queue_time.labels(*labels)
        self.prompt = m.prompt_tokens.labels(*labels)
        self.generation = m.generation_tokens.labels(*labels)
        self.migrations = m.migrations.labels(*labels)
        self.success: dict[str, Any] = {}
        self.aborted = {how: m.aborted.labels(*labels, how) for how in ABORT_HOWS}
        self.exhausted: dict[str, Any] = {}
        self.errors: dict[str, Any] = {}
        self._m = m
        self._labels = labels

    def success_for(self, reason: str) -> Any:
        child = self.success.get(reason)
        if child is None:
            child = self.success[reason] = self._m.success.labels(*self._labels, reason)
        return child

    def errors_for(self, code: str) -> Any:
        child = self.errors.get(code)
        if child is None:
            child = self.errors[code] = self._m.errors.labels(*self._labels, code)
        return child

    def exhausted_for(self, reason: str) -> Any:
        child = self.exhausted.get(reason)
        if child is None:
            child = self.exhausted[reason] = self._m.exhausted.labels(*self._labels, reason)
        return child


class RequestMetrics:
    """One generation request's timings and counts, reported to its replica's metrics.

    A run calls :meth:`admitted` once it holds a slot, :meth:`chunk` per engine output,
    then :meth:`finished` (a final chunk), :meth:`aborted` (cancel, Abort, disconnect,
    deadline) or :meth:`failed` (an error status). Each counts once: a second end is ignored.
    """

    __slots__ = ("_arrival", "_c", "_done", "_last", "_resumed", "generated")

    def __init__(self, children: _ReplicaChildren) -> None:
        self._c = children
        self._arrival = time.perf_counter()
        self._last = 0.0
        self._done = False
        self._resumed = 0
        self.generated = 0

    def migrated(self, resumed_tokens: int) -> None:
        """The request continues one another replica started, carrying ``resumed_tokens``.

        The engine's ``completion_tokens`` counts the resumed tokens too (the client sees one
        request), but the replica that generated them counted them already: only what this
        replica generates goes into ``llmesh:generation_tokens``.
        """
        self._resumed = resumed_tokens
        self._c.migrations.inc()

    def admitted(self) -> None:
        """The request got a slot: its time in the admission queue ends here."""
        self._c.queue.observe(time.perf_counter() - self._arrival)

    def chunk(self, tokens: int) -> None:
        """The engine produced output carrying ``tokens`` new tokens.

        An engine may hand over several tokens at once (the transformers engine merges what
        its decoder produced while the loop was busy). Inter-token latency is per token, as
        vLLM's: the gap since the previous output is spread evenly over the chunk's tokens,
        one observation each, at most :data:`ITL_MAX_OBSERVATIONS` per chunk (the count of a
        huge merged chunk is cut there; each observation is still the per-token gap). Tokens
        that come with the first one have no gap of their own and are not observed.
        """
        now = time.perf_counter()
        if self._last:
            n = max(tokens, 1)  # a chunk with text but no ids is one output
            gap = (now - self._last) / n
            itl = self._c.itl
            for _ in range(min(n, ITL_MAX_OBSERVATIONS)):
                itl.observe(gap)
        else:
            self._c.ttft.observe(now - self._arrival)
        self._last = now
        self.generated += tokens

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        """The request ended with a final chunk (``reason``: stop, length, stop_string, ...).

        A resumed request's prompt counts again here: this replica prefilled it again (with
        the resumed tokens, which count as neither prompt nor generation tokens here).
        """
        if self._done:
            return
        self._done = True
        c = self._c
        c.e2e.observe(time.perf_counter() - self._arrival)
        c.success_for(reason).inc()
        if prompt_tokens:
            c.prompt.inc(prompt_tokens)
        c.generation.inc(max(completion_tokens - self._resumed, self.generated))

    def failed(self, code: str) -> None:
        """The request ended with an error status ``code`` (e.g. ``INVALID_ARGUMENT``)."""
        if self._done:
            return
        self._done = True
        c = self._c
        c.errors_for(code).inc()
        if self.generated:
            c.generation.inc(self.generated)

    def aborted(self, how: str) -> None:
        """The request was aborted: ``how`` is one of :data:`ABORT_HOWS`."""
        if self._done:
            return
        self._done = True
        c = self._c
        c.aborted[how].inc()
        c.success_for("abort").inc()
        if self.generated:
            c.generation.inc(self.generated)


class ReplicaMetrics:
    """The metrics of a replica process, per model and replica index.

    Args:
        registry: where they register; a fresh private registry when None.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, labels = self.registry, _REPLICA_LABELS
        self.ttft = Histogram(
            "llmesh:time_to_first_token_seconds",
            "Seconds from a request's arrival at the replica to its first output token "
            "(queue time included).",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "llmesh:inter_token_latency_seconds",
            "Seconds between two output tokens of one request (a chunk of N tokens: N "
            "observations of its gap / N, at most 64).",
            labels,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "llmesh:e2e_request_latency_seconds",
            "Seconds from a request's arrival at the replica to its final output.",
            labels,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "llmesh:request_queue_time_seconds",
            "Seconds a request waited in the replica's admission queue for a slot.",
            labels,
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "llmesh:prompt_tokens",
            "Prompt tokens of finished requests (a migrated request's prompt counts again on "
            "the replica that resumes it, which prefills it again).",
            labels,
            registry=r,
        )
        self.generation_tokens = Counter(
            "llmesh:generation_tokens",
            "Tokens generated (aborted and failed requests' partial output included; a migrated "
            "request's resumed tokens count only on the replica that generated them).",
            labels,
            registry=r,
        )
        self.success = Counter(
            "llmesh:request_success",
            "Requests that ended, by finish reason (stop, length, stop_string, abort).",
            (*labels, "finished_reason"),
            registry=r,
        )
        self.aborted = Counter(
            "llmesh:request_aborted",
            "Aborted requests by how: cancel (a cancel message, or a Generate prompt stopped "
            "because another of its batch failed), abort (the Abort RPC), disconnect (the "
            "call went away), deadline (the request's timeout or the call's gRPC deadline), "
            "shutdown (the replica process stopped).",
            (*labels, "how"),
            registry=r,
        )
        self.exhausted = Counter(
            "llmesh:resource_exhausted",
            "Requests refused with RESOURCE_EXHAUSTED: queue_full, queue_timeout.",
            (*labels, "reason"),
            registry=r,
        )
        self.errors = Counter(
            "llmesh:request_errors",
            "Requests that reached the replica and ended with an error status, by gRPC code "
            "name: INVALID_ARGUMENT (a prompt that does not render or does not fit), INTERNAL "
            "(an engine error), UNAVAILABLE (draining, or the engine stopped mid-request), "
            "RESOURCE_EXHAUSTED (also counted by reason in llmesh:resource_exhausted), ...",
            (*labels, "code"),
            registry=r,
        )
        self.migrations = Counter(
            "llmesh:request_migrations",
            "Requests that arrived to continue a request another replica started "
            "(resume_token_ids: a migration after a failure).",
            labels,
            registry=r,
        )
        self._children: dict[tuple[str, str], _ReplicaChildren] = {}

    def children(self, model: str, index: int) -> _ReplicaChildren:
        """The label children of ``model`` replica ``index`` (made once, then cached)."""
        key = (model, str(index))
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = _ReplicaChildren(self, key)
        return found

    def forget(self, model: str, index: int) -> None:
        """Drop every series of ``model`` replica ``index`` (an adapter that was unloaded).

        Adapters come and go on a running replica process (LoRA churn); without this their
        label sets would stay on the page, and in memory, for the life of the process. A
        request still running for it reports to children that are no longer exported.
        """
        key = (model, str(index))
        children = self._children.pop(key, None)
        plain = (
            self.ttft,
            self.itl,
            self.e2e,
            self.queue_time,
            self.prompt_tokens,
            self.generation_tokens,
            self.migrations,
        )
        for metric in plain:
            with contextlib.suppress(KeyError):  # never observed: no series to drop
                metric.remove(*key)
        if children is None:
            return
        for metric, extra in (
            (self.success, children.success),
            (self.aborted, children.aborted),
            (self.exhausted, children.exhausted),
            (self.errors, children.errors),
        ):
            for value in list(extra):
                with contextlib.suppress(KeyError):
                    metric.remove(*key, value)

    def resource_exhausted(self, model: str, index: int, reason: str) -> None:
        """Count a request refused with RESOURCE_EXHAUSTED (``queue_full``, ``queue_timeout``)."""
        self.children(model, index).exhausted_for(reason).inc()

    def request(self, model: str, index: int) -> RequestMetrics:
        """A :class:`RequestMetrics` for one request on ``model`` replica ``index``."""
        return RequestMetrics(self.children(model, index))

    def watch_load(
        self,
        loop: asyncio.AbstractEventLoop,
        load: Callable[[], Iterable[tuple[str, int, int, int]]],
    ) -> None:
        """Export running and waiting requests, read on ``loop`` at scrape time.

        Args:
            loop: the loop that owns the replicas.
            load: yields (model, replica index, running, waiting) per hosted replica.
        """

        def build() -> list[Metric]:
            running = GaugeMetricFamily(
                "llmesh:num_requests_running",
                "Requests holding a slot (running in the engine).",
                labels=_REPLICA_LABELS,
            )
            waiting = GaugeMetricFamily(
                "llmesh:num_requests_waiting",
                "Requests waiting in the admission queue for a slot.",
                labels=_REPLICA_LABELS,
            )
            sums: dict[tuple[str, str], list[int]] = {}
            for model, index, run, wait in load():
                entry = sums.setdefault((model, str(index)), [0, 0])
                entry[0] += run
                entry[1] += wait
            for key, (run, wait) in sorted(sums.items()):
                running.add_metric(key, run)
                waiting.add_metric(key, wait)
            return [running, waiting]

        self.registry.register(SnapshotCollector(loop, build))  # type: ignore[arg-type]


# ---- node agents ----------------------------------------------------------------------------


def node_agent_registry(
    loop: asyncio.AbstractEventLoop,
    processes: Callable[[], Iterable[tuple[str, int, int, str, int, int]]],
) -> CollectorRegistry:
    """The metrics of a node agent: its replica processes, their states and restarts.

    Series are per (model, generation, replica): during a rolling update the agent supervises
    the old generation's process and the new one's side by side for the same replica index,
    and one series each keeps them apart (sum by ``model_name, replica`` to merge them).

    Args:
        loop: the agent's loop.
        processes: yields (model, generation, replica index, state name, pid, restarts) per
            supervised replica process (adapters ride in their base's process and are not
            listed).
    """
    registry = CollectorRegistry()
    labels_of = ("model_name", "generation", "replica")

    def build() -> list[Metric]:
        up = GaugeMetricFamily(
            "llmesh:replica_process_up",
            "1 while the replica's process runs.",
            labels=labels_of,
        )
        state = GaugeMetricFamily(
            "llmesh:replica_process_state",
            "1 for the state the replica last reported (LOADING, READY, DRAINING, FAILED).",
            labels=(*labels_of, "state"),
        )
        restarts = CounterMetricFamily(
            "llmesh:replica_restarts",
            "Times the agent restarted the replica's process (crash or wedge).",
            labels=labels_of,
        )
        for model, generation, index, name, pid, count in processes():
            labels = (model, str(generation), str(index))
            up.add_metric(labels, 1 if pid else 0)
            state.add_metric((*labels, name), 1)
            restarts.add_metric(labels, count)
        return [up, state, restarts]

    registry.register(SnapshotCollector(loop, build))  # type: ignore[arg-type]
    return registry


# ---- the control plane ------------------------------------------------------------------------


_POLICY_LABELS = {
    cp.LOAD_BALANCE_POLICY_UNSPECIFIED: "least_loaded",
    cp.LOAD_BALANCE_POLICY_LEAST_LOADED: "least_loaded",
    cp.LOAD_BALANCE_POLICY_ROUND_ROBIN: "round_robin",
    cp.LOAD_BALANCE_POLICY_RANDOM: "random",
}


def routing_policy_name(policy: int) -> str:
    """The ``policy`` label of an AssignWorker request's load-balance policy."""
    return _POLICY_LABELS.get(policy, "unknown")


def routing_reason(request: cp.AssignWorkerRequest) -> str:
    """What decides an AssignWorker request, in the selector's order of precedence."""
    if request.HasField("pinned_replica"):
        return "pinned"
    if request.purpose_pins and PURPOSE_NAMES.get(request.purpose, "chat") in request.purpose_pins:
        return "purpose_pin"
    if request.affinity_key:
        return "affinity"
    return "policy"


class ControlPlaneMetrics:
    """The metrics of a control plane: models, replicas, workers, routing, etcd.

    Args:
        registry: where they register; a fresh private registry when None.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.routing = Counter(
            "llmesh:routing_decisions",
            "AssignWorker decisions by policy and by what decided them: pinned (a replica "
            "pin), purpose_pin, affinity (an affinity key), policy, or refused (no READY "
            "replica, unknown model).",
            ("policy", "reason"),
            registry=r,
        )
        self.etcd_latency = Histogram(
            "llmesh:etcd_request_duration_seconds",
            "Round trip of a linearizable etcd read, probed by the control plane.",
            buckets=ETCD_BUCKETS,
            registry=r,
        )
        self.etcd_reachable = Gauge(
            "llmesh:etcd_reachable",
            "1 when the last etcd probe was answered, 0 when it failed (probed every second).",
            registry=r,
        )

    def routed(self, policy: str, reason: str) -> None:
        """Count one AssignWorker decision."""
        self.routing.labels(policy, reason).inc()

    def watch_registry(
        self,
        loop: asyncio.AbstractEventLoop,
        snapshot: Callable[[], tuple[Iterable[tuple[str, str]], Iterable[tuple[str, int]]]],
    ) -> None:
        """Export models, replicas by state and workers by kind, read on ``loop`` per scrape.

        Args:
            loop: the control plane's loop.
            snapshot: returns ((model, replica state name) per replica of every model's
                current generation, (worker kind, count) per kind).
        """

        def build() -> list[Metric]:
            replicas, workers = snapshot()
            models = GaugeMetricFamily("llmesh:models", "Models deployed.")
            by_state = GaugeMetricFamily(
                "llmesh:replicas",
                "Replicas of the deployed models by state (PENDING: no room yet).",
                labels=("model_name", "state"),
            )
            counts: dict[tuple[str, str], int] = {}
            names: set[str] = set()
            for model, state in replicas:
                names.add(model)
                if state:
                    counts[(model, state)] = counts.get((model, state), 0) + 1
            models.add_metric((), len(names))
            for key, n in sorted(counts.items()):
                by_state.add_metric(key, n)
            live = GaugeMetricFamily("llmesh:workers", "Live workers by kind.", labels=("kind",))
            for kind, n in sorted(workers):
                live.add_metric((kind,), n)
            return [models, by_state, live]

        self.registry.register(SnapshotCollector(loop, build))  # type: ignore[arg-type]


# ---- trainer workers -------------------------------------------------------------------------


@dataclass
class JobSample:
    """What a trainer worker's metrics read from one of its jobs."""

    job_id: str
    state: str
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    samples_per_second: float | None = None


def trainer_registry(
    loop: asyncio.AbstractEventLoop, jobs: Callable[[], Iterable[JobSample]]
) -> CollectorRegistry:
    """The metrics of a trainer worker: jobs by state; step, loss and samples/s per job.

    Args:
        loop: the worker's loop.
        jobs: yields a :class:`JobSample` per job placed on this worker that it knows of.
    """
    registry = CollectorRegistry()

    def build() -> list[Metric]:
        by_state = GaugeMetricFamily(
            "llmesh:training_jobs",
            "Training jobs on this worker by state.",
            labels=("state",),
        )
        step = GaugeMetricFamily(
            "llmesh:training_step", "Optimizer steps done.", labels=("job_id",)
        )
        total = GaugeMetricFamily(
            "llmesh:training_total_steps", "Optimizer steps in the job.", labels=("job_id",)
        )
        loss = GaugeMetricFamily(
            "llmesh:training_loss", "Training loss of the last logged step.", labels=("job_id",)
        )
        rate = GaugeMetricFamily(
            "llmesh:training_samples_per_second",
            "Training samples per second.",
            labels=("job_id",),
        )
        counts: dict[str, int] = {}
        for job in jobs():
            counts[job.state] = counts.get(job.state, 0) + 1
            if job.state != "RUNNING":
                continue
            step.add_metric((job.job_id,), job.step)
            total.add_metric((job.job_id,), job.total_steps)
            if job.loss is not None:
                loss.add_metric((job.job_id,), job.loss)
            if job.samples_per_second is not None:
                rate.add_metric((job.job_id,), job.samples_per_second)
        for state, n in sorted(counts.items()):
            by_state.add_metric((state,), n)
        return [by_state, step, total, loss, rate]

    registry.register(SnapshotCollector(loop, build))  # type: ignore[arg-type]
    return registry
