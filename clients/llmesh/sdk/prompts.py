"""Prompt functions: Byzer-LLM's ``@llm.prompt()``, ``@llm.response()`` and ``@llm.impl()``.

The decorators themselves are in :mod:`llmesh.decorators`; these methods bind them to the
client, and ``impl``'s generated code is cached in ``func_impl_cache``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from llmesh import decorators
from llmesh.common.errors import InvalidArgument

P = TypeVar("P", bound="PromptMixin")


class PromptMixin:
    """The prompt-function decorators and the ``impl`` cache."""

    def _init_prompts(self) -> None:
        #: Generated ``impl`` implementations by (model, instruction, function).
        self.func_impl_cache: dict[str, Callable[..., Any]] = {}

    def prompt(
        self, model: str | None = None, render: str | None = "simple", print_prompt: bool = False
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: the function's docstring is a prompt; calling it asks the model.

        The function returns the answer text when annotated ``-> str``, or an instance of its
        pydantic return class (asked for with ``response_class``).

        Args:
            model: the model; defaults to ``setup_default_model_name`` at call time.
            render: ``"simple"`` (``{name}`` placeholders) or ``"jinja2"``.
            print_prompt: print the rendered prompt before sending it.
        """
        return decorators.llm_prompt(self, model, render, print_prompt)

    def response(
        self,
        instruction: str | None = None,
        model: str | None = None,
        verbose: bool | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: the function's one argument is the prompt, the answer its return class.

        Args:
            instruction: accepted for compatibility (Byzer-LLM ignored it too).
            model: the model; defaults to ``setup_default_model_name`` at call time.
            verbose: print how long the call took; defaults to the client's ``verbose``.
        """
        return decorators.llm_response(self, instruction, model, verbose)

    def impl(
        self,
        instruction: str | None = None,
        model: str | None = None,
        verbose: bool | None = None,
        skip_cache: bool = False,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: the model writes the function's body, which then runs.

        The generated implementation is cached per (model, instruction, function) in
        ``func_impl_cache``; :meth:`clear_impl_cache` forgets it. This executes
        model-written Python in this process: use it only with models you trust.

        Args:
            instruction: what the function should do, beyond its docstring.
            model: the model; defaults to ``setup_default_model_name`` at call time.
            verbose: print the generated code and the time taken.
            skip_cache: always ask the model (and do not cache).
        """
        return decorators.llm_impl(self, instruction, model, verbose, skip_cache)

    def clear_impl_cache(
        self: P,
        model: str | None = None,
        full_func_name: str | None = None,
        instruction: str | None = None,
    ) -> P:
        """Forget cached ``impl`` implementations.

        Args:
            model: only this model's; with ``full_func_name`` also needs ``instruction``.
            full_func_name: ``module.function`` of the decorated function.
            instruction: the ``impl`` instruction.

        With no argument everything is forgotten.

        Raises:
            InvalidArgument: ``model`` and ``full_func_name`` without ``instruction``.
        """
        if model is None and full_func_name is None and instruction is None:
            self.func_impl_cache.clear()
            return self
        if model is not None and full_func_name is not None and instruction is None:
            raise InvalidArgument(
                "clear_impl_cache(model=..., full_func_name=...) also needs instruction"
            )
        if model is not None:
            prefix = f"{model}_"
            if instruction is not None:
                prefix += f"{instruction}_{full_func_name or ''}"
            for key in [k for k in self.func_impl_cache if k.startswith(prefix)]:
                del self.func_impl_cache[key]
            return self
        if full_func_name is not None:
            suffix = (
                f"_{full_func_name}" if instruction is None else f"_{instruction}_{full_func_name}"
            )
            for key in [k for k in self.func_impl_cache if k.endswith(suffix)]:
                del self.func_impl_cache[key]
        return self
