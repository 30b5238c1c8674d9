//! Criterion benchmarks of each write-path stage, with throughput in spans or
//! records.
//!
//! `cargo bench --bench pipeline` (results in BENCHMARKS.md).

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use lakewriter::config::FlushConfig;
use lakewriter::flush::parquet::{encode, EncodeOptions};
use lakewriter::ingest::otlp_trace::{convert, convert_message};
use lakewriter::ingest::records::{from_arrow_ipc, from_records};
use lakewriter::loadgen::{junjo_request, records_arrow, records_proto};
use lakewriter::memtable::schema::Registry;
use lakewriter::memtable::{Catalog, TableId};
use lakewriter::proto::ingestion::write_batch_request::Payload;
use lakewriter::proto::ingestion::WriteBatchRequest;
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
    // The ingest path: validate and convert straight from the bytes.
    g.bench_function("convert_500_spans", |b| b.iter(|| convert(&bytes).unwrap()));
    g.bench_function("encode_500_spans", |b| b.iter(|| req.encode_to_vec()));
    g.finish();
}

fn memtable_insert(c: &mut Criterion) {
    let rows = convert_message(&junjo_request(1, SPANS, 64)).unwrap();
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
        .map(|s| {
            convert_message(&junjo_request(s + 1, SPANS, 64))
                .unwrap()
                .spans
        })
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
    // What a request handler pays to encode an entry of 500 spans, stored as
    // is and compressed at the default and a fast level; and what replay pays.
    g.throughput(Throughput::Bytes(entry.payload.len() as u64));
    for level in [0, lakewriter::wal::DEFAULT_ZSTD_LEVEL, -3] {
        g.bench_function(format!("entry_encode_500_spans_zstd{level}"), |b| {
            b.iter(|| entry.encode_with(level))
        });
    }
    let packed = entry.encode_with(lakewriter::wal::DEFAULT_ZSTD_LEVEL);
    g.bench_function("entry_decode_500_spans_zstd1", |b| {
        b.iter(|| WalEntry::decode(&packed).unwrap())
    });
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

const RECORDS_PROTO: usize = 5_000;
const RECORDS_ARROW: usize = 50_000;

/// DataRecords: protobuf decode, conversion to Arrow (schema already known),
/// and Arrow IPC decode + validation, 10-field records as in the load generator.
fn records(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), 8).unwrap();
    let reg = Registry::open(wal.db().clone()).unwrap();
    let proto = Bytes::from(records_proto(1, RECORDS_PROTO).encode_to_vec());
    let decoded = WriteBatchRequest::decode(proto.clone()).unwrap();
    let Some(Payload::Records(recs)) = &decoded.payload else {
        unreachable!()
    };
    let table = TableId::new("t", "bench_proto");
    from_records(&reg, &table, &recs.records).unwrap();
    let mut g = c.benchmark_group("records");
    g.throughput(Throughput::Elements(RECORDS_PROTO as u64));
    g.bench_function("decode_5k_protobuf", |b| {
        b.iter(|| WriteBatchRequest::decode(proto.clone()).unwrap())
    });
    g.bench_function("convert_5k_protobuf", |b| {
        b.iter(|| from_records(&reg, &table, &recs.records).unwrap())
    });
    let arrow = records_arrow(1, RECORDS_ARROW).unwrap();
    let Some(Payload::ArrowIpcStream(ipc)) = &arrow.payload else {
        unreachable!()
    };
    let table = TableId::new("t", "bench_arrow");
    from_arrow_ipc(&reg, &table, ipc).unwrap();
    g.throughput(Throughput::Elements(RECORDS_ARROW as u64));
    g.bench_function("decode_50k_arrow_ipc", |b| {
        b.iter(|| from_arrow_ipc(&reg, &table, ipc).unwrap())
    });
    g.finish();
}

criterion_group!(
    benches,
    decode_convert,
    records,
    memtable_insert,
    parquet_encode,
    wal_append
);
criterion_main!(benches);
