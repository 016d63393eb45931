"""Validating and normalizing a DeployModel request's model spec."""

from __future__ import annotations

import math
import re

from llmesh.common.backends import BACKENDS, check_infer_params
from llmesh.common.errors import InvalidArgument
from llmesh.v1 import control_plane_service_pb2 as cp

DEFAULT_BACKEND = "transformers"
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
MAX_NAME_LENGTH = 200

# The fields that define a deployment; two specs with equal fields are the same deployment.
SPEC_FIELDS = (
    "model_path",
    "backend",
    "infer_params",
    "num_replicas",
    "cpus_per_replica",
    "gpus_per_replica",
    "pretrained_model_type",
    "base_model",
)


def supported_backends() -> tuple[str, ...]:
    """The backend names inference workers understand."""
    return BACKENDS


def normalize(model: cp.Model) -> cp.Model:
    """Check a model spec and fill its defaults; returns a new message without replicas.

    Raises:
        InvalidArgument: naming the field and how to fix it; for infer_params also a key the
            backend does not accept or a value of the wrong type (see
            :func:`llmesh.common.backends.check_infer_params`).
    """
    name = model.name
    if not name.strip():
        raise InvalidArgument('model.name is required, e.g. "chat"')
    if "/" in name or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(
            f"model.name {model.name!r} is not valid: use only letters, digits, '.', '_' and '-' "
            "(no '/' or spaces)"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"model.name is {len(name)} characters; at most {MAX_NAME_LENGTH}")
    if not model.model_path.strip():
        raise InvalidArgument(
            "model.model_path is required: the model's local directory on the workers"
        )
    if model.base_model:
        return _normalize_adapter(model)
    backend = model.backend.strip() or DEFAULT_BACKEND
    backends = supported_backends()
    if backend not in backends:
        raise InvalidArgument(
            f"model.backend {model.backend!r} is not supported; use one of {', '.join(backends)}"
        )
    if model.num_replicas < 0:
        raise InvalidArgument(f"model.num_replicas must be at least 1, got {model.num_replicas}")
    cpus = model.cpus_per_replica
    if not math.isfinite(cpus) or cpus < 0:
        raise InvalidArgument(
            f"model.cpus_per_replica must be a positive number of CPUs, got {cpus:g}"
        )
    gpus = model.gpus_per_replica
    # A replica holds whole devices or a share of one; 1.5 would be a device and a half, which
    # no placement can give a process that sees whole devices (CUDA_VISIBLE_DEVICES).
    if not math.isfinite(gpus) or gpus < 0 or (gpus > 1 and gpus != math.floor(gpus)):
        raise InvalidArgument(
            "model.gpus_per_replica must be 0 or more: 0 for no GPU, a fraction below 1 for a "
            "share of one GPU (e.g. 0.5), or a whole number of GPUs (1, 2, ...); "
            f"got {gpus:g}"
        )
    for key in model.infer_params:
        if not key.strip():
            raise InvalidArgument("model.infer_params has an empty key; pass KEY=VALUE pairs")
    # Keys and value types are the backend's (llmesh.common.backends): a typo or a bad value is
    # refused here, before anything is written, rather than by the engine on the worker. The
    # strings are stored as given; engines parse them with the same table.
    check_infer_params(backend, model.infer_params, model=name)
    out = cp.Model(
        name=name,
        model_path=model.model_path,
        backend=backend,
        infer_params=dict(model.infer_params),
        num_replicas=model.num_replicas or 1,
        cpus_per_replica=cpus or 1.0,
        gpus_per_replica=gpus,
        pretrained_model_type=model.pretrained_model_type,
    )
    return out


def same_spec(a: cp.Model, b: cp.Model) -> bool:
    """Whether two normalized specs describe the same deployment (replicas, generation aside)."""
    return all(getattr(a, f) == getattr(b, f) for f in SPEC_FIELDS)


def describe_difference(existing: cp.Model, wanted: cp.Model) -> str:
    """Which spec fields differ, e.g. "num_replicas 1 -> 2"."""
    parts = []
    for f in SPEC_FIELDS:
        old, new = getattr(existing, f), getattr(wanted, f)
        if old != new:
            if f == "infer_params":
                old, new = dict(old), dict(new)
            parts.append(f"{f} {old!r} -> {new!r}")
    return ", ".join(parts)


def _normalize_adapter(model: cp.Model) -> cp.Model:
    """An adapter rides on its base model's replicas: it takes no capacity or engine params."""
    base = model.base_model
    if "/" in base or not NAME_PATTERN.fullmatch(base):
        raise InvalidArgument(f"model.base_model {base!r} is not a valid model name")
    if base == model.name:
        raise InvalidArgument("model.base_model names the adapter itself; name its base model")
    if model.infer_params:
        raise InvalidArgument(
            f"adapter {model.name} takes no infer_params (it runs in base model {base}'s "
            "engine); set them on the base model"
        )
    # backend and num_replicas come from the base model at deploy time; the replica and
    # capacity fields a client may send by habit are ignored (an adapter takes no capacity).
    return cp.Model(
        name=model.name,
        model_path=model.model_path,
        pretrained_model_type=model.pretrained_model_type,
        base_model=base,
    )
