"""The ``transformers`` backend: a HuggingFace causal LM with our own streaming decode loop.

One step loop per engine (a thread) advances every active request: each step prefills the
requests that arrived (one forward pass each), then runs one batched forward pass for all
decoding requests, one new token per row, and samples each row with that request's own
sampler, seed and grammar. Rows keep their keys and values in a :class:`BatchKVCache`
(``engines/batch_cache.py``), where sequences of different lengths share a batch through an
attention mask and per-row position ids, and join or leave between steps. A row's logits equal
those of the request decoded alone up to float rounding in the batched matrix products (about
1e-5 on the test model), so greedy and seeded requests give the same tokens unless two
candidates tie within that rounding. At most ``max_concurrency`` requests decode at once; more
wait for a free row. The asyncio side reads a per-request collector, so a slow consumer gets
merged deltas instead of an ever-growing queue.

transformers' own continuous batching (``generate_batch`` with paged attention) measured
106 tok/s at 32 streams on the 2-core CPU this loop was built on, below the thread-per-request
loop it replaced; this loop served over 5,000 tok/s there (tiny test model, through the mesh).
It has not been compared with ``generate_batch`` on a GPU.

infer_params: the ``transformers`` table in :mod:`llmesh.common.backends` (``max_concurrency``,
``max_model_len``, ``dtype``, ``device``, ``torch_threads``, ``max_loras``, ``max_lora_rank``),
which the control plane checks at deploy; this engine reads the typed values from it.
``torch_threads`` is process-wide in torch.

LoRA adapters (``add_lora`` / ``remove_lora``) load into the running model without merging:
each targeted linear layer is wrapped once (``engines/lora.py``) and adds the low-rank update
of the adapter the current forward pass runs for (``SamplingParams.lora``); requests without
one get exactly the base model's output. A forward pass carries one adapter, so each step runs
one batched pass per adapter in use (the base model counts as one).

Structured output (``SamplingParams.structured_output``) is enforced while decoding with
xgrammar: every step masks the logits to the tokens the grammar allows next, so the output is
valid by construction, whatever the model. EOS is allowed only where the grammar is complete, and
the request finishes with "stop" as soon as the grammar is complete and nothing but EOS could
follow (``ignore_eos`` does not make it run on). JSON is produced compactly (no free
whitespace, separators ``", "`` and ``": "``), which keeps weak models from looping on
newlines. When ``max_tokens`` (or the context) runs out first the request finishes with
"length" and the text is a valid *prefix* only, e.g. JSON cut off mid-string: callers must treat
"length" as incomplete output. Compiled grammars are cached per engine.

Resume (``SamplingParams.resume_token_ids``, mid-stream failover): a request another replica
started continues here exactly. The resumed ids are prefilled with the prompt and replayed
through the detokenizer, stop-string matcher and grammar matcher, so every stage is where the
original's was (:meth:`_Decoding.resume`), and seeded sampling draws each token's random
numbers from a generator seeded with a hash of (seed, output position), so position k gets
the same numbers on any replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import inspect
import json
import logging
import os
import re
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmesh.common.backends import DEFAULT_MAX_CONCURRENCY, check_infer_params
from llmesh.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from llmesh.inference_worker.engines.base import (
    Engine,
    EngineConfig,
    GenerationChunk,
    ModelMeta,
    SamplingParams,
    StructuredOutput,
    check_sampling_params,
    load_model,
    prompt_room,
)

if TYPE_CHECKING:
    import torch

    from llmesh.inference_worker.engines.batch_cache import BatchKVCache

log = logging.getLogger(__name__)

# LoRA defaults: adapters cost only their own weights here (nothing is reserved up front).
_DEFAULT_MAX_LORAS = 4
_DEFAULT_MAX_LORA_RANK = 64
# Architectures that AutoModelForCausalLM can serve; anything else (BertModel, ...ForSequence
# Classification) is refused at start with a hint instead of loading with random heads.
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
# Temperatures below this decode greedily: dividing logits by ~0 overflows to inf/NaN.
_GREEDY_EPS = 1e-5
# How many prompt tokens seed the incremental detokenizer, so that the first generated token
# decodes with its leading space (SentencePiece drops it at the start of a decode).
_DETOK_CONTEXT = 6
# Compiled grammars kept per engine (least recently used dropped first); compiling a JSON schema
# against a large vocabulary takes from milliseconds to seconds, and clients resend the same one.
_GRAMMAR_CACHE_SIZE = 32
# Seeds are 64-bit (negative ones too, as GenerationParams allows); hashed as unsigned.
_U64 = 2**64 - 1
# xgrammar errors start with "[hh:mm:ss] /path/file.cc:123: " and sometimes a failed-check
# expression; callers need only the sentence after it.
_XGR_NOISE = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*(Check failed:.*? is false:\s*)?")


def resolve_device(params: Mapping[str, Any]) -> str:
    """The torch device named by the ``device`` infer_param (``cpu`` when unset).

    Args:
        params: infer_params as :func:`llmesh.common.backends.check_infer_params` returns them
            (``device`` already one of cpu, gpu, cuda, cuda:N, auto, in lower case).

    Raises:
        FailedPrecondition: a GPU asked for on a worker where torch sees none.
    """
    import torch

    raw = params.get("device", "cpu")
    if raw == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if raw == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise FailedPrecondition(
            f"infer_params device={raw!r} asks for a GPU but torch sees none on this worker; "
            "use device=cpu, or device=auto to take a GPU only where there is one"
        )
    return "cuda" if raw == "gpu" else str(raw)


def check_model_dir(config: EngineConfig) -> str:
    """The model directory as an absolute path; a clear error when it is not a model."""
    path = os.path.abspath(os.path.expanduser(config.model_path))
    if not config.model_path:
        raise InvalidArgument(f"model {config.model_name} has an empty model_path")
    if not os.path.isdir(path):
        raise InvalidArgument(
            f"model_path {config.model_path!r} of model {config.model_name} is not a directory "
            "on this worker; models load from local HuggingFace-layout directories"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FailedPrecondition(
            f"model_path {config.model_path!r} of model {config.model_name} has no config.json; "
            "point it at a HuggingFace-layout model directory"
        )
    return path


# ---------------------------------------------------------------------------------------------
# Per-request state shared by the step loop and the asyncio generator


@dataclass
class _Request:
    """A collector: the step loop appends, the async generator takes everything at once."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    # The request's whole budget of generated tokens, resumed ones included.
    max_new_tokens: int
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    # An xgrammar CompiledGrammar when the request has structured output; the step loop makes
    # the request's own matcher from it.
    grammar: Any = None
    # The request's lora.LoraAdapter (None: base model), held for the request's lifetime so that
    # removing the adapter meanwhile does not change what this request decodes.
    lora: Any = None
    # SamplingParams.resume_token_ids: generated by another replica, counted in
    # completion_tokens (which starts at their number) but never pushed again.
    resume_ids: list[int] = field(default_factory=list)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    aborted: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: BaseException | None = None
    # True while a wakeup is scheduled and not yet consumed: one call_soon_threadsafe per
    # batch of tokens, however fast the decoder runs ahead of the consumer.
    notified: bool = False

    def push(
        self,
        text: str = "",
        token_ids: Sequence[int] = (),
        *,
        finish_reason: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Called from the step loop."""
        with self.lock:
            if text:
                self.text.append(text)
            self.token_ids.extend(token_ids)
            self.completion_tokens += len(token_ids)
            if finish_reason is not None:
                self.finish_reason = finish_reason
            if error is not None:
                self.error = error
            notify = not self.notified
            self.notified = True
        if notify:
            # The loop may be closed when a worker shuts down mid-request; nobody listens then.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.wakeup.set)

    def take(self) -> tuple[GenerationChunk, BaseException | None]:
        """Called on the event loop: everything accumulated since the last take."""
        with self.lock:
            self.notified = False
            chunk = GenerationChunk(
                delta="".join(self.text),
                token_ids=self.token_ids,
                finish_reason=self.finish_reason,
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=self.completion_tokens,
            )
            self.text = []
            self.token_ids = []
            return chunk, self.error


class _Detokenizer:
    """Incremental detokenization over a short window of ids.

    Decoding the window with and without the newest ids and emitting the difference keeps
    SentencePiece spaces right; text ending in U+FFFD (an incomplete UTF-8 sequence split
    across byte tokens) is held back until the following token completes it.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_DETOK_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is held back, replacement characters included (the stream is over)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


class _StopStrings:
    """Finds stop strings in the growing output and holds back a tail that may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.released = 0

    def add(self, piece: str) -> tuple[str, bool]:
        """Append new text; return (text safe to release now, whether a stop string matched)."""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        if not self.stops:
            out, self.released = self.text[self.released :], len(self.text)
            return out, False
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            end = max(min(hits), self.released)
            out, self.released = self.text[self.released : end], end
            return out, True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), hold, -1):
                if self.text.endswith(stop[:k]):
                    hold = k
                    break
        end = max(len(self.text) - hold, self.released)
        out, self.released = self.text[self.released : end], end
        return out, False

    def flush(self) -> str:
        out, self.released = self.text[self.released :], len(self.text)
        return out


def _position_seed(seed: int, position: int) -> int:
    """The generator seed for the token at output ``position`` of a request seeded ``seed``.

    A hash of both rather than one generator stream per request: a replica that continues a
    request at position k (``resume_token_ids``) draws exactly the numbers the original
    replica drew there, without replaying the k draws before it.
    """
    data = (int(seed) & _U64).to_bytes(8, "little") + position.to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class _Sampler:
    """Turns last-position logits into a token id with the request's sampling parameters.

    Args:
        params: The request's sampling parameters.
        seen_ids: Tokens the repetition penalty counts from the start: the prompt and any
            resumed ids.
        device: Where the logits live (the random generator must be on the same device).
    """

    def __init__(self, params: SamplingParams, seen_ids: Sequence[int], device: str) -> None:
        import torch

        self.params = params
        self.greedy = params.temperature < _GREEDY_EPS
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            # Unseeded requests are not reproducible anyway: one stream, seeded once.
            self.generator.seed()
        self.seen: torch.Tensor | None = None
        self.seen_ids = list(seen_ids)
        self.device = device

    def sample(
        self, logits: torch.Tensor, constraint: _Constraint | None = None, *, position: int = 0
    ) -> int:
        """The token for output ``position`` (0 for the first generated token)."""
        import torch

        p = self.params
        logits = logits.float()
        if constraint is not None:
            # Disallowed tokens become -inf before anything else: penalties keep them -inf, and
            # greedy, top-k, top-p and multinomial then only ever see allowed tokens.
            constraint.apply(logits)
        if p.repetition_penalty != 1.0:
            if self.seen is None:
                # Sized from the logits, which can be wider than the tokenizer's vocabulary.
                self.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                if self.seen_ids:
                    self.seen[torch.tensor(self.seen_ids, device=logits.device)] = True
            picked = logits[self.seen]
            logits[self.seen] = torch.where(
                picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty
            )
        if self.greedy:
            token = int(torch.argmax(logits))
        else:
            logits = logits / p.temperature
            if 0 < p.top_k < logits.shape[-1]:
                kth = torch.topk(logits, p.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_logits, order = torch.sort(logits, descending=True)
                probs = torch.softmax(sorted_logits, dim=-1)
                # Drop tokens once the mass before them already reaches top_p; the first
                # token always stays.
                drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
                sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
                logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
            probs = torch.softmax(logits, dim=-1)
            if p.seed is not None:
                self.generator.manual_seed(_position_seed(p.seed, position))
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.seen is not None:
            self.seen[token] = True
        return token


class _NotAllowed(RuntimeError):
    """A token the request's grammar does not accept where it came."""


class _Constraint:
    """One request's grammar state: masks logits to what may come next, follows the tokens.

    Not thread-safe; each request owns one, used only by the step loop.
    """

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab = int(compiled.tokenizer_info.vocab_size)
        self.bitmask = xgr.allocate_token_bitmask(1, self.vocab)
        self.stop_ids = [int(t) for t in self.matcher.stop_token_ids]
        # True when ``bitmask`` already holds the mask for the next token (filled by accept()).
        self.filled = False
        self.need_apply = True

    def apply(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens the grammar does not allow next to -inf, in place."""
        if not self.filled:
            # False means every token is allowed: nothing to mask.
            self.need_apply = bool(self.matcher.fill_next_token_bitmask(self.bitmask))
        self.filled = False
        if self.need_apply:
            mask = self.bitmask
            if logits.device.type != "cpu":
                mask = mask.to(logits.device, non_blocking=True)
            # (1, vocab) is the shape every xgrammar kernel takes; the view writes through.
            self._xgr.apply_token_bitmask_inplace(
                logits.view(1, -1), mask, vocab_size=min(self.vocab, int(logits.shape[-1]))
            )

    def accept(self, token: int) -> bool:
        """Advance past ``token``; True when the output is finished (nothing but EOS may follow)."""
        if not self.matcher.accept_token(token):
            raise _NotAllowed(f"token {token} is not allowed by the output grammar here")
        if self.matcher.is_terminated():  # it accepted a stop token
            return True
        if not self.matcher.is_completed():
            return False
        # The grammar could end here, but it might also go on (a number, an open-ended regex):
        # finish only when the next mask allows stop tokens alone, which saves a forward pass
        # for the EOS and keeps ignore_eos from running on.
        self.need_apply = bool(self.matcher.fill_next_token_bitmask(self.bitmask))
        self.filled = True
        return self.need_apply and not self._allows_more_than_stop()

    def _allows_more_than_stop(self) -> bool:
        import torch

        words = self.bitmask[0].to(torch.int64) & 0xFFFFFFFF
        for t in self.stop_ids:
            if 0 <= t < self.vocab:
                words[t // 32] &= ~(1 << (t % 32)) & 0xFFFFFFFF
        tail = self.vocab % 32
        if tail:
            words[-1] &= (1 << tail) - 1
        return bool(words.any())


# A request's step result: (finish_reason, last text, last token ids) for the final push.
_Finish = tuple[str, str, list[int]]


class _Decoding:
    """One request's decode state inside the step loop, from its prefill to its last token.

    Made on the event loop's side (``generate``, which also replays resumed ids into it) and
    owned by the step thread once queued: the sampler (with the request's own generator, so a
    seed gives the same tokens whoever else is decoding), the grammar matcher, the
    detokenizer and the stop-string matcher. ``past`` holds the request's own KV cache only
    when it cannot share a :class:`BatchKVCache` (and so decodes alone).
    """

    def __init__(self, req: _Request, tokenizer: Any, eos_ids: frozenset[int], device: str) -> None:
        self.req = req
        self.stop_ids = set(req.params.stop_token_ids)
        if not req.ignore_eos:
            self.stop_ids |= eos_ids
        self.sampler = _Sampler(req.params, req.prompt_ids + req.resume_ids, device)
        self.constraint = _Constraint(req.grammar) if req.grammar is not None else None
        self.detok = _Detokenizer(tokenizer, req.prompt_ids)
        self.stops = _StopStrings(req.params.stop)
        # Argmax over the whole batch gives these rows their token (see _TransformersEngine
        # ._decode_batch); everything else samples row by row.
        self.plain_greedy = (
            self.sampler.greedy and self.constraint is None and req.params.repetition_penalty == 1.0
        )
        # Tokens generated so far (resumed ones included): the output position sampled next.
        self.steps = 0
        # The token sampled last, which the next forward pass feeds in.
        self.next_token = -1
        self.past: Any = None

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from this request's last-position logits (may mask them in place)."""
        return self.sampler.sample(logits, self.constraint, position=self.steps)

    def _take(self, token: int) -> tuple[str | None, str]:
        """Run ``token`` through every stage: (finish reason or None, text released now)."""
        piece = self.detok.add(token)
        finish: str | None = None
        if token in self.stop_ids:
            finish = "stop"
        elif self.constraint is not None and self.constraint.accept(token):
            finish = "stop"  # the grammar is complete: EOS (even with ignore_eos) or nothing
        elif self.steps == self.req.max_new_tokens - 1:
            finish = "length"  # max_tokens, or the end of the context window
        if finish is not None:
            piece += self.detok.flush()
        text, matched = self.stops.add(piece)
        if matched:
            return "stop_string", text
        if finish is not None:
            return finish, text + self.stops.flush()
        self.steps += 1
        self.next_token = token
        return None, text

    def advance(self, token: int) -> _Finish | None:
        """Take a sampled token: push its text, or return how the request finishes."""
        finish, text = self._take(token)
        if finish is not None:
            return finish, text, [token]
        self.req.push(text, [token])
        return None

    def resume(self) -> str | None:
        """Replay the request's resumed ids as if this request had generated them.

        Every stage ends in the state the original replica's had after those ids: the
        detokenizer (a character split across the seam completes in the next delta), the
        stop-string matcher (text it was holding back as a possible stop string start is
        still held, and released or cut by what follows), the grammar matcher and the
        position the seeded sampler draws for. Text the replay releases is dropped: the
        original pushed it together with those ids, so the caller has it already.

        Returns:
            The finish reason when the last resumed id ends the request (EOS or a stop token,
            a complete grammar, a stop string, the token budget), else None.

        Raises:
            InvalidArgument: an id the grammar does not accept there, or an id that ends the
                request followed by more ids (which no replica can have generated).
        """
        ids = self.req.resume_ids
        finish: str | None = None
        for i, token in enumerate(ids):
            try:
                finish, _ = self._take(token)
            except _NotAllowed:
                raise InvalidArgument(
                    f"resume_token_ids[{i}]={token} is not allowed by the request's "
                    "structured_output grammar there; resume with the ids the first replica "
                    "streamed, unchanged"
                ) from None
            if finish is not None and i < len(ids) - 1:
                raise InvalidArgument(
                    f"resume_token_ids[{i}]={token} ends the request ({finish}) but "
                    f"{len(ids) - 1 - i} more ids follow it; resume with the ids the first "
                    "replica streamed, unchanged"
                )
        return finish

    def aborted(self) -> _Finish:
        """The final push of an aborted request: whatever text was held back, up to a stop."""
        text, matched = self.stops.add(self.detok.flush())
        return "aborted", text if matched else text + self.stops.flush(), []


@dataclass
class _Batch:
    """Requests decoding with one adapter (or the base model): one forward pass per step.

    ``rows[i]`` owns row ``i`` of ``cache``; both reorder together when a request leaves.
    """

    adapter: Any
    cache: BatchKVCache
    rows: list[_Decoding] = field(default_factory=list)

    def add(self, decoding: _Decoding, past: Any) -> None:
        self.cache.add(past)
        self.rows.append(decoding)

    def remove(self, row: int) -> None:
        """Drop a row; the last one moves into its place, in the cache as in ``rows``."""
        self.cache.remove(row)
        last = self.rows.pop()
        if row < len(self.rows):
            self.rows[row] = last


def _grammar_source(so: StructuredOutput) -> tuple[str, str]:
    """Check a StructuredOutput; return (kind, text) for the compiler.

    Kinds are the field names: ``json_schema`` and ``regex`` carry the text as given,
    ``choice`` becomes an EBNF alternation of string literals.
    """
    set_fields = [
        name
        for name, value in (
            ("json_schema", so.json_schema),
            ("regex", so.regex),
            ("choice", so.choice),
        )
        if value
    ]
    if not set_fields:
        raise InvalidArgument(
            "structured_output has no field set; set exactly one of json_schema, regex, choice"
        )
    if len(set_fields) > 1:
        raise InvalidArgument(
            f"structured_output sets {' and '.join(set_fields)}; set exactly one of "
            "json_schema, regex, choice"
        )
    kind = set_fields[0]
    if kind == "json_schema":
        try:
            schema = json.loads(so.json_schema)
        except ValueError as exc:
            raise InvalidArgument(
                f"structured_output.json_schema is not valid JSON: {exc}; send the schema "
                "as JSON text"
            ) from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidArgument(
                "structured_output.json_schema must be a JSON object (or true/false), got "
                f"{type(schema).__name__}"
            )
        return kind, so.json_schema
    if kind == "regex":
        return kind, so.regex
    if not all(isinstance(c, str) for c in so.choice):
        raise InvalidArgument("structured_output.choice must be a list of strings")
    # JSON string escapes (\", \\, \n, \uXXXX) are valid in xgrammar's EBNF literals.
    alternatives = dict.fromkeys(json.dumps(c, ensure_ascii=False) for c in so.choice)
    return kind, "root ::= " + " | ".join(alternatives)


def _without_special_tokens(xgr: Any, info: Any, tokenizer: Any) -> Any:
    """``info`` with the tokenizer's special tokens (other than stop tokens) made unusable.

    xgrammar reads added tokens such as ``<|user|>`` as their literal text, so a grammar would
    let them spell string content; the detokenizer skips special tokens, and the returned
    text would then lack characters the grammar counted. Tokens with an empty string are
    special to xgrammar and never allowed.
    """
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", ())}
    for i, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            special.add(int(i))
    special -= set(info.stop_token_ids)
    special -= set(info.special_token_ids)
    vocab = list(info.decoded_vocab)
    special = {i for i in special if 0 <= i < len(vocab)}
    if not special:
        return info
    for i in special:
        vocab[i] = b""
    return xgr.TokenizerInfo(
        vocab,
        xgr.VocabType.RAW,
        vocab_size=info.vocab_size,
        stop_token_ids=list(info.stop_token_ids),
        add_prefix_space=info.add_prefix_space,
    )


def _xgr_message(exc: BaseException) -> str:
    msg = _XGR_NOISE.sub("", str(exc).strip()).strip() or type(exc).__name__
    return msg if len(msg) <= 400 else msg[:397] + "..."


# ---------------------------------------------------------------------------------------------


class TransformersEngine(Engine):
    """A causal LM from a local directory, decoded with our own loop on CPU or GPU.

    Args:
        config: ``model_path`` is a HuggingFace-layout directory; see the module docstring for
            the ``infer_params`` keys.

    Thread safety: all forward passes, sampling and detokenization run in the engine's one
    step thread; the event loop only enqueues requests, sets abort flags and reads collectors.
    Tokenizer encoding (on the event loop's worker threads) is serialized by a lock (fast
    tokenizers may mutate their truncation/padding state during ``encode``).
    """

    # Names this engine's infer_params table; subclasses (deepspeed) accept more keys.
    backend = "transformers"
    # Subclasses (deepspeed) decode with the same loop, so they resume too.
    supports_resume = True

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        params = check_infer_params(self.backend, config.infer_params, model=config.model_name)
        self._max_concurrency: int = params.get("max_concurrency", DEFAULT_MAX_CONCURRENCY)
        self._max_model_len_param: int | None = params.get("max_model_len")
        self._torch_threads: int | None = params.get("torch_threads")
        # A torch dtype name ("float16", ...) or "auto"; None: float32 on CPU, auto on GPU.
        self._dtype_param: str | None = params.get("dtype")
        # Only when the deploy asked for it; the replica process refused it already unless the
        # worker's operator allowed it (llmesh.inference_worker.remote_code).
        self._trust_remote_code: bool = params.get("trust_remote_code", False)
        self._params = params

        self._model: Any = None
        self._tokenizer: Any = None
        self._device = "cpu"
        self._dtype_name = ""
        self._max_model_len = 0
        self._eos_ids: frozenset[int] = frozenset()
        self._vocab_size = 0
        self._architectures: list[str] = []
        # Extra forward arguments: logits_to_keep=1 where the model takes it (see _load).
        self._keep_last: dict[str, int] = {}
        # The step loop's thread, and what it shares with the event loop under _lock: the
        # active requests (the step loop removes them as they finish) and the requests that
        # wait for the step loop to take them (_inbox; _wake tells it there are some).
        self._stepper: threading.Thread | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._active: dict[str, _Request] = {}
        self._inbox: deque[_Decoding] = deque()
        self._encode_lock = threading.Lock()
        self._stopping = False
        # Structured output: the xgrammar compiler (made on first use, it reads the whole
        # vocabulary) and an LRU of compiled grammars, shared by requests under this lock.
        self._grammar_lock = threading.Lock()
        self._grammar_compiler: Any = None
        self._grammars: OrderedDict[tuple[str, str], Any] = OrderedDict()
        # LoRA adapters by name. Replaced, never mutated (under _lora_lock), so a request reads
        # the mapping without a lock and keeps whatever adapter it found. _lora_pending holds
        # names being loaded, so two add_lora calls for one name cannot both load.
        self._max_loras: int = params.get("max_loras", _DEFAULT_MAX_LORAS)
        self._max_lora_rank: int = params.get("max_lora_rank", _DEFAULT_MAX_LORA_RANK)
        self._lora_lock = threading.Lock()
        self._loras: Mapping[str, Any] = {}
        self._lora_pending: set[str] = set()

    @property
    def max_concurrency(self) -> int:
        """Requests decoded at once (infer_param ``max_concurrency``, default 8)."""
        return self._max_concurrency

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load model and tokenizer in a worker thread; errors say what is wrong with the dir."""
        if self._model is not None:
            return
        path = check_model_dir(self.config)
        device = resolve_device(self._params)
        if self._torch_threads is not None:
            import torch

            torch.set_num_threads(self._torch_threads)
        await load_model(self._load, path, device)
        self._stopping = False
        self._stepper = threading.Thread(
            target=self._step_loop, name=f"decode-{self.config.model_name}", daemon=True
        )
        self._stepper.start()
        log.info(
            "loaded %s from %s on %s (%s, context %d, concurrency %d)",
            self.config.model_name,
            path,
            self._device,
            self._dtype_name,
            self._max_model_len,
            self._max_concurrency,
        )

    def _load(self, path: str, device: str) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        name = self.config.model_name
        try:
            hf_config = AutoConfig.from_pretrained(
                path, local_files_only=True, trust_remote_code=self._trust_remote_code
            )
        except (OSError, ValueError, KeyError) as exc:
            raise FailedPrecondition(
                f"model_path {path!r} of model {name} has a config.json transformers cannot "
                f"read: {exc}"
            ) from exc
        architectures = list(getattr(hf_config, "architectures", None) or [])
        if architectures and not any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures):
            raise FailedPrecondition(
                f"model {name} at {path!r} is a {', '.join(architectures)}, not a causal "
                "language model; the transformers backend generates text, so deploy it with "
                "backend embedding or rerank instead"
            )
        context = _context_length(hf_config)
        if self._max_model_len_param is not None:
            if context and self._max_model_len_param > context:
                raise InvalidArgument(
                    f"infer_params max_model_len={self._max_model_len_param} exceeds the "
                    f"context of model {name} ({context} tokens); use at most {context}"
                )
            context = self._max_model_len_param
        if self._dtype_param is not None:
            dtype_arg: Any = (
                "auto" if self._dtype_param == "auto" else getattr(torch, self._dtype_param)
            )
        else:
            # float16 matmuls are slow or missing on many CPUs; float32 is the safe default.
            dtype_arg = torch.float32 if device == "cpu" else "auto"
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                path, local_files_only=True, trust_remote_code=self._trust_remote_code
            )
        except (OSError, ValueError, KeyError) as exc:
            raise FailedPrecondition(
                f"model {name} at {path!r} has no usable tokenizer: {exc}"
            ) from exc
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype_arg,
                local_files_only=True,
                trust_remote_code=self._trust_remote_code,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise FailedPrecondition(
                f"model {name} at {path!r} cannot be loaded as a causal language model: {exc}"
            ) from exc
        model.to(device)
        model.eval()
        if not context:
            context = _sane_max_length(getattr(tokenizer, "model_max_length", 0)) or 2048
        eos: set[int] = set()
        for source in (getattr(model, "generation_config", None), hf_config, tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, (list, tuple)):
                eos.update(int(v) for v in value)
        self._model = model
        self._tokenizer = tokenizer
        self._device = device
        self._dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
        self._max_model_len = context
        self._eos_ids = frozenset(eos)
        self._vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._architectures = architectures or [type(model).__name__]
        # Computing logits for the last position only saves a vocab-sized matmul per prompt
        # token; older remote-code models do not take the argument.
        takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._keep_last = {"logits_to_keep": 1} if takes_keep else {}

    async def stop(self) -> None:
        """Abort every request, wait for the step loop (one step), free the model."""
        with self._lock:
            self._stopping = True
            for req in self._active.values():
                req.aborted.set()
            self._wake.notify()
        stepper, self._stepper = self._stepper, None
        if stepper is not None:
            await asyncio.to_thread(stepper.join)
        device = self._device
        self._model = None
        self._tokenizer = None
        with self._lora_lock:
            self._loras = {}
        with self._grammar_lock:
            self._grammar_compiler = None
            self._grammars.clear()
        if device.startswith("cuda"):
            import torch

            # A full collection holds the GIL for about a second on a big heap, stalling every
            # other replica's streams on this worker; only CUDA needs the memory back at once.
            gc.collect()
            torch.cuda.empty_cache()

    def _require_loaded(self) -> tuple[Any, Any]:
        model, tokenizer = self._model, self._tokenizer
        if model is None or tokenizer is None or self._stopping:
            raise FailedPrecondition(
                f"model {self.config.model_name} is not loaded (engine not started or stopped)"
            )
        return model, tokenizer

    # -- metadata and text utilities ---------------------------------------------------------

    def meta(self) -> ModelMeta:
        """Backend, architectures, context length, streaming and chat-template support."""
        _, tokenizer = self._require_loaded()
        return ModelMeta(
            backend=self.backend,
            architectures=list(self._architectures),
            max_model_len=self._max_model_len,
            support_stream=True,
            support_chat_template=bool(getattr(tokenizer, "chat_template", None)),
            max_concurrency=self._max_concurrency,
            extra={
                "device": self._device,
                "dtype": self._dtype_name,
                "vocab_size": str(self._vocab_size),
                "loras": ",".join(self.loras()),
                "max_loras": str(self._max_loras),
                "max_lora_rank": str(self._max_lora_rank),
            },
        )

    # -- LoRA adapters ------------------------------------------------------------------------

    def loras(self) -> list[str]:
        """Names of the loaded adapters, sorted."""
        return sorted(self._loras)

    async def add_lora(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter from ``path`` for requests with ``SamplingParams.lora=name``.

        The model keeps serving meanwhile: the weights load in a thread, and the layers the
        adapter targets are wrapped (once) while other requests decode.

        Raises:
            InvalidArgument: ``name`` is not a valid adapter name.
            AlreadyExists: an adapter called ``name`` is loaded (or loading).
            ResourceExhausted: ``max_loras`` adapters are loaded already.
            FailedPrecondition: the engine is not started, or the directory is not a usable
                PEFT LoRA adapter for this model (the message names the path and the problem).
        """
        from llmesh.inference_worker.engines import lora

        self._require_loaded()
        lora.check_name(name)
        with self._lora_lock:
            if name in self._loras or name in self._lora_pending:
                raise AlreadyExists(
                    f"adapter {name!r} is already loaded on model {self.config.model_name}; "
                    "remove it first to load another version under this name"
                )
            if len(self._loras) + len(self._lora_pending) >= self._max_loras:
                raise ResourceExhausted(
                    f"model {self.config.model_name} holds {self._max_loras} LoRA adapters "
                    f"already (infer_params max_loras={self._max_loras}); remove one, or "
                    "redeploy the model with a larger max_loras"
                )
            self._lora_pending.add(name)
        try:
            adapter = await asyncio.to_thread(self._load_lora, name, path)
            with self._lora_lock:
                if self._model is None or self._stopping:
                    raise Unavailable(f"model {self.config.model_name} is shutting down")
                self._loras = {**self._loras, name: adapter}
        finally:
            with self._lora_lock:
                self._lora_pending.discard(name)
        log.info(
            "model %s: loaded LoRA adapter %s from %s (rank %d, %d layers)",
            self.config.model_name,
            name,
            adapter.path,
            adapter.rank,
            len(adapter.weights),
        )

    def _load_lora(self, name: str, path: str) -> Any:
        """Blocking part of add_lora: read and check the adapter, wrap its layers."""
        import torch

        from llmesh.inference_worker.engines import lora

        model = self._model
        if model is None:
            raise FailedPrecondition(f"model {self.config.model_name} is not loaded")
        # Wrappers such as DeepSpeed's InferenceEngine keep the transformers model as .module.
        inner = getattr(model, "module", None)
        target = inner if isinstance(inner, torch.nn.Module) else model
        config = lora.read_adapter_config(path)
        adapter = lora.load_adapter(name, config, target, max_rank=self._max_lora_rank)
        lora.install(target, adapter)
        return adapter

    async def remove_lora(self, name: str) -> None:
        """Unload an adapter: new requests naming it get NotFound.

        Requests already decoding with it keep its weights until they finish; requests of
        other adapters and of the base model are not affected.

        Raises:
            NotFound: no adapter called ``name`` is loaded.
        """
        with self._lora_lock:
            if name not in self._loras:
                raise self._lora_not_found(name)
            self._loras = {k: v for k, v in self._loras.items() if k != name}
        log.info("model %s: removed LoRA adapter %s", self.config.model_name, name)

    def _lora_not_found(self, name: str) -> NotFound:
        loaded = ", ".join(self.loras()) or "none"
        return NotFound(
            f"adapter {name!r} is not loaded on model {self.config.model_name} (loaded: {loaded})"
        )

    def _encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        _, tokenizer = self._require_loaded()
        with self._encode_lock:
            return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _encode_prompt(self, prompt: str) -> list[int]:
        _, tokenizer = self._require_loaded()
        # A chat template may already start the prompt with BOS; adding another confuses
        # Llama-style models.
        bos = getattr(tokenizer, "bos_token", None)
        return self._encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))

    async def tokenize(self, text: str, *, add_special_tokens: bool) -> tuple[list[int], list[str]]:
        """Token ids and their string pieces (as the tokenizer's vocabulary spells them)."""
        _, tokenizer = self._require_loaded()
        ids = await asyncio.to_thread(self._encode, text, add_special_tokens=add_special_tokens)
        return ids, [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]

    async def count_prompt_tokens(self, prompt: str) -> int:
        """Tokens ``generate`` will feed the model for this prompt."""
        return len(await asyncio.to_thread(self._encode_prompt, prompt))

    async def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool
    ) -> str:
        """Render messages with the tokenizer's chat template."""
        _, tokenizer = self._require_loaded()
        if not getattr(tokenizer, "chat_template", None):
            raise FailedPrecondition(
                f"model {self.config.model_name} has no chat template in its tokenizer config; "
                "send a raw prompt instead, or use a client-side template"
            )
        conversation = [dict(m) for m in messages]
        try:
            # Jinja rendering of a long conversation takes a while: keep it off the event loop
            # that carries every other stream's tokens.
            rendered = await asyncio.to_thread(
                tokenizer.apply_chat_template,
                conversation,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # jinja2 errors, including the template's raise_exception()
            raise InvalidArgument(
                f"the chat template of model {self.config.model_name} rejected the messages: {exc}"
            ) from exc
        return str(rendered)

    # -- generation ---------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt: str, params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        """Stream a completion of a raw prompt.

        Chunks carry the text (and token ids) produced since the previous chunk; the last one
        has ``finish_reason`` ("stop", "length", "stop_string" or "aborted") and token counts.
        Token ids cover every generated token, including an EOS / stop token and tokens of a
        matched stop string, whose text is not returned. ``params.extra["ignore_eos"]`` keeps
        generating past EOS (for benchmarks).

        ``params.resume_token_ids`` continues a request another replica started: the stream
        carries only what follows those ids, the tokens and text an unfailed run would have
        produced after them (greedy and seeded alike; see :meth:`_Decoding.resume` for the
        text at the seam), and they count in ``completion_tokens`` and against
        ``max_tokens``. When the last of them ends the request, the only chunk is the final
        one, without text.

        Raises:
            InvalidArgument: bad parameters, a duplicate active ``request_id``, a prompt that
                leaves no room in the context, or resumed ids no run of this request can have
                produced (out of the vocabulary, more than its token budget, rejected by its
                grammar, or going on after one that ends it). Raised before any decoding
                starts.
            FailedPrecondition: the engine is not started.
        """
        self._require_loaded()
        ignore_eos = check_sampling_params(params, vocab_size=self._vocab_size)
        if request_id in self._active:
            raise _duplicate(request_id)
        resume_ids = [int(t) for t in params.resume_token_ids]
        for i, token in enumerate(resume_ids):
            if not 0 <= token < self._vocab_size:
                raise InvalidArgument(
                    f"resume_token_ids[{i}]={token} is out of range; token ids are in "
                    f"[0, {self._vocab_size})"
                )
        adapter = None
        if params.lora:
            # Looked up once: the request keeps this adapter even if it is removed meanwhile.
            adapter = self._loras.get(params.lora)
            if adapter is None:
                raise self._lora_not_found(params.lora)
        grammar = None
        if params.structured_output is not None:
            kind, source = _grammar_source(params.structured_output)
            grammar = await asyncio.to_thread(self._compile_grammar, kind, source)
        prompt_ids = await asyncio.to_thread(self._encode_prompt, prompt)
        n_prompt = len(prompt_ids)
        room = prompt_room(n_prompt, self._max_model_len, self.config.model_name)
        budget = min(params.max_tokens, room)
        if len(resume_ids) > budget:
            # The budget counts resumed ids, as it did on the replica that generated them;
            # more than it (a smaller max_model_len here) cannot continue the same run.
            raise InvalidArgument(
                f"{len(resume_ids)} resume_token_ids exceed the request's budget of {budget} "
                f"generated tokens (max_tokens={params.max_tokens}; the prompt's {n_prompt} "
                f"tokens leave {room} in the {self._max_model_len}-token context of model "
                f"{self.config.model_name}); retry the request from the start"
            )
        if self._stepper is None or self._stopping:
            raise Unavailable(f"model {self.config.model_name} is shutting down")
        req = _Request(
            request_id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            max_new_tokens=budget,
            ignore_eos=ignore_eos,
            loop=asyncio.get_running_loop(),
            grammar=grammar,
            lora=adapter,
            resume_ids=resume_ids,
            completion_tokens=len(resume_ids),
        )
        decoding, finish = await asyncio.to_thread(self._new_decoding, req)
        if finish is not None:
            # The last resumed id ended the request on the first replica: its final chunk,
            # flushed text included, went out with that id; nothing is left to send.
            yield GenerationChunk(
                finish_reason=finish, prompt_tokens=n_prompt, completion_tokens=len(resume_ids)
            )
            return
        with self._lock:
            # Checked under the lock the step loop exits under, so no request is left behind.
            if self._stopping:
                raise Unavailable(f"model {self.config.model_name} is shutting down")
            if request_id in self._active:
                raise _duplicate(request_id)
            self._active[request_id] = req
            self._inbox.append(decoding)
            self._wake.notify()
        try:
            while True:
                await req.wakeup.wait()
                req.wakeup.clear()
                chunk, error = req.take()
                if error is not None:
                    raise Internal(
                        f"generation for request {request_id} failed: "
                        f"{type(error).__name__}: {error}"
                    ) from error
                if chunk.finish_reason is not None:
                    yield chunk
                    return
                if chunk.delta or chunk.token_ids:
                    yield chunk
        finally:
            # Consumer gone (aclose, GeneratorExit, cancellation) or done: either way the
            # step loop must drop the request; it sees the flag before its next step.
            req.aborted.set()

    def _new_decoding(self, req: _Request) -> tuple[_Decoding, str | None]:
        """The request's decode state, resumed ids replayed; blocking (detokenizes them).

        Returns:
            The state and, when the last resumed id ends the request, its finish reason.
        """
        _, tokenizer = self._require_loaded()
        decoding = _Decoding(req, tokenizer, self._eos_ids, self._device)
        return decoding, decoding.resume() if req.resume_ids else None

    def _compiler(self) -> Any:
        with self._grammar_lock:
            if self._grammar_compiler is None:
                _, tokenizer = self._require_loaded()
                try:
                    import xgrammar as xgr
                except ImportError:
                    raise FailedPrecondition(
                        "structured output needs the xgrammar package on this worker; install "
                        "the worker extra (pip install 'llmesh[worker]')"
                    ) from None
                # The model's logits can be wider than the tokenizer's vocabulary (embedding
                # padding); xgrammar masks the extra ids out when told the full width.
                info = xgr.TokenizerInfo.from_huggingface(
                    tokenizer,
                    vocab_size=max(self._vocab_size, len(tokenizer)),
                    stop_token_ids=sorted(self._eos_ids) or None,
                )
                info = _without_special_tokens(xgr, info, tokenizer)
                self._grammar_compiler = xgr.GrammarCompiler(
                    info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False
                )
            return self._grammar_compiler

    def _compile_grammar(self, kind: str, source: str) -> Any:
        """A compiled grammar for ``(kind, source)``, from the cache when possible."""
        key = (kind, source)
        with self._grammar_lock:
            compiled = self._grammars.get(key)
            if compiled is not None:
                self._grammars.move_to_end(key)
                return compiled
        compiler = self._compiler()
        # Compiled outside the lock: a slow schema must not hold up requests with cached ones;
        # two requests racing on the same new schema just compile it twice.
        try:
            if kind == "json_schema":
                compiled = compiler.compile_json_schema(source, any_whitespace=False)
            elif kind == "regex":
                compiled = compiler.compile_regex(source)
            else:
                compiled = compiler.compile_grammar(source)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's bad-input errors
            raise InvalidArgument(
                f"structured_output.{kind} cannot be enforced: {_xgr_message(exc)}"
            ) from None
        with self._grammar_lock:
            self._grammars[key] = compiled
            self._grammars.move_to_end(key)
            while len(self._grammars) > _GRAMMAR_CACHE_SIZE:
                self._grammars.popitem(last=False)
        return compiled

    async def abort(self, request_id: str) -> bool:
        """Stop a running request; its stream ends with "aborted". True when it was active."""
        with self._lock:
            req = self._active.get(request_id)
        if req is None:
            return False
        req.aborted.set()
        return True

    def active_requests(self) -> set[str]:
        """Ids of requests waiting for or in the step loop (not finished yet)."""
        with self._lock:
            return set(self._active)

    # -- the step loop ------------------------------------------------------------------------

    def _step_loop(self) -> None:
        """The step thread: one step after another while requests are active, then sleep."""
        import torch

        # Batches by adapter (id(None) for the base model); _Batch holds its adapter, so an id
        # is not reused while its batch lives. ``alone``: requests whose cache cannot batch.
        batches: dict[int, _Batch] = {}
        alone: list[_Decoding] = []
        # Grad mode is thread-local, so inference mode is entered in this thread.
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._inbox or batches or alone or self._stopping):
                        self._wake.wait()
                    if self._stopping and not (self._inbox or batches or alone):
                        return
                    running = sum(len(b.rows) for b in batches.values()) + len(alone)
                    new = [
                        self._inbox.popleft()
                        for _ in range(min(self._max_concurrency - running, len(self._inbox)))
                    ]
                    # Aborted requests still waiting for a row end now, not when one frees.
                    gone = [d for d in self._inbox if d.req.aborted.is_set()]
                    for decoding in gone:
                        self._inbox.remove(decoding)
                try:
                    for decoding in gone:
                        self._finish(decoding.req, decoding.aborted())
                    self._step(new, batches, alone)
                except Exception as exc:  # a bug in the loop itself: fail what is in flight
                    log.exception("decode step of model %s failed", self.config.model_name)
                    in_flight = [d.req for b in batches.values() for d in b.rows]
                    in_flight += [d.req for d in alone + new]
                    for req in in_flight:
                        # Some may have finished in this step before the failure.
                        with self._lock:
                            unfinished = self._active.get(req.request_id) is req
                        if unfinished:
                            self._finish(req, ("aborted", "", []), error=exc)
                    batches.clear()
                    alone.clear()

    def _step(
        self, new: list[_Decoding], batches: dict[int, _Batch], alone: list[_Decoding]
    ) -> None:
        """Drop aborted requests, prefill the new ones, then one decode forward per batch."""
        for batch in batches.values():
            # Backwards: remove() moves the last row into the hole, and rows after it are
            # already checked.
            for row in range(len(batch.rows) - 1, -1, -1):
                decoding = batch.rows[row]
                if decoding.req.aborted.is_set():
                    self._finish(decoding.req, decoding.aborted())
                    batch.remove(row)
        for decoding in [d for d in alone if d.req.aborted.is_set()]:
            alone.remove(decoding)
            self._finish(decoding.req, decoding.aborted())
        for decoding in new:
            self._prefill(decoding, batches, alone)
        for key, batch in list(batches.items()):
            if batch.rows:
                self._decode_batch(batch)
            if not batch.rows:
                del batches[key]
        alone[:] = [d for d in alone if self._decode_alone(d)]

    def _prefill(
        self, decoding: _Decoding, batches: dict[int, _Batch], alone: list[_Decoding]
    ) -> None:
        """Run a new request's prompt, sample its first token, and give it a batch row."""
        import torch

        from llmesh.inference_worker.engines.batch_cache import BatchKVCache

        req = decoding.req
        if req.aborted.is_set():
            self._finish(req, decoding.aborted())
            return
        # One prompt per forward pass: prompts of different lengths would need padding, and a
        # prompt already fills the matrix products a decode step leaves thin. Resumed ids
        # join the prompt: their keys and values are what decoding them one by one leaves,
        # up to float rounding, and the last position's logits give the next token.
        try:
            context = req.prompt_ids + req.resume_ids
            ids = torch.tensor([context], dtype=torch.long, device=self._device)
            with _lora_scope(req.lora):
                out = self._model(input_ids=ids, use_cache=True, **self._keep_last)
            result = decoding.advance(decoding.sample(out.logits[0, -1]))
        except Exception as exc:  # noqa: BLE001 - reported to its consumer, logged
            self._fail(req, exc)
            return
        if result is not None:
            self._finish(req, result)
            return
        past = out.past_key_values
        if BatchKVCache.accepts(past):
            batch = batches.get(id(req.lora))
            if batch is None:
                cache = BatchKVCache(
                    max_rows=self._max_concurrency, max_columns=self._max_model_len
                )
                batch = batches[id(req.lora)] = _Batch(req.lora, cache)
            batch.add(decoding, past)
        else:
            decoding.past = past
            alone.append(decoding)

    def _decode_batch(self, batch: _Batch) -> None:
        """One forward pass for every row of ``batch``, then each row's token; drop finished."""
        import torch

        rows, cache, device = batch.rows, batch.cache, self._device
        try:
            ids = torch.tensor([[d.next_token] for d in rows], dtype=torch.long, device=device)
            mask, positions = cache.step_inputs(device)
            # Passed only when rows differ in length: a batch of one then calls the model
            # exactly as a lone request always did.
            padding = {} if mask is None else {"attention_mask": mask, "position_ids": positions}
            with _lora_scope(batch.adapter):
                out = self._model(
                    input_ids=ids,
                    past_key_values=cache,
                    use_cache=True,
                    **padding,
                    **self._keep_last,
                )
            cache.advance()
        except Exception as exc:  # noqa: BLE001 - reported to every row's consumer, logged
            for decoding in rows:
                self._fail(decoding.req, exc)
            rows.clear()
            return
        logits = out.logits[:, -1]
        # One argmax for all greedy rows instead of one call per row.
        greedy = logits.argmax(-1).tolist() if any(d.plain_greedy for d in rows) else []
        done: list[int] = []
        for row, decoding in enumerate(rows):
            try:
                token = greedy[row] if decoding.plain_greedy else decoding.sample(logits[row])
                result = decoding.advance(token)
            except Exception as exc:  # noqa: BLE001 - this row's consumer gets it, logged
                self._fail(decoding.req, exc)
                done.append(row)
                continue
            if result is not None:
                self._finish(decoding.req, result)
                done.append(row)
        for row in reversed(done):
            batch.remove(row)

    def _decode_alone(self, decoding: _Decoding) -> bool:
        """One forward pass for a request with its own cache; False once it has finished."""
        import torch

        req = decoding.req
        try:
            ids = torch.tensor([[decoding.next_token]], dtype=torch.long, device=self._device)
            with _lora_scope(req.lora):
                out = self._model(
                    input_ids=ids, past_key_values=decoding.past, use_cache=True, **self._keep_last
                )
            decoding.past = out.past_key_values
            result = decoding.advance(decoding.sample(out.logits[0, -1]))
        except Exception as exc:  # noqa: BLE001 - reported to its consumer, logged
            self._fail(req, exc)
            return False
        if result is not None:
            self._finish(req, result)
            return False
        return True

    def _fail(self, req: _Request, exc: BaseException) -> None:
        log.exception("decode of request %s failed", req.request_id, exc_info=exc)
        self._finish(req, ("aborted", "", []), error=exc)

    def _finish(self, req: _Request, result: _Finish, error: BaseException | None = None) -> None:
        """The request's final push, after it leaves the active set.

        In that order, so a consumer that sees the final chunk also sees active_requests()
        without this id.
        """
        finish, tail, tail_ids = result
        with self._lock:
            if self._active.get(req.request_id) is req:
                del self._active[req.request_id]
        req.push(tail, tail_ids, finish_reason=finish, error=error)


def _lora_scope(adapter: Any) -> contextlib.AbstractContextManager[None]:
    """The adapter made current for this thread's forward passes; nothing for the base model."""
    if adapter is None:
        return contextlib.nullcontext()
    from llmesh.inference_worker.engines import lora

    return lora.activate(adapter)


def _duplicate(request_id: str) -> InvalidArgument:
    return InvalidArgument(
        f"request_id {request_id!r} is already generating on this replica; use a unique id"
    )


def _sane_max_length(value: Any) -> int:
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    return int(value) if isinstance(value, int) and 0 < value < 10_000_000 else 0


def _context_length(hf_config: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    text_config = getattr(hf_config, "text_config", None)
    return _context_length(text_config) if text_config is not None else 0
