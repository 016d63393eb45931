"""The ``llmesh`` CLI: option parsing, exit codes, error lines and output, without servers."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import pytest

from llmesh import cli
from llmesh._table import format_table
from llmesh.cli import connect, models, servers
from llmesh.common.errors import NotFound, Unavailable
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def test_deploy_defaults_follow_byzer_option_names() -> None:
    args = parse("deploy", "--model", "chat", "--model_path", "/models/tiny")
    assert args.func is models.cmd_deploy
    assert args.model == "chat"
    assert args.model_path == "/models/tiny"
    assert args.pretrained_model_type == "custom/auto"
    assert args.infer_backend == "transformers"
    assert args.num_workers == 1
    assert args.gpus_per_worker == 0
    assert args.cpus_per_worker == 1
    assert args.infer_params == {}
    assert args.no_wait is False
    assert args.timeout == 300


def test_deploy_all_options() -> None:
    args = parse(
        "deploy",
        "--model",
        "chat",
        "--model_path",
        "/m",
        "--pretrained_model_type",
        "custom/llama2",
        "--infer_backend",
        "vllm",
        "--num_workers",
        "3",
        "--gpus_per_worker",
        "0.5",
        "--cpus_per_worker",
        "2",
        "--infer_params",
        "max_model_len=4096",
        "name=hello world",
        "a=b=c",
        "model_type qwen",
        "--no-wait",
        "--timeout",
        "60",
    )
    assert (args.infer_backend, args.num_workers, args.gpus_per_worker) == ("vllm", 3, 0.5)
    assert args.cpus_per_worker == 2.0
    assert args.pretrained_model_type == "custom/llama2"
    assert args.infer_params == {
        "max_model_len": "4096",
        "name": "hello world",
        "a": "b=c",
        "model_type": "qwen",
    }
    assert args.no_wait is True
    assert args.timeout == 60.0


@pytest.mark.parametrize(
    "extra",
    [
        ["--num_workers", "0"],
        ["--num_workers", "two"],
        ["--gpus_per_worker", "-1"],
        ["--cpus_per_worker", "0"],
        ["--timeout", "0"],
    ],
)
def test_deploy_rejects_bad_numbers(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["deploy", "--model", "m", "--model_path", "/m", *extra]) == 2
    assert extra[0] in capsys.readouterr().err


def test_bad_infer_params_token_exits_2_and_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["deploy", "--model", "m", "--model_path", "/m", "--infer_params", "ok=1", "my key=v"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "'my key=v'" in err
    assert "KEY=VALUE" in err


def test_deploy_requires_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["deploy", "--model_path", "/m"]) == 2
    assert "--model" in capsys.readouterr().err


def test_undeploy_and_query_options() -> None:
    args = parse("undeploy", "--model", "chat")
    assert (args.func, args.model) == (models.cmd_undeploy, "chat")
    args = parse("query", "--model", "chat", "--query", "hello there")
    assert args.func is models.cmd_query
    assert (args.query, args.template, args.max_tokens) == ("hello there", "auto", None)
    args = parse(
        "query", "--model", "c", "--query", "q", "--template", "default", "--max_tokens", "8"
    )
    assert (args.template, args.max_tokens) == ("default", 8)


def test_query_rejects_unknown_template(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["query", "--model", "c", "--query", "q", "--template", "nope"]) == 2
    assert "--template" in capsys.readouterr().err


def test_listing_and_test_model_commands() -> None:
    assert parse("models").func is models.cmd_models
    assert parse("workers").func is models.cmd_workers
    args = parse("make-test-model", "/tmp/tiny")
    assert (args.func, args.dir) == (models.cmd_make_test_model, "/tmp/tiny")


def test_control_plane_before_or_after_the_subcommand() -> None:
    assert parse("--control_plane", "h:1", "models").control_plane == "h:1"
    assert parse("models", "--control_plane", "h:2").control_plane == "h:2"
    assert parse("--control_plane", "h:1", "undeploy", "--model", "m").control_plane == "h:1"


def test_control_plane_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMESH_CONTROL_PLANE", "10.0.0.5:6000")
    assert parse("models").control_plane == "10.0.0.5:6000"
    monkeypatch.delenv("LLMESH_CONTROL_PLANE")
    assert parse("models").control_plane == "127.0.0.1:50051"


def test_server_commands_are_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(servers, "add_server_commands", seen.append)
    cli.build_parser()
    assert len(seen) == 1
    assert "deploy" in seen[0].choices


def test_no_command_is_a_usage_error() -> None:
    assert cli.main([]) == 2


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("deploy", "undeploy", "query", "models", "workers", "make-test-model"):
        assert name in out


def test_llmesh_errors_become_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(args: argparse.Namespace) -> int:
        raise NotFound("model 'x' not found")

    monkeypatch.setattr(models, "cmd_models", boom)
    assert cli.main(["models"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: model 'x' not found\n"
    assert "Traceback" not in captured.err


def test_value_errors_from_commands_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def bad(args: argparse.Namespace) -> int:
        raise ValueError("bad value")

    monkeypatch.setattr(models, "cmd_workers", bad)
    assert cli.main(["workers"]) == 2
    assert capsys.readouterr().err == "error: bad value\n"


class FakeClient:
    """Stands in for ByzerLLM in the command functions."""

    calls: list[tuple[str, Any]]

    def __init__(self, control_plane: str | None = None, **kwargs: Any) -> None:
        self.control_plane = control_plane
        FakeClient.calls = [("init", control_plane)]
        self.exists = False

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        FakeClient.calls.append(("close", None))

    def stream_chat_oai(self, conversations: Any, **kwargs: Any) -> Iterator[tuple[str, dict]]:
        FakeClient.calls.append(("stream", (conversations, kwargs)))
        yield "Hel", {}
        yield "Hello", {}
        yield "Hello world", {"finish_reason": "stop"}

    def list_models(self) -> list[cp.Model]:
        ready, loading = common_pb2.REPLICA_STATE_READY, common_pb2.REPLICA_STATE_LOADING
        return [
            cp.Model(
                name="chat",
                backend="transformers",
                model_path="/models/tiny",
                num_replicas=2,
                replicas=[
                    common_pb2.Replica(index=1, state=loading, worker_id="w1"),
                    common_pb2.Replica(
                        index=0, state=ready, worker_id="w1", pid=4242, devices=["0", "2"]
                    ),
                ],
            )
        ]

    def list_workers(self) -> list[cp.Worker]:
        return [
            cp.Worker(
                id="w1",
                address="127.0.0.1:7001",
                kind="inference",
                cpus=8,
                cpus_used=2.5,
                gpus=3,
                gpus_used=2,
                replicas=["chat/0", "chat/1"],
                devices=[
                    cp.Device(id="0", holders=["chat/0"]),
                    cp.Device(id="1"),
                    cp.Device(id="2", holders=["chat/0"]),
                ],
            )
        ]

    def is_model_exist(self, name: str) -> bool:
        return self.exists

    def setup_gpus_per_worker(self, n: float) -> FakeClient:
        FakeClient.calls.append(("gpus", n))
        return self

    def setup_cpus_per_worker(self, n: float) -> FakeClient:
        FakeClient.calls.append(("cpus", n))
        return self

    def setup_num_workers(self, n: int) -> FakeClient:
        FakeClient.calls.append(("workers", n))
        return self

    def setup_infer_backend(self, b: str) -> FakeClient:
        FakeClient.calls.append(("backend", b))
        return self

    def deploy(self, **kwargs: Any) -> dict:
        FakeClient.calls.append(("deploy", kwargs))
        return {}

    def get_model(self, name: str) -> cp.Model:
        return self.list_models()[0]

    def undeploy(self, name: str) -> bool:
        return name == "chat"


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    monkeypatch.setattr(connect, "ByzerLLM", FakeClient)
    return FakeClient


def test_query_streams_only_new_text(
    fake_client: type[FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        ["query", "--control_plane", "h:9", "--model", "chat", "--query", "hi", "--max_tokens", "5"]
    )
    assert code == 0
    assert capsys.readouterr().out == "Hello world\n"
    assert fake_client.calls[0] == ("init", "h:9")
    _, (conversations, kwargs) = fake_client.calls[1]
    assert conversations == [{"role": "user", "content": "hi"}]
    assert kwargs == {"model": "chat", "role_mapping": None, "llm_config": {"max_tokens": 5}}


def test_query_template_default_uses_the_user_assistant_mapping(
    fake_client: type[FakeClient],
) -> None:
    assert cli.main(["query", "--model", "c", "--query", "q", "--template", "default"]) == 0
    _, (_, kwargs) = fake_client.calls[1]
    assert kwargs["role_mapping"]["user_role"] == "User:"
    assert kwargs["llm_config"] == {}


def test_models_table(fake_client: type[FakeClient], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "BACKEND", "READY", "STATES", "PROCESSES", "PATH"]
    assert lines[1].split() == [
        "chat",
        "transformers",
        "1/2",
        "0:READY",
        "1:LOADING",
        "0:w1",
        "pid",
        "4242",
        "gpu",
        "0,2",
        "1:w1",
        "/models/tiny",
    ]
    assert lines[0].index("BACKEND") == lines[1].index("transformers")


def test_workers_table(fake_client: type[FakeClient], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["workers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "ADDRESS", "KIND", "CPUS", "GPUS", "DEVICES", "REPLICAS"]
    assert lines[1].split() == [
        "w1",
        "127.0.0.1:7001",
        "inference",
        "2.5/8",
        "2/3",
        "0=chat/0",
        "1=free",
        "2=chat/0",
        "chat/0,",
        "chat/1",
    ]


def test_deploy_passes_byzer_settings(
    fake_client: type[FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["deploy", "--model", "chat", "--model_path", "/m", "--num_workers", "2"]
    assert cli.main([*argv, "--infer_params", "dtype=half"]) == 0
    calls = dict(fake_client.calls[1:5])
    assert calls == {"gpus": 0.0, "cpus": 1.0, "workers": 2, "backend": "transformers"}
    deploy = dict(fake_client.calls)["deploy"]
    assert deploy == {
        "model_path": "/m",
        "pretrained_model_type": "custom/auto",
        "udf_name": "chat",
        "infer_params": {"dtype": "half"},
        "wait": True,
        "timeout": 300.0,
    }
    out = capsys.readouterr().out
    assert "Model chat deployed successfully: 1/2 replicas READY" in out
    assert "replica 0: READY" in out


def test_deploy_no_wait(fake_client: type[FakeClient], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["deploy", "--model", "chat", "--model_path", "/m", "--no-wait"]) == 0
    assert dict(fake_client.calls)["deploy"]["wait"] is False
    assert "deployment accepted" in capsys.readouterr().out


def test_undeploy_messages(
    fake_client: type[FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["undeploy", "--model", "chat"]) == 0
    assert cli.main(["undeploy", "--model", "other"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "Model chat undeployed successfully",
        "Model other is not deployed; nothing to do",
    ]


def test_unreachable_control_plane_is_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Down(FakeClient):
        def list_models(self) -> list[cp.Model]:
            raise Unavailable("the control plane at h:1 is unavailable: connection refused")

    monkeypatch.setattr(connect, "ByzerLLM", Down)
    assert cli.main(["models"]) == 1
    assert capsys.readouterr().err.startswith("error: the control plane at h:1 is unavailable")


def test_format_table_aligns_columns() -> None:
    text = format_table(["A", "LONGER"], [["xxxx", "1"], ["y", ""]])
    assert text.splitlines() == ["A     LONGER", "xxxx  1", "y"]


def test_control_plane_startup_timeout_is_a_flag() -> None:
    # A large namespace takes about 2 s per 100,000 keys to load; the default is 10 s.
    assert parse("control-plane").startup_timeout == 10.0
    assert parse("control-plane", "--startup-timeout", "120").startup_timeout == 120.0


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "soon"])
def test_control_plane_startup_timeout_must_be_positive_seconds(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse("control-plane", "--startup-timeout", bad)
    assert "is not a positive number of seconds" in capsys.readouterr().err
