"""The job runner: a job spec in, ranks under the DeepSpeed launcher, events and an artifact out.

``JobSpec`` (spec.py) describes a job; ``JobProcess`` (launch.py) checks it, runs it as child
processes and follows it; ``read_events`` (events.py) replays a job's ``events.jsonl`` at any
time. The rank entry points (train.py, merge.py) run in those child processes.
"""

from llmesh.trainer_worker.runner.events import EventType, JobState, read_events
from llmesh.trainer_worker.runner.launch import JobProcess, Outcome, check_job, outcome_from_events
from llmesh.trainer_worker.runner.spec import Hyperparameters, JobSpec, LoraSpec

__all__ = [
    "EventType",
    "Hyperparameters",
    "JobProcess",
    "JobSpec",
    "JobState",
    "LoraSpec",
    "Outcome",
    "check_job",
    "outcome_from_events",
    "read_events",
]
