"""The seam of a vLLM request that continues another replica's (mid-stream failover).

The vLLM engine sends the resumed ids to vLLM as part of the prompt. vLLM then sees only the
tokens after the seam as output, which is wrong in three ways this module corrects:

- Text. vLLM's output processor detokenizes the output with a ``DecodeStream`` prefilled with
  the prompt. Prefilled with ids that end inside a multi-byte character (byte-level BPE splits
  "€" into three tokens), its first step fails the prefix check and it emits the whole prompt
  and resumed text again, or resets and loses the character's first bytes.
- Stop strings. vLLM looks for them in its output text only: one that starts in the resumed
  text and ends after the seam is missed. And while a stop string could still match, vLLM holds
  back the last ``len(stop) - 1`` characters of the text; the lost replica never sent those,
  and the new one would not know them.
- Stop tokens. A resume whose last id is EOS or a stop token id is a request that is over.

:class:`ResumeSeam` runs vLLM's own incremental detokenizer class (the one its output processor
would have built for the unfailed request) over the prompt, then the resumed ids, then the new
ids, so text, held-back characters and stop strings come out exactly as in the unfailed run.
vLLM itself is asked for token ids only (``detokenize=False``, no stop strings).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from llmesh.common.errors import InvalidArgument


class ResumeSeam:
    """Detokenizer and stop strings of one resumed request, as the unfailed request had them.

    Args:
        tokenizer: vLLM's tokenizer for the model (``AsyncLLM.get_tokenizer()``).
        request_id: For vLLM's log lines only.
        prompt_ids: The prompt as the unfailed request had it (without the resumed ids).
        sampling: vLLM's sampling parameters of the unfailed request (stop strings included),
            after ``update_from_generation_config``: its ``eos_token_id`` and ``stop_token_ids``
            decide whether the last resumed id ended the request.
        resume_ids: Ids the lost replica generated, in order.
        max_tokens: Tokens the unfailed request could generate (``max_tokens`` bounded by the
            context left after the prompt).
        vocab_size: Bounds the resumed ids.

    Raises:
        InvalidArgument: a resumed id is not in the vocabulary, or there are more resumed ids
            than the request could have generated.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        request_id: str,
        prompt_ids: Sequence[int],
        sampling: Any,
        resume_ids: Sequence[int],
        max_tokens: int,
        vocab_size: int,
    ) -> None:
        resume = [int(t) for t in resume_ids]
        bad = next((t for t in resume if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidArgument(
                f"resume_token_ids holds {bad}, not a token id of this model (ids are in "
                f"[0, {vocab_size})); resume with the ids the lost replica streamed"
            )
        if len(resume) > max_tokens:
            raise InvalidArgument(
                f"resume_token_ids has {len(resume)} ids but this request can generate at most "
                f"{max_tokens} (max_tokens, bounded by the context left after the prompt); "
                "resume with the same prompt and parameters the lost replica had"
            )
        from vllm.v1.engine.detokenizer import IncrementalDetokenizer

        # Duck-types the EngineCoreRequest fields the detokenizers read.
        request = SimpleNamespace(
            request_id=request_id,
            sampling_params=sampling,
            prompt_token_ids=list(prompt_ids),
            prompt_embeds=None,
        )
        self._detok = IncrementalDetokenizer.from_new_request(tokenizer, request)
        last = resume[-1] if resume else None
        # vLLM's scheduler (check_stop): EOS unless ignore_eos, then stop token ids.
        stop_token = last is not None and (
            last == sampling.eos_token_id or last in (sampling.stop_token_ids or ())
        )
        stop = self._detok.update(resume, stop_token)
        #: Why the request is over before any new token, or None when vLLM should continue it.
        self.finish_reason: str | None = None
        if stop is not None:
            self.finish_reason = "stop_string"
        elif stop_token:
            self.finish_reason = "stop"
        elif len(resume) >= max_tokens:
            self.finish_reason = "length"
        # The text the lost replica streamed up to its last chunk (the one carrying the last
        # resumed id): never sent again. What it held back for stop strings is still pending.
        self._detok.get_next_output_text(False, True)

    @property
    def completion_tokens(self) -> int:
        """Resumed plus new ids kept so far (a stop string drops the ids after it)."""
        return int(self._detok.num_output_tokens())

    def flush(self) -> str:
        """The text still pending when the request ends (what vLLM sends in its last output)."""
        return str(self._detok.get_next_output_text(True, True))

    def step(
        self, new_ids: Sequence[int], *, finished: bool, stop_terminated: bool
    ) -> tuple[list[int], str, str | None]:
        """Take the ids of one vLLM output; returns (ids kept, new text, matched stop string).

        Args:
            new_ids: The output's new token ids.
            finished: vLLM finished the request with this output.
            stop_terminated: vLLM finished it on EOS or a stop token id (that token is kept but
                not detokenized, as vLLM does).
        """
        before = self._detok.num_output_tokens()
        stop = self._detok.update(list(new_ids), stop_terminated)
        kept = list(self._detok.output_token_ids[before:])
        text = self._detok.get_next_output_text(finished or stop is not None, True)
        return kept, str(text), stop
