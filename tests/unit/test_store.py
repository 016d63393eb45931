"""Key layout, value codec and endpoint parsing shared by the control plane and workers."""

from __future__ import annotations

import grpc
import pytest

from llmesh.common import errors
from llmesh.common.etcd_keys import Keys, decode, encode, parse_endpoint
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp


def test_keys_are_namespaced_and_parsable() -> None:
    k = Keys("/ns")
    assert k.model("chat") == b"/ns/models/chat"
    assert k.assignment("w1", "chat", 2) == b"/ns/assignments/w1/chat/2"
    assert k.replica("chat", "w1", 7, 0) == b"/ns/replicas/chat/w1/7/0"
    assert k.replica("chat", "w1", 7, 0).startswith(k.model_replicas("chat"))
    assert k.kind_of(k.worker("w1")) == "workers"
    assert not k.model_replicas("chat2").startswith(k.model_replicas("chat"))


def test_codec_round_trip_is_readable_json() -> None:
    model = cp.Model(name="chat", model_path="/m", backend="transformers", num_replicas=2)
    model.infer_params["max_concurrency"] = "4"
    data = encode(model)
    assert data.startswith(b"{") and b'"model_path": "/m"' in data
    assert decode(data, cp.Model) == model
    replica = common_pb2.Replica(model="chat", state=common_pb2.REPLICA_STATE_READY)
    assert decode(encode(replica), common_pb2.Replica) == replica


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:2379", ("127.0.0.1", 2379)),
        ("http://etcd:2379", ("etcd", 2379)),
        ("a:1,b:2", ("a", 1)),
        ("[::1]:2379", ("::1", 2379)),
    ],
)
def test_parse_endpoint(text: str, want: tuple[str, int]) -> None:
    assert parse_endpoint(text) == want


def test_parse_endpoint_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_endpoint("localhost")


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (ValueError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ResourceExhausted("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (RuntimeError("boom"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_mapping(exc: Exception, code: grpc.StatusCode) -> None:
    got, message = errors.status_for(exc)
    assert got == code
    assert message
