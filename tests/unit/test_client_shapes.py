"""Pure conversions in the SDK: llm_config -> GenerationParams, Byzer-LLM result shapes, local
replica filtering and retry bookkeeping. No servers: channels are created but never used."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from llmesh import client as c
from llmesh.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from llmesh.llm_config import generation_config
from llmesh.route_cache import RouteCache, replica_id, rpc_errors
from llmesh.sdk import channels, results
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import inference_service_pb2 as inf

READY = common_pb2.REPLICA_STATE_READY
LOADING = common_pb2.REPLICA_STATE_LOADING
# Nothing listens here; channels connect lazily, so no test below ever dials it.
NOWHERE = "127.0.0.1:1"


# -- llm_config -> GenerationParams ----------------------------------------------------------


def test_generation_config_maps_known_keys() -> None:
    config = c.generation_config(
        {
            "temperature": 0.2,
            "top_p": "0.9",
            "top_k": 40,
            "max_new_tokens": 64,
            "stop": "</s>",
            "stop_token_ids": 2,
            "repetition_penalty": 1.1,
            "seed": 7,
        }
    )
    p = config.params
    assert p.temperature == pytest.approx(0.2)
    assert p.top_p == pytest.approx(0.9)
    assert (p.top_k, p.max_tokens, p.seed) == (40, 64, 7)
    assert list(p.stop) == ["</s>"]
    assert list(p.stop_token_ids) == [2]
    assert p.repetition_penalty == pytest.approx(1.1)
    assert not p.HasField("extra")
    assert config.request_id == ""
    assert config.timeout is None


def test_unset_keys_stay_unset() -> None:
    p = c.generation_config({}).params
    for field in ("temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "seed"):
        assert not p.HasField(field)
    assert c.generation_config(None).params == common_pb2.GenerationParams()
    assert not c.generation_config({"temperature": None}).params.HasField("temperature")


def test_zero_temperature_is_kept_not_dropped() -> None:
    p = c.generation_config({"temperature": 0}).params
    assert p.HasField("temperature") and p.temperature == 0


def test_byzer_prefixes_are_stripped() -> None:
    config = c.generation_config(
        {
            "gen.temperature": 0.5,
            "generation.repetition_penalty": 1.1,
            "generation.stop_token_ids": [151643, 151645],
            "gen.request_id": "req-1",
            "gen.custom_knob": "x",
        }
    )
    assert config.params.temperature == pytest.approx(0.5)
    assert list(config.params.stop_token_ids) == [151643, 151645]
    assert config.request_id == "req-1"
    assert dict(config.params.extra) == {"custom_knob": "x"}


@pytest.mark.parametrize(
    ("llm_config", "expected"),
    [
        ({"max_length": 100}, 100),
        ({"max_tokens": 10, "max_length": 100}, 10),
        ({"max_length": 100, "max_new_tokens": 20}, 20),
        ({"max_length": 100, "max_new_tokens": 20, "gen.max_tokens": 5}, 5),
        ({"max_tokens": "32"}, 32),
        ({"max_tokens": 32.0}, 32),
    ],
)
def test_max_tokens_precedence(llm_config: dict, expected: int) -> None:
    assert c.generation_config(llm_config).params.max_tokens == expected


def test_stop_lists_and_stopping_sequences() -> None:
    p = c.generation_config({"stop": ["a", "b"], "stopping_sequences": ["b", "c"]}).params
    assert list(p.stop) == ["a", "b", "c"]
    p = c.generation_config({"stop_token_ids": ("1", 2)}).params
    assert list(p.stop_token_ids) == [1, 2]


def test_request_timeout_and_affinity() -> None:
    config = c.generation_config({"request_id": "r", "timeout_s": "2.5", "affinity_key": "user-9"})
    assert (config.request_id, config.timeout, config.affinity_key) == ("r", 2.5, "user-9")
    assert not config.params.HasField("extra")


def test_byzer_internal_flags_are_dropped() -> None:
    p = c.generation_config({"generation.stream": True, "gen.abort": True}).params
    assert not p.HasField("extra")


def test_unknown_keys_go_to_extra() -> None:
    p = c.generation_config({"min_p": 0.1, "logit_bias": {"5": -1}, "flags": [1, "x"]}).params
    assert p.extra["min_p"] == pytest.approx(0.1)
    assert dict(p.extra["logit_bias"]) == {"5": -1.0}
    assert list(p.extra["flags"]) == [1.0, "x"]


@pytest.mark.parametrize(
    ("llm_config", "fragment"),
    [
        ({"temperature": "hot"}, "'temperature'"),
        ({"temperature": True}, "'temperature'"),
        ({"top_k": 1.5}, "whole number"),
        ({"max_tokens": 0}, "positive"),
        ({"max_length": -3}, "positive"),
        ({"stop": [1, 2]}, "'stop'"),
        ({"stop": ""}, "empty stop"),
        ({"stop_token_ids": ["x"]}, "'stop_token_ids'"),
        ({"seed": "abc"}, "'seed'"),
        ({"timeout_s": 0}, "positive"),
        ({"custom": object()}, "JSON-like"),
    ],
)
def test_bad_values_are_invalid_argument(llm_config: dict, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        c.generation_config(llm_config)


def test_strip_config_prefix() -> None:
    assert c.strip_config_prefix("gen.top_p") == "top_p"
    assert c.strip_config_prefix("generation.top_p") == "top_p"
    assert c.strip_config_prefix("top_p") == "top_p"
    assert c.strip_config_prefix("genie") == "genie"


# -- Byzer-LLM shapes ------------------------------------------------------------------------


def test_llm_response_is_byzers_dataclass() -> None:
    names = [f.name for f in dataclasses.fields(c.LLMResponse)]
    assert names == ["output", "input", "metadata"]
    r = c.LLMResponse(output="hi", input={"instruction": "q"})
    assert r.metadata == {}
    assert c.LLMResponse("a", "b").metadata is not c.LLMResponse("a", "b").metadata


def test_llm_request_defaults() -> None:
    r = c.LLMRequest(instruction="x")
    assert (r.embedding, r.max_length, r.top_p, r.temperature) == (False, 4096, 0.95, 0.1)


def test_single_output_meta_reads_as_dict_and_attributes() -> None:
    meta = c.SingleOutputMeta({"generated_tokens_count": 3, "request_id": "r"})
    assert meta.generated_tokens_count == meta["generated_tokens_count"] == 3
    assert meta.get("missing") is None
    assert isinstance(meta, dict)
    with pytest.raises(AttributeError):
        _ = meta.missing


def test_finish_reasons() -> None:
    assert c.FINISH_REASONS[common_pb2.FINISH_REASON_STOP] == "stop"
    assert c.FINISH_REASONS[common_pb2.FINISH_REASON_STOP_STRING] == "stop"
    assert c.FINISH_REASONS[common_pb2.FINISH_REASON_LENGTH] == "length"
    assert c.FINISH_REASONS[common_pb2.FINISH_REASON_ABORTED] == "abort"
    assert c.FINISH_REASONS[common_pb2.FINISH_REASON_UNSPECIFIED] is None


def test_progress_accumulates_text_and_metadata() -> None:
    progress = results.ChatProgress("mine")
    progress.add(inf.ChatResponse(request_id="srv-1", delta="Hel", token_ids=[1, 2]))
    meta = progress.metadata()
    assert (meta["request_id"], meta["generated_tokens_count"]) == ("srv-1", 2)
    assert meta["finish_reason"] is None and meta["input_tokens_count"] == 0
    progress.add(inf.ChatResponse(delta="lo", token_ids=[3]))
    progress.add(
        inf.ChatResponse(
            finished=True,
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8),
        )
    )
    meta = progress.metadata()
    assert progress.text == "Hello"
    assert progress.finished
    assert meta["input_tokens_count"] == 5
    assert meta["generated_tokens_count"] == 3
    assert meta["finish_reason"] == "stop"
    assert set(meta) == {
        "request_id",
        "input_tokens_count",
        "generated_tokens_count",
        "finish_reason",
        "time_cost",
        "first_token_time",
        "speed",
        "migrations",
    }
    assert meta["time_cost"] >= meta["first_token_time"] >= 0
    assert meta["migrations"] == 0


def test_to_chat_messages() -> None:
    msgs = c.to_chat_messages(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi", "metadata": {"agent": 1}},
            {"role": "assistant", "content": None},
        ]
    )
    assert [(m.role, m.content) for m in msgs] == [
        ("system", "be brief"),
        ("user", "hi"),
        ("assistant", ""),
    ]


@pytest.mark.parametrize(
    ("conversations", "fragment"),
    [
        ([], "empty"),
        ("hello", "must be a list"),
        ([("user", "hi")], "must be a dict"),
        ([{"content": "hi"}], "no 'role'"),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "multi-part"),
    ],
)
def test_to_chat_messages_rejects(conversations: object, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        c.to_chat_messages(conversations)  # type: ignore[arg-type]


def test_render_with_role_mapping_like_byzer() -> None:
    conversations = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    prompt = c.render_with_role_mapping(conversations, c.DEFAULT_ROLE_MAPPING)
    assert prompt == "S\nUser:U1\nAssistant:A1\nUser:U2\nAssistant:"
    # No trailing opener when the assistant spoke last.
    assert c.render_with_role_mapping(conversations[:3], c.DEFAULT_ROLE_MAPPING).endswith("A1")
    assert c.render_with_role_mapping(conversations[1:2], c.EMPTY_ROLE_MAPPING) == "U1\n"


def test_render_with_formatter_functions() -> None:
    mapping = {
        "user_role": "",
        "assistant_role": "",
        "system_msg": "<<{system_msg}>>",
        "system_msg_func": lambda t, v: t.replace("{system_msg}", v),
        "user_role_func": lambda t, v: f"[INST] {v} [/INST]",
        "assistant_role_func": lambda t, v: f" {v} </s>",
    }
    conversations = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    assert c.render_with_role_mapping(conversations, mapping) == "<<S>>\n[INST] U [/INST]\n A </s>"


def test_echo_input_shapes() -> None:
    conversations = [
        {"role": "user", "content": "a", "metadata": 1},
        {"role": "user", "content": "b"},
    ]
    echo = results.echo_input(conversations, None, {"temperature": 0.1})
    assert echo == {
        "instruction": "b",
        "history": [{"role": "user", "content": "a"}],
        "temperature": 0.1,
    }
    assert results.echo_input(conversations, "P", {}) == {"instruction": "P", "history": []}


def test_rerank_output_single_pair_and_sorted_list() -> None:
    assert c.rerank_output([("q", "p")], [0.5], single=True) == (("q", "p"), 0.5)
    out = c.rerank_output([("q", "a"), ("q", "b"), ("q", "c")], [0.1, 0.9, 0.5], single=False)
    assert out == [(("q", "b"), 0.9), (("q", "c"), 0.5), (("q", "a"), 0.1)]


def test_normalize_pairs() -> None:
    assert results.normalize_pairs(("q", "p")) == ([("q", "p")], True)
    assert results.normalize_pairs(["q", "p"]) == ([("q", "p")], True)
    assert results.normalize_pairs([("q", "a"), ["q", "b"]]) == ([("q", "a"), ("q", "b")], False)
    with pytest.raises(InvalidArgument, match=r"sentence_pairs\[1\]"):
        results.normalize_pairs([("q", "a"), ("q",)])


def test_meta_dict_has_byzer_keys() -> None:
    meta = c.meta_dict(
        inf.GetModelMetaResponse(
            model="chat",
            backend="transformers",
            architectures=["LlamaForCausalLM"],
            max_model_len=2048,
            support_stream=True,
            support_chat_template=True,
            extra={"dtype": "float32", "backend": "ignored"},
        )
    )
    assert meta["model_deploy_type"] == "proprietary"
    assert meta["backend"] == "transformers"
    assert meta["architectures"] == ["LlamaForCausalLM"]
    assert meta["support_stream"] is True and meta["support_chat_template"] is True
    assert meta["max_model_len"] == 2048
    assert meta["dtype"] == "float32"


def test_infer_param_values_become_strings() -> None:
    assert results.param_str("half") == "half"
    assert results.param_str(True) == "true"
    assert results.param_str(4096) == "4096"
    assert results.param_str({"a": [1]}) == '{"a": [1]}'


def test_normalize_backend() -> None:
    assert c.normalize_backend("ray/vllm") == "vllm"
    assert c.normalize_backend(" DeepSpeed ") == "deepspeed"
    assert c.normalize_backend(c.InferBackend.Transformers) == "transformers"


# -- the client object, without calls --------------------------------------------------------


@pytest.fixture
def llm() -> Iterator[c.ByzerLLM]:
    client = c.ByzerLLM(NOWHERE)
    yield client
    client.close()


def test_control_plane_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMESH_CONTROL_PLANE", "10.1.2.3:5000")
    with c.ByzerLLM() as from_env:
        assert from_env.control_plane == "10.1.2.3:5000"
    monkeypatch.delenv("LLMESH_CONTROL_PLANE")
    with c.ByzerLLM() as default:
        assert default.control_plane == "127.0.0.1:50051"
    with c.ByzerLLM("h:1") as given:
        assert given.control_plane == "h:1"


def test_setup_methods_are_fluent(llm: c.ByzerLLM) -> None:
    same = (
        llm.setup_default_model_name("chat")
        .setup_default_emb_model_name("emb")
        .setup_default_re_rank_model_name("rr")
        .setup_num_workers(3)
        .setup_gpus_per_worker(1)
        .setup_cpus_per_worker(2)
        .setup_infer_backend("ray/vllm")
        .setup_worker_concurrency(16)
        .setup_load_balance_way("round_robin")
        .setup_pin_model_worker_mapping({"embedding": 0})
        .setup_role_mapping("chat", c.DEFAULT_ROLE_MAPPING)
        .setup_extra_generation_params("chat", {"gen.top_p": 0.5})
        .setup("custom", 1)
    )
    assert same is llm
    assert (llm.default_model_name, llm.default_emb_model_name) == ("chat", "emb")
    assert llm.default_rerank_model_name == "rr"
    assert llm.sys_conf["maxConcurrency"] == 3
    assert (llm.sys_conf["num_gpus"], llm.sys_conf["num_cpus"]) == (1, 2)
    assert llm.sys_conf["infer_backend"] == "vllm"
    assert llm.sys_conf["workerMaxConcurrency"] == 16
    assert llm._policy() == cp.LOAD_BALANCE_POLICY_ROUND_ROBIN
    assert llm.setup_reset() is llm
    assert llm.sys_conf == c.ByzerLLM.default_sys_conf
    assert llm._policy() == cp.LOAD_BALANCE_POLICY_LEAST_LOADED


def test_load_balance_names(llm: c.ByzerLLM) -> None:
    assert llm.setup_load_balance_way("lru")._policy() == cp.LOAD_BALANCE_POLICY_LEAST_LOADED
    assert llm.setup_load_balance_way("random")._policy() == cp.LOAD_BALANCE_POLICY_RANDOM
    with pytest.raises(InvalidArgument, match="unknown load-balance policy"):
        llm.setup_load_balance_way("fastest")


def test_pins(llm: c.ByzerLLM) -> None:
    llm.setup_pin_model_worker_mapping({"embedding": 1, "tokenizer": -1, "meta": 0})
    assert llm.pin_model_worker_mapping == {"embedding": 1, "meta": 0}
    # Byzer-LLM sent rerank as an embedding request, so the embedding pin covers rerank.
    assert llm._pins(cp.PURPOSE_RERANK)["rerank"] == 1
    llm.setup_pin_model_worker_mapping({"embedding": 1, "rerank": 2})
    assert llm._pins(cp.PURPOSE_RERANK)["rerank"] == 2
    with pytest.raises(InvalidArgument):
        llm.setup_pin_model_worker_mapping({"chat": "0"})  # type: ignore[dict-item]
    with pytest.raises(InvalidArgument):
        llm.setup_pin_model_worker_mapping({"chat": True})
    assert llm.setup_pin_model_worker_mapping(None).pin_model_worker_mapping is None


def test_extra_generation_params_merge(llm: c.ByzerLLM) -> None:
    llm.setup_extra_generation_params("chat", {"a": 1, "b": 1})
    llm.setup_extra_generation_params("chat", {"b": 2})
    assert llm._config_for("chat", {"a": 3}) == {"a": 3, "b": 2}
    assert llm._config_for("other", None) == {}


def test_model_name_is_required(llm: c.ByzerLLM) -> None:
    with pytest.raises(InvalidArgument, match="setup_default_model_name"):
        llm.chat_oai([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidArgument, match="setup_default_model_name"):
        llm.stream_chat_oai([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidArgument, match="setup_default_emb_model_name"):
        llm.emb_query("hi")
    with pytest.raises(InvalidArgument, match="setup_default_re_rank_model_name"):
        llm.emb_rerank(sentence_pairs=[("q", "p")])


def test_bad_requests_fail_before_any_call(llm: c.ByzerLLM) -> None:
    with pytest.raises(InvalidArgument, match="sentence_pairs"):
        llm.emb_rerank("rr", sentence_pairs=[])
    with pytest.raises(InvalidArgument, match="non-empty list"):
        llm.emb("emb", [])
    with pytest.raises(InvalidArgument, match="JSON list"):
        llm.apply_chat_template("chat", "not json")
    with pytest.raises(InvalidArgument, match="conversations is empty"):
        llm.stream_chat_oai([], model="chat")
    with pytest.raises(InvalidArgument, match="request_id"):
        llm.abort("", model="chat")
    with pytest.raises(InvalidArgument, match="udf_name"):
        llm.deploy("/m", "custom/auto", "", {})


def test_close_is_idempotent() -> None:
    client = c.ByzerLLM(NOWHERE)
    client.close()
    client.close()
    with pytest.raises(FailedPrecondition, match="closed"):
        client.router.routes.pick("chat")


# -- routes: local filtering and retries -----------------------------------------------------


def _replica(
    index: int, address: str, state: int = READY, generation: int = 1
) -> common_pb2.Replica:
    return common_pb2.Replica(
        model="chat",
        index=index,
        worker_id=f"w{index}",
        address=address,
        state=state,
        generation=generation,
        max_concurrency=4,
    )


@pytest.fixture
def routes() -> Iterator[RouteCache]:
    channel = grpc.insecure_channel(NOWHERE)
    cache = RouteCache(channel)
    yield cache
    cache.close()
    channel.close()


def test_candidates_prefer_the_current_generation(routes: RouteCache) -> None:
    old, new = _replica(0, "a:1", generation=1), _replica(1, "b:1", generation=2)
    assert routes.candidates([old, new], 2) == [new]
    # While no replica of the new generation is READY, the old one keeps serving.
    loading = _replica(1, "b:1", state=LOADING, generation=2)
    assert routes.candidates([old, loading], 2) == [old, loading]


def test_candidates_drop_excluded_and_down(routes: RouteCache) -> None:
    a, b = _replica(0, "a:1"), _replica(1, "b:1")
    assert routes.candidates([a, b], exclude={replica_id(a)}) == [b]
    routes.mark_down("a:1")
    assert routes.is_down("a:1")
    assert routes.candidates([a, b]) == [b]
    # A pinned request keeps a down replica: the pin wins over the hint.
    assert routes.candidates([a, b], keep_down=True) == [a, b]
    # When every READY replica is down, try them anyway rather than fail.
    routes.mark_down("b:1")
    assert routes.candidates([a, b]) == [a, b]
    routes.mark_down("a:1", seconds=0)
    assert not routes.is_down("a:1")


def test_selection_over_candidates_uses_the_shared_selector(routes: RouteCache) -> None:
    a, b = _replica(0, "a:1"), _replica(1, "b:1")
    routes.mark_down("a:1")
    picked = routes.selector.select("chat", routes.candidates([a, b]))
    assert picked.index == 1
    routes.started(b)
    assert routes.selector.local_inflight[replica_id(b)] == 1
    routes.finished(b)
    assert replica_id(b) not in routes.selector.local_inflight


def test_attempts_retry_unavailable_once(routes: RouteCache) -> None:
    attempts = channels.Attempts()
    a, b = _replica(0, "a:1"), _replica(1, "b:1")
    attempts.failed(routes, a, Unavailable("a down"))
    assert routes.is_down("a:1")
    assert replica_id(a) in attempts.tried
    with pytest.raises(Unavailable, match="b down"):
        attempts.failed(routes, b, Unavailable("b down"))


def test_attempts_try_every_replica_when_exhausted(routes: RouteCache) -> None:
    attempts = channels.Attempts()
    for i in range(3):
        attempts.failed(routes, _replica(i, f"h:{i}"), ResourceExhausted(f"busy {i}"))
    assert len(attempts.tried) == 3
    assert str(attempts.last_error) == "busy 2"
    assert not routes.is_down("h:0")
    with pytest.raises(NotFound):
        attempts.failed(routes, _replica(9, "h:9"), NotFound("other errors are not retried"))


def test_worker_unavailable_names_the_worker() -> None:
    named = channels.name_worker(_replica(2, "h:7"), Unavailable("connection refused"))
    assert isinstance(named, Unavailable)
    assert "w2 at h:7" in str(named) and "replica 2" in str(named)
    busy = ResourceExhausted("busy")
    assert channels.name_worker(_replica(2, "h:7"), busy) is busy


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
    ],
)
def test_rpc_errors_translate_status_codes(code: grpc.StatusCode, cls: type) -> None:
    with pytest.raises(cls, match="the message"), rpc_errors():
        raise _FakeRpcError(code, "the message")


def test_the_sdk_load_is_the_larger_of_published_and_own_counts(routes: RouteCache) -> None:
    from llmesh.route_cache import _ModelWatch

    a, b = _replica(0, "a:1"), _replica(1, "b:1")
    watch = _ModelWatch("chat")
    routes._apply(watch, cp.Model(name="chat", generation=1, replicas=[a, b]))
    routes.started(a)
    routes.started(a)
    routes.started(b)
    busy_a = _replica(0, "a:1")
    busy_a.inflight = 1  # published before our second request arrived
    routes._apply(watch, cp.Model(name="chat", generation=1, replicas=[busy_a, b]))
    # The SDK ends every request it counts, so a publish does not reset its own counts.
    assert routes.selector.local_inflight[replica_id(a)] == 2
    assert routes.selector._load(busy_a) == 2
    busy_a.inflight = 5  # other clients' requests too
    assert routes.selector._load(busy_a) == 5
    assert watch.settled.is_set() and not watch.stale


def test_a_burst_of_concurrent_picks_spreads_evenly(routes: RouteCache) -> None:
    import threading

    from llmesh.route_cache import _ModelWatch

    replicas = [_replica(i, f"h:{i}") for i in range(3)]
    for r in replicas:
        r.max_concurrency = 16
    watch = _ModelWatch("chat")
    routes._watches["chat"] = watch
    routes._apply(watch, cp.Model(name="chat", generation=1, replicas=replicas))
    assert routes.settled("chat")
    picked: list[int] = []
    gate = threading.Barrier(31)
    choose = routes.selector._choose

    def slow_choose(*args: Any, **kwargs: Any) -> Any:
        # Hand the GIL to the other pickers between choosing and counting: a pick that does
        # not count in the same locked step as its choice lets them all see the same loads.
        chosen = choose(*args, **kwargs)
        time.sleep(0.002)
        return chosen

    routes.selector._choose = slow_choose  # type: ignore[method-assign]

    def pick() -> None:
        gate.wait()
        picked.append(routes.pick("chat", start=True).index)

    threads = [threading.Thread(target=pick) for _ in range(31)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = [picked.count(i) for i in range(3)]
    assert sorted(counts) == [10, 10, 11], counts
    assert sum(routes.selector.local_inflight.values()) == 31


def test_calls_after_close_say_so() -> None:
    llm = c.ByzerLLM(control_plane="127.0.0.1:1")
    llm.close()
    with pytest.raises(FailedPrecondition, match="closed"):
        llm.list_models()


def test_failover_moves_a_stream_that_broke_after_output(routes: RouteCache) -> None:
    import collections

    start = inf.ChatStart(model="chat", request_id="r1")
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    moved: list[int] = []
    failover = channels.Failover(start, 2, routes, counts, lambda: moved.append(1))
    attempts = channels.Attempts()
    a, b = _replica(0, "a:1"), _replica(1, "b:1")
    lost = Unavailable("worker a is gone")
    # Nothing received yet: that is a plain retry (Attempts), not a move.
    assert not failover.move(attempts, a, lost)
    failover.received([inf.ChatResponse(token_ids=[5, 6]), inf.ChatResponse(token_ids=[7])])
    assert failover.move(attempts, a, lost)
    assert list(start.resume_token_ids) == [5, 6, 7] and moved == [1]
    assert replica_id(a) in attempts.tried and routes.is_down("a:1")
    assert attempts.last_error is lost
    # The request's own fault is never moved.
    assert not failover.move(attempts, b, InvalidArgument("bad"))
    # A replica that cannot continue it: the caller gets the failure that made it move.
    assert failover.refused(FailedPrecondition("cannot continue")) is lost
    failover.received([inf.ChatResponse(token_ids=[8])])
    assert failover.move(attempts, b, Unavailable("b is gone too"))
    assert list(start.resume_token_ids) == [5, 6, 7, 8]
    # max_migrations (2) reached: the third break is raised.
    assert not failover.move(attempts, a, Unavailable("again"))
    assert counts[("chat", "failed")] >= 1
    fresh = channels.Failover(inf.ChatStart(model="chat"), 0, routes, counts)
    fresh.received([inf.ChatResponse(token_ids=[1])])
    assert not fresh.move(channels.Attempts(), a, lost)  # max_migrations 0 turns it off


def test_max_migrations_per_client_per_model_and_per_call() -> None:
    """The client's bound is the default; a model's extra params and the call's config win."""
    with c.ByzerLLM(NOWHERE, max_migrations=5) as client:
        assert generation_config(client._config_for("m", None)).max_migrations == 5
        client.setup_max_migrations(0)
        assert generation_config(client._config_for("m", None)).max_migrations == 0
        client.setup_extra_generation_params("m", {"max_migrations": 2})
        assert generation_config(client._config_for("m", None)).max_migrations == 2
        assert generation_config(client._config_for("other", None)).max_migrations == 0
        config = client._config_for("m", {"max_migrations": 7})
        assert generation_config(config).max_migrations == 7
        with pytest.raises(InvalidArgument, match=r"max_migrations must be 0 .* or more, got -1"):
            client.setup_max_migrations(-1)
    with c.ByzerLLM(NOWHERE) as plain:
        assert generation_config(plain._config_for("m", None)).max_migrations == 3
    with pytest.raises(InvalidArgument, match=r"must be a whole number, got 2\.5"):
        c.ByzerLLM(NOWHERE, max_migrations=2.5)
