"""From the contract to the runner: ``TrainingJobSpec`` (protobuf) -> the runner's spec dict.

The control plane stores what the user asked for as a ``TrainingJobSpec``; the job runner takes
a plain dict (:meth:`llmesh.trainer_worker.runner.spec.JobSpec.from_dict`), which validates it
and fills in defaults. This module only translates: proto zero values ("not set") are left out
so the runner's defaults apply, and JSON text becomes objects. Hyperparameters pass as they are
(canonical names, text values): the runner types them by :mod:`llmesh.common.training_spec`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmesh.common.errors import InvalidArgument
from llmesh.v1 import trainer_service_pb2 as tr

__all__ = ["default_output_dir", "output_dir_of", "spec_to_runner_dict"]

_KINDS = {
    tr.TRAINING_JOB_KIND_SFT: "sft",
    tr.TRAINING_JOB_KIND_PRETRAIN: "pretrain",
    tr.TRAINING_JOB_KIND_MERGE_LORA: "merge_lora",
}
_METHODS = {tr.TRAINING_METHOD_LORA: "lora", tr.TRAINING_METHOD_FULL: "full"}


def default_output_dir(jobs_dir: str | Path, job_id: str) -> str:
    """Where a job writes when its spec names no output_dir: ``{jobs_dir}/{job_id}``."""
    return str(Path(jobs_dir) / job_id)


def output_dir_of(job: tr.TrainingJob, jobs_dir: str | Path) -> str:
    """The job's output directory on this worker: the spec's, or the default one."""
    return job.spec.output_dir or default_output_dir(jobs_dir, job.id)


def spec_to_runner_dict(job: tr.TrainingJob, *, jobs_dir: str | Path) -> dict[str, Any]:
    """Translate a job record into the dict the runner's ``JobSpec.from_dict`` validates.

    Args:
        job: the job record; its ``id`` becomes the runner's ``job_id``.
        jobs_dir: the worker's jobs directory; ``output_dir`` defaults to ``{jobs_dir}/{id}``.

    Raises:
        InvalidArgument: the kind is not set, or a JSON text field does not parse.
    """
    spec = job.spec
    kind = _KINDS.get(spec.kind)
    if kind is None:
        known = spec.kind in tr.TrainingJobKind.values()
        name = tr.TrainingJobKind.Name(spec.kind) if known else str(spec.kind)
        raise InvalidArgument(
            f"spec.kind {name} is not a job kind this worker runs; use SFT, PRETRAIN or MERGE_LORA"
        )
    out: dict[str, Any] = {
        "job_id": job.id,
        "kind": kind,
        "output_dir": output_dir_of(job, jobs_dir),
        "num_ranks": max(1, spec.num_ranks),
        "resume": spec.resume if spec.HasField("resume") else True,
    }
    for name in ("base_model_path", "data_path", "adapter_path", "tokenizer_path", "template"):
        value = getattr(spec, name)
        if value:
            out[name] = value
    if spec.cpus > 0:
        # The job's CPU reservation becomes its threads: ranks sharing the worker with other
        # jobs must not each spin up one thread per core of the machine.
        out["threads_per_rank"] = max(1, int(spec.cpus // out["num_ranks"]))
    if spec.method in _METHODS:
        out["method"] = _METHODS[spec.method]

    lora: dict[str, Any] = {}
    if spec.lora.r > 0:
        lora["r"] = spec.lora.r
    if spec.lora.alpha > 0:
        # The runner wants a whole alpha; a fractional one is passed on so it names the field.
        lora["alpha"] = int(spec.lora.alpha) if spec.lora.alpha.is_integer() else spec.lora.alpha
    elif spec.lora.r > 0:
        lora["alpha"] = 2 * spec.lora.r  # the contract: alpha 0 means 2 * r
    if spec.lora.dropout > 0:
        # Proto3 cannot tell 0 from "not set"; 0 keeps the runner's default dropout.
        lora["dropout"] = spec.lora.dropout
    if spec.lora.target_modules:
        lora["target_modules"] = list(spec.lora.target_modules)
    if lora:
        out["lora"] = lora

    if spec.hyperparameters:
        # Canonical names, text values: the runner types them by the one table.
        out["hyperparameters"] = dict(sorted(spec.hyperparameters.items()))

    config = deepspeed_config(spec)
    if config is not None:
        out["deepspeed_config"] = config

    model_config = spec.model_config.strip()
    if model_config:
        if model_config.startswith("{"):
            try:
                out["model_config"] = json.loads(model_config)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(
                    f"spec.model_config looks like JSON but does not parse ({exc}); give "
                    "AutoConfig keys as a JSON object or a path to config.json"
                ) from None
        else:
            out["model_config"] = model_config
    return out


def deepspeed_config(spec: tr.TrainingJobSpec) -> dict[str, Any] | None:
    """The spec's ``deepspeed_config_json`` as a dict; None when it is empty.

    Raises:
        InvalidArgument: it is not JSON, or not a JSON object.
    """
    if not spec.deepspeed_config_json.strip():
        return None
    try:
        config = json.loads(spec.deepspeed_config_json)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            f"spec.deepspeed_config_json is not valid JSON ({exc}); give a JSON object "
            'such as {"zero_optimization": {"stage": 2}}'
        ) from None
    if not isinstance(config, dict):
        raise InvalidArgument(
            "spec.deepspeed_config_json must be a JSON object of DeepSpeed settings, got a "
            f'JSON {type(config).__name__}; e.g. {{"zero_optimization": {{"stage": 2}}}}'
        )
    return config
