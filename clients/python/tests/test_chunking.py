"""Splitting inputs into requests: record counts, byte budgets, lazy conversion."""
import pyarrow as pa
import pytest

from lakewriter_client import chunk_records, decode_ipc, iter_ipc_chunks, prepare_table
from lakewriter_client._convert import RECORD_FRAMING_BYTES


def records(n, payload=""):
    return [{"event_id": f"e{i}", "timestamp": i, "i": i, "s": payload} for i in range(n)]


def test_record_count_limit():
    chunks = list(chunk_records(records(25), max_records=10, max_bytes=1 << 30))
    assert [len(c) for c in chunks] == [10, 10, 5]
    assert [r.event_id for c in chunks for r in c] == [f"e{i}" for i in range(25)]


def test_byte_limit():
    chunks = list(chunk_records(records(100, "x" * 1000), max_records=1000, max_bytes=10_000))
    assert len(chunks) > 1
    for c in chunks:
        size = sum(r.ByteSize() + RECORD_FRAMING_BYTES for r in c)
        assert size <= 10_000
    assert sum(len(c) for c in chunks) == 100


def test_oversized_record_is_sent_alone():
    recs = records(3) + [{"event_id": "big", "blob": b"x" * 50_000}] + records(2)
    chunks = list(chunk_records(recs, max_records=100, max_bytes=10_000))
    assert [len(c) for c in chunks] == [3, 1, 2]
    assert chunks[1][0].event_id == "big"


def test_empty_input_gives_no_chunks():
    assert list(chunk_records([], 10, 100)) == []


def test_conversion_is_lazy():
    consumed = []

    def gen():
        for i in range(1_000_000):
            consumed.append(i)
            yield {"i": i}

    first = next(chunk_records(gen(), max_records=10, max_bytes=1 << 20))
    assert len(first) == 10 and len(consumed) == 11  # one look-ahead record


def test_bad_limits():
    with pytest.raises(ValueError):
        list(chunk_records(records(1), 0, 10))


def table(n, width=100):
    return prepare_table(pa.table({"event_id": [f"e{i}" for i in range(n)], "timestamp": list(range(n)),
                                   "s": ["y" * width] * n}))


def test_ipc_chunks_respect_rows_and_bytes():
    t = table(10_000)
    out = list(iter_ipc_chunks(t, max_rows=3_000, max_bytes=1 << 30))
    assert [rows for _, rows in out] == [3000, 3000, 3000, 1000]

    out = list(iter_ipc_chunks(t, max_rows=100_000, max_bytes=200_000))
    assert len(out) > 5
    assert all(len(data) <= 200_000 for data, _ in out)
    assert sum(rows for _, rows in out) == 10_000
    back = pa.concat_tables([decode_ipc(d) for d, _ in out])
    assert back.equals(t.combine_chunks()) or back.to_pylist() == t.to_pylist()


def test_ipc_oversized_row_alone():
    t = prepare_table(pa.table({"event_id": ["a", "b", "c"], "timestamp": [1, 2, 3],
                                "blob": [b"x", b"y" * 100_000, b"z"]}))
    out = list(iter_ipc_chunks(t, max_rows=10, max_bytes=50_000))
    assert [rows for _, rows in out] == [1, 1, 1]
    assert sum(decode_ipc(d).num_rows for d, _ in out) == 3


def test_ipc_empty_table_gives_no_chunks():
    assert list(iter_ipc_chunks(table(0), 10, 1000)) == []
