"""The client against an in-process fake IngestionService: batching, retries and
streaming through injected faults (the same calls against the real server:
tests/python/test_client.py)."""
import threading
import time
from datetime import datetime, timezone

import grpc
import pandas as pd
import pyarrow as pa
import pytest

from lakewriter_client import (
    AuthenticationError,
    DeadlineExceededError,
    InvalidArgumentError,
    LakewriterClient,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from lw_fake_server import KEY, Fault, fake  # noqa: F401  (fixture)

S = grpc.StatusCode


def client(fake, **kw):
    kw.setdefault("api_key", KEY)
    kw.setdefault("initial_backoff", 0.001)
    kw.setdefault("max_backoff", 0.01)
    kw.setdefault("timeout", 10)
    return LakewriterClient(fake.target, http_url=fake.http_url, **kw)


def test_write_dicts(fake):
    ts = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    with client(fake) as lw:
        result = lw.write("orders", [{"event_id": "o1", "timestamp": ts, "price": 9.5, "sku": "a"},
                                     {"price": None, "n": 3}])
    assert result.records_accepted == 2 and len(result) == 1 and not result.duplicate
    assert len(result.sequence_tokens[0]) == 16
    rows = fake.service.rows["orders"]
    assert rows[0]["event_id"] == "o1" and rows[0]["price"] == 9.5 and rows[0]["sku"] == "a"
    assert rows[0]["timestamp"] == 1714979289_000000000
    assert rows[1]["price"] is None and rows[1]["n"] == 3 and len(rows[1]["event_id"]) == 26


def test_single_dict_and_empty_input(fake):
    with client(fake) as lw:
        assert lw.write("e", {"a": 1}).records_accepted == 1
        assert lw.write("e", []).records_accepted == 0
        assert lw.write("e", pa.table({"a": pa.array([], pa.int64())})).batches == []
    assert fake.service.received.__len__() == 1


def test_large_input_is_split_with_derived_batch_ids(fake):
    with client(fake, max_batch_records=100) as lw:
        result = lw.write("big", ({"i": i} for i in range(250)), batch_id="job-7")
        assert result.batch_ids == ["job-7.0", "job-7.1", "job-7.2"]
        assert [b.records_sent for b in result.batches] == [100, 100, 50]
        assert result.records_accepted == 250
        # one request: the caller's batch_id as is
        assert lw.write("big", [{"i": 1}], batch_id="solo").batch_ids == ["solo"]
        # no batch_id: a fresh ULID per request
        ids = lw.write("big", [{"i": i} for i in range(150)]).batch_ids
        assert len(ids) == 2 and all(len(b) == 26 for b in ids)
    assert len(fake.service.rows["big"]) == 250 + 1 + 150


def test_same_batch_id_again_is_a_duplicate(fake):
    with client(fake, max_batch_records=10) as lw:
        first = lw.write("e", [{"i": i} for i in range(25)], batch_id="b")
        again = lw.write("e", [{"i": i} for i in range(25)], batch_id="b")
    assert not first.duplicate and again.duplicate and again.duplicate_batches == 3
    assert again.records_accepted == 25 and again.records_duplicate == 25
    assert again.sequence_tokens == first.sequence_tokens
    assert len(fake.service.rows["e"]) == 25


def test_dataframe_and_table_go_as_arrow(fake):
    df = pd.DataFrame({"sym": ["a", "b", "c"], "px": [1.0, 2.0, 3.0]})
    with client(fake, max_batch_records=2) as lw:
        result = lw.write("quotes", df)
        assert result.records_accepted == 3 and len(result) == 2
        lw.write("quotes", pa.table({"event_id": ["x"], "timestamp": [5], "sym": ["d"], "px": [4.0]}))
    rows = fake.service.rows["quotes"]
    assert [r["sym"] for r in rows] == ["a", "b", "c", "d"]
    assert all(len(r["event_id"]) == 26 for r in rows[:3]) and rows[3]["event_id"] == "x"
    assert rows[3]["timestamp"] == 5


def test_retryable_errors_are_retried_with_the_same_batch_id(fake):
    fake.service.faults = [
        Fault(S.UNAVAILABLE),
        Fault(S.RESOURCE_EXHAUSTED, "memtable budget exhausted", retryable=True),
        Fault(S.DEADLINE_EXCEEDED),
    ]
    with client(fake) as lw:
        result = lw.write("e", [{"a": 1}], batch_id="r1")
    assert result.batches[0].attempts == 4 and result.retries == 3
    assert fake.service.received == ["r1"] * 4
    assert len(fake.service.rows["e"]) == 1


def test_oversize_resource_exhausted_is_not_retried(fake):
    fake.service.faults = [Fault(S.RESOURCE_EXHAUSTED, "request of 17 MiB over the 16 MiB limit")]
    with client(fake) as lw, pytest.raises(ResourceExhaustedError) as info:
        lw.write("e", [{"a": 1}])
    assert info.value.retryable is False and "16 MiB" in info.value.message
    assert len(fake.service.received) == 1


def test_retries_run_out(fake):
    fake.service.faults = [Fault(S.UNAVAILABLE)] * 4
    with client(fake, max_retries=2) as lw, pytest.raises(UnavailableError) as info:
        lw.write("e", [{"a": 1}], batch_id="x")
    assert info.value.batch_id == "x" and len(fake.service.received) == 3


def test_lost_ack_retry_is_not_reported_as_duplicate(fake):
    fake.service.faults = [Fault(S.UNAVAILABLE, after_write=True)]
    with client(fake) as lw:
        result = lw.write("e", [{"a": 1}])
    ack = result.batches[0]
    assert ack.attempts == 2 and not ack.duplicate and ack.records_accepted == 1
    assert len(fake.service.rows["e"]) == 1


def test_non_retryable_error_is_raised_typed_without_retry(fake):
    fake.service.faults = [Fault(S.INVALID_ARGUMENT, "field `price`: existing type double, incoming type string")]
    with client(fake, max_batch_records=1) as lw:
        with pytest.raises(InvalidArgumentError) as info:
            lw.write("e", [{"a": 1}, {"a": 2}], batch_id="p")
    err = info.value
    assert "price" in err.message and err.code == "INVALID_ARGUMENT" and err.batch_id == "p.0"
    assert err.result is not None and err.result.records_accepted == 0
    assert fake.service.received == ["p.0"]


def test_failure_mid_write_reports_what_was_written(fake):
    with client(fake, max_batch_records=1) as lw:
        orig = fake.service._handle

        def handle(request, context):
            if request.batch_id == "p.1":
                context.abort(S.PERMISSION_DENIED, "tenant mismatch")
            return orig(request, context)

        fake.service._handle = handle
        with pytest.raises(PermissionDeniedError) as info:
            lw.write("e", [{"a": 1}, {"a": 2}, {"a": 3}], batch_id="p")
    assert info.value.batch_id == "p.1"
    assert info.value.result.batch_ids == ["p.0"] and info.value.result.records_accepted == 1


def test_wrong_key(fake):
    with client(fake, api_key="lw_wrong") as lw, pytest.raises(AuthenticationError) as info:
        lw.write("e", [{"a": 1}])
    assert info.value.code == "UNAUTHENTICATED" and "API key" in info.value.message


def test_type_errors_raise_before_sending(fake):
    with client(fake) as lw, pytest.raises(TypeError, match="'bad'"):
        lw.write("e", [{"ok": 1}, {"bad": object()}])
    assert fake.service.received == []


def test_unreachable_server_is_unavailable():
    with LakewriterClient("127.0.0.1:1", api_key=KEY, max_retries=1, initial_backoff=0.001, timeout=5) as lw:
        with pytest.raises(UnavailableError):
            lw.write("e", [{"a": 1}])


# ---- streaming ---------------------------------------------------------------


def test_stream_sends_by_size_and_returns_totals(fake):
    with client(fake) as lw:
        with lw.stream("s", max_batch_records=100, flush_interval=0) as writer:
            for i in range(1050):
                writer.write({"i": i})
            writer.write([{"i": -1}, {"i": -2}])
        result = writer.close()  # idempotent
    assert result.records_accepted == 1052 and len(result) == 11
    assert sorted(r["i"] for r in fake.service.rows["s"]) == list(range(-2, 0)) + list(range(1050))


def test_stream_sends_by_interval(fake):
    with client(fake) as lw:
        writer = lw.stream("s", flush_interval=0.05)
        writer.write({"i": 1})
        deadline = time.time() + 5
        while writer.result.records_accepted < 1 and time.time() < deadline:
            time.sleep(0.01)
        assert writer.result.records_accepted == 1 and writer.buffered_records == 0
        writer.write({"i": 2})
        assert writer.close().records_accepted == 2


def test_stream_reconnects_and_resends_unacked_batches(fake):
    fake.service.break_streams_at = [7, 23]  # break the stream at the 8th and the 24th request
    with client(fake) as lw:
        with lw.stream("s", max_batch_records=100, flush_interval=0, max_unacked_batches=4) as writer:
            for i in range(3000):
                writer.write({"i": i})
    result = writer.result
    assert result.records_accepted == 3000 and len(result) == 30
    assert writer.reconnects >= 2 and fake.service.streams_opened >= 3
    # every batch exactly once on the server, though some were sent twice
    assert len(fake.service.batch_ids("s")) == 30
    assert sorted(r["i"] for r in fake.service.rows["s"]) == list(range(3000))
    assert result.duplicate_batches == 0


def test_stream_lost_ack_is_resent_and_not_duplicated(fake):
    fake.service.faults = [Fault(S.UNAVAILABLE, after_write=True)]
    with client(fake) as lw:
        with lw.stream("s", max_batch_records=10, flush_interval=0) as writer:
            writer.write([{"i": i} for i in range(30)])
    assert writer.result.records_accepted == 30 and writer.result.duplicate_batches == 0
    assert len(fake.service.rows["s"]) == 30


def test_stream_with_prefix_is_idempotent_across_writers(fake):
    with client(fake) as lw:
        for _ in range(2):
            with lw.stream("s", max_batch_records=10, flush_interval=0, batch_id_prefix="run-1") as w:
                w.write([{"i": i} for i in range(25)])
        assert w.result.batch_ids == ["run-1.0", "run-1.1", "run-1.2"] and w.result.duplicate
    assert len(fake.service.rows["s"]) == 25


def test_stream_non_retryable_error_stops_the_writer(fake):
    fake.service.faults = [Fault(S.INVALID_ARGUMENT, "endpoint `bad-endpoint` rejected")]
    with client(fake) as lw:
        writer = lw.stream("bad-endpoint", max_batch_records=5, flush_interval=0)
        writer.write([{"i": i} for i in range(12)])
        with pytest.raises(InvalidArgumentError) as info:
            writer.close(timeout=10)
    assert "bad-endpoint" in info.value.message and info.value.batch_id is not None
    assert info.value.result.records_accepted == 0
    with pytest.raises(InvalidArgumentError):
        writer.write({"i": 1})


def test_stream_backpressure_blocks_producers(fake):
    gate = threading.Event()
    orig = fake.service._handle

    def slow(request, context):
        gate.wait(5)
        return orig(request, context)

    fake.service._handle = slow
    with client(fake) as lw:
        writer = lw.stream("s", max_batch_records=1, flush_interval=0, max_unacked_batches=2)
        done = threading.Event()

        def produce():
            for i in range(5):
                writer.write({"i": i})
            done.set()

        threading.Thread(target=produce, daemon=True).start()
        deadline = time.time() + 5
        while len(writer.unacked_batch_ids) < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert len(writer.unacked_batch_ids) == 2
        assert not done.wait(0.2)  # the producer is held back: 2 batches unacked, none acked
        assert len(writer.unacked_batch_ids) == 2 and writer.result.records_accepted == 0
        gate.set()
        assert done.wait(5)
        assert writer.close().records_accepted == 5


def test_stream_flush_timeout(fake):
    gate = threading.Event()
    orig = fake.service._handle
    fake.service._handle = lambda request, context: (gate.wait(5), orig(request, context))[1]
    with client(fake) as lw:
        writer = lw.stream("s", flush_interval=0)
        writer.write({"i": 1})
        with pytest.raises(DeadlineExceededError):
            writer.flush(timeout=0.2)
        gate.set()
        assert writer.flush(timeout=5).records_accepted == 1
        writer.close()


def test_stream_mixes_dicts_and_tables_in_order(fake):
    with client(fake) as lw:
        with lw.stream("s", flush_interval=0) as writer:
            writer.write({"i": 1})
            writer.write(pd.DataFrame({"i": [2, 3]}))
            writer.write({"i": 4})
    assert [r["i"] for r in fake.service.rows["s"]] == [1, 2, 3, 4]
    assert writer.result.records_accepted == 4 and len(writer.result) == 3


def test_stream_exit_on_exception_still_delivers(fake):
    with client(fake) as lw:
        with pytest.raises(KeyError):
            with lw.stream("s", flush_interval=0) as writer:
                writer.write({"i": 1})
                raise KeyError("producer bug")
    assert len(fake.service.rows["s"]) == 1


# ---- HTTP query --------------------------------------------------------------


def test_query_returns_arrow(fake):
    with client(fake) as lw:
        lw.write("orders", [{"sku": "a", "n": 1}, {"sku": "b", "n": 2}])
        table = lw.query("rows orders")
        assert isinstance(table, pa.Table) and table.num_rows == 2
        assert table.column("sku").to_pylist() == ["a", "b"]


def test_query_errors_are_typed(fake):
    with client(fake) as lw:
        with pytest.raises(InvalidArgumentError) as info:
            lw.query("error InvalidArgument false")
        assert info.value.message == "injected InvalidArgument" and info.value.http_status == 400
        with pytest.raises(PermissionDeniedError):
            lw.query("error PermissionDenied false")
        with pytest.raises(UnavailableError) as info:
            lw.query("error Unavailable true")  # retried, then raised
        assert info.value.retryable
    with client(fake, api_key="bad") as lw, pytest.raises(AuthenticationError):
        lw.query("rows x")


def test_query_needs_http_url(fake):
    with LakewriterClient(fake.target, api_key=KEY) as lw, pytest.raises(ValueError, match="http_url"):
        lw.query("select 1")


def test_closed_client_refuses_writes(fake):
    lw = client(fake)
    lw.close()
    lw.close()
    with pytest.raises(RuntimeError):
        lw.write("e", [{"a": 1}])
