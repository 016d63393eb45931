"""`llmesh bench`'s arithmetic and set-up: percentiles, TPOT, summaries, targets, prompts,
the load generator's concurrency cap and option resolution (engines: tests/e2e/test_bench.py)."""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmesh import bench, cli
from llmesh.bench import (
    Prompt,
    RequestResult,
    StreamClock,
    evaluate_targets,
    markdown_report,
    percentile,
    run_level,
    summarize,
    synthetic_prompts,
    tpot,
)
from llmesh.common.errors import InvalidArgument


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_matches_numpy_linear_interpolation(n: int) -> None:
    rng = random.Random(n)
    values = [rng.uniform(0, 50) for _ in range(n)]
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)


def test_percentile_edges() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # order of the input does not matter
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], -1)


def test_tpot_excludes_the_first_token() -> None:
    # 0.1 s to the first token, then 9 more tokens in 0.9 s: 0.1 s per token.
    assert tpot(1.0, 0.1, 10) == pytest.approx(0.1)
    assert tpot(0.5, 0.5, 2) == 0.0
    assert tpot(1.0, 0.1, 1) is None
    assert tpot(1.0, 0.1, 0) is None


def test_stream_clock_times_deltas_and_counts_tokens() -> None:
    clock = StreamClock()
    time.sleep(0.01)
    clock.delta(1)
    time.sleep(0.005)
    clock.delta(3)  # a merged delta: three tokens in one message
    clock.delta(1)
    r = clock.finish(prompt_tokens=33)
    assert r.ok and r.deltas == 3 and r.output_tokens == 5 and r.prompt_tokens == 33
    assert r.ttft >= 0.01
    assert len(r.itls) == 2 and r.itls[0] >= 0.005
    assert r.e2e >= r.ttft + sum(r.itls)
    # The final usage wins over the counted tokens.
    assert StreamClock().finish(output_tokens=7).output_tokens == 7


def test_stream_clock_without_tokens_or_with_an_error_is_a_failure() -> None:
    empty = StreamClock().finish()
    assert not empty.ok and "without any token" in empty.error
    failed = StreamClock().fail(ConnectionResetError("peer went away"))
    assert not failed.ok and failed.error == "ConnectionResetError: peer went away"


def _result(ttft: float, e2e: float, tokens: int, itls: list[float]) -> RequestResult:
    return RequestResult(
        ok=True,
        prompt_tokens=10,
        output_tokens=tokens,
        ttft=ttft,
        e2e=e2e,
        itls=itls,
        deltas=len(itls) + 1,
    )


def test_summarize_aggregates_completed_requests_only() -> None:
    results = [
        _result(0.010, 0.110, 11, [0.01] * 10),  # TPOT 10 ms
        _result(0.020, 0.220, 11, [0.02] * 10),  # TPOT 20 ms
        _result(0.030, 0.330, 11, [0.03] * 5 + [0.03] * 5),  # TPOT 30 ms
        RequestResult(ok=False, error="Unavailable: worker gone"),
    ]
    s = summarize(results, duration=2.0)
    assert (s["requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["errors"] == ["Unavailable: worker gone"]
    assert s["output_tokens"] == 33 and s["input_tokens"] == 30
    assert s["output_tok_s"] == pytest.approx(16.5)
    assert s["requests_s"] == pytest.approx(1.5)
    assert s["ttft_p50_ms"] == pytest.approx(20.0)
    assert s["ttft_mean_ms"] == pytest.approx(20.0)
    assert s["ttft_p99_ms"] == pytest.approx(29.8)
    assert s["tpot_p50_ms"] == pytest.approx(20.0)
    assert s["tpot_p99_ms"] == pytest.approx(29.8)
    assert s["itl_p50_ms"] == pytest.approx(20.0)  # pooled: 10 gaps of each request
    assert s["itl_mean_ms"] == pytest.approx(20.0)
    assert s["tokens_per_delta"] == pytest.approx(33 / 33)


def test_summarize_with_nothing_completed_has_no_latencies() -> None:
    s = summarize([RequestResult(ok=False, error="x")], duration=1.0)
    assert s["completed"] == 0 and s["output_tok_s"] == 0.0
    assert s["ttft_p50_ms"] is None and s["tpot_p99_ms"] is None and s["itl_mean_ms"] is None


def _level(tok_s: float, ttft50: float, ttft99: float) -> dict[str, Any]:
    return {
        "completed": 8,
        "output_tok_s": tok_s,
        "ttft_p50_ms": ttft50,
        "ttft_p99_ms": ttft99,
    }


def test_targets_compare_the_mesh_with_asyncllm_and_vllm_serve() -> None:
    modes = {
        "asyncllm": {"levels": {"1": _level(100, 10.0, 12.0), "32": _level(1000, 50.0, 80.0)}},
        "mesh-vllm": {"levels": {"1": _level(98, 10.5, 20.0), "32": _level(960, 52.0, 84.0)}},
        "vllm-serve": {"levels": {"1": _level(90, 11.0, 13.0), "32": _level(700, 60.0, 90.0)}},
    }
    checks = {(c["check"], c["streams"]): c for c in evaluate_targets(modes, [1, 32])}
    ratio1 = checks[("mesh / AsyncLLM output tok/s", 1)]
    assert ratio1["value"] == pytest.approx(0.98) and ratio1["met"] is True
    assert checks[("mesh / AsyncLLM output tok/s", 32)]["met"] is False  # 0.96
    assert checks[("mesh - AsyncLLM TTFT p50 (ms)", 1)]["value"] == pytest.approx(0.5)
    assert checks[("mesh - AsyncLLM TTFT p50 (ms)", 1)]["met"] is True
    assert checks[("mesh - AsyncLLM TTFT p50 (ms)", 32)]["met"] is False  # +2 ms
    assert checks[("mesh - AsyncLLM TTFT p99 (ms)", 1)]["met"] is False  # +8 ms
    assert checks[("mesh - AsyncLLM TTFT p99 (ms)", 32)]["met"] is True  # +4 ms
    serve = checks[("mesh / vllm serve output tok/s", 32)]
    assert serve["value"] == pytest.approx(960 / 700) and serve["met"] is True
    assert ("mesh / vllm serve output tok/s", 1) not in checks


def test_targets_without_a_mode_are_not_measured() -> None:
    modes = {"mesh-vllm": {"levels": {"4": _level(98, 10.5, 20.0)}}, "asyncllm": {"error": "x"}}
    checks = evaluate_targets(modes, [1, 4])
    assert all(c["met"] is None and c["value"] is None for c in checks)
    # Without 32 streams the serve comparison moves to the largest concurrency measured.
    assert checks[-1]["check"] == "mesh / vllm serve output tok/s" and checks[-1]["streams"] == 4


def test_markdown_report_has_a_row_per_mode_and_level() -> None:
    summary = summarize([_result(0.01, 0.11, 11, [0.01] * 10)], duration=1.0)
    report = {
        "meta": {"model": "m", "load": "l", "machine": "2 cores", "concurrency": [1, 4]},
        "modes": {
            "asyncllm": {"levels": {"1": summary, "4": summary}},
            "mesh-vllm": {"error": "FailedPrecondition: no vLLM", "levels": {}},
        },
        "targets": evaluate_targets({"asyncllm": {"levels": {"1": summary}}}, [1, 4]),
    }
    text = markdown_report(report)
    assert text.count("| in-process AsyncLLM | 11.0 |") == 2
    assert "| 1 | mesh (vllm) | failed: FailedPrecondition: no vLLM" in text
    assert "| mesh / AsyncLLM output tok/s | 1 | - | >= 0.97 | n/a |" in text


def test_cpu_usage_splits_by_role_and_counts_other_load() -> None:
    before = bench.CpuSnapshot(10.0, {"bench": 1.0, "server": 2.0, "engine": 3.0}, 100.0)
    after = bench.CpuSnapshot(12.0, {"bench": 1.5, "server": 3.0, "engine": 5.0}, 105.0)
    usage = bench.cpu_usage(before, after, output_tokens=1000)
    assert usage["cpu_s"] == pytest.approx({"bench": 0.5, "server": 1.0, "engine": 2.0})
    assert usage["cpu_ms_per_token"] == pytest.approx({"bench": 0.5, "server": 1.0, "engine": 2.0})
    assert usage["other_load_cores"] == pytest.approx((5.0 - 3.5) / 2.0)
    assert bench.cpu_usage(before, after, 0)["cpu_ms_per_token"]["bench"] is None


def test_cpu_snapshot_sees_this_process_work() -> None:
    before = bench.cpu_snapshot()
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    after = bench.cpu_snapshot()
    assert after.roles["bench"] - before.roles["bench"] >= 0.1
    assert after.machine_busy is not None and after.machine_busy > before.machine_busy


def test_synthetic_prompts_have_the_asked_length_and_depend_on_the_seed(
    test_model_dir: Path,
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(test_model_dir))
    prompts = synthetic_prompts(tok, 20, 48, seed=3)
    assert len(prompts) == 20
    for p in prompts:
        assert p.text.endswith("\n")
        assert p.tokens == 48 == len(tok.encode(p.text, add_special_tokens=False))
    assert synthetic_prompts(tok, 20, 48, seed=3) == prompts
    other = synthetic_prompts(tok, 20, 48, seed=4)
    assert {p.text for p in other}.isdisjoint({p.text for p in prompts})
    assert len({p.text for p in prompts}) == 20


def test_mesh_content_renders_back_to_the_prompt() -> None:
    from llmesh.templates import EMPTY_ROLE_MAPPING, render_with_role_mapping

    prompt = Prompt("some words\nand more\n", 5)
    rendered = render_with_role_mapping(
        [{"role": "user", "content": prompt.mesh_content}], EMPTY_ROLE_MAPPING
    )
    assert rendered == prompt.text


async def test_run_level_caps_the_streams_in_flight() -> None:
    in_flight = peak = 0
    seen: list[str] = []

    async def send(prompt: Prompt, request_id: str) -> RequestResult:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        seen.append(request_id)
        clock = StreamClock()
        await asyncio.sleep(0.005)
        clock.delta(1)
        in_flight -= 1
        return clock.finish()

    prompts = [Prompt(f"p{i}\n", 1) for i in range(12)]
    results, duration = await run_level(
        send, prompts, concurrency=3, request_rate=math.inf, seed=0, tag="t"
    )
    assert peak == 3 and len(results) == 12 and all(r.ok for r in results)
    assert sorted(seen) == sorted(f"t-{i}" for i in range(12))
    assert duration >= 4 * 0.005  # four waves of three


async def test_run_level_spaces_arrivals_at_the_request_rate() -> None:
    starts: list[float] = []

    async def send(prompt: Prompt, request_id: str) -> RequestResult:
        starts.append(time.perf_counter())
        clock = StreamClock()
        clock.delta(1)
        return clock.finish()

    prompts = [Prompt("p\n", 1)] * 20
    _, duration = await run_level(
        send, prompts, concurrency=20, request_rate=200.0, seed=1, tag="r"
    )
    gaps = random.Random(1)
    expected = sum(gaps.expovariate(200.0) for _ in range(19))
    assert duration >= expected * 0.9  # sleeps never return early


def _args(*argv: str) -> argparse.Namespace:
    args = cli.build_parser().parse_args(["bench", *argv])
    assert args.func is bench.run
    return args


def test_quick_preset_and_explicit_options(test_model_dir: Path, tmp_path: Path) -> None:
    model = ["--model", str(test_model_dir), "--out", str(tmp_path)]
    s = bench.settings_from_args(_args("--quick", *model), [])
    assert s.concurrency == [1, 4] and s.input_len == 32 and s.output_len == 16
    assert s.num_requests == {1: 4, 4: 4} and s.warmup == 1 and s.modes == list(bench.MODES)
    assert s.max_num_seqs == 4 and s.max_model_len == 32 + 16 + 1 + 15
    assert s.vllm_infer_params()["max_concurrency"] == "4"
    s = bench.settings_from_args(
        _args(
            "--quick", "--concurrency", "8", "2", "--output-len", "5", "--modes", "asyncllm", *model
        ),
        [],
    )
    assert s.concurrency == [2, 8] and s.output_len == 5 and s.modes == ["asyncllm"]
    s = bench.settings_from_args(_args(*model), [])
    assert s.concurrency == [1, 8, 32, 128] and s.input_len == 512 and s.num_requests == {}
    assert [s.requests_for(c) for c in s.concurrency] == [16, 32, 128, 512]
    s = bench.settings_from_args(
        _args(*model, "--concurrency", "32", "1", "--num-requests", "64", "10"), []
    )
    assert s.concurrency == [1, 32] and s.requests_for(1) == 10 and s.requests_for(32) == 64


def test_bad_model_and_lengths_are_refused(test_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a model directory"):
        bench.settings_from_args(_args("--model", str(tmp_path)), [])
    with pytest.raises(InvalidArgument, match="shorten them"):
        bench.settings_from_args(
            _args("--model", str(test_model_dir), "--input-len", "2040", "--output-len", "16"), []
        )
    with pytest.raises(InvalidArgument, match="raise --max-model-len"):
        bench.settings_from_args(
            _args("--model", str(test_model_dir), "--quick", "--max-model-len", "40"), []
        )
    with pytest.raises(InvalidArgument, match="one per level"):
        bench.settings_from_args(
            _args("--model", str(test_model_dir), "--quick", "--num-requests", "1", "2", "3"), []
        )
    with pytest.raises(InvalidArgument, match="repeats a value"):
        bench.settings_from_args(
            _args("--model", str(test_model_dir), "--concurrency", "4", "4"), []
        )
    assert cli.main(["bench", "--model", str(tmp_path)]) == 1
    assert cli.main(["bench", "--concurrency", "0"]) == 2
