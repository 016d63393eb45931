"""Prompt templates for models that are driven by a raw prompt rather than a chat template.

Byzer-LLM describes a prompt format as a *role mapping*: the text put before user and assistant
turns, the system-message layout, and optional formatter hooks (``system_msg_func``,
``user_role_func``, ``assistant_role_func``, each called as ``func(t=..., v=...)`` with the
mapping's own field as ``t`` and the message text as ``v``). A :class:`Template` bundles a role
mapping with the generation settings that go with it (stop token ids, repetition penalty) and a
``clean_func`` that trims what the model writes past its end-of-turn marker.

``ByzerLLM.setup_template(model, Templates.qwen())`` installs one; ``"auto"`` lets the model's
meta decide (llmesh workers apply the tokenizer's chat template themselves, so ``auto`` usually
means "send the messages as they are").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: The placeholder in a template's ``system_msg`` that receives the system message text.
SYSTEM_PLACEHOLDER = "{system_msg}"

#: Byzer-LLM's plain "User:/Assistant:" prompt format (its ``default`` template).
DEFAULT_ROLE_MAPPING: dict[str, Any] = {
    "user_role": "User:",
    "assistant_role": "Assistant:",
    "system_msg": "You are a helpful assistant.",
}
#: No role markers at all: the messages' texts, one per line (Byzer-LLM's ``empty`` template).
EMPTY_ROLE_MAPPING: dict[str, Any] = {"user_role": "", "assistant_role": "", "system_msg": ""}


def fill_system_msg(t: str, v: str) -> str:
    """Put the system message ``v`` where ``t`` has ``{system_msg}``.

    Only that one placeholder is replaced, so braces elsewhere in the message (JSON examples,
    code) pass through untouched.
    """
    return t.replace(SYSTEM_PLACEHOLDER, v)


def system_text_only(t: str, v: str) -> str:
    """A ``system_msg_func`` that uses the message text and ignores the template field."""
    del t
    return v


def identity(v: str) -> str:
    """The ``clean_func`` that keeps the output as it is."""
    return v


def cut_at_markers(*markers: str) -> Callable[[str], str]:
    """A ``clean_func`` that drops everything from the first of ``markers`` onwards."""

    def clean(v: str) -> str:
        for marker in markers:
            if marker in v:
                v = v.split(marker, 1)[0]
        return v

    return clean


class Template:
    """A prompt format: role mapping, generation defaults, output cleaning and prompt hooks.

    Args:
        role_mapping: ``user_role``, ``assistant_role``, ``system_msg`` and the optional
            ``system_msg_func`` / ``user_role_func`` / ``assistant_role_func`` hooks.
        generation_config: ``llm_config`` entries every call to the model gets (per-call
            values win), e.g. ``{"generation.stop_token_ids": [7]}``.
        clean_func: applied to every generated text before it is returned.
        function_calling_format_func: builds the tools prompt (``(prompt, tools,
            tool_choice) -> str``); None means llmesh's default.
        response_class_format_func: builds the response-class prompt (``(prompt, cls) ->
            str``); None means llmesh's default.
        response_class_format_after_chat_func: builds the "reformat your answer" prompt
            (``(cls) -> str``); None means llmesh's default.
    """

    def __init__(
        self,
        role_mapping: Mapping[str, Any],
        generation_config: Mapping[str, Any],
        clean_func: Callable[[str], str] = identity,
        function_calling_format_func: Callable[..., str] | None = None,
        response_class_format_func: Callable[..., str] | None = None,
        response_class_format_after_chat_func: Callable[..., str] | None = None,
    ) -> None:
        self.role_mapping = dict(role_mapping)
        self.generation_config = dict(generation_config)
        self.clean_func = clean_func
        self.function_calling_format_func = function_calling_format_func
        self.response_class_format_func = response_class_format_func
        self.response_class_format_after_chat_func = response_class_format_after_chat_func

    def __repr__(self) -> str:
        return f"Template(role_mapping={self.role_mapping!r})"


_CHATML_USER = "<|im_start|>user\n"
_CHATML_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
_CHATML_SYSTEM = "<|im_start|>system\n{system_msg}<|im_end|>"

_DEEPSEEK_FIM_HOLE = "<｜fim▁hole｜>"


def _deepseek_insertion_system(t: str, v: str) -> str:
    if _DEEPSEEK_FIM_HOLE not in v:
        raise ValueError(
            f"deepseek_code_insertion needs the system message to mark the gap with "
            f"{_DEEPSEEK_FIM_HOLE!r}"
        )
    return fill_system_msg(t, v)


def _nothing(t: str, v: str) -> str:
    del t, v
    return ""


class Templates:
    """The prompt formats Byzer-LLM shipped, by model family."""

    @staticmethod
    def default_format(t: str, v: str) -> str:
        """Role prefix followed by the text."""
        return f"{t}{v}"

    @staticmethod
    def qwen() -> Template:
        """ChatML as QWen (1.x) uses it; stops on ``<|endoftext|>`` / ``<|im_end|>``."""
        return Template(
            role_mapping={
                "user_role": _CHATML_USER,
                "assistant_role": _CHATML_ASSISTANT,
                "system_msg": _CHATML_SYSTEM,
                "system_msg_func": fill_system_msg,
            },
            generation_config={
                "generation.repetition_penalty": 1.1,
                "generation.stop_token_ids": [151643, 151645],
            },
            clean_func=cut_at_markers("<|im_end|>", "<|endoftext|>", "<|im_start|>"),
        )

    @staticmethod
    def llama() -> Template:
        """Llama-2 chat: ``[INST] ... [/INST]`` turns and a ``<<SYS>>`` block."""

        def user(t: str, v: str) -> str:
            del t
            return f"<s>[INST] {v} [/INST]"

        def assistant(t: str, v: str) -> str:
            del t
            return f" {v} </s>"

        return Template(
            role_mapping={
                "user_role": "",
                "assistant_role": "",
                "system_msg": "<s>[INST] <<SYS>>\n{system_msg}\n<</SYS>>\n[/INST]</s>",
                "system_msg_func": fill_system_msg,
                "user_role_func": user,
                "assistant_role_func": assistant,
            },
            generation_config={},
        )

    @staticmethod
    def deepseek_code_chat() -> Template:
        """DeepSeek Coder instruct: ``### Instruction:`` / ``### Response:`` turns, ``<|EOT|>``."""

        def user(t: str, v: str) -> str:
            del t
            return f"### Instruction:\n{v}"

        def assistant(t: str, v: str) -> str:
            # `t` is not used here: it is the opener appended after the last user turn.
            del t
            return f"### Response:\n{v}\n<|EOT|>"

        return Template(
            role_mapping={
                "user_role": "",
                "assistant_role": "### Response:\n",
                "system_msg": SYSTEM_PLACEHOLDER,
                "system_msg_func": fill_system_msg,
                "user_role_func": user,
                "assistant_role_func": assistant,
            },
            generation_config={"generation.stop_token_ids": [32021]},
        )

    @staticmethod
    def deepseek_code_insertion() -> Template:
        """DeepSeek Coder fill-in-the-middle: the system message is the code with a hole."""
        return Template(
            role_mapping={
                "user_role": "",
                "assistant_role": "",
                "system_msg": "<｜fim▁begin｜>{system_msg}<｜fim▁end｜>",
                "system_msg_func": _deepseek_insertion_system,
                "user_role_func": _nothing,
                "assistant_role_func": _nothing,
            },
            generation_config={},
        )

    @staticmethod
    def deepseek_code_completion() -> Template:
        """DeepSeek Coder completion: the system message is the code to continue."""
        return Template(
            role_mapping={
                "user_role": "",
                "assistant_role": "",
                "system_msg": SYSTEM_PLACEHOLDER,
                "system_msg_func": fill_system_msg,
                "user_role_func": _nothing,
                "assistant_role_func": _nothing,
            },
            generation_config={},
        )

    @staticmethod
    def yi() -> Template:
        """ChatML as Yi uses it; stops on token id 7 (``<|im_end|>`` in Yi's vocabulary)."""
        return Template(
            role_mapping={
                "user_role": _CHATML_USER,
                "assistant_role": _CHATML_ASSISTANT,
                "system_msg": _CHATML_SYSTEM,
                "system_msg_func": fill_system_msg,
            },
            generation_config={"generation.stop_token_ids": [7]},
        )

    @staticmethod
    def default() -> Template:
        """Plain ``User:`` / ``Assistant:`` lines; system messages as their bare text."""
        return Template(
            role_mapping={
                "user_role": "User:",
                "assistant_role": "Assistant:",
                "system_msg": "You are a helpful assistant. Think carefully and answer "
                "the user's question correctly.",
                "system_msg_func": system_text_only,
            },
            generation_config={},
        )

    @staticmethod
    def empty() -> Template:
        """No markers at all: the messages' texts, one per line."""
        return Template(
            role_mapping={
                "user_role": "",
                "assistant_role": "",
                "system_msg": "",
                "system_msg_func": system_text_only,
            },
            generation_config={},
        )


#: Template names accepted where a template may be given by name (``setup_template``, CLI).
TEMPLATE_NAMES: dict[str, Callable[[], Template]] = {
    "qwen": Templates.qwen,
    "llama": Templates.llama,
    "deepseek_code_chat": Templates.deepseek_code_chat,
    "deepseek_code_insertion": Templates.deepseek_code_insertion,
    "deepseek_code_completion": Templates.deepseek_code_completion,
    "yi": Templates.yi,
    "default": Templates.default,
    "empty": Templates.empty,
}


def render_with_role_mapping(
    conversations: Sequence[Mapping[str, Any]], role_mapping: Mapping[str, Any]
) -> str:
    """Render a conversation into one prompt with a Byzer-LLM ``role_mapping``.

    Each message becomes a line: system messages as their text (or ``system_msg_func(t, v)``),
    user messages as ``user_role + text`` (or ``user_role_func(t, v)``), assistant messages as
    ``assistant_role + text`` (or ``assistant_role_func(t, v)``). When the last message is from
    the user, ``assistant_role`` is appended so the model answers.
    """
    user_role = str(role_mapping.get("user_role", ""))
    assistant_role = str(role_mapping.get("assistant_role", ""))
    lines: list[str] = []
    for item in conversations:
        role, content = item.get("role"), str(item.get("content") or "")
        if role == "system":
            func = role_mapping.get("system_msg_func")
            lines.append(func(t=role_mapping.get("system_msg", ""), v=content) if func else content)
        elif role == "user":
            func = role_mapping.get("user_role_func")
            lines.append(func(t=user_role, v=content) if func else f"{user_role}{content}")
        elif role == "assistant":
            func = role_mapping.get("assistant_role_func")
            lines.append(
                func(t=assistant_role, v=content) if func else f"{assistant_role}{content}"
            )
    if conversations and conversations[-1].get("role") == "user":
        lines.append(assistant_role)
    return "\n".join(lines)


__all__ = [
    "DEFAULT_ROLE_MAPPING",
    "EMPTY_ROLE_MAPPING",
    "TEMPLATE_NAMES",
    "Template",
    "Templates",
    "cut_at_markers",
    "fill_system_msg",
    "render_with_role_mapping",
]
