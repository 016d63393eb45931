"""Structured output of a vLLM request that continues another replica's (mid-stream failover).

vLLM compiles a request's grammar in its scheduler and advances it only with the tokens the
request generates there (``StructuredOutputManager.accept_tokens``, called from the scheduler's
``update_from_output``); there is no way to hand it tokens generated elsewhere. A resumed
request's earlier ids reach vLLM as prompt, so vLLM's grammar would start over at the seam and
accept output that breaks the shape.

So a resumed structured-output request does not use vLLM's structured outputs. It carries its
grammar and the resumed ids in ``SamplingParams.extra_args[EXTRA_ARG]`` instead, and
:class:`ResumedGrammarProcessor`, a logits processor registered on every vLLM engine we start,
does what vLLM's grammar would have done had the request never moved: it compiles the same
grammar with vLLM's own xgrammar backend (same vocabulary, stop tokens and whitespace setting),
accepts the resumed ids, then each new id, and masks the logits to the tokens the grammar allows
next. The masks are the unfailed request's, so greedy output is too.

:func:`resumed_grammar_arg` runs on the frontend before the request is sent: it validates the
grammar as vLLM validates any structured-output request, compiles it and checks the resumed ids
against it, so that nothing can go wrong inside the engine process (an exception in a logits
processor kills vLLM's engine, not one request).

Requests without the extra argument cost one dict lookup when they join the batch; ``apply``
returns at once while no request in the batch uses the processor. vLLM keeps each request's
output ids for the processor while it is registered (on a GPU with async scheduling, that is one
wait per step for the previous step's sampled ids, as a repetition penalty causes).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from llmesh.common.errors import InvalidArgument

log = logging.getLogger(__name__)

#: The ``SamplingParams.extra_args`` key of a resumed request's grammar:
#: ``{"kind": StructuredOutputOptions name, "spec": grammar text, "resume": [ids]}``.
EXTRA_ARG = "llmesh_resumed_grammar"


def processor_name() -> str:
    """The processor's qualified name, as vLLM's ``logits_processors`` engine argument takes it."""
    return f"{ResumedGrammarProcessor.__module__}:{ResumedGrammarProcessor.__qualname__}"


class ResumedGrammars:
    """vLLM's own xgrammar backend for one engine, built on first use (it reads the vocabulary).

    Used on both sides: the frontend checks resumed ids with it, the processor masks with it.
    xgrammar's compiler caches compiled grammars by their text, as it does for vLLM.

    Args:
        vllm_config: The engine's configuration (model, vocabulary size, whitespace setting).
        tokenizer: The model's tokenizer; loaded from the configuration when None.
    """

    def __init__(self, vllm_config: Any, tokenizer: Any = None) -> None:
        self._config = vllm_config
        self._tokenizer = tokenizer
        self._backend: Any = None
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return int(self._config.model_config.get_vocab_size())

    def _xgrammar(self) -> Any:
        with self._lock:
            if self._backend is None:
                from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

                tokenizer = self._tokenizer
                if tokenizer is None:
                    from vllm.tokenizers import cached_tokenizer_from_config

                    tokenizer = cached_tokenizer_from_config(model_config=self._config.model_config)
                self._backend = XgrammarBackend(
                    self._config, tokenizer=tokenizer, vocab_size=self.vocab_size
                )
            return self._backend

    def grammar(self, kind: str, spec: str, stop_token_ids: Sequence[int]) -> Any:
        """A fresh ``XgrammarGrammar`` (its own matcher) as vLLM would make for the request."""
        from vllm.v1.structured_output.backend_types import StructuredOutputOptions

        return self._xgrammar().compile_grammar(
            StructuredOutputOptions[kind], spec, stop_token_ids=set(stop_token_ids)
        )


def resumed_grammar_arg(
    grammars: ResumedGrammars, sampling: Any, resume: Sequence[int]
) -> dict[str, Any]:
    """The ``extra_args`` value that carries a resumed request's grammar to the processor.

    Args:
        grammars: The engine's backend.
        sampling: vLLM's sampling parameters of the request with its ``structured_outputs``,
            already validated by ``SamplingParams.verify`` (which turns ``choice`` into a
            grammar, as for any request) and updated from the generation config (its stop ids
            are the grammar's stop tokens).
        resume: The ids the lost replica generated.

    Raises:
        InvalidArgument: the grammar does not compile, or a resumed id is not one it allows
            there (ids after the grammar ended, which only ``ignore_eos`` produces, are not
            checked: vLLM stops enforcing the grammar there too).
    """
    from vllm.v1.structured_output.request import get_structured_output_key

    option, spec = get_structured_output_key(sampling.structured_outputs)
    stop_ids = sorted(sampling.all_stop_token_ids)
    try:
        grammar = grammars.grammar(option.name, spec, stop_ids)
    except Exception as exc:  # xgrammar's compile errors (RuntimeError, ValueError, ...)
        raise InvalidArgument(f"structured_output cannot be enforced: {exc}") from exc
    matcher = grammar.matcher
    for i, token in enumerate(resume):
        if matcher.is_terminated():
            break
        if not matcher.accept_token(int(token)):
            raise InvalidArgument(
                f"resume_token_ids[{i}]={token} is not allowed by the request's "
                "structured_output grammar there; resume with the ids the first replica "
                "streamed, unchanged"
            )
    return {"kind": option.name, "spec": spec, "resume": [int(t) for t in resume]}


@dataclass(eq=False)
class _Row:
    """One request's grammar in the batch: its matcher and vLLM's live list of its output ids."""

    matcher: Any  # xgrammar.GrammarMatcher
    output: list[int]
    taken: int = 0  # ids of ``output`` looked at
    fed: int = 0  # ids of ``output`` the matcher accepted (fewer once the grammar ended)
    # The grammar ended: vLLM leaves the logits alone from there (ignore_eos runs on).
    ended: bool = False
    # The matcher refused an id, against the frontend's check: vLLM would abort the request,
    # which a logits processor cannot; it runs on unconstrained (logged).
    broken: bool = False

    @property
    def masks(self) -> bool:
        return not (self.ended or self.broken)

    def take(self, ids: Sequence[int], what: str) -> int:
        """Accept ``ids`` until the grammar ends; returns how many the matcher took."""
        n = 0
        for token in ids:
            if not self.masks:
                break
            if not self.matcher.accept_token(int(token)):
                log.error("the grammar of a resumed request refused its %s id %d", what, token)
                self.broken = True
                break
            n += 1
            self.ended = bool(self.matcher.is_terminated())
        return n

    def catch_up(self) -> None:
        """Accept the ids vLLM appended to the request's output since the last step."""
        output = self.output
        if len(output) < self.taken:
            # vLLM dropped ids it had appended (a failed KV load): forget them too.
            if len(output) < self.fed and not self.broken:
                self.matcher.rollback(self.fed - len(output))
                self.fed = len(output)
                self.ended = bool(self.matcher.is_terminated())
            self.taken = len(output)
        end = len(output)
        while end > self.taken and output[end - 1] < 0:  # async scheduling's placeholders
            end -= 1
        if end > self.taken:
            self.fed += self.take(output[self.taken : end], "new")
            self.taken = end


class ResumedGrammarProcessor(LogitsProcessor):
    """vLLM v1 logits processor: the grammar of resumed structured-output requests.

    Built by vLLM in its engine process, one per model runner (``logits_processors`` engine
    argument). Rows are keyed by batch index, kept up to date from vLLM's ``BatchUpdate``.

    Args:
        vllm_config: The engine's configuration.
        device: Where the logits live.
        is_pin_memory: Unused (the bitmask is small).
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self._grammars = ResumedGrammars(vllm_config)
        self._max_rows = int(vllm_config.scheduler_config.max_num_seqs)
        self._rows: dict[int, _Row] = {}
        self._bitmask: torch.Tensor | None = None

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """The shape of our extra argument (the frontend builds it; this guards the engine)."""
        arg = (sampling_params.extra_args or {}).get(EXTRA_ARG)
        if arg is None:
            return
        ok = (
            isinstance(arg, dict)
            and isinstance(arg.get("kind"), str)
            and isinstance(arg.get("spec"), str)
            and isinstance(arg.get("resume"), list)
            and all(isinstance(t, int) for t in arg["resume"])
        )
        if not ok or sampling_params.structured_outputs is not None:
            raise ValueError(f"extra_args[{EXTRA_ARG!r}] is malformed")

    def is_argmax_invariant(self) -> bool:
        return False  # it masks tokens, greedy ones included

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, self._new_row)

    def _new_row(self, params: Any, _prompt: list[int] | None, output: list[int]) -> _Row | None:
        arg = (getattr(params, "extra_args", None) or {}).get(EXTRA_ARG)
        if arg is None:
            return None
        try:
            grammar = self._grammars.grammar(
                arg["kind"], arg["spec"], sorted(params.all_stop_token_ids)
            )
        except Exception:
            # The frontend compiled it already; raising here would kill vLLM's engine.
            log.exception("the grammar of a resumed request does not compile; not enforced")
            return None
        row = _Row(grammar.matcher, output)
        # The resumed ids, which vLLM sees as prompt (the frontend checked them), then what
        # a request re-added after preemption had generated before.
        row.take(arg["resume"], "resumed")
        row.catch_up()
        return row

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        import xgrammar as xgr

        if self._bitmask is None:
            self._bitmask = xgr.allocate_token_bitmask(self._max_rows, self._grammars.vocab_size)
        indices: list[int] = []
        for index, row in self._rows.items():
            # An exception here would kill the engine core and every request on the replica:
            # a row that fails is marked broken (unmasked from now on) and logged instead.
            try:
                row.catch_up()
                # False: every token is allowed here, nothing to mask.
                if row.masks and row.matcher.fill_next_token_bitmask(self._bitmask, index):
                    indices.append(index)
            except Exception:  # never raise into the engine core (see above)
                row.broken = True
                log.exception("resumed grammar of batch row %d failed; row left unmasked", index)
        if not indices:
            return logits
        try:
            if logits.is_cpu:
                xgr.apply_token_bitmask_inplace(logits, self._bitmask, indices=indices)
            else:
                xgr.apply_token_bitmask_inplace(
                    logits,
                    self._bitmask.to(logits.device, non_blocking=True),
                    indices=torch.tensor(indices, dtype=torch.int32).to(logits.device),
                )
        except Exception:
            log.exception("applying resumed grammars failed; this step is unmasked")
        return logits
