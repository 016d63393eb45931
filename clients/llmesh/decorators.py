"""Prompt functions: a function's docstring is its prompt, its arguments fill the blanks.

``@prompt()`` (module level) turns a function into one that returns its rendered docstring.
``@llm.prompt()`` sends the rendered prompt to a model and returns the answer (a string, or an
instance of the pydantic model the function is annotated to return). ``@llm.response()`` sends
the single argument as the prompt and parses the answer into the return class. ``@llm.impl()``
asks the model to write the function, runs the code (see :mod:`llmesh.functions` on what that
means), and caches the implementation.

Rendering: ``render="simple"`` replaces ``{name}`` with the argument's value (``{{``/``}}``
stand for literal braces, as in ``str.format``); ``render="jinja2"`` (or ``"jinja"``) renders
the docstring as a Jinja2 template. No LangChain needed.
"""

from __future__ import annotations

import functools
import inspect
import json
import time
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmesh.common.errors import InvalidArgument

if TYPE_CHECKING:
    from llmesh.client import ByzerLLM

RENDERS = ("simple", "jinja2", "jinja")


def docstring_template(func: Callable[..., Any]) -> str:
    """The function's docstring with the first non-empty line's indentation removed from all.

    Raises:
        InvalidArgument: the function has no docstring.
    """
    doc = func.__doc__
    if not doc or not doc.strip():
        raise InvalidArgument(f"{func.__qualname__} needs a docstring: it is the prompt")
    lines = doc.splitlines()
    first = next(line for line in lines if line.strip())
    indent = len(first) - len(first.lstrip())
    return "\n".join(line[indent:] if line[:indent].isspace() else line.lstrip() for line in lines)


def format_prompt(func: Callable[..., Any], **kwargs: Any) -> str:
    """Render the docstring with ``str.format`` semantics (``{name}``, ``{{`` for ``{``)."""
    template = docstring_template(func)
    try:
        return template.format(**kwargs)
    except KeyError as exc:
        raise InvalidArgument(
            f"the prompt of {func.__qualname__} uses {{{exc.args[0]}}}, which is not one of "
            f"its arguments ({', '.join(kwargs) or 'none'}); write {{{{ and }}}} for literal "
            "braces"
        ) from None


def format_prompt_jinja2(func: Callable[..., Any], **kwargs: Any) -> str:
    """Render the docstring as a Jinja2 template."""
    try:
        import jinja2
    except ImportError:  # pragma: no cover - depends on the environment
        raise InvalidArgument(
            "render='jinja2' needs the jinja2 package: pip install jinja2"
        ) from None
    return jinja2.Template(docstring_template(func)).render(**kwargs)


def render_prompt(func: Callable[..., Any], render: str | None, arguments: dict[str, Any]) -> str:
    """Render ``func``'s docstring with ``arguments`` the way ``render`` says."""
    if render in ("jinja2", "jinja"):
        return format_prompt_jinja2(func, **arguments)
    if render in (None, "simple"):
        return format_prompt(func, **arguments)
    raise InvalidArgument(f"render must be one of {', '.join(RENDERS)}, got {render!r}")


def bound_arguments(func: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by parameter name, defaults filled in."""
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def return_type(func: Callable[..., Any]) -> Any:
    """The function's return annotation, resolved when written as a string."""
    try:
        return typing.get_type_hints(func).get("return", inspect.Signature.empty)
    except Exception:  # noqa: BLE001 - unresolvable annotation: fall back to the raw one
        return inspect.signature(func).return_annotation


def is_pydantic_class(obj: Any) -> bool:
    """True for a pydantic (v2) model class."""
    return isinstance(obj, type) and hasattr(obj, "model_validate")


def prompt(
    llm: Any = None, render: str = "simple", print_prompt: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a function whose docstring is a prompt template.

    Called, the function returns the rendered prompt. On a method, ``llm`` may be a function
    that takes ``self`` and returns a :class:`~llmesh.ByzerLLM` (Byzer-LLM's
    ``llm=lambda self: self.llm``), or a ``ByzerLLM`` itself: then the prompt is sent to the
    model and the answer returned, as :meth:`ByzerLLM.prompt` does.

    Args:
        llm: None (just render), a ``ByzerLLM``, or ``self -> ByzerLLM``.
        render: ``"simple"`` or ``"jinja2"``.
        print_prompt: print the rendered prompt before returning or sending it.
    """
    if render not in RENDERS:
        raise InvalidArgument(f"render must be one of {', '.join(RENDERS)}, got {render!r}")

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            arguments = bound_arguments(func, args, kwargs)
            if "self" in arguments:
                instance = arguments.pop("self")
                client = None
                if llm is not None and hasattr(llm, "chat_oai"):
                    client = llm
                elif callable(llm):
                    client = llm(instance)
                if client is not None:
                    send = client.prompt(render=render, print_prompt=print_prompt)(func)
                    return send(instance, **arguments)
            elif llm is not None and hasattr(llm, "chat_oai"):
                send = llm.prompt(render=render, print_prompt=print_prompt)(func)
                return send(**arguments)
            text = render_prompt(func, render, arguments)
            if print_prompt:
                print(text, flush=True)
            return text

        return wrapper

    return decorate


def llm_prompt(
    llm: ByzerLLM,
    model: str | None,
    render: str | None,
    print_prompt: bool,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """:meth:`ByzerLLM.prompt`: render the docstring, ask the model, return the answer."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            arguments = bound_arguments(func, args, kwargs)
            arguments.pop("self", None)
            text = render_prompt(func, render, arguments)
            if print_prompt:
                print(text, flush=True)
            returns = return_type(func)
            conversations = [{"role": "user", "content": text}]
            if is_pydantic_class(returns):
                (result,) = llm.chat_oai(
                    conversations,
                    model=model or llm.default_model_name,
                    response_class=returns,
                    impl_func_params=arguments,
                )
                return result.value
            if returns is str or returns is inspect.Signature.empty:
                return llm.chat_oai(conversations, model=model or llm.default_model_name)[0].output
            raise InvalidArgument(
                f"{func.__qualname__} must be annotated to return str or a pydantic model"
            )

        return wrapper

    return decorate


def llm_response(
    llm: ByzerLLM, instruction: str | None, model: str | None, verbose: bool | None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """:meth:`ByzerLLM.response`: the single argument is the prompt, the answer is parsed."""
    del instruction  # accepted for compatibility; Byzer-LLM did not use it either

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            arguments = bound_arguments(func, args, kwargs)
            arguments.pop("self", None)
            if len(arguments) != 1:
                raise InvalidArgument(
                    f"{func.__qualname__} must take exactly one argument: the text to answer"
                )
            returns = return_type(func)
            if not is_pydantic_class(returns):
                raise InvalidArgument(f"{func.__qualname__} must return a pydantic model")
            started = time.monotonic()
            (result,) = llm.chat_oai(
                [{"role": "user", "content": str(next(iter(arguments.values())))}],
                model=model or llm.default_model_name,
                response_class=returns,
                impl_func_params=arguments,
            )
            if llm.verbose if verbose is None else verbose:
                print(f"cost {time.monotonic() - started:.3f} seconds", flush=True)
            return result.value

        return wrapper

    return decorate


def impl_cache_key(model: str | None, instruction: str, func: Callable[..., Any]) -> str:
    """The cache key of a generated implementation: model, instruction, module.function."""
    return f"{model}_{instruction}_{func.__module__}.{func.__name__}"


def llm_impl(
    llm: ByzerLLM,
    instruction: str | None,
    model: str | None,
    verbose: bool | None,
    skip_cache: bool,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """:meth:`ByzerLLM.impl`: have the model implement the function, run it, cache it.

    This executes model-written code in this process (that is the feature).
    """
    text = instruction or ""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = model or llm.default_model_name
            key = impl_cache_key(name, text, func)
            returns = return_type(func)
            if not is_pydantic_class(returns):
                raise InvalidArgument(f"{func.__qualname__} must return a pydantic model")
            loud = llm.verbose if verbose is None else verbose
            cached = None if skip_cache else llm.func_impl_cache.get(key)
            if cached is not None:
                if loud:
                    print(f"{key} is cached; reusing its implementation", flush=True)
                value = cached(*args, **kwargs)
                return returns.model_validate(
                    value if not isinstance(value, str) else json.loads(value)
                )
            arguments = bound_arguments(func, args, kwargs)
            started = time.monotonic()
            (result,) = llm.chat_oai(
                [{"role": "user", "content": text}],
                model=name,
                impl_func=func,
                response_class=returns,
                execute_impl_func=True,
                impl_func_params=arguments,
            )
            if result.value is None:
                raise InvalidArgument(
                    f"the model's implementation of {func.__qualname__} failed: "
                    f"{result.metadata.get('reason', '')}"
                )
            if loud:
                print(
                    f"Generated code for {key}:\n```python\n{result.metadata['raw_func']}\n```\n"
                    f"cost {time.monotonic() - started:.3f} seconds",
                    flush=True,
                )
            if not skip_cache:
                llm.func_impl_cache.setdefault(key, result.metadata["func"])
            return result.value

        return wrapper

    return decorate


__all__ = [
    "format_prompt",
    "format_prompt_jinja2",
    "impl_cache_key",
    "prompt",
    "render_prompt",
]
