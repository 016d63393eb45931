from llmesh.v1 import common_pb2 as _common_pb2
from llmesh.v1 import control_plane_service_pb2 as _control_plane_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchReplicaRequest(_message.Message):
    __slots__ = ("heartbeat_seconds",)
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_seconds: float
    def __init__(self, heartbeat_seconds: _Optional[float] = ...) -> None: ...

class WatchReplicaResponse(_message.Message):
    __slots__ = ("replicas", "progress", "inflight")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[_common_pb2.Replica]
    progress: int
    inflight: int
    def __init__(self, replicas: _Optional[_Iterable[_Union[_common_pb2.Replica, _Mapping]]] = ..., progress: _Optional[int] = ..., inflight: _Optional[int] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("model", "assignment")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    model: _control_plane_service_pb2.Model
    assignment: _common_pb2.Replica
    def __init__(self, model: _Optional[_Union[_control_plane_service_pb2.Model, _Mapping]] = ..., assignment: _Optional[_Union[_common_pb2.Replica, _Mapping]] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("model", "generation")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    generation: int
    def __init__(self, model: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("timeout_seconds",)
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    timeout_seconds: float
    def __init__(self, timeout_seconds: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("inflight",)
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    inflight: int
    def __init__(self, inflight: _Optional[int] = ...) -> None: ...
