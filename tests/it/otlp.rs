//! All of OTLP: logs and metrics over gRPC, and OTLP/HTTP (protobuf, JSON,
//! gzip) for all three signals, with the bad inputs the spec names.

use std::io::Write;

use arrow::array::{AsArray, ListArray};
use arrow::datatypes::UInt64Type;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValueList};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    exponential_histogram_data_point::Buckets, metric::Data, number_data_point,
    summary_data_point::ValueAtQuantile, ExponentialHistogram, ExponentialHistogramDataPoint,
    Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
    Sum, Summary, SummaryDataPoint,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use serde_json::{json, Value};

use crate::harness::*;

const T0: u64 = 1_763_000_000_000_000_000;

fn resource(service: &str) -> Option<Resource> {
    Some(Resource {
        attributes: vec![kv("service.name", sv(service))],
        ..Default::default()
    })
}

fn log(n: u64, body: AnyValue) -> LogRecord {
    LogRecord {
        time_unix_nano: T0 + n,
        severity_number: 9,
        severity_text: "INFO".into(),
        body: Some(body),
        attributes: vec![kv("n", sv(&n.to_string()))],
        trace_id: vec![7; 16],
        span_id: vec![8; 8],
        ..Default::default()
    }
}

fn logs_request(service: &str, records: Vec<LogRecord>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: resource(service),
            scope_logs: vec![ScopeLogs {
                log_records: records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn metric(name: &str, data: Data) -> Metric {
    Metric {
        name: name.into(),
        description: format!("{name} help"),
        unit: "1".into(),
        data: Some(data),
        ..Default::default()
    }
}

/// One point of every type (plus one invalid gauge point without a time).
fn metrics_request(service: &str) -> ExportMetricsServiceRequest {
    use number_data_point::Value::{AsDouble, AsInt};
    let num = |time, v| NumberDataPoint {
        time_unix_nano: time,
        start_time_unix_nano: T0 - 1_000,
        value: Some(v),
        attributes: vec![kv("host", sv("a"))],
        ..Default::default()
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: resource(service),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![
                    metric(
                        "temp",
                        Data::Gauge(Gauge {
                            data_points: vec![num(T0, AsDouble(21.5)), num(0, AsDouble(1.0))],
                        }),
                    ),
                    metric(
                        "requests",
                        Data::Sum(Sum {
                            data_points: vec![num(T0, AsInt(1 << 60))],
                            aggregation_temporality: 2,
                            is_monotonic: true,
                        }),
                    ),
                    metric(
                        "latency",
                        Data::Histogram(Histogram {
                            data_points: vec![HistogramDataPoint {
                                time_unix_nano: T0,
                                count: 6,
                                sum: Some(42.0),
                                min: Some(0.5),
                                max: Some(20.0),
                                bucket_counts: vec![1, 2, 3],
                                explicit_bounds: vec![1.0, 10.0],
                                ..Default::default()
                            }],
                            aggregation_temporality: 1,
                        }),
                    ),
                    metric(
                        "size",
                        Data::ExponentialHistogram(ExponentialHistogram {
                            data_points: vec![ExponentialHistogramDataPoint {
                                time_unix_nano: T0,
                                count: 9,
                                scale: 3,
                                zero_count: 1,
                                positive: Some(Buckets {
                                    offset: -2,
                                    bucket_counts: vec![3, 5],
                                }),
                                negative: Some(Buckets {
                                    offset: 1,
                                    bucket_counts: vec![0],
                                }),
                                ..Default::default()
                            }],
                            aggregation_temporality: 2,
                        }),
                    ),
                    metric(
                        "rtt",
                        Data::Summary(Summary {
                            data_points: vec![SummaryDataPoint {
                                time_unix_nano: T0,
                                count: 4,
                                sum: 10.0,
                                quantile_values: vec![
                                    ValueAtQuantile {
                                        quantile: 0.5,
                                        value: 2.0,
                                    },
                                    ValueAtQuantile {
                                        quantile: 0.99,
                                        value: 4.5,
                                    },
                                ],
                                ..Default::default()
                            }],
                        }),
                    ),
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

async fn count(server: &Server, table: &str) -> i64 {
    let (st, v) = server
        .sql(ADMIN_KEY, &format!("SELECT count(*) FROM {table}"))
        .await;
    assert_eq!(st, 200, "{v}");
    v["rows"][0][0].as_i64().unwrap()
}

async fn counts(server: &Server) -> Vec<i64> {
    let mut out = Vec::new();
    for t in [
        "spans",
        "logs",
        "metrics_gauge",
        "metrics_sum",
        "metrics_histogram",
        "metrics_exponential_histogram",
        "metrics_summary",
    ] {
        out.push(count(server, t).await);
    }
    out
}

async fn check_metric_rows(server: &Server) {
    let (_, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT metric_name, service_name, value, value_int, aggregation_temporality, is_monotonic, attributes_json \
             FROM metrics_sum",
        )
        .await;
    assert_eq!(
        v["rows"],
        json!([[
            "requests",
            "metrics-svc",
            (1u64 << 60) as f64,
            1u64 << 60,
            "CUMULATIVE",
            true,
            "{\"host\":\"a\"}"
        ]])
    );
    let (_, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT metric_name, value, metric_description FROM metrics_gauge",
        )
        .await;
    assert_eq!(v["rows"], json!([["temp", 21.5, "temp help"]]));
    let (_, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT count, sum, min, max, bucket_counts, explicit_bounds, aggregation_temporality FROM metrics_histogram",
        )
        .await;
    assert_eq!(
        v["rows"],
        json!([[6, 42.0, 0.5, 20.0, [1, 2, 3], [1.0, 10.0], "DELTA"]])
    );
    let (_, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT count, scale, zero_count, positive_offset, positive_bucket_counts, negative_offset, negative_bucket_counts \
             FROM metrics_exponential_histogram",
        )
        .await;
    assert_eq!(v["rows"], json!([[9, 3, 1, -2, [3, 5], 1, [0]]]));
    let (_, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT count, sum, quantiles, quantile_values FROM metrics_summary",
        )
        .await;
    assert_eq!(v["rows"], json!([[4, 10.0, [0.5, 0.99], [2.0, 4.5]]]));
}

#[tokio::test]
async fn logs_and_metrics_over_grpc_every_point_type_through_flush_and_kill9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]).await;
    let cred = Cred("x-api-key", Some(ADMIN_KEY.to_string()));
    let mut logs = LogsServiceClient::with_interceptor(server.channel().await, cred.clone());
    let mut metrics = MetricsServiceClient::with_interceptor(server.channel().await, cred.clone());

    let kv_body = AnyValue {
        value: Some(
            opentelemetry_proto::tonic::common::v1::any_value::Value::KvlistValue(KeyValueList {
                values: vec![kv("user", sv("ann"))],
            }),
        ),
    };
    let resp = logs
        .export(logs_request(
            "logs-svc",
            vec![log(1, sv_any("hello")), log(2, kv_body)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.partial_success.is_none());
    let resp = metrics
        .export(metrics_request("metrics-svc"))
        .await
        .unwrap()
        .into_inner();
    let partial = resp
        .partial_success
        .expect("the gauge point without time is rejected");
    assert_eq!(partial.rejected_data_points, 1);
    assert!(
        partial.error_message.contains("without time_unix_nano"),
        "{}",
        partial.error_message
    );

    // Queryable from the memtables, then from Parquet, with the same answers.
    assert_eq!(counts(&server).await, vec![0, 2, 1, 1, 1, 1, 1]);
    check_metric_rows(&server).await;
    server.flush().await;
    assert_eq!(counts(&server).await, vec![0, 2, 1, 1, 1, 1, 1]);
    check_metric_rows(&server).await;
    let (_, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT service_name, severity_number, severity_text, body, body_json, trace_id, span_id, attributes_json \
             FROM logs ORDER BY timestamp",
        )
        .await;
    let (t, s) = ("07".repeat(16), "08".repeat(8));
    assert_eq!(
        v["rows"],
        json!([
            [
                "logs-svc",
                9,
                "INFO",
                "hello",
                "\"hello\"",
                t,
                s,
                "{\"n\":\"1\"}"
            ],
            [
                "logs-svc",
                9,
                "INFO",
                "{\"user\":\"ann\"}",
                "{\"user\":\"ann\"}",
                t,
                s,
                "{\"n\":\"2\"}"
            ]
        ])
    );

    // The files are where the README says, with list columns intact.
    let hist = read_table(&server.lake(), "default", "metrics_histogram");
    let counts_col = hist[0].column_by_name("bucket_counts").unwrap();
    let counts_col = counts_col.as_any().downcast_ref::<ListArray>().unwrap();
    assert_eq!(
        counts_col
            .value(0)
            .as_primitive::<UInt64Type>()
            .values()
            .to_vec(),
        vec![1, 2, 3]
    );
    assert_eq!(
        strings(&read_table(&server.lake(), "default", "logs"), "body"),
        vec![Some("hello".into()), Some("{\"user\":\"ann\"}".into())]
    );

    // Acked but unflushed logs and metrics survive kill -9 exactly once.
    logs.export(logs_request("logs-svc", vec![log(3, sv_any("after"))]))
        .await
        .unwrap();
    metrics
        .export(metrics_request("metrics-svc"))
        .await
        .unwrap();
    server.kill9();
    server.restart().await;
    assert_eq!(counts(&server).await, vec![0, 3, 2, 2, 2, 2, 2]);
    server.kill9();
    server.restart().await;
    assert_eq!(counts(&server).await, vec![0, 3, 2, 2, 2, 2, 2]);

    // A wrong-length id fails the whole request; nothing is written.
    let cred = Cred("x-api-key", Some(ADMIN_KEY.to_string()));
    let mut logs = LogsServiceClient::with_interceptor(server.channel().await, cred);
    let mut bad = log(4, sv_any("bad"));
    bad.span_id = vec![1; 3];
    let err = logs
        .export(logs_request("logs-svc", vec![log(5, sv_any("ok")), bad]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("span_id is 3 bytes, expected 8"),
        "{}",
        err.message()
    );
    assert_eq!(count(&server, "logs").await, 3);

    // Endpoint allow-lists apply per table: a logs-only key writes no metrics.
    let logs_only = server.new_key("default", &["write"], Some(&["logs"])).await;
    let cred = Cred("x-api-key", Some(logs_only));
    let mut m = MetricsServiceClient::with_interceptor(server.channel().await, cred);
    let err = m.export(metrics_request("x")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(count(&server, "metrics_sum").await, 2);
}

fn sv_any(s: &str) -> AnyValue {
    AnyValue {
        value: Some(
            opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s.into()),
        ),
    }
}

pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `POST path` with a body, content type and optional encoding; status,
/// content type and body.
pub(crate) async fn otlp_post(
    server: &Server,
    path: &str,
    content_type: &str,
    encoding: Option<&str>,
    key: Option<&str>,
    body: Vec<u8>,
) -> (u16, String, Vec<u8>) {
    let mut r = reqwest::Client::new()
        .post(format!("{}{path}", server.http()))
        .header("content-type", content_type)
        .body(body);
    if let Some(e) = encoding {
        r = r.header("content-encoding", e);
    }
    if let Some(k) = key {
        r = r.header("authorization", format!("Bearer {k}"));
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ct, resp.bytes().await.unwrap().to_vec())
}

/// `google.rpc.Status`, as the spec puts it in error bodies.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

const PB: &str = "application/x-protobuf";
const JS: &str = "application/json";

#[tokio::test]
async fn otlp_http_protobuf_json_and_gzip_for_every_signal() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-request-size", "64KiB"]).await;
    let k = Some(ADMIN_KEY);

    // Protobuf, plain and gzip.
    let traces = request("http-svc", vec![span(1, 1, None), span(1, 2, Some(1))]).encode_to_vec();
    let (st, ct, body) = otlp_post(&server, "/v1/traces", PB, None, k, traces.clone()).await;
    assert_eq!(
        (st, ct.as_str()),
        (200, PB),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (st, _, _) = otlp_post(&server, "/v1/traces", PB, Some("gzip"), k, gzip(&traces)).await;
    assert_eq!(st, 200);
    // A gzip body of two members is the two halves together; garbage after
    // a member is refused, not ignored.
    let (head, tail) = traces.split_at(traces.len() / 2);
    let two = [gzip(head), gzip(tail)].concat();
    let (st, _, body) = otlp_post(&server, "/v1/traces", PB, Some("gzip"), k, two).await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    let trailing = [gzip(&traces), b"junk".to_vec()].concat();
    let (st, _, _) = otlp_post(&server, "/v1/traces", PB, Some("gzip"), k, trailing).await;
    assert_eq!(st, 400);
    let logs = logs_request("http-svc", vec![log(1, sv_any("pb"))]).encode_to_vec();
    let (st, _, _) = otlp_post(&server, "/v1/logs", PB, Some("gzip"), k, gzip(&logs)).await;
    assert_eq!(st, 200);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(&logs).unwrap();
    let (st, _, _) = otlp_post(
        &server,
        "/v1/logs",
        PB,
        Some("deflate"),
        k,
        z.finish().unwrap(),
    )
    .await;
    assert_eq!(st, 200);
    let metrics = metrics_request("metrics-svc").encode_to_vec();
    let (st, _, body) = otlp_post(&server, "/v1/metrics", PB, None, k, metrics).await;
    assert_eq!(st, 200);
    let resp =
        opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse::decode(
            &body[..],
        )
        .unwrap();
    assert_eq!(resp.partial_success.unwrap().rejected_data_points, 1);

    // OTLP/JSON: hex ids, camelCase, int64 as strings (and snake_case keys).
    let trace_json = json!({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "json-svc"}}]},
        "scopeSpans": [{"scope": {"name": "s"}, "spans": [{
            "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
            "name": "json-span", "kind": 2,
            "startTimeUnixNano": "1763000000000000000", "endTimeUnixNano": "1763000000500000000",
            "attributes": [{"key": "n", "value": {"intValue": "42"}}],
            "status": {"code": 2, "message": "boom"}
        }]}]
    }]});
    let (st, ct, body) = otlp_post(
        &server,
        "/v1/traces",
        JS,
        None,
        k,
        trace_json.to_string().into_bytes(),
    )
    .await;
    assert_eq!(
        (st, ct.as_str()),
        (200, JS),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let logs_json = json!({"resource_logs": [{"scope_logs": [{"log_records": [{
        "time_unix_nano": "1763000000000000001", "severity_number": 17, "severity_text": "ERROR",
        "body": {"string_value": "snake"}, "trace_id": "5b8efff798038103d269b633813fc60c"
    }]}]}]});
    let (st, _, body) = otlp_post(
        &server,
        "/v1/logs",
        "application/json; charset=utf-8",
        Some("gzip"),
        k,
        gzip(logs_json.to_string().as_bytes()),
    )
    .await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    let metrics_json = json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [{
        "name": "json_gauge", "gauge": {"dataPoints": [{"timeUnixNano": "1763000000000000000", "asInt": "7"}]}
    }]}]}]});
    let (st, _, body) = otlp_post(
        &server,
        "/v1/metrics",
        JS,
        None,
        k,
        metrics_json.to_string().into_bytes(),
    )
    .await;
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));

    let (_, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT service_name, kind, status_code, status_message, attributes_json, duration_ns \
             FROM spans WHERE name = 'json-span'",
        )
        .await;
    assert_eq!(
        v["rows"],
        json!([[
            "json-svc",
            "SERVER",
            "ERROR",
            "boom",
            "{\"n\":42}",
            500_000_000
        ]])
    );
    let (_, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT body, severity_number, trace_id FROM logs WHERE severity_text = 'ERROR'",
        )
        .await;
    assert_eq!(
        v["rows"],
        json!([["snake", 17, "5b8efff798038103d269b633813fc60c"]])
    );
    let (_, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT value, value_int FROM metrics_gauge WHERE metric_name = 'json_gauge'",
        )
        .await;
    assert_eq!(v["rows"], json!([[7.0, 7]]));
    let before = counts(&server).await;
    assert_eq!(before, vec![7, 3, 2, 1, 1, 1, 1]);

    // Bad inputs: precise codes, google.rpc.Status bodies, nothing written.
    let status_of = |body: &[u8]| RpcStatus::decode(body).unwrap();
    let (st, ct, body) =
        otlp_post(&server, "/v1/traces", PB, None, k, vec![0xff, 0xff, 0xff]).await;
    assert_eq!((st, ct.as_str()), (400, PB));
    let s = status_of(&body);
    assert_eq!(s.code, tonic::Code::InvalidArgument as i32);
    assert!(
        s.message.starts_with("malformed protobuf request"),
        "{}",
        s.message
    );

    let (st, ct, body) = otlp_post(
        &server,
        "/v1/logs",
        JS,
        None,
        k,
        b"{\"resourceLogs\": [".to_vec(),
    )
    .await;
    assert_eq!((st, ct.as_str()), (400, JS));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], 3);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .starts_with("malformed JSON request"),
        "{v}"
    );

    let short_id = json!({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "abcd", "spanId": "eee19b7ec3c1b174", "name": "x"}]}]}]});
    let (st, _, body) = otlp_post(
        &server,
        "/v1/traces",
        JS,
        None,
        k,
        short_id.to_string().into_bytes(),
    )
    .await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(st, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("trace_id is 2 bytes, expected 16"),
        "{v}"
    );

    let bad_hex = json!({"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "zz8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174"}]}]}]});
    let (st, _, _) = otlp_post(
        &server,
        "/v1/traces",
        JS,
        None,
        k,
        bad_hex.to_string().into_bytes(),
    )
    .await;
    assert_eq!(st, 400);

    let (st, _, _) = otlp_post(&server, "/v1/logs", "text/plain", None, k, b"hi".to_vec()).await;
    assert_eq!(st, 415);
    let (st, _, _) = otlp_post(&server, "/v1/logs", PB, Some("br"), k, logs.clone()).await;
    assert_eq!(st, 415);
    let (st, _, _) = otlp_post(
        &server,
        "/v1/logs",
        PB,
        Some("gzip"),
        k,
        b"not gzip".to_vec(),
    )
    .await;
    assert_eq!(st, 400);

    // Oversized, plain and as a small gzip that inflates past the limit.
    let big = logs_request("big", vec![log(9, sv_any(&"x".repeat(80 << 10)))]).encode_to_vec();
    let (st, _, body) = otlp_post(&server, "/v1/logs", PB, None, k, big.clone()).await;
    assert_eq!(st, 413);
    assert!(status_of(&body).message.contains("--max-request-size"));
    let bomb = gzip(&big);
    assert!(bomb.len() < 4096);
    let (st, _, _) = otlp_post(&server, "/v1/logs", PB, Some("gzip"), k, bomb).await;
    assert_eq!(st, 413);

    // Credentials.
    let (st, _, _) = otlp_post(&server, "/v1/logs", PB, None, None, logs.clone()).await;
    assert_eq!(st, 401);
    let (st, _, _) = otlp_post(
        &server,
        "/v1/logs",
        PB,
        None,
        Some("lw_wrong"),
        logs.clone(),
    )
    .await;
    assert_eq!(st, 401);
    let spans_only = server
        .new_key("default", &["write"], Some(&["spans"]))
        .await;
    let (st, _, _) = otlp_post(&server, "/v1/logs", PB, None, Some(&spans_only), logs).await;
    assert_eq!(st, 403);

    assert_eq!(
        counts(&server).await,
        before,
        "a rejected request wrote something"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_protobuf_traces_are_replayed_from_the_received_bytes() {
    // OTLP/HTTP protobuf bodies (here one plain, one gzip) are stored in the
    // WAL as received, decompressed; replay after kill -9 must rebuild
    // exactly their spans.
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--flush-age", "1h"]).await;
    let mut expected = std::collections::HashSet::new();
    for (batch, encoding) in [(0u64, None), (1, Some("gzip"))] {
        let spans: Vec<_> = (0..40).map(|i| span(batch, batch * 40 + i, None)).collect();
        expected.extend(spans.iter().map(|s| Some(hex::encode(&s.span_id))));
        let body = request("http-replay", spans).encode_to_vec();
        let body = if encoding.is_some() {
            gzip(&body)
        } else {
            body
        };
        let (st, _, resp) =
            otlp_post(&server, "/v1/traces", PB, encoding, Some(ADMIN_KEY), body).await;
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&resp));
    }
    server.restart().await;
    server.flush().await;
    let ids = strings(&read_table(&server.lake(), "default", "spans"), "span_id");
    assert_eq!(ids.len(), 80, "each span exactly once");
    assert_eq!(
        ids.into_iter().collect::<std::collections::HashSet<_>>(),
        expected
    );
}

/// A resource attribute is stored on every row; a request that would copy
/// one past 256 MiB is refused before the copies are made, for every signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_text_repeated_on_every_row_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let big = kv("blob", sv(&"r".repeat(1 << 20)));
    let needle = "stored on every item";

    // 1 MiB x 300 spans = 300 MiB of copies from a 1 MiB request.
    let mut traces = request("big", (0..300).map(|i| span(1, i, None)).collect());
    let res = traces.resource_spans[0].resource.as_mut().unwrap();
    res.attributes.push(big.clone());
    let mut c = server.trace_client().await;
    let err = c.export(traces.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains(needle), "{}", err.message());

    let cred = Cred("x-api-key", Some(ADMIN_KEY.to_string()));
    let mut logs_client = LogsServiceClient::with_interceptor(server.channel().await, cred);
    let mut logs = logs_request("big", (0..300).map(|i| log(i, sv_any("x"))).collect());
    let res = logs.resource_logs[0].resource.as_mut().unwrap();
    res.attributes.push(big.clone());
    let err = logs_client.export(logs.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains(needle), "{}", err.message());
    assert_eq!(server.metric("lakewriter_wal_appends_total").await, 0.0);

    // Under the bound the same shape is accepted.
    traces.resource_spans[0].scope_spans[0].spans.truncate(20);
    c.export(traces).await.unwrap();
    logs.resource_logs[0].scope_logs[0].log_records.truncate(20);
    logs_client.export(logs).await.unwrap();
    assert_eq!(server.metric("lakewriter_wal_appends_total").await, 2.0);
}
