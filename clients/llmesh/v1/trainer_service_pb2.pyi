import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainingJobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_JOB_KIND_UNSPECIFIED: _ClassVar[TrainingJobKind]
    TRAINING_JOB_KIND_SFT: _ClassVar[TrainingJobKind]
    TRAINING_JOB_KIND_PRETRAIN: _ClassVar[TrainingJobKind]
    TRAINING_JOB_KIND_MERGE_LORA: _ClassVar[TrainingJobKind]

class TrainingMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_METHOD_UNSPECIFIED: _ClassVar[TrainingMethod]
    TRAINING_METHOD_LORA: _ClassVar[TrainingMethod]
    TRAINING_METHOD_FULL: _ClassVar[TrainingMethod]

class TrainingJobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_JOB_STATE_UNSPECIFIED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_QUEUED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_RUNNING: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_SUCCEEDED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_FAILED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_CANCELLED: _ClassVar[TrainingJobState]

class ArtifactKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_KIND_UNSPECIFIED: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_LORA_ADAPTER: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_FULL_MODEL: _ClassVar[ArtifactKind]
TRAINING_JOB_KIND_UNSPECIFIED: TrainingJobKind
TRAINING_JOB_KIND_SFT: TrainingJobKind
TRAINING_JOB_KIND_PRETRAIN: TrainingJobKind
TRAINING_JOB_KIND_MERGE_LORA: TrainingJobKind
TRAINING_METHOD_UNSPECIFIED: TrainingMethod
TRAINING_METHOD_LORA: TrainingMethod
TRAINING_METHOD_FULL: TrainingMethod
TRAINING_JOB_STATE_UNSPECIFIED: TrainingJobState
TRAINING_JOB_STATE_QUEUED: TrainingJobState
TRAINING_JOB_STATE_RUNNING: TrainingJobState
TRAINING_JOB_STATE_SUCCEEDED: TrainingJobState
TRAINING_JOB_STATE_FAILED: TrainingJobState
TRAINING_JOB_STATE_CANCELLED: TrainingJobState
ARTIFACT_KIND_UNSPECIFIED: ArtifactKind
ARTIFACT_KIND_LORA_ADAPTER: ArtifactKind
ARTIFACT_KIND_FULL_MODEL: ArtifactKind

class LoraConfig(_message.Message):
    __slots__ = ("r", "alpha", "dropout", "target_modules")
    R_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    r: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, r: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class TrainingJobSpec(_message.Message):
    __slots__ = ("kind", "base_model_path", "data_path", "output_dir", "adapter_path", "method", "lora", "hyperparameters", "template", "deepspeed_config_json", "num_ranks", "model_config", "tokenizer_path", "cpus", "gpus", "resume")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PATH_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    DEEPSPEED_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_RANKS_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_PATH_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    kind: TrainingJobKind
    base_model_path: str
    data_path: str
    output_dir: str
    adapter_path: str
    method: TrainingMethod
    lora: LoraConfig
    hyperparameters: _containers.ScalarMap[str, str]
    template: str
    deepspeed_config_json: str
    num_ranks: int
    model_config: str
    tokenizer_path: str
    cpus: float
    gpus: float
    resume: bool
    def __init__(self, kind: _Optional[_Union[TrainingJobKind, str]] = ..., base_model_path: _Optional[str] = ..., data_path: _Optional[str] = ..., output_dir: _Optional[str] = ..., adapter_path: _Optional[str] = ..., method: _Optional[_Union[TrainingMethod, str]] = ..., lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., hyperparameters: _Optional[_Mapping[str, str]] = ..., template: _Optional[str] = ..., deepspeed_config_json: _Optional[str] = ..., num_ranks: _Optional[int] = ..., model_config: _Optional[str] = ..., tokenizer_path: _Optional[str] = ..., cpus: _Optional[float] = ..., gpus: _Optional[float] = ..., resume: _Optional[bool] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("step", "total_steps", "epoch", "loss", "learning_rate", "samples_per_second", "eta_seconds", "eval_loss")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    samples_per_second: float
    eta_seconds: float
    eval_loss: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., epoch: _Optional[float] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., samples_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., eval_loss: _Optional[float] = ...) -> None: ...

class TrainingArtifact(_message.Message):
    __slots__ = ("kind", "path", "worker_id", "base_model_path")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    kind: ArtifactKind
    path: str
    worker_id: str
    base_model_path: str
    def __init__(self, kind: _Optional[_Union[ArtifactKind, str]] = ..., path: _Optional[str] = ..., worker_id: _Optional[str] = ..., base_model_path: _Optional[str] = ...) -> None: ...

class TrainingJob(_message.Message):
    __slots__ = ("id", "spec", "state", "reason", "worker_id", "progress", "artifact", "create_time", "start_time", "end_time", "cancel_requested", "request_id", "devices")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: TrainingJobSpec
    state: TrainingJobState
    reason: str
    worker_id: str
    progress: TrainingProgress
    artifact: TrainingArtifact
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    cancel_requested: bool
    request_id: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[TrainingJobSpec, _Mapping]] = ..., state: _Optional[_Union[TrainingJobState, str]] = ..., reason: _Optional[str] = ..., worker_id: _Optional[str] = ..., progress: _Optional[_Union[TrainingProgress, _Mapping]] = ..., artifact: _Optional[_Union[TrainingArtifact, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cancel_requested: _Optional[bool] = ..., request_id: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ...) -> None: ...

class TrainingCheckpoint(_message.Message):
    __slots__ = ("step", "path")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    step: int
    path: str
    def __init__(self, step: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class TrainingStateChange(_message.Message):
    __slots__ = ("state", "reason")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    state: TrainingJobState
    reason: str
    def __init__(self, state: _Optional[_Union[TrainingJobState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class TrainingJobEvent(_message.Message):
    __slots__ = ("sequence", "time", "state_change", "progress", "log_line", "checkpoint", "artifact")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LOG_LINE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    state_change: TrainingStateChange
    progress: TrainingProgress
    log_line: str
    checkpoint: TrainingCheckpoint
    artifact: TrainingArtifact
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state_change: _Optional[_Union[TrainingStateChange, _Mapping]] = ..., progress: _Optional[_Union[TrainingProgress, _Mapping]] = ..., log_line: _Optional[str] = ..., checkpoint: _Optional[_Union[TrainingCheckpoint, _Mapping]] = ..., artifact: _Optional[_Union[TrainingArtifact, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: TrainingJob
    def __init__(self, job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_sequence")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_sequence: int
    def __init__(self, job_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: TrainingJobEvent
    def __init__(self, event: _Optional[_Union[TrainingJobEvent, _Mapping]] = ...) -> None: ...
