"""The load generator and its arithmetic: synthetic prompts, issuing them at a concurrency and
rate, timing each stream, and the percentiles and summaries of a level.

Every mode is measured the same way, in this process: see :mod:`llmesh.bench` for what TTFT, ITL,
TPOT and the rates mean.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from llmesh.common.errors import InvalidArgument

# -- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolating linearly between ranks.

    The same definition as ``numpy.percentile``'s default (and ``vllm bench serve``'s).

    Args:
        values: the samples, in any order.
        q: the percentile, from 0 (the minimum) to 100 (the maximum).

    Returns:
        The percentile, or NaN when ``values`` is empty.

    Raises:
        ValueError: ``q`` is outside [0, 100].
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} is outside [0, 100]")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def tpot(e2e: float, ttft: float, output_tokens: int) -> float | None:
    """Time per output token after the first: ``(e2e - ttft) / (output_tokens - 1)``.

    Args:
        e2e: seconds from send to the end of the stream.
        ttft: seconds from send to the first token.
        output_tokens: tokens the request produced.

    Returns:
        Seconds per token, or None when the request produced fewer than two tokens.
    """
    if output_tokens < 2:
        return None
    return (e2e - ttft) / (output_tokens - 1)


@dataclasses.dataclass
class RequestResult:
    """What one streamed request measured (times in seconds from the send)."""

    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = dataclasses.field(default_factory=list)
    deltas: int = 0
    error: str = ""


class StreamClock:
    """Times one request: create it right before sending, call :meth:`delta` per token-carrying
    message, :meth:`finish` at the end of the stream."""

    def __init__(self) -> None:
        self.result = RequestResult()
        self._t0 = time.perf_counter()
        self._last: float | None = None

    def delta(self, tokens: int) -> None:
        """A message with ``tokens`` new tokens arrived now."""
        now = time.perf_counter()
        if self._last is None:
            self.result.ttft = now - self._t0
        else:
            self.result.itls.append(now - self._last)
        self._last = now
        self.result.deltas += 1
        self.result.output_tokens += tokens

    def finish(self, *, output_tokens: int | None = None, prompt_tokens: int = 0) -> RequestResult:
        """The stream ended; ``output_tokens`` from the final usage overrides the delta count."""
        result = self.result
        result.e2e = time.perf_counter() - self._t0
        if output_tokens is not None:
            result.output_tokens = output_tokens
        result.prompt_tokens = prompt_tokens
        result.ok = result.deltas > 0
        if not result.ok:
            result.error = "the stream ended without any token"
        return result

    def fail(self, exc: BaseException) -> RequestResult:
        """The request failed with ``exc``."""
        self.result.e2e = time.perf_counter() - self._t0
        self.result.ok = False
        self.result.error = f"{type(exc).__name__}: {exc}"[:300]
        return self.result


def _ms(values: Sequence[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if math.isnan(value) else 1000 * value


def _mean_ms(values: Sequence[float]) -> float | None:
    return 1000 * sum(values) / len(values) if values else None


def summarize(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    """Aggregate one level's requests into the reported numbers.

    Args:
        results: every request of the level, failed ones included.
        duration: wall seconds from the first send to the last completion.

    Returns:
        A flat dict: counts, ``output_tok_s``, ``requests_s``, and ``{ttft,tpot,itl,e2e}_
        {mean,p50,p99}_ms`` (None where there is no sample), ``tokens_per_delta``, and up to
        three distinct ``errors``.
    """
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    deltas = sum(r.deltas for r in ok)
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for r in ok if (t := tpot(r.e2e, r.ttft, r.output_tokens)) is not None],
        "itl": [gap for r in ok for gap in r.itls],
        "e2e": [r.e2e for r in ok],
    }
    summary: dict[str, Any] = {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "input_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / duration if duration > 0 else 0.0,
        "requests_s": len(ok) / duration if duration > 0 else 0.0,
        "tokens_per_delta": output_tokens / deltas if deltas else None,
    }
    for name, values in series.items():
        summary[f"{name}_mean_ms"] = _mean_ms(values)
        summary[f"{name}_p50_ms"] = _ms(values, 50)
        summary[f"{name}_p99_ms"] = _ms(values, 99)
    summary["errors"] = sorted({r.error for r in results if not r.ok})[:3]
    return summary


# -- load generation ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A synthetic prompt: ``text`` encodes to ``tokens`` tokens (without BOS) and ends in a
    newline; ``mesh_content`` is what the mesh sends so that its ``empty`` role mapping
    renders exactly ``text``."""

    text: str
    tokens: int

    @property
    def mesh_content(self) -> str:
        return self.text[:-1]


def synthetic_prompts(tokenizer: Any, count: int, input_len: int, seed: int) -> list[Prompt]:
    """``count`` prompts of ``input_len`` tokens made of random non-special tokens.

    Random ids are decoded and re-encoded until the text encodes to exactly ``input_len``
    tokens (BPE merges across the random pieces change the count); the few that do not settle
    within 50 rounds keep the closest length found.

    Args:
        tokenizer: the model's HuggingFace tokenizer.
        count: how many prompts.
        input_len: tokens per prompt, without the BOS the engines add.
        seed: the same seed gives the same prompts.
    """
    rng = random.Random(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    # Byte-level BPE has tokens that are parts of a UTF-8 character: alone they decode to U+FFFD,
    # which re-encodes as different tokens and keeps the length from settling.
    vocab = [
        i
        for i in range(len(tokenizer))
        if i not in special and (piece := tokenizer.decode([i])) and "\ufffd" not in piece
    ]
    if not vocab:
        raise InvalidArgument("the model's tokenizer has no ordinary tokens to build prompts from")

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    def as_prompt(ids: Sequence[int]) -> str:
        text = tokenizer.decode(list(ids), skip_special_tokens=True)
        # Leading whitespace is easily lost in a re-encode; a trailing newline is the shape
        # every mode can send verbatim (see Prompt.mesh_content).
        text = text.lstrip()
        return text if text.endswith("\n") else text + "\n"

    prompts: list[Prompt] = []
    for _ in range(count):
        ids = rng.choices(vocab, k=input_len)
        best: tuple[int, str] | None = None
        for _ in range(50):
            text = as_prompt(ids)
            got = encode(text)
            if best is None or abs(len(got) - input_len) < abs(best[0] - input_len):
                best = (len(got), text)
            if len(got) == input_len:
                break
            if len(got) > input_len:
                ids = got[: input_len - 1]
            else:
                ids = got[:-1] + rng.choices(vocab, k=input_len - len(got) + 1)
        assert best is not None
        prompts.append(Prompt(text=best[1], tokens=best[0]))
    return prompts


async def run_level(
    send: Callable[[Prompt, str], Any],
    prompts: Sequence[Prompt],
    *,
    concurrency: int,
    request_rate: float,
    seed: int,
    tag: str,
) -> tuple[list[RequestResult], float]:
    """Issue every prompt through ``send`` with at most ``concurrency`` in flight.

    Requests arrive at once (``request_rate`` infinite) or with exponential gaps of mean
    ``1 / request_rate`` seconds; either way the semaphore caps what is in flight.

    Args:
        send: ``await send(prompt, request_id)`` streams one request and returns its
            :class:`RequestResult` (it catches its own errors).
        prompts: one request per prompt.
        concurrency: streams in flight at most.
        request_rate: requests per second (Poisson), or ``math.inf``.
        seed: seeds the arrival gaps.
        tag: prefix of the request ids.

    Returns:
        The results in prompt order and the wall time from the first send to the last
        completion.
    """
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, prompt: Prompt) -> RequestResult:
        async with gate:
            return await send(prompt, f"{tag}-{i}")

    t0 = time.perf_counter()
    tasks = []
    for i, prompt in enumerate(prompts):
        if i and math.isfinite(request_rate):
            await asyncio.sleep(rng.expovariate(request_rate))
        tasks.append(asyncio.create_task(one(i, prompt)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - t0
