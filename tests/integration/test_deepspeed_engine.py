"""The deepspeed backend: deepspeed.init_inference around the test model, on the CPU.

The decode loop is the transformers engine's (tested at length in test_engines.py); these tests
check what DeepSpeed adds: the forward pass really runs through DeepSpeed's InferenceEngine,
greedy output equals the transformers backend's, infer_params are checked before loading, and
meta says what runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from llmesh.common.errors import InvalidArgument
from llmesh.inference_worker.engines import create_engine
from llmesh.inference_worker.engines.base import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.integration


def _config(path: Path, backend: str, **params: str) -> EngineConfig:
    return EngineConfig(model_name="ds", model_path=str(path), backend=backend, infer_params=params)


async def _text(engine: Engine, prompt: str, params: SamplingParams) -> tuple[str, str]:
    out, finish = [], ""
    async for chunk in engine.generate(f"r-{id(params)}-{prompt}", prompt, params):
        out.append(chunk.delta)
        finish = chunk.finish_reason or finish
    return "".join(out), finish


@pytest.fixture(scope="module")
async def ds_engine(test_model_dir: Path) -> AsyncIterator[Engine]:
    engine = create_engine(_config(test_model_dir, "deepspeed", max_concurrency="4"))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def test_forward_runs_through_deepspeed(ds_engine: Engine) -> None:
    from deepspeed.inference.engine import InferenceEngine

    assert isinstance(ds_engine._model, InferenceEngine)  # type: ignore[attr-defined]
    calls = 0
    module = ds_engine._model.module  # type: ignore[attr-defined]
    original = module.forward

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    module.forward = counting
    try:
        text, finish = await _text(ds_engine, "Hello", SamplingParams(temperature=0, max_tokens=5))
    finally:
        del module.forward
    assert finish in ("stop", "length")
    assert calls >= 1 and text


async def test_greedy_output_matches_transformers_backend(
    ds_engine: Engine, test_model_dir: Path
) -> None:
    plain = create_engine(_config(test_model_dir, "transformers"))
    await plain.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=24)
        for prompt in ("Hello", "The river is", "<|user|>\nWhat is a cat?\n<|assistant|>\n"):
            assert await _text(ds_engine, prompt, params) == await _text(plain, prompt, params)
    finally:
        await plain.stop()


async def test_concurrent_streams_and_abort(ds_engine: Engine) -> None:
    params = SamplingParams(temperature=0, max_tokens=40, extra={"ignore_eos": True})
    results = await asyncio.gather(*(_text(ds_engine, f"Hello {i}", params) for i in range(4)))
    assert all(finish == "length" for _, finish in results)

    long = SamplingParams(max_tokens=2000, extra={"ignore_eos": True})
    gen = ds_engine.generate("victim", "Hello", long)
    first = await gen.__anext__()
    assert first.delta or first.token_ids
    assert await ds_engine.abort("victim")
    finish = None
    async for chunk in gen:
        finish = chunk.finish_reason or finish
    assert finish == "aborted"
    assert ds_engine.active_requests() == set()


async def test_resumes_a_request_another_replica_started(ds_engine: Engine) -> None:
    """The transformers loop's resume (tested at length in test_transformers_resume.py)."""
    assert ds_engine.supports_resume
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=20, extra={"ignore_eos": True})

    async def ids(request_id: str, p: SamplingParams) -> tuple[list[int], str, int]:
        out: list[int] = []
        async for chunk in ds_engine.generate(request_id, "Hello", p):
            out.extend(chunk.token_ids)
        return out, chunk.finish_reason or "", chunk.completion_tokens

    full, finish, used = await ids("full", params)
    splits = (0, 1, 10, 19, 20)
    resumed = await asyncio.gather(
        *(ids(f"resume-{k}", replace(params, resume_token_ids=full[:k])) for k in splits)
    )
    for k, got in zip(splits, resumed, strict=True):
        assert got == (full[k:], finish, used), k


async def test_meta_names_deepspeed(ds_engine: Engine) -> None:
    meta = ds_engine.meta()
    assert meta.backend == "deepspeed"
    assert meta.support_stream and meta.support_chat_template
    assert meta.extra["deepspeed_version"]
    assert meta.extra["tensor_parallel_size"] == "1"
    assert meta.architectures == ["LlamaForCausalLM"]


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"tensor_parallel_size": "2"}, "tensor_parallel_size=2 is not supported"),
        ({"tensor_parallel_size": "zero"}, "tensor_parallel_size='zero' is not an integer"),
        ({"kernel_inject": "maybe"}, "kernel_inject='maybe' is not a boolean"),
        ({"tp": "1"}, "unknown infer_params key 'tp' for backend 'deepspeed'"),
    ],
)
def test_bad_infer_params_refused_before_loading(
    test_model_dir: Path, params: dict[str, str], match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        create_engine(_config(test_model_dir, "deepspeed", **params))


async def test_kernel_inject_on_cpu_is_refused(test_model_dir: Path) -> None:
    engine = create_engine(_config(test_model_dir, "deepspeed", kernel_inject="true"))
    with pytest.raises(InvalidArgument, match="need a GPU"):
        await engine.start()
