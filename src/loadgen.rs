//! `lakewriter loadgen`: drives a real server with OTLP exports or DataRecord
//! batches.
//!
//! `--signal traces` (default): spans look like Junjo's: per trace one
//! `workflow` span and node spans with v2 Junjo attributes, state JSON, and a
//! `set_state` event each. `logs`: log records with a text body, attributes and
//! trace context. `metrics`: points of sums, gauges and 10-bucket histograms.
//! `records-proto` / `records-arrow`: 10-field DataRecords as protobuf or as
//! an Arrow IPC stream (`WriteBatch`, no batch id). `--protocol` picks OTLP/gRPC
//! (default), OTLP/HTTP protobuf (`http`) or OTLP/HTTP JSON (`http-json`).
//!
//! Requests are pre-encoded (a pool of distinct requests, cycled) so the
//! client spends its CPU on sending, not on encoding. Closed loop by default (each
//! worker sends as fast as acks come back); `--rate` makes it open loop, with
//! latency measured from the scheduled send time (no coordinated omission).
//! Open loop also reports how late the load generator's own timer woke for
//! requests whose worker was idle at the scheduled time (tokio's timer ticks
//! in milliseconds, and the client shares the CPU), and the latency without
//! that lateness: it is the client's, not the server's. A request whose
//! worker was still waiting for the previous ack keeps its scheduled start.
//! In closed loop a worker whose request was refused as retryable (overload:
//! `RESOURCE_EXHAUSTED`/`UNAVAILABLE`, HTTP 429/503) backs off before its next
//! request, 20 ms doubling to 1 s, as an OTLP exporter does (with shorter
//! waits); the refusal is counted as an error, never as items.
//!
//! Prints a progress line per second (stderr) and a final report (stdout,
//! `--json` for machine-readable), including the server's group-commit ratio
//! read from `/metrics` when `--metrics-url` is given.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use clap::{Args, ValueEnum};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    any_value::Value, AnyValue, InstrumentationScope, KeyValue,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span::Event, ResourceSpans, ScopeSpans, Span};
use parking_lot::Mutex;
use prost::Message;
use serde::Serialize;
use tonic::codec::{DecodeBuf, EncodeBuf};

use crate::proto::ingestion::write_batch_request::Payload;
use crate::proto::ingestion::{DataRecords, WriteBatchRequest};
use crate::proto::storage::DataRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Signal {
    Traces,
    Logs,
    Metrics,
    RecordsProto,
    RecordsArrow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Grpc,
    Http,
    HttpJson,
}

#[derive(Debug, Clone, Args)]
pub struct LoadgenArgs {
    /// What to send.
    #[arg(long, value_enum, default_value = "traces")]
    pub signal: Signal,
    /// How to send it (DataRecords: grpc only).
    #[arg(long, value_enum, default_value = "grpc")]
    pub protocol: Protocol,
    /// gRPC target.
    #[arg(
        long,
        env = "LAKEWRITER_LOADGEN_TARGET",
        default_value = "http://127.0.0.1:50051"
    )]
    pub target: String,
    /// HTTP target (for `--protocol http`/`http-json`).
    #[arg(long, default_value = "http://127.0.0.1:1323")]
    pub http_target: String,
    /// Concurrent senders (each its own connection).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Items (spans, log records, points, records) per request.
    #[arg(long, alias = "spans-per-request", default_value_t = 500)]
    pub items_per_request: usize,
    /// Extra attribute bytes per item (payload size knob): word-salad text,
    /// about as compressible as prose.
    #[arg(long, default_value_t = 64)]
    pub attr_bytes: usize,
    /// How long to send.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Requests per second over all workers (open loop); 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// API key (gRPC: `x-junjo-api-key`, HTTP: `x-api-key`).
    #[arg(long, env = "LAKEWRITER_API_KEY")]
    pub api_key: Option<String>,
    /// Server metrics URL (e.g. http://127.0.0.1:1323/metrics) for the fsync ratio.
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Stop once this many items were acknowledged (0: run for `--duration`).
    #[arg(long, default_value_t = 0)]
    pub max_items: u64,
    /// Build every request fresh with its own ids (no repeats, for loading a
    /// lake of distinct traces) instead of cycling a pre-encoded pool; costs
    /// client CPU.
    #[arg(long)]
    pub unique: bool,
    /// Print the final report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    items: AtomicU64,
    bytes: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    /// Open loop: latency without the client's timer lateness, and that
    /// lateness (requests whose worker was idle at their scheduled time).
    without_late_us: Mutex<Vec<u32>>,
    late_us: Mutex<Vec<u32>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub signal: Signal,
    pub protocol: Protocol,
    pub seconds: f64,
    pub requests: u64,
    pub items: u64,
    pub items_per_sec: f64,
    pub mb_per_sec: f64,
    /// Ack latency (open loop: from the scheduled send time); serialised
    /// as the top-level `p50_ms` … `max_ms`.
    #[serde(flatten)]
    pub latency: Percentiles,
    /// Open loop: the same percentiles without the client's timer lateness
    /// (from the send when the worker was idle at the scheduled time, else
    /// from the scheduled time).
    pub without_timer_lateness: Option<Percentiles>,
    /// Open loop: how late the client's timer woke, for the requests whose
    /// worker was idle at their scheduled time.
    pub timer_lateness: Option<Percentiles>,
    pub errors: BTreeMap<String, u64>,
    pub wal_fsyncs: Option<f64>,
    pub requests_per_fsync: Option<f64>,
}

fn kv(key: &str, v: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(v) }),
        key_strindex: 0,
    }
}

/// Words for [`note`]: 163 common ones, as in prompts and logs.
const WORDS: &str =
    "the of and to in is that for it as was with be by on not he this are or his from at \
    which but have an had they you were their one all we can her has there been if more \
    when will would who so no model prompt answer question user tool call result agent \
    workflow node state store value update retry error timeout request response token \
    tokens context document search query summary step plan output input message system \
    assistant customer order invoice account payment refund shipping address weather \
    forecast city temperature report table column row latency cache memory disk network \
    service database index please thanks because however therefore first second next \
    finally before after during about between through without large small new old good \
    best other same different each make find give take use check write read send return \
    Paris London Tokyo Berlin Monday Friday January July 2026 42 3.5 100 7 ok yes true \
    false null none json id";

static WORD_LIST: std::sync::LazyLock<Vec<&str>> =
    std::sync::LazyLock::new(|| WORDS.split_ascii_whitespace().collect());

/// `len` bytes of word-salad text, different for every (seed, i): about as
/// compressible as prose (zstd ~3x), where a repeated byte would compress
/// a hundredfold and flatter anything that compresses.
fn note(seed: u64, i: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_add(1);
    let mut out = String::with_capacity(len + 16);
    while out.len() < len {
        // splitmix64, not `rand`'s StdRng: its output may change between
        // rand releases, and the benchmark payload must not.
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(WORD_LIST[(z % WORD_LIST.len() as u64) as usize]);
    }
    out.truncate(len);
    out
}

/// One Export request of `n` Junjo-like spans (traces of 1 workflow + 9 nodes).
pub fn junjo_request(seed: u64, n: usize, attr_bytes: usize) -> ExportTraceServiceRequest {
    let base = 1_763_000_000_000_000_000u64 + seed * 1_000_000;
    let spans = (0..n as u64)
        .map(|i| {
            let trace = seed * 1_000_000 + i / 10;
            let is_wf = i % 10 == 0;
            let mut trace_id = trace.to_be_bytes().to_vec();
            trace_id.extend_from_slice(&(trace ^ 0x5a5a).to_be_bytes());
            let span_id = ((seed << 24) | (i + 1)).to_be_bytes().to_vec();
            let parent = if is_wf {
                vec![]
            } else {
                ((seed << 24) | (i - i % 10 + 1)).to_be_bytes().to_vec()
            };
            let mut attributes = vec![
                kv("junjo.telemetry.contract_version", Value::IntValue(2)),
                kv(
                    "junjo.span_type",
                    Value::StringValue(if is_wf { "workflow" } else { "node" }.into()),
                ),
                kv(
                    "junjo.executable_runtime_id",
                    Value::StringValue(format!("rt{seed}-{i}")),
                ),
                kv("app.note", Value::StringValue(note(seed, i, attr_bytes))),
            ];
            let mut events = vec![];
            if is_wf {
                attributes.push(kv(
                    "junjo.workflow.state.start",
                    Value::StringValue("{\"items\":[1,2,3]}".into()),
                ));
                attributes.push(kv(
                    "junjo.workflow.store.id",
                    Value::StringValue(format!("store{trace}")),
                ));
            } else {
                events.push(Event {
                    name: "set_state".into(),
                    time_unix_nano: base + i * 1000 + 10,
                    attributes: vec![
                        kv(
                            "junjo.store.id",
                            Value::StringValue(format!("store{trace}")),
                        ),
                        kv(
                            "junjo.state_json_patch",
                            Value::StringValue(
                                "[{\"op\":\"replace\",\"path\":\"/count\",\"value\":3}]".into(),
                            ),
                        ),
                    ],
                    dropped_attributes_count: 0,
                });
            }
            Span {
                trace_id,
                span_id,
                parent_span_id: parent,
                name: if is_wf {
                    "Workflow".into()
                } else {
                    format!("Node{}", i % 10)
                },
                kind: 1,
                start_time_unix_nano: base + i * 1000,
                end_time_unix_nano: base + i * 1000 + 900,
                attributes,
                events,
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv(
                    "service.name",
                    Value::StringValue(format!("loadgen-{}", seed % 4)),
                )],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "junjo".into(),
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

#[derive(Clone, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = bytes::Bytes;
    type Decode = ();
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: bytes::Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

/// One request of `n` log records.
pub fn logs_request(seed: u64, n: usize, attr_bytes: usize) -> ExportLogsServiceRequest {
    let base = 1_763_000_000_000_000_000u64 + seed * 1_000_000;
    let log_records = (0..n as u64)
        .map(|i| {
            let trace = seed * 1_000_000 + i / 10;
            let mut trace_id = trace.to_be_bytes().to_vec();
            trace_id.extend_from_slice(&(trace ^ 0x5a5a).to_be_bytes());
            LogRecord {
                time_unix_nano: base + i * 1000,
                observed_time_unix_nano: base + i * 1000 + 50,
                severity_number: [9, 9, 9, 13, 17][(i % 5) as usize],
                severity_text: ["INFO", "INFO", "INFO", "WARN", "ERROR"][(i % 5) as usize].into(),
                body: Some(AnyValue {
                    value: Some(Value::StringValue(format!(
                        "request {i} of batch {seed} handled in {} ms",
                        i % 250
                    ))),
                }),
                attributes: vec![
                    kv("http.route", Value::StringValue(format!("/api/v{}", i % 3))),
                    kv("user.id", Value::IntValue((i % 10_000) as i64)),
                    kv("app.note", Value::StringValue(note(seed, i, attr_bytes))),
                ],
                trace_id,
                span_id: ((seed << 24) | (i + 1)).to_be_bytes().to_vec(),
                ..Default::default()
            }
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(service_resource(seed)),
            scope_logs: vec![ScopeLogs {
                log_records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// One request of `n` metric points: half sums, a quarter gauges, a quarter
/// 10-bucket histograms, in metrics of 10 points (distinct attribute sets).
pub fn metrics_request(seed: u64, n: usize, attr_bytes: usize) -> ExportMetricsServiceRequest {
    let base = 1_763_000_000_000_000_000u64 + seed * 1_000_000;
    let attrs = |i: u64| {
        vec![
            kv("host", Value::StringValue(format!("host-{}", i % 10))),
            kv("app.note", Value::StringValue(note(seed, i, attr_bytes))),
        ]
    };
    let num = |i: u64| NumberDataPoint {
        attributes: attrs(i),
        start_time_unix_nano: base,
        time_unix_nano: base + i * 1000,
        value: Some(number_data_point::Value::AsInt((i * 7) as i64)),
        ..Default::default()
    };
    let metrics = (0..n.div_ceil(10) as u64)
        .map(|m| {
            let points = (m * 10..((m + 1) * 10).min(n as u64)).collect::<Vec<_>>();
            let data = match m % 4 {
                0 | 1 => Data::Sum(Sum {
                    data_points: points.iter().map(|&i| num(i)).collect(),
                    aggregation_temporality: 2,
                    is_monotonic: true,
                }),
                2 => Data::Gauge(Gauge {
                    data_points: points.iter().map(|&i| num(i)).collect(),
                }),
                _ => Data::Histogram(Histogram {
                    data_points: points
                        .iter()
                        .map(|&i| HistogramDataPoint {
                            attributes: attrs(i),
                            start_time_unix_nano: base,
                            time_unix_nano: base + i * 1000,
                            count: 55,
                            sum: Some(i as f64),
                            bucket_counts: (1..=10).collect(),
                            explicit_bounds: (1..10).map(|b| (b * b) as f64).collect(),
                            min: Some(0.5),
                            max: Some(120.0),
                            ..Default::default()
                        })
                        .collect(),
                    aggregation_temporality: 2,
                }),
            };
            Metric {
                name: format!("loadgen.metric.{}", m % 20),
                unit: "1".into(),
                data: Some(data),
                ..Default::default()
            }
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(service_resource(seed)),
            scope_metrics: vec![ScopeMetrics {
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn service_resource(seed: u64) -> Resource {
    Resource {
        attributes: vec![kv(
            "service.name",
            Value::StringValue(format!("loadgen-{}", seed % 4)),
        )],
        ..Default::default()
    }
}

const COUNTRIES: [&str; 4] = ["de", "us", "fr", "jp"];
const MODELS: [&str; 3] = ["gpt", "claude", "llama"];

/// `n` 10-field DataRecords (the shape of `benches/records_*.py`) as protobuf.
pub fn records_proto(seed: u64, n: usize) -> WriteBatchRequest {
    use crate::proto::storage::value::Kind;
    let base = 1_763_000_000_000_000_000i64 + seed as i64 * 1_000_000;
    let v = |k: Kind| crate::proto::storage::Value { kind: Some(k) };
    let records = (0..n as i64)
        .map(|i| DataRecord {
            event_id: format!("e{seed}-{i}"),
            timestamp_unix_nano: base + i,
            version: 1,
            fields: [
                ("user", v(Kind::StringValue((i % 10_000).to_string()))),
                (
                    "country",
                    v(Kind::StringValue(COUNTRIES[(i % 4) as usize].into())),
                ),
                (
                    "model",
                    v(Kind::StringValue(MODELS[(i % 3) as usize].into())),
                ),
                (
                    "status",
                    v(Kind::StringValue(
                        if i % 7 == 0 { "error" } else { "ok" }.into(),
                    )),
                ),
                ("tokens_in", v(Kind::IntValue(i % 4096))),
                ("tokens_out", v(Kind::IntValue((i * 7) % 4096))),
                ("latency_ms", v(Kind::IntValue(i % 10_000))),
                ("cost", v(Kind::DoubleValue(i as f64 / 1e5))),
                ("score", v(Kind::DoubleValue((i % 100) as f64 / 100.0))),
                ("cached", v(Kind::BoolValue(i % 2 == 0))),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        })
        .collect();
    WriteBatchRequest {
        endpoint_id: "loadgen_proto".into(),
        payload: Some(Payload::Records(DataRecords { records })),
        ..Default::default()
    }
}

/// The same records as one Arrow IPC stream.
pub fn records_arrow(seed: u64, n: usize) -> anyhow::Result<WriteBatchRequest> {
    use arrow::array::{
        ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray, TimestampNanosecondArray,
    };
    let base = 1_763_000_000_000_000_000i64 + seed as i64 * 1_000_000;
    let idx: Vec<i64> = (0..n as i64).collect();
    let text = |f: &dyn Fn(i64) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(idx.iter().map(|&i| f(i))))
    };
    let int = |f: &dyn Fn(i64) -> i64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(idx.iter().map(|&i| f(i))))
    };
    let float = |f: &dyn Fn(i64) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(idx.iter().map(|&i| f(i))))
    };
    let batch = arrow::record_batch::RecordBatch::try_from_iter([
        ("event_id", text(&|i| format!("e{seed}-{i}"))),
        (
            "timestamp",
            Arc::new(
                TimestampNanosecondArray::from_iter_values(idx.iter().map(|&i| base + i))
                    .with_timezone("UTC"),
            ) as ArrayRef,
        ),
        ("version", int(&|_| 1)),
        ("user", text(&|i| (i % 10_000).to_string())),
        ("country", text(&|i| COUNTRIES[(i % 4) as usize].into())),
        ("model", text(&|i| MODELS[(i % 3) as usize].into())),
        (
            "status",
            text(&|i| if i % 7 == 0 { "error" } else { "ok" }.into()),
        ),
        ("tokens_in", int(&|i| i % 4096)),
        ("tokens_out", int(&|i| (i * 7) % 4096)),
        ("latency_ms", int(&|i| i % 10_000)),
        ("cost", float(&|i| i as f64 / 1e5)),
        ("score", float(&|i| (i % 100) as f64 / 100.0)),
        (
            "cached",
            Arc::new(BooleanArray::from_iter(
                idx.iter().map(|&i| Some(i % 2 == 0)),
            )) as ArrayRef,
        ),
    ])?;
    let mut w = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &batch.schema())?;
    w.write(&batch)?;
    w.finish()?;
    Ok(WriteBatchRequest {
        endpoint_id: "loadgen_arrow".into(),
        payload: Some(Payload::ArrowIpcStream(w.into_inner()?)),
        ..Default::default()
    })
}

fn otlp_body<M: Message + Serialize>(req: &M, protocol: Protocol) -> anyhow::Result<Bytes> {
    Ok(Bytes::from(match protocol {
        Protocol::HttpJson => serde_json::to_vec(req)?,
        _ => req.encode_to_vec(),
    }))
}

/// One pre-encoded request body.
fn payload(args: &LoadgenArgs, seed: u64) -> anyhow::Result<Bytes> {
    let (n, extra, p) = (args.items_per_request, args.attr_bytes, args.protocol);
    match args.signal {
        Signal::Traces => otlp_body(&junjo_request(seed, n, extra), p),
        Signal::Logs => otlp_body(&logs_request(seed, n, extra), p),
        Signal::Metrics => otlp_body(&metrics_request(seed, n, extra), p),
        Signal::RecordsProto => Ok(Bytes::from(records_proto(seed, n).encode_to_vec())),
        Signal::RecordsArrow => Ok(Bytes::from(records_arrow(seed, n)?.encode_to_vec())),
    }
}

impl Signal {
    fn grpc_path(self) -> &'static str {
        match self {
            Self::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Self::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
            Self::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
            Self::RecordsProto | Self::RecordsArrow => "/ingestion.IngestionService/WriteBatch",
        }
    }

    fn http_path(self) -> Option<&'static str> {
        match self {
            Self::Traces => Some("/v1/traces"),
            Self::Logs => Some("/v1/logs"),
            Self::Metrics => Some("/v1/metrics"),
            Self::RecordsProto | Self::RecordsArrow => None,
        }
    }
}

/// A connection that sends pre-encoded bodies.
enum Sender {
    Grpc(tonic::client::Grpc<tonic::transport::Channel>, &'static str),
    Http(reqwest::Client, String, &'static str),
}

impl Sender {
    async fn connect(args: &LoadgenArgs) -> Result<Self, String> {
        if args.protocol == Protocol::Grpc {
            let channel = tonic::transport::Endpoint::from_shared(args.target.clone())
                .map_err(|e| format!("target: {e}"))?
                .connect()
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
            return Ok(Self::Grpc(grpc, args.signal.grpc_path()));
        }
        let path = args
            .signal
            .http_path()
            .ok_or("DataRecords are sent over gRPC only")?;
        let ct = match args.protocol {
            Protocol::HttpJson => "application/json",
            _ => "application/x-protobuf",
        };
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self::Http(
            client,
            format!("{}{path}", args.http_target.trim_end_matches('/')),
            ct,
        ))
    }

    /// Ok on an ack; Err names the failure class.
    async fn send(&mut self, body: Bytes, key: &Option<String>) -> Result<(), String> {
        match self {
            Self::Grpc(grpc, path) => {
                let mut req = tonic::Request::new(body);
                if let Some(v) = key.as_ref().and_then(|k| k.parse().ok()) {
                    req.metadata_mut().insert("x-junjo-api-key", v);
                }
                grpc.ready().await.map_err(|_| "not ready".to_string())?;
                grpc.unary(req, http::uri::PathAndQuery::from_static(path), Raw)
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("{:?}", s.code()))
            }
            Self::Http(client, url, ct) => {
                let mut req = client
                    .post(url.as_str())
                    .header("content-type", *ct)
                    .body(body);
                if let Some(k) = key {
                    req = req.header("x-api-key", k);
                }
                let resp = req.send().await.map_err(|e| format!("http: {e}"))?;
                let status = resp.status();
                let _ = resp.bytes().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("HTTP {}", status.as_u16()))
                }
            }
        }
    }
}

async fn scrape(url: &Option<String>, name: &str) -> Option<f64> {
    let text = reqwest::get(url.as_ref()?).await.ok()?.text().await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[derive(Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    fn of(mut us: Vec<u32>) -> Option<Self> {
        us.sort_unstable();
        (!us.is_empty()).then(|| Self {
            p50_ms: percentile(&us, 0.50),
            p90_ms: percentile(&us, 0.90),
            p99_ms: percentile(&us, 0.99),
            max_ms: percentile(&us, 1.0),
        })
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms
        )
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

async fn worker(
    args: Arc<LoadgenArgs>,
    pool: Arc<Vec<Bytes>>,
    stats: Arc<Stats>,
    id: usize,
    deadline: Instant,
) {
    let mut sender = match Sender::connect(&args).await {
        Ok(s) => s,
        Err(e) => {
            *stats.errors.lock().entry(e).or_default() += 1;
            return;
        }
    };
    let interval =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(args.concurrency as f64 / args.rate));
    let start = Instant::now()
        + interval
            .map(|i| i.mul_f64(id as f64 / args.concurrency as f64))
            .unwrap_or_default();
    let (mut local, mut without_late_local, mut late_local) =
        (Vec::with_capacity(4096), vec![], vec![]);
    // When the previous request was answered: a request scheduled before
    // that was held back by the server, not by the client's timer.
    let mut idle_since = Instant::now();
    let mut backoff = MIN_BACKOFF;
    let mut k = id;
    let mut sent = 0u32;
    loop {
        let scheduled = match interval {
            Some(iv) => {
                let at = start + iv * sent;
                tokio::time::sleep_until(at.into()).await;
                at
            }
            None => Instant::now(),
        };
        if scheduled >= deadline
            || (args.max_items > 0 && stats.items.load(Ordering::Relaxed) >= args.max_items)
        {
            break;
        }
        sent += 1;
        let body = if args.unique {
            // Seeds above the pool's, distinct across workers and requests.
            let seed = 1_000 + k as u64;
            match payload(&args, seed) {
                Ok(b) => b,
                Err(e) => {
                    *stats.errors.lock().entry(e.to_string()).or_default() += 1;
                    break;
                }
            }
        } else {
            pool[k % pool.len()].clone()
        };
        k += args.concurrency;
        let len = body.len() as u64;
        // Where this request's latency starts if the client's own lateness
        // is left out: its send, unless the server still held the worker at
        // the scheduled time (then the wait is the server's).
        let mut since = scheduled;
        if interval.is_some() && idle_since <= scheduled {
            since = Instant::now();
            late_local.push(micros(since - scheduled));
        }
        let result = sender.send(body, &args.api_key).await;
        idle_since = Instant::now();
        match result {
            Ok(()) => {
                local.push(micros(scheduled.elapsed()));
                if interval.is_some() {
                    without_late_local.push(micros(since.elapsed()));
                }
                stats.ok.fetch_add(1, Ordering::Relaxed);
                stats
                    .items
                    .fetch_add(args.items_per_request as u64, Ordering::Relaxed);
                stats.bytes.fetch_add(len, Ordering::Relaxed);
            }
            Err(e) if e == "not ready" => {
                *stats.errors.lock().entry(e).or_default() += 1;
                break;
            }
            Err(e) => {
                let retryable = matches!(
                    e.as_str(),
                    "ResourceExhausted" | "Unavailable" | "HTTP 429" | "HTTP 503"
                );
                *stats.errors.lock().entry(e).or_default() += 1;
                if retryable && interval.is_none() {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        backoff = MIN_BACKOFF;
    }
    stats.latencies_us.lock().extend(local);
    stats.without_late_us.lock().extend(without_late_local);
    stats.late_us.lock().extend(late_local);
}

/// Closed-loop wait after a retryable refusal, doubling per refusal in a row.
const MIN_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Runs the load and returns the report (also printed).
pub async fn run(args: LoadgenArgs) -> anyhow::Result<Report> {
    let pool_size = (args.concurrency * 4).clamp(16, 256);
    let pool = (0..pool_size as u64)
        .map(|s| payload(&args, s + 1))
        .collect::<anyhow::Result<Vec<Bytes>>>()?;
    let avg = pool.iter().map(|b| b.len()).sum::<usize>() / pool.len();
    eprintln!(
        "loadgen: {:?} over {:?}, {} workers, {} items/request ({} bytes avg), {:?}, {}",
        args.signal,
        args.protocol,
        args.concurrency,
        args.items_per_request,
        avg,
        args.duration,
        if args.rate > 0.0 {
            format!("open loop {} req/s", args.rate)
        } else {
            "closed loop".into()
        }
    );
    let fsyncs_before = scrape(&args.metrics_url, "lakewriter_wal_fsyncs_total").await;
    let appends_before = scrape(&args.metrics_url, "lakewriter_wal_appends_total").await;
    let args = Arc::new(args);
    let (pool, stats) = (Arc::new(pool), Arc::new(Stats::default()));
    let started = Instant::now();
    let deadline = started + args.duration;
    let workers: Vec<_> = (0..args.concurrency)
        .map(|id| {
            tokio::spawn(worker(
                args.clone(),
                pool.clone(),
                stats.clone(),
                id,
                deadline,
            ))
        })
        .collect();
    let progress = {
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let items = stats.items.load(Ordering::Relaxed);
                let errs: u64 = stats.errors.lock().values().sum();
                eprintln!(
                    "  t={:>4.0}s  {:>9} items/s  total {:>10}  errors {}",
                    started.elapsed().as_secs_f64(),
                    items - last,
                    items,
                    errs
                );
                last = items;
            }
        })
    };
    for w in workers {
        let _ = w.await;
    }
    progress.abort();
    let secs = started.elapsed().as_secs_f64();
    let fsyncs_after = scrape(&args.metrics_url, "lakewriter_wal_fsyncs_total").await;
    let appends_after = scrape(&args.metrics_url, "lakewriter_wal_appends_total").await;
    let fsyncs = fsyncs_after.zip(fsyncs_before).map(|(a, b)| a - b);
    let appends = appends_after.zip(appends_before).map(|(a, b)| a - b);
    let items = stats.items.load(Ordering::Relaxed);
    let report = Report {
        signal: args.signal,
        protocol: args.protocol,
        seconds: secs,
        requests: stats.ok.load(Ordering::Relaxed),
        items,
        items_per_sec: items as f64 / secs,
        mb_per_sec: stats.bytes.load(Ordering::Relaxed) as f64 / secs / 1e6,
        latency: Percentiles::of(std::mem::take(&mut *stats.latencies_us.lock()))
            .unwrap_or_default(),
        without_timer_lateness: Percentiles::of(std::mem::take(&mut *stats.without_late_us.lock())),
        timer_lateness: Percentiles::of(std::mem::take(&mut *stats.late_us.lock())),
        errors: stats.errors.lock().clone(),
        wal_fsyncs: fsyncs,
        requests_per_fsync: fsyncs
            .zip(appends)
            .filter(|(f, _)| *f > 0.0)
            .map(|(f, a)| a / f),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{:?} over {:?}: requests {}  items {}  {:.0} items/s  {:.1} MB/s\nack latency ms: {}\nerrors {:?}\nwal fsyncs {:?}  requests/fsync {:?}",
            report.signal, report.protocol, report.requests, report.items, report.items_per_sec, report.mb_per_sec, report.latency, report.errors, report.wal_fsyncs, report.requests_per_fsync.map(|r| (r * 100.0).round() / 100.0)
        );
        if let (Some(sent), Some(late)) = (&report.without_timer_lateness, &report.timer_lateness) {
            println!("ack latency without client timer lateness ms: {sent}\nclient timer lateness ms: {late}");
        }
    }
    Ok(report)
}
