"""``llmesh bench``: a serving load generator in the style of ``vllm bench serve``.

One invocation runs the same load (the same prompts, output lengths and concurrency levels)
against up to four ways of serving the same local model, one after another (never two engines
at once):

``asyncllm``
    vLLM v1 ``AsyncLLM`` in this process, driven directly: the limit for anything in front of it.
``mesh-vllm``
    The full mesh: etcd, a control plane and one inference worker, each a child process (the
    servers ``llmesh up`` runs), the model deployed with backend ``vllm``, requests streamed
    with the SDK (``ByzerLLM.async_stream_chat_oai``: route from the control plane's watch
    cache, then the bidi gRPC ``ChatSession`` stream the SDK keeps open to the replica).
``vllm-serve``
    vLLM's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``) driven
    over HTTP streaming (``/v1/completions``, server-sent events) with aiohttp.
``mesh-transformers``
    The mesh again, with the ``transformers`` engine.

The three vLLM modes get the same engine settings (``max_num_seqs``, ``max_model_len``,
``gpu_memory_utilization``, ``dtype``, eager mode, no per-request logging, no stats logging).

Load: ``--num-requests`` requests per concurrency level, at most ``--concurrency`` in flight,
issued at once or at ``--request-rate`` requests/s with Poisson arrivals (exponential gaps from
a seeded generator). Prompts are synthetic: random token ids from the model's tokenizer (special
tokens excluded), decoded to text and adjusted until the text encodes to exactly
``--input-len`` tokens, ending in a newline (so the mesh's ``empty`` role mapping sends the very
same text as a raw prompt). They depend only on ``--seed``; every mode gets the same ones, and
each concurrency level (and the warm-up) gets its own, so vLLM's prefix cache never serves a
prompt twice within a mode. The engines add BOS, so the prompt is ``input-len + 1`` tokens there.
With ``--ignore-eos`` (the default) every request produces exactly ``--output-len`` tokens.

Metrics, measured the same way in every mode, in this process:

- TTFT: from just before the request is sent (for the mesh: before the SDK call, so route
  lookup and stream set-up count) to the first delta that carries a token.
- ITL: the gaps between consecutive token-carrying deltas, pooled over all requests. A delta
  may carry several tokens (engines and the mesh merge deltas when a consumer lags); tokens are
  counted from token ids (vLLM outputs, the mesh's ``ChatResponse.token_ids``,
  ``return_token_ids`` on the OpenAI server) and the final usage.
- TPOT per request: ``(e2e - ttft) / (output_tokens - 1)``, where e2e runs to the end of the
  stream; requests with fewer than two output tokens have none.
- Output tokens/s and requests/s: completed output tokens (requests) over the wall time of the
  level, from the first send to the last completion.
- CPU: CPU seconds per output token spent by this process (``bench``: the load generator,
  and vLLM's frontend in ``asyncllm`` mode), by vLLM's engine processes (``engine``) and by the
  other servers started here (``server``: the mesh's processes, the OpenAI server), plus how
  many cores the rest of the machine kept busy meanwhile (other load skews every number).

Results go to ``OUT/NAME.json``, ``OUT/NAME.md`` (markdown tables) and ``OUT/NAME.png``
(matplotlib chart, ``pip install 'llmesh[plot]'``). The report prints the mesh's ratios against
in-process ``AsyncLLM`` and against ``vllm serve`` and whether each target is met; it never
fails on a missed target (it is a benchmark, not a test).

Entry points that run this must be guarded by ``if __name__ == "__main__":``: vLLM spawns
processes.
"""

from __future__ import annotations

# The package by role (the docstring above is also `--help`'s text, so the map is here):
# load_generator (prompts, issuing a level, per-request timing, percentiles and summaries),
# settings (modes, presets, BenchSettings), backends (the modes: AsyncLLM, the mesh, vllm
# serve, and their child processes), cpu (CPU accounting), report (targets, markdown, JSON,
# the run's description), chart (the PNG), runner (one mode after another), models (preset
# models) and command (options, settings from them, the `llmesh bench` handler); the
# standalone parser and `main` are below.
import argparse
import sys
from collections.abc import Sequence

from llmesh.bench.backends import (
    AsyncLLMBackend,
    Backend,
    MeshBackend,
    MeshCluster,
    VLLMServeBackend,
)
from llmesh.bench.chart import write_chart
from llmesh.bench.command import add_arguments, run, settings_from_args
from llmesh.bench.cpu import CPU_ROLES, CpuSnapshot, cpu_snapshot, cpu_usage
from llmesh.bench.load_generator import (
    Prompt,
    RequestResult,
    StreamClock,
    percentile,
    run_level,
    summarize,
    synthetic_prompts,
    tpot,
)
from llmesh.bench.models import bench_model
from llmesh.bench.report import (
    SERVE_RATIO_STREAMS,
    SERVE_RATIO_TARGET,
    THROUGHPUT_RATIO_TARGET,
    TTFT_P50_ADDED_MS_TARGET,
    TTFT_P99_ADDED_MS_TARGET,
    evaluate_targets,
    markdown_report,
    write_report,
)
from llmesh.bench.runner import run_benchmark
from llmesh.bench.settings import DEFAULTS, MODES, QUICK, BenchSettings
from llmesh.common.errors import LLMeshError

__all__ = [
    "CPU_ROLES",
    "DEFAULTS",
    "MODES",
    "QUICK",
    "SERVE_RATIO_STREAMS",
    "SERVE_RATIO_TARGET",
    "THROUGHPUT_RATIO_TARGET",
    "TTFT_P50_ADDED_MS_TARGET",
    "TTFT_P99_ADDED_MS_TARGET",
    "AsyncLLMBackend",
    "Backend",
    "BenchSettings",
    "CpuSnapshot",
    "MeshBackend",
    "MeshCluster",
    "Prompt",
    "RequestResult",
    "StreamClock",
    "VLLMServeBackend",
    "add_arguments",
    "bench_model",
    "build_parser",
    "cpu_snapshot",
    "cpu_usage",
    "evaluate_targets",
    "main",
    "markdown_report",
    "percentile",
    "run",
    "run_benchmark",
    "run_level",
    "settings_from_args",
    "summarize",
    "synthetic_prompts",
    "tpot",
    "write_chart",
    "write_report",
]


def build_parser(prog: str = "llmesh bench") -> argparse.ArgumentParser:
    """The benchmark's own parser (for ``main``)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "llmesh bench",
    default_out: str | None = None,
) -> int:
    """Run ``llmesh bench`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Args:
        argv: the options.
        prog: the command's name in usage lines and in the report.
        default_out: a different default for ``--out``.
    """
    parser = build_parser(prog)
    if default_out is not None:
        parser.set_defaults(out=default_out)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    args.bench_argv, args.bench_prog = argv, prog
    try:
        return run(args)
    except LLMeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
