"""OpenAI's request bodies (pydantic) and how each becomes a mesh request.

The request models validate types only; value ranges (a negative temperature, an empty stop
string) are the engines' to judge, and come back as INVALID_ARGUMENT in their words. Fields
the mesh cannot honour (log probabilities, penalties, images) are refused with a 400 that
names them rather than silently ignored; unknown fields are ignored, as vLLM does.

Tools and ``response_format`` map onto the mesh's schema-enforced decoding
(``GenerationParams.structured_output``), the way the SDK's ``chat_oai`` does it: tools are
described to the model in the last user message (Byzer-LLM's function-calling prompt, since
``ChatMessage`` has no tools field for the chat template), and when a call is required
(``tool_choice`` ``"required"`` or a named function) the answer is held to the JSON schema of a
tool-call list; with ``"auto"`` the model may answer in prose, so nothing is enforced and the
answer is parsed afterwards.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmesh import functions as fn
from llmesh.gateway.errors import bad_request
from llmesh.llm_config import DEFAULT_MAX_MIGRATIONS, GenerationConfig
from llmesh.sdk import results as sdk_results
from llmesh.v1 import common_pb2
from llmesh.v1 import inference_service_pb2 as inf

#: The mesh's finish reasons as OpenAI names them: the SDK's table (a matched stop string is a
#: plain stop).
FINISH_REASONS = sdk_results.FINISH_REASONS

#: Most choices (``n``) or prompts one request may ask for.
MAX_CHOICES = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class ToolChoiceFunction(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(_Body):
    """Sampling fields shared by chat and text completions (OpenAI's and vLLM's extras)."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras, which its clients (and our benchmark) send.
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    return_token_ids: bool = False


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings``."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class RerankRequest(_Body):
    """``POST /v1/rerank`` (the shape vLLM, Jina and Cohere share)."""

    model: str
    query: str
    documents: list[str | dict[str, Any]]
    top_n: int | None = None
    return_documents: bool = True


# -- OpenAI -> mesh ----------------------------------------------------------------------------


def _refuse_unsupported(body: _Sampling) -> None:
    if body.presence_penalty or body.frequency_penalty:
        raise bad_request(
            "presence_penalty and frequency_penalty are not supported by the mesh's engines; "
            "leave them out (or 0), or use repetition_penalty",
            "presence_penalty" if body.presence_penalty else "frequency_penalty",
        )
    if body.logit_bias:
        raise bad_request("logit_bias is not supported; leave it out", "logit_bias")
    if not 1 <= body.n <= MAX_CHOICES:
        raise bad_request(f"n must be between 1 and {MAX_CHOICES}, got {body.n}", "n")


def generation(body: _Sampling, max_tokens: int | None) -> GenerationConfig:
    """The mesh's generation parameters for a completion request.

    Args:
        body: the request.
        max_tokens: the output limit (chat has two names for it; the caller resolves them).

    Raises:
        GatewayError: a field the mesh cannot honour, or a value of the wrong shape.
    """
    _refuse_unsupported(body)
    params = common_pb2.GenerationParams()
    if body.temperature is not None:
        params.temperature = body.temperature
    if body.top_p is not None:
        params.top_p = body.top_p
    if max_tokens is not None:
        if max_tokens <= 0:
            raise bad_request(f"max_tokens must be positive, got {max_tokens}", "max_tokens")
        params.max_tokens = max_tokens
    if body.stop is not None:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        if any(s == "" for s in stops):
            raise bad_request("stop holds an empty string; remove it", "stop")
        params.stop.extend(stops)
    if body.seed is not None:
        params.seed = body.seed
    if body.top_k is not None and body.top_k > 0:
        params.top_k = body.top_k
    if body.repetition_penalty is not None:
        params.repetition_penalty = body.repetition_penalty
    if body.stop_token_ids:
        params.stop_token_ids.extend(body.stop_token_ids)
    if body.ignore_eos:
        params.extra.update({"ignore_eos": True})
    return GenerationConfig(params=params, max_migrations=DEFAULT_MAX_MIGRATIONS)


def seeded(config: GenerationConfig, index: int) -> common_pb2.GenerationParams:
    """The parameters of choice ``index`` of ``n``: seed + index when a seed was given, so the
    choices differ yet the whole answer is reproducible."""
    params = common_pb2.GenerationParams()
    params.CopyFrom(config.params)
    if index and params.HasField("seed"):
        params.seed = params.seed + index
    return params


def _text_of(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(
                    f"{where}[{i}] is a {kind!r} part; the mesh's models take text only: "
                    "send text parts (or a plain string)",
                    f"{where}[{i}]",
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise bad_request(f"{where} must be a string or a list of text parts", where)


def _tool_calls_text(calls: Any, where: str) -> str:
    """An assistant turn's tool calls as the JSON the function-calling prompt asks for."""
    out = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{where} holds a tool call without function.name", where)
        arguments = function.get("arguments") or "{}"
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            parsed = arguments
        out.append({"function": {"name": function["name"], "arguments": parsed}})
    return json.dumps({"tool_calls": out}, ensure_ascii=False)


def chat_messages(messages: list[dict[str, Any]]) -> list[common_pb2.ChatMessage]:
    """OpenAI chat messages as the mesh's (role, text) messages.

    ``developer`` becomes ``system``; an assistant turn with ``tool_calls`` becomes the JSON
    the function-calling prompt asks for; a ``tool`` turn keeps its role and text.
    """
    if not messages:
        raise bad_request("messages is empty; send at least one message", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool", "function"):
            raise bad_request(
                f"{where}.role must be system, developer, user, assistant or tool, got {role!r}",
                f"{where}.role",
            )
        text = _text_of(message.get("content"), f"{where}.content")
        if role == "assistant" and message.get("tool_calls") and not text:
            text = _tool_calls_text(message["tool_calls"], f"{where}.tool_calls")
        if role == "developer":
            role = "system"
        elif role == "function":
            role = "tool"
        out.append(common_pb2.ChatMessage(role=role, content=text))
    return out


class ChatPlan:
    """A chat completion request, ready to send: messages, parameters and how to read the
    answer (plain text, or tool calls to parse out of it).

    Args:
        body: the validated request.
    """

    def __init__(self, body: ChatCompletionRequest) -> None:
        if body.logprobs or body.top_logprobs:
            raise bad_request(
                "logprobs are not supported by the gateway; leave them out", "logprobs"
            )
        max_tokens = body.max_completion_tokens or body.max_tokens
        self.body = body
        self.config = generation(body, max_tokens)
        self.messages = chat_messages(body.messages)
        self.tools: list[dict[str, Any]] = []
        self.schema: dict[str, Any] | None = None
        choice = body.tool_choice
        if body.tools and choice != "none":
            if body.response_format is not None and body.response_format.type != "text":
                raise bad_request(
                    "give either tools or a JSON response_format, not both", "response_format"
                )
            self._plan_tools(body.tools, choice)
        elif isinstance(choice, ToolChoiceFunction) or choice == "required":
            raise bad_request("tool_choice asks for a tool call but no tools were given", "tools")
        elif body.response_format is not None:
            self.schema = _response_schema(body.response_format)
        if self.schema is not None:
            self.config.params.structured_output.json_schema = json.dumps(
                self.schema, ensure_ascii=False
            )

    def _plan_tools(self, tools: list[Tool], choice: Any) -> None:
        described = [
            json.dumps(
                {
                    "name": t.function.name,
                    "description": t.function.description or "",
                    "parameters": t.function.parameters or {"type": "object", "properties": {}},
                },
                ensure_ascii=False,
            )
            for t in tools
        ]
        self.tools = [json.loads(d) for d in described]
        forced: str | None = None
        if isinstance(choice, ToolChoiceFunction):
            names = [t.function.name for t in tools]
            if choice.function.name not in names:
                raise bad_request(
                    f"tool_choice names function {choice.function.name!r}, which is not among "
                    f"the tools given ({', '.join(names)})",
                    "tool_choice",
                )
            forced = described[names.index(choice.function.name)]
        last = self.messages[-1]
        if last.role != "user":
            # Answering a tool result: describe the tools on a fresh user turn instead.
            last = common_pb2.ChatMessage(role="user", content="")
            self.messages.append(last)
        last.content = fn.function_calling_format(last.content, described, forced)
        if forced is not None or choice == "required":
            max_calls = None if self.body.parallel_tool_calls is not False else 1
            self.schema = fn.tool_calls_schema(described, forced, max_calls)

    def start(self, model: str, index: int = 0) -> inf.ChatStart:
        """The ChatStart of choice ``index``."""
        return inf.ChatStart(
            model=model,
            messages=self.messages,
            params=seeded(self.config, index),
            request_id=uuid.uuid4().hex,
        )

    def tool_calls(self, text: str) -> list[dict[str, Any]] | None:
        """The OpenAI ``tool_calls`` in an answer, or None when it is a plain answer."""
        if not self.tools:
            return None
        data, reason = fn.extract_json(text)
        if reason or not isinstance(data, dict) or not isinstance(data.get("tool_calls"), list):
            return None
        names = {t["name"] for t in self.tools}
        calls = []
        for call in data["tool_calls"]:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or function.get("name") not in names:
                continue
            arguments = function.get("arguments", {})
            calls.append(
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {
                        "name": function["name"],
                        "arguments": arguments
                        if isinstance(arguments, str)
                        else json.dumps(arguments, ensure_ascii=False),
                    },
                }
            )
        return calls or None


def _response_schema(fmt: ResponseFormat) -> dict[str, Any] | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise bad_request(
            "response_format of type json_schema needs json_schema.schema (a JSON Schema)",
            "response_format.json_schema",
        )
    return fmt.json_schema.schema_


def completion_prompts(prompt: Any) -> list[str]:
    """The prompts of a text completion request (text only: token-id prompts are refused)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad_request(
            "prompt must be a string or a non-empty list of strings (token-id prompts are not "
            "supported by the gateway)",
            "prompt",
        )
    return prompts


def check_completion(body: CompletionRequest) -> None:
    """Refuse what a text completion cannot do here."""
    for name in ("echo", "logprobs", "suffix"):
        if getattr(body, name):
            raise bad_request(f"{name} is not supported by the gateway; leave it out", name)
    if body.best_of not in (None, 1, body.n):
        raise bad_request("best_of is not supported; leave it out or set it to n", "best_of")


def embedding_inputs(body: EmbeddingRequest) -> list[str]:
    """The texts to embed."""
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise bad_request(
            "input must be a string or a non-empty list of strings (token-id inputs are not "
            "supported by the gateway)",
            "input",
        )
    if body.dimensions is not None:
        raise bad_request(
            "dimensions is not supported: the model's vectors have a fixed size; leave it out",
            "dimensions",
        )
    return texts


def rerank_documents(body: RerankRequest) -> list[str]:
    """The documents' texts (plain strings, or ``{"text": ...}`` objects as Cohere sends)."""
    texts = []
    for i, doc in enumerate(body.documents):
        text = doc if isinstance(doc, str) else doc.get("text")
        if not isinstance(text, str):
            raise bad_request(
                f"documents[{i}] must be a string or an object with a text field",
                f"documents[{i}]",
            )
        texts.append(text)
    if not texts:
        raise bad_request("documents is empty; send at least one document", "documents")
    if body.top_n is not None and body.top_n < 1:
        raise bad_request(f"top_n must be at least 1, got {body.top_n}", "top_n")
    return texts
