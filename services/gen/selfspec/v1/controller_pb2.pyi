from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConfigRecord(_message.Message):
    __slots__ = ("model", "version", "hash", "created_at", "by", "reason", "json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    hash: str
    created_at: float
    by: str
    reason: str
    json: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., hash: _Optional[str] = ..., created_at: _Optional[float] = ..., by: _Optional[str] = ..., reason: _Optional[str] = ..., json: _Optional[str] = ...) -> None: ...

class ReplicaState(_message.Message):
    __slots__ = ("replica_id", "version", "seen_at", "json")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SEEN_AT_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    version: int
    seen_at: float
    json: str
    def __init__(self, replica_id: _Optional[str] = ..., version: _Optional[int] = ..., seen_at: _Optional[float] = ..., json: _Optional[str] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("replica_id", "version", "reason", "at", "kept_version")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    KEPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    version: int
    reason: str
    at: float
    kept_version: int
    def __init__(self, replica_id: _Optional[str] = ..., version: _Optional[int] = ..., reason: _Optional[str] = ..., at: _Optional[float] = ..., kept_version: _Optional[int] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("model", "current", "pinned_version", "replicas", "rejections", "search_json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    PINNED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_JSON_FIELD_NUMBER: _ClassVar[int]
    model: str
    current: ConfigRecord
    pinned_version: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaState]
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    search_json: str
    def __init__(self, model: _Optional[str] = ..., current: _Optional[_Union[ConfigRecord, _Mapping]] = ..., pinned_version: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaState, _Mapping]]] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., search_json: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ControllerStatus(_message.Message):
    __slots__ = ("leader_id", "controller_id", "is_leader", "current_version", "models")
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    IS_LEADER_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    leader_id: str
    controller_id: str
    is_leader: bool
    current_version: int
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, leader_id: _Optional[str] = ..., controller_id: _Optional[str] = ..., is_leader: _Optional[bool] = ..., current_version: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class ListHistoryRequest(_message.Message):
    __slots__ = ("model", "limit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    limit: int
    def __init__(self, model: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListHistoryResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[ConfigRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[ConfigRecord, _Mapping]]] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: ConfigRecord
    def __init__(self, record: _Optional[_Union[ConfigRecord, _Mapping]] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: ConfigRecord
    def __init__(self, record: _Optional[_Union[ConfigRecord, _Mapping]] = ...) -> None: ...
