"""The official OpenTelemetry Python OTLP/gRPC exporter → lakewriter → Parquet → DuckDB."""
import json

import duckdb
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode


from conftest import ADMIN_KEY


class RecordingExporter(SpanExporter):
    """The SDK's exporter, keeping the result of every export (force_flush
    reports only whether the processor finished in time, not whether the
    server took the spans)."""

    def __init__(self, inner: SpanExporter):
        self.inner, self.results = inner, []

    def export(self, spans):
        result = self.inner.export(spans)
        self.results.append(result)
        return result

    def shutdown(self):
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


def export_spans(server, service: str, headers=(("x-api-key", ADMIN_KEY),)) -> dict:
    # timeout: how long the exporter keeps retrying a refusal (backpressure test)
    exporter = RecordingExporter(OTLPSpanExporter(endpoint=server.grpc_endpoint, insecure=True,
                                                  headers=headers, timeout=60))
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter, export_timeout_millis=90_000))
    tracer = provider.get_tracer("pytest-scope", "9.9")
    ids = {}
    with tracer.start_as_current_span("root", kind=SpanKind.SERVER) as root:
        root.set_attribute("http.route", "/x")
        root.set_attribute("numbers", [1, 2, 3])
        ids["trace"] = format(root.get_span_context().trace_id, "032x")
        ids["root"] = format(root.get_span_context().span_id, "016x")
        with tracer.start_as_current_span("child", kind=SpanKind.CLIENT) as child:
            child.add_event("retry", {"attempt": 2})
            child.set_status(Status(StatusCode.ERROR, "upstream failed"))
            ids["child"] = format(child.get_span_context().span_id, "016x")
    assert provider.force_flush(90_000)
    provider.shutdown()
    assert exporter.results and all(r == SpanExportResult.SUCCESS for r in exporter.results), exporter.results
    return ids


def spans_glob(server) -> str:
    return f"{server.lake}/*/endpoint=spans/**/*.parquet"


def test_sdk_exporter_spans_reach_parquet_and_duckdb(server):
    ids = export_spans(server, "py-svc")
    flushed = server.flush()
    assert flushed["rows"] == 2

    con = duckdb.connect()
    rows = con.execute(
        f"""SELECT tenant, endpoint, span_id, parent_span_id, service_name, name, kind,
                   status_code, status_message, scope_name, scope_version, attributes_json,
                   events_json, duration_ns, typeof(start_time)
            FROM read_parquet('{spans_glob(server)}', hive_partitioning = true)
            ORDER BY start_time"""
    ).fetchall()
    assert len(rows) == 2
    root, child = rows
    assert root[0] == "default" and root[1] == "spans"
    assert root[2] == ids["root"] and root[3] is None
    assert child[3] == ids["root"] and child[2] == ids["child"]
    assert root[4] == "py-svc" and root[5] == "root"
    assert root[6] == "SERVER" and child[6] == "CLIENT"
    assert root[7] == "UNSET" and child[7] == "ERROR" and child[8] == "upstream failed"
    assert root[9] == "pytest-scope" and root[10] == "9.9"
    assert json.loads(root[11]) == {"http.route": "/x", "numbers": [1, 2, 3]}
    event = json.loads(child[12])[0]
    assert event["name"] == "retry" and event["attributes"] == {"attempt": 2}
    assert set(event) == {"name", "timeUnixNano", "droppedAttributesCount", "attributes"}
    assert root[13] > 0
    assert root[14].startswith("TIMESTAMP")
    trace = con.execute(
        f"SELECT count(*) FROM read_parquet('{spans_glob(server)}', hive_partitioning = true) WHERE trace_id = ?",
        [ids["trace"]],
    ).fetchone()[0]
    assert trace == 2


def test_spans_survive_restart_and_are_read_once(server, tmp_path):
    export_spans(server, "restart-svc")
    server.stop()  # graceful: flushes memtables
    from conftest import Server

    again = Server(server.data_dir)
    try:
        export_spans(again, "restart-svc")
        again.flush()
        n = duckdb.connect().execute(
            f"SELECT count(*), count(DISTINCT span_id) FROM read_parquet('{spans_glob(again)}', hive_partitioning = true)"
        ).fetchone()
        assert n == (4, 4)
    finally:
        again.stop()
