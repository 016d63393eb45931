"""Engine adapters on real local models: the tiny Llama, all-MiniLM-L6-v2, a tiny cross-encoder."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from llmesh.common.errors import FailedPrecondition, InvalidArgument, Unimplemented
from llmesh.inference_worker.engines import BACKENDS, create_engine
from llmesh.inference_worker.engines.base import (
    Engine,
    EngineConfig,
    GenerationChunk,
    SamplingParams,
)

STORY = "Once upon a time"
# Sampling knobs for long runs: ignore_eos keeps the tiny model talking.
LONG = {"extra": {"ignore_eos": True}}


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(temperature=0, **kw)  # type: ignore[arg-type]


async def collect(
    engine: Engine, request_id: str, prompt: str, params: SamplingParams
) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(request_id, prompt, params)]


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(c.delta for c in chunks)


def ids_of(chunks: list[GenerationChunk]) -> list[int]:
    return [i for c in chunks for i in c.token_ids]


async def wait_idle(engine: Engine, timeout: float = 20) -> None:
    """Poll until the engine holds no request (bounded, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while engine.active_requests():
        assert loop.time() < deadline, f"requests still active: {engine.active_requests()}"
        await asyncio.sleep(0.01)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def llm(test_model_dir: Path) -> AsyncIterator[Engine]:
    engine = create_engine(
        EngineConfig(
            model_name="tiny",
            model_path=str(test_model_dir),
            backend="transformers",
            infer_params={"max_concurrency": "4"},
        )
    )
    await engine.start()
    yield engine
    await engine.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def embedder(embedding_model_dir: Path) -> AsyncIterator[Engine]:
    engine = create_engine(EngineConfig("minilm", str(embedding_model_dir), "embedding"))
    await engine.start()
    yield engine
    await engine.stop()


@pytest.fixture(scope="module")
def chat_prompt(test_model_dir: Path) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(test_model_dir, local_files_only=True)
    messages = [{"role": "user", "content": "What color is the sky?"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# -- factory ----------------------------------------------------------------------------------


def test_unknown_backend_lists_valid_ones() -> None:
    assert BACKENDS == ("transformers", "embedding", "rerank", "vllm", "deepspeed", "auto")
    with pytest.raises(InvalidArgument, match="unknown backend 'nope'") as err:
        create_engine(EngineConfig("m", "/nowhere", "nope"))
    assert "transformers, embedding, rerank, vllm" in str(err.value)


def test_importing_engines_does_not_import_torch() -> None:
    code = (
        "import sys, llmesh.inference_worker.engines as e; "
        "assert e.BACKENDS; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_unknown_infer_param_is_named(test_model_dir: Path) -> None:
    with pytest.raises(InvalidArgument, match="'max_batch'") as err:
        create_engine(EngineConfig("m", str(test_model_dir), "transformers", {"max_batch": "3"}))
    assert "max_concurrency" in str(err.value)  # the accepted keys are listed
    with pytest.raises(InvalidArgument, match="max_concurrency"):
        create_engine(
            EngineConfig("m", str(test_model_dir), "transformers", {"max_concurrency": "x"})
        )
    with pytest.raises(InvalidArgument, match="'pooling'"):
        create_engine(EngineConfig("m", str(test_model_dir), "embedding", {"pooling": "cls"}))


async def test_unusable_model_dirs_fail_clearly(tmp_path: Path, embedding_model_dir: Path) -> None:
    missing = create_engine(EngineConfig("m", str(tmp_path / "absent"), "transformers"))
    with pytest.raises(InvalidArgument, match="not a directory"):
        await missing.start()
    encoder = create_engine(EngineConfig("m", str(embedding_model_dir), "transformers"))
    with pytest.raises(FailedPrecondition, match="not a causal language model"):
        await encoder.start()


# -- transformers engine ----------------------------------------------------------------------


async def test_meta_tokenize_and_chat_template(llm: Engine, chat_prompt: str) -> None:
    meta = llm.meta()
    assert meta.backend == "transformers"
    assert meta.architectures == ["LlamaForCausalLM"]
    assert meta.max_model_len == 2048
    assert meta.support_stream and meta.support_chat_template
    assert meta.max_concurrency == llm.max_concurrency == 4
    ids, tokens = await llm.tokenize("The sky", add_special_tokens=True)
    assert tokens[0] == "<s>" and len(ids) == len(tokens)
    rendered = await llm.apply_chat_template(
        [{"role": "user", "content": "What color is the sky?"}], add_generation_prompt=True
    )
    assert rendered == chat_prompt
    with pytest.raises(InvalidArgument, match="chat template"):
        await llm.apply_chat_template(
            [{"role": "robot", "content": "x"}], add_generation_prompt=True
        )


async def test_greedy_stream_matches_transformers_generate(
    llm: Engine, test_model_dir: Path, chat_prompt: str
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chunks = await collect(llm, "greedy", STORY, greedy(max_tokens=24))
    assert len(chunks) > 2
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length")
    assert last.completion_tokens == len(ids_of(chunks))
    # The reference: transformers' own greedy decoding of the same prompt.
    tokenizer = AutoTokenizer.from_pretrained(test_model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(test_model_dir, local_files_only=True)
    prompt_ids = tokenizer(STORY, return_tensors="pt").input_ids
    assert last.prompt_tokens == prompt_ids.shape[1]
    with torch.inference_mode():
        ref = model.generate(prompt_ids, max_new_tokens=24, do_sample=False)[
            0, prompt_ids.shape[1] :
        ]
    assert ids_of(chunks) == ref.tolist()
    assert text_of(chunks) == tokenizer.decode(ref, skip_special_tokens=True)
    # A chat prompt answers and ends at EOS.
    answer = await collect(llm, "chat", chat_prompt, greedy(max_tokens=40))
    assert answer[-1].finish_reason == "stop"
    assert text_of(answer).strip()


async def test_slow_consumer_gets_merged_deltas(llm: Engine) -> None:
    params = greedy(max_tokens=40, **LONG)
    fast = await collect(llm, "fast", STORY, params)
    slow: list[GenerationChunk] = []
    async for chunk in llm.generate("slow", STORY, params):
        slow.append(chunk)
        await asyncio.sleep(0.2)  # the decoder runs ahead meanwhile
    assert slow[-1].finish_reason == fast[-1].finish_reason == "length"
    assert slow[-1].completion_tokens == 40
    assert len(slow) < 40
    assert text_of(slow) == text_of(fast)
    assert ids_of(slow) == ids_of(fast)


async def test_seeded_sampling_is_reproducible(llm: Engine) -> None:
    def sampled(seed: int) -> SamplingParams:
        return SamplingParams(
            temperature=1.0, top_p=0.95, top_k=50, max_tokens=20, seed=seed, **LONG
        )

    a = await collect(llm, "s1", STORY, sampled(1))
    b = await collect(llm, "s2", STORY, sampled(1))
    c = await collect(llm, "s3", STORY, sampled(2))
    assert ids_of(a) == ids_of(b) and text_of(a) == text_of(b)
    assert ids_of(a) != ids_of(c)


async def test_stop_string_truncates_output(llm: Engine) -> None:
    reference = text_of(await collect(llm, "ref", STORY, greedy(max_tokens=20, **LONG)))
    words = reference.split()
    assert len(words) >= 4, reference
    stop = f" {words[2]}"  # a word in the middle, with its leading space
    cut = reference.index(stop)
    chunks = await collect(llm, "stop", STORY, greedy(max_tokens=20, stop=[stop], **LONG))
    assert chunks[-1].finish_reason == "stop_string"
    assert text_of(chunks) == reference[:cut]
    # A multi-token stop string whose first characters appear earlier does not cut early,
    # and a stop string that never appears changes nothing.
    two = f"{words[1]} {words[2]}"
    chunks = await collect(llm, "stop2", STORY, greedy(max_tokens=20, stop=["zzz", two], **LONG))
    assert text_of(chunks) == reference[: reference.index(two)]
    chunks = await collect(llm, "stop3", STORY, greedy(max_tokens=20, stop=["qqq"], **LONG))
    assert chunks[-1].finish_reason == "length" and text_of(chunks) == reference


async def test_stop_token_ids_end_with_stop(llm: Engine) -> None:
    reference = ids_of(await collect(llm, "ref-ids", STORY, greedy(max_tokens=12, **LONG)))
    stop_at = next(i for i, t in enumerate(reference) if i >= 2 and t not in reference[:i])
    chunks = await collect(
        llm, "stop-ids", STORY, greedy(max_tokens=12, stop_token_ids=[reference[stop_at]], **LONG)
    )
    assert chunks[-1].finish_reason == "stop"
    assert ids_of(chunks) == reference[: stop_at + 1]
    assert chunks[-1].completion_tokens == stop_at + 1


async def test_max_tokens_ends_with_length(llm: Engine) -> None:
    chunks = await collect(llm, "len", STORY, greedy(max_tokens=3, **LONG))
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 3 == len(ids_of(chunks))


async def test_context_end_caps_max_tokens(test_model_dir: Path) -> None:
    engine = create_engine(
        EngineConfig("short", str(test_model_dir), "transformers", {"max_model_len": "24"})
    )
    await engine.start()
    try:
        assert engine.meta().max_model_len == 24
        n = await engine.count_prompt_tokens(STORY)
        chunks = await collect(engine, "cap", STORY, greedy(max_tokens=100, **LONG))
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].completion_tokens == 24 - n
        with pytest.raises(InvalidArgument, match=r"prompt has \d+ tokens .* shorten it"):
            await collect(engine, "long", "the sky is blue " * 10, greedy())
    finally:
        await engine.stop()


async def test_over_long_prompt_is_refused(llm: Engine) -> None:
    with pytest.raises(InvalidArgument, match=r"prompt has \d+ tokens but model tiny accepts"):
        await collect(llm, "long", "the sky is blue and grass is green " * 400, greedy())
    assert not llm.active_requests()


@pytest.mark.parametrize(
    ("field", "params"),
    [
        ("temperature", SamplingParams(temperature=-0.5)),
        ("temperature", SamplingParams(temperature=float("nan"))),
        ("top_p", SamplingParams(top_p=0)),
        ("top_p", SamplingParams(top_p=1.5)),
        ("top_k", SamplingParams(top_k=-1)),
        ("max_tokens", SamplingParams(max_tokens=0)),
        ("repetition_penalty", SamplingParams(repetition_penalty=0)),
        ("stop_token_ids", SamplingParams(stop_token_ids=[10**6])),
    ],
)
async def test_bad_sampling_params_are_refused(
    llm: Engine, field: str, params: SamplingParams
) -> None:
    with pytest.raises(InvalidArgument, match=field):
        await collect(llm, "bad", STORY, params)
    assert not llm.active_requests()


async def test_repetition_penalty_and_sampling_knobs_run(llm: Engine) -> None:
    plain = await collect(llm, "rp0", STORY, greedy(max_tokens=30, **LONG))
    penalized = await collect(
        llm, "rp1", STORY, greedy(max_tokens=30, repetition_penalty=1.5, **LONG)
    )
    assert penalized[-1].completion_tokens == 30
    # The tiny model loops; a strong penalty must change what it says.
    assert ids_of(plain) != ids_of(penalized)
    top1 = await collect(llm, "k1", STORY, SamplingParams(temperature=1, top_k=1, max_tokens=10))
    assert ids_of(top1) == ids_of(plain)[: len(ids_of(top1))]  # top_k=1 is greedy


async def test_abort_mid_stream(llm: Engine) -> None:
    chunks: list[GenerationChunk] = []
    async for chunk in llm.generate("abort-me", STORY, greedy(max_tokens=400, **LONG)):
        chunks.append(chunk)
        if len(chunks) == 1:
            assert "abort-me" in llm.active_requests()
            assert await llm.abort("abort-me") is True
    assert chunks[-1].finish_reason == "aborted"
    assert chunks[-1].completion_tokens < 400
    assert llm.active_requests() == set()
    assert await llm.abort("abort-me") is False


async def test_aclose_mid_stream_frees_request(llm: Engine) -> None:
    stream = llm.generate("closed", STORY, greedy(max_tokens=400, **LONG))
    first = await anext(stream)
    assert first.finish_reason is None
    await stream.aclose()
    await wait_idle(llm)
    # The id is free again.
    again = await collect(llm, "closed", STORY, greedy(max_tokens=2))
    assert again[-1].finish_reason in ("length", "stop")


async def test_cancelled_consumer_propagates_and_frees(llm: Engine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in llm.generate("cancelled", STORY, greedy(max_tokens=400, **LONG)):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    await wait_idle(llm)


async def test_duplicate_active_request_id_is_refused(llm: Engine) -> None:
    stream = llm.generate("dup", STORY, greedy(max_tokens=400, **LONG))
    await anext(stream)
    try:
        with pytest.raises(InvalidArgument, match="already generating"):
            await collect(llm, "dup", STORY, greedy(max_tokens=2))
    finally:
        await stream.aclose()
    await wait_idle(llm)


async def test_four_concurrent_streams_complete(llm: Engine) -> None:
    reference = await collect(llm, "solo", STORY, greedy(max_tokens=16, **LONG))
    results = await asyncio.gather(
        collect(llm, "c0", STORY, greedy(max_tokens=16, **LONG)),
        collect(llm, "c1", STORY, greedy(max_tokens=16, **LONG)),
        collect(llm, "c2", "The sky", SamplingParams(max_tokens=16, seed=7, **LONG)),
        collect(llm, "c3", "Q: What is a model?\nA:", greedy(max_tokens=16)),
    )
    for chunks in results:
        assert chunks[-1].finish_reason in ("stop", "length")
    assert ids_of(results[0]) == ids_of(results[1]) == ids_of(reference)
    assert llm.active_requests() == set()


async def test_abort_some_of_many_leaves_no_state(llm: Engine) -> None:
    # More streams than batch rows (max_concurrency 4), so some aborts hit queued requests.
    ids = [f"many-{i}" for i in range(12)]
    to_abort = ids[::4]
    tasks = {
        rid: asyncio.create_task(
            collect(llm, rid, STORY, greedy(max_tokens=300 if rid in to_abort else 8, **LONG))
        )
        for rid in ids
    }
    for rid in to_abort:
        while not await llm.abort(rid):  # not registered yet: it is still tokenizing
            assert not tasks[rid].done()
            await asyncio.sleep(0.001)
    results = {rid: await task for rid, task in tasks.items()}
    for rid, chunks in results.items():
        assert chunks[-1].finish_reason == ("aborted" if rid in to_abort else "length"), rid
    assert llm.active_requests() == set()
    again = await collect(llm, "many-0", STORY, greedy(max_tokens=2))
    assert again[-1].finish_reason in ("stop", "length")


async def test_stop_aborts_in_flight_and_refuses_new(test_model_dir: Path) -> None:
    engine = create_engine(EngineConfig("stopper", str(test_model_dir), "transformers"))
    await engine.start()
    stream = engine.generate("inflight", STORY, greedy(max_tokens=400, **LONG))
    await anext(stream)
    await engine.stop()
    rest = [chunk async for chunk in stream]
    assert rest[-1].finish_reason == "aborted"
    assert engine.active_requests() == set()
    with pytest.raises(FailedPrecondition, match="not loaded"):
        await collect(engine, "late", STORY, greedy())


def test_incremental_detokenizer_never_splits_utf8(test_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from llmesh.inference_worker.engines.transformers_engine import _Detokenizer

    tokenizer = AutoTokenizer.from_pretrained(test_model_dir, local_files_only=True)
    text = " fox 😀 jumps 日本 over"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # the emoji and CJK split into byte tokens
    detok = _Detokenizer(tokenizer, tokenizer.encode("The quick brown"))
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


# -- embedding and rerank ---------------------------------------------------------------------


async def test_embeddings_rank_by_meaning(embedder: Engine) -> None:
    import numpy as np

    meta = embedder.meta()
    assert meta.backend == "embedding" and meta.embedding_dim == 384
    assert meta.max_model_len == 256 and meta.architectures == ["BertModel"]
    vectors = np.array(
        await embedder.embed(
            [
                "A man is eating food.",
                "A man is eating a piece of bread.",
                "A man is riding a horse.",
            ],
            normalize=True,
        )
    )
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    sims = vectors @ vectors[0]
    assert sims[1] > sims[2]
    # This model ends in a Normalize module, so normalize=False changes nothing here.
    raw = np.array(await embedder.embed(["A man is eating food."], normalize=False))
    assert raw.shape == (1, 384) and np.allclose(raw[0], vectors[0], atol=1e-5)
    with pytest.raises(InvalidArgument, match="empty"):
        await embedder.embed([], normalize=True)
    ids, tokens = await embedder.tokenize("hello world", add_special_tokens=True)
    assert tokens == ["[CLS]", "hello", "world", "[SEP]"] and len(ids) == 4
    with pytest.raises(Unimplemented):
        await collect(embedder, "x", "hi", SamplingParams())


async def test_embedding_model_reranks_by_cosine(embedder: Engine) -> None:
    docs = [
        "The stock market fell sharply on Monday.",
        "Paris is the capital and largest city of France.",
        "Bananas are rich in potassium.",
    ]
    scores, method = await embedder.rerank("What is the capital of France?", docs)
    assert method == "bi-encoder-cosine"
    assert len(scores) == 3 and max(range(3), key=scores.__getitem__) == 1


async def test_rerank_backend_falls_back_to_bi_encoder(embedding_model_dir: Path) -> None:
    engine = create_engine(EngineConfig("minilm-rerank", str(embedding_model_dir), "rerank"))
    await engine.start()
    try:
        scores, method = await engine.rerank(
            "A man is eating food.",
            ["A man is riding a horse.", "A man is eating a piece of bread.", "It is raining."],
        )
        assert method == "bi-encoder-cosine"
        assert max(range(3), key=scores.__getitem__) == 1
        assert engine.meta().backend == "rerank"
        with pytest.raises(InvalidArgument, match="empty"):
            await engine.rerank("q", [])
    finally:
        await engine.stop()


async def test_rerank_uses_cross_encoder_for_sequence_classifiers(
    tmp_path: Path, embedding_model_dir: Path
) -> None:
    # A tiny random BERT classifier with MiniLM's tokenizer: exercises the cross-encoder path
    # (its scores are meaningless, so only shape and method are checked).
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(embedding_model_dir / name, tmp_path / name)
    engine = create_engine(EngineConfig("tiny-ce", str(tmp_path), "rerank"))
    await engine.start()
    try:
        scores, method = await engine.rerank("query", ["one", "two", "three"])
        assert method == "cross-encoder" and len(scores) == 3
        assert all(0.0 <= s <= 1.0 for s in scores)  # sigmoid of a single logit
        meta = engine.meta()
        assert meta.architectures == ["BertForSequenceClassification"]
        assert meta.extra["rerank_method"] == "cross-encoder"
        with pytest.raises(Unimplemented, match="cross-encoder"):
            await engine.embed(["x"], normalize=True)
    finally:
        await engine.stop()
