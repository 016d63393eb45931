"""Which paths a training job may read and write on this trainer worker.

A job names paths on the worker's disk (base model, data, tokenizer, adapter, model config,
output). An operator who gives allowed roots (``--allowed-root``, repeatable, or
``LLMESH_ALLOWED_ROOTS``, separated by ``os.pathsep``) confines every one of them to those
directories; the worker's own jobs directory is always allowed, since default outputs go there.
Paths are compared after resolving ``..`` and symbolic links, so neither leads out of a root.
Without roots every path is allowed, as before (a mesh on one laptop).

The check runs when the worker accepts a job, before anything starts: a job outside the
roots ends FAILED with a PERMISSION_DENIED sentence naming the field, the path and the roots.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from llmesh.common.errors import PermissionDenied
from llmesh.v1 import trainer_service_pb2 as tr

ROOTS_ENV = "LLMESH_ALLOWED_ROOTS"


def roots_from_env(roots: Sequence[str | Path] | None = None) -> list[Path] | None:
    """``roots`` when given, else ``LLMESH_ALLOWED_ROOTS``; None when neither names any."""
    if roots is None:
        text = os.environ.get(ROOTS_ENV, "")
        roots = [part for part in text.split(os.pathsep) if part.strip()]
    if not roots:
        return None
    return [Path(r).expanduser().resolve() for r in roots]


class PathPolicy:
    """The directories a job's paths must lie under.

    Args:
        roots: the allowed roots (resolved here).
        jobs_dir: the worker's jobs directory, allowed as well.
    """

    def __init__(self, roots: Iterable[str | Path], jobs_dir: str | Path) -> None:
        resolved = [Path(r).expanduser().resolve() for r in roots]
        resolved.append(Path(jobs_dir).expanduser().resolve())
        self.roots = list(dict.fromkeys(resolved))

    def allows(self, path: str | Path) -> bool:
        """Whether ``path`` (resolved) lies in one of the roots."""
        target = Path(path).expanduser().resolve()
        return any(target == root or target.is_relative_to(root) for root in self.roots)

    def check(self, spec: tr.TrainingJobSpec, output_dir: str) -> None:
        """Raise PermissionDenied for the first path of the job outside the roots.

        Args:
            spec: the job's spec.
            output_dir: where the job will write (the spec's or the default one).
        """
        fields = [
            ("base_model_path", spec.base_model_path),
            ("data_path", spec.data_path),
            ("adapter_path", spec.adapter_path),
            ("tokenizer_path", spec.tokenizer_path),
            ("output_dir", output_dir),
        ]
        config = spec.model_config.strip()
        if config and not config.startswith("{"):  # a path to config.json, not JSON text
            fields.append(("model_config", config))
        for name, value in fields:
            if value and not self.allows(value):
                raise PermissionDenied(
                    f"spec.{name} {value!r} is outside the directories this trainer worker "
                    f"allows ({', '.join(str(r) for r in self.roots)}); move it under one of "
                    f"them or ask the operator to add a root (--allowed-root)"
                )
