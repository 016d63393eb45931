"""The etcd key layout shared by the control plane and the workers.

Everything llmesh knows lives under one namespace (default ``/llmesh``)::

    {ns}/placement                               fencing counter, bumped by each placement txn
    {ns}/models/{model}                          Model (desired state, no replicas)   durable
    {ns}/workers/{worker_id}                     Worker                               lease
    {ns}/assignments/{worker_id}/{model}/{index} Replica (what the worker must load)  durable
    {ns}/pending/{model}/{index}                 Replica (PENDING: no room for it yet) durable
    {ns}/replicas/{model}/{worker_id}/{gen}/{i}  Replica (state, address, in-flight)  lease
    {ns}/jobs/{job_id}                           TrainingJob (spec, state, progress)  durable
    {ns}/job_requests/{request_id}               job id (CreateTrainingJob idempotency) durable
    {ns}/artifacts/{job_id}                      TrainingArtifact of a SUCCEEDED job  durable
    {ns}/tokens/{token_id}                       TokenRecord (JSON, hashed secret)    durable
    {ns}/audit/{time_ns}-{random}                AuditEntry (JSON; one admin call)     durable

Values are protobuf messages in their JSON form, so ``etcdctl get --prefix /llmesh`` stays
readable. Keys under a worker lease vanish when the worker dies; durable keys are written only
by the control plane, in revision-fenced transactions.

A replica index of a deployed model has either an assignment or a pending key, never both: a
deploy writes a pending key for each replica no worker has room for now, and the control
plane's reconcile loop swaps it for an assignment (in one fenced transaction) once room frees
up; undeploy deletes both kinds. Only the control plane writes pending keys; workers never
read them.

The exception to control-plane-only writes is a job record: the control plane creates, places
and cancels it, and the trainer worker it is placed on moves it through RUNNING to its final
state; both sides write it only with a compare on the record's mod_revision, and nobody changes
a record in a final state, so each outcome is recorded once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

DEFAULT_NAMESPACE = "/llmesh"
DEFAULT_ETCD = "127.0.0.1:2379"


@dataclass(frozen=True)
class Keys:
    """Builds the keys of one namespace."""

    ns: str = DEFAULT_NAMESPACE

    @property
    def root(self) -> bytes:
        return f"{self.ns}/".encode()

    @property
    def placement(self) -> bytes:
        return f"{self.ns}/placement".encode()

    @property
    def models(self) -> bytes:
        return f"{self.ns}/models/".encode()

    def model(self, name: str) -> bytes:
        return f"{self.ns}/models/{name}".encode()

    @property
    def workers(self) -> bytes:
        return f"{self.ns}/workers/".encode()

    def worker(self, worker_id: str) -> bytes:
        return f"{self.ns}/workers/{worker_id}".encode()

    @property
    def assignments(self) -> bytes:
        return f"{self.ns}/assignments/".encode()

    def worker_assignments(self, worker_id: str) -> bytes:
        return f"{self.ns}/assignments/{worker_id}/".encode()

    def assignment(self, worker_id: str, model: str, index: int) -> bytes:
        return f"{self.ns}/assignments/{worker_id}/{model}/{index}".encode()

    @property
    def pending_replicas(self) -> bytes:
        return f"{self.ns}/pending/".encode()

    def pending(self, model: str, index: int) -> bytes:
        """A replica of ``model`` that waits for room (REPLICA_STATE_PENDING)."""
        return f"{self.ns}/pending/{model}/{index}".encode()

    @property
    def replicas(self) -> bytes:
        return f"{self.ns}/replicas/".encode()

    def model_replicas(self, model: str) -> bytes:
        return f"{self.ns}/replicas/{model}/".encode()

    def replica(self, model: str, worker_id: str, generation: int, index: int) -> bytes:
        return f"{self.ns}/replicas/{model}/{worker_id}/{generation}/{index}".encode()

    @property
    def jobs(self) -> bytes:
        return f"{self.ns}/jobs/".encode()

    def job(self, job_id: str) -> bytes:
        """A TrainingJob record: spec, state, worker, progress, artifact."""
        return f"{self.ns}/jobs/{job_id}".encode()

    def job_request(self, request_id: str) -> bytes:
        """Idempotency index of CreateTrainingJob: request_id -> job id."""
        return f"{self.ns}/job_requests/{request_id}".encode()

    @property
    def artifacts(self) -> bytes:
        return f"{self.ns}/artifacts/".encode()

    def artifact(self, job_id: str) -> bytes:
        """The TrainingArtifact a SUCCEEDED job published."""
        return f"{self.ns}/artifacts/{job_id}".encode()

    @property
    def tokens(self) -> bytes:
        """Bearer token records (written by ``llmesh tokens``, an operator with etcd access)."""
        return f"{self.ns}/tokens/".encode()

    def token(self, token_id: str) -> bytes:
        """One token record (:class:`llmesh.common.auth.TokenRecord`)."""
        return f"{self.ns}/tokens/{token_id}".encode()

    @property
    def audit(self) -> bytes:
        """The audit log; keys sort by time."""
        return f"{self.ns}/audit/".encode()

    def audit_entry(self, time_ns: int, suffix: str) -> bytes:
        """One audit entry (:class:`llmesh.common.audit.AuditEntry`), written at ``time_ns``."""
        return f"{self.ns}/audit/{time_ns:020d}-{suffix}".encode()

    def kind_of(self, key: bytes) -> str:
        """The first path segment after the namespace: models, workers, assignments, ..."""
        rest = key.decode()[len(self.ns) + 1 :]
        return rest.split("/", 1)[0]


def encode(msg: Message) -> bytes:
    """Serialize a message for etcd (compact JSON)."""
    return json_format.MessageToJson(
        msg, indent=None, preserving_proto_field_name=True, sort_keys=True
    ).encode()


def decode(data: bytes, cls: type[M]) -> M:
    """Parse a value written by :func:`encode`; unknown fields from newer versions are kept out."""
    return json_format.Parse(data, cls(), ignore_unknown_fields=True)


def parse_endpoint(endpoint: str | None = None) -> tuple[str, int]:
    """Split ``host:port`` (or ``http://host:port``) into its parts.

    The default is ``LLMESH_ETCD`` or 127.0.0.1:2379. When several comma-separated endpoints
    are given, the first is used.
    """
    endpoint = (endpoint or os.environ.get("LLMESH_ETCD") or DEFAULT_ETCD).split(",")[0].strip()
    for scheme in ("http://", "https://"):
        endpoint = endpoint.removeprefix(scheme)
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(
            f"etcd endpoint {endpoint!r} must look like HOST:PORT, e.g. 127.0.0.1:2379"
        )
    return host.strip("[]"), int(port)
