"""Schema-constrained decoding on the transformers engine, with the tiny test model.

The test model was never taught JSON, so whatever parses here parses because the engine masks
the logits to the grammar. Strings and integers in the schemas are bounded (maxLength,
maximum): the model has no reason to ever close an unbounded string, and such a request runs
to max_tokens and finishes "length" with a valid prefix only (tested below).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import torch

from llmesh.common.errors import InvalidArgument
from llmesh.inference_worker.engines import create_engine
from llmesh.inference_worker.engines.base import (
    Engine,
    EngineConfig,
    SamplingParams,
    StructuredOutput,
)
from llmesh.v1 import common_pb2, control_plane_service_pb2_grpc, inference_service_pb2_grpc
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import inference_service_pb2 as inf

from .conftest import Mesh

PROMPT = "Tell me about a person:"
COLORS = ["red", "green", "blue"]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": COLORS},
    },
    "required": ["name", "age", "color"],
}
NUMBERS = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 99},
    "minItems": 1,
    "maxItems": 5,
}


def _json(schema: dict[str, Any]) -> StructuredOutput:
    return StructuredOutput(json_schema=json.dumps(schema))


def _check_person(value: Any) -> None:
    assert isinstance(value, dict) and set(value) == {"name", "age", "color"}, value
    assert isinstance(value["name"], str) and len(value["name"]) <= 24
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool)
    assert 0 <= value["age"] <= 150
    assert value["color"] in COLORS


async def _run(engine: Engine, params: SamplingParams, prompt: str = PROMPT) -> tuple[str, str]:
    """(text, finish_reason) of one request."""
    text, finish = "", ""
    async for chunk in engine.generate(f"so-{uuid.uuid4().hex[:8]}", prompt, params):
        text += chunk.delta
        finish = chunk.finish_reason or finish
    return text, finish


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def llm(test_model_dir: Path) -> AsyncIterator[Engine]:
    engine = create_engine(
        EngineConfig(
            model_name="tiny",
            model_path=str(test_model_dir),
            backend="transformers",
            infer_params={"max_concurrency": "4"},
        )
    )
    await engine.start()
    yield engine
    await engine.stop()


async def test_json_object_schema_greedy(llm: Engine) -> None:
    text, finish = await _run(llm, SamplingParams(temperature=0, structured_output=_json(PERSON)))
    assert finish == "stop", text
    _check_person(json.loads(text))


async def test_json_array_schema(llm: Engine) -> None:
    text, finish = await _run(llm, SamplingParams(temperature=0, structured_output=_json(NUMBERS)))
    assert finish == "stop", text
    value = json.loads(text)
    assert isinstance(value, list) and 1 <= len(value) <= 5
    assert all(isinstance(v, int) and 0 <= v <= 99 for v in value)


async def test_regex(llm: Engine) -> None:
    so = StructuredOutput(regex=r"\d{3}-\d{4}")
    text, finish = await _run(llm, SamplingParams(temperature=0, structured_output=so))
    assert finish == "stop"
    assert re.fullmatch(r"\d{3}-\d{4}", text), text


async def test_choice_even_with_ignore_eos(llm: Engine) -> None:
    # ignore_eos must not let a finished grammar run on: the grammar decides the end.
    so = StructuredOutput(choice=["yes", "no"])
    for extra in ({}, {"ignore_eos": True}):
        params = SamplingParams(temperature=0, structured_output=so, extra=extra)
        text, finish = await _run(llm, params)
        assert (text, finish) in (("yes", "stop"), ("no", "stop"))


@pytest.mark.parametrize("seed", range(5))
async def test_seeded_sampling_stays_valid(llm: Engine, seed: int) -> None:
    params = SamplingParams(
        temperature=1.0,
        top_p=0.95,
        top_k=50,
        repetition_penalty=1.2,
        seed=seed,
        structured_output=_json(PERSON),
    )
    text, finish = await _run(llm, params)
    assert finish == "stop", text
    _check_person(json.loads(text))
    # The same seed gives the same constrained sample.
    assert await _run(llm, params) == (text, finish)


async def test_concurrent_constrained_requests(llm: Engine) -> None:
    """Each request owns its matcher: different grammars decoding at once do not mix."""
    person = SamplingParams(temperature=1.0, seed=7, structured_output=_json(PERSON))
    numbers = SamplingParams(temperature=1.0, seed=7, structured_output=_json(NUMBERS))
    plain = SamplingParams(temperature=0, max_tokens=30)
    results = await asyncio.gather(
        _run(llm, person), _run(llm, numbers), _run(llm, person), _run(llm, plain)
    )
    _check_person(json.loads(results[0][0]))
    assert isinstance(json.loads(results[1][0]), list)
    _check_person(json.loads(results[2][0]))
    assert results[3][0]  # the unconstrained request is untouched
    assert not llm.active_requests()


async def test_max_tokens_before_grammar_completes_is_length(llm: Engine) -> None:
    unbounded = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    params = SamplingParams(temperature=0, max_tokens=12, structured_output=_json(unbounded))
    text, finish = await _run(llm, params)
    assert finish == "length"
    assert text.startswith('{"s": "')  # a valid prefix, honestly incomplete


async def test_padded_vocabulary_never_yields_padding_ids(
    test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Logits wider than the tokenizer (embedding padding): the padding ids stay masked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    padded = tmp_path_factory.mktemp("padded")
    tokenizer = AutoTokenizer.from_pretrained(test_model_dir)
    model = AutoModelForCausalLM.from_pretrained(test_model_dir)
    n_real = len(tokenizer)
    model.resize_token_embeddings(n_real + 100, mean_resizing=False)
    with torch.no_grad():  # make the padding rows the most likely tokens, unmasked
        model.get_output_embeddings().weight[n_real:] = 5.0
    model.save_pretrained(padded)
    tokenizer.save_pretrained(padded)
    engine = create_engine(EngineConfig("padded", str(padded), "transformers"))
    await engine.start()
    try:
        params = SamplingParams(temperature=0, structured_output=_json(PERSON))
        chunks = [c async for c in engine.generate("pad", PROMPT, params)]
    finally:
        await engine.stop()
    assert chunks[-1].finish_reason == "stop"
    _check_person(json.loads("".join(c.delta for c in chunks)))
    assert all(i < n_real for c in chunks for i in c.token_ids)


@pytest.mark.parametrize(
    ("so", "words"),
    [
        (StructuredOutput(json_schema="{not json"), "structured_output.json_schema"),
        (StructuredOutput(json_schema="[1, 2]"), "structured_output.json_schema"),
        (StructuredOutput(json_schema='{"type": "foo"}'), "structured_output.json_schema"),
        (StructuredOutput(regex="(abc"), "structured_output.regex"),
        (StructuredOutput(regex=r"\d", choice=["a"]), "exactly one"),
        (StructuredOutput(json_schema="{}", regex="a"), "exactly one"),
        (StructuredOutput(), "exactly one"),
    ],
)
async def test_invalid_structured_output(llm: Engine, so: StructuredOutput, words: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        await _run(llm, SamplingParams(structured_output=so))
    assert not llm.active_requests()


# -- through the real worker ----------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_stub(
    etcd_server: Any, test_model_dir: Path
) -> Iterator[inference_service_pb2_grpc.InferenceServiceStub]:
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-so-{uuid.uuid4().hex[:6]}")
    try:
        mesh.start_control_plane()
        worker = mesh.start_worker("w-so")
        control = control_plane_service_pb2_grpc.ControlPlaneServiceStub(
            grpc.insecure_channel(mesh.address())
        )
        model = cp.Model(name="chat", model_path=str(test_model_dir), backend="transformers")
        control.DeployModel(
            cp.DeployModelRequest(model=model, wait_ready=True, timeout_seconds=120)
        )
        yield inference_service_pb2_grpc.InferenceServiceStub(
            grpc.insecure_channel(worker.replica_address("chat"))
        )
    finally:
        mesh.close()


def _chat(stub: Any, params: common_pb2.GenerationParams) -> list[inf.ChatResponse]:
    start = inf.ChatStart(
        model="chat",
        messages=[common_pb2.ChatMessage(role="user", content="Describe a person as JSON.")],
        params=params,
    )
    return list(stub.Chat(iter([inf.ChatRequest(start=start)]), timeout=60))


def test_chat_over_grpc_returns_schema_json(worker_stub: Any) -> None:
    params = common_pb2.GenerationParams(temperature=0.0, max_tokens=120)
    params.structured_output.json_schema = json.dumps(PERSON)
    responses = _chat(worker_stub, params)
    final = responses[-1]
    assert final.finished and final.finish_reason == common_pb2.FINISH_REASON_STOP
    _check_person(json.loads("".join(r.delta for r in responses)))


def test_chat_over_grpc_bad_schema_is_invalid_argument(worker_stub: Any) -> None:
    params = common_pb2.GenerationParams(max_tokens=10)
    params.structured_output.regex = "(abc"
    with pytest.raises(grpc.RpcError) as err:
        _chat(worker_stub, params)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "structured_output.regex" in (err.value.details() or "")
