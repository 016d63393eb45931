"""The SDK client every client subcommand opens: a ``ByzerLLM`` on ``--control_plane``."""

from __future__ import annotations

import argparse

from llmesh.client import ByzerLLM
from llmesh.common.tls import TlsConfig


def connect(args: argparse.Namespace) -> ByzerLLM:
    """A client of the control plane the command line names.

    Args:
        args: the parsed command line; ``args.control_plane`` is ``HOST:PORT``. TLS comes
            from ``--tls-ca/--tls-cert/--tls-key`` where the command has them, else from
            ``$LLMESH_TLS_CA``, ``$LLMESH_TLS_CERT`` and ``$LLMESH_TLS_KEY``.
            ``args.token`` is the bearer token (None: ``$LLMESH_TOKEN``).
    """
    return ByzerLLM(
        control_plane=args.control_plane,
        tls=TlsConfig.from_args(args),
        token=getattr(args, "token", None),
    )
