"""Training-job rules shared by the control plane, trainer workers and the SDK.

Pure functions over the ``TrainingJob`` protobuf: which states are final and which transitions
are allowed. The spec's vocabulary and its check live in :mod:`llmesh.common.training_spec`;
``validate_spec`` and ``HYPERPARAMETERS`` are re-exported here for the callers that import them
from this module.
"""

from __future__ import annotations

import time

from google.protobuf.timestamp_pb2 import Timestamp

from llmesh.common.errors import InvalidArgument
from llmesh.common.training_spec import HYPERPARAMETERS, validate_spec
from llmesh.v1 import trainer_service_pb2 as tr

__all__ = [
    "ACTIVE_STATES",
    "FINAL_STATES",
    "HYPERPARAMETERS",
    "MAX_JOB_ID_LENGTH",
    "can_move",
    "check_job_id_length",
    "default_cpus",
    "is_final",
    "kind_name",
    "now",
    "state_name",
    "validate_spec",
]

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


# Job ids are made by the control plane ("sft-" and 10 hex digits); request ids are the
# caller's. Either must stay far below etcd's request limit (1.5 MiB) once in a key.
MAX_JOB_ID_LENGTH = 256


def check_job_id_length(job_id: str, field: str = "id") -> str:
    """``job_id`` unless it is too long to be one (InvalidArgument, naming ``field``)."""
    if len(job_id) > MAX_JOB_ID_LENGTH:
        raise InvalidArgument(
            f"{field} is {len(job_id)} characters; job ids are at most {MAX_JOB_ID_LENGTH} "
            "(use the id CreateTrainingJob returned, e.g. 'sft-1a2b3c4d5e')"
        )
    return job_id
