"""Python values → protobuf ``storage.Value`` / ``storage.DataRecord``, and record chunking."""
from __future__ import annotations

import time
import uuid
from datetime import date, datetime, timezone
from typing import Any, Iterable, Iterator, Mapping

from ._ids import new_ulid
from ._proto.storage import common_pb2

DataRecord = common_pb2.DataRecord
Value = common_pb2.Value

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

#: Keys of a record dict that are the record's own columns, not fields.
RESERVED_KEYS = ("event_id", "timestamp", "version")

#: Bytes a record adds to a request beyond its own ``ByteSize()`` (tag + length prefix).
RECORD_FRAMING_BYTES = 6

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_NS_PER_DAY = 86_400 * 1_000_000_000
_SUPPORTED = "None, bool, int, float, str, bytes, bytearray, memoryview, datetime, date"


def _check_int64(what: str, value: int) -> int:
    if value < INT64_MIN or value > INT64_MAX:
        raise OverflowError(f"{what}: integer {value} is outside the int64 range")
    return value


def datetime_to_ns(dt: datetime) -> int:
    """Nanoseconds since the Unix epoch; a naive datetime is taken as UTC.

    Exact (integer arithmetic); keeps the nanoseconds of a ``pandas.Timestamp``.
    """
    if dt.tzinfo is None or dt.utcoffset() is None:
        dt = dt.replace(tzinfo=timezone.utc)
    delta = dt - _EPOCH
    ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
    nanos = getattr(dt, "nanosecond", 0)  # pandas.Timestamp
    return ns + (nanos if isinstance(nanos, int) else 0)


def date_to_ns(d: date) -> int:
    """Midnight UTC of ``d`` in nanoseconds since the Unix epoch."""
    return (d.toordinal() - _EPOCH_ORDINAL) * _NS_PER_DAY


def _is_nat(value: Any) -> bool:
    # pandas.NaT is a datetime subclass that is not equal to itself.
    try:
        return bool(value != value)
    except Exception:
        return False


def _numpy_scalar(value: Any) -> Any:
    """Plain Python equivalent of a numpy scalar, or ``value`` itself."""
    if type(value).__module__ != "numpy":
        return value
    import numpy as np

    if isinstance(value, np.datetime64):
        if np.isnat(value):
            return None
        return _NumpyTimestamp(int(value.astype("datetime64[ns]").astype(np.int64)))
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bytes_):
        return bytes(value)
    if isinstance(value, np.str_):
        return str(value)
    return value


class _NumpyTimestamp(int):
    """Marks an int converted from ``numpy.datetime64`` (nanoseconds)."""


def set_value(field: Value, key: str, value: Any) -> None:
    """Store a Python value in a ``storage.Value`` message (see :func:`to_value`)."""
    value = _numpy_scalar(value)
    if value is None:
        field.null_value = common_pb2.NULL_VALUE
    elif isinstance(value, bool):  # before int: bool is an int subclass
        field.bool_value = value
    elif isinstance(value, _NumpyTimestamp):
        field.timestamp_unix_nano = _check_int64(f"field {key!r}", int(value))
    elif isinstance(value, int):
        field.int_value = _check_int64(f"field {key!r}", value)
    elif isinstance(value, float):
        field.double_value = value
    elif isinstance(value, str):
        field.string_value = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        field.bytes_value = bytes(value)
    elif isinstance(value, datetime):  # before date: datetime is a date subclass
        if _is_nat(value):
            field.null_value = common_pb2.NULL_VALUE
        else:
            field.timestamp_unix_nano = _check_int64(f"field {key!r}", datetime_to_ns(value))
    elif isinstance(value, date):
        field.timestamp_unix_nano = _check_int64(f"field {key!r}", date_to_ns(value))
    else:
        raise TypeError(
            f"field {key!r}: unsupported value type {type(value).__name__} (supported: {_SUPPORTED})"
        )


def to_value(value: Any, key: str = "value") -> Value:
    """Convert one Python value into a ``storage.Value``.

    ``None`` → null, ``bool`` → bool, ``int`` → int64 (range-checked), ``float`` →
    double (NaN/±inf kept), ``str`` → string, ``bytes``/``bytearray``/``memoryview``
    → bytes, ``datetime`` (naive = UTC) → timestamp, ``date`` → midnight UTC.
    numpy scalars are accepted as their Python equivalents. Anything else raises
    :class:`TypeError` naming ``key``.
    """
    out = Value()
    set_value(out, key, value)
    return out


def from_value(value: Value) -> Any:
    """Inverse of :func:`to_value` (timestamps come back as aware UTC datetimes, ns truncated)."""
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "timestamp_unix_nano":
        ns = value.timestamp_unix_nano
        return datetime.fromtimestamp(ns // 1_000_000_000, tz=timezone.utc).replace(
            microsecond=(ns % 1_000_000_000) // 1_000
        )
    return getattr(value, kind)


def timestamp_to_ns(value: Any, now_ns: int | None = None) -> int:
    """The record timestamp: ``datetime`` (naive = UTC), ``date``, int ns, or ``None`` = now."""
    value = _numpy_scalar(value)
    if value is None:
        return time.time_ns() if now_ns is None else now_ns
    if isinstance(value, bool):
        raise TypeError("timestamp: expected datetime, date or int nanoseconds, got bool")
    if isinstance(value, int):
        return _check_int64("timestamp", int(value))
    if isinstance(value, datetime):
        if _is_nat(value):
            return time.time_ns() if now_ns is None else now_ns
        return _check_int64("timestamp", datetime_to_ns(value))
    if isinstance(value, date):
        return _check_int64("timestamp", date_to_ns(value))
    raise TypeError(
        f"timestamp: expected datetime, date or int nanoseconds, got {type(value).__name__}"
    )


def to_record(record: Mapping[str, Any] | DataRecord, now_ns: int | None = None) -> DataRecord:
    """Convert one record dict into a ``storage.DataRecord``.

    The keys ``event_id`` (default: a new ULID), ``timestamp`` (default: now) and
    ``version`` (default 0) are the record's own columns; every other key is a
    field whose type follows the Python value (see :func:`to_value`).
    A ``DataRecord`` message is passed through unchanged.
    """
    if isinstance(record, DataRecord):
        return record
    if not isinstance(record, Mapping):
        raise TypeError(f"a record must be a dict (mapping), got {type(record).__name__}")
    out = DataRecord()
    event_id = record.get("event_id")
    if event_id is None:
        out.event_id = new_ulid()
    elif isinstance(event_id, str):
        out.event_id = event_id
    elif isinstance(event_id, uuid.UUID):
        out.event_id = str(event_id)
    else:
        raise TypeError(f"event_id: expected str, got {type(event_id).__name__}")
    out.timestamp_unix_nano = timestamp_to_ns(record.get("timestamp"), now_ns)
    version = _numpy_scalar(record.get("version"))
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, int):
            raise TypeError(f"version: expected int, got {type(version).__name__}")
        out.version = _check_int64("version", version)
    fields = out.fields
    for key, value in record.items():
        if not isinstance(key, str):
            raise TypeError(f"field names must be str, got {type(key).__name__} {key!r}")
        if key in RESERVED_KEYS:
            continue
        set_value(fields[key], key, value)
    return out


def chunk_records(
    records: Iterable[Mapping[str, Any] | DataRecord],
    max_records: int,
    max_bytes: int,
    now_ns: int | None = None,
) -> Iterator[list[DataRecord]]:
    """Convert records lazily and group them into chunks.

    A chunk holds at most ``max_records`` records and at most ``max_bytes`` of
    serialized records, except that a single record larger than ``max_bytes``
    forms a chunk of its own.
    """
    if max_records < 1 or max_bytes < 1:
        raise ValueError("max_records and max_bytes must be positive")
    chunk: list[DataRecord] = []
    size = 0
    for item in records:
        rec = to_record(item, now_ns)
        rec_size = rec.ByteSize() + RECORD_FRAMING_BYTES
        if chunk and (len(chunk) >= max_records or size + rec_size > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(rec)
        size += rec_size
    if chunk:
        yield chunk
