"""Memtables over budget: exports are refused with a status that tells OTLP
clients to retry and when (gRPC `RetryInfo`, HTTP `Retry-After`), and the
official exporter, retrying as told, delivers once the server has caught up."""
import json
import urllib.error
import urllib.request

import duckdb
import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from conftest import ADMIN_KEY, Server, block_lake, deliver_after_refusal
from test_otel_exporter import export_spans, spans_glob

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def one_span_request() -> bytes:
    span = trace_pb2.Span(trace_id=bytes(range(1, 17)), span_id=bytes(range(1, 9)), name="refused",
                          start_time_unix_nano=1763000000000000000, end_time_unix_nano=1763000000000001000)
    req = trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[trace_pb2.ResourceSpans(scope_spans=[trace_pb2.ScopeSpans(spans=[span])])])
    return req.SerializeToString()


def retry_delay(status: status_pb2.Status) -> float:
    assert len(status.details) == 1, status
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info), status.details[0].type_url
    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9


def test_refusals_over_budget_say_when_to_retry_and_the_exporter_delivers(tmp_path):
    server = Server(tmp_path / "data", "--memtable-budget", "1KiB")
    blocker = block_lake(server)
    try:
        first = export_spans(server, "first")  # memtables were empty: admitted

        # gRPC: RESOURCE_EXHAUSTED with a RetryInfo in the status details (what
        # the OTLP spec, the Go SDK and the Collector look for) and in the
        # `google.rpc.retryinfo-bin` metadata (what the Python SDK reads).
        with grpc.insecure_channel(server.grpc_endpoint) as channel:
            call = channel.unary_unary(EXPORT, request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
            try:
                call(one_span_request(), metadata=[("x-api-key", ADMIN_KEY)], timeout=30)
                raise AssertionError("an export over the memtable budget was accepted")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                assert "memtable memory budget exhausted" in e.details(), e.details()
                trailers = dict(e.trailing_metadata())
        status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
        assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "memtable memory budget exhausted" in status.message
        assert retry_delay(status) == 1.0
        info = error_details_pb2.RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
        assert info.retry_delay.seconds == 1
        assert trailers["lw-retryable"] == "true"

        # OTLP/HTTP: 429 with Retry-After and the same google.rpc.Status body.
        req = urllib.request.Request(f"{server.http}/v1/traces", data=one_span_request(), method="POST",
                                     headers={"Content-Type": "application/x-protobuf", "X-API-Key": ADMIN_KEY})
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError("an OTLP/HTTP export over the memtable budget was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 429, e
            assert e.headers["Retry-After"] == "1"
            body = status_pb2.Status.FromString(e.read())
            assert body.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert retry_delay(body) == 1.0
        # The same in OTLP/JSON, parsed by protobuf's own JSON parser.
        doc = {"resourceSpans": [{"scopeSpans": [{"spans": [{
            "traceId": "0102030405060708090a0b0c0d0e0f10", "spanId": "0102030405060708", "name": "refused",
            "startTimeUnixNano": "1763000000000000000", "endTimeUnixNano": "1763000000000001000"}]}]}]}
        req = urllib.request.Request(f"{server.http}/v1/traces", data=json.dumps(doc).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "X-API-Key": ADMIN_KEY})
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError("an OTLP/JSON export over the memtable budget was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 429 and e.headers["Retry-After"] == "1", e
            body = json_format.Parse(e.read(), status_pb2.Status())
            assert body.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert retry_delay(body) == 1.0

        # The official exporter is refused, waits the second it was told, and
        # retries; the lake comes back meanwhile, the flush frees the
        # memtable, and the export is acknowledged.
        second = deliver_after_refusal(server, blocker, lambda: export_spans(server, "second"))

        server.flush()
        rows = duckdb.connect().execute(
            f"SELECT service_name, span_id FROM read_parquet('{spans_glob(server)}', hive_partitioning = true)"
        ).fetchall()
        assert sorted(rows) == sorted([("first", first["root"]), ("first", first["child"]),
                                       ("second", second["root"]), ("second", second["child"])]), rows
    finally:
        server.stop()
