"""Byzer-LLM client features against a real mesh with the local (untrained) test model.

Response classes and tool calls go the whole way: the SDK builds the prompt and the JSON
schema, the transformers engine enforces the schema while decoding, and the SDK parses the
answer into a pydantic object or runs the chosen tool. Nothing is patched or scripted.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pydantic
import pytest

from llmesh import ByzerLLM
from llmesh.aio import AsyncByzerLLM
from llmesh.client import EventName, LLMClassResponse, LLMFunctionCallResponse, LLMRequest
from llmesh.common.errors import InvalidArgument, NotFound
from llmesh.templates import Templates

from .conftest import Mesh

HELLO = [{"role": "user", "content": "Is the sky blue?"}]
# Enough room for the small schemas below; enforced JSON ends (finish "stop") well before.
ROOM = {"max_tokens": 160, "temperature": 0}


@pytest.fixture(scope="module")
def parity_mesh(etcd_server: Any, test_model_dir: Path) -> Iterator[tuple[Mesh, str]]:
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-parity-{uuid.uuid4().hex[:6]}")
    address = mesh.start_control_plane()
    mesh.start_worker("w0", cpus=2)
    with ByzerLLM(control_plane=address) as llm:
        llm.setup_num_workers(1).setup_cpus_per_worker(1).setup_infer_backend("transformers")
        llm.deploy(str(test_model_dir), "custom/llama", "chat", {"max_concurrency": 4})
    yield mesh, address
    mesh.close()


@pytest.fixture
def llm(parity_mesh: tuple[Mesh, str]) -> Iterator[ByzerLLM]:
    client = ByzerLLM(control_plane=parity_mesh[1])
    client.setup_default_model_name("chat")
    yield client
    client.close()


class Verdict(pydantic.BaseModel):
    answer: Literal["yes", "no", "unsure"]
    confident: bool


class Sky(pydantic.BaseModel):
    colour: Literal["blue", "grey", "red"]
    verdict: Verdict
    tags: list[Literal["a", "b"]] = pydantic.Field(max_length=3)


def paint(colour: Literal["red", "green"], loud: bool) -> str:
    """Paint the wall."""
    return f"{colour}:{loud}"


def shout(word: Literal["hey", "ho"]) -> str:
    """Shout a word."""
    return word.upper()


def test_response_class_with_enforced_schema(llm: ByzerLLM) -> None:
    (result,) = llm.chat_oai(HELLO, response_class=Verdict, llm_config=ROOM)
    assert isinstance(result, LLMClassResponse)
    assert result.metadata["reason"] == "", result.response.output
    assert isinstance(result.value, Verdict)
    assert result.response.metadata["finish_reason"] == "stop"
    assert result.response.metadata["generated_tokens_count"] > 0


def test_nested_response_class_and_after_chat(llm: ByzerLLM) -> None:
    (result,) = llm.chat_oai(
        HELLO,
        response_class=Sky,
        response_after_chat=True,
        llm_config={**ROOM, "max_tokens": 128},
    )
    assert isinstance(result.value, Sky), result.metadata["reason"]


def test_response_class_as_schema_string(llm: ByzerLLM) -> None:
    schema = Verdict.model_json_schema()
    import json

    (result,) = llm.chat_oai(HELLO, response_class=json.dumps(schema), llm_config=ROOM)
    assert isinstance(result.value, dict) and result.value["answer"] in ("yes", "no", "unsure")


def test_tool_call_is_chosen_and_executed(llm: ByzerLLM) -> None:
    (result,) = llm.chat_oai(
        [{"role": "user", "content": "Paint it"}],
        tools=[paint, shout],
        execute_tool=True,
        llm_config=ROOM,
    )
    assert isinstance(result, LLMFunctionCallResponse)
    assert result.metadata["reason"] == "", result.response.output
    assert result.values and len(result.values) == len(result.metadata["selected_functions"])
    assert all(
        v in ("red:True", "red:False", "green:True", "green:False", "HEY", "HO")
        for v in result.values
    )


def test_tool_choice_forces_the_function(llm: ByzerLLM) -> None:
    (result,) = llm.chat_oai(
        [{"role": "user", "content": "Say something"}],
        tools=[paint, shout],
        tool_choice=shout,
        execute_tool=True,
        func_params=None,
        llm_config=ROOM,
    )
    assert result.metadata["selected_functions"] and set(result.metadata["selected_functions"]) == {
        "shout"
    }


def test_tools_without_execution_return_the_raw_answer(llm: ByzerLLM) -> None:
    (resp,) = llm.chat_oai([{"role": "user", "content": "Paint"}], tools=[paint], llm_config=ROOM)
    assert '"tool_calls"' in resp.output


def test_prompt_decorator_returns_a_pydantic_object(llm: ByzerLLM) -> None:
    @llm.prompt()
    def judge(question: str) -> Verdict:
        """Answer the question: {question}"""

    assert isinstance(judge("Is water wet?"), Verdict)


def test_structured_output_can_be_turned_off(llm: ByzerLLM) -> None:
    (result,) = llm.chat_oai(
        HELLO,
        response_class=Verdict,
        llm_config={"max_tokens": 4, "temperature": 0, "structured_output": False},
    )
    # Without enforcement the untrained model writes noise; the failure is reported.
    assert result.value is None and result.metadata["reason"]


def test_context_length_checks(llm: ByzerLLM) -> None:
    llm.setup_max_input_length("chat", 2)
    with pytest.raises(
        InvalidArgument, match=r"input length \d+ is larger than max_input_length 2"
    ):
        llm.chat_oai(HELLO)
    llm.mapping_max_input_length.clear()
    llm.setup_max_model_length("chat", 40).setup_max_output_length("chat", 39)
    with pytest.raises(InvalidArgument, match="model context length 40"):
        llm.chat_oai(HELLO)
    with pytest.raises(InvalidArgument, match="model context length 40"):
        llm.stream_chat_oai(HELLO)
    (resp,) = llm.chat_oai(HELLO, llm_config={"max_tokens": 3})  # fits: 3 + prompt <= 40
    assert resp.metadata["generated_tokens_count"] <= 3
    llm.mapping_max_model_length.clear()
    llm.setup_max_output_length("chat", 2)
    (resp,) = llm.chat_oai(HELLO, llm_config={"temperature": 0})
    assert resp.metadata["generated_tokens_count"] <= 2
    llm.force_skip_context_length_check = True
    llm.setup_max_input_length("chat", 1)
    assert llm.chat_oai(HELLO, llm_config={"max_tokens": 2})[0].metadata["request_id"]


def test_template_clean_func_and_stop_ids_on_the_mesh(llm: ByzerLLM) -> None:
    llm.setup_template("chat", Templates.default())
    (resp,) = llm.chat_oai(HELLO, llm_config={"max_tokens": 4, "temperature": 0})
    assert resp.input["instruction"].endswith("User:Is the sky blue?\nAssistant:")
    llm.setup_template("chat", "auto")
    assert "chat" not in llm.mapping_role_mapping


def test_events_around_a_real_call(llm: ByzerLLM) -> None:
    seen: list[Any] = []

    def before(client: Any, model: str, input_value: Any) -> tuple[bool, Any]:
        seen.append(("before", model, input_value[0]["instruction"]))
        return True, None

    def after(model: str, result: list[dict[str, Any]]) -> tuple[bool, Any]:
        seen.append(("after", model, bool(result[0]["predict"])))
        return False, [{**result[0], "predict": "replaced"}]

    llm.add_event_callback(EventName.BEFORE_CALL_MODEL, before)
    llm.add_event_callback(EventName.AFTER_CALL_MODEL, after)
    (resp,) = llm.chat_oai(HELLO, llm_config={"max_tokens": 4})
    assert resp.output == "replaced" and resp.metadata["request_id"]
    assert [s[0] for s in seen] == ["before", "after"]


def test_chat_batch_and_raw_chat(llm: ByzerLLM) -> None:
    out = llm.chat("chat", LLMRequest(instruction=["one", "two", "three"], max_length=4))
    assert len(out) == 3 and [r.input["instruction"] for r in out] == ["one", "two", "three"]
    assert all(0 < r.metadata["generated_tokens_count"] <= 4 for r in out)
    (single,) = llm.raw_chat(None, "hello", {"max_length": 3})
    assert single.metadata["finish_reason"] in ("stop", "length")


def test_async_stream_and_async_client(llm: ByzerLLM) -> None:
    async def main() -> tuple[list[Any], str]:
        items = [
            item async for item in llm.async_stream_chat_oai(HELLO, llm_config={"max_tokens": 6})
        ]
        allm = AsyncByzerLLM(llm=llm)
        (resp,) = await allm.chat_oai(HELLO, llm_config={"max_tokens": 3})
        meta = await allm.get_meta("chat")
        assert meta["support_stream"]
        (verdict,) = await allm.chat_oai(HELLO, response_class=Verdict, llm_config=ROOM)
        assert isinstance(verdict.value, Verdict), verdict.metadata["reason"]
        (called,) = await llm.async_chat_oai(
            [{"role": "user", "content": "Paint"}],
            tools=[paint],
            execute_tool=True,
            llm_config=ROOM,
        )
        assert called.metadata["selected_functions"] == ["paint"]
        batch = await allm.chat("chat", LLMRequest(instruction=["one", "two"], max_length=3))
        assert [r.input["instruction"] for r in batch] == ["one", "two"]
        assert all(r.metadata["generated_tokens_count"] >= 1 for r in batch)
        await allm.close()
        return items, resp.output

    items, _ = asyncio.run(main())
    assert items and items[-1][1]["finish_reason"] in ("stop", "length")
    assert items[0][1]["request_id"] == items[-1][1]["request_id"]
    assert items[-1][1].generated_tokens_count >= 1


def test_deploy_undeploy_through_the_sdk(llm: ByzerLLM, test_model_dir: Path) -> None:
    meta = (
        llm.setup_num_workers(1)
        .setup_cpus_per_worker(0.5)
        .deploy(str(test_model_dir), "custom/llama", "chat-extra", {})
    )
    assert meta["model_deploy_type"] == "proprietary" and llm.is_model_exist("chat-extra")
    assert llm.undeploy("chat-extra") is True
    assert not llm.is_model_exist("chat-extra")
    assert llm.undeploy("chat-extra") is False


def _wait_idle(mesh: Mesh) -> bool:
    return mesh.wait_idle(5)


def test_leaving_an_async_stream_cancels_on_the_worker(
    parity_mesh: tuple[Mesh, str], llm: ByzerLLM
) -> None:
    mesh, _ = parity_mesh
    long = {"max_length": 1500, "ignore_eos": True}

    async def break_early() -> int:
        seen = 0
        async with AsyncByzerLLM(llm=llm) as allm:
            async for _ in allm.stream_chat_oai(HELLO, llm_config=long):
                seen += 1
                if seen == 2:
                    break
        return seen

    assert asyncio.run(break_early()) == 2
    assert _wait_idle(mesh)

    async def cancel_task() -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in llm.async_stream_chat_oai(HELLO, llm_config=long):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await llm.aclose_async_channels()

    asyncio.run(cancel_task())
    assert _wait_idle(mesh)


def test_async_stream_errors_are_typed(llm: ByzerLLM) -> None:
    async def main() -> None:
        async for _ in llm.async_stream_chat_oai(HELLO, model="nope"):
            pass

    with pytest.raises(NotFound):
        asyncio.run(main())
