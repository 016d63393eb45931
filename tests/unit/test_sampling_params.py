"""Sampling-parameter ranges, checked once for every generative engine."""

from __future__ import annotations

import math

import pytest

from llmesh.common.errors import InvalidArgument
from llmesh.inference_worker.engines.base import SamplingParams, check_sampling_params


def test_defaults_and_edges_pass() -> None:
    assert check_sampling_params(SamplingParams(), vocab_size=10) is False
    edges = SamplingParams(
        temperature=0,
        top_p=1,
        top_k=0,
        max_tokens=1,
        repetition_penalty=0.5,
        stop_token_ids=[0, 9],
        seed=2**64 - 1,
        extra={"ignore_eos": True},
    )
    assert check_sampling_params(edges, vocab_size=10) is True


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(temperature=-0.5), "temperature=-0.5 is out of range; use a finite value"),
        (SamplingParams(temperature=math.inf), "temperature=inf is out of range"),
        (SamplingParams(temperature=math.nan), "temperature=nan is out of range"),
        (SamplingParams(top_p=0), "top_p=0 is out of range; it must be in (0, 1]"),
        (SamplingParams(top_p=1.5), "top_p=1.5 is out of range"),
        (SamplingParams(top_k=-1), "top_k=-1 is out of range; use 0 (disabled)"),
        (SamplingParams(max_tokens=0), "max_tokens=0 is out of range; it must be >= 1"),
        (SamplingParams(repetition_penalty=0), "repetition_penalty=0 is out of range"),
        (SamplingParams(repetition_penalty=math.nan), "repetition_penalty=nan is out of range"),
        (SamplingParams(stop_token_ids=[10]), "stop_token_ids=10 is out of range; token ids are"),
        (SamplingParams(stop_token_ids=[-1]), "stop_token_ids=-1 is out of range"),
        (SamplingParams(seed=2**64), "seed=18446744073709551616 is out of range; it must fit"),
        (SamplingParams(extra={"ignore_eos": "yes"}), "extra.ignore_eos='yes' is out of range"),
    ],
)
def test_out_of_range_is_named(params: SamplingParams, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_sampling_params(params, vocab_size=10)
    assert message in str(err.value)
