//! DataRecord batches over gRPC: types, Arrow IPC, schema evolution, conflicts,
//! idempotency across kill -9, tenancy, WriteStream.

use std::sync::Arc;

use arrow::array::{
    Array, AsArray, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray, UInt64Array,
};
use arrow::datatypes::{Float64Type, Int64Type, TimestampNanosecondType};
use serde_json::json;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

use lakewriter::proto::ingestion::ingestion_service_client::IngestionServiceClient;
use lakewriter::proto::ingestion::write_batch_request::Payload;
use lakewriter::proto::ingestion::{DataRecords, WriteBatchRequest};
use lakewriter::proto::storage::value::Kind;
use lakewriter::proto::storage::{DataRecord, Value};

use crate::harness::*;

type Client = IngestionServiceClient<InterceptedService<Channel, Cred>>;

async fn client(server: &Server, key: &str) -> Client {
    IngestionServiceClient::with_interceptor(
        server.channel().await,
        Cred("authorization", Some(format!("Bearer {key}"))),
    )
    .max_encoding_message_size(usize::MAX)
}

fn record(id: &str, ts: i64, fields: Vec<(&str, Option<Kind>)>) -> DataRecord {
    DataRecord {
        event_id: id.into(),
        timestamp_unix_nano: ts,
        version: 3,
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value { kind: v }))
            .collect(),
    }
}

fn batch(endpoint: &str, batch_id: &str, records: Vec<DataRecord>) -> WriteBatchRequest {
    WriteBatchRequest {
        endpoint_id: endpoint.into(),
        tenant_id: String::new(),
        batch_id: batch_id.into(),
        payload: Some(Payload::Records(DataRecords { records })),
    }
}

fn ipc(batch: &RecordBatch) -> Vec<u8> {
    let mut buf = Vec::new();
    let batches = std::slice::from_ref(batch);
    lakewriter::query::output::arrow_stream(&batch.schema(), batches, &mut buf).unwrap();
    buf
}

fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(|b| b.num_rows()).sum()
}

const T0: i64 = 1_763_000_000_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_to_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let mut c = client(&server, ADMIN_KEY).await;
    let big = vec![7u8; 900_000];
    let ack = c
        .write_batch(batch(
            "orders",
            "b1",
            vec![
                record(
                    "e1",
                    T0,
                    vec![
                        ("s", Some(Kind::StringValue("héllo ✓".into()))),
                        ("i", Some(Kind::IntValue(i64::MIN))),
                        ("d", Some(Kind::DoubleValue(f64::NAN))),
                        ("b", Some(Kind::BoolValue(true))),
                        ("raw", Some(Kind::BytesValue(big.clone()))),
                        ("at", Some(Kind::TimestampUnixNano(-1))),
                        ("gone", Some(Kind::NullValue(0))),
                    ],
                ),
                record(
                    "e2",
                    T0 + 1,
                    vec![
                        ("s", Some(Kind::StringValue(String::new()))),
                        ("i", Some(Kind::IntValue(i64::MAX))),
                        ("d", Some(Kind::DoubleValue(f64::INFINITY))),
                        ("b", None),
                    ],
                ),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ack.records_accepted, ack.duplicate), (2, false));
    assert_eq!(ack.sequence_token.len(), 16);
    server.flush().await;
    let t = read_table(&server.lake(), "default", "orders");
    assert_eq!(rows(&t), 2);
    let b = &t[0];
    let names: Vec<_> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        [
            "event_id",
            "timestamp",
            "version",
            "at",
            "b",
            "d",
            "i",
            "raw",
            "s"
        ],
        "fields in name order; an all-null field makes no column"
    );
    let col = |n: &str| b.column_by_name(n).unwrap().clone();
    assert_eq!(
        strings(&t, "s"),
        [Some("héllo ✓".into()), Some(String::new())]
    );
    let i = col("i");
    let i = i.as_primitive::<Int64Type>();
    assert_eq!((i.value(0), i.value(1)), (i64::MIN, i64::MAX));
    let d = col("d");
    let d = d.as_primitive::<Float64Type>();
    assert!(d.value(0).is_nan() && d.value(1) == f64::INFINITY);
    assert!(col("b").as_boolean().value(0) && col("b").is_null(1));
    assert_eq!(col("raw").as_binary::<i32>().value(0), &big[..]);
    assert!(col("raw").is_null(1));
    assert_eq!(
        col("at").as_primitive::<TimestampNanosecondType>().value(0),
        -1
    );
    assert_eq!(
        col("timestamp")
            .as_primitive::<TimestampNanosecondType>()
            .value(1),
        T0 + 1
    );
    assert_eq!(col("version").as_primitive::<Int64Type>().value(0), 3);
    let path = parquet_files(&server.lake())[0].display().to_string();
    assert!(
        path.contains("tenant=default/endpoint=orders/date=2025-11-13/hour=02/"),
        "{path}"
    );

    // The SQL endpoint reads the same table, quoted or not.
    let (st, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT event_id, i, s FROM \"orders\" ORDER BY event_id",
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["rows"],
        json!([["e1", i64::MIN, "héllo ✓"], ["e2", i64::MAX, ""]])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrow_ipc_batches_map_types_and_reject_bad_columns() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let mut c = client(&server, ADMIN_KEY).await;
    let n = 10_000;
    let good = RecordBatch::try_from_iter([
        (
            "event_id",
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("ev-{i}")),
            )) as _,
        ),
        (
            "timestamp",
            Arc::new(TimestampMillisecondArray::from_iter_values(
                (0..n).map(|i| 1_763_000_000_000 + i as i64),
            )) as _,
        ),
        ("qty", Arc::new(Int32Array::from_iter_values(0..n)) as _),
        (
            "price",
            Arc::new(Float64Array::from_iter_values(
                (0..n).map(|i| i as f64 / 2.0),
            )) as _,
        ),
        (
            "ok",
            Arc::new(BooleanArray::from_iter((0..n).map(|i| Some(i % 2 == 0)))) as _,
        ),
    ])
    .unwrap();
    let req = |b: &RecordBatch, id: &str| WriteBatchRequest {
        endpoint_id: "ticks".into(),
        tenant_id: "default".into(),
        batch_id: id.into(),
        payload: Some(Payload::ArrowIpcStream(ipc(b))),
    };
    let ack = c.write_batch(req(&good, "a1")).await.unwrap().into_inner();
    assert_eq!(ack.records_accepted, n as u64);
    let (_, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT count(*), sum(qty), max(timestamp), min(version) FROM ticks",
        )
        .await;
    let sum: i64 = (0..n as i64).sum();
    assert_eq!(
        v["rows"],
        json!([[n, sum, "2025-11-13T02:13:29.999000000Z", 0]])
    );
    // qty became int64: a later protobuf batch with qty as double conflicts.
    let err = c
        .write_batch(batch(
            "ticks",
            "",
            vec![record("x", T0, vec![("qty", Some(Kind::DoubleValue(1.0)))])],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "field `qty`: existing type int64, incoming type double"
    );

    let uint_overflow = RecordBatch::try_from_iter([
        ("event_id", Arc::new(StringArray::from(vec!["u"])) as _),
        ("timestamp", Arc::new(Int64Array::from(vec![T0])) as _),
        ("big", Arc::new(UInt64Array::from(vec![u64::MAX])) as _),
    ])
    .unwrap();
    let no_ts =
        RecordBatch::try_from_iter([("event_id", Arc::new(StringArray::from(vec!["u"])) as _)])
            .unwrap();
    let null_id = RecordBatch::try_from_iter([
        (
            "event_id",
            Arc::new(StringArray::from(vec![None::<&str>])) as _,
        ),
        ("timestamp", Arc::new(Int64Array::from(vec![T0])) as _),
    ])
    .unwrap();
    let bad_name = RecordBatch::try_from_iter([
        ("event_id", Arc::new(StringArray::from(vec!["u"])) as _),
        ("timestamp", Arc::new(Int64Array::from(vec![T0])) as _),
        ("Bad Name", Arc::new(Int64Array::from(vec![1])) as _),
    ])
    .unwrap();
    for (b, needle) in [
        (&uint_overflow, "column `big`"),
        (&no_ts, "required column `timestamp` is missing"),
        (&null_id, "column `event_id` has nulls"),
        (&bad_name, "invalid field name \"Bad Name\""),
    ] {
        let err = c.write_batch(req(b, "")).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{needle}");
        assert!(
            err.message().contains(needle),
            "{needle}: {}",
            err.message()
        );
    }
    let mut garbage = req(&good, "");
    garbage.payload = Some(Payload::ArrowIpcStream(b"not arrow".to_vec()));
    let err = c.write_batch(garbage).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("arrow_ipc_stream:"),
        "{}",
        err.message()
    );
    // Nothing of the rejected batches was written, and no column was added.
    let (_, v) = server.sql(ADMIN_KEY, "SELECT count(*) FROM ticks").await;
    assert_eq!(v["rows"], json!([[n]]));
    let (_, v) = server
        .sql(ADMIN_KEY, "SELECT column_name FROM information_schema.columns WHERE table_name = 'ticks' ORDER BY ordinal_position")
        .await;
    assert_eq!(
        v["rows"],
        json!([
            ["event_id"],
            ["timestamp"],
            ["version"],
            ["qty"],
            ["price"],
            ["ok"]
        ])
    );
}

fn ipc_compressed(batch: &RecordBatch, codec: arrow::ipc::CompressionType) -> Vec<u8> {
    let opts = arrow::ipc::writer::IpcWriteOptions::default()
        .try_with_compression(Some(codec))
        .unwrap();
    let mut w =
        arrow::ipc::writer::StreamWriter::try_new_with_options(Vec::new(), &batch.schema(), opts)
            .unwrap();
    w.write(batch).unwrap();
    w.finish().unwrap();
    w.into_inner().unwrap()
}

/// Compressed Arrow IPC is read; a stream whose lengths ask for more than it
/// holds (arrow-ipc allocated them as declared: a 1 TiB body length aborted
/// the process) or decompresses past the bound is refused, and the server
/// goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrow_ipc_compression_is_read_and_bounded() {
    use arrow::array::{DictionaryArray, Int32Array as Keys};
    use arrow::datatypes::Int32Type;
    use arrow::ipc::CompressionType;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let mut c = client(&server, ADMIN_KEY).await;
    let req = |ipc: Vec<u8>, id: &str| WriteBatchRequest {
        endpoint_id: "packed".into(),
        tenant_id: "default".into(),
        batch_id: id.into(),
        payload: Some(Payload::ArrowIpcStream(ipc)),
    };
    let n = 5_000;
    let good = |from: i64| {
        RecordBatch::try_from_iter([
            (
                "event_id",
                Arc::new(StringArray::from_iter_values(
                    (from..from + n).map(|i| format!("ev-{i}")),
                )) as _,
            ),
            (
                "timestamp",
                Arc::new(Int64Array::from_iter_values(from..from + n)) as _,
            ),
            (
                "qty",
                Arc::new(Int64Array::from_iter_values(from..from + n)) as _,
            ),
        ])
        .unwrap()
    };
    for (i, codec) in [CompressionType::ZSTD, CompressionType::LZ4_FRAME]
        .into_iter()
        .enumerate()
    {
        let ipc = ipc_compressed(&good(i as i64 * n), codec);
        let ack = c
            .write_batch(req(ipc, &format!("ok{i}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ack.records_accepted, n as u64, "{codec:?}");
    }

    // 16 M rows of zeros in three columns (320 MiB as Arrow) compress to a
    // few hundred kilobytes and declare their true size.
    let rows = 16 << 20;
    let bomb = RecordBatch::try_from_iter([
        (
            "event_id",
            Arc::new(DictionaryArray::<Int32Type>::new(
                Keys::from(vec![0; rows]),
                Arc::new(StringArray::from(vec!["x"])),
            )) as _,
        ),
        (
            "timestamp",
            Arc::new(Int64Array::from(vec![0i64; rows])) as _,
        ),
        ("qty", Arc::new(Int64Array::from(vec![0i64; rows])) as _),
    ])
    .unwrap();
    let bomb = ipc_compressed(&bomb, CompressionType::ZSTD);
    assert!(bomb.len() < 1 << 20, "{}", bomb.len());
    let err = c.write_batch(req(bomb, "bomb")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with(
            "arrow_ipc_stream: compressed buffers decode to more than 268435456 bytes"
        ),
        "{}",
        err.message()
    );

    // A record batch message whose body length is 1 TiB, in a stream of a
    // few hundred bytes.
    let mut hostile = ipc(&good(0));
    let meta_at = 8 + i32::from_le_bytes(hostile[4..8].try_into().unwrap()) as usize;
    let meta_at = meta_at
        + arrow::ipc::root_as_message(&hostile[8..meta_at])
            .unwrap()
            .bodyLength() as usize
        + 8;
    let meta_len = i32::from_le_bytes(hostile[meta_at - 4..meta_at].try_into().unwrap()) as usize;
    let body_len = arrow::ipc::root_as_message(&hostile[meta_at..meta_at + meta_len])
        .unwrap()
        .bodyLength();
    let at = (meta_at..meta_at + meta_len - 8)
        .find(|&i| i64::from_le_bytes(hostile[i..i + 8].try_into().unwrap()) == body_len)
        .unwrap();
    hostile[at..at + 8].copy_from_slice(&(1i64 << 40).to_le_bytes());
    assert_eq!(
        arrow::ipc::root_as_message(&hostile[meta_at..meta_at + meta_len])
            .unwrap()
            .bodyLength(),
        1 << 40
    );
    let err = c.write_batch(req(hostile, "huge")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("arrow_ipc_stream: message 1: body length 1099511627776 with"),
        "{}",
        err.message()
    );

    // The server is still up, and holds exactly the two good batches.
    let (_, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT count(*), count(DISTINCT event_id), sum(qty) FROM packed",
        )
        .await;
    let sum: i64 = (0..2 * n).sum();
    assert_eq!(v["rows"], json!([[2 * n, 2 * n, sum]]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_evolves_across_restart_and_conflicts_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]).await;
    let mut c = client(&server, ADMIN_KEY).await;
    c.write_batch(batch(
        "ev",
        "1",
        vec![record(
            "a",
            T0,
            vec![("price", Some(Kind::DoubleValue(1.5)))],
        )],
    ))
    .await
    .unwrap();
    server.flush().await;
    server.restart().await;
    let mut c = client(&server, ADMIN_KEY).await;
    c.write_batch(batch(
        "ev",
        "2",
        vec![record(
            "b",
            T0,
            vec![("sku", Some(Kind::StringValue("x".into())))],
        )],
    ))
    .await
    .unwrap();
    let rejected_before = server.metric("lakewriter_ingest_rejected_total").await;
    let err = c
        .write_batch(batch(
            "ev",
            "3",
            vec![
                record("c", T0, vec![("sku", Some(Kind::StringValue("y".into())))]),
                record(
                    "d",
                    T0,
                    vec![("price", Some(Kind::StringValue("cheap".into())))],
                ),
            ],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "field `price`: existing type double, incoming type string"
    );
    assert_eq!(
        server.metric("lakewriter_ingest_rejected_total").await,
        rejected_before + 1.0
    );
    // Unflushed batch "2" survives kill -9; the file of batch "1" lacks `sku`.
    server.restart().await;
    let (_, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT event_id, price, sku FROM ev ORDER BY event_id",
        )
        .await;
    assert_eq!(v["rows"], json!([["a", 1.5, null], ["b", null, "x"]]));
    // The rejected batch id was never recorded: it can be written once fixed.
    let ack = c_fresh(&server)
        .await
        .write_batch(batch(
            "ev",
            "3",
            vec![record(
                "c",
                T0,
                vec![("sku", Some(Kind::StringValue("y".into())))],
            )],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!ack.duplicate);

    // Compaction merges files of different schemas: `price` only, then
    // `sku` only, become one file with both.
    server.flush().await;
    let files = || parquet_files(&server.lake().join("tenant=default/endpoint=ev"));
    assert_eq!(files().len(), 2);
    let all = "SELECT event_id, price, sku FROM ev ORDER BY event_id";
    let done = server.compact().await;
    assert_eq!(done, (200, json!({"merged": 2, "written": 1, "rows": 3})));
    let (_, v) = server.sql(ADMIN_KEY, all).await;
    assert_eq!(
        v["rows"],
        json!([["a", 1.5, null], ["b", null, "x"], ["c", null, "y"]])
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while files().len() > 1 {
        assert!(std::time::Instant::now() < deadline, "inputs never deleted");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let batches = read_table(&server.lake(), "default", "ev");
    assert!(batches[0].schema().index_of("price").is_ok());
    assert!(batches[0].schema().index_of("sku").is_ok());
}

async fn c_fresh(server: &Server) -> Client {
    client(server, ADMIN_KEY).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_ids_are_idempotent_across_kill9_and_concurrent_retries() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]).await;
    let recs = || {
        (0..100)
            .map(|i| record(&format!("r{i}"), T0, vec![]))
            .collect::<Vec<_>>()
    };
    let first = client(&server, ADMIN_KEY)
        .await
        .write_batch(batch("idem", "batch-1", recs()))
        .await
        .unwrap()
        .into_inner();
    server.restart().await; // kill -9: the ack's batch is durable, so is its id
    let again = client(&server, ADMIN_KEY)
        .await
        .write_batch(batch("idem", "batch-1", recs()))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(again.sequence_token, first.sequence_token);
    assert_eq!(again.records_accepted, 100);
    // Eight concurrent sends of one new id: one write, seven duplicates.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = client(&server, ADMIN_KEY).await;
        let req = batch("idem", "batch-2", recs());
        tasks.push(tokio::spawn(async move {
            c.write_batch(req).await.unwrap().into_inner()
        }));
    }
    let mut dups = 0;
    let mut tokens = std::collections::HashSet::new();
    for t in tasks {
        let ack = t.await.unwrap();
        dups += ack.duplicate as usize;
        tokens.insert(ack.sequence_token);
    }
    assert_eq!((dups, tokens.len()), (7, 1));
    // The same id on another endpoint is another batch.
    let other = client(&server, ADMIN_KEY)
        .await
        .write_batch(batch("idem2", "batch-1", recs()))
        .await
        .unwrap()
        .into_inner();
    assert!(!other.duplicate);
    let (_, v) = server.sql(ADMIN_KEY, "SELECT count(*) FROM idem").await;
    assert_eq!(v["rows"], json!([[200]]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenancy_names_and_limits_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-request-size", "64KiB"]).await;
    let acme = server
        .new_key("acme", &["write", "read"], Some(&["sales"]))
        .await;
    let mut c = client(&server, &acme).await;
    let one = || vec![record("a", T0, vec![("v", Some(Kind::IntValue(1)))])];
    c.write_batch(batch("sales", "", one())).await.unwrap();
    let mut wrong_tenant = batch("sales", "", one());
    wrong_tenant.tenant_id = "default".into();
    for (req, code, needle) in [
        (
            wrong_tenant,
            Code::PermissionDenied,
            "does not match the credential's tenant",
        ),
        (
            batch("other", "", one()),
            Code::PermissionDenied,
            "may not access endpoint",
        ),
        (
            batch("../etc", "", one()),
            Code::InvalidArgument,
            "invalid endpoint_id",
        ),
        (
            batch("spans", "", one()),
            Code::InvalidArgument,
            "reserved for telemetry",
        ),
        (
            batch("sales", &"x".repeat(300), one()),
            Code::InvalidArgument,
            "batch_id is 300 bytes",
        ),
        (
            batch("sales", "", vec![]),
            Code::InvalidArgument,
            "no records",
        ),
        (
            batch(
                "sales",
                "",
                vec![record("a", T0, vec![("hour", Some(Kind::IntValue(1)))])],
            ),
            Code::InvalidArgument,
            "reserved",
        ),
    ] {
        let err = c.write_batch(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{needle}: {}", err.message());
        assert!(
            err.message().contains(needle),
            "{needle}: {}",
            err.message()
        );
    }
    let huge = vec![record(
        "a",
        T0,
        vec![("v", Some(Kind::StringValue("x".repeat(100_000))))],
    )];
    let err = c.write_batch(batch("sales", "", huge)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.metadata().get("lw-retryable").is_none(),
        "too large is final"
    );
    let bad = client(&server, "lw_not_a_key")
        .await
        .write_batch(batch("sales", "", one()))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::Unauthenticated);
    // Data lands under tenant=acme only; default sees no `sales` table.
    assert_eq!(
        rows(&read_table_after_flush(&server, "acme", "sales").await),
        1
    );
    let (st, _) = server.sql(ADMIN_KEY, "SELECT * FROM sales").await;
    assert_eq!(st, 400);
}

async fn read_table_after_flush(server: &Server, tenant: &str, endpoint: &str) -> Vec<RecordBatch> {
    server.flush().await;
    read_table(&server.lake(), tenant, endpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_stream_acks_in_order_and_stops_at_the_first_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let mut c = client(&server, ADMIN_KEY).await;
    let reqs: Vec<_> = (0..20)
        .map(|b| {
            let recs = (0..50)
                .map(|i| {
                    record(
                        &format!("{b}-{i}"),
                        T0,
                        vec![("b", Some(Kind::IntValue(b)))],
                    )
                })
                .collect();
            batch("stream", &format!("s{b}"), recs)
        })
        .collect();
    let mut acks = c
        .write_stream(futures::stream::iter(reqs.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut tokens = Vec::new();
    while let Some(ack) = acks.message().await.unwrap() {
        assert_eq!(ack.records_accepted, 50);
        tokens.push(ack.sequence_token);
    }
    assert_eq!(tokens.len(), 20);
    // One WAL entry per batch: twenty distinct tokens (batches of one stream
    // are appended concurrently, so their keys need not follow stream order).
    let distinct: std::collections::HashSet<_> = tokens.iter().collect();
    assert_eq!(distinct.len(), 20);
    // Resending the whole stream: every ack is the original one.
    let mut again = c
        .write_stream(futures::stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut same = Vec::new();
    while let Some(ack) = again.message().await.unwrap() {
        assert!(ack.duplicate);
        same.push(ack.sequence_token);
    }
    assert_eq!(same, tokens);
    // A bad batch ends the stream with its status after the earlier acks.
    let mixed = vec![
        batch(
            "stream",
            "m1",
            vec![record("m1", T0, vec![("b", Some(Kind::IntValue(1)))])],
        ),
        batch(
            "stream",
            "m2",
            vec![record(
                "m2",
                T0,
                vec![("b", Some(Kind::StringValue("x".into())))],
            )],
        ),
    ];
    let mut s = c
        .write_stream(futures::stream::iter(mixed))
        .await
        .unwrap()
        .into_inner();
    assert!(s.message().await.unwrap().is_some());
    let err = s.message().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let (_, v) = server
        .sql(
            ADMIN_KEY,
            "SELECT count(*), count(DISTINCT event_id) FROM stream",
        )
        .await;
    assert_eq!(v["rows"], json!([[1001, 1001]]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_stream_stops_once_its_key_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    // The key itself, and a token issued for it.
    for (tag, use_token) in [("key", false), ("token", true)] {
        let r = server
            .post(
                "/api/v1/apikeys",
                Some(ADMIN_KEY),
                json!({"tenant": "acme", "name": "stream", "scopes": ["write"]}),
            )
            .await;
        assert_eq!(r.status(), 201);
        let created: serde_json::Value = r.json().await.unwrap();
        let key = created["key"].as_str().unwrap();
        let credential = match use_token {
            true => server.token(key).await,
            false => key.to_string(),
        };
        let mut c = client(&server, &credential).await;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let one = |when: &str| {
            let id = format!("{tag}-{when}");
            batch("revoked", &id, vec![record(&id, T0, vec![])])
        };
        tx.send(one("before")).await.unwrap();
        let mut acks = c
            .write_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(acks.message().await.unwrap().unwrap().records_accepted, 1);
        let id = created["id"].as_str().unwrap();
        assert_eq!(server.delete_key(id).await, 204);
        // The same open stream: the next batch is refused, nothing written.
        tx.send(one("after")).await.unwrap();
        let err = acks.message().await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    let reader = server.new_key("acme", &["read"], None).await;
    let (status, v) = server
        .sql(&reader, "SELECT event_id FROM revoked ORDER BY event_id")
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["rows"], json!([["key-before"], ["token-before"]]));
}
