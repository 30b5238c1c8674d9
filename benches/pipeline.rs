//! Criterion benchmarks of each write-path stage, with throughput in spans.
//!
//! `cargo bench --bench pipeline` (results in BENCHMARKS.md).

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use lakewriter::config::FlushConfig;
use lakewriter::flush::parquet::{encode, EncodeOptions};
use lakewriter::ingest::otlp_trace::convert;
use lakewriter::loadgen::junjo_request;
use lakewriter::memtable::{Catalog, TableId};
use lakewriter::wal::{PayloadKind, Wal, WalEntry};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use ulid::Ulid;

const SPANS: usize = 500;

fn decode_convert(c: &mut Criterion) {
    let req = junjo_request(1, SPANS, 64);
    let bytes = Bytes::from(req.encode_to_vec());
    let mut g = c.benchmark_group("otlp");
    g.throughput(Throughput::Elements(SPANS as u64));
    g.bench_function("decode_500_spans", |b| {
        b.iter(|| ExportTraceServiceRequest::decode(bytes.clone()).unwrap())
    });
    g.bench_function("convert_500_spans", |b| b.iter(|| convert(&req).unwrap()));
    g.bench_function("encode_500_spans", |b| b.iter(|| req.encode_to_vec()));
    g.finish();
}

fn memtable_insert(c: &mut Criterion) {
    let rows = convert(&junjo_request(1, SPANS, 64)).unwrap();
    let mut g = c.benchmark_group("memtable");
    g.throughput(Throughput::Elements(SPANS as u64));
    g.bench_function("insert_500_spans", |b| {
        let cat = Catalog::new(FlushConfig {
            memtable_budget: u64::MAX,
            ..FlushConfig::default()
        });
        let table = TableId::new("t", "spans");
        let mut seq = 0u128;
        b.iter(|| {
            seq += 1;
            cat.insert(Ulid(seq), vec![(table.clone(), rows.spans.clone())])
        })
    });
    g.finish();
}

fn parquet_encode(c: &mut Criterion) {
    let batches: Vec<_> = (0..40)
        .map(|s| convert(&junjo_request(s + 1, SPANS, 64)).unwrap().spans)
        .collect();
    let opts = EncodeOptions {
        row_group_rows: 65_536,
        zstd_level: 1,
    };
    let mut g = c.benchmark_group("parquet");
    g.sample_size(10);
    g.throughput(Throughput::Elements((40 * SPANS) as u64));
    g.bench_function("encode_20k_spans_zstd1", |b| {
        b.iter(|| encode("spans", &batches, &opts).unwrap())
    });
    g.finish();
}

fn wal_append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Arc::new(Wal::open(dir.path(), 1024).unwrap());
    let payload = Bytes::from(junjo_request(1, SPANS, 64).encode_to_vec());
    let entry = WalEntry {
        kind: PayloadKind::OtlpTraces,
        tenant: "t".into(),
        endpoint: "spans".into(),
        payload,
    };
    let mut g = c.benchmark_group("wal");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1));
    g.bench_function("append_fsync_single_writer", |b| {
        b.iter(|| rt.block_on(wal.append(&entry, |_| {})).unwrap())
    });
    for writers in [8usize, 64] {
        g.throughput(Throughput::Elements(writers as u64));
        g.bench_function(format!("append_fsync_{writers}_concurrent"), |b| {
            b.iter_batched(
                || (),
                |_| {
                    rt.block_on(async {
                        let tasks: Vec<_> = (0..writers)
                            .map(|_| {
                                let (wal, entry) = (wal.clone(), entry.clone());
                                tokio::spawn(
                                    async move { wal.append(&entry, |_| {}).await.unwrap() },
                                )
                            })
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                    })
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    decode_convert,
    memtable_insert,
    parquet_encode,
    wal_append
);
criterion_main!(benches);
