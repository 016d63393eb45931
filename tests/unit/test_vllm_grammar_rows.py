"""The per-request grammar state of vLLM's resumed structured output (``vllm_grammar._Row``):
how it follows vLLM's live output list, with a toy vocabulary instead of a model."""

from __future__ import annotations

import pytest

xgr = pytest.importorskip("xgrammar")
pytest.importorskip("vllm")

from llmesh.inference_worker.engines.vllm_grammar import _Row  # noqa: E402

VOCAB = ["<eos>", "a", "b", "c"]
EOS, A, B, C = range(4)


def row(output: list[int]) -> _Row:
    info = xgr.TokenizerInfo(VOCAB, xgr.VocabType.RAW, stop_token_ids=[EOS])
    compiled = xgr.GrammarCompiler(info).compile_regex("ab+c")
    return _Row(xgr.GrammarMatcher(compiled), output)


def allowed(r: _Row) -> set[int]:
    mask = xgr.allocate_token_bitmask(1, len(VOCAB))
    r.matcher.fill_next_token_bitmask(mask)
    return {t for t in range(len(VOCAB)) if int(mask[0, t // 32]) >> (t % 32) & 1}


def test_follows_the_output_list_and_waits_for_placeholders() -> None:
    output: list[int] = []
    r = row(output)
    assert r.take([A], "resumed") == 1 and allowed(r) == {B}
    output += [B, -1]  # async scheduling: the second id is still on its way
    r.catch_up()
    assert (r.taken, r.fed) == (1, 1) and allowed(r) == {B, C}
    output[-1] = C
    r.catch_up()
    assert (r.taken, r.fed) == (2, 2) and allowed(r) == {EOS}
    output.append(EOS)
    r.catch_up()
    assert r.ended and not r.masks
    output.append(A)  # after the end (ignore_eos): not the grammar's
    r.catch_up()
    assert (r.taken, r.fed) == (4, 3) and not r.broken


def test_dropped_ids_are_rolled_back() -> None:
    output = [B, B, C]
    r = row(output)
    r.take([A], "resumed")
    r.catch_up()
    assert r.fed == 3 and allowed(r) == {EOS}
    del output[1:]  # vLLM discarded two ids
    r.catch_up()
    assert (r.taken, r.fed) == (1, 1) and allowed(r) == {B, C}
    output.append(C)
    r.catch_up()
    assert allowed(r) == {EOS}


def test_a_refused_id_stops_masking_without_raising() -> None:
    output = [C]
    r = row(output)
    r.take([A], "resumed")
    r.catch_up()
    assert r.broken and not r.masks and r.fed == 0
