from . import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WriteBatchRequest(_message.Message):
    __slots__ = ("endpoint_id", "tenant_id", "batch_id", "records", "arrow_ipc_stream")
    ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    ARROW_IPC_STREAM_FIELD_NUMBER: _ClassVar[int]
    endpoint_id: str
    tenant_id: str
    batch_id: str
    records: DataRecords
    arrow_ipc_stream: bytes
    def __init__(self, endpoint_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., batch_id: _Optional[str] = ..., records: _Optional[_Union[DataRecords, _Mapping]] = ..., arrow_ipc_stream: _Optional[bytes] = ...) -> None: ...

class DataRecords(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[_common_pb2.DataRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[_common_pb2.DataRecord, _Mapping]]] = ...) -> None: ...

class WriteBatchResponse(_message.Message):
    __slots__ = ("records_accepted", "duplicate", "sequence_token")
    RECORDS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records_accepted: int
    duplicate: bool
    sequence_token: bytes
    def __init__(self, records_accepted: _Optional[int] = ..., duplicate: _Optional[bool] = ..., sequence_token: _Optional[bytes] = ...) -> None: ...

class GetTokenRequest(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    def __init__(self, api_key: _Optional[str] = ...) -> None: ...

class GetTokenResponse(_message.Message):
    __slots__ = ("jwt", "expires_at")
    JWT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    jwt: str
    expires_at: int
    def __init__(self, jwt: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class ValidateApiKeyRequest(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    def __init__(self, api_key: _Optional[str] = ...) -> None: ...

class ValidateApiKeyResponse(_message.Message):
    __slots__ = ("is_valid",)
    IS_VALID_FIELD_NUMBER: _ClassVar[int]
    is_valid: bool
    def __init__(self, is_valid: _Optional[bool] = ...) -> None: ...

class ReadSpansRequest(_message.Message):
    __slots__ = ("start_key_ulid", "batch_size")
    START_KEY_ULID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    start_key_ulid: bytes
    batch_size: int
    def __init__(self, start_key_ulid: _Optional[bytes] = ..., batch_size: _Optional[int] = ...) -> None: ...

class ReadSpansResponse(_message.Message):
    __slots__ = ("key_ulid", "span_bytes", "resource_bytes", "remaining_count")
    KEY_ULID_FIELD_NUMBER: _ClassVar[int]
    SPAN_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REMAINING_COUNT_FIELD_NUMBER: _ClassVar[int]
    key_ulid: bytes
    span_bytes: bytes
    resource_bytes: bytes
    remaining_count: int
    def __init__(self, key_ulid: _Optional[bytes] = ..., span_bytes: _Optional[bytes] = ..., resource_bytes: _Optional[bytes] = ..., remaining_count: _Optional[int] = ...) -> None: ...
