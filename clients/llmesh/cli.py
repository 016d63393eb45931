"""The ``llmesh`` command: deploy, undeploy and query models, list the mesh, run the servers.

Client subcommands keep the option names of Byzer-LLM's ``byzerllm`` command (``--model``,
``--model_path``, ``--pretrained_model_type``, ``--infer_backend``, ``--num_workers``,
``--gpus_per_worker``, ``--cpus_per_worker``, ``--infer_params``, ``--query``, ``--template``);
``--control_plane`` replaces ``--ray_address``. Server subcommands come from
:mod:`llmesh.cli_servers`.

Exit codes: 0 success, 1 an llmesh error (printed as one ``error: ...`` line), 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmesh import __version__, cli_servers
from llmesh._table import format_table
from llmesh.client import (
    DEFAULT_ROLE_MAPPING,
    EMPTY_ROLE_MAPPING,
    ByzerLLM,
    default_control_plane,
)
from llmesh.errors import LLMeshError
from llmesh.infer_params import ACCEPTED_FORMS, InferParamsAction
from llmesh.templates import TEMPLATE_NAMES
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp

# Every user-facing string in one table per language; MESSAGES holds the active one.
MESSAGES_EN: dict[str, str] = {
    "desc": "llmesh: serve LLMs on a gRPC mesh (Byzer-LLM compatible)",
    "help_control_plane": "control plane address host:port "
    "(default: $LLMESH_CONTROL_PLANE or 127.0.0.1:50051)",
    "help_deploy": "Deploy a model",
    "help_undeploy": "Undeploy a model",
    "help_query": "Query a deployed model and stream the answer",
    "help_models": "List deployed models and their replicas",
    "help_workers": "List live workers",
    "help_make_test_model": "Write the small local test model into DIR (no downloads)",
    "help_num_workers": "number of replicas to run",
    "help_gpus_per_worker": "GPUs each replica reserves",
    "help_cpus_per_worker": "CPUs each replica reserves",
    "help_model_path": "model directory (HuggingFace layout) as the workers see it",
    "help_pretrained_model_type": "pretrained model type, recorded with the deployment",
    "help_udf_name": "name of the deployed model",
    "help_infer_params": f"engine parameters; each token is {ACCEPTED_FORMS}",
    "help_infer_backend": "inference engine: transformers, vllm, embedding, rerank, or auto "
    "(chosen from the model directory)",
    "help_no_wait": "return once the deployment is recorded, without waiting for READY",
    "help_timeout": "seconds to wait for the replicas to become READY",
    "help_query_model": "name of the deployed model",
    "help_query_text": "the user query / prompt",
    "help_template": "chat template: auto (the model's own), default (User:/Assistant:), empty, "
    "or a Byzer-LLM template (qwen, llama, yi, deepseek_code_chat, ...)",
    "help_max_tokens": "most tokens to generate",
    "help_dir": "directory to write the model into",
    "deploy_success": "Model {0} deployed successfully: {1}/{2} replicas READY",
    "deploy_accepted": "Model {0} deployment accepted; {1} replica(s) loading "
    "(watch with `llmesh models`)",
    "already_deployed": "Model {0} already deployed",
    "undeploy_success": "Model {0} undeployed successfully",
    "not_deployed": "Model {0} is not deployed; nothing to do",
    "no_models": "No models deployed.",
    "no_workers": "No workers registered.",
    "test_model_written": "Test model written to {0}",
    "default_suffix": " (default: %(default)s)",
}

# Chinese texts, chosen when $LANG starts with "zh" (as Byzer-LLM's ``byzerllm`` command does).
MESSAGES_ZH: dict[str, str] = {
    "desc": "llmesh：在 gRPC 网格上部署和调用大模型（兼容 Byzer-LLM）",
    "help_control_plane": "控制平面地址 host:port"
    "（默认：$LLMESH_CONTROL_PLANE 或 127.0.0.1:50051）",
    "help_deploy": "部署一个模型",
    "help_undeploy": "卸载一个模型",
    "help_query": "向已部署的模型提问，并流式输出回答",
    "help_models": "列出已部署的模型及其副本",
    "help_workers": "列出在线的工作节点",
    "help_make_test_model": "把本地小测试模型写入 DIR（不下载任何东西）",
    "help_num_workers": "要运行的副本数",
    "help_gpus_per_worker": "每个副本占用的 GPU 数",
    "help_cpus_per_worker": "每个副本占用的 CPU 数",
    "help_model_path": "模型目录（HuggingFace 格式），以工作节点上的路径为准",
    "help_pretrained_model_type": "预训练模型类型，随部署一起记录",
    "help_udf_name": "部署后的模型名称",
    "help_infer_params": f"推理引擎参数；每一项的写法：{ACCEPTED_FORMS}",
    "help_infer_backend": "推理后端：transformers、vllm、embedding、rerank，"
    "或 auto（按模型目录自动选择）",
    "help_no_wait": "部署记录下来后立即返回，不等待副本就绪",
    "help_timeout": "等待副本就绪的秒数",
    "help_query_model": "已部署的模型名称",
    "help_query_text": "用户的问题 / 提示词",
    "help_template": "对话模板：auto（模型自带）、default（User:/Assistant:）、empty，"
    "或 Byzer-LLM 模板（qwen、llama、yi、deepseek_code_chat 等）",
    "help_max_tokens": "最多生成的 token 数",
    "help_dir": "写入模型的目录",
    "deploy_success": "模型 {0} 部署成功：{1}/{2} 个副本已就绪",
    "deploy_accepted": "模型 {0} 的部署已受理；{1} 个副本正在加载（可用 `llmesh models` 查看）",
    "already_deployed": "模型 {0} 已经部署过了",
    "undeploy_success": "模型 {0} 卸载成功",
    "not_deployed": "模型 {0} 没有部署，无需操作",
    "no_models": "没有已部署的模型。",
    "no_workers": "没有已注册的工作节点。",
    "test_model_written": "测试模型已写入 {0}",
    "default_suffix": "（默认：%(default)s）",
}

LOCALES: dict[str, dict[str, str]] = {"en": MESSAGES_EN, "zh": MESSAGES_ZH}


def cli_language(lang: str | None = None) -> str:
    """``"zh"`` when ``lang`` (default: ``$LANG``) names a Chinese locale, else ``"en"``."""
    value = os.environ.get("LANG", "en") if lang is None else lang
    return "zh" if value.split(".")[0].lower().startswith("zh") else "en"


def set_language(lang: str | None = None) -> str:
    """Switch the CLI's texts to ``lang`` (a locale such as ``zh_CN.UTF-8``; default $LANG).

    Returns:
        The language chosen, ``"en"`` or ``"zh"``.
    """
    chosen = cli_language(lang)
    MESSAGES.clear()
    MESSAGES.update(LOCALES[chosen])
    return chosen


#: The active texts (see :func:`set_language`).
MESSAGES: dict[str, str] = dict(LOCALES[cli_language()])

#: ``query --template`` names and the role mappings they stand for (None: the model's own
#: chat template, applied by the worker).
QUERY_TEMPLATES: dict[str, dict[str, Any] | None] = {
    "auto": None,
    "default": DEFAULT_ROLE_MAPPING,
    "empty": EMPTY_ROLE_MAPPING,
    **{
        name: factory().role_mapping
        for name, factory in TEMPLATE_NAMES.items()
        if name not in ("default", "empty")
    },
}
#: Generation settings that go with a ``query --template`` (e.g. the template's stop token ids).
QUERY_TEMPLATE_CONFIG: dict[str, dict[str, Any]] = {
    name: factory().generation_config for name, factory in TEMPLATE_NAMES.items()
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _num(value: float) -> str:
    """1.0 -> "1", 0.5 -> "0.5": resource counts read better without a trailing .0."""
    return f"{value:g}"


def _state(state: int) -> str:
    return common_pb2.ReplicaState.Name(state).removeprefix("REPLICA_STATE_")


def _client(args: argparse.Namespace) -> ByzerLLM:
    return ByzerLLM(control_plane=args.control_plane)


def _ready_count(model: cp.Model) -> int:
    return sum(r.state == common_pb2.REPLICA_STATE_READY for r in model.replicas)


# -- subcommands ---------------------------------------------------------------------------


def cmd_deploy(args: argparse.Namespace) -> int:
    """``llmesh deploy``: deploy a model, by default waiting until it is READY."""
    with _client(args) as llm:
        if llm.is_model_exist(args.model):
            print(MESSAGES["already_deployed"].format(args.model))
            return 0
        (
            llm.setup_gpus_per_worker(args.gpus_per_worker)
            .setup_cpus_per_worker(args.cpus_per_worker)
            .setup_num_workers(args.num_workers)
            .setup_infer_backend(args.infer_backend)
        )
        llm.deploy(
            model_path=args.model_path,
            pretrained_model_type=args.pretrained_model_type,
            udf_name=args.model,
            infer_params=args.infer_params or {},
            wait=not args.no_wait,
            timeout=args.timeout,
        )
        if args.no_wait:
            print(MESSAGES["deploy_accepted"].format(args.model, args.num_workers))
            return 0
        model = llm.get_model(args.model)
        print(
            MESSAGES["deploy_success"].format(
                args.model, _ready_count(model), model.num_replicas or len(model.replicas)
            )
        )
        for r in sorted(model.replicas, key=lambda r: r.index):
            print(f"  replica {r.index}: {_state(r.state)} on {r.worker_id} ({r.address})")
    return 0


def cmd_undeploy(args: argparse.Namespace) -> int:
    """``llmesh undeploy``: undeploy a model and wait until its replicas unloaded."""
    with _client(args) as llm:
        existed = llm.undeploy(args.model)
    key = "undeploy_success" if existed else "not_deployed"
    print(MESSAGES[key].format(args.model))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    """``llmesh query``: stream a model's answer to stdout as it arrives."""
    llm_config: dict[str, Any] = dict(QUERY_TEMPLATE_CONFIG.get(args.template, {}))
    if args.max_tokens is not None:
        llm_config["max_tokens"] = args.max_tokens
    role_mapping = QUERY_TEMPLATES[args.template]
    out = sys.stdout
    with _client(args) as llm:
        printed = 0
        stream = llm.stream_chat_oai(
            [{"role": "user", "content": args.query}],
            model=args.model,
            role_mapping=role_mapping,
            llm_config=llm_config,
        )
        try:
            for text, _meta in stream:
                out.write(text[printed:])
                out.flush()
                printed = len(text)
        finally:
            stream.close()  # on Ctrl-C this cancels the request on the worker
            if printed:
                out.write("\n")
                out.flush()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``llmesh models``: a table of deployed models."""
    with _client(args) as llm:
        models = llm.list_models()
    if not models:
        print(MESSAGES["no_models"])
        return 0
    rows = []
    for m in sorted(models, key=lambda m: m.name):
        states = " ".join(
            f"{r.index}:{_state(r.state)}" + (f"({r.reason[:60]})" if r.reason else "")
            for r in sorted(m.replicas, key=lambda r: r.index)
        )
        total = m.num_replicas or len(m.replicas)
        rows.append([m.name, m.backend, f"{_ready_count(m)}/{total}", states or "-", m.model_path])
    print(format_table(["NAME", "BACKEND", "READY", "STATES", "PATH"], rows))
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    """``llmesh workers``: a table of live workers and what they host."""
    with _client(args) as llm:
        workers = llm.list_workers()
    if not workers:
        print(MESSAGES["no_workers"])
        return 0
    rows = [
        [
            w.id,
            w.address,
            w.kind or "-",
            f"{_num(w.cpus_used)}/{_num(w.cpus)}",
            f"{_num(w.gpus_used)}/{_num(w.gpus)}",
            ", ".join(w.replicas) or "-",
        ]
        for w in sorted(workers, key=lambda w: w.id)
    ]
    print(format_table(["ID", "ADDRESS", "KIND", "CPUS", "GPUS", "REPLICAS"], rows))
    return 0


def cmd_make_test_model(args: argparse.Namespace) -> int:
    """``llmesh make-test-model DIR``: build the small local test model."""
    try:
        from llmesh.testing import make_test_model
    except ImportError as exc:
        raise LLMeshError(f"the test model builder is not available ({exc})") from None
    path = make_test_model(Path(args.dir))
    print(MESSAGES["test_model_written"].format(path))
    return 0


# -- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the ``llmesh`` argument parser (client and server subcommands)."""
    parser = argparse.ArgumentParser(prog="llmesh", description=MESSAGES["desc"])
    parser.add_argument("--version", action="version", version=f"llmesh {__version__}")
    parser.add_argument(
        "--control_plane", default=default_control_plane(), help=MESSAGES["help_control_plane"]
    )
    # Subcommands accept --control_plane too; SUPPRESS keeps a value given before the
    # subcommand from being overwritten by the subparser's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--control_plane", default=argparse.SUPPRESS, help=MESSAGES["help_control_plane"]
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True

    def add(name: str, help_key: str, func: Callable[[argparse.Namespace], int]) -> Any:
        sub = subparsers.add_parser(
            name, parents=[common], help=MESSAGES[help_key], description=MESSAGES[help_key]
        )
        sub.set_defaults(func=func)
        return sub

    deploy = add("deploy", "help_deploy", cmd_deploy)
    deploy.add_argument("--model", required=True, help=MESSAGES["help_udf_name"])
    deploy.add_argument("--model_path", required=True, help=MESSAGES["help_model_path"])
    deploy.add_argument(
        "--pretrained_model_type",
        default="custom/auto",
        help=MESSAGES["help_pretrained_model_type"] + MESSAGES["default_suffix"],
    )
    deploy.add_argument(
        "--infer_backend",
        default="transformers",
        help=MESSAGES["help_infer_backend"] + MESSAGES["default_suffix"],
    )
    deploy.add_argument(
        "--num_workers",
        type=_positive_int,
        default=1,
        help=MESSAGES["help_num_workers"] + MESSAGES["default_suffix"],
    )
    deploy.add_argument(
        "--gpus_per_worker",
        type=_non_negative_float,
        default=0.0,
        help=MESSAGES["help_gpus_per_worker"] + MESSAGES["default_suffix"],
    )
    deploy.add_argument(
        "--cpus_per_worker",
        type=_positive_float,
        default=1.0,
        help=MESSAGES["help_cpus_per_worker"] + MESSAGES["default_suffix"],
    )
    deploy.add_argument(
        "--infer_params",
        nargs="+",
        action=InferParamsAction,
        default={},
        metavar="KEY=VALUE",
        help=MESSAGES["help_infer_params"],
    )
    deploy.add_argument(
        "--no-wait", dest="no_wait", action="store_true", help=MESSAGES["help_no_wait"]
    )
    deploy.add_argument(
        "--timeout",
        type=_positive_float,
        default=300.0,
        help=MESSAGES["help_timeout"] + MESSAGES["default_suffix"],
    )

    undeploy = add("undeploy", "help_undeploy", cmd_undeploy)
    undeploy.add_argument("--model", required=True, help=MESSAGES["help_udf_name"])

    query = add("query", "help_query", cmd_query)
    query.add_argument("--model", required=True, help=MESSAGES["help_query_model"])
    query.add_argument("--query", required=True, help=MESSAGES["help_query_text"])
    query.add_argument(
        "--template",
        default="auto",
        choices=sorted(QUERY_TEMPLATES),
        help=MESSAGES["help_template"] + MESSAGES["default_suffix"],
    )
    query.add_argument(
        "--max_tokens", type=_positive_int, default=None, help=MESSAGES["help_max_tokens"]
    )

    add("models", "help_models", cmd_models)
    add("workers", "help_workers", cmd_workers)

    make = subparsers.add_parser(
        "make-test-model",
        help=MESSAGES["help_make_test_model"],
        description=MESSAGES["help_make_test_model"],
    )
    make.add_argument("dir", metavar="DIR", help=MESSAGES["help_dir"])
    make.set_defaults(func=cmd_make_test_model)

    cli_servers.add_server_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``llmesh`` command and return its exit code.

    Args:
        argv: the arguments after the program name; None reads ``sys.argv[1:]``.

    Returns:
        0 on success, 1 for an llmesh error, 2 for bad usage (argparse errors, a bad
        ``--infer_params`` token, other invalid values), 130 when interrupted.
    """
    set_language()
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # argparse exits for --help, --version and usage errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_usage(sys.stderr)
        return 2
    try:
        result = func(args)
    except LLMeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
