"""Tabular inputs (pyarrow, pandas, polars) → Arrow IPC stream payloads.

Everything here works column-wise on Arrow arrays: no per-row Python.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from ._ids import ulid_array

#: Media type of an Arrow IPC stream (query results).
ARROW_STREAM_MEDIA_TYPE = "application/vnd.apache.arrow.stream"

_TS_NS_UTC = pa.timestamp("ns", tz="UTC")


def as_arrow_table(data: Any) -> pa.Table | None:
    """``data`` as a :class:`pyarrow.Table` if it is tabular, else ``None``.

    Tabular are pyarrow ``Table``/``RecordBatch``/``RecordBatchReader``, pandas and
    polars DataFrames, and objects exporting the Arrow PyCapsule stream interface.
    A pandas index is kept as columns only if it is named.
    """
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pa.RecordBatchReader):
        return data.read_all()
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(data, pd.DataFrame):
        keep_index = any(name is not None for name in data.index.names)
        return pa.Table.from_pandas(data, preserve_index=keep_index)
    pl = sys.modules.get("polars")
    if pl is not None:
        if isinstance(data, pl.LazyFrame):
            data = data.collect()
        if isinstance(data, pl.DataFrame):
            return data.to_arrow()
    if hasattr(data, "__arrow_c_stream__") and not isinstance(data, (list, tuple, dict)):
        return pa.table(data)
    return None


def _cast(name: str, column: pa.ChunkedArray, to: pa.DataType) -> pa.ChunkedArray:
    try:
        return column.cast(to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"column {name!r}: cannot convert {column.type} to {to}: {exc}") from exc


def normalize_column(name: str, column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Cast a column to the type it will have in the lake, where that is unambiguous.

    Integers → int64 (checked), floats → float64, large/view strings → utf8,
    large/view/fixed binary → binary, timestamps and dates → timestamp[ns, UTC]
    (naive = UTC), dictionaries of strings keep their encoding with utf8 values,
    other dictionaries are decoded. Other types are passed through for the server
    to accept or reject.
    """
    t = column.type
    types = pa.types
    if types.is_null(t) or types.is_boolean(t) or t in (pa.int64(), pa.float64(), pa.string(), pa.binary()):
        return column
    if types.is_integer(t):
        return _cast(name, column, pa.int64())
    if types.is_floating(t):
        return _cast(name, column, pa.float64())
    if types.is_large_string(t) or types.is_string_view(t):
        return _cast(name, column, pa.string())
    if types.is_large_binary(t) or types.is_binary_view(t) or types.is_fixed_size_binary(t):
        return _cast(name, column, pa.binary())
    if types.is_timestamp(t) or types.is_date(t):
        return column if t == _TS_NS_UTC else _cast(name, column, _TS_NS_UTC)
    if types.is_dictionary(t):
        value_type = t.value_type
        if types.is_string(value_type):
            return column
        if types.is_large_string(value_type) or types.is_string_view(value_type):
            return _cast(name, column, pa.dictionary(t.index_type, pa.string()))
        return normalize_column(name, _cast(name, column, value_type))
    return column


def prepare_table(table: pa.Table, now_ns: int | None = None) -> pa.Table:
    """Make a table ready to send: required columns present and typed, types normalized.

    - ``event_id`` is added (new ULIDs) if absent; nulls in it are replaced by new ULIDs.
    - ``timestamp`` is added (``now_ns``, default now) if absent; nulls become now.
      It may be a timestamp/date of any unit and zone (naive = UTC) or int ns.
    - ``version`` (optional) becomes int64 with nulls as 0.
    - Other columns: :func:`normalize_column`. Schema metadata (e.g. pandas') is dropped.
    """
    names = table.column_names
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate column names: {dupes}")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"column names must be str, got {name!r}")
    now_ns = time.time_ns() if now_ns is None else now_ns
    n = table.num_rows
    table = table.replace_schema_metadata(None)

    columns: dict[str, pa.ChunkedArray] = {}
    for name in names:
        column = table.column(name)
        if name == "event_id":
            column = _event_id_column(column, n)
        elif name == "timestamp":
            column = _timestamp_column(column, now_ns)
        elif name == "version":
            column = _version_column(column)
        else:
            column = normalize_column(name, column)
        columns[name] = column
    if "event_id" not in columns:
        columns = {"event_id": ulid_array(n), **columns}
    if "timestamp" not in columns:
        now = pa.repeat(pa.scalar(now_ns, type=_TS_NS_UTC), n)
        columns = {"event_id": columns.pop("event_id"), "timestamp": pa.chunked_array([now]), **columns}
    return pa.table(columns)


def _event_id_column(column: pa.ChunkedArray, n: int) -> pa.ChunkedArray:
    t = column.type
    if pa.types.is_null(t):  # all null: every row gets a new id
        return ulid_array(n)
    if pa.types.is_dictionary(t):
        column = _cast("event_id", column, t.value_type)
        t = column.type
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        column = _cast("event_id", column, pa.string())
    elif not pa.types.is_string(t):
        raise TypeError(f"column 'event_id' must hold strings, got {t}")
    if column.null_count:
        column = pc.if_else(pc.is_null(column), ulid_array(n), column)
    return column


def _timestamp_column(column: pa.ChunkedArray, now_ns: int) -> pa.ChunkedArray:
    t = column.type
    if pa.types.is_null(t):  # all null: every row gets now
        column, t = _cast("timestamp", column, _TS_NS_UTC), _TS_NS_UTC
    if pa.types.is_integer(t):
        column = _cast("timestamp", column, pa.int64())
        fill = pa.scalar(now_ns, type=pa.int64())
    elif pa.types.is_timestamp(t) or pa.types.is_date(t):
        column = normalize_column("timestamp", column)
        fill = pa.scalar(now_ns, type=_TS_NS_UTC)
    else:
        raise TypeError(f"column 'timestamp' must be a timestamp, a date or int64 nanoseconds, got {t}")
    if column.null_count:
        column = pc.fill_null(column, fill)
    return column


def _version_column(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if not (pa.types.is_integer(column.type) or pa.types.is_null(column.type)):
        raise TypeError(f"column 'version' must hold integers, got {column.type}")
    column = _cast("version", column, pa.int64())
    if column.null_count:
        column = pc.fill_null(column, pa.scalar(0, type=pa.int64()))
    return column


def encode_ipc(table: pa.Table | pa.RecordBatch, compression: str | None = None) -> bytes:
    """Serialize as one Arrow IPC *stream* (schema + record batches)."""
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression) if compression else None
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        if isinstance(table, pa.RecordBatch):
            writer.write_batch(table)
        else:
            writer.write_table(table)
    data: bytes = sink.getvalue().to_pybytes()
    return data


def decode_ipc(data: bytes | memoryview | pa.Buffer) -> pa.Table:
    """Read one Arrow IPC stream into a table."""
    return pa.ipc.open_stream(pa.py_buffer(data) if not isinstance(data, pa.Buffer) else data).read_all()


def iter_ipc_chunks(
    table: pa.Table, max_rows: int, max_bytes: int, compression: str | None = None
) -> Iterator[tuple[bytes, int]]:
    """Split a table into IPC stream payloads of at most ``max_rows`` rows and ``max_bytes``.

    Yields ``(payload, rows)``. A single row larger than ``max_bytes`` is sent on
    its own. Sizes are first estimated from the Arrow buffers and then checked on
    the encoded payload, shrinking the slice until it fits.
    """
    if max_rows < 1 or max_bytes < 1:
        raise ValueError("max_rows and max_bytes must be positive")
    n = table.num_rows
    start = 0
    while start < n:
        rows = min(max_rows, n - start)
        while True:
            piece = table.slice(start, rows)
            estimate = piece.nbytes
            if rows > 1 and estimate > max_bytes:
                rows = max(1, min(rows - 1, int(rows * max_bytes / estimate * 0.9)))
                continue
            payload = encode_ipc(piece, compression)
            if rows > 1 and len(payload) > max_bytes:
                rows = max(1, min(rows - 1, int(rows * max_bytes / len(payload) * 0.9)))
                continue
            break
        yield payload, rows
        start += rows
