from llmesh.v1 import common_pb2 as _common_pb2
from llmesh.v1 import trainer_service_pb2 as _trainer_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Purpose(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PURPOSE_UNSPECIFIED: _ClassVar[Purpose]
    PURPOSE_CHAT: _ClassVar[Purpose]
    PURPOSE_EMBEDDING: _ClassVar[Purpose]
    PURPOSE_RERANK: _ClassVar[Purpose]
    PURPOSE_TOKENIZER: _ClassVar[Purpose]
    PURPOSE_APPLY_CHAT_TEMPLATE: _ClassVar[Purpose]
    PURPOSE_META: _ClassVar[Purpose]

class LoadBalancePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOAD_BALANCE_POLICY_UNSPECIFIED: _ClassVar[LoadBalancePolicy]
    LOAD_BALANCE_POLICY_LEAST_LOADED: _ClassVar[LoadBalancePolicy]
    LOAD_BALANCE_POLICY_ROUND_ROBIN: _ClassVar[LoadBalancePolicy]
    LOAD_BALANCE_POLICY_RANDOM: _ClassVar[LoadBalancePolicy]
PURPOSE_UNSPECIFIED: Purpose
PURPOSE_CHAT: Purpose
PURPOSE_EMBEDDING: Purpose
PURPOSE_RERANK: Purpose
PURPOSE_TOKENIZER: Purpose
PURPOSE_APPLY_CHAT_TEMPLATE: Purpose
PURPOSE_META: Purpose
LOAD_BALANCE_POLICY_UNSPECIFIED: LoadBalancePolicy
LOAD_BALANCE_POLICY_LEAST_LOADED: LoadBalancePolicy
LOAD_BALANCE_POLICY_ROUND_ROBIN: LoadBalancePolicy
LOAD_BALANCE_POLICY_RANDOM: LoadBalancePolicy

class Model(_message.Message):
    __slots__ = ("name", "model_path", "backend", "infer_params", "num_replicas", "cpus_per_replica", "gpus_per_replica", "pretrained_model_type", "replicas", "generation", "base_model")
    class InferParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    INFER_PARAMS_FIELD_NUMBER: _ClassVar[int]
    NUM_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CPUS_PER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    PRETRAINED_MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_path: str
    backend: str
    infer_params: _containers.ScalarMap[str, str]
    num_replicas: int
    cpus_per_replica: float
    gpus_per_replica: float
    pretrained_model_type: str
    replicas: _containers.RepeatedCompositeFieldContainer[_common_pb2.Replica]
    generation: int
    base_model: str
    def __init__(self, name: _Optional[str] = ..., model_path: _Optional[str] = ..., backend: _Optional[str] = ..., infer_params: _Optional[_Mapping[str, str]] = ..., num_replicas: _Optional[int] = ..., cpus_per_replica: _Optional[float] = ..., gpus_per_replica: _Optional[float] = ..., pretrained_model_type: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[_common_pb2.Replica, _Mapping]]] = ..., generation: _Optional[int] = ..., base_model: _Optional[str] = ...) -> None: ...

class Worker(_message.Message):
    __slots__ = ("id", "address", "cpus", "gpus", "cpus_used", "gpus_used", "replicas", "kind", "devices", "metrics_url")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    CPUS_USED_FIELD_NUMBER: _ClassVar[int]
    GPUS_USED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    METRICS_URL_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    cpus: float
    gpus: float
    cpus_used: float
    gpus_used: float
    replicas: _containers.RepeatedScalarFieldContainer[str]
    kind: str
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    metrics_url: str
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., cpus: _Optional[float] = ..., gpus: _Optional[float] = ..., cpus_used: _Optional[float] = ..., gpus_used: _Optional[float] = ..., replicas: _Optional[_Iterable[str]] = ..., kind: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., metrics_url: _Optional[str] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("id", "memory_bytes", "name", "holders", "free")
    ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    id: str
    memory_bytes: int
    name: str
    holders: _containers.RepeatedScalarFieldContainer[str]
    free: float
    def __init__(self, id: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., name: _Optional[str] = ..., holders: _Optional[_Iterable[str]] = ..., free: _Optional[float] = ...) -> None: ...

class DeployModelRequest(_message.Message):
    __slots__ = ("model", "wait_ready", "timeout_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WAIT_READY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: Model
    wait_ready: bool
    timeout_seconds: float
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ..., wait_ready: _Optional[bool] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class DeployModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class UndeployModelRequest(_message.Message):
    __slots__ = ("name", "wait", "timeout_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    wait: bool
    timeout_seconds: float
    def __init__(self, name: _Optional[str] = ..., wait: _Optional[bool] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class UndeployModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    def __init__(self, workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ...) -> None: ...

class AssignWorkerRequest(_message.Message):
    __slots__ = ("model", "purpose", "policy", "pinned_replica", "purpose_pins", "affinity_key")
    class PurposePinsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PINNED_REPLICA_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_PINS_FIELD_NUMBER: _ClassVar[int]
    AFFINITY_KEY_FIELD_NUMBER: _ClassVar[int]
    model: str
    purpose: Purpose
    policy: LoadBalancePolicy
    pinned_replica: int
    purpose_pins: _containers.ScalarMap[str, int]
    affinity_key: str
    def __init__(self, model: _Optional[str] = ..., purpose: _Optional[_Union[Purpose, str]] = ..., policy: _Optional[_Union[LoadBalancePolicy, str]] = ..., pinned_replica: _Optional[int] = ..., purpose_pins: _Optional[_Mapping[str, int]] = ..., affinity_key: _Optional[str] = ...) -> None: ...

class AssignWorkerResponse(_message.Message):
    __slots__ = ("replica",)
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    replica: _common_pb2.Replica
    def __init__(self, replica: _Optional[_Union[_common_pb2.Replica, _Mapping]] = ...) -> None: ...

class WatchModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchModelResponse(_message.Message):
    __slots__ = ("model", "deleted")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    model: Model
    deleted: bool
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ..., deleted: _Optional[bool] = ...) -> None: ...

class CreateTrainingJobRequest(_message.Message):
    __slots__ = ("spec", "request_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    spec: _trainer_service_pb2.TrainingJobSpec
    request_id: str
    def __init__(self, spec: _Optional[_Union[_trainer_service_pb2.TrainingJobSpec, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateTrainingJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _trainer_service_pb2.TrainingJob
    def __init__(self, job: _Optional[_Union[_trainer_service_pb2.TrainingJob, _Mapping]] = ...) -> None: ...

class GetTrainingJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetTrainingJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _trainer_service_pb2.TrainingJob
    def __init__(self, job: _Optional[_Union[_trainer_service_pb2.TrainingJob, _Mapping]] = ...) -> None: ...

class ListTrainingJobsRequest(_message.Message):
    __slots__ = ("states",)
    STATES_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[_trainer_service_pb2.TrainingJobState]
    def __init__(self, states: _Optional[_Iterable[_Union[_trainer_service_pb2.TrainingJobState, str]]] = ...) -> None: ...

class ListTrainingJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[_trainer_service_pb2.TrainingJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[_trainer_service_pb2.TrainingJob, _Mapping]]] = ...) -> None: ...

class CancelTrainingJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelTrainingJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _trainer_service_pb2.TrainingJob
    def __init__(self, job: _Optional[_Union[_trainer_service_pb2.TrainingJob, _Mapping]] = ...) -> None: ...

class WatchTrainingJobRequest(_message.Message):
    __slots__ = ("id", "after_sequence")
    ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    after_sequence: int
    def __init__(self, id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class WatchTrainingJobResponse(_message.Message):
    __slots__ = ("job", "event")
    JOB_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    job: _trainer_service_pb2.TrainingJob
    event: _trainer_service_pb2.TrainingJobEvent
    def __init__(self, job: _Optional[_Union[_trainer_service_pb2.TrainingJob, _Mapping]] = ..., event: _Optional[_Union[_trainer_service_pb2.TrainingJobEvent, _Mapping]] = ...) -> None: ...
