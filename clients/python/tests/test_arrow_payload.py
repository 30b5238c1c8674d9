"""Tables → Arrow IPC payloads: added columns, type normalization, encoding round trip."""
import time
from datetime import date, datetime, timezone

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

from lakewriter_client import decode_ipc, encode_ipc, prepare_table, ulid_array
from lakewriter_client._arrow import as_arrow_table
from lakewriter_client._ids import ALPHABET, ulid_timestamp_ms, ulid_to_int

TS = pa.timestamp("ns", tz="UTC")


def test_ipc_round_trip_every_type():
    t = pa.table({
        "event_id": pa.array(["a", "b", "c"]),
        "timestamp": pa.array([0, 1, 2], TS),
        "version": pa.array([1, None, 3], pa.int64()),
        "s": ["x", None, "ünï🌊"],
        "i": pa.array([-(2**63), 0, 2**63 - 1], pa.int64()),
        "f": [float("nan"), float("inf"), -0.0],
        "b": [True, False, None],
        "bin": [b"", b"\x00\xff", None],
        "t": pa.array([None, 5, 6], TS),
        "d": pa.array(["p", "q", "p"]).dictionary_encode(),
        "nothing": pa.nulls(3),
    })
    data = encode_ipc(t)
    assert data[:4] == b"\xff\xff\xff\xff"  # IPC stream continuation marker (not the file format)
    back = decode_ipc(data)
    assert back.schema == t.schema
    assert back.drop_columns(["f"]).equals(t.drop_columns(["f"]))  # NaN != NaN
    f = back["f"].to_pylist()
    assert f[0] != f[0] and f[1] == float("inf") and str(f[2]) == "-0.0"
    # a RecordBatch encodes the same
    assert decode_ipc(encode_ipc(t.to_batches()[0])).drop_columns(["f"]).equals(t.drop_columns(["f"]))


def test_compressed_ipc_round_trip():
    t = prepare_table(pa.table({"x": list(range(1000))}))
    assert decode_ipc(encode_ipc(t, "zstd")).equals(t)


def test_prepare_adds_event_id_and_timestamp_vectorized():
    before = time.time_ns()
    t = prepare_table(pa.table({"x": [1, 2, 3]}))
    after = time.time_ns()
    assert t.column_names == ["event_id", "timestamp", "x"]
    assert t.schema.field("event_id").type == pa.string()
    assert t.schema.field("timestamp").type == TS
    ids = t["event_id"].to_pylist()
    assert len(set(ids)) == 3 and all(len(i) == 26 and set(i) <= set(ALPHABET) for i in ids)
    stamps = t["timestamp"].cast(pa.int64()).to_pylist()
    assert len(set(stamps)) == 1 and before <= stamps[0] <= after


def test_prepare_fills_null_ids_and_timestamps_and_versions():
    t = prepare_table(pa.table({
        "event_id": ["keep", None],
        "timestamp": pa.array([5, None], pa.timestamp("ms")),
        "version": pa.array([None, 7], pa.int32()),
    }), now_ns=123_000_000)
    assert t["event_id"][0].as_py() == "keep" and len(t["event_id"][1].as_py()) == 26
    assert t["timestamp"].cast(pa.int64()).to_pylist() == [5_000_000, 123_000_000]
    assert t["version"].type == pa.int64() and t["version"].to_pylist() == [0, 7]


def test_prepare_treats_all_null_id_and_timestamp_as_absent():
    t = prepare_table(pa.table({"event_id": pa.nulls(2), "timestamp": pa.nulls(2), "x": [1, 2]}), now_ns=7)
    assert t["event_id"].type == pa.string() and t["event_id"].null_count == 0
    assert t["timestamp"].type == TS and t["timestamp"].cast(pa.int64()).to_pylist() == [7, 7]


def test_prepare_normalizes_types():
    t = prepare_table(pa.table({
        "event_id": pa.array(["a"], pa.large_string()),
        "timestamp": pa.array([datetime(2024, 1, 1, 12)], pa.timestamp("us")),  # naive = UTC
        "i8": pa.array([1], pa.int8()),
        "u32": pa.array([4_000_000_000], pa.uint32()),
        "f32": pa.array([0.5], pa.float32()),
        "ls": pa.array(["x"], pa.large_string()),
        "sv": pa.array(["y"], pa.string_view()),
        "lb": pa.array([b"z"], pa.large_binary()),
        "fsb": pa.array([b"ab"], pa.binary(2)),
        "d32": pa.array([date(2024, 5, 6)], pa.date32()),
        "tz": pa.array([0], pa.timestamp("s", tz="Europe/Berlin")),
        "dict": pa.array(["p"], pa.large_string()).dictionary_encode(),
        "idict": pa.array([3]).dictionary_encode(),
        "n": pa.nulls(1),
    }))
    types = {f.name: f.type for f in t.schema}
    assert types == {
        "event_id": pa.string(), "timestamp": TS, "i8": pa.int64(), "u32": pa.int64(),
        "f32": pa.float64(), "ls": pa.string(), "sv": pa.string(), "lb": pa.binary(), "fsb": pa.binary(),
        "d32": TS, "tz": TS, "dict": pa.dictionary(pa.int32(), pa.string()), "idict": pa.int64(),
        "n": pa.null(),
    }
    row = t.to_pylist()[0]
    assert row["timestamp"] == datetime(2024, 1, 1, 12, tzinfo=timezone.utc)
    assert row["d32"] == datetime(2024, 5, 6, tzinfo=timezone.utc)
    assert row["u32"] == 4_000_000_000 and row["tz"] == datetime(1970, 1, 1, tzinfo=timezone.utc)


def test_prepare_rejects_bad_required_columns():
    with pytest.raises(TypeError, match="event_id"):
        prepare_table(pa.table({"event_id": [1]}))
    with pytest.raises(TypeError, match="timestamp"):
        prepare_table(pa.table({"timestamp": ["2024-01-01"]}))
    with pytest.raises(TypeError, match="version"):
        prepare_table(pa.table({"version": ["1"]}))
    with pytest.raises(ValueError, match="u64"):
        prepare_table(pa.table({"u64": pa.array([2**64 - 1], pa.uint64())}))


def test_pandas_frames():
    df = pd.DataFrame({
        "name": ["a", "b", None],
        "n": [1, 2, 3],
        "x": [0.5, np.nan, 1.5],
        "ok": [True, False, True],
        "when": pd.to_datetime(["2024-01-01", "2024-01-02", None]),
        "cat": pd.Categorical(["u", "v", "u"]),
    })
    t = prepare_table(as_arrow_table(df))
    assert t.column_names == ["event_id", "timestamp", "name", "n", "x", "ok", "when", "cat"]
    assert t.schema.metadata is None  # pandas metadata dropped
    assert t["name"].type == pa.string() and t["name"].to_pylist() == ["a", "b", None]
    assert t["when"].type == TS and t["when"].null_count == 1
    assert pa.types.is_dictionary(t["cat"].type)
    # an unnamed index is dropped, a named one is kept as a column
    assert "__index_level_0__" not in as_arrow_table(df.set_index(pd.Index([5, 6, 7]))).column_names
    assert "key" in as_arrow_table(df.set_index(pd.Index([5, 6, 7], name="key"))).column_names


def test_polars_and_record_batches_and_capsules():
    t = prepare_table(as_arrow_table(pl.DataFrame({"s": ["a", "b"], "i": [1, 2]})))
    assert t["s"].type == pa.string() and t["i"].type == pa.int64()
    assert as_arrow_table(pl.DataFrame({"s": ["a"]}).lazy()).num_rows == 1
    batch = pa.record_batch({"x": [1]})
    assert as_arrow_table(batch).num_rows == 1
    assert as_arrow_table(pa.RecordBatchReader.from_batches(batch.schema, [batch, batch])).num_rows == 2
    assert as_arrow_table([{"a": 1}]) is None
    assert as_arrow_table({"a": 1}) is None


def test_ulid_array_matches_scalar_format():
    ms = 1714979289123
    arr = ulid_array(5000, ms=ms)
    ids = arr.to_pylist()
    assert arr.type == pa.string() and len(set(ids)) == 5000
    assert all(ulid_timestamp_ms(i) == ms for i in ids)
    assert all(ulid_to_int(i) < 1 << 128 for i in ids[:100])
    assert ulid_array(0).to_pylist() == []


def test_ulid_array_blocks(monkeypatch):
    import lakewriter_client._ids as ids

    monkeypatch.setattr(ids, "_BLOCK", 7)
    arr = ids.ulid_array(20)
    assert arr.num_chunks == 3 and len(set(arr.to_pylist())) == 20
