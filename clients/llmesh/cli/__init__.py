"""The ``llmesh`` command: deploy, undeploy and query models, list the mesh, run the servers.

Training jobs: ``llmesh sft`` / ``pretrain`` / ``merge-lora`` create a job and follow it (progress
bar, log lines, loss curve PNG) unless ``--detach``; ``llmesh jobs`` lists them and ``llmesh job
get|cancel|watch ID`` handles one.

Client subcommands keep the option names of Byzer-LLM's ``byzerllm`` command (``--model``,
``--model_path``, ``--pretrained_model_type``, ``--infer_backend``, ``--num_workers``,
``--gpus_per_worker``, ``--cpus_per_worker``, ``--infer_params``, ``--query``, ``--template``);
``--control_plane`` replaces ``--ray_address``.

The subcommands live by area: :mod:`llmesh.cli.models` (deploy, undeploy, query, models, workers,
make-test-model), :mod:`llmesh.cli.training` (sft, pretrain, merge-lora, jobs, job),
:mod:`llmesh.cli.demo`, :mod:`llmesh.cli.servers` (up, control-plane, the workers) and
:mod:`llmesh.bench`; their texts and the language choice are in :mod:`llmesh.i18n`.

Exit codes: 0 success, 1 an llmesh error (printed as one ``error: ...`` line), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from llmesh import __version__
from llmesh import bench as bench_command
from llmesh.cli import certs, demo, gateway, models, security, servers, training
from llmesh.client import default_control_plane
from llmesh.common.errors import LLMeshError
from llmesh.common.tls import add_tls_arguments
from llmesh.i18n import MESSAGES, set_language


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
    # Client TLS (each falls back to its LLMESH_TLS_* variable): see llmesh.cli.connect.
    add_tls_arguments(common, server=False)
    # The bearer token client commands send; default $LLMESH_TOKEN (see llmesh.common.auth).
    parser.add_argument("--token", default=None, help=MESSAGES["help_token"])
    common.add_argument("--token", default=argparse.SUPPRESS, help=MESSAGES["help_token"])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True

    def add(name: str, help_key: str, func: Callable[[argparse.Namespace], int]) -> Any:
        sub = subparsers.add_parser(
            name, parents=[common], help=MESSAGES[help_key], description=MESSAGES[help_key]
        )
        sub.set_defaults(func=func)
        return sub

    models.add_model_commands(add)
    training.add_training_commands(subparsers, common, add)
    models.add_make_test_model_command(subparsers)

    bench = subparsers.add_parser(
        "bench", help=MESSAGES["help_bench"], description=MESSAGES["help_bench"]
    )
    bench_command.add_arguments(bench)
    bench.set_defaults(func=bench_command.run)

    demo.add_demo_command(subparsers)
    certs.add_certs_command(subparsers)
    servers.add_server_commands(subparsers)
    gateway.add_gateway_command(subparsers)
    security.add_security_commands(subparsers)
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
