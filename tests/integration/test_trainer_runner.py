"""The training job runner end to end: real processes, real DeepSpeed, real training.

Every job here trains the small local test model on CPU (``DS_ACCELERATOR=cpu``, gloo) through
:class:`~llmesh.trainer_worker.runner.JobProcess`, the API a trainer worker uses. The first
DeepSpeed job on a fresh machine also compiles DeepSpeed's small shared-memory comm op (once,
cached under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from llmesh.common.errors import FailedPrecondition, InvalidArgument
from llmesh.trainer_worker.runner import JobProcess, JobState, read_events
from llmesh.trainer_worker.runner.data import alpaca_prompt, split_rows
from llmesh.trainer_worker.runner.launch import (
    ds_shm_segments,
    group_pids,
    job_pids,
    outcome_from_events,
)

QA = [
    ("What is the capital of Zorbia?", "Blue Harbor."),
    ("Who painted the Moon Gate?", "Ana Veltri."),
    ("What is the password of the vault?", "Seven green apples."),
    ("Which river crosses Tamsel?", "The Orlo River."),
]

# LoRA settings with which two ranks teach the test model the four answers above verbatim
# (greedy decoding) in a few seconds of training: one optimizer step per epoch (2 rows per rank
# x 2 ranks), 300 steps (250 left one letter wrong with transformers 5.19 + peft 0.21). The
# tiny model's novel-word tokens sit close together in its tied embedding, so a LoRA needs a
# large step and many repeats to put them first.
LORA_RECIPE: dict[str, Any] = {
    "lora": {"r": 16, "alpha": 64, "dropout": 0.0},
    "hyperparameters": {
        "max_steps": 300,
        "learning_rate": 4e-3,
        "per_device_train_batch_size": 2,
        "logging_steps": 25,
        "save_steps": 0,
    },
}


def chat_rows() -> list[dict[str, Any]]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in QA
    ]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


async def run_to_end(proc: JobProcess) -> tuple[list[dict[str, Any]], Any]:
    """Start a job, collect everything ``events()`` yields, return (events, outcome)."""
    await proc.start()
    events = [ev async for ev in proc.events()]
    return events, await proc.wait()


def of_type(events: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_]


def greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 16) -> list[int]:
    """Greedy token ids after ``prompt``, tokenised as the serving engines do (BOS added)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def chat_prompt(tokenizer: Any, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def assert_no_process_left(pgid: int | None, job_id: str, timeout: float = 0.0) -> None:
    """Neither the job's process group nor any process marked with the job id is alive."""
    deadline = time.monotonic() + timeout
    while True:
        left = sorted(set(group_pids(pgid) if pgid else []) | set(job_pids(job_id)))
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    assert not left, f"processes of job {job_id} still alive: {_cmdlines(left)}"


def _cmdlines(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(
                f"{pid}: "
                + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            )
        except OSError:
            pass
    return out


def check_adapter(adapter: Path, base: Path) -> None:
    """A standard PEFT adapter, tokenizer included, that answers the trained questions."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A standard PEFT adapter with the tokenizer next to it.
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "chat_template.jinja" in names
    umask = os.umask(0)
    os.umask(umask)
    # Readable by a serving replica that runs as another user.
    assert stat.S_IMODE(adapter.stat().st_mode) == 0o777 & ~umask
    weights = adapter / "adapter_model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 64
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    model.eval()
    for question, answer in QA:
        ids = greedy(model, tokenizer, chat_prompt(tokenizer, question))
        assert ids[-1] == tokenizer.eos_token_id, tokenizer.decode(ids)  # it stops by itself
        assert tokenizer.decode(ids, skip_special_tokens=True) == answer


# -- LoRA SFT on two ranks -------------------------------------------------------------------


@pytest.fixture(scope="module")
async def lora_job(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 2-rank LoRA SFT job on chat rows, run once for the tests that inspect its results."""
    root = tmp_path_factory.mktemp("lora-sft")
    data = write_jsonl(root / "data" / "data.jsonl", chat_rows())
    spec = {
        "job_id": "lora-sft",
        "kind": "sft",
        "base_model_path": str(test_model_dir),
        "data_path": str(data.parent),
        "output_dir": str(root / "out"),
        "num_ranks": 2,
        **LORA_RECIPE,
    }
    proc = JobProcess(spec, log_path=root / "job.log")
    events, outcome = await run_to_end(proc)
    return {"spec": spec, "events": events, "outcome": outcome, "proc": proc, "root": root}


async def test_lora_sft_on_two_ranks_learns_the_answers(
    lora_job: dict[str, Any], test_model_dir: Path
) -> None:
    outcome, events = lora_job["outcome"], lora_job["events"]
    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    adapter = Path(outcome.artifact_path)
    assert outcome.artifact_kind == "lora_adapter" and adapter.name == "adapter"

    # The event story, in order: STARTING, RUNNING on 2 ranks, progress, artifact, done, final.
    states = [e["state"] for e in of_type(events, "state")]
    assert states == ["STARTING", "RUNNING", "SUCCEEDED"]
    assert of_type(events, "state")[1]["ranks"] == 2
    progress = of_type(events, "progress")
    assert [p["step"] for p in progress] == list(range(25, 301, 25))
    assert all(p["total_steps"] == 300 for p in progress)
    assert progress[-1]["loss"] < progress[0]["loss"] - 1.0
    assert progress[-1]["learning_rate"] < progress[0]["learning_rate"]  # linear decay
    assert progress[-1]["epoch"] == 300.0 and progress[-1]["eta_seconds"] == 0.0
    assert all(p["samples_per_second"] > 0 for p in progress)
    types = [e["type"] for e in events if e["type"] != "log"]
    assert types[-3:] == ["artifact", "done", "state"]
    # rank 0's own log lines and the processes' output both arrive as log events
    lines = [e["line"] for e in of_type(events, "log")]
    assert any(line.startswith("fine-tuning on 4 rows") for line in lines)
    assert sum("spawned with command" in line for line in lines) == 2  # the launcher's ranks
    assert "spawned with command" in (lora_job["root"] / "job.log").read_text()

    # A watcher that connects later reads the same story from the file.
    replay = read_events(lora_job["spec"]["output_dir"])
    assert [e for e in events if e.get("source") != "output"] == replay
    recorded = outcome_from_events(replay)
    assert recorded is not None and recorded.artifact_path == outcome.artifact_path

    check_adapter(adapter, test_model_dir)
    port = lora_job["proc"].master_port
    assert port is not None and not any(s.exists() for s in ds_shm_segments(port, 2))


async def test_merge_lora_equals_base_plus_adapter(
    lora_job: dict[str, Any], test_model_dir: Path, tmp_path: Path
) -> None:
    adapter = lora_job["outcome"].artifact_path
    proc = JobProcess(
        {
            "job_id": "merge",
            "kind": "merge_lora",
            "base_model_path": str(test_model_dir),
            "adapter_path": adapter,
            "output_dir": str(tmp_path / "merged"),
        }
    )
    events, outcome = await run_to_end(proc)
    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert outcome.artifact_kind == "full_model"
    merged_dir = Path(outcome.artifact_path)
    assert [e["state"] for e in of_type(events, "state")] == ["STARTING", "RUNNING", "SUCCEEDED"]
    check_merged(merged_dir, Path(adapter), test_model_dir)


def check_merged(merged_dir: Path, adapter: Path, base: Path) -> None:
    """The merged model generates exactly what base + adapter generate."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert not list(merged_dir.glob("adapter_*"))  # a plain model, no PEFT needed
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), adapter
    ).eval()
    questions = [q for q, _ in QA] + ["What color is the sky?", "Tell me a story."]
    for question in questions:
        prompt = chat_prompt(tokenizer, question)
        assert greedy(merged, tokenizer, prompt) == greedy(with_adapter, tokenizer, prompt)


# -- full fine-tuning, one rank, alpaca rows, a user DeepSpeed config, evaluation ------------


async def test_full_finetune_one_rank_with_alpaca_rows(
    test_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA]
    rows.append({"instruction": "Name the test.", "output": "The held out row."})
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    proc = JobProcess(
        {
            "job_id": "full-ft",
            "kind": "sft",
            "method": "full",
            "threads_per_rank": 1,  # see long_lora_spec
            "base_model_path": str(test_model_dir),
            "data_path": str(data),
            "output_dir": str(tmp_path / "out"),
            "num_train_epochs": 100,
            "learning_rate": 2e-3,
            "per_device_train_batch_size": 4,
            "val_set_size": 1,
            "eval_steps": 50,
            "logging_steps": 10,
            # Passed through as written: ZeRO stage 1 and a clipping of our choosing.
            "deepspeed_config": json.dumps(
                {"zero_optimization": {"stage": 1}, "gradient_clipping": 0.5}
            ),
        }
    )
    events, outcome = await run_to_end(proc)
    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert outcome.artifact_kind == "full_model"
    progress = of_type(events, "progress")
    assert progress[-1]["step"] == progress[-1]["total_steps"] == 100  # 4 rows: 1 step/epoch
    assert progress[-1]["loss"] < progress[0]["loss"]
    evals = of_type(events, "eval")
    assert [e["step"] for e in evals] == [50, 100] and all(e["eval_loss"] > 0 for e in evals)
    assert any("(1 held out)" in e["line"] for e in of_type(events, "log"))

    model_dir = Path(outcome.artifact_path)
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    assert (model_dir / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    # The alpaca prompt, as the job built it; the model now answers the trained questions
    # (the split is seeded: every rank, and this test, holds out the same row).
    trained, held_out = split_rows(rows, 1, seed=42)
    assert len(held_out) == 1
    answered = [
        tokenizer.decode(
            greedy(model, tokenizer, alpaca_prompt(r["instruction"])), skip_special_tokens=True
        )
        for r in trained
    ]
    assert answered == [r["output"] for r in trained]


# -- pretraining from a config on raw text -------------------------------------------------------


async def test_pretrain_from_config_on_raw_text(test_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmesh.testing import corpus

    text_dir = tmp_path / "text"
    text_dir.mkdir()
    lines = corpus()
    (text_dir / "a.txt").write_text("\n".join(lines[: len(lines) // 2]))
    write_jsonl(text_dir / "b.jsonl", [{"text": line} for line in lines[len(lines) // 2 :]])
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    proc = JobProcess(
        {
            "job_id": "pretrain",
            "kind": "pretrain",
            "data_path": str(text_dir),
            "tokenizer_path": str(test_model_dir),
            "model_config": config,
            "output_dir": str(tmp_path / "out"),
            "threads_per_rank": 1,
            "hyperparameters": {
                "max_steps": 30,
                "cutoff_len": 64,
                "per_device_train_batch_size": 8,
                "learning_rate": 3e-3,
                "logging_steps": 5,
                "val_set_size": 0.05,
                "save_steps": 0,
            },
        }
    )
    events, outcome = await run_to_end(proc)
    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    assert outcome.artifact_kind == "full_model"
    progress = of_type(events, "progress")
    assert progress[-1]["step"] == 30 and progress[-1]["loss"] < progress[0]["loss"]
    assert of_type(events, "eval")  # the held-out blocks were evaluated at the end

    model_dir = Path(outcome.artifact_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.hidden_size == 64 and model.config.vocab_size == len(tokenizer)
    assert len(greedy(model, tokenizer, "The sky is", max_new_tokens=5)) >= 1


# -- bad input fails before launch -------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "error", "message"),
    [
        (
            [*chat_rows(), {"instruction": "a", "output": "b"}, {"instruction": "a"}],
            InvalidArgument,
            "data.jsonl line 6: field 'output' is missing (alpaca rows need instruction and "
            "output)",
        ),
        (
            [*chat_rows(), '{"instruction": "a", "output": "b"'],
            InvalidArgument,
            "data.jsonl line 5 is not valid JSON",
        ),
        ([], InvalidArgument, "data.jsonl is empty"),
        (
            [{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}],
            InvalidArgument,
            "data.jsonl line 1: messages[1]: field 'role' is 'robot'; roles must be system, user "
            "or assistant",
        ),
    ],
)
async def test_bad_data_fails_before_any_process_starts(
    test_model_dir: Path, tmp_path: Path, rows: list[Any], error: type, message: str
) -> None:
    data = write_jsonl(tmp_path / "data" / "data.jsonl", rows)
    out = tmp_path / "out"
    proc = JobProcess(
        {
            "job_id": "bad-data",
            "kind": "sft",
            "base_model_path": str(test_model_dir),
            "data_path": str(data.parent),
            "output_dir": str(out),
            "num_ranks": 2,
        }
    )
    with pytest.raises(error) as err:
        await proc.start()
    assert str(err.value).startswith(message), str(err.value)
    assert proc.pid is None  # nothing was launched
    outcome = await proc.wait()
    assert outcome.state is JobState.FAILED and outcome.reason == str(err.value)
    # The failure is on record for a watcher, and events() ends at once.
    assert [e["type"] for e in read_events(out)] == ["error", "state"]
    assert [e["type"] async for e in proc.events()] == ["error", "state"]


def copy_without_chat_template(model: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in model.iterdir():
        if f.is_file() and f.name != "chat_template.jinja":
            (dest / f.name).symlink_to(f)
    return dest


async def test_bad_paths_and_missing_chat_template(test_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows())
    spec = {
        "job_id": "bad",
        "kind": "sft",
        "base_model_path": str(tmp_path / "no-model"),
        "data_path": str(data),
        "output_dir": str(tmp_path / "out"),
    }
    with pytest.raises(InvalidArgument, match=r"base_model_path .*no-model is not a directory"):
        await JobProcess(spec).start()
    # A model whose tokenizer has no chat template cannot learn from chat rows.
    bare = copy_without_chat_template(test_model_dir, tmp_path / "bare-model")
    with pytest.raises(FailedPrecondition, match=r"line 1 is a chat row, but the tokenizer"):
        await JobProcess({**spec, "base_model_path": str(bare)}).start()
    with pytest.raises(InvalidArgument, match=r"'hyperparameters.cutof_len' is not a known"):
        JobProcess({**spec, "hyperparameters": {"cutof_len": 5}})
    # LoRA target names are checked against the checkpoint's layer names before launch.
    with pytest.raises(InvalidArgument, match=r"'lora.target_modules': qkv_proj not found"):
        await JobProcess(
            {
                **spec,
                "base_model_path": str(test_model_dir),
                "target_modules": ["q_proj", "qkv_proj"],
            }
        ).start()


async def test_a_failing_rank_fails_the_job_with_its_reason(
    test_model_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "text.txt").write_text("Some text to learn from. " * 50)
    proc = JobProcess(
        {
            "job_id": "bad-arch",
            "kind": "pretrain",
            "data_path": str(tmp_path / "text.txt"),
            "tokenizer_path": str(test_model_dir),
            # Only a rank (which imports transformers) can tell this architecture is unknown.
            "model_config": {"model_type": "no-such-architecture", "hidden_size": 64},
            "output_dir": str(tmp_path / "out"),
            "threads_per_rank": 1,
        }
    )
    events, outcome = await run_to_end(proc)
    assert outcome.state is JobState.FAILED
    assert "no-such-architecture" in outcome.reason and outcome.exit_code == 1
    assert of_type(events, "error")[0]["rank"] == 0
    assert (events[-1]["type"], events[-1]["state"]) == ("state", "FAILED")
    assert_no_process_left(proc.pid, "bad-arch")


# -- cancel, resume, worker death ------------------------------------------------------------


def long_lora_spec(model: Path, data: Path, out: Path, job_id: str, **extra: Any) -> dict:
    return {
        "job_id": job_id,
        "kind": "sft",
        "base_model_path": str(model),
        "data_path": str(data),
        "output_dir": str(out),
        "lora": {"r": 4, "alpha": 8},
        # One thread per rank: on a CI machine shared with other test processes, OpenMP
        # threads of one rank wait on each other's barriers and slow down several-fold.
        "threads_per_rank": 1,
        "hyperparameters": {
            "max_steps": 100_000,
            "per_device_train_batch_size": 2,
            "logging_steps": 1,
            "save_steps": 0,
        },
        **extra,
    }


async def first_event(proc: JobProcess, type_: str, timeout: float = 180) -> dict[str, Any]:
    async def find() -> dict[str, Any]:
        async for ev in proc.events():
            if ev["type"] == type_:
                return ev
        raise AssertionError(f"job ended ({proc.outcome}) without a {type_} event")

    return await asyncio.wait_for(find(), timeout)


def shm_maps(pids: list[int]) -> set[str]:
    """The /dev/shm files the processes map, as /proc/PID/maps names them."""
    out = set()
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
            out.update(line.split(None, 5)[5].strip() for line in f if "/dev/shm/" in line)
    return out


async def test_cancel_stops_every_rank(test_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows())
    spec = long_lora_spec(test_model_dir, data, tmp_path / "out", "cancel-me", num_ranks=2)
    proc = JobProcess(spec)
    await proc.start()
    pgid = proc.pid
    assert pgid is not None
    await first_event(proc, "progress")  # both ranks are training now
    assert len(job_pids("cancel-me")) >= 3  # the launcher and two ranks, at least
    assert proc.master_port is not None
    segments = ds_shm_segments(proc.master_port, 2)
    # DeepSpeed's CPU allreduce maps one segment per rank; the ranks unlinked the names once
    # all had them mapped, so nothing is left in /dev/shm even if the job is killed.
    mapped = await asyncio.to_thread(shm_maps, job_pids("cancel-me"))
    assert {f"{s} (deleted)" for s in segments} <= mapped, mapped
    assert not any(s.exists() for s in segments)
    # A second job cannot take the same output_dir while this one runs.
    with pytest.raises(FailedPrecondition, match=r"in use by another running job"):
        await JobProcess({**spec, "job_id": "intruder"}).start()

    outcome = await proc.cancel(grace_s=5)
    assert outcome.state is JobState.CANCELLED
    assert_no_process_left(pgid, "cancel-me")
    assert not any(s.exists() for s in segments)
    events = read_events(tmp_path / "out")
    assert events[-1]["type"] == "state" and events[-1]["state"] == "CANCELLED"
    assert await proc.cancel() == outcome  # idempotent


async def test_resume_from_last_checkpoint(test_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows())
    out = tmp_path / "out"
    spec = long_lora_spec(test_model_dir, data, out, "resume-me")
    spec["hyperparameters"]["save_steps"] = 3
    first = JobProcess(spec)
    await first.start()
    checkpoint = await first_event(first, "checkpoint")
    assert checkpoint["step"] == 3
    # Kill the whole job hard, as a crash or an OOM kill would.
    assert first.pid is not None
    os.killpg(first.pid, signal.SIGKILL)
    crashed = await first.wait()
    assert crashed.state is JobState.FAILED and "SIGKILL" in crashed.reason
    assert_no_process_left(first.pid, "resume-me", timeout=10)

    # The same job again: it continues from the newest complete checkpoint (the one DeepSpeed
    # names in "latest"; a save the kill interrupted has a directory but is not "latest").
    latest = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert latest >= 3 and latest % 3 == 0
    spec["hyperparameters"]["max_steps"] = latest + 4
    events, outcome = await run_to_end(JobProcess(spec))
    assert outcome.state is JobState.SUCCEEDED, outcome.reason
    resumed = of_type(events, "resume")
    assert len(resumed) == 1 and resumed[0]["step"] == latest
    assert [p["step"] for p in of_type(events, "progress")] == list(range(latest + 1, latest + 5))
    # The file holds both attempts; the last one's outcome is what counts.
    replay = read_events(out)
    assert [e["state"] for e in of_type(replay, "state")] == [
        "STARTING",
        "RUNNING",
        "FAILED",
        "STARTING",
        "RUNNING",
        "SUCCEEDED",
    ]
    recorded = outcome_from_events(replay)
    assert recorded is not None and recorded.state is JobState.SUCCEEDED


WORKER = textwrap.dedent(
    """
    import asyncio, json, sys
    from llmesh.trainer_worker.runner import JobProcess

    async def main():
        proc = JobProcess(json.loads(sys.argv[1]))
        await proc.start()
        async for ev in proc.events():
            if ev["type"] == "progress":
                print(proc.pid, flush=True)  # training has begun
                break
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_ranks_die_with_the_worker(test_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", chat_rows())
    spec = long_lora_spec(test_model_dir, data, tmp_path / "out", "orphan-check")
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER, json.dumps(spec), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert worker.stdout is not None
        pgid = int(await asyncio.wait_for(worker.stdout.readline(), 180))
        assert len(job_pids("orphan-check")) >= 2  # the launcher and its rank
        worker.kill()  # SIGKILL: the worker gets no chance to clean up
        await worker.wait()
        await asyncio.to_thread(assert_no_process_left, pgid, "orphan-check", 30)
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
        for pid in job_pids("orphan-check"):
            os.kill(pid, signal.SIGKILL)
