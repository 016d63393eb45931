"""``llmesh gateway``: the OpenAI-compatible HTTP gateway in front of a mesh.

Also what ``llmesh up`` runs as a child process (:func:`gateway_argv`), unless
``--no-gateway``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable

from llmesh.client import default_control_plane
from llmesh.common.auth import auth_from_env
from llmesh.common.tls import InsecureBind, TlsConfig, add_tls_arguments
from llmesh.gateway import DEFAULT_GATEWAY_LISTEN
from llmesh.gateway.pool import DEFAULT_MAX_CLIENTS
from llmesh.i18n import t


def gateway_argv(
    control_plane: str, listen: str, *, tls: TlsConfig | None, auth: bool, insecure: bool
) -> list[str]:
    """The command line of a gateway child process (``llmesh up``'s)."""
    cmd = [sys.executable, "-m", "llmesh", "gateway", "--control-plane", control_plane]
    cmd += ["--listen", listen]
    if tls is not None:
        cmd += tls.to_argv()
    if auth:
        cmd.append("--auth")
    if insecure:
        cmd.append("--insecure")
    return cmd


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed (as `vllm serve` and uvicorn use it), unless
    ``LLMESH_GATEWAY_LOOP=asyncio``; None: asyncio's own loop."""
    if os.environ.get("LLMESH_GATEWAY_LOOP", "auto") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _cmd_gateway(args: argparse.Namespace) -> int:
    from llmesh.gateway.server import serve_forever

    try:
        tls = TlsConfig.from_args(args)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(
                serve_forever(
                    control_plane=args.control_plane or default_control_plane(),
                    listen=args.listen,
                    tls=tls,
                    require_token=auth_from_env(args.auth),
                    insecure=bool(args.insecure),
                    max_clients=args.max_clients,
                )
            )
    except (InsecureBind, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def add_gateway_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``llmesh gateway``.

    Args:
        subparsers: the ``llmesh`` parser's subcommands.
    """
    gw = subparsers.add_parser(
        "gateway",
        help=t(
            "serve the OpenAI-compatible HTTP API (/v1/chat/completions, ...) for a mesh",
            "为网格提供 OpenAI 兼容的 HTTP API（/v1/chat/completions 等）",
        ),
        description=t(
            "A stateless OpenAI-compatible HTTP gateway: run several behind any load balancer. "
            "Callers' bearer tokens are forwarded to the mesh, which checks them.",
            "无状态的 OpenAI 兼容 HTTP 网关，可在任意负载均衡器后运行多个。调用方的访问令牌"
            "原样转发给网格，由网格校验。",
        ),
    )
    gw.add_argument(
        "--control-plane",
        default=None,
        help=t(
            "control plane HOST:PORT (default $LLMESH_CONTROL_PLANE or 127.0.0.1:50051)",
            "控制平面地址 HOST:PORT（默认 $LLMESH_CONTROL_PLANE 或 127.0.0.1:50051）",
        ),
    )
    gw.add_argument(
        "--listen",
        default=DEFAULT_GATEWAY_LISTEN,
        help=t(
            f"HTTP address to bind (default {DEFAULT_GATEWAY_LISTEN})",
            f"HTTP 绑定地址（默认 {DEFAULT_GATEWAY_LISTEN}）",
        ),
    )
    gw.add_argument(
        "--auth",
        action="store_true",
        default=None,
        help=t(
            "refuse requests without 'Authorization: Bearer' here (default $LLMESH_AUTH); the "
            "mesh checks the token itself either way",
            "在网关处拒绝不带 'Authorization: Bearer' 的请求（默认 $LLMESH_AUTH）；"
            "令牌本身总由网格校验",
        ),
    )
    gw.add_argument(
        "--max-clients",
        type=int,
        default=DEFAULT_MAX_CLIENTS,
        help=t(
            f"SDK clients (one per caller token) kept open (default {DEFAULT_MAX_CLIENTS})",
            f"保持打开的 SDK 客户端数（每个调用方令牌一个，默认 {DEFAULT_MAX_CLIENTS}）",
        ),
    )
    add_tls_arguments(gw)
    gw.set_defaults(func=_cmd_gateway)
