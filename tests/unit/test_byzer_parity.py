"""Byzer-LLM parity of the SDK's pure parts: templates, prompts, schemas, parsing, decorators,
events and names. No servers: calls that would reach a model are answered by a
BEFORE_CALL_MODEL callback, the documented short-circuit hook."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import pytest

from llmesh import cli, i18n
from llmesh import client as c
from llmesh import decorators as d
from llmesh import functions as fn
from llmesh.aio import AsyncByzerLLM
from llmesh.cli import models as cli_models
from llmesh.common.errors import InvalidArgument
from llmesh.templates import TEMPLATE_NAMES, Template, Templates, render_with_role_mapping

NOWHERE = "127.0.0.1:1"
DOC = Path(__file__).resolve().parents[2] / "docs" / "byzer_parity.md"


@pytest.fixture
def llm() -> Iterator[c.ByzerLLM]:
    client = c.ByzerLLM(NOWHERE, first_route_timeout=0.2)
    # Seeded meta: "constrained decoding supported", so no meta call is made.
    client.meta_cache["m"] = {"message_format": True, "structured_output": "true"}
    yield client
    client.close()


def answer_with(llm: c.ByzerLLM, *outputs: str) -> list[list[dict[str, Any]]]:
    """Make the model 'answer' each call with the next output; returns what was sent."""
    sent: list[list[dict[str, Any]]] = []
    queue = list(outputs)

    def before(client: Any, model: str, input_value: list[dict[str, Any]]) -> Any:
        sent.append(input_value)
        return False, [{"predict": queue.pop(0), "input": input_value[0], "metadata": {"x": 1}}]

    llm.add_event_callback(c.EventName.BEFORE_CALL_MODEL, before)
    return sent


CONV = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
]

# -- templates ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (
            Templates.qwen,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1\n"
            "<|im_end|>\n<|im_start|>assistant\nA1\n<|im_start|>user\nU2\n"
            "<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            Templates.llama,
            "<s>[INST] <<SYS>>\nS\n<</SYS>>\n[/INST]</s>\n<s>[INST] U1 [/INST]\n A1 </s>\n"
            "<s>[INST] U2 [/INST]\n",
        ),
        (
            Templates.deepseek_code_chat,
            "S\n### Instruction:\nU1\n### Response:\nA1\n<|EOT|>\n### Instruction:\nU2\n"
            "### Response:\n",
        ),
        (Templates.deepseek_code_completion, "S\n\n\n\n"),
        (Templates.default, "S\nUser:U1\nAssistant:A1\nUser:U2\nAssistant:"),
        (Templates.empty, "S\nU1\nA1\nU2\n"),
    ],
)
def test_templates_render_like_byzer(factory: Any, expected: str) -> None:
    assert render_with_role_mapping(CONV, factory().role_mapping) == expected


def test_template_generation_configs_and_clean_funcs() -> None:
    qwen = Templates.qwen()
    assert qwen.generation_config == {
        "generation.repetition_penalty": 1.1,
        "generation.stop_token_ids": [151643, 151645],
    }
    assert qwen.clean_func("hi<|im_end|>junk<|endoftext|>") == "hi"
    assert Templates.yi().generation_config == {"generation.stop_token_ids": [7]}
    assert Templates.deepseek_code_chat().generation_config == {
        "generation.stop_token_ids": [32021]
    }
    assert Templates.llama().clean_func("x </s>") == "x </s>"


def test_deepseek_insertion_needs_the_hole() -> None:
    mapping = Templates.deepseek_code_insertion().role_mapping
    code = "def f():\n<｜fim▁hole｜>\n"
    prompt = render_with_role_mapping([{"role": "system", "content": code}], mapping)
    assert prompt == f"<｜fim▁begin｜>{code}<｜fim▁end｜>"
    with pytest.raises(ValueError, match="fim"):
        render_with_role_mapping([{"role": "system", "content": "no hole"}], mapping)


def test_system_message_braces_survive() -> None:
    mapping = Templates.qwen().role_mapping
    out = render_with_role_mapping([{"role": "system", "content": '{"a": 1}'}], mapping)
    assert '{"a": 1}' in out


def test_setup_template_installs_everything(llm: c.ByzerLLM) -> None:
    def fc(prompt: str, tools: Any, tool_choice: Any) -> str:
        return "FC:" + prompt

    template = Template(
        role_mapping={"user_role": "Q:", "assistant_role": "A:", "system_msg": ""},
        generation_config={"gen.top_k": 3},
        clean_func=str.upper,
        function_calling_format_func=fc,
    )
    assert llm.setup_extra_generation_params("m", {"gen.top_p": 0.5}) is llm
    assert llm.setup_template("m", template) is llm
    assert llm.mapping_role_mapping["m"]["user_role"] == "Q:"
    assert llm.mapping_extra_generation_params["m"] == {"gen.top_p": 0.5, "gen.top_k": 3}
    assert llm.mapping_clean_func["m"] is str.upper
    assert llm.mapping_function_calling_format_func["m"] is fc
    llm.setup_template("m", "yi")
    assert llm.mapping_role_mapping["m"] == Templates.yi().role_mapping
    assert "m" not in llm.mapping_function_calling_format_func
    with pytest.raises(InvalidArgument, match="unknown template"):
        llm.setup_template("m", "nope")


def test_setup_template_auto_follows_the_meta(llm: c.ByzerLLM) -> None:
    llm.setup_template("m", "qwen").setup_template("m", "auto")
    assert "m" not in llm.mapping_role_mapping  # message format: the chat template renders
    llm.meta_cache["q"] = {"message_format": False, "architectures": ["QWenLMHeadModel"]}
    llm.setup_template("q", "auto")
    assert llm.mapping_role_mapping["q"] == Templates.qwen().role_mapping
    llm.meta_cache["raw"] = {"message_format": False, "support_chat_template": False}
    with pytest.raises(InvalidArgument, match="no chat template"):
        llm.setup_template("raw", "auto")


def test_clean_func_and_role_mapping_apply_to_chat_oai(llm: c.ByzerLLM) -> None:
    sent = answer_with(llm, "hello<|im_end|>rest")
    llm.setup_template("m", Templates.qwen())
    (resp,) = llm.chat_oai([{"role": "user", "content": "hi"}], model="m")
    assert resp.output == "hello"
    instruction = sent[0][0]["instruction"]
    assert instruction == "<|im_start|>user\nhi\n<|im_end|>\n<|im_start|>assistant\n"
    assert sent[0][0]["generation.stop_token_ids"] == [151643, 151645]


# -- events -----------------------------------------------------------------------------------


def test_events_short_circuit_and_replace(llm: c.ByzerLLM) -> None:
    calls: list[str] = []

    def observe(*args: Any) -> tuple[bool, Any]:
        calls.append("observe")
        return True, None

    llm.add_event_callback(c.EventName.BEFORE_CALL_MODEL, observe)
    answer_with(llm, "from callback")
    replaced: list[Any] = []

    def after(model: str, result: list[dict[str, Any]]) -> tuple[bool, Any]:
        replaced.append(result)
        return True, None

    llm.add_event_callback(c.EventName.AFTER_CALL_MODEL, after)
    (resp,) = llm.chat_oai([{"role": "user", "content": "hi"}], model="m")
    assert (resp.output, resp.metadata) == ("from callback", {"x": 1})
    assert resp.input["instruction"] == "hi"
    assert calls == ["observe"]
    assert replaced == []  # the model was never called, so neither was AFTER_CALL_MODEL


def test_bad_short_circuit_value_is_explained(llm: c.ByzerLLM) -> None:
    llm.add_event_callback(c.EventName.BEFORE_CALL_MODEL, lambda *a: (False, [{"no": 1}]))
    with pytest.raises(InvalidArgument, match="predict"):
        llm.chat_oai([{"role": "user", "content": "hi"}], model="m")


# -- length settings -----------------------------------------------------------------------


def test_length_settings(llm: c.ByzerLLM) -> None:
    assert llm.get_max_output_length("m") == 1024
    assert llm.get_max_input_length("m") is None and llm.get_max_model_length("m") is None
    llm.setup_max_input_length("m", 10).setup_max_model_length("m", 20)
    llm.setup_max_output_length("m", 5)
    assert (llm.get_max_input_length("m"), llm.get_max_model_length("m")) == (10, 20)
    assert llm.get_max_output_length("m") == 5


def test_max_output_length_becomes_the_default_max_tokens(llm: c.ByzerLLM) -> None:
    llm.setup_max_output_length("m", 7)
    config = c.generation_config({})
    start, _ = llm._chat_start([{"role": "user", "content": "x"}], "m", None, config)
    llm._check_context_length("m", start)
    assert start.params.max_tokens == 7
    config = c.generation_config({"max_tokens": 3})
    start, _ = llm._chat_start([{"role": "user", "content": "x"}], "m", None, config)
    llm._check_context_length("m", start)
    assert start.params.max_tokens == 3


# -- response_class / tools / impl ---------------------------------------------------------


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    sunny: bool


def get_weather(
    city: Annotated[str, "the city"], unit: Literal["c", "f"] = "c", days: int = 1
) -> str:
    """Weather for a city."""
    return f"{city}:{unit}:{days}"


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def test_function_schema() -> None:
    schema = fn.function_schema(get_weather)
    assert schema["name"] == "get_weather" and schema["description"] == "Weather for a city."
    props = schema["parameters"]["properties"]
    assert props["city"] == {"type": "string", "description": "the city"}
    assert props["unit"] == {"enum": ["c", "f"], "default": "c"}
    assert props["days"] == {"type": "integer", "default": 1}
    assert schema["parameters"]["required"] == ["city"]
    assert json.loads(fn.serialize_function_to_json(add))["parameters"]["required"] == ["a", "b"]


def test_tool_calls_schema() -> None:
    schema = fn.tool_calls_schema([get_weather, add], None)
    items = schema["properties"]["tool_calls"]["items"]
    names = [v["properties"]["function"]["properties"]["name"]["const"] for v in items["anyOf"]]
    assert names == ["get_weather", "add"]
    forced = fn.tool_calls_schema([get_weather, add], add)
    assert forced["properties"]["tool_calls"]["items"]["properties"]["function"]["properties"][
        "name"
    ] == {"const": "add"}
    assert schema["properties"]["tool_calls"]["maxItems"] == 2
    assert forced["properties"]["tool_calls"]["maxItems"] == 1
    assert fn.tool_calls_schema([add], None, 5)["properties"]["tool_calls"]["maxItems"] == 5
    as_text = fn.serialize_function_to_json(add)
    assert fn.tool_calls_schema([as_text], None) is not None
    assert fn.tool_calls_schema(["not json"], None) is None


def test_class_schema() -> None:
    assert fn.class_schema(City)["properties"]["sunny"] == {"title": "Sunny", "type": "boolean"}
    assert fn.class_schema('{"type": "object"}') == {"type": "object"}
    assert fn.class_schema("free text") is None
    with pytest.raises(InvalidArgument, match="pydantic"):
        fn.class_schema(dict)


def test_prompts_carry_the_schema_and_question() -> None:
    prompt = fn.function_calling_format("weather in Paris?", [get_weather], None)
    assert "weather in Paris?" in prompt and '"get_weather"' in prompt
    assert "must call" in fn.function_calling_format("q", [get_weather], get_weather)
    assert fn.function_calling_format("q", [], None) == "q"
    assert '"sunny"' in fn.response_class_format("q", City)
    assert '"sunny"' in fn.response_class_format_after_chat(City)
    impl = fn.function_impl_format("q", add, City)
    assert '"add"' in impl and "```python" in impl
    assert "FUNCTION_CALLING" in fn.base_ability_format()
    assert "FUNCTION_CALLING" in fn.sys_function_calling_format("q", [add], None)
    assert "RESPONSE_WITH_CLASS" in fn.sys_response_class_format("q", City)
    assert "FUNCTION_IMPL" in fn.sys_function_impl_format("q", add, City)


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "Oslo", "sunny": false}',
        'Sure:\n```json\n{"name": "Oslo", "sunny": false}\n```',
        '{"name": "Oslo", "sunny": false}   \n\n',
    ],
)
def test_response_class_parses(llm: c.ByzerLLM, text: str) -> None:
    sent = answer_with(llm, text)
    (result,) = llm.chat_oai([{"role": "user", "content": "city?"}], model="m", response_class=City)
    assert isinstance(result, c.LLMClassResponse)
    assert result.value == City(name="Oslo", sunny=False)
    assert result.metadata["reason"] == ""
    assert result.response.output == text
    assert '"sunny"' in sent[0][0]["instruction"]  # the prompt fallback is always sent


def test_response_class_failure_is_reported(llm: c.ByzerLLM) -> None:
    answer_with(llm, "no json here", '{"name": 3}')
    (first,) = llm.chat_oai([{"role": "user", "content": "q"}], model="m", response_class=City)
    assert first.value is None and first.metadata["reason"] == "No json block found"
    (second,) = llm.chat_oai([{"role": "user", "content": "q"}], model="m", response_class=City)
    assert second.value is None and "validation error" in second.metadata["reason"]


def test_cut_off_answers_say_so() -> None:
    cut = c.LLMResponse(output='{"name": "Os', input={}, metadata={"finish_reason": "length"})
    result = fn.execute_response_format(cut, City)
    assert result.value is None and "cut off at max_tokens" in result.metadata["reason"]


def test_response_class_as_schema_string_gives_a_dict(llm: c.ByzerLLM) -> None:
    answer_with(llm, '{"a": 1}')
    (result,) = llm.chat_oai(
        [{"role": "user", "content": "q"}], model="m", response_class='{"type": "object"}'
    )
    assert result.value == {"a": 1}


def test_response_after_chat_asks_twice(llm: c.ByzerLLM) -> None:
    sent = answer_with(llm, "Oslo is sunny", '{"name": "Oslo", "sunny": true}')
    (result,) = llm.chat_oai(
        [{"role": "user", "content": "q"}], model="m", response_class=City, response_after_chat=True
    )
    assert result.value == City(name="Oslo", sunny=True)
    assert sent[0][0]["instruction"] == "q"
    second = sent[1][0]
    assert second["history"][-1] == {"role": "assistant", "content": "Oslo is sunny"}
    assert "Restate" in second["instruction"]


def test_tools_execute_only_when_asked(llm: c.ByzerLLM) -> None:
    call = {"tool_calls": [{"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}
    weather = {"tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "O"}}}]}
    answer_with(llm, json.dumps(call), json.dumps(call), json.dumps(weather))
    conv = [{"role": "user", "content": "2+3?"}]
    (raw,) = llm.chat_oai(conv, model="m", tools=[add, get_weather])
    assert isinstance(raw, c.LLMResponse)
    (done,) = llm.chat_oai(conv, model="m", tools=[add, get_weather], execute_tool=True)
    assert isinstance(done, c.LLMFunctionCallResponse)
    assert done.values == [5] and done.metadata["selected_functions"] == ["add"]
    (with_params,) = llm.chat_oai(
        conv, model="m", tools=[get_weather], execute_tool=True, func_params={"days": 4}
    )
    assert with_params.values == ["O:c:4"]


def test_tool_errors_are_reported_not_raised(llm: c.ByzerLLM) -> None:
    call = {"tool_calls": [{"function": {"name": "add", "arguments": {"a": 2}}}]}
    answer_with(llm, json.dumps(call))
    (result,) = llm.chat_oai(
        [{"role": "user", "content": "q"}], model="m", tools=[add], execute_tool=True
    )
    assert result.values == [] and "missing 1 required" in result.metadata["reason"]


def test_option_conflicts(llm: c.ByzerLLM) -> None:
    conv = [{"role": "user", "content": "q"}]
    with pytest.raises(InvalidArgument, match="either tools"):
        llm.chat_oai(conv, model="m", tools=[add], response_class=City)
    with pytest.raises(InvalidArgument, match="impl_func needs response_class"):
        llm.chat_oai(conv, model="m", impl_func=add)


CODE = (
    "```python\ndef current_city(prefix: str):\n"
    "    return {'name': prefix + 'lo', 'sunny': True}\n```"
)


def current_city(prefix: str) -> City:
    """The current city."""


def test_impl_func_runs_code_only_when_asked(llm: c.ByzerLLM, tmp_path: Path) -> None:
    answer_with(llm, CODE, CODE)
    conv = [{"role": "user", "content": "write it"}]
    (raw,) = llm.chat_oai(conv, model="m", impl_func=current_city, response_class=City)
    assert isinstance(raw, c.LLMResponse) and raw.output == CODE
    (ran,) = llm.chat_oai(
        conv,
        model="m",
        impl_func=current_city,
        response_class=City,
        execute_impl_func=True,
        impl_func_params={"prefix": "Os"},
    )
    assert ran.value == City(name="Oslo", sunny=True)
    assert ran.metadata["func"]("Ber").get("name") == "Berlo"
    assert "def current_city" in ran.metadata["raw_func"]


def test_exec_capture_output_restores_stdout() -> None:
    import sys

    before = sys.stdout
    status, output, found = fn.exec_capture_output("print('x')\ndef f(): return 1", {"f": True})
    assert (status, output.strip(), found["f"]()) == (0, "x", 1)
    status, output, found = fn.exec_capture_output("raise ValueError('boom')", {"f": True})
    assert status == 1 and "boom" in output and found == {}
    assert sys.stdout is before


def test_default_sys_message(llm: c.ByzerLLM) -> None:
    sent = answer_with(llm, "a", '{"name": "x", "sunny": true}')
    conv = [{"role": "user", "content": "q"}]
    llm.chat_oai(conv, model="m", enable_default_sys_message=True)
    assert sent[0][0]["history"][0]["role"] == "system"
    assert "FUNCTION_CALLING" in sent[0][0]["history"][0]["content"]
    assert conv == [{"role": "user", "content": "q"}]  # the caller's list is not changed
    llm.setup_base_system_messages("m", "BASE")
    llm.chat_oai(
        [{"role": "system", "content": "mine"}, *conv],
        model="m",
        response_class=City,
        enable_default_sys_message=True,
    )
    assert sent[1][0]["history"][0]["content"] == "BASE\nmine"
    assert "RESPONSE_WITH_CLASS" in sent[1][0]["instruction"]


def test_format_func_hooks(llm: c.ByzerLLM) -> None:
    sent = answer_with(llm, "{}", "{}", "x")
    llm.setup_response_class_format_func("m", lambda prompt, cls: f"RC[{prompt}]")
    llm.setup_function_calling_format_func("m", lambda prompt, tools, choice: f"FC[{prompt}]")
    llm.setup_impl_func_format_func("m", lambda prompt, func, cls: f"IF[{prompt}]")
    conv = [{"role": "user", "content": "q"}]
    llm.chat_oai(conv, model="m", response_class='{"type": "object"}')
    llm.chat_oai(conv, model="m", tools=[add])
    llm.chat_oai(conv, model="m", impl_func=current_city, response_class=City)
    assert [s[0]["instruction"] for s in sent] == ["RC[q]", "FC[q]", "IF[q]"]


# -- chat / raw_chat --------------------------------------------------------------------------


def test_chat_batches_and_uses_request_fields(llm: c.ByzerLLM) -> None:
    sent = answer_with(llm, "a1", "a2")
    out = llm.chat("m", c.LLMRequest(instruction=["one", "two"], max_length=9, temperature=0.0))
    assert sorted(r.output for r in out) == ["a1", "a2"]
    assert {s[0]["instruction"] for s in sent} == {"one", "two"}
    assert all(s[0]["max_length"] == 9 and s[0]["temperature"] == 0.0 for s in sent)


def test_raw_chat_with_role_mapping(llm: c.ByzerLLM) -> None:
    sent = answer_with(llm, "x")
    llm.setup_template("m", "default")
    (resp,) = llm.raw_chat("m", "hello", {"max_length": 4})
    assert resp.output == "x"
    prompt = sent[0][0]["instruction"]
    assert prompt.endswith("User:hello\nAssistant:") and sent[0][0]["max_length"] == 4
    with pytest.raises(InvalidArgument, match="instruction"):
        llm.chat("m", c.LLMRequest(instruction=[]))


# -- decorators ----------------------------------------------------------------------------


def test_module_prompt_renders_simple_and_jinja2() -> None:
    @d.prompt()
    def hello(name: str, n: int = 2) -> str:
        """
        Hello {name}, {n} times. Literal {{braces}}.
        """

    assert hello("Ada") == "\nHello Ada, 2 times. Literal {braces}.\n"

    @d.prompt(render="jinja2")
    def items(xs: list[str]) -> str:
        """
        {% for x in xs %}- {{ x }}
        {% endfor %}
        """

    assert items(["a", "b"]).strip() == "- a\n- b"

    @d.prompt()
    def broken(name: str) -> str:
        """{nope}"""

    with pytest.raises(InvalidArgument, match="nope"):
        broken("x")


def test_module_prompt_on_a_method_asks_the_model(llm: c.ByzerLLM) -> None:
    sent = answer_with(llm, "answer")
    llm.setup_default_model_name("m")

    class Agent:
        def __init__(self) -> None:
            self.llm = llm

        @d.prompt(llm=lambda self: self.llm)
        def ask(self, topic: str) -> str:
            """Tell me about {topic}."""

        @d.prompt()
        def render_only(self, topic: str) -> str:
            """About {topic}."""

    assert Agent().ask("owls") == "answer"
    assert sent[0][0]["instruction"] == "Tell me about owls."
    assert Agent().render_only("cats") == "About cats."


def test_llm_prompt_and_response(llm: c.ByzerLLM) -> None:
    sent = answer_with(llm, "text", '{"name": "Oslo", "sunny": true}', '{"name": "R", "sunny": 0}')
    llm.setup_default_model_name("m")

    @llm.prompt()
    def describe(city: str) -> str:
        """Describe {city}."""

    @llm.prompt()
    def city_of(place: str) -> City:
        """Which city is {place} in?"""

    @llm.response()
    def parse(text: str) -> City:
        pass

    assert describe("Oslo") == "text"
    assert sent[0][0]["instruction"] == "Describe Oslo."
    assert city_of("the fjord") == City(name="Oslo", sunny=True)
    assert parse("Rome, cloudy") == City(name="R", sunny=False)
    assert sent[2][0]["instruction"].startswith("Rome, cloudy")


def test_llm_impl_caches_and_clears(llm: c.ByzerLLM) -> None:
    sent = answer_with(llm, CODE, CODE)
    llm.setup_default_model_name("m")

    @llm.impl(instruction="the city")
    def current_city(prefix: str) -> City:
        """The current city."""

    assert current_city("Os") == City(name="Oslo", sunny=True)
    assert current_city("Ber") == City(name="Berlo", sunny=True)
    assert len(sent) == 1  # the second call used the cached implementation
    key = d.impl_cache_key("m", "the city", current_city.__wrapped__)
    assert list(llm.func_impl_cache) == [key]
    full = f"{__name__}.current_city"
    llm.clear_impl_cache(full_func_name=full)
    assert llm.func_impl_cache == {}
    assert current_city("Os").name == "Oslo" and len(sent) == 2
    with pytest.raises(InvalidArgument, match="instruction"):
        llm.clear_impl_cache(model="m", full_func_name=full)
    llm.clear_impl_cache(model="other")
    assert list(llm.func_impl_cache) == [key]
    llm.clear_impl_cache(model="m")
    assert llm.func_impl_cache == {}


# -- async --------------------------------------------------------------------------------


def test_async_client_wraps_every_call(llm: c.ByzerLLM) -> None:
    answer_with(llm, "async answer")
    allm = AsyncByzerLLM(llm=llm)
    assert allm.setup_default_model_name("m") is allm

    async def main() -> str:
        (resp,) = await allm.chat_oai([{"role": "user", "content": "q"}])
        await allm.close()
        return resp.output

    assert asyncio.run(main()) == "async answer"


def test_async_chat_oai_parses_like_the_sync_one(llm: c.ByzerLLM) -> None:
    sent = answer_with(llm, "Oslo is sunny", '{"name": "Oslo", "sunny": true}')

    async def main() -> Any:
        (result,) = await llm.async_chat_oai(
            [{"role": "user", "content": "q"}],
            model="m",
            response_class=City,
            response_after_chat=True,
        )
        return result

    assert asyncio.run(main()).value == City(name="Oslo", sunny=True)
    assert len(sent) == 2


def test_async_chat_batch(llm: c.ByzerLLM) -> None:
    sent = answer_with(llm, "a1", "a2")
    allm = AsyncByzerLLM(llm=llm)
    out = asyncio.run(allm.raw_chat("m", c.LLMRequest(instruction=["one", "two"])))
    assert [r.output for r in out] == ["a1", "a2"]
    assert [s[0]["instruction"] for s in sent] == ["one", "two"]


def test_iterate_in_thread_closes_the_source_early() -> None:
    closed: list[bool] = []

    def source() -> Iterator[int]:
        try:
            yield from range(100)
        finally:
            closed.append(True)

    async def main() -> list[int]:
        got = []
        async for i in c.iterate_in_thread(source()):
            got.append(i)
            if i == 2:
                break
        await asyncio.sleep(0.05)
        return got

    assert asyncio.run(main()) == [0, 1, 2]
    assert closed == [True]


def test_iterate_in_thread_reraises() -> None:
    def source() -> Iterator[int]:
        yield 1
        raise InvalidArgument("bad")

    async def main() -> None:
        async for _ in c.iterate_in_thread(source()):
            pass

    with pytest.raises(InvalidArgument, match="bad"):
        asyncio.run(main())


# -- CLI i18n ------------------------------------------------------------------------------


def test_cli_language_from_lang(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    assert i18n.cli_language("zh_CN.UTF-8") == "zh" and i18n.cli_language("en_US.UTF-8") == "en"
    assert i18n.cli_language("C") == "en"
    assert set(i18n.MESSAGES_ZH) == set(i18n.MESSAGES_EN)
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    assert cli.main(["deploy", "--help"]) == 0
    assert "部署后的模型名称" in capsys.readouterr().out
    assert cli.main(["up", "--help"]) == 0  # the server subcommands speak it too
    assert "工作节点租约的存活时间" in capsys.readouterr().out
    monkeypatch.setenv("LANG", "en_US.UTF-8")
    assert cli.main(["deploy", "--help"]) == 0
    assert "name of the deployed model" in capsys.readouterr().out
    assert cli.main(["inference-worker", "--help"]) == 0
    assert "seconds to finish requests" in capsys.readouterr().out


def test_cli_query_templates_cover_byzers() -> None:
    byzer = {
        "qwen",
        "llama",
        "deepseek_code_chat",
        "deepseek_code_insertion",
        "deepseek_code_completion",
        "yi",
        "default",
        "empty",
    }
    assert set(TEMPLATE_NAMES) == byzer
    assert set(cli_models.QUERY_TEMPLATES) == {"auto", *byzer}
    assert cli_models.QUERY_TEMPLATE_CONFIG["qwen"]["generation.stop_token_ids"] == [151643, 151645]
    assert cli_models.QUERY_TEMPLATES["qwen"]["user_role"] == "<|im_start|>user\n"
    assert (
        cli.build_parser()
        .parse_args(["query", "--model", "m", "--query", "q", "--template", "yi"])
        .template
        == "yi"
    )


# -- names and the parity table -------------------------------------------------------------

BYZER_METHODS = """
add_event_callback setup_reset setup_pin_model_worker_mapping setup_load_balance_way
setup_default_model_name setup_default_emb_model_name setup_default_re_rank_model_name setup
setup_function_calling_format_func setup_response_class_format_func setup_impl_func_format_func
setup_response_class_format_after_chat_func setup_base_system_messages
setup_sys_response_class_format_func setup_sys_function_calling_format_func
setup_sys_response_class_format_after_chat_func setup_sys_impl_func_format_func
setup_infer_backend setup_gpus_per_worker setup_cpus_per_worker setup_worker_concurrency
setup_num_workers setup_max_model_length setup_max_input_length setup_max_output_length
setup_role_mapping setup_extra_generation_params setup_template undeploy is_model_exist deploy
get_meta tokenize apply_chat_template emb_query emb emb_rerank abort chat_oai stream_chat_oai
async_stream_chat_oai clear_impl_cache prompt response impl raw_chat chat
get_max_model_length get_max_output_length get_max_input_length
""".split()


def test_byzer_method_names_exist() -> None:
    missing = [m for m in BYZER_METHODS if not callable(getattr(c.ByzerLLM, m, None))]
    assert missing == []


def test_byzer_module_names_exist() -> None:
    import llmesh

    for name in ("ByzerLLM", "LLMResponse", "LLMRequest", "prompt", "Templates", "EventName"):
        assert getattr(llmesh, name) is not None
    for name in ("LLMFunctionCallResponse", "LLMClassResponse", "Role", "InferBackend"):
        assert hasattr(c, name)
    assert [f.name for f in dataclasses.fields(c.LLMClassResponse)] == [
        "response",
        "value",
        "metadata",
    ]
    assert [f.name for f in dataclasses.fields(c.LLMFunctionCallResponse)] == [
        "response",
        "values",
        "metadata",
    ]
    assert c.EventName.BEFORE_CALL_MODEL.value == "before_call_model"


def test_parity_doc_covers_every_method_with_no_blank_cells() -> None:
    text = DOC.read_text(encoding="utf-8")
    for method in BYZER_METHODS:
        assert re.search(rf"`{method}\b", text), f"{method} is missing from {DOC.name}"
    for line in text.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            assert all(cells), f"blank cell in: {line}"
