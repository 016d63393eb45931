"""Training jobs on the client side, without servers: Byzer-LLM's typed parameters, the mapping
onto ``TrainingJobSpec``, the watch bookkeeping, progress lines, the loss PNG and CLI parsing."""

from __future__ import annotations

import argparse
import io
import json
import re
import struct
import time
from pathlib import Path

import pytest

from llmesh import cli, i18n
from llmesh.cli import training as cli_training
from llmesh.client import ByzerLLM
from llmesh.common.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from llmesh.training import (
    TrainingJobFailed,
    merge_lora_spec,
    parse_params,
    pretrain_spec,
    sft_spec,
    split_json_config,
)
from llmesh.training_watch import (
    JobTracker,
    LossCurve,
    ProgressView,
    WatchLoop,
    format_age,
    format_duration,
    format_job_row,
    format_progress,
    parse_states,
    write_loss_png,
)
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import trainer_service_pb2 as tr

S = tr.TrainingJobState


def sft(**kwargs: object) -> tr.TrainingJobSpec:
    kwargs.setdefault("local_data_dir_path", "/data")
    kwargs.setdefault("local_model_path", "/models/base")
    return sft_spec(**kwargs)  # type: ignore[arg-type]


# -- Byzer-LLM's parse_params ---------------------------------------------------------------------


def test_parse_params_follows_byzers_typed_keys() -> None:
    params = {
        "sft.float.learning_rate": "2e-4",
        "sft.int.num_train_epochs": "3",
        "sft.bool.train_on_inputs": "true",
        "sft.bool.other": "false",
        "sft.str.lr_scheduler_type": "cosine",
        "sft.list.target_modules": '["q_proj", "v_proj"]',
        "sft.dict.extra": '{"a": 1}',
        "pretrain.int.max_steps": "9",  # another prefix: skipped, as Byzer-LLM did
        "plain": "x",
    }
    assert parse_params(params, "sft") == {
        "learning_rate": 2e-4,
        "num_train_epochs": 3,
        "train_on_inputs": True,
        "other": False,
        "lr_scheduler_type": "cosine",
        "target_modules": ["q_proj", "v_proj"],
        "extra": {"a": 1},
    }
    # Already typed values pass; a Python bool is read as itself (Byzer-LLM read True as false).
    assert parse_params({"sft.bool.x": True, "sft.int.y": 4.0}, "sft") == {"x": True, "y": 4}


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("sft.int.max_steps", "three", "is not a int"),
        ("sft.int.max_steps", "2.5", "is not a int"),
        ("sft.float.learning_rate", "fast", "is not a float"),
        ("sft.bool.resume", "yes", "is not a bool"),
        ("sft.list.target_modules", "q_proj", "is not a list"),
        ("sft.dict.extra", "[1]", "is not a dict"),
        ("sft.double.learning_rate", "1", "names the type 'double'"),
        ("sft.learning_rate", "1", "is not sft.<type>.<name>"),
        ("sft.int.a.b", "1", "is not sft.<type>.<name>"),
    ],
)
def test_parse_params_names_the_bad_key(key: str, value: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(fragment)) as err:
        parse_params({key: value}, "sft")
    assert key in str(err.value)


# -- sft / pretrain / merge_lora -> TrainingJobSpec ------------------------------------------------


def test_sft_maps_byzer_arguments_onto_the_spec() -> None:
    spec = sft(
        local_stage_path="/stage",
        num_cpus=2,
        num_gpus=1,
        num_ranks=2,
        model_params={
            "sft.int.num_train_epochs": "3",
            "sft.float.learning_rate": "2e-4",
            "sft.int.max_seq_length": "256",  # Byzer's QLoRA name for cutoff_len
            "sft.int.lora_rank": "16",
            "sft.float.lora_dropout": "0.1",
            "sft.str.finetuning_type": "lora",
            "max_steps": 20,  # plain names work too
            "lora_alpha": 32,
            "target_modules": "q_proj,v_proj",
            "template": "alpaca",
        },
    )
    assert spec.kind == tr.TRAINING_JOB_KIND_SFT
    assert (spec.base_model_path, spec.data_path, spec.output_dir) == (
        "/models/base",
        "/data",
        "/stage",
    )
    assert (spec.cpus, spec.gpus, spec.num_ranks) == (2.0, 1.0, 2)
    assert dict(spec.hyperparameters) == {
        "num_train_epochs": "3",
        "learning_rate": "0.0002",
        "cutoff_len": "256",
        "max_steps": "20",
    }
    assert spec.method == tr.TRAINING_METHOD_LORA
    assert spec.lora == tr.LoraConfig(
        r=16, alpha=32, dropout=0.1, target_modules=["q_proj", "v_proj"]
    )
    assert spec.template == "alpaca"
    assert spec.deepspeed_config_json == ""  # "{}" means no DeepSpeed config
    assert not spec.HasField("resume")


def test_sft_defaults_leave_choices_to_the_worker() -> None:
    spec = sft()
    assert spec.output_dir == "" and spec.num_ranks == 0 and spec.cpus == 0
    assert spec.method == tr.TRAINING_METHOD_UNSPECIFIED and not spec.HasField("lora")
    assert dict(spec.hyperparameters) == {}


def test_json_config_training_keys_are_lifted_and_model_params_win() -> None:
    spec = sft(
        json_config=json.dumps(
            {
                "zero_optimization": {"stage": 2},
                "gradient_accumulation_steps": 4,  # a DeepSpeed key: stays there
                "num_train_epochs": 5,
                "lora_rank": 8,
            }
        ),
        model_params={"sft.int.num_train_epochs": "2"},
    )
    assert json.loads(spec.deepspeed_config_json) == {
        "zero_optimization": {"stage": 2},
        "gradient_accumulation_steps": 4,
    }
    assert spec.hyperparameters["num_train_epochs"] == "2"
    assert spec.lora.r == 8
    assert split_json_config({"fp16": {"enabled": True}}) == ({}, '{"fp16": {"enabled": true}}')
    assert split_json_config("  ") == ({}, "")


def test_method_and_template_arguments() -> None:
    assert sft(method="full").method == tr.TRAINING_METHOD_FULL
    assert sft(model_params={"method": "FULL"}).method == tr.TRAINING_METHOD_FULL
    # The keyword argument wins over model_params.
    assert sft(method="lora", model_params={"method": "full"}).method == tr.TRAINING_METHOD_LORA
    assert sft(resume=False).resume is False
    assert sft(model_params={"sft.bool.resume": "false"}).resume is False


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"model_params": {"sft.int.bogus": "1"}}, "unknown model_params key 'sft.int.bogus'"),
        ({"model_params": {"optim": "adamw"}}, "unknown model_params key 'optim'"),
        ({"model_params": {"pretrain.int.max_steps": "1"}}, "has the prefix 'pretrain'"),
        ({"model_params": {"max_steps": "2.5"}}, "must be a whole number"),
        ({"model_params": {"max_steps": "-1"}}, "must be a finite number >= 0"),
        ({"model_params": {"learning_rate": "fast"}}, "is not a number"),
        ({"model_params": {"seed": True}}, "not a bool"),
        ({"model_params": {"lora_r": "0"}}, "whole number >= 1"),
        ({"model_params": {"lora_dropout": "1.5"}}, "below 1"),
        ({"model_params": {"target_modules": 7}}, "module names"),
        ({"model_params": {"method": "qlora"}}, "must be lora or full"),
        ({"model_params": {"template": "vicuna"}}, "auto, alpaca, chat"),
        ({"model_params": {"tokenizer_path": "/t"}}, "does not apply to a SFT job"),
        ({"model_params": {"cutoff_len": 1, "max_seq_length": 2}}, "a second time"),
        ({"model_params": {"sft.int.max_steps": "1", "max_steps": 2}}, "sets 'max_steps' twice"),
        ({"method": "full", "model_params": {"lora_r": 8}}, "method=full"),
        ({"json_config": "{not json"}, "json_config is not valid JSON"),
        ({"json_config": "[1, 2]"}, "must be a JSON object"),
        ({"num_cpus": -1}, "num_cpus=-1"),
        ({"num_ranks": 1.5}, "whole number"),
        ({"local_model_path": ""}, "spec.base_model_path is empty"),
        ({"local_data_dir_path": ""}, "spec.data_path is empty"),
    ],
)
def test_bad_sft_arguments_name_the_problem(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(fragment)):
        sft(**kwargs)


def test_unknown_key_error_lists_the_known_names() -> None:
    with pytest.raises(InvalidArgument) as err:
        sft(model_params={"nope": 1})
    assert "num_train_epochs" in str(err.value) and "lora_r" in str(err.value)


def test_pretrain_takes_config_and_tokenizer_from_the_model_dir() -> None:
    spec = pretrain_spec(
        local_data_dir_path="/corpus",
        local_model_path="/models/tiny/",
        num_gpus=2,
        json_config='{"zero_optimization": {"stage": 3}}',
        model_params={
            "sfft.int.max_length": "128",  # Byzer-LLM's pretrain prefix and names
            "sfft.int.epoches": "2",
            "sfft.int.steps_per_epoch": "5",
            "pretrain.float.learning_rate": "3e-4",
        },
    )
    assert spec.kind == tr.TRAINING_JOB_KIND_PRETRAIN
    assert spec.model_config == "/models/tiny/config.json"
    assert spec.tokenizer_path == "/models/tiny"
    assert spec.num_ranks == 2  # one rank per GPU, as Byzer-LLM ran it
    assert dict(spec.hyperparameters) == {
        "cutoff_len": "128",
        "num_train_epochs": "2",
        "max_steps": "10",
        "learning_rate": "0.0003",
    }
    assert json.loads(spec.deepspeed_config_json) == {"zero_optimization": {"stage": 3}}
    explicit = pretrain_spec(
        local_data_dir_path="/c",
        local_model_path="/cfg/config.json",
        num_ranks=1,
        model_params={"tokenizer_path": "/tok"},
    )
    assert (explicit.model_config, explicit.tokenizer_path) == ("/cfg/config.json", "/tok")
    assert explicit.num_ranks == 1
    with pytest.raises(InvalidArgument, match="only SFT jobs train LoRA"):
        pretrain_spec(local_data_dir_path="/c", local_model_path="/m", model_params={"lora_r": 4})
    with pytest.raises(InvalidArgument, match=r"spec\.tokenizer_path is empty"):
        pretrain_spec(local_data_dir_path="/c", local_model_path="/cfg/config.json")


def test_merge_lora_spec() -> None:
    spec = merge_lora_spec(local_model_path="/b", local_adapter_path="/a", local_target_path="/t")
    assert (spec.kind, spec.base_model_path, spec.adapter_path, spec.output_dir) == (
        tr.TRAINING_JOB_KIND_MERGE_LORA,
        "/b",
        "/a",
        "/t",
    )
    with pytest.raises(InvalidArgument, match=r"spec\.adapter_path is empty"):
        merge_lora_spec(local_model_path="/b", local_adapter_path="")


def test_sdk_refuses_bad_keys_before_calling_the_control_plane() -> None:
    # Nothing listens on port 1: the error must come from the client-side check, not an RPC.
    with ByzerLLM(control_plane="127.0.0.1:1") as llm:
        with pytest.raises(InvalidArgument, match=r"'sft\.int\.bogus'"):
            llm.sft(
                "run",
                "/data",
                "/model",
                "",
                "custom/auto",
                1,
                0,
                True,
                "{}",
                {"sft.int.bogus": "1"},
            )
        with pytest.raises(InvalidArgument, match=r"unknown model_params key 'optim'"):
            llm.pretrain("run", "/data", "/model", model_params={"optim": "x"})
        with pytest.raises(InvalidArgument, match="adapter_path"):
            llm.merge_lora("m", "/model", "", "/out")
        with pytest.raises(InvalidArgument, match="needs train_params\\['data_dir'\\]"):
            llm.raw_sft({"localModelDir": "/m"})
        with pytest.raises(InvalidArgument, match="does not know 'path'"):
            llm.raw_merge_lora({"path": "/x"})
        with pytest.raises(InvalidArgument, match="base_model"):
            llm.deploy_adapter("a", "/adapter", "")
        with pytest.raises(InvalidArgument, match="not a training job state"):
            llm.list_training_jobs(["sleeping"])


def test_parse_states() -> None:
    assert parse_states(None) == []
    assert parse_states("running") == [S.TRAINING_JOB_STATE_RUNNING]
    assert parse_states(
        ["QUEUED", "training_job_state_failed", S.TRAINING_JOB_STATE_CANCELLED]
    ) == [
        S.TRAINING_JOB_STATE_QUEUED,
        S.TRAINING_JOB_STATE_FAILED,
        S.TRAINING_JOB_STATE_CANCELLED,
    ]
    with pytest.raises(InvalidArgument, match="use one of QUEUED, RUNNING"):
        parse_states(["unspecified"])


# -- following a job ----------------------------------------------------------------------------


def progress_event(seq: int, step: int, loss: float, **extra: float) -> cp.WatchTrainingJobResponse:
    return cp.WatchTrainingJobResponse(
        event=tr.TrainingJobEvent(
            sequence=seq,
            progress=tr.TrainingProgress(step=step, total_steps=4, loss=loss, **extra),
        )
    )


def state_event(seq: int, state: int, reason: str = "") -> cp.WatchTrainingJobResponse:
    return cp.WatchTrainingJobResponse(
        event=tr.TrainingJobEvent(
            sequence=seq, state_change=tr.TrainingStateChange(state=state, reason=reason)
        )
    )


def test_job_tracker_folds_events_and_drops_repeats() -> None:
    tracker = JobTracker("sft-1")
    first = cp.WatchTrainingJobResponse(
        job=tr.TrainingJob(id="sft-1", state=S.TRAINING_JOB_STATE_QUEUED)
    )
    job, event = tracker.apply(first)  # type: ignore[misc]
    assert event is None and job.state == S.TRAINING_JOB_STATE_QUEUED
    job, event = tracker.apply(state_event(1, S.TRAINING_JOB_STATE_RUNNING))  # type: ignore[misc]
    assert job.state == S.TRAINING_JOB_STATE_RUNNING
    job, _ = tracker.apply(progress_event(2, 1, 2.5))  # type: ignore[misc]
    kept = job
    job, _ = tracker.apply(progress_event(3, 2, 2.0))  # type: ignore[misc]
    assert (job.progress.step, kept.progress.step) == (2, 1)  # what was yielded stays as it was
    assert tracker.apply(progress_event(2, 1, 2.5)) is None  # a resumed stream repeats one
    assert tracker.last_sequence == 3 and not tracker.final
    # A job record from the server with older progress does not move progress backwards.
    stale = tr.TrainingJob(id="sft-1", state=S.TRAINING_JOB_STATE_RUNNING)
    stale.progress.step = 1
    job, _ = tracker.apply(cp.WatchTrainingJobResponse(job=stale))  # type: ignore[misc]
    assert job.progress.step == 2
    art = tr.TrainingArtifact(kind=tr.ARTIFACT_KIND_LORA_ADAPTER, path="/out/adapter")
    job, _ = tracker.apply(  # type: ignore[misc]
        cp.WatchTrainingJobResponse(event=tr.TrainingJobEvent(sequence=4, artifact=art))
    )
    assert job.artifact.path == "/out/adapter"
    job, _ = tracker.apply(state_event(5, S.TRAINING_JOB_STATE_SUCCEEDED))  # type: ignore[misc]
    assert tracker.final and job.state == S.TRAINING_JOB_STATE_SUCCEEDED
    resumed = JobTracker("sft-1", after_sequence=5)
    assert resumed.apply(state_event(5, S.TRAINING_JOB_STATE_SUCCEEDED)) is None


def test_watch_loop_resumes_and_gives_up() -> None:
    loop = WatchLoop("j", 7, timeout=None, reconnects=2, backoff_max=1.0)
    request, remaining = loop.request()
    assert (request.id, request.after_sequence, remaining) == ("j", 7, None)
    outage = Unavailable("down")
    loop.failed(outage)
    assert loop.pause() == 0.2
    loop.failed(outage)
    assert loop.pause() == 0.4
    with pytest.raises(Unavailable):
        loop.failed(outage)  # the third in a row
    with pytest.raises(NotFound):
        loop.failed(NotFound("no such job"))
    # A clean end before the job is final is resumed after a pause, never in a spin.
    fresh = WatchLoop("j")
    fresh.received(cp.WatchTrainingJobResponse(job=tr.TrainingJob(id="j")))
    assert fresh.pause() == 0.2
    fresh.received(state_event(1, S.TRAINING_JOB_STATE_CANCELLED, "asked"))
    assert fresh.pause() is None
    assert fresh.request()[0].after_sequence == 1
    with pytest.raises(DeadlineExceeded):
        WatchLoop("j").failed(DeadlineExceeded("the server's deadline"))
    expired = WatchLoop("j", timeout=0.01)
    time.sleep(0.02)
    expired.failed(DeadlineExceeded("ours"))  # ours: request() reports it, naming the job
    with pytest.raises(DeadlineExceeded, match=r"training job j did not end within 0\.01s"):
        expired.request()
    with pytest.raises(InvalidArgument):
        WatchLoop("")


def test_training_job_failed_carries_the_reason() -> None:
    job = tr.TrainingJob(
        id="sft-9",
        state=S.TRAINING_JOB_STATE_FAILED,
        reason="data.jsonl line 3: missing 'output'",
        spec=tr.TrainingJobSpec(kind=tr.TRAINING_JOB_KIND_SFT),
    )
    err = TrainingJobFailed(job)
    assert str(err) == "training job sft-9 (SFT) FAILED: data.jsonl line 3: missing 'output'"
    assert err.job is job and err.state == "FAILED"


# -- progress lines, tables and the loss PNG ---------------------------------------------------


def test_progress_line_formatting() -> None:
    line = format_progress(
        tr.TrainingProgress(
            step=12,
            total_steps=40,
            loss=1.23456,
            learning_rate=2e-4,
            samples_per_second=3.33,
            eta_seconds=75,
        ),
        width=10,
    )
    assert line == "[###.......]  12/40  30%  loss 1.2346  lr 2.00e-04  3.3 samples/s  ETA 1:15"
    assert format_progress(tr.TrainingProgress(total_steps=40), width=4) == "[....]  0/40  0%"
    done = format_progress(
        tr.TrainingProgress(step=40, total_steps=40, loss=0.5, eval_loss=0.75, eta_seconds=3),
        width=4,
    )
    assert done == "[####]  40/40  100%  loss 0.5000  eval 0.7500"  # no ETA once done
    assert format_progress(tr.TrainingProgress(step=3, loss=2.0)) == "step 3  loss 2.0000"
    assert (format_duration(75), format_duration(3725), format_duration(-1)) == (
        "1:15",
        "1:02:05",
        "?",
    )
    assert [format_age(s) for s in (5, 300, 7200, 200000)] == ["5s", "5m", "2h", "2d"]


def test_progress_view_redraws_on_a_tty_and_logs_lines_otherwise() -> None:
    steps = [tr.TrainingProgress(step=s, total_steps=2, loss=1.0 / s) for s in (1, 1, 2)]
    out, err = io.StringIO(), io.StringIO()
    view = ProgressView(out, err, tty=False, width=2)
    for p in steps:
        view.progress(p)
    view.message("a log line")
    view.close()
    assert err.getvalue() == "[#.]  1/2  50%  loss 1.0000\n[##]  2/2  100%  loss 0.5000\n"
    assert out.getvalue() == "a log line\n"

    out, err = io.StringIO(), io.StringIO()
    view = ProgressView(out, err, tty=True, width=2)
    view.progress(steps[0])
    view.message("saved")
    view.progress(steps[2])
    view.close()
    assert err.getvalue() == (
        "\r[#.]  1/2  50%  loss 1.0000\x1b[K"
        "\r\x1b[K"  # cleared before the message...
        "[#.]  1/2  50%  loss 1.0000\x1b[K"  # ...and drawn again after it
        "\r[##]  2/2  100%  loss 0.5000\x1b[K"
        "\n"
    )
    assert out.getvalue() == "saved\n"


def test_job_row_for_the_jobs_table() -> None:
    job = tr.TrainingJob(
        id="sft-1",
        spec=tr.TrainingJobSpec(kind=tr.TRAINING_JOB_KIND_SFT),
        state=S.TRAINING_JOB_STATE_RUNNING,
        worker_id="trainer-0",
        progress=tr.TrainingProgress(step=3, total_steps=10, loss=1.5),
    )
    job.create_time.FromSeconds(1000)
    assert format_job_row(job, now=1090) == [
        "sft-1",
        "SFT",
        "RUNNING",
        "trainer-0",
        "3/10",
        "1.5000",
        "1m",
    ]
    queued = tr.TrainingJob(
        id="merge-lora-1",
        spec=tr.TrainingJobSpec(kind=tr.TRAINING_JOB_KIND_MERGE_LORA),
        state=S.TRAINING_JOB_STATE_QUEUED,
    )
    assert format_job_row(queued)[1:] == ["MERGE_LORA", "QUEUED", "-", "-", "-", "-"]


def test_loss_png_is_a_real_png(tmp_path: Path) -> None:
    curve = LossCurve()
    for step, loss in [(1, 2.5), (2, 2.1), (2, 2.0), (3, 1.7)]:
        curve.add(tr.TrainingProgress(step=step, total_steps=3, loss=loss))
    curve.add(tr.TrainingProgress(step=3, total_steps=3, loss=1.7, eval_loss=1.9))
    curve.add(tr.TrainingProgress(step=0, total_steps=3))  # before the first step: ignored
    assert curve.train == {1: 2.5, 2: 2.0, 3: 1.7} and curve.eval == {3: 1.9}
    path = write_loss_png(
        tmp_path / "loss.png", curve.train.items(), curve.eval.items(), title="sft-1"
    )
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (700, 400)
    assert len(data) > 5000  # axes, a line and labels, not an empty canvas
    with pytest.raises(InvalidArgument, match="no loss points"):
        write_loss_png(tmp_path / "empty.png", [])
    assert not LossCurve()


# -- CLI parsing ----------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def test_cli_sft_defaults() -> None:
    args = parse("sft", "--model_path", "/m", "--data_dir", "/d")
    assert args.func is cli_training.cmd_sft
    assert (args.name, args.output_dir, args.num_cpus, args.num_gpus, args.num_ranks) == (
        "",
        "",
        0.0,
        0.0,
        None,
    )
    assert (args.method, args.template, args.json_config, args.model_params) == (
        None,
        None,
        "{}",
        {},
    )
    assert (args.detach, args.loss_png) == (False, None)


def test_cli_sft_all_options(tmp_path: Path) -> None:
    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 2}}')
    args = parse(
        "sft",
        "--name",
        "run1",
        "--model_path",
        "/m",
        "--data_dir",
        "/d",
        "--output_dir",
        "/o",
        "--num_cpus",
        "2",
        "--num_gpus",
        "1",
        "--num_ranks",
        "2",
        "--method",
        "full",
        "--template",
        "chat",
        "--json_config",
        f"@{config}",
        "--model_params",
        "max_steps=20",
        "sft.float.learning_rate=2e-4",
        "--model_params",
        "target_modules=q_proj,v_proj",
        "--detach",
        "--loss-png",
        "/tmp/x.png",
    )
    assert (args.name, args.output_dir, args.num_cpus, args.num_gpus, args.num_ranks) == (
        "run1",
        "/o",
        2.0,
        1.0,
        2,
    )
    assert (args.method, args.template) == ("full", "chat")
    assert json.loads(args.json_config) == {"zero_optimization": {"stage": 2}}
    assert args.model_params == {
        "max_steps": "20",
        "sft.float.learning_rate": "2e-4",
        "target_modules": "q_proj,v_proj",
    }
    assert (args.detach, args.loss_png) == (True, "/tmp/x.png")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--model_params", "max_steps"], "cannot parse model param 'max_steps'"),
        (["--model_params", "my key=1"], "cannot parse model param 'my key=1'"),
        (["--json_config", "{nope"], "json_config is not valid JSON"),
        (["--json_config", "@/does/not/exist.json"], "/does/not/exist.json"),
        (["--method", "qlora"], "--method"),
        (["--num_ranks", "0"], "--num_ranks"),
        (["--num_gpus", "-1"], "--num_gpus"),
    ],
)
def test_cli_sft_usage_errors_exit_2(
    extra: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["sft", "--model_path", "/m", "--data_dir", "/d", *extra]) == 2
    assert fragment in capsys.readouterr().err


def test_cli_unknown_model_param_is_refused_before_any_call(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--control_plane", "127.0.0.1:1", "sft", "--model_path", "/m", "--data_dir", "/d"]
    assert cli.main([*argv, "--model_params", "optim=adamw"]) == 1
    assert capsys.readouterr().err.startswith("error: unknown model_params key 'optim'")


def test_cli_pretrain_merge_and_job_commands() -> None:
    args = parse("pretrain", "--model_path", "/m", "--data_dir", "/c", "--num_gpus", "2")
    assert (args.func, args.num_gpus, args.num_ranks) == (cli_training.cmd_pretrain, 2.0, None)
    args = parse("merge-lora", "--model_path", "/b", "--adapter_path", "/a", "--target_path", "/t")
    assert (args.func, args.model_path, args.adapter_path, args.target_path) == (
        cli_training.cmd_merge_lora,
        "/b",
        "/a",
        "/t",
    )
    assert args.detach is False
    assert parse("jobs").state is None
    assert parse("jobs", "--state", "RUNNING", "queued").state == ["running", "queued"]
    args = parse("job", "get", "sft-1", "--json")
    assert (args.func, args.job_id, args.json) == (cli_training.cmd_job_get, "sft-1", True)
    assert parse("job", "cancel", "sft-1").func is cli_training.cmd_job_cancel
    args = parse("job", "watch", "sft-1", "--loss-png", "l.png", "--control_plane", "h:1")
    assert (args.func, args.loss_png, args.control_plane) == (
        cli_training.cmd_job_watch,
        "l.png",
        "h:1",
    )
    assert parse("job", "watch", "sft-1").loss_png is None
    args = parse("deploy", "--model", "a", "--model_path", "/adapter", "--base_model", "chat")
    assert args.base_model == "chat"
    assert parse("deploy", "--model", "m", "--model_path", "/m").base_model is None


def test_cli_job_needs_an_action_and_an_id(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["job"]) == 2
    assert cli.main(["job", "watch"]) == 2
    assert cli.main(["jobs", "--state", "sleeping"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_training_help_in_both_languages(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    assert cli.main(["sft", "--help"]) == 0
    assert "训练参数 KEY=VALUE" in capsys.readouterr().out
    assert cli.main(["job", "watch", "--help"]) == 0
    assert "loss 曲线" in capsys.readouterr().out
    monkeypatch.setenv("LANG", "en_US.UTF-8")
    assert cli.main(["merge-lora", "--help"]) == 0
    assert "LoRA adapter directory" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    for name in ("sft", "pretrain", "merge-lora", "jobs", "job"):
        assert f"    {name} " in top or f"    {name}\n" in top
    assert set(i18n.MESSAGES_EN) == set(i18n.MESSAGES_ZH)
