"""Job specs, training data validation, prompt masking and the event file, without processes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from llmesh.common.errors import FailedPrecondition, InvalidArgument
from llmesh.common.training_spec import HYPERPARAMETER_ALIASES, HYPERPARAMETERS, validate_spec
from llmesh.trainer_worker.convert import spec_to_runner_dict
from llmesh.trainer_worker.runner.data import (
    IGNORE_INDEX,
    SftRow,
    alpaca_prompt,
    check_pretrain_data,
    check_template,
    encode_sft_row,
    load_sft_rows,
    pack_texts,
    split_rows,
    val_count,
)
from llmesh.trainer_worker.runner.events import (
    EventType,
    EventWriter,
    make_event,
    read_events,
)
from llmesh.trainer_worker.runner.launch import outcome_from_events
from llmesh.trainer_worker.runner.spec import JobSpec, resolve_batch_config
from llmesh.training import sft_spec
from llmesh.v1 import trainer_service_pb2 as tr

SDK_PATHS = {"local_model_path": "/models/m", "local_data_dir_path": "/data"}


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


GOOD = {"instruction": "Say hi.", "output": "Hi."}
CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]}


# -- data.jsonl validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line7", "expected"),
    [
        (
            {"instruction": "Say hi."},
            "data.jsonl line 7: field 'output' is missing (alpaca rows need instruction and "
            "output)",
        ),
        ({"output": "x"}, "data.jsonl line 7: field 'instruction' is missing"),
        ({"instruction": "a", "output": 3}, "data.jsonl line 7: field 'output' must be a string"),
        ({"instruction": "a", "output": "  "}, "data.jsonl line 7: field 'output' is empty"),
        ('{"instruction": "a", "output": }', "data.jsonl line 7 is not valid JSON"),
        ("[1, 2]", "data.jsonl line 7 must be a JSON object, not an array"),
        ({"prompt": "a", "completion": "b"}, "data.jsonl line 7: no 'instruction'/'output'"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "data.jsonl line 7: messages[0]: field 'role' is 'bot'; roles must be system, user "
            "or assistant",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}]},
            "data.jsonl line 7: the last message has role 'user'",
        ),
        ({"messages": []}, "data.jsonl line 7: field 'messages' must be a non-empty array"),
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]},
            "data.jsonl line 7: messages[0]: field 'content' is missing",
        ),
        ({**GOOD, **CHAT}, "data.jsonl line 7: has both 'messages' (chat) and alpaca fields"),
    ],
)
def test_bad_line_names_line_and_field(tmp_path: Path, line7: Any, expected: str) -> None:
    # Five good rows and a blank line first: line numbers count physical lines.
    write_lines(tmp_path / "data.jsonl", [GOOD, CHAT, "", GOOD, GOOD, GOOD, line7, GOOD])
    with pytest.raises(InvalidArgument) as err:
        load_sft_rows(tmp_path)
    assert str(err.value).startswith(expected), str(err.value)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text("\n  \n")
    with pytest.raises(InvalidArgument, match=r"data.jsonl is empty; write one JSON object"):
        load_sft_rows(tmp_path / "data.jsonl")
    with pytest.raises(InvalidArgument, match=r"is a directory without data.jsonl"):
        load_sft_rows(_empty_dir(tmp_path))
    with pytest.raises(InvalidArgument, match=r"does not exist"):
        load_sft_rows(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b'{"instruction": "\xff", "output": "x"}\n')
    with pytest.raises(InvalidArgument, match=r"bin.jsonl line 1 is not valid UTF-8"):
        load_sft_rows(tmp_path / "bin.jsonl")


def test_rows_of_both_forms(tmp_path: Path) -> None:
    write_lines(tmp_path / "data.jsonl", [{**GOOD, "input": None}, CHAT, {**GOOD, "input": "ctx"}])
    rows = load_sft_rows(tmp_path)
    assert [(r.line, r.form) for r in rows] == [(1, "alpaca"), (2, "chat"), (3, "alpaca")]
    assert rows[2].as_messages() == [
        {"role": "user", "content": "Say hi.\n\nctx"},
        {"role": "assistant", "content": "Hi."},
    ]


def test_template_checks(tmp_path: Path) -> None:
    rows = [SftRow(line=3, form="chat", messages=CHAT["messages"])]
    with pytest.raises(InvalidArgument, match=r"line 3 is a chat row .* template is 'alpaca'"):
        check_template(rows, "alpaca", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FailedPrecondition, match=r"line 3 is a chat row, but the tokenizer"):
        check_template(rows, "auto", tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    check_template(rows, "auto", tmp_path)


def test_validation_split() -> None:
    assert val_count(10, 0) == 0
    assert val_count(10, 0.2) == 2
    assert val_count(10, 3) == 3
    assert val_count(10, 0.01) == 1  # a fraction never rounds down to an empty eval set
    with pytest.raises(InvalidArgument, match=r"val_set_size 4 holds out 4 of 4 rows"):
        val_count(4, 4)
    train, val = split_rows(list(range(10)), 0.3, seed=1)
    assert len(val) == 3 and sorted(train + val) == list(range(10))
    assert split_rows(list(range(10)), 0.3, seed=1) == (train, val)  # same on every rank


def test_pretrain_data_checks(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("Some text.")
    write_lines(tmp_path / "b.jsonl", [{"text": "More."}, {"txt": "oops"}])
    with pytest.raises(InvalidArgument, match=r"b.jsonl line 2: field 'text' is missing"):
        check_pretrain_data(tmp_path)
    write_lines(tmp_path / "b.jsonl", [{"text": "More."}])
    assert check_pretrain_data(tmp_path) == 2
    with pytest.raises(InvalidArgument, match=r"holds no .txt or .jsonl files"):
        check_pretrain_data(_empty_dir(tmp_path))


def _empty_dir(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


# -- tokenisation with the test model's tokenizer ----------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(test_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(test_model_dir)


def test_chat_row_learns_only_the_reply(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of Zorbia?"},
        {"role": "assistant", "content": "Blue Harbor."},
    ]
    ex = encode_sft_row(
        SftRow(line=1, form="chat", messages=messages), tokenizer, template="auto", cutoff_len=512
    )
    assert ex is not None and len(ex.input_ids) == len(ex.labels)
    # The prompt is what a serving engine feeds the model for this conversation.
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    assert ex.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    learned = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(learned).startswith("Blue Harbor.</s>")


def test_multi_turn_learns_every_reply(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "Uno."},
        {"role": "user", "content": "Two?"},
        {"role": "assistant", "content": "Dos."},
    ]
    ex = encode_sft_row(
        SftRow(line=1, form="chat", messages=messages), tokenizer, template="auto", cutoff_len=512
    )
    assert ex is not None
    learned = tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert "Uno." in learned and "Dos." in learned and "Two?" not in learned
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ex.input_ids) == tokenizer.bos_token + whole


def test_alpaca_row_and_cutoff(tokenizer: Any) -> None:
    row = SftRow(line=1, form="alpaca", instruction="Name a color.", output="Blue.")
    ex = encode_sft_row(row, tokenizer, template="auto", cutoff_len=512)
    assert ex is not None
    prompt_ids = tokenizer.encode(alpaca_prompt("Name a color."), add_special_tokens=True)
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    assert ex.input_ids[-1] == tokenizer.eos_token_id == ex.labels[-1]
    assert tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "Blue.</s>"
    # train_on_inputs learns the prompt too
    full = encode_sft_row(row, tokenizer, template="auto", cutoff_len=512, train_on_inputs=True)
    assert full is not None and full.labels == full.input_ids
    # A cutoff inside the prompt leaves nothing to learn: the row is skipped.
    assert encode_sft_row(row, tokenizer, template="auto", cutoff_len=len(prompt_ids)) is None
    short = encode_sft_row(row, tokenizer, template="auto", cutoff_len=len(prompt_ids) + 2)
    assert short is not None and len(short.input_ids) == len(prompt_ids) + 2
    # template "chat" renders alpaca rows as a chat exchange
    chat = encode_sft_row(row, tokenizer, template="chat", cutoff_len=512)
    assert chat is not None and "<|assistant|>" in tokenizer.decode(chat.input_ids)


def test_pack_texts(tokenizer: Any) -> None:
    blocks = pack_texts(["The sky is blue. " * 20, "Grass is green."], tokenizer, 16)
    assert len(blocks) >= 3 and all(len(b.input_ids) == 16 for b in blocks)
    assert all(b.labels == b.input_ids for b in blocks)


# -- the job spec ----------------------------------------------------------------------------


def base_spec(**extra: Any) -> dict[str, Any]:
    return {
        "job_id": "job-1",
        "kind": "sft",
        "base_model_path": "/models/m",
        "data_path": "/data",
        "output_dir": "/out",
        **extra,
    }


def test_spec_defaults_and_round_trip() -> None:
    spec = JobSpec.from_dict(base_spec())
    assert spec.training_method == "lora" and spec.learning_rate == 2e-4
    assert spec.lora.target_modules is None and spec.num_ranks == 1 and spec.resume is True
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert JobSpec.from_dict(json.loads(spec.to_json())) == spec


def test_spec_accepts_byzer_and_lazyllm_names() -> None:
    # Aliases are resolved once, where a request enters (the SDK); the record carries canonical
    # names and the runner reads them: the same values arrive typed.
    proto = sft_spec(
        local_model_path="/models/m",
        local_data_dir_path="/data",
        local_stage_path="/out",
        json_config='{"zero_optimization": {"stage": 2}}',
        num_ranks=2,
        model_params={
            "sft.int.num_train_epochs": "3",
            "sft.float.learning_rate": "0.001",
            "micro_batch_size": 2,
            "batch_size": 16,
            "max_seq_length": 256,
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.1,
            "lora_target_modules": "[q_proj,v_proj]",
            "val_set_size": 0.1,
        },
    )
    assert set(proto.hyperparameters) <= set(HYPERPARAMETERS)
    spec = JobSpec.from_dict(
        spec_to_runner_dict(tr.TrainingJob(id="byzer-job", spec=proto), jobs_dir="/jobs")
    )
    hp = spec.hyperparameters
    assert spec.job_id == "byzer-job" and spec.base_model_path == "/models/m"
    assert spec.deepspeed_config == {"zero_optimization": {"stage": 2}}
    assert (hp.num_train_epochs, hp.learning_rate, hp.cutoff_len) == (3.0, 0.001, 256)
    # LazyLLM's batch_size is global: 16 = 2 per rank x 2 ranks x 4 accumulation steps
    assert (hp.per_device_train_batch_size, hp.gradient_accumulation_steps) == (2, 4)
    assert spec.num_ranks == 2 and spec.lora.target_modules == ["q_proj", "v_proj"]
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout) == (4, 8, 0.1)
    # Every alias of the one table resolves to its canonical name at the SDK.
    for alias, canonical in HYPERPARAMETER_ALIASES.items():
        value = "cosine" if canonical == "lr_scheduler_type" else "3"
        assert dict(sft_spec(**SDK_PATHS, model_params={alias: value}).hyperparameters) == {
            canonical: value
        }
    with pytest.raises(InvalidArgument, match=r"'batch_size' \(10\) must be a multiple"):
        sft_spec(**SDK_PATHS, model_params={"batch_size": 10, "micro_batch_size": 4})


def test_servers_refuse_aliases_naming_the_canonical_name() -> None:
    # Past the SDK only canonical names count: the control plane's and the trainer's check,
    # and the runner's spec, say which name to send instead.
    proto = sft_spec(**SDK_PATHS)
    proto.hyperparameters["epoches"] = "2"
    with pytest.raises(InvalidArgument, match=r"alias 'epoches'.*canonical name 'num_train_"):
        validate_spec(proto)
    for patch, canonical in (
        ({"hyperparameters": {"lr": 0.1}}, "'learning_rate'"),
        ({"block_size": 64}, "'cutoff_len'"),
        ({"lora": {"lora_rank": 4}}, "'lora.r'"),
        ({"finetuning_type": "full"}, "'method'"),
    ):
        with pytest.raises(InvalidArgument, match=f"canonical name {canonical}"):
            JobSpec.from_dict(base_spec(**patch))


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"kind": "rlhf"}, "job spec field 'kind' must be one of sft, pretrain, merge_lora"),
        ({"job_id": "a b"}, "job spec field 'job_id' must be 1-128 letters"),
        ({"learning_rat": 1}, "job spec field 'learning_rat' is not a known setting"),
        ({"hyperparameters": {"epochz": 1}}, "'hyperparameters.epochz' is not a known"),
        ({"num_train_epochs": "many"}, "'num_train_epochs' is not a number ('many')"),
        ({"lora": {"r": 0}}, "job spec field 'lora.r' must be >= 1, got 0"),
        ({"lora": {"rank_x": 0}}, "job spec field 'lora.rank_x' is not a LoRA setting"),
        ({"template": "vicuna"}, "job spec field 'template' must be one of auto, alpaca, chat"),
        ({"deepspeed_config": "{not json"}, "'deepspeed_config' is not valid JSON"),
        ({"base_model_path": None}, "'base_model_path' is required for an sft job"),
        ({"val_set_size": 2.5}, "field 'val_set_size' must be a fraction below 1"),
        (
            {"hyperparameters": {"learning_rate": -1}},
            "'hyperparameters.learning_rate' must be a finite number >= 0, got -1",
        ),
        ({"hyperparameters": {"learning_rate": 0}}, "'hyperparameters.learning_rate' must be > 0"),
        ({"lr_scheduler_type": "step"}, "'lr_scheduler_type' must be one of linear, cosine"),
        (
            {"learning_rate": 0.1, "hyperparameters": {"learning_rate": 0.2}},
            "sets 'learning_rate' a second time",
        ),
        ({"num_train_epochs": 0}, "num_train_epochs' must be > 0 unless max_steps is set"),
        ({"resume": "maybe"}, "job spec field 'resume' must be true or false"),
    ],
)
def test_spec_errors_name_the_key(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        JobSpec.from_dict(base_spec(**patch))
    assert message in str(err.value), str(err.value)


def test_spec_kind_rules() -> None:
    with pytest.raises(InvalidArgument, match=r"'model_config' is required for a pretrain job"):
        JobSpec.from_dict(
            {"job_id": "p", "kind": "pretrain", "data_path": "/d", "output_dir": "/o"}
        )
    spec = JobSpec.from_dict(
        {
            "job_id": "p",
            "kind": "pretrain",
            "data_path": "/d",
            "output_dir": "/o",
            "model_config": {"model_type": "llama"},
            "tokenizer_path": "/tok",
        }
    )
    assert spec.training_method == "full" and spec.learning_rate == 3e-4
    with pytest.raises(InvalidArgument, match=r"'adapter_path' is required for a merge_lora"):
        JobSpec.from_dict(
            {"job_id": "m", "kind": "merge_lora", "base_model_path": "/b", "output_dir": "/o"}
        )


def test_batch_config_resolution() -> None:
    # Nothing set: the job's values fill the config.
    cfg, mb, gas = resolve_batch_config({}, micro=4, accumulation=2, world=2)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (4, 2)
    assert (mb, gas) == (4, 2) and "train_batch_size" not in cfg
    # The user's train_batch_size wins; the rest is derived as DeepSpeed does.
    cfg, mb, gas = resolve_batch_config(
        {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8},
        micro=4,
        accumulation=1,
        world=2,
    )
    assert (mb, gas) == (8, 2) and "gradient_accumulation_steps" not in cfg
    with pytest.raises(InvalidArgument, match=r"train_batch_size 30 does not equal"):
        resolve_batch_config(
            {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4},
            micro=4,
            accumulation=1,
            world=2,
        )


# -- events ------------------------------------------------------------------------------------


def test_events_round_trip_and_torn_lines(tmp_path: Path) -> None:
    w = EventWriter(tmp_path)
    w.emit(EventType.STATE, state="STARTING")
    w.emit(
        EventType.PROGRESS,
        step=1,
        total_steps=2,
        epoch=0.5,
        loss=1.0,
        learning_rate=0.1,
        samples_per_second=3.0,
        eta_seconds=1.0,
    )
    w.emit(EventType.ARTIFACT, kind="lora_adapter", path="/x")
    w.emit(EventType.DONE)
    w.emit(EventType.STATE, state="SUCCEEDED")
    # A line being written by another process right now, and a foreign line, are skipped.
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write("not json\n")
        f.write('{"type": "progress", "step": 3')
    events = read_events(tmp_path)
    assert [e["type"] for e in events] == ["state", "progress", "artifact", "done", "state"]
    assert all(isinstance(e["time"], float) for e in events)
    outcome = outcome_from_events(events)
    assert outcome is not None and outcome.state.value == "SUCCEEDED"
    assert outcome.artifact_path == "/x" and outcome.artifact_kind == "lora_adapter"
    # A new attempt starts: no outcome until it ends.
    w.emit(EventType.STATE, state="STARTING")
    assert outcome_from_events(read_events(tmp_path)) is None
    with pytest.raises(ValueError, match=r"progress event needs"):
        make_event(EventType.PROGRESS, step=1)
    assert os.path.getsize(tmp_path / "events.jsonl") > 0
