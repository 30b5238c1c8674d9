"""Credentials from real Python clients: each OTel header form, and junjo's x-junjo-api-key on another tenant."""
import duckdb
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult

import junjo_app


def token(server, key: str) -> str:
    return server.post("/api/v1/otel/token", headers={"X-API-Key": key})["token"]


def export_one(server, headers, name: str) -> SpanExportResult:
    exporter = OTLPSpanExporter(endpoint=server.grpc_endpoint, insecure=True, headers=headers, timeout=10)
    results = []

    class Capture(SimpleSpanProcessor):
        def on_end(self, span):
            results.append(self.span_exporter.export((span,)))

    provider = TracerProvider(resource=Resource.create({"service.name": "auth-py"}))
    provider.add_span_processor(Capture(exporter))
    with provider.get_tracer("t").start_as_current_span(name):
        pass
    provider.shutdown()
    return results[0]


def count(server, tenant: str) -> int:
    files = f"{server.lake}/tenant={tenant}/endpoint=spans/**/*.parquet"
    return duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{files}', hive_partitioning = true)").fetchone()[0]


def test_every_header_form_lands_in_the_keys_tenant(server):
    key = server.create_key("acme")
    forms = [
        (("x-junjo-api-key", key),),
        (("x-api-key", key),),
        (("authorization", f"Bearer {key}"),),
        (("authorization", f"Bearer {token(server, key)}"),),
    ]
    for i, headers in enumerate(forms):
        assert export_one(server, headers, f"form-{i}") == SpanExportResult.SUCCESS, headers[0][0]
    assert export_one(server, (("x-api-key", "lw_wrong"),), "bad") == SpanExportResult.FAILURE
    assert export_one(server, None, "none") == SpanExportResult.FAILURE
    server.flush()
    assert count(server, "acme") == 4
    assert not (server.lake / "tenant=default").exists()  # nothing was written for the admin's tenant


def test_junjo_exporter_with_x_junjo_api_key_on_another_tenant(server):
    key = server.create_key("junjo-team", scopes=("write",))
    junjo_app.run(server.grpc_endpoint, key, "junjo-tenant-app")
    server.flush()
    assert count(server, "junjo-team") == 3
