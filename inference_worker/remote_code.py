"""Whether a replica may run Python code shipped in its model directory (``trust_remote_code``).

Two keys must turn: the deploy asks for it (infer_params ``trust_remote_code=true``) and the
inference worker's operator allows it (``llmesh inference-worker --allow-remote-code`` or
``LLMESH_ALLOW_REMOTE_CODE=1``). A deploy that asks on a worker that does not allow it fails
to load with a PERMISSION_DENIED sentence (the replica is FAILED, not restarted); no engine is
built, so no model file is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from llmesh.common.errors import PermissionDenied
from llmesh.inference_worker.engines.base import Engine, EngineConfig

ALLOW_ENV = "LLMESH_ALLOW_REMOTE_CODE"
_TRUE = frozenset({"1", "true", "yes", "on"})


def allow_from_env(value: bool | None = None) -> bool:
    """``value`` when given, else ``LLMESH_ALLOW_REMOTE_CODE``; off by default."""
    if value is not None:
        return value
    return os.environ.get(ALLOW_ENV, "").strip().lower() in _TRUE


def asks_for_remote_code(infer_params: Mapping[str, str]) -> bool:
    """Whether a deploy's infer_params ask for ``trust_remote_code``."""
    return infer_params.get("trust_remote_code", "").strip().lower() in _TRUE


def check_remote_code(model: str, infer_params: Mapping[str, str], *, allowed: bool) -> None:
    """Raise PermissionDenied when the deploy asks for remote code and the worker refuses it."""
    if allowed or not asks_for_remote_code(infer_params):
        return
    raise PermissionDenied(
        f"model {model} asks for trust_remote_code, which would run Python code from its model "
        "directory, and this inference worker does not allow it; deploy without "
        "trust_remote_code, or have the operator start the worker with --allow-remote-code "
        "(LLMESH_ALLOW_REMOTE_CODE=1)"
    )


def remote_code_guard(
    factory: Callable[[EngineConfig], Engine], *, allowed: bool
) -> Callable[[EngineConfig], Engine]:
    """``factory``, refusing (before building anything) engines that would run remote code."""

    def guarded(config: EngineConfig) -> Engine:
        check_remote_code(config.model_name, config.infer_params, allowed=allowed)
        return factory(config)

    return guarded
