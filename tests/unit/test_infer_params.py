"""``--infer_params`` parsing: the accepted forms, tokens as the shell delivers them, and errors."""

from __future__ import annotations

import argparse

import pytest

from llmesh.infer_params import (
    ACCEPTED_FORMS,
    InferParamsAction,
    parse_infer_param,
    parse_infer_params,
)


def test_tokens_as_the_shell_delivers_them() -> None:
    # `--infer_params max_model_len=4096 dtype=half name="hello world" a=b=c "model_type qwen"`
    tokens = ["max_model_len=4096", "dtype=half", "name=hello world", "a=b=c", "model_type qwen"]
    assert parse_infer_params(tokens) == {
        "max_model_len": "4096",
        "dtype": "half",
        "name": "hello world",
        "a": "b=c",
        "model_type": "qwen",
    }


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("KEY=VALUE", ("KEY", "VALUE")),
        ('KEY="VALUE with spaces"', ("KEY", "VALUE with spaces")),
        ("KEY='v'", ("KEY", "v")),
        ("KEY='it''s'", ("KEY", "its")),  # adjacent shell quotes join, as in a shell
        ('KEY="say \\"hi\\""', ("KEY", 'say "hi"')),
        ("a=b=c", ("a", "b=c")),
        ("url=http://h:1/p?x=1&y=2", ("url", "http://h:1/p?x=1&y=2")),
        ("a.b=c", ("a.b", "c")),
        ("saas.api_key=sk-123", ("saas.api_key", "sk-123")),
        ("key=", ("key", "")),
        ('key=""', ("key", "")),
        ("prompt=don't stop", ("prompt", "don't stop")),  # apostrophe inside a value is literal
        ('stop=["</s>", "<|im_end|>"]', ("stop", '["</s>", "<|im_end|>"]')),
        ("  dtype=half  ", ("dtype", "half")),
        ("value=  padded", ("value", "  padded")),
        # Byzer-LLM's old single-token form.
        ("model_type qwen", ("model_type", "qwen")),
        ("max_model_len   4096", ("max_model_len", "4096")),
        ('name "hello world"', ("name", "hello world")),
        ("name 'hello world'", ("name", "hello world")),
        # Tokens that still carry their outer quotes (no shell removed them).
        ('"dtype=half"', ("dtype", "half")),
        ("'name=hello world'", ("name", "hello world")),
        ('"model_type qwen"', ("model_type", "qwen")),
        ("'name=\"a b\"'", ("name", "a b")),
    ],
)
def test_accepted_forms(token: str, expected: tuple[str, str]) -> None:
    assert parse_infer_param(token) == expected


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("=value", "key before '=' is empty"),
        ("=", "key before '=' is empty"),
        ("my key=value", "contains whitespace"),
        ("dtype =half", "contains whitespace"),
        ('a"b=c', "contains a quote"),
        ('name="unbalanced', "unbalanced quotes"),
        ("name='unbalanced", "unbalanced quotes"),
        ('name="a"b', "one quoted string"),
        ('name="a" "b"', "one quoted string"),
        ('"dtype=half', "unbalanced quotes"),
        ("'dtype=half", "unbalanced quotes"),
        ("dtype", "no '=' and no value"),
        ("a b c", "found 3 words"),
        ('name "unbalanced', "unbalanced quotes"),
        ('"a" "b"', "one quoted"),
        ('""', "empty"),
    ],
)
def test_rejected_tokens_name_the_token_and_the_forms(token: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_infer_param(token)
    message = str(info.value)
    assert repr(token) in message
    assert reason in message
    assert ACCEPTED_FORMS in message


def test_first_bad_token_is_reported() -> None:
    with pytest.raises(ValueError, match="'oops'"):
        parse_infer_params(["a=1", "oops", "b c d"])


def test_last_value_wins_for_a_repeated_key() -> None:
    assert parse_infer_params(["a=1", "a 2"]) == {"a": "2"}


def test_empty_token_list() -> None:
    assert parse_infer_params([]) == {}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t", exit_on_error=False)
    parser.add_argument("--infer_params", nargs="+", action=InferParamsAction, default={})
    parser.add_argument("--other")
    return parser


def test_action_builds_a_dict() -> None:
    args = _parser().parse_args(
        ["--infer_params", "dtype=half", "name=hello world", "--other", "x"]
    )
    assert args.infer_params == {"dtype": "half", "name": "hello world"}
    assert args.other == "x"


def test_action_merges_repeated_options() -> None:
    args = _parser().parse_args(["--infer_params", "a=1", "b=2", "--infer_params", "b=3", "c 4"])
    assert args.infer_params == {"a": "1", "b": "3", "c": "4"}


def test_action_default_is_an_empty_dict() -> None:
    assert _parser().parse_args([]).infer_params == {}


def test_action_error_exits_2_and_names_the_token(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="t")
    parser.add_argument("--infer_params", nargs="+", action=InferParamsAction)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--infer_params", "ok=1", "bad token=x"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --infer_params" in err
    assert "'bad token=x'" in err
