"""Python client of lakewriter, the telemetry/record lakehouse writer.

>>> from lakewriter_client import LakewriterClient
>>> with LakewriterClient("localhost:50051", api_key="lw_…", http_url="http://localhost:1323") as lw:
...     lw.write("orders", [{"order_id": 1, "price": 9.5}])
...     lw.query('SELECT count(*) FROM "orders"')
"""
from ._arrow import decode_ipc, encode_ipc, iter_ipc_chunks, prepare_table
from ._client import DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_BATCH_RECORDS, LakewriterClient
from ._convert import chunk_records, datetime_to_ns, from_value, to_record, to_value
from ._errors import (
    AuthenticationError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    LakewriterError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
    from_grpc_error,
    from_http_error,
    is_retryable,
)
from ._ids import new_ulid, ulid_array
from ._result import BatchAck, WriteResult
from ._snapshot import LakeSnapshot
from ._retry import RetryPolicy
from ._stream import StreamWriter

__version__ = "0.1.0"

__all__ = [
    "LakewriterClient",
    "StreamWriter",
    "LakeSnapshot",
    "WriteResult",
    "BatchAck",
    "RetryPolicy",
    "LakewriterError",
    "InvalidArgumentError",
    "AuthenticationError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnavailableError",
    "DeadlineExceededError",
    "NotFoundError",
    "UnimplementedError",
    "InternalError",
    "is_retryable",
    "from_grpc_error",
    "from_http_error",
    "to_value",
    "from_value",
    "to_record",
    "chunk_records",
    "datetime_to_ns",
    "prepare_table",
    "encode_ipc",
    "decode_ipc",
    "iter_ipc_chunks",
    "new_ulid",
    "ulid_array",
    "DEFAULT_MAX_BATCH_RECORDS",
    "DEFAULT_MAX_BATCH_BYTES",
    "__version__",
]
