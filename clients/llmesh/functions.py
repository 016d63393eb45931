"""Function calling, response classes and function implementation for ``chat_oai``.

Three things happen here, all on the client:

* **Prompts** that ask the model for a tool call, for JSON matching a response class, or for a
  Python implementation of a function stub (Byzer-LLM's prompt-based protocol; the texts are
  llmesh's own). They are what an engine without constrained decoding relies on.
* **JSON schemas** for the same answers, sent as ``GenerationParams.structured_output`` so an
  engine that supports constrained decoding produces output that parses even from a small model.
* **Parsing and execution** of the answer into ``LLMFunctionCallResponse`` /
  ``LLMClassResponse``.

Security: nothing the model wrote is executed unless the caller asked for it. Tool calls run
the caller's own Python functions (with model-chosen arguments) only under
``execute_tool=True``; model-written code runs (``exec`` in a fresh namespace, in this process,
with no sandbox) only under ``execute_impl_func=True`` — which is what ``llm.impl()`` does, so
only use it with models and prompts you trust. Parsing never evaluates anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import inspect
import io
import json
import re
import traceback
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llmesh.common.errors import InvalidArgument

# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LLMFunctionCallResponse:
    """What ``chat_oai(tools=..., execute_tool=True)`` returns per answer.

    Attributes:
        response: the model's raw answer (an ``LLMResponse``).
        values: what each selected tool returned, in call order.
        metadata: ``reason`` (empty when all went well, else why nothing or not everything
            ran) and ``selected_functions`` (the names the model chose).
    """

    response: Any
    values: list[Any]
    metadata: dict[str, Any]


@dataclasses.dataclass
class LLMClassResponse:
    """What ``chat_oai(response_class=...)`` returns per answer.

    Attributes:
        response: the model's raw answer (an ``LLMResponse``).
        value: the parsed object (a pydantic model instance, or a dict for a JSON-schema
            string), or None when the answer did not parse.
        metadata: ``reason`` (empty on success, else why ``value`` is None); for
            ``impl_func`` also ``raw_func`` (the generated code) and ``func`` (the function).
    """

    response: Any
    value: Any | None
    metadata: dict[str, Any]


@dataclasses.dataclass
class ExecuteCodeResponse:
    """The result of running a code block (kept for Byzer-LLM code that imports it)."""

    status: int
    output: str
    code: str
    prompt: str
    variables: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FunctionCall:
    """One call the model chose: the function's name and its keyword arguments."""

    name: str
    arguments: dict[str, Any]


@dataclasses.dataclass
class FunctionCallList:
    """The answer shape of function calling: ``{"tool_calls": [{"function": {...}}, ...]}``."""

    tool_calls: list[FunctionCall]
    id: str = ""
    type: str = "function"

    @classmethod
    def parse_obj(cls, data: Any) -> FunctionCallList:
        """Read the answer's JSON object.

        Raises:
            ValueError: the object does not have the expected shape.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a JSON object with tool_calls, got {type(data).__name__}")
        calls = data.get("tool_calls")
        if not isinstance(calls, list):
            raise ValueError("the JSON object has no tool_calls list")
        out = []
        for i, item in enumerate(calls):
            func = item.get("function") if isinstance(item, Mapping) else None
            if not isinstance(func, Mapping) or not isinstance(func.get("name"), str):
                raise ValueError(f"tool_calls[{i}] has no function name")
            args = func.get("arguments") or {}
            if isinstance(args, str):  # OpenAI sends arguments as a JSON string
                args = json.loads(args)
            if not isinstance(args, Mapping):
                raise ValueError(f"tool_calls[{i}].function.arguments is not an object")
            out.append(FunctionCall(name=func["name"], arguments=dict(args)))
        return cls(
            tool_calls=out, id=str(data.get("id") or ""), type=str(data.get("type") or "function")
        )


# --------------------------------------------------------------------------------------------
# Python signatures -> JSON schema
# --------------------------------------------------------------------------------------------

_SIMPLE_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _is_pydantic_model(obj: Any) -> bool:
    return isinstance(obj, type) and hasattr(obj, "model_json_schema")


def type_schema(hint: Any) -> dict[str, Any]:
    """A JSON schema for a Python type annotation (the common cases; others allow anything)."""
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Annotated:
        schema = type_schema(args[0])
        for meta in args[1:]:
            if isinstance(meta, str):
                schema["description"] = meta
            elif isinstance(meta, Mapping):
                if "description" in meta:
                    schema["description"] = str(meta["description"])
                if "enum" in meta:
                    schema["enum"] = list(meta["enum"])
        return schema
    if hint in _SIMPLE_TYPES:
        return {"type": _SIMPLE_TYPES[hint]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [type_schema(a) for a in args]}
    if hint in (list, tuple, set) or origin in (list, tuple, set, Sequence):
        schema: dict[str, Any] = {"type": "array"}
        if args and args[0] is not Ellipsis:
            schema["items"] = type_schema(args[0])
        return schema
    if hint is dict or origin in (dict, Mapping):
        schema = {"type": "object"}
        if len(args) == 2:
            schema["additionalProperties"] = type_schema(args[1])
        return schema
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [m.value for m in hint]}
    if _is_pydantic_model(hint):
        return hint.model_json_schema()
    return {}


def _description(func: Callable[..., Any]) -> str:
    return inspect.cleandoc(func.__doc__ or "")


def function_schema(func: Callable[..., Any]) -> dict[str, Any]:
    """Describe a function as ``{"name", "description", "parameters"}`` (OpenAI's tool shape).

    Parameter types come from annotations; ``Annotated[T, "description"]`` or
    ``Annotated[T, {"description": ..., "enum": [...]}]`` adds a description or choices;
    parameters without a default are required.
    """
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to none
        hints = {}
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, param in inspect.signature(func).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        schema = type_schema(hints.get(name, inspect.Parameter.empty))
        if param.default is inspect.Parameter.empty:
            required.append(name)
        else:
            with contextlib.suppress(TypeError, ValueError):
                json.dumps(param.default)
                schema["default"] = param.default
        properties[name] = schema
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return {"name": func.__name__, "description": _description(func), "parameters": parameters}


def serialize_function_to_json(func: Callable[..., Any] | str) -> str:
    """A function's description as JSON text; a string is taken to be one already."""
    if isinstance(func, str):
        return func
    return json.dumps(function_schema(func), ensure_ascii=False, indent=2)


def _tool_name(tool: Callable[..., Any] | str) -> str | None:
    if isinstance(tool, str):
        try:
            name = json.loads(tool).get("name")
        except (json.JSONDecodeError, AttributeError):
            return None
        return name if isinstance(name, str) else None
    return getattr(tool, "__name__", None)


def _tool_parameters(tool: Callable[..., Any] | str) -> dict[str, Any]:
    if isinstance(tool, str):
        try:
            params = json.loads(tool).get("parameters")
        except (json.JSONDecodeError, AttributeError):
            params = None
        return params if isinstance(params, dict) else {"type": "object"}
    return function_schema(tool)["parameters"]


def class_schema(cls: Any) -> dict[str, Any] | None:
    """The JSON schema of a response class: a pydantic model, or a JSON-schema string.

    Returns None for a string that is not JSON (it is then only shown to the model).
    """
    if isinstance(cls, str):
        try:
            schema = json.loads(cls)
        except json.JSONDecodeError:
            return None
        return schema if isinstance(schema, dict) else None
    if _is_pydantic_model(cls):
        return cls.model_json_schema()
    raise InvalidArgument(
        f"response_class must be a pydantic model class or a JSON-schema string, got {cls!r}"
    )


def class_schema_text(cls: Any) -> str:
    """The response class's schema as it is shown in prompts."""
    if isinstance(cls, str):
        return cls
    return json.dumps(class_schema(cls), ensure_ascii=False)


def tool_calls_schema(
    tools: Sequence[Callable[..., Any] | str],
    tool_choice: Callable[..., Any] | str | None = None,
    max_calls: int | None = None,
) -> dict[str, Any] | None:
    """The JSON schema of a valid tool-call answer for these tools, or None when no tool has
    a name to call it by.

    Each call names one of the tools (or only ``tool_choice`` when given) and carries
    arguments matching that tool's parameters; at least one call is required, and at most
    ``max_calls`` (default: one per tool offered, so a model that never closes the list
    still ends).
    """
    chosen = [tool_choice] if tool_choice is not None else list(tools)
    variants = []
    for tool in chosen:
        name = _tool_name(tool)
        if name is None:
            continue
        variants.append(
            {
                "type": "object",
                "properties": {
                    "function": {
                        "type": "object",
                        "properties": {
                            "name": {"const": name},
                            "arguments": _tool_parameters(tool),
                        },
                        "required": ["name", "arguments"],
                        "additionalProperties": False,
                    }
                },
                "required": ["function"],
                "additionalProperties": False,
            }
        )
    if not variants:
        return None
    item: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {
        "type": "object",
        "properties": {
            "tool_calls": {
                "type": "array",
                "items": item,
                "minItems": 1,
                "maxItems": max(1, max_calls if max_calls is not None else len(chosen)),
            }
        },
        "required": ["tool_calls"],
        "additionalProperties": False,
    }


# --------------------------------------------------------------------------------------------
# Prompts (the fallback protocol for engines without constrained decoding)
# --------------------------------------------------------------------------------------------

_TOOL_CALL_EXAMPLE = json.dumps(
    {"tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    indent=2,
)


def function_calling_format(
    prompt: str,
    tools: Sequence[Callable[..., Any] | str],
    tool_choice: Callable[..., Any] | str | None,
) -> str:
    """Ask the model to answer ``prompt`` by choosing tools, as a JSON tool-call object."""
    if tool_choice is None and not tools:
        return prompt
    described = "\n".join(serialize_function_to_json(t) for t in tools)
    forced = ""
    if tool_choice is not None:
        forced = (
            "\nYou must call this function:\n\n```json\n"
            f"{serialize_function_to_json(tool_choice)}\n```\n"
        )
    return (
        "You can call the functions described below.\n\n"
        f"```json\n{described}\n```\n{forced}\n"
        "Answer with one JSON object listing the calls to make, in this shape:\n\n"
        f"```json\n{_TOOL_CALL_EXAMPLE}\n```\n\n"
        "Use only the functions above and give every required argument. If none of them "
        "can answer the question, say so plainly instead of writing JSON.\n\n"
        f"Question: {prompt}"
    )


def response_class_format(prompt: str, cls: Any) -> str:
    """Ask the model to answer ``prompt`` with one JSON object matching ``cls``'s schema."""
    return (
        f"{prompt}\n\n"
        "Reply with a single JSON object, and nothing else, that validates against this "
        f"JSON Schema:\n\n```json\n{class_schema_text(cls)}\n```"
    )


def response_class_format_after_chat(cls: Any) -> str:
    """Ask the model to restate its previous answer as JSON matching ``cls``'s schema."""
    return (
        "Restate your previous answer as a single JSON object, and nothing else, that "
        f"validates against this JSON Schema:\n\n```json\n{class_schema_text(cls)}\n```"
    )


def function_impl_format(prompt: str, func: Callable[..., Any] | str, cls: Any) -> str:
    """Ask the model to implement ``func`` in Python so that it returns data matching ``cls``."""
    return (
        "Write a Python implementation of the function described below.\n\n"
        f"```json\n{serialize_function_to_json(func)}\n```\n\n"
        "It must return a dict (or a JSON string) that validates against this JSON "
        f"Schema:\n\n```json\n{class_schema_text(cls)}\n```\n\n"
        f"Task: {prompt}\n\n"
        "Reply with exactly one ```python code block holding the complete function, with any "
        "imports it needs. Do not call the function or show example output."
    )


def base_ability_format(prompt: str | None = None) -> str:
    """The system message ``enable_default_sys_message=True`` adds.

    It names the three abilities the ``sys_*`` prompts refer to (RESPONSE_WITH_CLASS,
    FUNCTION_CALLING, FUNCTION_IMPL), so those prompts can stay short.
    """
    del prompt
    return (
        "You are a helpful assistant with three abilities the user may ask for by name.\n\n"
        "RESPONSE_WITH_CLASS: answer with a single JSON object that validates against the "
        "JSON Schema the user gives, and nothing else.\n\n"
        "FUNCTION_CALLING: the user lists functions (name, description, JSON-Schema "
        "parameters). Choose the ones that answer the question and reply with one JSON object "
        f"in this shape:\n```json\n{_TOOL_CALL_EXAMPLE}\n```\nIf no function fits, say so.\n\n"
        "FUNCTION_IMPL: the user gives a function signature and a JSON Schema for its result. "
        "Reply with exactly one ```python code block holding the complete function; do not "
        "call it or show its output."
    )


def sys_response_class_format(prompt: str, cls: Any) -> str:
    """The short response-class prompt used with the default system message."""
    return (
        f"Use RESPONSE_WITH_CLASS.\n\nInput:\n{prompt}\n\n"
        f"JSON Schema:\n```json\n{class_schema_text(cls)}\n```\n\nOutput:\n"
    )


def sys_function_calling_format(
    prompt: str,
    tools: Sequence[Callable[..., Any] | str],
    tool_choice: Callable[..., Any] | str | None,
) -> str:
    """The short function-calling prompt used with the default system message."""
    if tool_choice is None and not tools:
        return prompt
    described = "\n".join(serialize_function_to_json(t) for t in tools)
    forced = ""
    if tool_choice is not None:
        forced = f"\nYou must call:\n```json\n{serialize_function_to_json(tool_choice)}\n```\n"
    return (
        f"Use FUNCTION_CALLING.\n\nFunctions:\n```json\n{described}\n```\n{forced}\n"
        f"Input:\n{prompt}\n\nOutput:\n"
    )


def sys_function_impl_format(prompt: str, func: Callable[..., Any] | str, cls: Any) -> str:
    """The short function-implementation prompt used with the default system message."""
    return (
        f"Use FUNCTION_IMPL.\n\nTask: {prompt}\n\n"
        f"Signature:\n```json\n{serialize_function_to_json(func)}\n```\n\n"
        f"JSON Schema:\n```json\n{class_schema_text(cls)}\n```\n\nOutput:\n"
    )


# --------------------------------------------------------------------------------------------
# Reading answers
# --------------------------------------------------------------------------------------------

_CODE_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\r?\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> list[tuple[str, str]]:
    """Every fenced code block in ``text`` as ``(language, code)``; language may be ""."""
    return [(m.group(1).lower(), m.group(2)) for m in _CODE_BLOCK.finditer(text)]


def infer_lang(code: str) -> str:
    """``"python"`` when ``code`` compiles as Python (it is not run), else ``"unknown"``."""
    try:
        compile(code, "<answer>", "exec")
    except (SyntaxError, ValueError):
        return "unknown"
    return "python"


def _first_json_value(text: str) -> Any:
    """The JSON value at the start of ``text`` (after whitespace), ignoring what follows."""
    stripped = text.lstrip()
    value, _ = json.JSONDecoder().raw_decode(stripped)
    return value


def extract_json(text: str) -> tuple[Any, str]:
    """Find the JSON in an answer: the whole text, else its last ```json block.

    Returns:
        ``(value, "")`` on success, ``(None, reason)`` otherwise.
    """
    try:
        return json.loads(text), ""
    except json.JSONDecodeError:
        pass
    blocks = extract_code(text)
    for lang, code in reversed(blocks):
        if lang in ("json", ""):
            try:
                return json.loads(code), ""
            except json.JSONDecodeError as exc:
                return None, f"the json block does not parse: {exc}"
    # Constrained decoding may stop at max_tokens after a complete value plus whitespace.
    try:
        return _first_json_value(text), ""
    except json.JSONDecodeError:
        return None, "No json block found"


def parse_class(cls: Any, data: Any) -> Any:
    """Build the response class from parsed JSON (a dict for a JSON-schema string)."""
    if isinstance(cls, str):
        return data
    return cls.model_validate(data)


def _cut_off(response: Any, reason: str) -> str:
    """Add a hint when the answer stopped at max_tokens (JSON cut off mid-way)."""
    meta = getattr(response, "metadata", None) or {}
    if meta.get("finish_reason") == "length":
        return f"{reason} (the answer was cut off at max_tokens; allow more tokens)"
    return reason


def execute_response_format(response: Any, response_class: Any) -> LLMClassResponse:
    """Parse one answer into ``response_class``."""
    out = LLMClassResponse(response=response, value=None, metadata={"reason": ""})
    data, reason = extract_json(response.output)
    if reason:
        out.metadata["reason"] = _cut_off(response, reason)
        return out
    try:
        out.value = parse_class(response_class, data)
    except Exception as exc:  # noqa: BLE001 - reported in metadata, as Byzer-LLM did
        out.metadata["reason"] = f"{exc}\n{traceback.format_exc()}"
    return out


def execute_function_calling(
    response: Any,
    tools: Sequence[Callable[..., Any] | str],
    func_params: Mapping[str, Any] | None,
) -> LLMFunctionCallResponse:
    """Run the tools the model chose, with its arguments plus ``func_params``.

    Only Python callables among ``tools`` can run; a chosen name that is not one of them is
    skipped (and not listed in ``selected_functions``). An exception from a tool stops the
    remaining calls and is reported in ``metadata["reason"]``.
    """
    out = LLMFunctionCallResponse(response=response, values=[], metadata={"reason": ""})
    data, reason = extract_json(response.output)
    if reason:
        out.metadata["reason"] = _cut_off(response, reason)
        return out
    try:
        if isinstance(data, list):  # several objects: the last one is the answer
            data = data[-1]
        calls = FunctionCallList.parse_obj(data)
    except Exception as exc:  # noqa: BLE001 - reported in metadata
        out.metadata["reason"] = f"{exc}\n{traceback.format_exc()}"
        return out
    by_name = {t.__name__: t for t in tools if callable(t) and hasattr(t, "__name__")}
    out.metadata["selected_functions"] = []
    try:
        for call in calls.tool_calls:
            func = by_name.get(call.name)
            if func is None:
                continue
            out.metadata["selected_functions"].append(call.name)
            out.values.append(func(**call.arguments, **(func_params or {})))
    except Exception as exc:  # noqa: BLE001 - a failing tool is reported, not raised
        out.metadata["reason"] = f"{exc}\n{traceback.format_exc()}"
    return out


def exec_capture_output(
    code: str, target_names: Mapping[str, Any] | None = None
) -> tuple[int, str, dict[str, Any]]:
    """Run ``code`` in a fresh namespace and capture what it prints.

    This executes arbitrary code in this process. Callers reach it only through
    ``execute_impl_func=True`` (or ``llm.impl()``).

    Returns:
        ``(0, output, {name: value})`` for the names of ``target_names`` the code defined, or
        ``(1, traceback, {})`` when it raised.
    """
    buffer = io.StringIO()
    namespace: dict[str, Any] = {"__name__": "llmesh_generated"}
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            # Runs model-written code: reached only on the caller's explicit request.
            exec(code, namespace)
        except Exception:  # noqa: BLE001 - the traceback is the result
            return 1, buffer.getvalue() + traceback.format_exc(), {}
    found = {name: namespace[name] for name in (target_names or {}) if name in namespace}
    return 0, buffer.getvalue(), found


def execute_generate_func(
    func_name: str,
    impl_func_params: Mapping[str, Any] | None,
    response: Any,
    response_class: Any,
) -> LLMClassResponse:
    """Run the model-written implementation of ``func_name`` and parse its result.

    Runs model output as code: reached only with ``execute_impl_func=True``.
    """
    out = LLMClassResponse(response=response, value=None, metadata={"reason": ""})
    blocks = [c for lang, c in extract_code(response.output) if lang in ("python", "py", "")]
    if blocks:
        code = blocks[-1]
    elif infer_lang(response.output) == "python":
        code = response.output
    else:
        out.metadata["reason"] = "No Python block found"
        return out
    status, output, found = exec_capture_output(code, {func_name: True})
    if status != 0:
        out.metadata["reason"] = output
        return out
    if func_name not in found:
        out.metadata["reason"] = f"the generated code does not define {func_name}()"
        return out
    try:
        result = found[func_name](**(impl_func_params or {}))
        out.metadata["raw_func"] = code
        out.metadata["func"] = found[func_name]
        if isinstance(result, str):
            result = json.loads(result)
        out.value = parse_class(response_class, result)
    except Exception as exc:  # noqa: BLE001 - reported in metadata
        out.metadata["reason"] = f"{exc}\n{traceback.format_exc()}"
    return out


__all__ = [
    "ExecuteCodeResponse",
    "FunctionCall",
    "FunctionCallList",
    "LLMClassResponse",
    "LLMFunctionCallResponse",
    "base_ability_format",
    "class_schema",
    "exec_capture_output",
    "execute_function_calling",
    "execute_generate_func",
    "execute_response_format",
    "extract_code",
    "extract_json",
    "function_calling_format",
    "function_impl_format",
    "function_schema",
    "infer_lang",
    "response_class_format",
    "response_class_format_after_chat",
    "serialize_function_to_json",
    "sys_function_calling_format",
    "sys_function_impl_format",
    "sys_response_class_format",
    "tool_calls_schema",
]
