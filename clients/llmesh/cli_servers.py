"""Server subcommands of the CLI (up, control-plane, inference-worker) — being written."""

from __future__ import annotations

import argparse


def add_server_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `up`, `control-plane` and `inference-worker` on the CLI's subparsers."""
