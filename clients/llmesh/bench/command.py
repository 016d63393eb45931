"""``llmesh bench``'s options and handler: :func:`add_arguments` (English or Chinese help, as
the CLI speaks), :func:`settings_from_args` (explicit options over ``--quick`` over defaults)
and :func:`run`."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmesh.arg_types import non_negative_int, positive_int
from llmesh.bench.models import bench_model, cache_dir, model_max_len
from llmesh.bench.runner import run_benchmark
from llmesh.bench.settings import DEFAULTS, MODES, QUICK, BenchSettings
from llmesh.common.errors import InvalidArgument
from llmesh.i18n import t


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected requests per second or 'inf', got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0 (or inf), got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser`` (``llmesh bench`` and benchmarks/serving.py)."""
    p = parser.add_argument
    p(
        "--model",
        default=None,
        metavar="PATH",
        help=t(
            "local HuggingFace-layout model directory (default: build --model-preset)",
            "本地 HuggingFace 格式的模型目录（默认：构建 --model-preset 指定的模型）",
        ),
    )
    p(
        "--model-preset",
        choices=("tiny", "small"),
        default="tiny",
        help=t(
            "model to build when --model is not given: tiny = the llmesh test model, "
            "small = a random 8-layer Llama (~100M parameters) (default: %(default)s)",
            "未给 --model 时构建的模型：tiny = llmesh 测试模型，small = 随机初始化的 8 层 "
            "Llama（约 1 亿参数）（默认：%(default)s）",
        ),
    )
    p(
        "--cache-dir",
        default=None,
        help=t(
            "where preset models are built (default: ~/.cache/llmesh/bench)",
            "构建预设模型的目录（默认：~/.cache/llmesh/bench）",
        ),
    )
    p(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=None,
        metavar="MODE",
        help=t(
            "what to measure (default: all): " + ", ".join(f"{k} = {v}" for k, v in MODES.items()),
            "要测的方式（默认：全部）：asyncllm = 进程内 AsyncLLM，mesh-vllm = 网格（vllm），"
            "vllm-serve = vLLM 自带的 OpenAI 服务（HTTP），"
            "mesh-transformers = 网格（transformers）",
        ),
    )
    p(
        "--concurrency",
        nargs="+",
        type=positive_int,
        default=None,
        metavar="N",
        help=t(
            "concurrent streams, one level each (default: 1 8 32 128; --quick: 1 4)",
            "并发流数，每个值测一轮（默认：1 8 32 128；--quick：1 4）",
        ),
    )
    p(
        "--num-requests",
        nargs="+",
        type=positive_int,
        default=None,
        metavar="N",
        help=t(
            "requests per level: one count for all, or one per --concurrency value "
            "(default: max(16, 4 x concurrency); --quick: 4)",
            "每轮的请求数：一个值用于所有轮，或按 --concurrency 逐个给出"
            "（默认：max(16, 4 x 并发数)；--quick：4）",
        ),
    )
    p(
        "--request-rate",
        type=_rate,
        default=math.inf,
        help=t(
            "requests per second with Poisson arrivals, or inf to send all at once (default: inf)",
            "每秒请求数（泊松到达），inf 表示一次全部发出（默认：inf）",
        ),
    )
    p(
        "--input-len",
        type=positive_int,
        default=None,
        help=t(
            "prompt length in tokens (default: 512; --quick: 32)",
            "提示词长度（token 数）（默认：512；--quick：32）",
        ),
    )
    p(
        "--output-len",
        type=positive_int,
        default=None,
        help=t(
            "tokens to generate per request (default: 128; --quick: 16)",
            "每个请求生成的 token 数（默认：128；--quick：16）",
        ),
    )
    p(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=t(
            "keep generating past EOS so every request yields --output-len tokens (default: on)",
            "遇到 EOS 也继续生成，使每个请求都生成 --output-len 个 token（默认：开）",
        ),
    )
    p(
        "--seed",
        type=int,
        default=0,
        help=t(
            "seed of prompts and arrivals (default: 0)", "提示词和到达时间的随机种子（默认：0）"
        ),
    )
    p(
        "--warmup",
        type=non_negative_int,
        default=None,
        help=t(
            "warm-up requests per mode, not measured (default: 4; --quick: 1)",
            "每种方式的预热请求数，不计入结果（默认：4；--quick：1）",
        ),
    )
    p(
        "--max-num-seqs",
        type=positive_int,
        default=None,
        help=t(
            "vLLM batch size (default: the largest --concurrency)",
            "vLLM 的批大小（默认：最大的 --concurrency）",
        ),
    )
    p(
        "--max-model-len",
        type=positive_int,
        default=None,
        help=t(
            "context length given to every engine (default: input + output + 16, "
            "at most the model's)",
            "每个引擎的上下文长度（默认：输入 + 输出 + 16，不超过模型自身的）",
        ),
    )
    p(
        "--gpu-memory-utilization",
        type=_fraction,
        default=None,
        help=t(
            "vLLM memory fraction (host memory on the CPU build) (default: 0.9 GPU, 0.2 CPU)",
            "vLLM 可用的内存比例（CPU 版本指主机内存）（默认：GPU 0.9，CPU 0.2）",
        ),
    )
    p(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16"),
        help=t("model dtype for every engine (default: auto)", "所有引擎的模型精度（默认：auto）"),
    )
    p(
        "--out",
        default="bench-results",
        help=t(
            "directory for NAME.json, NAME.md and NAME.png (default: %(default)s)",
            "写入 NAME.json、NAME.md 和 NAME.png 的目录（默认：%(default)s）",
        ),
    )
    p(
        "--name",
        default="serving",
        help=t(
            "file name stem of the results (default: %(default)s)",
            "结果文件名（默认：%(default)s）",
        ),
    )
    p(
        "--startup-timeout",
        type=float,
        default=600.0,
        help=t(
            "seconds an engine or server may take to come up (default: %(default)s)",
            "引擎或服务启动的最长等待秒数（默认：%(default)s）",
        ),
    )
    p(
        "--quick",
        action="store_true",
        help=t(
            "smoke-run preset: concurrency 1 4, 4 requests per level, 32-token prompts, "
            "16-token outputs, 1 warm-up request (explicit options still win)",
            "冒烟测试预设：并发 1 4，每轮 4 个请求，32 token 提示词，16 token 输出，"
            "1 个预热请求（显式给出的选项优先）",
        ),
    )


def settings_from_args(
    args: argparse.Namespace, argv: Sequence[str] | None = None, prog: str = "llmesh bench"
) -> BenchSettings:
    """Resolve the options (explicit > ``--quick`` > defaults), build or check the model.

    ``argv`` and ``prog`` are only recorded (the command line in the report); ``argv`` defaults
    to this process's arguments after the ``bench`` subcommand.

    Raises:
        InvalidArgument: a model directory that is not one, or lengths that do not fit the
            context.
    """
    preset = QUICK if args.quick else DEFAULTS
    if argv is None:
        argv = sys.argv[1:]
        if "bench" in argv:
            argv = argv[argv.index("bench") + 1 :]

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return preset[name] if value is None else value

    given_concurrency = list(pick("concurrency"))
    if len(set(given_concurrency)) != len(given_concurrency):
        raise InvalidArgument(
            f"--concurrency {' '.join(map(str, given_concurrency))} repeats a value; "
            "give each level once"
        )
    num_requests = _requests_per_level(pick("num_requests"), given_concurrency)
    concurrency = sorted(given_concurrency)
    input_len, output_len = int(pick("input_len")), int(pick("output_len"))
    if args.model:
        model = Path(args.model).expanduser().resolve()
        if not (model / "config.json").is_file():
            raise InvalidArgument(
                f"--model {args.model} is not a model directory (no config.json there); give a "
                "local HuggingFace-layout directory, or leave --model out to build the test model"
            )
        desc = model.name
    else:
        model, desc = bench_model(args.model_preset, cache_dir(args.cache_dir))
    limit = model_max_len(model)
    need = input_len + output_len + 1  # + BOS
    max_model_len = args.max_model_len or (min(need + 15, limit) if limit else need + 15)
    if need > max_model_len or (limit and need > limit):
        raise InvalidArgument(
            f"--input-len {input_len} + --output-len {output_len} + BOS needs {need} tokens of "
            f"context, more than {min(max_model_len, limit or max_model_len)}; shorten them"
            + ("" if args.max_model_len is None else " or raise --max-model-len")
        )
    cuda = _cuda()
    gpu_mem = args.gpu_memory_utilization or (0.9 if cuda else 0.2)
    modes = [m for m in MODES if m in (args.modes or list(MODES))]
    return BenchSettings(
        model=model,
        model_desc=desc,
        modes=modes,
        concurrency=concurrency,
        num_requests=num_requests,
        request_rate=args.request_rate,
        input_len=input_len,
        output_len=output_len,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
        warmup=int(pick("warmup")),
        max_num_seqs=args.max_num_seqs or max(concurrency),
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_mem,
        dtype=args.dtype,
        # As the mesh's vllm engine decides it: eager on CPU (compiling costs minutes there).
        enforce_eager=not cuda,
        out=Path(args.out).expanduser(),
        name=args.name,
        startup_timeout=args.startup_timeout,
        command=shlex.join([*prog.split(), *argv]),
    )


def _requests_per_level(given: int | list[int] | None, concurrency: list[int]) -> dict[int, int]:
    """``--num-requests``: nothing (the default rule), one count for all levels, or one count
    per ``--concurrency`` value in the order given."""
    if given is None:
        return {}
    counts = [given] if isinstance(given, int) else list(given)
    if len(counts) == 1:
        return dict.fromkeys(concurrency, counts[0])
    if len(counts) != len(concurrency):
        raise InvalidArgument(
            f"--num-requests has {len(counts)} values for {len(concurrency)} --concurrency "
            "levels; give one count for all levels or one per level"
        )
    return dict(zip(concurrency, counts, strict=True))


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed ``args`` (``llmesh bench``'s handler).

    Returns:
        0 when every mode ran, 1 when one failed (its error is in the report). Missed targets
        do not change it.
    """
    settings = settings_from_args(
        args, getattr(args, "bench_argv", None), getattr(args, "bench_prog", "llmesh bench")
    )
    report = run_benchmark(settings)
    failed = [m for m, d in report["modes"].items() if d.get("error")]
    if failed:
        print(f"error: mode(s) {', '.join(failed)} failed; see the report", file=sys.stderr)
        return 1
    return 0
