"""Training-job rules shared by the control plane, trainer workers and the SDK.

Pure functions over the ``TrainingJob`` protobuf: which states are final, which transitions
are allowed, and the one place that validates a ``TrainingJobSpec`` before it is stored.
"""

from __future__ import annotations

import json
import time

from google.protobuf.timestamp_pb2 import Timestamp

from llmesh.common.errors import InvalidArgument
from llmesh.v1 import trainer_service_pb2 as tr

State = tr.TrainingJobState
Kind = tr.TrainingJobKind

FINAL_STATES = frozenset(
    {
        State.TRAINING_JOB_STATE_SUCCEEDED,
        State.TRAINING_JOB_STATE_FAILED,
        State.TRAINING_JOB_STATE_CANCELLED,
    }
)
ACTIVE_STATES = frozenset({State.TRAINING_JOB_STATE_QUEUED, State.TRAINING_JOB_STATE_RUNNING})

# Allowed moves; anything else (in particular leaving a final state) is refused, which is what
# makes "the outcome is recorded exactly once" hold under compare-and-swap writes.
_TRANSITIONS: dict[int, frozenset[int]] = {
    State.TRAINING_JOB_STATE_QUEUED: frozenset(
        {
            State.TRAINING_JOB_STATE_RUNNING,
            State.TRAINING_JOB_STATE_FAILED,
            State.TRAINING_JOB_STATE_CANCELLED,
        }
    ),
    State.TRAINING_JOB_STATE_RUNNING: FINAL_STATES,
}

# Hyperparameter keys a spec may carry (Byzer-LLM / HuggingFace names); the runner reads them.
HYPERPARAMETERS = (
    "num_train_epochs",
    "max_steps",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "cutoff_len",
    "val_set_size",
    "save_steps",
    "logging_steps",
    "warmup_steps",
    "seed",
    "weight_decay",
    "lr_scheduler_type",
    "max_grad_norm",
)


def is_final(state: int) -> bool:
    """True for SUCCEEDED, FAILED and CANCELLED."""
    return state in FINAL_STATES


def can_move(current: int, new: int) -> bool:
    """Whether a job in ``current`` may move to ``new`` (same state counts as no move)."""
    return new in _TRANSITIONS.get(current, frozenset())


def state_name(state: int) -> str:
    """``"RUNNING"`` for TRAINING_JOB_STATE_RUNNING, and so on."""
    return State.Name(state).removeprefix("TRAINING_JOB_STATE_")


def kind_name(kind: int) -> str:
    """``"SFT"`` for TRAINING_JOB_KIND_SFT, and so on."""
    return Kind.Name(kind).removeprefix("TRAINING_JOB_KIND_")


def now() -> Timestamp:
    """The current time as a protobuf Timestamp."""
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def default_cpus(spec: tr.TrainingJobSpec) -> float:
    """CPUs a job reserves: ``spec.cpus``, else one per rank (MERGE_LORA: one)."""
    if spec.cpus > 0:
        return spec.cpus
    if spec.kind == Kind.TRAINING_JOB_KIND_MERGE_LORA:
        return 1.0
    return float(max(1, spec.num_ranks))


def validate_spec(spec: tr.TrainingJobSpec) -> None:
    """Refuse a spec that can never run, naming the field and the fix.

    Paths are checked by the trainer worker (they are on its file system); this checks what
    can be checked anywhere: the kind, the fields the kind needs, numbers and JSON text.

    Raises:
        InvalidArgument: the first problem found.
    """
    if spec.kind == Kind.TRAINING_JOB_KIND_UNSPECIFIED:
        raise InvalidArgument("spec.kind is not set; use SFT, PRETRAIN or MERGE_LORA")
    if spec.kind not in Kind.values():
        raise InvalidArgument(f"spec.kind {spec.kind} is not a TrainingJobKind")
    need: dict[int, tuple[str, ...]] = {
        Kind.TRAINING_JOB_KIND_SFT: ("base_model_path", "data_path"),
        Kind.TRAINING_JOB_KIND_PRETRAIN: ("data_path", "model_config", "tokenizer_path"),
        Kind.TRAINING_JOB_KIND_MERGE_LORA: ("base_model_path", "adapter_path"),
    }
    for name in need[spec.kind]:
        if not getattr(spec, name):
            raise InvalidArgument(
                f"spec.{name} is empty; a {kind_name(spec.kind)} job needs "
                + " and ".join(f"spec.{n}" for n in need[spec.kind])
            )
    if spec.num_ranks < 0:
        raise InvalidArgument(f"spec.num_ranks={spec.num_ranks} is negative; use 1 or more")
    if spec.cpus < 0 or spec.gpus < 0:
        raise InvalidArgument("spec.cpus and spec.gpus must not be negative")
    if spec.lora.r < 0 or spec.lora.alpha < 0 or not 0 <= spec.lora.dropout < 1:
        raise InvalidArgument(
            "spec.lora needs r >= 0, alpha >= 0 and 0 <= dropout < 1 (0 means the default)"
        )
    unknown = sorted(set(spec.hyperparameters) - set(HYPERPARAMETERS))
    if unknown:
        raise InvalidArgument(
            f"unknown hyperparameter {unknown[0]!r}; known ones are {', '.join(HYPERPARAMETERS)}"
        )
    for key, raw in spec.hyperparameters.items():
        if key == "lr_scheduler_type":
            continue
        try:
            value = float(raw)
        except ValueError:
            raise InvalidArgument(
                f"hyperparameter {key}={raw!r} is not a number; give e.g. {key}=1"
            ) from None
        if value < 0:
            raise InvalidArgument(f"hyperparameter {key}={raw!r} is negative")
    if spec.deepspeed_config_json:
        try:
            config = json.loads(spec.deepspeed_config_json)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"spec.deepspeed_config_json is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise InvalidArgument("spec.deepspeed_config_json must be a JSON object")
    if spec.template not in ("", "auto", "alpaca", "chat"):
        raise InvalidArgument(
            f"spec.template {spec.template!r} is unknown; use auto, alpaca or chat"
        )
