"""Which paths a training job may read and write on this trainer worker.

A job names paths on the worker's disk (base model, data, tokenizer, adapter, model config,
output). An operator who gives allowed roots (``--allowed-root``, repeatable, or
``LLMESH_ALLOWED_ROOTS``, separated by ``os.pathsep``) confines every one of them to those
directories; the worker's own jobs directory is always allowed, since default outputs go there.
Paths are compared after resolving ``..`` and symbolic links, so neither leads out of a root.
Without roots every path is allowed, as before (a mesh on one laptop).

With roots, the spec's paths must be absolute: the worker would resolve a relative one against
its own working directory, but the job's runner runs in the job's output directory, so the
checked path and the used one would differ. Path-like values inside ``deepspeed_config_json``
(any key ending in ``_path``, ``_dir`` or ``_file``, at any depth: ``nvme_path``,
``tensorboard.output_path``, ``csv_monitor.output_path``, ``flops_profiler.output_file``, ...)
are checked too; a relative one there is resolved against the output directory, as DeepSpeed
in the runner will.

The check runs when the worker accepts a job, before anything starts: a job outside the
roots ends FAILED with a PERMISSION_DENIED sentence naming the field, the path and the roots.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llmesh.common.errors import PermissionDenied
from llmesh.trainer_worker.convert import deepspeed_config
from llmesh.v1 import trainer_service_pb2 as tr

ROOTS_ENV = "LLMESH_ALLOWED_ROOTS"
_PATH_KEY_SUFFIXES = ("_path", "_dir", "_file")


def _config_paths(node: Any, where: str) -> Iterator[tuple[str, str]]:
    """(dotted key, value) for every string under a path-like key of a JSON value."""
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{where}.{key}"
            if str(key).lower().endswith(_PATH_KEY_SUFFIXES):
                items = value if isinstance(value, list) else [value]
                yield from ((name, v) for v in items if isinstance(v, str) and v)
            yield from _config_paths(value, name)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _config_paths(value, f"{where}[{index}]")


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

        Raises:
            PermissionDenied: a path lies outside the roots, or the spec's is relative.
            InvalidArgument: ``deepspeed_config_json`` is not JSON (its paths cannot be checked).
        """
        fields = [
            ("base_model_path", spec.base_model_path),
            ("data_path", spec.data_path),
            ("adapter_path", spec.adapter_path),
            ("tokenizer_path", spec.tokenizer_path),
            ("output_dir", spec.output_dir),
        ]
        config = spec.model_config.strip()
        if config and not config.startswith("{"):  # a path to config.json, not JSON text
            fields.append(("model_config", config))
        for name, value in fields:
            if value and not Path(value).expanduser().is_absolute():
                raise PermissionDenied(
                    f"spec.{name} {value!r} is a relative path; give an absolute one (the job "
                    "runs in its output directory, not where the trainer worker started)"
                )
        # The output directory as the job will use it (the default one lies in the jobs dir).
        fields[4] = ("output_dir", output_dir)
        ds_config = deepspeed_config(spec)
        if ds_config is not None:
            base = Path(output_dir).expanduser()
            for name, value in _config_paths(ds_config, "deepspeed_config_json"):
                path = Path(value).expanduser()
                fields.append((name, str(path if path.is_absolute() else base / path)))
        for name, value in fields:
            if value and not self.allows(value):
                raise PermissionDenied(
                    f"spec.{name} {value!r} is outside the directories this trainer worker "
                    f"allows ({', '.join(str(r) for r in self.roots)}); move it under one of "
                    f"them or ask the operator to add a root (--allowed-root)"
                )
