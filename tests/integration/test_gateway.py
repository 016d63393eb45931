"""The OpenAI-compatible gateway against a real mesh, driven by the official ``openai`` client.

One module-scoped mesh: a control plane, one inference worker with the tiny chat model
(transformers engine) and all-MiniLM-L6-v2 for embeddings and rerank, all on a real etcd, and
the gateway on uvicorn on a loopback port. Raw SSE framing is checked with httpx.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmesh import ByzerLLM

from .conftest import Mesh, wait_replica_idle

HELLO = [{"role": "user", "content": "What is the capital of France?"}]
LONG = {"max_tokens": 1500, "extra_body": {"ignore_eos": True}}


class Running:
    def __init__(self, mesh: Mesh, llm: ByzerLLM, url: str) -> None:
        self.mesh = mesh
        self.llm = llm
        self.url = url
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    def chat_replica(self) -> tuple[str, str]:
        """(gRPC address, metrics URL) of the chat model's replica."""
        (replica,) = self.llm.get_model("chat").replicas
        return replica.address, replica.metrics_url


@pytest.fixture(scope="module")
def gw(etcd_server: Any, test_model_dir: Path, embedding_model_dir: Path) -> Iterator[Running]:
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-gw-{uuid.uuid4().hex[:6]}")
    llm = None
    try:
        address = mesh.start_control_plane()
        mesh.start_worker("w0", cpus=3)
        llm = ByzerLLM(control_plane=address)
        llm.setup_num_workers(1).setup_cpus_per_worker(1).setup_infer_backend("transformers")
        llm.deploy(str(test_model_dir), "custom/llama", "chat", {"max_concurrency": 4})
        llm.setup_cpus_per_worker(0.5).setup_infer_backend("embedding")
        llm.deploy(str(embedding_model_dir), "custom/auto", "emb", {})
        llm.setup_infer_backend("rerank").deploy(
            str(embedding_model_dir), "custom/auto", "rerank", {}
        )
        gateway = mesh.start_gateway()
        yield Running(mesh, llm, gateway.url)
    finally:
        if llm is not None:
            llm.close()
        mesh.close()


def _aborts(metrics_url: str, how: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (
                s.name == "llmesh:request_aborted_total"
                and s.labels.get("model_name") == "chat"
                and s.labels.get("how") == how
            ):
                return s.value
    return 0.0


def _wait(check: Any, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- chat ---------------------------------------------------------------------------------------


def test_chat_non_streaming(gw: Running) -> None:
    r = gw.client.chat.completions.create(
        model="chat", messages=HELLO, max_tokens=16, temperature=0
    )
    assert r.object == "chat.completion" and r.model == "chat"
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = gw.client.chat.completions.create(
        model="chat", messages=HELLO, max_completion_tokens=16, temperature=0
    )
    assert again.choices[0].message.content == choice.message.content


def test_chat_streaming_matches_non_streaming(gw: Running) -> None:
    whole = gw.client.chat.completions.create(
        model="chat", messages=HELLO, max_tokens=24, temperature=0
    )
    chunks = list(
        gw.client.chat.completions.create(
            model="chat",
            messages=HELLO,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [f.choices[0].finish_reason for f in finals] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_framing(gw: Running) -> None:
    body = {"model": "chat", "messages": HELLO, "max_tokens": 12, "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")
    assert events[-1] == ""
    for e in events[:-1]:
        assert e.startswith("data: ") and "\n" not in e, e
    payloads = [json.loads(e[6:]) for e in events[:-2]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings(gw: Running) -> None:
    free = gw.client.chat.completions.create(
        model="chat", messages=HELLO, max_tokens=24, temperature=0
    )
    text = free.choices[0].message.content
    words = text.split(" ")
    assert len(words) >= 3, text
    stop = " " + words[2]
    r = gw.client.chat.completions.create(
        model="chat", messages=HELLO, max_tokens=24, temperature=0, stop=[stop]
    )
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_n_varies_the_seed(gw: Running) -> None:
    def ask(**kw: Any) -> list[str]:
        r = gw.client.chat.completions.create(
            model="chat",
            messages=HELLO,
            max_tokens=20,
            temperature=1.0,
            seed=7,
            extra_body={"ignore_eos": True},
            **kw,
        )
        return [c.message.content for c in r.choices]

    first = ask()
    assert ask() == first
    both = ask(n=2)
    assert len(both) == 2 and both[0] == first[0] and both == ask(n=2)
    assert both[1] != both[0]  # the second choice runs with seed 8

    # Usage counts the one prompt once, however many choices read it (as OpenAI and vLLM).
    def usage(n: int) -> Any:
        return gw.client.chat.completions.create(
            model="chat", messages=HELLO, max_tokens=4, n=n, extra_body={"ignore_eos": True}
        ).usage

    one, two = usage(1), usage(2)
    assert two.prompt_tokens == one.prompt_tokens > 0
    assert two.completion_tokens == 2 * one.completion_tokens == 8


def test_tools_with_tool_choice(gw: Running) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 12}},
                    "required": ["city"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "description": "The time in a city.",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 12}},
                    "required": ["city"],
                },
            },
        },
    ]
    r = gw.client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    # Streamed: the same call arrives as one tool_calls delta.
    chunks = list(
        gw.client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=False,  # one call: the schema allows no second one
            max_tokens=120,
            temperature=0,
            stream=True,
        )
    )
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name in ("get_weather", "get_time")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_response_format_json_schema_parses(gw: Running) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "color": {"enum": ["red", "green", "blue"]},
        },
        "required": ["name", "age", "color"],
    }
    r = gw.client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "Tell me about a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        max_tokens=80,
        temperature=0,
    )
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"name", "age", "color"} and data["color"] in ("red", "green", "blue")
    r = gw.client.chat.completions.create(
        model="chat",
        messages=HELLO,
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0,
    )
    content = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":  # an unbounded object may run to max_tokens
        assert isinstance(json.loads(content), dict)
    else:
        assert content.lstrip().startswith("{")


# -- completions, embeddings, rerank, models ---------------------------------------------------


def test_text_completions(gw: Running) -> None:
    r = gw.client.completions.create(
        model="chat", prompt=["Once upon a time", "The sea"], max_tokens=8, temperature=0
    )
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    assert all(c.text for c in r.choices) and r.usage.completion_tokens > 0
    streamed = list(
        gw.client.completions.create(
            model="chat", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_embeddings_of_similar_sentences_are_closer(gw: Running) -> None:
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "A man rides a horse."]
    r = gw.client.embeddings.create(model="emb", input=texts)
    vectors = [d.embedding for d in sorted(r.data, key=lambda d: d.index)]
    assert len(vectors) == 3 and len(vectors[0]) == 384
    assert all(abs(math.fsum(x * x for x in v) - 1) < 1e-3 for v in vectors)  # unit length

    def cos(a: list[float], b: list[float]) -> float:
        return math.fsum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    b64 = gw.client.embeddings.create(model="emb", input=texts[0], encoding_format="base64")
    assert len(b64.data) == 1  # the openai client decodes base64 itself


def test_rerank_orders_by_relevance(gw: Running) -> None:
    docs = [
        "The stock market closed higher on Friday.",
        "Photosynthesis lets plants turn sunlight, water and CO2 into sugar.",
        {"text": "My cat sleeps most of the afternoon."},
    ]
    body = {"model": "rerank", "query": "How do plants make food?", "documents": docs}
    r = httpx.post(gw.url + "/v1/rerank", json=body, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["index"] == 1
    assert results[0]["document"]["text"].startswith("Photosynthesis")
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True) and len(results) == 3
    top = httpx.post(gw.url + "/rerank", json={**body, "top_n": 1}, timeout=60).json()
    assert [x["index"] for x in top["results"]] == [1]


def test_models_health_and_metrics(gw: Running) -> None:
    ids = {m.id for m in gw.client.models.list()}
    assert {"chat", "emb", "rerank"} <= ids
    health = httpx.get(gw.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    key = ("llmesh:gateway_requests_total", (("route", "/v1/models"), ("status", "200")))
    assert samples[key] >= 1
    assert any(n == "llmesh:gateway_request_duration_seconds_count" for n, _ in samples)


# -- errors ------------------------------------------------------------------------------------


def _error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def test_errors_have_openai_shape_and_status(gw: Running) -> None:
    url = gw.url + "/v1/chat/completions"
    # 400: a body that does not validate, naming the field.
    r = httpx.post(url, json={"model": "chat"}, timeout=30)
    assert r.status_code == 400 and _error(r)["param"] == "messages"
    # 400: a value the engine refuses.
    r = httpx.post(url, json={"model": "chat", "messages": HELLO, "temperature": -1}, timeout=30)
    assert r.status_code == 400 and "temperature" in _error(r)["message"]
    # 400: a field the mesh cannot honour.
    r = httpx.post(url, json={"model": "chat", "messages": HELLO, "logprobs": True}, timeout=30)
    assert r.status_code == 400 and _error(r)["param"] == "logprobs"
    # 404: an unknown model.
    with pytest.raises(openai.NotFoundError) as e:
        gw.client.chat.completions.create(model="nope", messages=HELLO)
    assert e.value.status_code == 404 and "nope" in str(e.value)
    r = httpx.post(url, json={"model": "nope", "messages": HELLO, "stream": True}, timeout=30)
    assert r.status_code == 404 and _error(r)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        gw.client.embeddings.create(model="emb", input=[1, 2, 3])


def test_queue_full_is_429_with_retry_after_and_no_replica_is_503(
    gw: Running, test_model_dir: Path
) -> None:
    llm = gw.llm
    llm.setup_num_workers(1).setup_cpus_per_worker(0.5).setup_infer_backend("transformers")
    llm.deploy(str(test_model_dir), "custom/llama", "tight", {"max_concurrency": 1, "max_queue": 0})
    try:
        holder = llm.stream_chat_oai(
            HELLO, model="tight", llm_config={"max_length": 1500, "ignore_eos": True}
        )
        next(holder)
        try:
            body = {"model": "tight", "messages": HELLO, "max_tokens": 4}
            r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 429, r.text
            assert _error(r)["type"] == "rate_limit_error"
            assert int(r.headers["retry-after"]) >= 1
            with pytest.raises(openai.RateLimitError):
                gw.client.chat.completions.create(
                    model="tight", messages=HELLO, max_tokens=4, stream=True
                )
        finally:
            holder.close()
    finally:
        llm.undeploy("tight", wait=True)
    # A replica that waits for room (w0 has 3 CPUs, 2 of them taken): PENDING, none READY.
    llm.setup_cpus_per_worker(2.5)
    llm.deploy(str(test_model_dir), "custom/llama", "pending", {}, wait=False)
    try:
        r = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "pending", "messages": HELLO},
            timeout=30,
        )
        assert r.status_code == 503, r.text
        assert "READY" in _error(r)["message"] and r.headers["retry-after"]
    finally:
        llm.undeploy("pending", wait=True)


# -- client disconnect -------------------------------------------------------------------------


def test_client_disconnect_mid_stream_cancels_on_the_replica(gw: Running) -> None:
    address, metrics_url = gw.chat_replica()
    assert metrics_url
    before = _aborts(metrics_url, "cancel")
    body = {"model": "chat", "messages": HELLO, "stream": True, "max_tokens": 1500}
    body["ignore_eos"] = True
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    # The connection is closed here, long before 1500 tokens.
    _wait(lambda: _aborts(metrics_url, "cancel") == before + 1, "the replica's cancel")
    wait_replica_idle(address, "chat")


def test_client_disconnect_during_a_non_streamed_answer_cancels_it(gw: Running) -> None:
    address, metrics_url = gw.chat_replica()
    before = _aborts(metrics_url, "cancel")
    body = {"model": "chat", "messages": HELLO, "max_tokens": 1500, "ignore_eos": True}
    done = threading.Event()

    def slow_client() -> None:
        try:
            httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=0.5)
        except httpx.TimeoutException:
            pass
        done.set()

    threading.Thread(target=slow_client, daemon=True).start()
    assert done.wait(10)
    _wait(lambda: _aborts(metrics_url, "cancel") == before + 1, "the replica's cancel")
    wait_replica_idle(address, "chat")


# -- the client pool ---------------------------------------------------------------------------


def test_a_full_pool_never_closes_a_client_under_a_running_stream(gw: Running) -> None:
    """max_clients=1 and two tokens (the mesh runs without --auth, so both are accepted): the
    second token's request arrives while the first streams. The stream finishes intact, and
    the client that went idle beyond the cap is closed afterwards."""
    mesh = gw.mesh
    gateway = mesh.start_gateway("one-client", max_clients=1)
    pool = gateway.app.state.gateway.pool
    closed: list[Any] = []
    close = pool._close

    async def spy(client: Any) -> None:
        closed.append(client)
        await close(client)

    pool._close = spy

    async def held() -> list[str]:
        return list(pool._clients)

    def client(token: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=gateway.url + "/v1", api_key=token, max_retries=0)

    tokens = 1000
    params: dict[str, Any] = {
        "model": "chat",
        "messages": HELLO,
        "max_tokens": tokens,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    try:
        reference = gw.client.chat.completions.create(**params).choices[0].message.content
        stream = client("token-a").chat.completions.create(
            **params, stream=True, stream_options={"include_usage": True}
        )
        chunks = [next(stream) for _ in range(3)]
        other = client("token-b").chat.completions.create(
            model="chat", messages=HELLO, max_tokens=4
        )
        assert other.choices[0].message.content is not None
        # token-b's client went idle beyond the cap and is closed; token-a's is still busy.
        _wait(lambda: mesh.call(held()) == ["token-a"], "the idle client's eviction")
        chunks += list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reference
        finals = [
            c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
        ]
        assert finals == ["length"]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == tokens
        _wait(lambda: bool(closed) and closed[0].router.closed, "token-b's client to close")
        assert len(closed) == 1
        assert mesh.call(held()) == ["token-a"]
    finally:
        mesh.stop_gateway("one-client")
