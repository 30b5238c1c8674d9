//! `lakewriter loadgen`: drives a real server with OTLP trace exports.
//!
//! Spans look like Junjo's: per trace one `workflow` span and node spans with
//! v2 Junjo attributes, state JSON, and a `set_state` event each. Requests are
//! pre-encoded (a pool of distinct requests, cycled) so the client spends its
//! CPU on sending, not on protobuf encoding. Closed loop by default (each
//! worker sends as fast as acks come back); `--rate` makes it open loop, with
//! latency measured from the scheduled send time (no coordinated omission).
//!
//! Prints a progress line per second (stderr) and a final report (stdout,
//! `--json` for machine-readable), including the server's group-commit ratio
//! read from `/metrics` when `--metrics-url` is given.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use clap::Args;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    any_value::Value, AnyValue, InstrumentationScope, KeyValue,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span::Event, ResourceSpans, ScopeSpans, Span};
use parking_lot::Mutex;
use prost::Message;
use serde::Serialize;
use tonic::codec::{DecodeBuf, EncodeBuf};

#[derive(Debug, Clone, Args)]
pub struct LoadgenArgs {
    /// gRPC target.
    #[arg(
        long,
        env = "LAKEWRITER_LOADGEN_TARGET",
        default_value = "http://127.0.0.1:50051"
    )]
    pub target: String,
    /// Concurrent exporters (each its own HTTP/2 connection).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Spans per Export request.
    #[arg(long, default_value_t = 500)]
    pub spans_per_request: usize,
    /// Extra attribute bytes per span (payload size knob).
    #[arg(long, default_value_t = 64)]
    pub attr_bytes: usize,
    /// How long to send.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Requests per second over all workers (open loop); 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// API key sent as `x-junjo-api-key`.
    #[arg(long, env = "LAKEWRITER_API_KEY")]
    pub api_key: Option<String>,
    /// Server metrics URL (e.g. http://127.0.0.1:1323/metrics) for the fsync ratio.
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Print the final report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    spans: AtomicU64,
    bytes: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub seconds: f64,
    pub requests: u64,
    pub spans: u64,
    pub spans_per_sec: f64,
    pub mb_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
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

/// One Export request of `n` Junjo-like spans (traces of 1 workflow + 9 nodes).
pub fn junjo_request(seed: u64, n: usize, attr_bytes: usize) -> ExportTraceServiceRequest {
    let filler = "x".repeat(attr_bytes);
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
                kv("app.note", Value::StringValue(filler.clone())),
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

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

async fn scrape(url: &Option<String>, name: &str) -> Option<f64> {
    let text = reqwest::get(url.as_ref()?).await.ok()?.text().await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
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
    pool: Arc<Vec<bytes::Bytes>>,
    stats: Arc<Stats>,
    id: usize,
    deadline: Instant,
) {
    let channel = match tonic::transport::Endpoint::from_shared(args.target.clone()) {
        Ok(e) => match e.connect().await {
            Ok(c) => c,
            Err(e) => {
                *stats
                    .errors
                    .lock()
                    .entry(format!("connect: {e}"))
                    .or_default() += 1;
                return;
            }
        },
        Err(e) => {
            *stats
                .errors
                .lock()
                .entry(format!("target: {e}"))
                .or_default() += 1;
            return;
        }
    };
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    let interval =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(args.concurrency as f64 / args.rate));
    let start = Instant::now()
        + interval
            .map(|i| i.mul_f64(id as f64 / args.concurrency as f64))
            .unwrap_or_default();
    let mut local = Vec::with_capacity(4096);
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
        if scheduled >= deadline {
            break;
        }
        sent += 1;
        let body = pool[k % pool.len()].clone();
        k += args.concurrency;
        let mut req = tonic::Request::new(body.clone());
        if let Some(key) = &args.api_key {
            if let Ok(v) = key.parse() {
                req.metadata_mut().insert("x-junjo-api-key", v);
            }
        }
        if grpc.ready().await.is_err() {
            *stats.errors.lock().entry("not ready".into()).or_default() += 1;
            break;
        }
        match grpc
            .unary(req, http::uri::PathAndQuery::from_static(EXPORT_PATH), Raw)
            .await
        {
            Ok(_) => {
                local.push(scheduled.elapsed().as_micros().min(u32::MAX as u128) as u32);
                stats.ok.fetch_add(1, Ordering::Relaxed);
                stats
                    .spans
                    .fetch_add(args.spans_per_request as u64, Ordering::Relaxed);
                stats.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            }
            Err(s) => {
                *stats
                    .errors
                    .lock()
                    .entry(format!("{:?}", s.code()))
                    .or_default() += 1
            }
        }
    }
    stats.latencies_us.lock().extend(local);
}

/// Runs the load and returns the report (also printed).
pub async fn run(args: LoadgenArgs) -> anyhow::Result<Report> {
    let pool_size = (args.concurrency * 4).clamp(16, 256);
    let pool: Vec<bytes::Bytes> = (0..pool_size as u64)
        .map(|s| {
            bytes::Bytes::from(
                junjo_request(s + 1, args.spans_per_request, args.attr_bytes).encode_to_vec(),
            )
        })
        .collect();
    let avg = pool.iter().map(|b| b.len()).sum::<usize>() / pool.len();
    eprintln!(
        "loadgen: {} workers, {} spans/request ({} bytes avg), {:?}, {}",
        args.concurrency,
        args.spans_per_request,
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
                let spans = stats.spans.load(Ordering::Relaxed);
                let errs: u64 = stats.errors.lock().values().sum();
                eprintln!(
                    "  t={:>4.0}s  {:>9} spans/s  total {:>10}  errors {}",
                    started.elapsed().as_secs_f64(),
                    spans - last,
                    spans,
                    errs
                );
                last = spans;
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
    let mut lat = std::mem::take(&mut *stats.latencies_us.lock());
    lat.sort_unstable();
    let fsyncs = fsyncs_after.zip(fsyncs_before).map(|(a, b)| a - b);
    let appends = appends_after.zip(appends_before).map(|(a, b)| a - b);
    let spans = stats.spans.load(Ordering::Relaxed);
    let report = Report {
        seconds: secs,
        requests: stats.ok.load(Ordering::Relaxed),
        spans,
        spans_per_sec: spans as f64 / secs,
        mb_per_sec: stats.bytes.load(Ordering::Relaxed) as f64 / secs / 1e6,
        p50_ms: percentile(&lat, 0.50),
        p90_ms: percentile(&lat, 0.90),
        p99_ms: percentile(&lat, 0.99),
        max_ms: percentile(&lat, 1.0),
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
            "requests {}  spans {}  {:.0} spans/s  {:.1} MB/s\nack latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}\nerrors {:?}\nwal fsyncs {:?}  requests/fsync {:?}",
            report.requests, report.spans, report.spans_per_sec, report.mb_per_sec, report.p50_ms, report.p90_ms,
            report.p99_ms, report.max_ms, report.errors, report.wal_fsyncs, report.requests_per_fsync.map(|r| (r * 100.0).round() / 100.0)
        );
    }
    Ok(report)
}
