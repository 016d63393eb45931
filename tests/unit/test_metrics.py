"""The metric set and the /metrics endpoint (common/metrics.py), read back from real registries
and a real HTTP scrape."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmesh.common.metrics import (
    ControlPlaneMetrics,
    JobSample,
    ReplicaMetrics,
    metrics_address,
    routing_reason,
    start_metrics,
    trainer_registry,
)
from llmesh.common.tls import InsecureBind
from llmesh.v1 import control_plane_service_pb2 as cp


def test_metrics_address_follows_the_server_host_unless_told() -> None:
    assert metrics_address("127.0.0.1", None) == "127.0.0.1:0"
    assert metrics_address("::1", None) == "[::1]:0"
    assert metrics_address("127.0.0.1", "127.0.0.1:9100") == "127.0.0.1:9100"
    assert metrics_address("127.0.0.1", "off") is None
    assert metrics_address("127.0.0.1", "") is None
    with pytest.raises(ValueError, match="HOST:PORT"):
        metrics_address("127.0.0.1", "nine-thousand")


def test_a_finished_request_fills_the_vllm_style_metrics() -> None:
    m = ReplicaMetrics()
    req = m.request("chat", 0)
    req.admitted()
    for _ in range(4):
        req.chunk(1)
    req.finished("length", prompt_tokens=7, completion_tokens=4)
    req.finished("length", prompt_tokens=7, completion_tokens=4)  # a second end is ignored
    labels = {"model_name": "chat", "replica": "0"}
    value = m.registry.get_sample_value
    assert value("llmesh:request_queue_time_seconds_count", labels) == 1
    assert value("llmesh:time_to_first_token_seconds_count", labels) == 1
    assert value("llmesh:inter_token_latency_seconds_count", labels) == 3  # per step after 1st
    assert value("llmesh:e2e_request_latency_seconds_count", labels) == 1
    assert value("llmesh:prompt_tokens_total", labels) == 7
    assert value("llmesh:generation_tokens_total", labels) == 4
    assert value("llmesh:request_success_total", {**labels, "finished_reason": "length"}) == 1


def test_aborts_are_counted_by_how_with_their_partial_output() -> None:
    m = ReplicaMetrics()
    for how in ("cancel", "abort", "disconnect", "deadline", "deadline"):
        req = m.request("chat", 1)
        req.chunk(2)
        req.aborted(how)
    value = m.registry.get_sample_value
    labels = {"model_name": "chat", "replica": "1"}
    assert value("llmesh:request_aborted_total", {**labels, "how": "deadline"}) == 2
    assert value("llmesh:request_aborted_total", {**labels, "how": "cancel"}) == 1
    assert value("llmesh:request_success_total", {**labels, "finished_reason": "abort"}) == 5
    assert value("llmesh:generation_tokens_total", labels) == 10
    m.resource_exhausted("chat", 1, "queue_full")
    assert value("llmesh:resource_exhausted_total", {**labels, "reason": "queue_full"}) == 1
    m.request("chat", 1).migrated(0)
    assert value("llmesh:request_migrations_total", labels) == 1


def test_failed_requests_count_by_code_once_with_their_partial_output() -> None:
    m = ReplicaMetrics()
    req = m.request("chat", 0)
    req.chunk(3)
    req.failed("INTERNAL")
    req.failed("INTERNAL")  # a second end is ignored
    req.aborted("deadline")  # ... whichever kind it is
    m.request("chat", 0).failed("INVALID_ARGUMENT")
    value = m.registry.get_sample_value
    labels = {"model_name": "chat", "replica": "0"}
    assert value("llmesh:request_errors_total", {**labels, "code": "INTERNAL"}) == 1
    assert value("llmesh:request_errors_total", {**labels, "code": "INVALID_ARGUMENT"}) == 1
    assert value("llmesh:request_aborted_total", {**labels, "how": "deadline"}) == 0
    assert value("llmesh:generation_tokens_total", labels) == 3


def test_routing_reason_follows_the_selector_precedence() -> None:
    req = cp.AssignWorkerRequest(model="m", affinity_key="k", pinned_replica=1)
    assert routing_reason(req) == "pinned"
    req = cp.AssignWorkerRequest(model="m", affinity_key="k", purpose_pins={"chat": 0})
    assert routing_reason(req) == "purpose_pin"
    req = cp.AssignWorkerRequest(model="m", affinity_key="k", purpose_pins={"embedding": 0})
    assert routing_reason(req) == "affinity"
    assert routing_reason(cp.AssignWorkerRequest(model="m")) == "policy"


# What Prometheus 2.42 sends: it prefers OpenMetrics.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def _scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    request = urllib.request.Request(url, headers={"Accept": PROMETHEUS_ACCEPT})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    # The names keep their colons (prometheus_client's OpenMetrics writer would turn them
    # into underscores): the page is in the text format whatever the scraper asks for.
    assert "llmesh_" not in text and "llmesh:" in text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_endpoint_serves_loop_state_read_on_the_loop_and_the_global_registry() -> None:
    """A scrape from the HTTP thread reads loop-owned state on the loop, and sees the process
    collector of prometheus_client's global registry (where vLLM's metrics live too)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    readers: list[int] = []
    jobs = [JobSample("j1", "RUNNING", step=3, total_steps=10, loss=1.5, samples_per_second=2.0)]

    def sample() -> list[JobSample]:
        readers.append(threading.get_ident())
        return jobs

    endpoint = start_metrics(trainer_registry(loop, sample), "127.0.0.1:0")
    assert endpoint is not None
    try:
        assert endpoint.url == f"http://127.0.0.1:{endpoint.port}/metrics"
        got = _scrape(endpoint.url)
        assert got[("llmesh:training_jobs", frozenset({("state", "RUNNING")}))] == 1
        assert got[("llmesh:training_loss", frozenset({("job_id", "j1")}))] == 1.5
        assert got[("llmesh:training_step", frozenset({("job_id", "j1")}))] == 3
        assert any(name == "process_resident_memory_bytes" for name, _ in got)
        assert readers == [thread.ident]
    finally:
        endpoint.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    with pytest.raises(OSError):
        urllib.request.urlopen(endpoint.url, timeout=2)


def test_metrics_off_serves_nothing() -> None:
    assert start_metrics(ReplicaMetrics().registry, None) is None


def test_the_grafana_dashboard_queries_only_metrics_that_exist() -> None:
    import json
    import re
    from pathlib import Path

    from llmesh.common.metrics import node_agent_registry

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        replica = ReplicaMetrics()
        replica.watch_load(loop, lambda: [("chat", 0, 1, 0)])
        req = replica.request("chat", 0)
        req.admitted()
        req.chunk(1)
        req.chunk(1)
        req.finished("stop", 3, 2)
        replica.request("chat", 0).aborted("cancel")
        replica.request("chat", 0).failed("INTERNAL")
        replica.request("chat", 0).migrated(0)
        replica.resource_exhausted("chat", 0, "queue_full")
        control = ControlPlaneMetrics()
        control.watch_registry(loop, lambda: ([("chat", "READY")], [("inference", 1)]))
        control.routed("least_loaded", "policy")
        control.etcd_latency.observe(0.001)
        control.etcd_reachable.set(1)
        registries = [
            replica.registry,
            control.registry,
            node_agent_registry(loop, lambda: [("chat", 1, 0, "READY", 1, 0)]),
            trainer_registry(loop, lambda: [JobSample("j", "RUNNING", 1, 2, 0.5, 3.0)]),
        ]
        exported = {s.name for r in registries for f in r.collect() for s in f.samples}
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    path = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"llmesh:[a-z0-9_]+", e)}
    assert len(dashboard["panels"]) >= 10
    assert used and not used - exported, sorted(used - exported)


def test_every_server_command_takes_the_metrics_flags() -> None:
    from llmesh import cli
    from llmesh.cli.servers import metrics_listen

    parse = cli.build_parser().parse_args
    for command in ("control-plane", "inference-worker", "trainer-worker", "up"):
        assert metrics_listen(parse([command])) is None  # default: a free port
        assert metrics_listen(parse([command, "--no-metrics"])) == "off"
        args = parse([command, "--metrics-listen", "127.0.0.1:9100"])
        assert metrics_listen(args) == "127.0.0.1:9100"


def test_a_failing_sampler_leaves_only_its_families_out_of_the_page() -> None:
    """A snapshot whose build raises (here ValueError, as an unknown enum value would) must not
    turn the page into HTTP 500: the other families and the global registry stay served."""
    from llmesh.common.metrics import SnapshotCollector, enum_name
    from llmesh.v1 import common_pb2

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    calls: list[int] = []

    def broken() -> list[Any]:
        calls.append(1)
        raise ValueError("a sampler bug")

    replica = ReplicaMetrics()
    replica.watch_load(loop, lambda: [("chat", 0, 2, 1)])
    replica.registry.register(SnapshotCollector(loop, broken))  # type: ignore[arg-type]
    replica.request("chat", 0).migrated(0)
    endpoint = start_metrics(replica.registry, "127.0.0.1:0")
    assert endpoint is not None
    try:
        for _ in range(2):  # the second scrape's warning is rate-limited, the page the same
            got = _scrape(endpoint.url)
            chat = frozenset({("model_name", "chat"), ("replica", "0")})
            assert got[("llmesh:num_requests_running", chat)] == 2
            assert got[("llmesh:request_migrations_total", chat)] == 1
            assert any(name == "process_resident_memory_bytes" for name, _ in got)
        assert len(calls) == 2  # the broken build really ran on each scrape
    finally:
        endpoint.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    assert enum_name(common_pb2.ReplicaState, 999, "REPLICA_STATE_") == "UNKNOWN"
    assert enum_name(common_pb2.ReplicaState, common_pb2.REPLICA_STATE_READY, "REPLICA_STATE_") == (
        "READY"
    )


def test_node_agent_series_keep_a_rolling_updates_generations_apart() -> None:
    """The old and the new generation of one replica index run side by side during a rolling
    update: each gets series of its own instead of two samples with the same labels."""
    from llmesh.common.metrics import node_agent_registry

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    processes = [("chat", 1, 0, "DRAINING", 11, 2), ("chat", 2, 0, "LOADING", 12, 0)]
    endpoint = start_metrics(
        node_agent_registry(loop, lambda: processes), "127.0.0.1:0", include_global=False
    )
    assert endpoint is not None
    try:
        with urllib.request.urlopen(endpoint.url, timeout=10) as response:
            text = response.read().decode()
    finally:
        endpoint.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    keys = [(s.name, frozenset(s.labels.items())) for s in samples]
    assert len(keys) == len(set(keys)), "duplicate series on the page"
    got = dict(zip(keys, (s.value for s in samples), strict=True))
    old = frozenset({("model_name", "chat"), ("generation", "1"), ("replica", "0")})
    new = frozenset({("model_name", "chat"), ("generation", "2"), ("replica", "0")})
    assert got[("llmesh:replica_restarts_total", old)] == 2
    assert got[("llmesh:replica_restarts_total", new)] == 0
    assert got[("llmesh:replica_process_state", old | {("state", "DRAINING")})] == 1
    assert got[("llmesh:replica_process_state", new | {("state", "LOADING")})] == 1


def test_a_resumed_request_counts_only_the_tokens_generated_here() -> None:
    """completion_tokens of a resumed request includes the resumed tokens, which the replica
    that generated them counted already; its prompt counts again (prefilled again here)."""
    m = ReplicaMetrics()
    req = m.request("chat", 0)
    req.migrated(5)
    req.admitted()
    req.chunk(1)
    req.chunk(1)
    req.finished("length", prompt_tokens=7, completion_tokens=7)
    value = m.registry.get_sample_value
    labels = {"model_name": "chat", "replica": "0"}
    assert value("llmesh:generation_tokens_total", labels) == 2
    assert value("llmesh:prompt_tokens_total", labels) == 7
    assert value("llmesh:request_migrations_total", labels) == 1
    gone = m.request("chat", 0)
    gone.migrated(5)
    gone.chunk(3)
    gone.aborted("disconnect")
    assert value("llmesh:generation_tokens_total", labels) == 5


def test_inter_token_latency_is_per_token_when_a_chunk_carries_several() -> None:
    """A chunk of N tokens is N observations of its gap / N (capped per chunk), so the ITL
    count and sum follow tokens, not chunks."""
    from llmesh.common.metrics import ITL_MAX_OBSERVATIONS

    m = ReplicaMetrics()
    req = m.request("chat", 0)
    req.chunk(2)  # the first output: TTFT only, its second token has no gap of its own
    req.chunk(4)
    req.chunk(1)
    req.chunk(ITL_MAX_OBSERVATIONS + 36)
    labels = {"model_name": "chat", "replica": "0"}
    value = m.registry.get_sample_value
    assert value("llmesh:time_to_first_token_seconds_count", labels) == 1
    assert value("llmesh:inter_token_latency_seconds_count", labels) == 4 + 1 + 64
    assert req.generated == 2 + 4 + 1 + 100


def test_forget_drops_every_series_of_a_replica_and_only_those() -> None:
    m = ReplicaMetrics()
    for model in ("lora", "chat"):
        req = m.request(model, 0)
        req.admitted()
        req.chunk(1)
        req.chunk(1)
        req.finished("stop", 3, 2)
        m.request(model, 0).aborted("cancel")
        m.request(model, 0).failed("INTERNAL")
        m.resource_exhausted(model, 0, "queue_full")
    m.forget("lora", 0)
    m.forget("never-served", 1)  # nothing to drop: no error
    names = [dict(s.labels).get("model_name") for f in m.registry.collect() for s in f.samples]
    assert "lora" not in names and "chat" in names
    req = m.request("lora", 0)  # served again later: fresh series
    req.finished("stop", 1, 1)
    assert (
        m.registry.get_sample_value(
            "llmesh:request_success_total",
            {"model_name": "lora", "replica": "0", "finished_reason": "stop"},
        )
        == 1
    )


def test_https_endpoint_handshakes_per_connection_and_a_bad_key_binds_nothing(
    tmp_path: Any,
) -> None:
    """Over HTTPS the handshake runs in the connection's thread: a client that connects and
    says nothing does not hold up another scrape. A key that does not load leaves no socket."""
    import socket
    import ssl

    from llmesh.common.certs import make_ca, make_leaf

    ca = make_ca(tmp_path)
    leaf = make_leaf(tmp_path, ca, "metrics")
    # A port that was free a moment ago; a failed start must leave it free.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ssl.SSLError):
        start_metrics(
            ReplicaMetrics().registry,
            f"127.0.0.1:{port}",
            certfile=str(leaf.cert),
            keyfile=str(ca.key),  # not the certificate's key
        )
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # raises if the failed start left it bound

    replica = ReplicaMetrics()
    replica.request("chat", 0).migrated(0)
    endpoint = start_metrics(
        replica.registry, "127.0.0.1:0", certfile=str(leaf.cert), keyfile=str(leaf.key)
    )
    assert endpoint is not None and endpoint.url.startswith("https://127.0.0.1:")
    stalled = socket.create_connection(("127.0.0.1", endpoint.port))  # never says hello
    try:
        context = ssl.create_default_context(cafile=str(ca.cert))
        with urllib.request.urlopen(endpoint.url, timeout=8, context=context) as response:
            text = response.read().decode()
        assert 'llmesh:request_migrations_total{model_name="chat",replica="0"} 1.0' in text
    finally:
        stalled.close()
        endpoint.close()


def test_plain_http_metrics_beyond_loopback_need_insecure() -> None:
    """/metrics has no token check: beyond loopback it must be HTTPS, or --insecure."""
    with pytest.raises(InsecureBind, match=r"/metrics on 0\.0\.0\.0:0 .* --insecure"):
        start_metrics(ReplicaMetrics().registry, "0.0.0.0:0")
    endpoint = start_metrics(ReplicaMetrics().registry, "0.0.0.0:0", insecure=True)
    assert endpoint is not None
    endpoint.close()
