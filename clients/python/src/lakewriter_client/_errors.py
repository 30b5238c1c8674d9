"""Typed errors and the retry classification shared by the gRPC and HTTP paths."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import grpc

if TYPE_CHECKING:
    from ._result import WriteResult

#: Trailing metadata key the server sets (to ``"true"``) on errors worth retrying.
RETRYABLE_METADATA_KEY = "lw-retryable"

#: Status codes that are retryable whatever the metadata says.
ALWAYS_RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})

#: Trailing metadata key of the encoded ``google.rpc.RetryInfo`` the server
#: sends with a retryable refusal (how long to wait before retrying).
RETRY_INFO_METADATA_KEY = "google.rpc.retryinfo-bin"


class LakewriterError(Exception):
    """Base class of every error the server (or the client on its behalf) reports.

    Attributes:
        code: canonical gRPC status name, e.g. ``"INVALID_ARGUMENT"`` (HTTP
            errors are mapped onto the same names).
        message: the server's message, unchanged.
        retryable: whether the server marked the error as worth retrying (or the
            code is always retryable). Errors reaching the caller were either not
            retryable or ran out of retries.
        batch_id: the batch whose request failed, for write errors.
        result: for :meth:`LakewriterClient.write`, what was acknowledged before
            the failure (earlier chunks are durable and are not rolled back).
        http_status: the HTTP status, for errors of the HTTP API.
        retry_after: seconds the server asked the client to wait before
            retrying (gRPC ``RetryInfo``, HTTP ``Retry-After``), if it did.
    """

    #: Default code of the class; instances carry their own in ``.code``.
    default_code = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool = False,
        batch_id: str | None = None,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code: str = code or self.default_code
        self.message: str = message
        self.retryable: bool = retryable
        self.batch_id: str | None = batch_id
        self.http_status: int | None = http_status
        self.retry_after: float | None = retry_after
        self.result: WriteResult | None = None

    @property
    def grpc_code(self) -> grpc.StatusCode | None:
        """The code as a :class:`grpc.StatusCode`, or ``None`` if it has no gRPC twin."""
        return getattr(grpc.StatusCode, self.code, None)

    def __str__(self) -> str:
        where = f" (batch {self.batch_id})" if self.batch_id else ""
        return f"{self.code}: {self.message}{where}" if self.message else f"{self.code}{where}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, retryable={self.retryable!r})"


class InvalidArgumentError(LakewriterError):
    """The request was malformed: bad names, schema conflicts, bad Arrow IPC, bad SQL."""

    default_code = "INVALID_ARGUMENT"


class AuthenticationError(LakewriterError):
    """Missing, unknown, expired or deleted credential (``UNAUTHENTICATED`` / HTTP 401)."""

    default_code = "UNAUTHENTICATED"


class PermissionDeniedError(LakewriterError):
    """The credential lacks the scope or endpoint, or names another tenant (HTTP 403)."""

    default_code = "PERMISSION_DENIED"


class ResourceExhaustedError(LakewriterError):
    """Server memory budget exhausted (retryable) or request over the size limit (not)."""

    default_code = "RESOURCE_EXHAUSTED"


class UnavailableError(LakewriterError):
    """Server unreachable or shutting down."""

    default_code = "UNAVAILABLE"


class DeadlineExceededError(UnavailableError):
    """The request did not complete within the client's timeout."""

    default_code = "DEADLINE_EXCEEDED"


class NotFoundError(LakewriterError):
    """The named object (e.g. a table in a query) does not exist."""

    default_code = "NOT_FOUND"


class UnimplementedError(LakewriterError):
    """The server does not implement this call (e.g. an older server)."""

    default_code = "UNIMPLEMENTED"


class InternalError(LakewriterError):
    """The server failed internally."""

    default_code = "INTERNAL"


_BY_CODE: dict[str, type[LakewriterError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "FAILED_PRECONDITION": InvalidArgumentError,
    "OUT_OF_RANGE": InvalidArgumentError,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "UNAVAILABLE": UnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "NOT_FOUND": NotFoundError,
    "UNIMPLEMENTED": UnimplementedError,
    "INTERNAL": InternalError,
    "DATA_LOSS": InternalError,
}

_HTTP_STATUS_CODES: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def error_class(code: str) -> type[LakewriterError]:
    """The exception class for a canonical status name."""
    return _BY_CODE.get(code, LakewriterError)


def make_error(code: str, message: str, **kwargs: Any) -> LakewriterError:
    """Build the typed exception for ``code``."""
    return error_class(code)(message, code=code, **kwargs)


def normalize_code(code: str) -> str:
    """``"InvalidArgument"``/``"invalid_argument"``/``"INVALID_ARGUMENT"`` → ``"INVALID_ARGUMENT"``."""
    code = code.strip()
    if not code:
        return ""
    if "_" not in code and not code.isupper():
        code = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", code)
    return code.upper()


def _metadata_retryable(metadata: Iterable[Any] | None) -> bool:
    for item in metadata or ():
        key, value = item[0], item[1]
        if str(key).lower() == RETRYABLE_METADATA_KEY:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            return str(value).strip().lower() == "true"
    return False


def _call_part(err: Any, name: str) -> Any:
    fn = getattr(err, name, None)
    if fn is None:
        return None
    try:
        return fn()
    except Exception:  # a half-built grpc error can raise here
        return None


def is_retryable(err: BaseException) -> bool:
    """Whether a failed call is worth retrying with the same batch_id.

    Accepts :class:`grpc.RpcError` (or anything with ``code()`` and
    ``trailing_metadata()``) and :class:`LakewriterError`. Retryable are
    ``UNAVAILABLE``, ``DEADLINE_EXCEEDED`` and any error whose trailing
    metadata has ``lw-retryable: true`` (e.g. ``RESOURCE_EXHAUSTED`` when the
    memtable budget is exhausted; the over-size ``RESOURCE_EXHAUSTED`` carries
    no such flag and is not retried).
    """
    if isinstance(err, LakewriterError):
        return err.retryable
    code = _call_part(err, "code")
    name = getattr(code, "name", None) or (str(code) if code is not None else "")
    if name in ALWAYS_RETRYABLE:
        return True
    return _metadata_retryable(_call_part(err, "trailing_metadata"))


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> Iterable[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: varints as ints, length-delimited as bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, value
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated field")
            yield number, data[pos:pos + length]
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")


def parse_retry_info(data: bytes) -> float | None:
    """Seconds of an encoded ``google.rpc.RetryInfo`` (``retry_delay``), or ``None`` if unreadable."""
    try:
        for number, duration in _fields(data):
            if number == 1 and isinstance(duration, bytes):
                seconds = nanos = 0
                for field, value in _fields(duration):
                    if field == 1 and isinstance(value, int):
                        seconds = value
                    elif field == 2 and isinstance(value, int):
                        nanos = value
                delay = seconds + nanos / 1e9
                return delay if 0 <= delay <= 3600 else None
    except ValueError:
        return None
    return None


def server_retry_delay(err: BaseException) -> float | None:
    """How long the server asked to wait before retrying ``err``, if it said."""
    if isinstance(err, LakewriterError):
        return err.retry_after
    for item in _call_part(err, "trailing_metadata") or ():
        if str(item[0]).lower() == RETRY_INFO_METADATA_KEY and isinstance(item[1], bytes):
            return parse_retry_info(item[1])
    return None


def parse_retry_after(value: str | None) -> float | None:
    """An HTTP ``Retry-After`` in seconds (the date form is not used by lakewriter: ``None``)."""
    try:
        delay = float(value) if value is not None else None
    except ValueError:
        return None
    return delay if delay is not None and 0 <= delay <= 3600 else None


def from_grpc_error(err: BaseException, *, batch_id: str | None = None) -> LakewriterError:
    """Translate a :class:`grpc.RpcError` into the matching :class:`LakewriterError`."""
    if isinstance(err, LakewriterError):
        return err
    code = _call_part(err, "code")
    name = getattr(code, "name", None) or "UNKNOWN"
    details = _call_part(err, "details")
    message = details if isinstance(details, str) else str(err)  # the server's message, even if empty
    out = make_error(name, message, retryable=is_retryable(err), batch_id=batch_id,
                     retry_after=server_retry_delay(err))
    out.__cause__ = err
    return out


def from_http_error(
    status: int, body: bytes | str | None, content_type: str = "", retry_after: str | None = None
) -> LakewriterError:
    """Translate an HTTP error response (JSON ``{"error", "code", "retryable"}``, and its
    ``Retry-After`` header) into an exception."""
    import json

    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
    message, code, retryable = text.strip() or f"HTTP {status}", "", None
    try:
        payload = json.loads(text) if text else None
    except ValueError:
        payload = None
    if isinstance(payload, Mapping):
        message = str(payload.get("error") or payload.get("message") or message)
        code = normalize_code(str(payload.get("code") or ""))
        if isinstance(payload.get("retryable"), bool):
            retryable = payload["retryable"]
    by_status = _HTTP_STATUS_CODES.get(status, "UNKNOWN")
    code = code or by_status
    if retryable is None:
        retryable = code in ALWAYS_RETRYABLE
    cls = _BY_CODE.get(code) or _BY_CODE.get(by_status, LakewriterError)
    return cls(message, code=code, retryable=retryable, http_status=status,
               retry_after=parse_retry_after(retry_after))
