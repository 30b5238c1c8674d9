"""lakewriter_client (clients/python) against the real server: DataRecords and Arrow IPC over gRPC,
Parquet read back with DuckDB and polars, idempotency, auth, tenancy, streaming, HTTP query."""
import math
from datetime import date, datetime, timedelta, timezone

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

from conftest import ADMIN_KEY, Server, block_lake, deliver_after_refusal
from lakewriter_client import (
    AuthenticationError,
    InvalidArgumentError,
    LakewriterClient,
    LakewriterError,
    PermissionDeniedError,
    ResourceExhaustedError,
    datetime_to_ns,
)

UTC = timezone.utc
#: Record times inside one UTC hour, so that each flush writes one file per endpoint.
BASE = datetime(2024, 5, 6, 7, 0, 0, tzinfo=UTC)
BASE_NS = datetime_to_ns(BASE)


def connect(server, key: str = ADMIN_KEY, **kw) -> LakewriterClient:
    kw.setdefault("timeout", 30)
    kw.setdefault("max_retries", 3)
    return LakewriterClient(server.grpc_endpoint, api_key=key, http_url=server.http, **kw)


@pytest.fixture
def lw(server):
    with connect(server) as client:
        yield client


def glob(server, endpoint: str, tenant: str = "default") -> str:
    return f"{server.lake}/tenant={tenant}/endpoint={endpoint}/**/*.parquet"


def lake(server, endpoint: str, columns: str = "*", tenant: str = "default", order: str = "event_id"):
    """Rows of the endpoint's Parquet files (all flushes, schemas unified by name)."""
    return duckdb.connect().execute(
        f"SELECT {columns} FROM read_parquet('{glob(server, endpoint, tenant)}', "
        f"hive_partitioning = true, union_by_name = true) ORDER BY {order}"
    ).fetchall()


def lake_columns(server, endpoint: str, tenant: str = "default") -> dict:
    rows = duckdb.connect().execute(
        f"DESCRIBE SELECT * FROM read_parquet('{glob(server, endpoint, tenant)}', union_by_name = true)"
    ).fetchall()
    return {name: type_ for name, type_, *_ in rows}


def test_dicts_with_every_type_round_trip_exactly(server, lw):
    blob = bytes(range(256)) * 4096  # 1 MiB
    records = [
        {"event_id": "r0", "timestamp": BASE_NS + 123_456_789, "version": 7,
         "s": "héllo wörld 🌊 中文 \t\n end", "i": -(2**63), "f": 1.5, "b": True, "bin": b"\x00\xff",
         "t": datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "d": date(2024, 2, 29), "never": None},
        {"event_id": "r1", "timestamp": BASE + timedelta(minutes=1), "s": "", "i": 2**63 - 1,
         "f": float("nan"), "b": False, "bin": b"", "t": datetime(1969, 12, 31, 23, 59, 59, 1),  # naive = UTC
         "never": None},
        {"event_id": "r2", "timestamp": (BASE + timedelta(minutes=2)).replace(tzinfo=None), "s": None, "i": None,
         "f": float("inf"), "b": None, "bin": blob, "t": None, "never": None},
        {"event_id": "r3", "timestamp": pd.Timestamp(BASE_NS + 3, unit="ns"), "i": 0, "f": float("-inf"),
         "t": pd.Timestamp("2024-05-06T07:08:09.123456789Z")},  # missing keys are nulls
        {"event_id": "r4", "timestamp": BASE_NS + 4, "f": -0.0, "s": "x" * 70_000},
    ]
    result = lw.write("every-type", records)
    assert result.records_accepted == 5 and len(result) == 1 and not result.duplicate
    assert len(result.sequence_tokens[0]) == 16
    server.flush()

    types = lake_columns(server, "every-type")
    assert types["event_id"] == "VARCHAR" and types["version"] == "BIGINT"
    assert types["s"] == "VARCHAR" and types["i"] == "BIGINT" and types["f"] == "DOUBLE"
    assert types["b"] == "BOOLEAN" and types["bin"] == "BLOB"
    assert "TIME ZONE" in types["timestamp"] or "TZ" in types["timestamp"]
    assert types["t"] == types["timestamp"] and types["d"] == types["timestamp"]

    rows = lake(server, "every-type",
                "event_id, epoch_ns(timestamp), version, s, i, f, b, bin, epoch_ns(t), epoch_ns(d), tenant, endpoint")
    assert [r[0] for r in rows] == ["r0", "r1", "r2", "r3", "r4"]
    r0, r1, r2, r3, r4 = rows
    assert r0[1:] == (BASE_NS + 123_456_789, 7, "héllo wörld 🌊 中文 \t\n end", -(2**63), 1.5, True,
                      b"\x00\xff", 1704164645_678901000, 1709164800_000000000, "default", "every-type")
    assert r1[1] == BASE_NS + 60 * 10**9 and r1[2] == 0
    assert r1[3] == "" and r1[4] == 2**63 - 1 and math.isnan(r1[5]) and r1[6] is False and r1[7] == b""
    assert r1[8] == -999_999_000
    assert r2[1] == BASE_NS + 120 * 10**9
    assert r2[3] is None and r2[4] is None and r2[5] == math.inf and r2[6] is None and r2[7] == blob
    assert r2[8] is None
    assert r3[1] == BASE_NS + 3 and r3[3] is None and r3[4] == 0 and r3[5] == -math.inf
    assert r3[7] is None and r3[8] == 1714979289_123456789 and r3[9] is None
    assert r4[1] == BASE_NS + 4 and math.copysign(1, r4[5]) == -1 and r4[3] == "x" * 70_000
    # a field that is null in every record of the batch has no type: no column
    assert "never" not in types


def test_dataframe_and_arrow_table_read_back_with_polars(server, lw):
    df = pd.DataFrame({
        "sym": ["AAPL", "MSFT", "ÄÖÜ", None],
        "px": [189.5, 402.25, float("nan"), 1.0],
        "qty": [1, 2, 3, 4],
        "ok": [True, False, True, False],
        "at": pd.to_datetime(["2024-05-06 07:00:00.123456", "2024-05-06 07:00:01", None, "2024-05-06 07:00:03"],
                         format="ISO8601"),
        "cat": pd.Categorical(["a", "b", "a", "b"]),
    })
    result = lw.write("quotes", df)
    assert result.records_accepted == 4

    table = pa.table({
        "event_id": ["t0", "t1", "t2"],
        "timestamp": pa.array([BASE_NS // 10**6 + i for i in range(3)], pa.timestamp("ms", tz="America/New_York")),
        "version": pa.array([1, 2, None], pa.int32()),
        "level": pa.array(["info", "warn", "info"]).dictionary_encode(),
        "payload": pa.array([b"\x01", None, b"\x02\x03"], pa.binary()),
        "n32": pa.array([-5, 0, 2**31 - 1], pa.int32()),
        "empty": pa.nulls(3),
    })
    assert lw.write("arrow-batch", table).records_accepted == 3
    assert lw.write("arrow-batch", pa.record_batch({"event_id": ["t3"], "timestamp": [BASE_NS + 9],
                                                     "level": ["debug"]})).records_accepted == 1
    server.flush()

    got = pl.read_parquet(glob(server, "quotes"), hive_partitioning=True).sort("qty")
    assert got.height == 4 and got["event_id"].n_unique() == 4
    assert all(len(e) == 26 for e in got["event_id"].to_list())  # generated ULIDs
    assert got["sym"].to_list() == ["AAPL", "MSFT", "ÄÖÜ", None]
    assert got["px"].to_list() == [189.5, 402.25, None, 1.0]  # pandas NaN means missing: null
    assert got["ok"].to_list() == [True, False, True, False]
    assert got.schema["qty"] == pl.Int64 and got.schema["px"] == pl.Float64
    assert got.schema["timestamp"] == pl.Datetime("ns", "UTC")
    assert got["at"].to_list()[0] == datetime(2024, 5, 6, 7, 0, 0, 123456, tzinfo=UTC)
    assert got["at"].null_count() == 1
    assert got["cat"].cast(pl.String).to_list() == ["a", "b", "a", "b"]
    assert got["tenant"].unique().to_list() == ["default"]

    arrow = pl.read_parquet(glob(server, "arrow-batch"), hive_partitioning=True).sort("event_id")
    assert arrow["event_id"].to_list() == ["t0", "t1", "t2", "t3"]
    stamps = arrow["timestamp"].dt.epoch("ns").to_list()
    assert stamps == [(BASE_NS // 10**6 + i) * 10**6 for i in range(3)] + [BASE_NS + 9]
    versions = arrow["version"].to_list()
    assert versions == [1, 2, 0, 0]  # a null version and a batch without the column: 0
    assert arrow["level"].cast(pl.String).to_list() == ["info", "warn", "info", "debug"]
    assert arrow["payload"].to_list() == [b"\x01", None, b"\x02\x03", None]
    assert arrow["n32"].to_list() == [-5, 0, 2**31 - 1, None] and arrow.schema["n32"] == pl.Int64
    assert "empty" not in arrow.columns  # Arrow's null type: no column, as with null fields


def test_schema_evolution_new_columns_are_null_for_older_rows(server, lw):
    lw.write("evolve", [{"event_id": "a", "timestamp": BASE, "x": 1}])
    lw.write("evolve", [{"event_id": "b", "timestamp": BASE, "x": 2, "y": "new"}])
    server.flush()
    lw.write("evolve", pa.table({"event_id": ["c"], "timestamp": [BASE_NS], "z": [True]}))
    server.flush()
    rows = lake(server, "evolve", "event_id, x, y, z")
    assert rows == [("a", 1, None, None), ("b", 2, "new", None), ("c", None, None, True)]


def test_type_conflict_is_invalid_argument_and_writes_nothing(server, lw):
    lw.write("prices", [{"event_id": "p1", "timestamp": BASE, "price": 1.5}])
    with pytest.raises(InvalidArgumentError) as info:
        lw.write("prices", [{"event_id": "p2", "timestamp": BASE, "price": 2.5, "note": "fine"},
                            {"event_id": "p3", "timestamp": BASE, "price": "cheap", "note": "bad"}])
    err = info.value
    assert err.code == "INVALID_ARGUMENT" and "price" in err.message and not err.retryable
    assert err.result is not None and err.result.records_accepted == 0
    with pytest.raises(InvalidArgumentError) as info:
        lw.write("prices", pa.table({"event_id": ["p4"], "timestamp": [BASE_NS], "price": ["cheap"]}))
    assert "price" in info.value.message
    server.flush()
    assert lake(server, "prices", "event_id, price") == [("p1", 1.5)]
    assert "note" not in lake_columns(server, "prices")


def test_bad_names_are_invalid_argument(server, lw):
    for endpoint, record in [("Bad Endpoint", {"a": 1}), ("ok", {"Bad-Field": 1}), ("ok", {"1x": 1})]:
        with pytest.raises(InvalidArgumentError):
            lw.write(endpoint, [record])


def test_same_batch_id_twice_writes_once(server, lw):
    records = [{"event_id": f"d{i}", "timestamp": BASE, "i": i} for i in range(3)]
    first = lw.write("dedupe", records, batch_id="batch-0001")
    again = lw.write("dedupe", records, batch_id="batch-0001")
    assert not first.duplicate and first.batch_ids == ["batch-0001"]
    assert again.duplicate and again.duplicate_batches == 1
    assert again.records_accepted == first.records_accepted == 3
    assert again.sequence_tokens == first.sequence_tokens  # the original ack

    # several requests: every derived batch_id is deduplicated
    frame = pd.DataFrame({"event_id": [f"m{i}" for i in range(5)], "timestamp": [BASE_NS] * 5, "i": range(5)})
    one = lw.write("dedupe", frame, batch_id="frame-1", max_batch_records=2)
    two = lw.write("dedupe", frame, batch_id="frame-1", max_batch_records=2)
    assert one.batch_ids == two.batch_ids == ["frame-1.0", "frame-1.1", "frame-1.2"]
    assert two.duplicate and two.duplicate_batches == 3 and not one.duplicate
    server.flush()
    assert lake(server, "dedupe", "count(*), count(DISTINCT event_id)", order="1") == [(8, 8)]


def test_wrong_key_and_missing_scope(server):
    with connect(server, "lw_definitely_not_a_key_000000000000") as bad:
        with pytest.raises(AuthenticationError) as info:
            bad.write("e", [{"a": 1}])
        assert info.value.code == "UNAUTHENTICATED"
        with pytest.raises(AuthenticationError):
            bad.query("SELECT 1")
    with connect(server, server.create_key("acme", scopes=("read",))) as read_only:
        with pytest.raises(PermissionDeniedError):
            read_only.write("e", [{"a": 1}])


def test_tenant_isolation(server, lw):
    acme_key = server.create_key("acme")
    with connect(server, acme_key) as acme:
        assert acme.write("shared", [{"event_id": "acme-1", "timestamp": BASE, "who": "acme"}]).records_accepted == 1
        with connect(server, acme_key, tenant="acme") as explicit:
            explicit.write("shared", [{"event_id": "acme-2", "timestamp": BASE, "who": "acme"}])
        with connect(server, acme_key, tenant="default") as other:
            with pytest.raises(PermissionDeniedError):
                other.write("shared", [{"event_id": "stolen", "timestamp": BASE, "who": "acme"}])
        lw.write("shared", [{"event_id": "default-1", "timestamp": BASE, "who": "default"}])
        assert acme.query('SELECT event_id FROM "shared" ORDER BY event_id').column("event_id").to_pylist() == [
            "acme-1", "acme-2"]
    server.flush()
    assert lake(server, "shared", "event_id, who, tenant", tenant="acme") == [
        ("acme-1", "acme", "acme"), ("acme-2", "acme", "acme")]
    assert lake(server, "shared", "event_id, who, tenant") == [("default-1", "default", "default")]
    tenants = {p.name for p in server.lake.iterdir() if p.name.startswith("tenant=")}
    assert tenants == {"tenant=acme", "tenant=default"}


def test_streaming_writer_several_thousand_records(server, lw):
    n = 6000
    with lw.stream("stream-ep", max_batch_records=500, flush_interval=0.2) as writer:
        for i in range(n):
            writer.write({"event_id": f"s{i:05d}", "timestamp": BASE_NS + i, "i": i, "even": i % 2 == 0})
        writer.write(pd.DataFrame({"i": [-1, -2], "even": [False, True]}))
    result = writer.result
    assert result.records_accepted == n + 2 and result.duplicate_batches == 0
    assert len(result) >= n // 500
    assert writer.close().records_accepted == n + 2  # idempotent close
    server.flush()
    assert lake(server, "stream-ep", "count(*), count(DISTINCT event_id), sum(i), count(*) FILTER (WHERE even)",
                order="1") == [(n + 2, n + 2, n * (n - 1) // 2 - 3, n // 2 + 1)]


def test_query_reads_own_writes_before_flush(server, lw):
    lw.write("orders-eu", [{"event_id": f"o{i}", "timestamp": BASE, "qty": i, "sku": f"k{i}"} for i in range(3)])
    table = lw.query('SELECT count(*) AS n, sum(qty) AS q FROM "orders-eu"')
    assert isinstance(table, pa.Table) and table.to_pylist() == [{"n": 3, "q": 3}]
    rows = lw.query('SELECT event_id, sku FROM "orders-eu" ORDER BY event_id').to_pylist()
    assert rows == [{"event_id": f"o{i}", "sku": f"k{i}"} for i in range(3)]
    server.flush()
    lw.write("orders-eu", [{"event_id": "o3", "timestamp": BASE, "qty": 10, "sku": "k3"}])
    assert lw.query('SELECT count(*) AS n, sum(qty) AS q FROM "orders-eu"').to_pylist() == [{"n": 4, "q": 13}]
    with pytest.raises(InvalidArgumentError):
        lw.query("SELEC nonsense FROM")
    with pytest.raises(LakewriterError):
        lw.query('SELECT * FROM "no-such-endpoint"')


def test_single_dict_empty_input_and_flush_through_the_client(server, lw):
    assert lw.write("single", {"event_id": "s1", "timestamp": BASE, "a": 1}).records_accepted == 1
    assert lw.write("single", []).records_accepted == 0
    assert lw.write("single", pa.table({"a": pa.array([], pa.int64())})).batches == []
    flushed = lw.flush()  # the admin key: every tenant
    assert flushed["rows"] == 1, flushed
    assert [(f["tenant"], f["endpoint"], f["rows"]) for f in flushed["files"]] == [("default", "single", 1)]
    assert (server.lake / flushed["files"][0]["path"]).is_file()
    assert lake(server, "single", "event_id, a") == [("s1", 1)]
    assert lw.flush() == {"files": [], "rows": 0}


def test_stream_batch_id_prefix_is_idempotent_across_writers(server, lw):
    for _ in range(2):
        with lw.stream("prefixed", max_batch_records=10, flush_interval=0, batch_id_prefix="run-1") as w:
            w.write([{"event_id": f"p{i:02d}", "timestamp": BASE, "i": i} for i in range(25)])
        assert w.result.batch_ids == ["run-1.0", "run-1.1", "run-1.2"]
    assert w.result.duplicate and w.result.duplicate_batches == 3 and w.result.records_accepted == 25
    server.flush()
    assert lake(server, "prefixed", "count(*), count(DISTINCT event_id)", order="1") == [(25, 25)]


def test_stream_wrong_key_and_type_conflict_stop_the_writer(server, lw):
    with connect(server, "lw_definitely_not_a_key_000000000000") as bad:
        writer = bad.stream("s")
        writer.write({"i": 1})
        with pytest.raises(AuthenticationError):
            writer.flush(timeout=30)
        with pytest.raises(AuthenticationError):
            writer.close()

    lw.write("typed", [{"event_id": "t00", "timestamp": BASE, "price": 1.5}])
    writer = lw.stream("typed", max_batch_records=5, flush_interval=0)
    writer.write([{"event_id": f"t{i:02d}", "timestamp": BASE, "price": "cheap"} for i in range(1, 13)])
    with pytest.raises(InvalidArgumentError) as info:
        writer.close(timeout=30)
    err = info.value
    assert "price" in err.message and err.batch_id is not None and err.result.records_accepted == 0
    with pytest.raises(InvalidArgumentError):
        writer.write({"price": 2.0})
    server.flush()
    assert lake(server, "typed", "event_id, price") == [("t00", 1.5)]


def test_query_needs_the_read_scope(server):
    with connect(server, server.create_key("acme", scopes=("write",))) as writer:
        assert writer.write("w", [{"a": 1}]).records_accepted == 1
        with pytest.raises(PermissionDeniedError) as info:
            writer.query('SELECT count(*) FROM "w"')
    assert info.value.http_status == 403 and not info.value.retryable


def test_full_memtables_are_refused_as_retryable_and_the_client_retries_until_accepted(tmp_path):
    server = Server(tmp_path / "data", "--memtable-budget", "1KiB")
    blocker = block_lake(server)
    try:
        with connect(server, max_retries=0) as once:
            # memtables were empty: admitted, and now over the budget
            once.write("full", [{"event_id": "f0", "timestamp": BASE, "i": 0, "pad": "x" * 4096}])
            with pytest.raises(ResourceExhaustedError) as info:
                once.write("full", [{"event_id": "f1", "timestamp": BASE, "i": 1}])
        err = info.value
        assert err.retryable and "memtable memory budget exhausted" in err.message
        assert err.retry_after == 1.0  # the server's google.rpc.RetryInfo

        def write():
            with connect(server, max_retries=60) as lw:
                return lw.write("full", [{"event_id": "f2", "timestamp": BASE, "i": 2}])

        result = deliver_after_refusal(server, blocker, write)
        ack = result.batches[0]
        assert ack.attempts > 1 and ack.records_accepted == 1 and not ack.duplicate
        server.flush()
        assert lake(server, "full", "event_id") == [("f0",), ("f2",)]
    finally:
        server.stop()


def test_column_and_value_limits_are_invalid_argument_and_write_nothing(server, lw):
    wide = {"event_id": "w0", "timestamp": BASE, **{f"c{i}": i for i in range(1000)}}
    assert lw.write("wide", [wide]).records_accepted == 1  # exactly at the limit
    with pytest.raises(InvalidArgumentError) as info:
        lw.write("wide", [{"event_id": "w1", "timestamp": BASE, "c1000": 1}])
    assert "more than 1000 field columns" in info.value.message

    mib = 1 << 20
    assert lw.write("big", [{"event_id": "b0", "timestamp": BASE, "s": "x" * mib}]).records_accepted == 1
    for value in ["y" * (mib + 1), b"z" * (mib + 1)]:
        with pytest.raises(InvalidArgumentError) as info:
            lw.write("big", [{"event_id": "b1", "timestamp": BASE, "s" if isinstance(value, str) else "b": value}])
        assert f"exceeds the {mib}-byte limit" in info.value.message
    server.flush()
    assert lake(server, "wide", "event_id, c999") == [("w0", 999)]
    assert "c1000" not in lake_columns(server, "wide")
    assert lake(server, "big", "event_id, length(s)") == [("b0", mib)]
