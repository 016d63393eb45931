"""The transformers engine continues a request another replica started, exactly.

For a request run to its end, the same request resumed with the first k of its token ids
(``SamplingParams.resume_token_ids``) must stream exactly the rest: the same ids, text that
completes what the caller had at the seam into the unfailed run's text, the same finish
reason and usage. Greedy and seeded sampling, repetition penalty, stop strings whose match
straddles the seam, structured output, multi-byte characters split across tokens at the seam,
the token budget and a LoRA adapter, at every split point.

What a caller has at the seam is the text the first replica pushed together with those k ids
(an engine push carries one token and the text it released); the tests record the pushes of
the unfailed run to know it, rather than trusting the code under test to say.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from llmesh.common.errors import InvalidArgument
from llmesh.inference_worker.engines import create_engine, transformers_engine
from llmesh.inference_worker.engines.auto import AutoEngine
from llmesh.inference_worker.engines.base import (
    Engine,
    EngineConfig,
    SamplingParams,
    StructuredOutput,
)
from llmesh.inference_worker.engines.deepspeed_engine import DeepSpeedEngine
from llmesh.inference_worker.engines.transformers_engine import TransformersEngine

from .test_transformers_batching import IGNORE_EOS, LONG_PROMPT, PERSON, STORY, Outcome

MAX_MODEL_LEN = 160
# Byte-level BPE spells the emoji and the CJK characters with several byte tokens each.
MULTIBYTE = "né 🌍 日本語"

Pushes = dict[str, list[tuple[str, list[int]]]]


@dataclass(frozen=True)
class Full:
    """An unfailed run and the text pushed with each of its tokens."""

    prompt: str
    params: SamplingParams
    out: Outcome
    pieces: list[str]

    def seam_text(self, k: int) -> str:
        """What a caller holding the first k token ids has received."""
        return "".join(self.pieces[:k])


async def run(engine: Engine, request_id: str, prompt: str, params: SamplingParams) -> Outcome:
    chunks = [c async for c in engine.generate(request_id, prompt, params)]
    last = chunks[-1]
    return Outcome(
        token_ids=[t for c in chunks for t in c.token_ids],
        text="".join(c.delta for c in chunks),
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
    )


@pytest.fixture(scope="module")
def pushes() -> Iterator[Pushes]:
    """Every push of every request, by request id: (text, token ids)."""
    log: Pushes = {}
    original = transformers_engine._Request.push

    def push(self: Any, text: str = "", token_ids: Any = (), **kwargs: Any) -> None:
        log.setdefault(self.request_id, []).append((text, list(token_ids)))
        original(self, text, token_ids, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers_engine._Request, "push", push)
        yield log


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def llm(test_model_dir: Path, pushes: Pushes) -> AsyncIterator[Engine]:
    engine = create_engine(
        EngineConfig(
            "tiny",
            str(test_model_dir),
            "transformers",
            {"max_concurrency": "8", "max_model_len": str(MAX_MODEL_LEN)},
        )
    )
    await engine.start()
    yield engine
    await engine.stop()


_count = 0


async def full_run(llm: Engine, pushes: Pushes, prompt: str, params: SamplingParams) -> Full:
    global _count
    _count += 1
    request_id = f"full-{_count}"
    out = await run(llm, request_id, prompt, params)
    log = pushes[request_id]
    # One token per push, each with the text released with it; none without a token.
    assert all(len(ids) == 1 for _, ids in log), log
    pieces = [text for text, _ in log]
    assert [ids[0] for _, ids in log] == out.token_ids
    assert "".join(pieces) == out.text
    return Full(prompt, params, out, pieces)


async def check_resumes(llm: Engine, full: Full, splits: list[int] | None = None) -> None:
    """Resume ``full`` at each split (default: every one, 0 to the end) and compare."""
    n = len(full.out.token_ids)
    ks = list(range(n + 1)) if splits is None else splits
    # Together, so resumed rows of different lengths share batches.
    results = await asyncio.gather(
        *(
            run(
                llm,
                f"resume-{_count}-{k}",
                full.prompt,
                replace(full.params, resume_token_ids=full.out.token_ids[:k]),
            )
            for k in ks
        )
    )
    for k, got in zip(ks, results, strict=True):
        assert got.token_ids == full.out.token_ids[k:], k
        assert full.seam_text(k) + got.text == full.out.text, k
        assert got.finish_reason == full.out.finish_reason, k
        assert got.completion_tokens == full.out.completion_tokens == n, k
        assert got.prompt_tokens == full.out.prompt_tokens, k
    assert not llm.active_requests()


async def test_greedy_resumes_at_every_split(llm: Engine, pushes: Pushes) -> None:
    params = SamplingParams(temperature=0, max_tokens=40, extra=IGNORE_EOS)
    full = await full_run(llm, pushes, STORY, params)
    assert full.out.finish_reason == "length"
    # k = 40: nothing remains, "length" at once.
    await check_resumes(llm, full)


async def test_seeded_sampling_resumes_at_every_split(llm: Engine, pushes: Pushes) -> None:
    params = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=40, max_tokens=40, seed=7, extra=IGNORE_EOS
    )
    full = await full_run(llm, pushes, STORY, params)
    greedy = await run(llm, "greedy", STORY, replace(params, temperature=0))
    assert full.out.token_ids != greedy.token_ids  # it does sample
    await check_resumes(llm, full)


async def test_seeded_runs_stay_reproducible(llm: Engine) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=2**64 - 1, extra=IGNORE_EOS)
    a, b = await asyncio.gather(run(llm, "a", STORY, params), run(llm, "b", STORY, params))
    c = await run(llm, "c", STORY, replace(params, seed=-5))
    assert a == b
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize("temperature", [0, 0.8])
async def test_repetition_penalty_counts_resumed_ids(
    llm: Engine, pushes: Pushes, temperature: float
) -> None:
    params = SamplingParams(
        temperature=temperature,
        repetition_penalty=1.3,
        max_tokens=36,
        seed=11,
        extra=IGNORE_EOS,
    )
    full = await full_run(llm, pushes, "The sky", params)
    plain = await run(llm, "no-penalty", "The sky", replace(params, repetition_penalty=1.0))
    assert full.out.token_ids != plain.token_ids  # the penalty matters here
    await check_resumes(llm, full)


async def test_resumed_after_eos_finishes_at_once(llm: Engine, pushes: Pushes) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llm.config.model_path, local_files_only=True)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What color is the sky?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    full = await full_run(llm, pushes, prompt, SamplingParams(temperature=0, max_tokens=80))
    assert full.out.finish_reason == "stop"
    assert full.out.token_ids[-1] == tokenizer.eos_token_id
    # Includes k = n - 1 (the next token is EOS) and k = n (EOS resumed: done at once).
    await check_resumes(llm, full)
    # A stop token with more ids after it cannot come from a run of this request.
    ids = full.out.token_ids
    params = replace(full.params, resume_token_ids=[*ids, *ids[:2]])
    with pytest.raises(InvalidArgument, match=rf"resume_token_ids\[{len(ids) - 1}\].*ends"):
        await run(llm, "after-eos", prompt, params)


async def test_stop_string_straddling_the_seam(llm: Engine, pushes: Pushes) -> None:
    """The match starts in resumed text and ends in new text; held-back text stays unsent."""
    reference = await run(llm, "ref", STORY, SamplingParams(temperature=0, max_tokens=40))
    words = reference.text.split()
    assert len(words) >= 8, reference.text
    stop = f" {words[4]} {words[5]}"  # several tokens
    params = SamplingParams(temperature=0, max_tokens=40, stop=[stop], extra=IGNORE_EOS)
    full = await full_run(llm, pushes, STORY, params)
    assert full.out.finish_reason == "stop_string"
    assert full.out.text == reference.text[: reference.text.index(stop)]
    assert holds_back(llm, full), "no split point has held-back text"
    await check_resumes(llm, full)


async def test_held_back_text_that_is_no_stop_string_comes_after_the_seam(
    llm: Engine, pushes: Pushes
) -> None:
    """A partial match the first replica held back and never sent: the resumed run sends it."""
    greedy = SamplingParams(temperature=0, max_tokens=30, extra=IGNORE_EOS)
    reference = await run(llm, "ref2", STORY, greedy)
    words = reference.text.split()
    never = f" {words[3]} {words[4]}\x00"  # its start appears; the whole never does
    full = await full_run(llm, pushes, STORY, replace(greedy, stop=[never]))
    assert full.out.finish_reason == "length"
    assert full.out.text == reference.text
    assert holds_back(llm, full), "no split point has held-back text"
    await check_resumes(llm, full)


def holds_back(llm: Engine, full: Full) -> bool:
    """Whether, at some split, the ids' text is longer than what was sent with them."""
    tokenizer = llm._tokenizer  # type: ignore[attr-defined]
    ids = full.out.token_ids
    return any(
        len(tokenizer.decode(ids[:k], skip_special_tokens=True)) > len(full.seam_text(k))
        for k in range(1, len(ids))
    )


async def test_multibyte_characters_split_at_the_seam(llm: Engine, pushes: Pushes) -> None:
    params = SamplingParams(temperature=0, structured_output=StructuredOutput(choice=[MULTIBYTE]))
    full = await full_run(llm, pushes, "Say it:", params)
    assert full.out.text == MULTIBYTE
    assert full.out.finish_reason == "stop"
    tokenizer = llm._tokenizer  # type: ignore[attr-defined]
    ids = full.out.token_ids
    # Some splits fall inside a character: the ids so far decode to a replacement character.
    inside = [k for k in range(len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd")]
    assert len(inside) >= 3, ids
    await check_resumes(llm, full)


async def test_json_schema_resumes_mid_object(llm: Engine, pushes: Pushes) -> None:
    so = StructuredOutput(json_schema=json.dumps(PERSON))
    # Seed 3 would sample a raw control character into the bounded string, which xgrammar
    # 0.2.8 allows there (mlc-ai/xgrammar#800): valid for the grammar, not for json.loads.
    params = SamplingParams(temperature=0.9, seed=8, max_tokens=60, structured_output=so)
    full = await full_run(llm, pushes, "Tell me about a person:", params)
    assert full.out.finish_reason == "stop"
    person = json.loads(full.out.text)
    assert set(person) == {"name", "age"}
    await check_resumes(llm, full)


async def test_resumed_ids_the_grammar_refuses_are_invalid(llm: Engine, pushes: Pushes) -> None:
    so = StructuredOutput(json_schema=json.dumps(PERSON))
    params = SamplingParams(temperature=0, max_tokens=40, structured_output=so)
    full = await full_run(llm, pushes, "Tell me about a person:", params)
    tokenizer = llm._tokenizer  # type: ignore[attr-defined]
    wrong = tokenizer.encode("hello", add_special_tokens=False)
    bad = [*full.out.token_ids[:3], *wrong]
    with pytest.raises(InvalidArgument, match=r"resume_token_ids\[3\].*grammar"):
        await run(llm, "bad-json", "Tell me about a person:", replace(params, resume_token_ids=bad))
    assert not llm.active_requests()


async def test_budget_counts_resumed_ids(llm: Engine, pushes: Pushes) -> None:
    # max_tokens: k = max_tokens finishes "length" at once (test_greedy...); more is refused.
    params = SamplingParams(temperature=0, max_tokens=10, extra=IGNORE_EOS)
    full = await full_run(llm, pushes, STORY, params)
    too_many = replace(params, resume_token_ids=[*full.out.token_ids, 5])
    with pytest.raises(InvalidArgument, match="exceed the request's budget of 10"):
        await run(llm, "too-many", STORY, too_many)
    # The context: prompt + resumed ids, and the run ends where the window does.
    params = SamplingParams(temperature=0, max_tokens=1000, extra=IGNORE_EOS)
    full = await full_run(llm, pushes, LONG_PROMPT, params)
    room = MAX_MODEL_LEN - full.out.prompt_tokens
    assert full.out.finish_reason == "length"
    assert len(full.out.token_ids) == room
    await check_resumes(llm, full, [0, 1, room // 2, room - 1, room])
    too_long = replace(params, resume_token_ids=[*full.out.token_ids, 5])
    with pytest.raises(InvalidArgument, match=f"leave {room} in the {MAX_MODEL_LEN}-token"):
        await run(llm, "too-long", LONG_PROMPT, too_long)


async def test_resumed_ids_out_of_vocabulary_are_invalid(llm: Engine) -> None:
    params = SamplingParams(temperature=0, max_tokens=10, resume_token_ids=[5, 10**6])
    with pytest.raises(InvalidArgument, match=r"resume_token_ids\[1\]=1000000 is out of range"):
        await run(llm, "oov", STORY, params)


async def test_abort_while_resumed(llm: Engine) -> None:
    params = SamplingParams(temperature=0, max_tokens=500, extra=IGNORE_EOS)
    ids = (await run(llm, "head", STORY, replace(params, max_tokens=8))).token_ids
    resumed = replace(params, resume_token_ids=ids)
    chunks = []
    async for chunk in llm.generate("resumed-abort", STORY, resumed):
        chunks.append(chunk)
        if len(chunks) == 2:
            assert await llm.abort("resumed-abort")
    assert chunks[-1].finish_reason == "aborted"
    assert chunks[-1].completion_tokens == 8 + sum(len(c.token_ids) for c in chunks)
    assert not llm.active_requests()


async def test_lora_adapter_request_resumes(
    llm: Engine, pushes: Pushes, test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter") / "a"
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(test_model_dir, dtype=torch.float32)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        r=8,
        lora_alpha=16,
    )
    get_peft_model(model, config).save_pretrained(out)
    await llm.add_lora("a", str(out))
    try:
        params = SamplingParams(
            temperature=1.0, top_k=50, seed=5, max_tokens=30, extra=IGNORE_EOS, lora="a"
        )
        full = await full_run(llm, pushes, STORY, params)
        base = await run(llm, "base", STORY, replace(params, lora=None))
        assert full.out.token_ids != base.token_ids  # the adapter is in effect
        await check_resumes(llm, full, [0, 1, 7, 15, 29, 30])
    finally:
        await llm.remove_lora("a")


def test_engines_that_resume(test_model_dir: Path, embedding_model_dir: Path) -> None:
    assert TransformersEngine.supports_resume
    # DeepSpeed decodes with the transformers loop.
    assert DeepSpeedEngine.supports_resume

    def make(config: EngineConfig) -> Engine:
        return create_engine(config)

    auto = AutoEngine(EngineConfig("m", str(test_model_dir), "auto"), engines=make)
    assert not auto.supports_resume  # not chosen yet
    auto._build("transformers", "test")
    assert auto.supports_resume
    embed = AutoEngine(EngineConfig("e", str(embedding_model_dir), "auto"), engines=make)
    assert embed.inner is not None and not embed.supports_resume
