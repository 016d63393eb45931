"""The SDK client every client subcommand opens: a ``ByzerLLM`` on ``--control_plane``."""

from __future__ import annotations

import argparse

from llmesh.client import ByzerLLM


def connect(args: argparse.Namespace) -> ByzerLLM:
    """A client of the control plane the command line names.

    Args:
        args: the parsed command line; ``args.control_plane`` is ``HOST:PORT``, ``args.token``
            the bearer token (None: ``$LLMESH_TOKEN``).
    """
    return ByzerLLM(control_plane=args.control_plane, token=getattr(args, "token", None))
