"""Model subcommands: ``deploy``, ``undeploy``, ``query``, ``models``, ``workers`` and
``make-test-model``.

They keep the option names of Byzer-LLM's ``byzerllm`` command (``--model``, ``--model_path``,
``--pretrained_model_type``, ``--infer_backend``, ``--num_workers``, ``--gpus_per_worker``,
``--cpus_per_worker``, ``--infer_params``, ``--query``, ``--template``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmesh._table import format_table
from llmesh.arg_types import non_negative_float, positive_float, positive_int
from llmesh.cli.connect import connect
from llmesh.client import DEFAULT_ROLE_MAPPING, EMPTY_ROLE_MAPPING
from llmesh.common.errors import LLMeshError
from llmesh.i18n import MESSAGES
from llmesh.infer_params import InferParamsAction
from llmesh.templates import TEMPLATE_NAMES
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp

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


def _num(value: float) -> str:
    """1.0 -> "1", 0.5 -> "0.5": resource counts read better without a trailing .0."""
    return f"{value:g}"


def _state(state: int) -> str:
    return common_pb2.ReplicaState.Name(state).removeprefix("REPLICA_STATE_")


def _ready_count(model: cp.Model) -> int:
    return sum(r.state == common_pb2.REPLICA_STATE_READY for r in model.replicas)


# -- subcommands ---------------------------------------------------------------------------


def cmd_deploy(args: argparse.Namespace) -> int:
    """``llmesh deploy``: deploy a model, by default waiting until it is READY."""
    with connect(args) as llm:
        if llm.is_model_exist(args.model):
            print(MESSAGES["already_deployed"].format(args.model))
            return 0
        (
            llm.setup_gpus_per_worker(args.gpus_per_worker)
            .setup_cpus_per_worker(args.cpus_per_worker)
            .setup_num_workers(args.num_workers)
            .setup_infer_backend(args.infer_backend)
        )
        # Only an adapter deployment passes base_model, so plain deploys call as before.
        adapter = {"base_model": args.base_model} if args.base_model else {}
        llm.deploy(
            model_path=args.model_path,
            pretrained_model_type=args.pretrained_model_type,
            udf_name=args.model,
            infer_params=args.infer_params or {},
            wait=not args.no_wait,
            timeout=args.timeout,
            **adapter,
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
    with connect(args) as llm:
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
    with connect(args) as llm:
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
    with connect(args) as llm:
        models = llm.list_models()
    if not models:
        print(MESSAGES["no_models"])
        return 0
    rows = []
    for m in sorted(models, key=lambda m: m.name):
        replicas = sorted(m.replicas, key=lambda r: r.index)
        states = " ".join(
            f"{r.index}:{_state(r.state)}" + (f"({r.reason[:60]})" if r.reason else "")
            for r in replicas
        )
        # Where each replica runs: its worker, its own process and the devices it holds.
        where = " ".join(
            f"{r.index}:{r.worker_id or '-'}"
            + (f" pid {r.pid}" if r.pid else "")
            + (f" gpu {','.join(r.devices)}" if r.devices else "")
            for r in replicas
        )
        total = m.num_replicas or len(m.replicas)
        rows.append(
            [
                m.name,
                m.backend,
                f"{_ready_count(m)}/{total}",
                states or "-",
                where or "-",
                m.model_path,
            ]
        )
    print(format_table(["NAME", "BACKEND", "READY", "STATES", "PROCESSES", "PATH"], rows))
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    """``llmesh workers``: a table of live workers and what they host."""
    with connect(args) as llm:
        workers = llm.list_workers()
        models = llm.list_models() if workers else []
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
            _devices(w),
            ", ".join(w.replicas) or "-",
        ]
        for w in sorted(workers, key=lambda w: w.id)
    ]
    print(format_table(["ID", "ADDRESS", "KIND", "CPUS", "GPUS", "DEVICES", "REPLICAS"], rows))
    targets = _metrics_targets(workers, models)
    if targets:
        print()
        print(format_table(["WORKER", "PROCESS", "METRICS"], targets))
    return 0


def _metrics_targets(workers: list[cp.Worker], models: list[cp.Model]) -> list[list[str]]:
    """Every /metrics URL the workers publish: their own, then their replica processes'."""
    rows = []
    for w in sorted(workers, key=lambda w: w.id):
        if w.metrics_url:
            rows.append([w.id, w.kind or "-", w.metrics_url])
        # An adapter rides in its base replica's process: the same URL, listed once.
        seen = set()
        for m in sorted(models, key=lambda m: m.name):
            for r in sorted(m.replicas, key=lambda r: r.index):
                if r.worker_id == w.id and r.metrics_url and r.metrics_url not in seen:
                    seen.add(r.metrics_url)
                    rows.append([w.id, f"{m.name}/{r.index} pid {r.pid}", r.metrics_url])
    return rows


def _devices(worker: cp.Worker) -> str:
    """Each device id with who holds it, e.g. ``0=chat/0 1=free 2=emb/0+emb/1``."""
    if not worker.devices:
        return "-"
    return " ".join(
        f"{d.id}={'+'.join(d.holders) if d.holders else 'free'}" for d in worker.devices
    )


def cmd_make_test_model(args: argparse.Namespace) -> int:
    """``llmesh make-test-model DIR``: build the small local test model."""
    try:
        from llmesh.testing import make_test_model
    except ImportError as exc:
        raise LLMeshError(f"the test model builder is not available ({exc})") from None
    path = make_test_model(Path(args.dir))
    print(MESSAGES["test_model_written"].format(path))
    return 0


# -- registration --------------------------------------------------------------------------


def add_model_commands(add: Callable[[str, str, Callable[[argparse.Namespace], int]], Any]) -> None:
    """Register ``deploy``, ``undeploy``, ``query``, ``models`` and ``workers``.

    Args:
        add: adds a subcommand (name, help key in the message table, handler) that takes
            ``--control_plane`` and returns its parser.
    """
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
        type=positive_int,
        default=1,
        help=MESSAGES["help_num_workers"] + MESSAGES["default_suffix"],
    )
    deploy.add_argument(
        "--gpus_per_worker",
        type=non_negative_float,
        default=0.0,
        help=MESSAGES["help_gpus_per_worker"] + MESSAGES["default_suffix"],
    )
    deploy.add_argument(
        "--cpus_per_worker",
        type=positive_float,
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
        type=positive_float,
        default=300.0,
        help=MESSAGES["help_timeout"] + MESSAGES["default_suffix"],
    )

    deploy.add_argument("--base_model", default=None, help=MESSAGES["help_base_model"])

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
        "--max_tokens", type=positive_int, default=None, help=MESSAGES["help_max_tokens"]
    )

    add("models", "help_models", cmd_models)
    add("workers", "help_workers", cmd_workers)


def add_make_test_model_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``make-test-model`` (it needs no control plane).

    Args:
        subparsers: the ``llmesh`` parser's subcommands.
    """
    make = subparsers.add_parser(
        "make-test-model",
        help=MESSAGES["help_make_test_model"],
        description=MESSAGES["help_make_test_model"],
    )
    make.add_argument("dir", metavar="DIR", help=MESSAGES["help_dir"])
    make.set_defaults(func=cmd_make_test_model)
