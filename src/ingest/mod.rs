//! Ingestion: authenticate → validate and convert → WAL append → memtable → ack.
//!
//! Every write path (OTLP traces/logs/metrics over gRPC and HTTP, DataRecords) ends in
//! [`Ingestor::commit`]: the request's rows are converted *before* the append
//! (so invalid input writes nothing), the raw validated payload goes into the
//! WAL, and the rows are inserted into memtables by the WAL writer in key
//! order. `commit` returning Ok is the ack: durable and queryable.
//!
//! [`rows_for_entry`] re-derives the rows of a WAL entry for replay; it must
//! stay deterministic (same entry → same rows).
//!
//! Touch together: `wal::entry::PayloadKind`, `rows_for_entry`, the README
//! tables section.

pub mod batches;
pub mod budget;
pub mod grpc;
pub mod ipc_check;
pub mod json;
pub mod names;
pub mod otlp_grpc;
pub mod otlp_logs;
pub mod otlp_metrics;
pub mod otlp_trace;
pub mod read_spans;
pub mod records;
pub mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceResponse,
};
use prost::Message;
use tokio::sync::Notify;
use ulid::Ulid;

use crate::error::{ApiError, ErrorKind};
use crate::ingest::batches::BatchIndex;
use crate::memtable::schema::Registry;
use crate::memtable::{Catalog, TableId};
use crate::metrics::METRICS;
use crate::proto::ingestion::write_batch_request::Payload;
use crate::proto::ingestion::{WriteBatchRequest, WriteBatchResponse};
use crate::wal::{Mark, PayloadKind, Wal, WalEntry};

/// Requests with more items (log records, points) than this are converted on
/// the blocking pool.
const INLINE_CONVERT_ITEMS: usize = 2_000;

/// Trace exports larger than this (about 2,000 spans) are converted on the
/// blocking pool.
const INLINE_CONVERT_BYTES: usize = 768 << 10;

/// Converts `req` inline when it is small, else on the blocking pool; gives
/// the request back with the result.
async fn convert_sized<R, T>(req: R, inline: bool, convert: fn(&R) -> T) -> Result<(R, T), ApiError>
where
    R: Send + 'static,
    T: Send + 'static,
{
    if inline {
        let out = convert(&req);
        return Ok((req, out));
    }
    tokio::task::spawn_blocking(move || {
        let out = convert(&req);
        (req, out)
    })
    .await
    .map_err(|e| ApiError::new(ErrorKind::Internal, format!("conversion task failed: {e}")))
}

pub struct Ingestor {
    wal: Arc<Wal>,
    catalog: Arc<Catalog>,
    schemas: Arc<Registry>,
    batches: BatchIndex,
    wake_flusher: Arc<Notify>,
}

impl Ingestor {
    pub fn new(
        wal: Arc<Wal>,
        catalog: Arc<Catalog>,
        schemas: Arc<Registry>,
        idempotency_window: Duration,
        wake_flusher: Arc<Notify>,
    ) -> Self {
        let batches = BatchIndex::new(wal.db().clone(), idempotency_window);
        Self {
            wal,
            catalog,
            schemas,
            batches,
            wake_flusher,
        }
    }

    /// Deletes idempotency rows older than the window.
    pub fn prune_batches(&self) -> Result<usize, rocksdb::Error> {
        self.batches.prune()
    }

    /// Refuses a write before any conversion work while memtables are over
    /// budget (checked again at commit).
    pub fn admit(&self) -> Result<(), ApiError> {
        self.catalog.admit().map_err(|e| {
            METRICS.ingest_rejected.inc();
            ApiError::from_err(e)
        })
    }

    /// Appends one request to the WAL and its rows to memtables; Ok is the ack.
    pub async fn commit(
        &self,
        entry: WalEntry,
        rows: Vec<(TableId, RecordBatch)>,
    ) -> Result<Ulid, ApiError> {
        self.commit_marked(entry, None, rows).await
    }

    async fn commit_marked(
        &self,
        entry: WalEntry,
        mark: Option<Mark>,
        rows: Vec<(TableId, RecordBatch)>,
    ) -> Result<Ulid, ApiError> {
        let started = Instant::now();
        if let Err(e) = self.catalog.admit() {
            METRICS.ingest_rejected.inc();
            return Err(ApiError::from_err(e));
        }
        let n: usize = rows.iter().map(|(_, b)| b.num_rows()).sum();
        let (catalog, wake) = (self.catalog.clone(), self.wake_flusher.clone());
        let seq = self
            .wal
            .append_marked(&entry, mark, move |seq| {
                if catalog.insert(seq, rows) {
                    wake.notify_one();
                }
            })
            .await
            .map_err(ApiError::from_err)?;
        METRICS.ingest_requests.inc();
        METRICS.ingest_rows.add(n as u64);
        METRICS.ingest_latency.observe_duration(started.elapsed());
        Ok(seq)
    }

    /// Validates, converts and commits an OTLP trace export for `tenant`:
    /// the protobuf bytes of an `ExportTraceServiceRequest`, converted
    /// without decoding them into owned messages, and kept as the WAL entry.
    #[tracing::instrument(skip_all, fields(tenant))]
    pub async fn write_traces(
        &self,
        tenant: &str,
        protobuf: Bytes,
    ) -> Result<ExportTraceServiceResponse, ApiError> {
        self.admit()?;
        let inline = protobuf.len() <= INLINE_CONVERT_BYTES;
        let (protobuf, converted) =
            convert_sized(protobuf, inline, |b: &Bytes| otlp_trace::convert(b)).await?;
        let rows = converted.map_err(|e| {
            METRICS.ingest_rejected.inc();
            ApiError::invalid(e.to_string())
        })?;
        if rows.seen as u128 > crate::wal::SPAN_INDEX_MASK {
            METRICS.ingest_rejected.inc();
            return Err(ApiError::invalid(format!(
                "{} spans in one request; at most {} are accepted, split the export",
                rows.seen,
                crate::wal::SPAN_INDEX_MASK
            )));
        }
        let partial_success = rows
            .reject_reason
            .clone()
            .map(|msg| ExportTracePartialSuccess {
                rejected_spans: rows.rejected as i64,
                error_message: msg,
            });
        if rows.spans.num_rows() > 0 {
            let entry = WalEntry {
                kind: PayloadKind::OtlpTraces,
                tenant: tenant.to_string(),
                endpoint: otlp_trace::SPANS.to_string(),
                payload: protobuf,
            };
            self.commit(entry, trace_tables(tenant, rows)).await?;
        }
        Ok(ExportTraceServiceResponse { partial_success })
    }

    /// Validates, converts and commits an OTLP logs export for `tenant`.
    pub async fn write_logs(
        &self,
        tenant: &str,
        mut req: ExportLogsServiceRequest,
    ) -> Result<ExportLogsServiceResponse, ApiError> {
        self.admit()?;
        let n = otlp_logs::count(&req);
        if n == 0 {
            return Ok(ExportLogsServiceResponse::default());
        }
        otlp_logs::stamp_observed(&mut req, now_ns());
        let (req, converted) =
            convert_sized(req, n <= INLINE_CONVERT_ITEMS, otlp_logs::convert).await?;
        let rows = converted.map_err(|e| {
            METRICS.ingest_rejected.inc();
            ApiError::invalid(e.to_string())
        })?;
        let entry = WalEntry {
            kind: PayloadKind::OtlpLogs,
            tenant: tenant.to_string(),
            endpoint: otlp_logs::LOGS.to_string(),
            payload: Bytes::from(req.encode_to_vec()),
        };
        self.commit(entry, vec![(TableId::new(tenant, otlp_logs::LOGS), rows)])
            .await?;
        Ok(ExportLogsServiceResponse {
            partial_success: None,
        })
    }

    /// Validates, converts and commits an OTLP metrics export; `allowed`
    /// checks that the caller may write each table the points land in.
    pub async fn write_metrics(
        &self,
        tenant: &str,
        req: ExportMetricsServiceRequest,
        allowed: impl Fn(&str) -> Result<(), ApiError>,
    ) -> Result<ExportMetricsServiceResponse, ApiError> {
        self.admit()?;
        let n = otlp_metrics::count(&req);
        let (req, converted) =
            convert_sized(req, n <= INLINE_CONVERT_ITEMS, otlp_metrics::convert).await?;
        let rows = converted.map_err(|e| {
            METRICS.ingest_rejected.inc();
            ApiError::invalid(e.to_string())
        })?;
        for (table, _) in &rows.tables {
            allowed(table)?;
        }
        let partial_success = rows
            .reject_reason
            .clone()
            .map(|msg| ExportMetricsPartialSuccess {
                rejected_data_points: rows.rejected as i64,
                error_message: msg,
            });
        if rows.points > 0 {
            let entry = WalEntry {
                kind: PayloadKind::OtlpMetrics,
                tenant: tenant.to_string(),
                endpoint: otlp_metrics::METRICS.to_string(),
                payload: Bytes::from(req.encode_to_vec()),
            };
            self.commit(entry, metric_tables(tenant, rows)).await?;
        }
        Ok(ExportMetricsServiceResponse { partial_success })
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn metric_tables(tenant: &str, rows: otlp_metrics::MetricRows) -> Vec<(TableId, RecordBatch)> {
    rows.tables
        .into_iter()
        .map(|(name, batch)| (TableId::new(tenant, name), batch))
        .collect()
}

impl Ingestor {
    /// Validates, converts and commits a DataRecord batch for `tenant`
    /// (names and the tenant/endpoint permission are checked by the caller).
    /// A known `batch_id` returns the original ack with `duplicate = true`.
    pub async fn write_records(
        self: &Arc<Self>,
        tenant: &str,
        req: WriteBatchRequest,
    ) -> Result<WriteBatchResponse, ApiError> {
        // On a task of its own, so a caller that goes away (deadline, reset)
        // cannot drop the batch-id claim while the WAL writer still holds
        // the entry: a retry would then miss the not yet written mark and
        // write the batch twice.
        let (this, tenant) = (self.clone(), tenant.to_string());
        tokio::spawn(async move { this.write_records_owned(&tenant, req).await })
            .await
            .map_err(|e| ApiError::new(ErrorKind::Internal, format!("write task failed: {e}")))?
    }

    async fn write_records_owned(
        self: &Arc<Self>,
        tenant: &str,
        req: WriteBatchRequest,
    ) -> Result<WriteBatchResponse, ApiError> {
        if req.batch_id.len() > batches::MAX_BATCH_ID_BYTES {
            return Err(ApiError::invalid(format!(
                "batch_id is {} bytes; at most {} are allowed",
                req.batch_id.len(),
                batches::MAX_BATCH_ID_BYTES
            )));
        }
        let table = TableId::new(tenant, &req.endpoint_id);
        let claim = if req.batch_id.is_empty() {
            None
        } else {
            Some(
                self.batches
                    .claim(tenant, &req.endpoint_id, &req.batch_id)
                    .await,
            )
        };
        if let Some(c) = &claim {
            let known = self
                .batches
                .lookup(c)
                .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
            if let Some(ack) = known {
                METRICS.duplicate_batches.inc();
                return Ok(WriteBatchResponse {
                    records_accepted: ack.records,
                    duplicate: true,
                    sequence_token: ack.seq.to_bytes().to_vec(),
                });
            }
        }
        // After the duplicate check: a retried, already durable batch gets its
        // ack even while memtables are full.
        self.admit()?;
        let (req, converted) = {
            let this = self.clone();
            let table = table.clone();
            tokio::task::spawn_blocking(move || {
                let rows = record_rows(&this.schemas, &table, &req);
                (req, rows)
            })
            .await
            .map_err(|e| {
                ApiError::new(ErrorKind::Internal, format!("conversion task failed: {e}"))
            })?
        };
        let batch = converted.map_err(|e| {
            METRICS.ingest_rejected.inc();
            ApiError::from_err(e)
        })?;
        let records = batch.num_rows() as u64;
        let entry = WalEntry {
            kind: PayloadKind::DataRecordBatch,
            tenant: tenant.to_string(),
            endpoint: req.endpoint_id.clone(),
            payload: Bytes::from(req.encode_to_vec()),
        };
        let mark = claim.as_ref().map(|c| c.mark(records));
        let seq = self
            .commit_marked(entry, mark, vec![(table, batch)])
            .await?;
        Ok(WriteBatchResponse {
            records_accepted: records,
            duplicate: false,
            sequence_token: seq.to_bytes().to_vec(),
        })
    }
}

/// The rows of a DataRecord request (evolving the table's schema).
fn record_rows(
    schemas: &Registry,
    table: &TableId,
    req: &WriteBatchRequest,
) -> Result<RecordBatch, records::Error> {
    match &req.payload {
        Some(Payload::Records(r)) => records::from_records(schemas, table, &r.records),
        Some(Payload::ArrowIpcStream(ipc)) => records::from_arrow_ipc(schemas, table, ipc),
        None => Err(records::Error::Empty),
    }
}

fn trace_tables(tenant: &str, rows: otlp_trace::TraceRows) -> Vec<(TableId, RecordBatch)> {
    vec![
        (TableId::new(tenant, otlp_trace::SPANS), rows.spans),
        (
            TableId::new(tenant, otlp_trace::STATE_PATCHES),
            rows.state_patches,
        ),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("payload does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("payload does not convert: {0}")]
    Convert(#[from] otlp_trace::Error),
    #[error("records do not convert: {0}")]
    Records(#[from] records::Error),
}

/// The rows a WAL entry produced when it was accepted (for replay).
pub fn rows_for_entry(
    entry: &WalEntry,
    schemas: &Registry,
) -> Result<Vec<(TableId, RecordBatch)>, ReplayError> {
    match entry.kind {
        PayloadKind::OtlpTraces => Ok(trace_tables(
            &entry.tenant,
            otlp_trace::convert(&entry.payload)?,
        )),
        PayloadKind::OtlpLogs => {
            let req = ExportLogsServiceRequest::decode(entry.payload.clone())?;
            let table = TableId::new(&entry.tenant, otlp_logs::LOGS);
            Ok(vec![(table, otlp_logs::convert(&req)?)])
        }
        PayloadKind::OtlpMetrics => {
            let req = ExportMetricsServiceRequest::decode(entry.payload.clone())?;
            Ok(metric_tables(&entry.tenant, otlp_metrics::convert(&req)?))
        }
        PayloadKind::DataRecordBatch => {
            let req = WriteBatchRequest::decode(entry.payload.clone())?;
            let table = TableId::new(&entry.tenant, &entry.endpoint);
            let rows = record_rows(schemas, &table, &req)?;
            Ok(vec![(table, rows)])
        }
    }
}
