"""Parsing ``--infer_params`` tokens into a flat ``{key: value}`` dict of strings.

Byzer-LLM's ``byzerllm deploy --infer_params`` only understood one quoted token per parameter
holding the key, a space and the value (``"max_model_len 4096"``); its open request asked for the
usual ``KEY=VALUE`` and ``KEY="VALUE"`` forms. This parser accepts both, so old scripts keep
working and new ones read naturally.

Tokens usually arrive after the shell has removed the quotes, so ``name="hello world"`` reaches
us as ``name=hello world``: a value is taken literally unless it *starts* with a quote, and only
then is it read as a quoted string (which must be balanced). A literal apostrophe inside a value
(``prompt=don't``) is therefore fine.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterable, Sequence
from typing import Any

ACCEPTED_FORMS = (
    "KEY=VALUE, KEY=\"VALUE with spaces\", KEY='VALUE', "
    'or the older "KEY VALUE" given as one quoted token'
)

_QUOTES = ("'", '"')


def _fail(token: str, reason: str) -> ValueError:
    return ValueError(
        f"cannot parse infer param {token!r}: {reason}. Accepted forms: {ACCEPTED_FORMS}"
    )


def _check_key(token: str, key: str) -> str:
    if not key:
        raise _fail(token, "the key before '=' is empty")
    if any(ch.isspace() for ch in key):
        raise _fail(
            token,
            f"the key {key!r} contains whitespace (for the old form with a value holding '=', "
            "write KEY=VALUE instead)",
        )
    if any(q in key for q in _QUOTES):
        raise _fail(token, f"the key {key!r} contains a quote")
    return key


def _unquote(token: str, value: str) -> str:
    """Read ``value`` as one shell-quoted word when it starts with a quote; else keep it as is."""
    if not value or value[0] not in _QUOTES:
        return value
    try:
        words = shlex.split(value)
    except ValueError:
        raise _fail(token, f"unbalanced quotes in the value {value!r}") from None
    if len(words) != 1 or value[-1] != value[0] or len(value) < 2:
        raise _fail(token, f"the quoted value {value!r} must be one quoted string")
    return words[0]


def parse_infer_param(token: str) -> tuple[str, str]:
    """Parse one ``--infer_params`` token into ``(key, value)``.

    Args:
        token: one command-line token, e.g. ``dtype=half``, ``name="a b"`` or ``"dtype half"``.

    Returns:
        The key (dotted keys such as ``a.b`` stay one flat string) and the value as a string.

    Raises:
        ValueError: the token is empty, has no key, has whitespace or quotes in the key, has
            unbalanced quotes, or is none of the accepted forms; the message names the token.
    """
    text = token.strip()
    if not text:
        raise _fail(token, "the token is empty")
    # A token that still carries its outer quotes (no shell stripped them, e.g. a list of
    # arguments built by a program) is read as the quoted text it holds.
    if text[0] in _QUOTES:
        try:
            words = shlex.split(text)
        except ValueError:
            raise _fail(token, "unbalanced quotes") from None
        if len(words) != 1 or text[-1] != text[0]:
            raise _fail(token, "expected one quoted KEY=VALUE or KEY VALUE")
        text = words[0].strip()
        if not text:
            raise _fail(token, "the token is empty")
        if text[0] in _QUOTES:
            raise _fail(token, "the token is quoted twice")
    if "=" in text:
        key, _, value = text.partition("=")
        return _check_key(token, key), _unquote(token, value)
    # Byzer-LLM's old form: the key, whitespace, then the value (which may itself be quoted).
    try:
        words = shlex.split(text)
    except ValueError:
        raise _fail(token, "unbalanced quotes") from None
    if len(words) == 1:
        raise _fail(token, "there is no '=' and no value after the key")
    if len(words) != 2:
        raise _fail(token, f"expected a key and one value, found {len(words)} words")
    key, value = words
    return _check_key(token, key), value


def parse_infer_params(tokens: Iterable[str]) -> dict[str, str]:
    """Parse ``--infer_params`` tokens into a dict; a key given twice keeps its last value.

    Args:
        tokens: the tokens as the shell delivered them, e.g.
            ``["max_model_len=4096", "name=hello world", "a=b=c", "model_type qwen"]``.

    Returns:
        ``{key: value}`` with string values, e.g. ``{"max_model_len": "4096", "a": "b=c", ...}``.

    Raises:
        ValueError: for the first token that cannot be parsed; the message names it and lists
            the accepted forms.
    """
    out: dict[str, str] = {}
    for token in tokens:
        key, value = parse_infer_param(token)
        out[key] = value
    return out


class InferParamsAction(argparse.Action):
    """argparse action for ``--infer_params KEY=VALUE ...`` (use with ``nargs='+'``).

    Repeating the option merges the dicts. A bad token becomes an argparse error, so the
    command exits with status 2 and a message naming the token.
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if values is None:
            tokens: list[str] = []
        elif isinstance(values, str):
            tokens = [values]
        else:
            tokens = [str(v) for v in values]
        try:
            parsed = parse_infer_params(tokens)
        except ValueError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        merged = dict(getattr(namespace, self.dest, None) or {})
        merged.update(parsed)
        setattr(namespace, self.dest, merged)
