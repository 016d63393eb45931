"""What the mesh costs next to the engine: in-process engine vs the full mesh, same load.

Usage: .venv/bin/python benchmarks/mesh_overhead.py [--requests 16] [--max-tokens 64]
       [--concurrency 1 4]

(a) baseline: the transformers engine in this process, driven through its async API;
(b) the mesh: `llmesh up` (etcd, control plane, one worker process), the model deployed through
    the control plane, requests streamed with the SDK (`ByzerLLM.stream_chat_oai`), which routes
    from its WatchModel cache and talks to the worker over bidirectional gRPC.

Both run the same prompts with ignore_eos, so both generate exactly max_tokens per request.
Reports output tokens/s and TTFT; the verdict is the ratio mesh / in-process measured in this
one invocation. Results go to benchmarks/results/mesh_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [f"Tell me about topic number {i}." for i in range(256)]


def _bench_model(size: str) -> Path:
    """The model to serve: the test model ("tiny"), or a wider random Llama ("small", ~100M
    parameters, tens of ms per token on a CPU — closer to what a real engine spends per token)."""
    from llmesh.testing import make_test_model

    base = make_test_model(Path(tempfile.gettempdir()) / "llmesh-bench-tiny")
    if size == "tiny":
        return base
    out = Path(tempfile.gettempdir()) / "llmesh-bench-small"
    if (out / "config.json").exists():
        return out
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(base)
    config.update(
        {
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "head_dim": 128,
        }
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    for f in base.iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    return out


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def _summary(ttfts: list[float], tokens: int, wall: float) -> dict[str, float]:
    return {
        "output_tok_s": tokens / wall,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p99_ms": 1000 * _pct(ttfts, 0.99),
        "wall_s": wall,
        "tokens": tokens,
    }


async def _in_process(
    model_dir: Path, n: int, conc: int, max_tokens: int, params: dict[str, str]
) -> dict[str, float]:
    from llmesh.inference_worker.engines import create_engine
    from llmesh.inference_worker.engines.base import EngineConfig, SamplingParams

    engine = create_engine(EngineConfig("chat", str(model_dir), "transformers", params))
    await engine.start()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, extra={"ignore_eos": True})
    sem = asyncio.Semaphore(conc)
    ttfts: list[float] = []
    counts: list[int] = []

    async def one(i: int) -> None:
        async with sem:
            prompt = await engine.apply_chat_template(
                [{"role": "user", "content": PROMPTS[i]}], add_generation_prompt=True
            )
            t0 = time.perf_counter()
            first = None
            async for chunk in engine.generate(f"b{i}", prompt, params):
                if first is None and chunk.delta:
                    first = time.perf_counter() - t0
                if chunk.finish_reason:
                    counts.append(chunk.completion_tokens)
            ttfts.append(first or 0.0)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    finally:
        await engine.stop()
    return _summary(ttfts, sum(counts), wall)


def _mesh(llm: object, n: int, conc: int, max_tokens: int) -> dict[str, float]:
    ttfts: list[float] = []
    counts: list[int] = []
    lock = threading.Lock()
    cfg = {"max_length": max_tokens, "temperature": 0.0, "ignore_eos": True}

    def one(i: int) -> None:
        t0 = time.perf_counter()
        first = None
        last: dict = {}
        for text, meta in llm.stream_chat_oai(  # type: ignore[attr-defined]
            [{"role": "user", "content": PROMPTS[i]}], model="chat", llm_config=cfg
        ):
            if first is None and text:
                first = time.perf_counter() - t0
            last = meta
        with lock:
            ttfts.append(first or 0.0)
            counts.append(int(last["generated_tokens_count"]))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        list(pool.map(one, range(n)))
    return _summary(ttfts, sum(counts), time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--model", choices=["tiny", "small"], nargs="+", default=["tiny", "small"])
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="engine torch threads on both sides (0: torch's default, all cores)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from llmesh import ByzerLLM
    from llmesh.common.process import free_port

    address = f"127.0.0.1:{free_port()}"
    up = subprocess.Popen(
        [sys.executable, "-m", "llmesh", "up", "--listen", address, "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    rows = []
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if "ready" in line:
                break
        llm = ByzerLLM(control_plane=address)
        for size in args.model:
            model_dir = _bench_model(size)
            params = {"max_concurrency": str(max(args.concurrency))}
            if args.torch_threads:
                params["torch_threads"] = str(args.torch_threads)
            llm.setup_infer_backend("transformers").deploy(
                str(model_dir), "custom/llama", "chat", params
            )
            _mesh(llm, 2, 1, 4)  # warm-up: routes cached, channel open
            asyncio.run(_in_process(model_dir, 2, 1, 4, params))
            for conc in args.concurrency:
                base = asyncio.run(
                    _in_process(model_dir, args.requests, conc, args.max_tokens, params)
                )
                mesh = _mesh(llm, args.requests, conc, args.max_tokens)
                rows.append({"model": size, "concurrency": conc, "in_process": base, "mesh": mesh})
                print(
                    f"{size} c={conc}: in-process {base['output_tok_s']:.1f} tok/s, "
                    f"mesh {mesh['output_tok_s']:.1f} tok/s "
                    f"(ratio {mesh['output_tok_s'] / base['output_tok_s']:.3f}); "
                    f"TTFT p50 {base['ttft_p50_ms']:.1f} → {mesh['ttft_p50_ms']:.1f} ms",
                    flush=True,
                )
            llm.undeploy("chat")
        llm.close()
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{os.cpu_count()} CPUs, {sys.platform}, Python {sys.version.split()[0]}",
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "models": {
            "tiny": "llmesh test model (Llama, 2 layers, hidden 128)",
            "small": "random Llama, 8 layers, hidden 1024 (~100M parameters)",
        },
        "engine": "transformers, float32, CPU",
        "torch_threads": args.torch_threads or "default",
    }
    (out / "mesh_overhead.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [
        "| model | streams | in-process tok/s | mesh tok/s | mesh / in-process "
        "| TTFT p50 in-proc → mesh (ms) | TTFT p99 in-proc → mesh (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, m = r["in_process"], r["mesh"]
        lines.append(
            f"| {r['model']} | {r['concurrency']} "
            f"| {b['output_tok_s']:.1f} | {m['output_tok_s']:.1f} "
            f"| {m['output_tok_s'] / b['output_tok_s']:.3f} "
            f"| {b['ttft_p50_ms']:.1f} → {m['ttft_p50_ms']:.1f} "
            f"| {b['ttft_p99_ms']:.1f} → {m['ttft_p99_ms']:.1f} |"
        )
    table = "\n".join(lines)
    (out / "mesh_overhead.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
