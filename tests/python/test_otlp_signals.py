"""The official OpenTelemetry Python exporters for traces, logs and metrics, over
OTLP/gRPC and OTLP/HTTP (protobuf, plain and gzip), plus hand-written OTLP/JSON;
DuckDB reads the logs and metrics partitions back."""
import gzip
import json
import logging
import urllib.error
import urllib.request

import duckdb
import pytest
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from conftest import ADMIN_KEY

HEADERS = {"x-api-key": ADMIN_KEY}


def exporters(server, protocol: str):
    """(span, log, metric) exporters for one protocol."""
    if protocol == "grpc":
        kw = dict(endpoint=server.grpc_endpoint, insecure=True, headers=tuple(HEADERS.items()))
        return GrpcSpanExporter(**kw), GrpcLogExporter(**kw), GrpcMetricExporter(**kw)
    compression = Compression.Gzip if protocol == "http-gzip" else Compression.NoCompression
    url = lambda signal: f"{server.http}/v1/{signal}"  # noqa: E731
    return (
        HttpSpanExporter(endpoint=url("traces"), headers=HEADERS, compression=compression),
        HttpLogExporter(endpoint=url("logs"), headers=HEADERS, compression=compression),
        HttpMetricExporter(endpoint=url("metrics"), headers=HEADERS, compression=compression),
    )


def emit_all(server, protocol: str, service: str) -> str:
    span_exp, log_exp, metric_exp = exporters(server, protocol)
    resource = Resource.create({"service.name": service})

    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(span_exp))
    tracer = tracer_provider.get_tracer("signals-test")
    with tracer.start_as_current_span("work") as span:
        trace_id = format(span.get_span_context().trace_id, "032x")

        logger_provider = LoggerProvider(resource=resource)
        logger_provider.add_log_record_processor(SimpleLogRecordProcessor(log_exp))
        logger = logging.getLogger(f"signals.{service}")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.addHandler(LoggingHandler(level=logging.DEBUG, logger_provider=logger_provider))
        logger.warning("disk %s is full", "sda", extra={"user.id": "u1"})
        logger.error("failed")
    assert logger_provider.force_flush(30_000)
    logger_provider.shutdown()
    tracer_provider.shutdown()

    reader = PeriodicExportingMetricReader(metric_exp, export_interval_millis=3_600_000)
    meter_provider = MeterProvider(
        resource=resource,
        metric_readers=[reader],
        views=[View(instrument_name="payload.size", aggregation=ExponentialBucketHistogramAggregation())],
    )
    meter = meter_provider.get_meter("signals-test")
    meter.create_counter("requests").add(3, {"route": "/a"})
    meter.create_up_down_counter("queue.depth").add(-2)
    meter.create_gauge("temperature", unit="Cel").set(21.5)
    latency = meter.create_histogram("latency", unit="ms")
    for v in (1, 7, 120):
        latency.record(v)
    size = meter.create_histogram("payload.size", unit="By")
    for v in (10, 100, 1000, 10000):
        size.record(v)
    meter_provider.shutdown()  # one final collect + export (cumulative points, once)
    return trace_id


def read(server, endpoint: str, sql: str):
    src = f"read_parquet('{server.lake}/*/endpoint={endpoint}/**/*.parquet', hive_partitioning = true)"
    return duckdb.connect().execute(sql.replace("{src}", src)).fetchall()


@pytest.mark.parametrize("protocol", ["grpc", "http", "http-gzip"])
def test_official_exporters_every_signal(server, protocol):
    service = f"svc-{protocol}"
    trace_id = emit_all(server, protocol, service)
    server.flush()

    spans = read(server, "spans", "SELECT service_name, name, trace_id FROM {src}")
    assert spans == [(service, "work", trace_id)]

    logs = read(
        server,
        "logs",
        "SELECT tenant, service_name, severity_number, severity_text, body, trace_id, "
        "json_extract_string(attributes_json, '$.\"user.id\"') FROM {src} ORDER BY timestamp",
    )
    assert [r[:6] for r in logs] == [
        ("default", service, 13, "WARN", "disk sda is full", trace_id),
        ("default", service, 17, "ERROR", "failed", trace_id),
    ]
    assert logs[0][6] == "u1"

    sums = read(
        server,
        "metrics_sum",
        "SELECT metric_name, value, value_int, aggregation_temporality, is_monotonic, attributes_json "
        "FROM {src} ORDER BY metric_name",
    )
    assert sums == [
        ("queue.depth", -2.0, -2, "CUMULATIVE", False, "{}"),
        ("requests", 3.0, 3, "CUMULATIVE", True, '{"route":"/a"}'),
    ]
    gauge = read(server, "metrics_gauge", "SELECT metric_name, metric_unit, value FROM {src}")
    assert gauge == [("temperature", "Cel", 21.5)]
    hist = read(
        server,
        "metrics_histogram",
        "SELECT metric_name, count, sum, min, max, len(bucket_counts), len(explicit_bounds) + 1, "
        "list_sum(bucket_counts) FROM {src}",
    )
    assert hist[0][:5] == ("latency", 3, 128.0, 1.0, 120.0)
    assert hist[0][5] == hist[0][6] and hist[0][7] == 3
    exp = read(
        server,
        "metrics_exponential_histogram",
        "SELECT metric_name, count, sum, scale, list_sum(positive_bucket_counts) + zero_count FROM {src}",
    )
    assert exp[0][:3] == ("payload.size", 4, 11110.0)
    assert exp[0][4] == 4


def post(server, path: str, body: bytes, content_type: str, encoding: str | None = None):
    headers = {"Content-Type": content_type, **HEADERS}
    if encoding:
        headers["Content-Encoding"] = encoding
    req = urllib.request.Request(server.http + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def test_otlp_json_and_bad_bodies(server):
    doc = {
        "resourceLogs": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "json-svc"}}]},
            "scopeLogs": [{"logRecords": [{
                "timeUnixNano": "1763000000000000000",
                "severityNumber": 9,
                "body": {"kvlistValue": {"values": [{"key": "msg", "value": {"stringValue": "hi"}}]}},
                "attributes": [{"key": "count", "value": {"intValue": "5"}}],
                "traceId": "5b8efff798038103d269b633813fc60c",
                "spanId": "eee19b7ec3c1b174",
            }]}],
        }]
    }
    status, ctype, body = post(server, "/v1/logs", gzip.compress(json.dumps(doc).encode()), "application/json", "gzip")
    assert (status, ctype) == (200, "application/json"), body
    metrics = {"resourceMetrics": [{"scopeMetrics": [{"metrics": [{
        "name": "jobs", "sum": {"aggregationTemporality": 1, "isMonotonic": True,
                                "dataPoints": [{"timeUnixNano": "1763000000000000000", "asDouble": 1.5},
                                               {"asDouble": 2.5}]}}]}]}]}
    status, _, body = post(server, "/v1/metrics", json.dumps(metrics).encode(), "application/json")
    assert status == 200
    partial = json.loads(body)["partialSuccess"]
    assert int(partial["rejectedDataPoints"]) == 1 and "time_unix_nano" in partial["errorMessage"]

    status, _, body = post(server, "/v1/logs", b"{not json", "application/json")
    assert status == 400 and json.loads(body)["code"] == 3
    status, _, _ = post(server, "/v1/traces", b"\xff\xff\xff", "application/x-protobuf")
    assert status == 400
    status, _, _ = post(server, "/v1/metrics", b"{}", "text/csv")
    assert status == 415

    server.flush()
    logs = read(server, "logs", "SELECT service_name, body_json, trace_id, span_id, attributes_json FROM {src}")
    assert logs == [("json-svc", '{"msg":"hi"}', "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174", '{"count":5}')]
    sums = read(server, "metrics_sum", "SELECT metric_name, value, aggregation_temporality FROM {src}")
    assert sums == [("jobs", 1.5, "DELTA")]
