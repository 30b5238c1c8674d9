//! Ingestion: authenticate → validate and convert → WAL append → memtable → ack.
//!
//! Every write path (OTLP gRPC, later OTLP/HTTP and DataRecords) ends in
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

pub mod grpc;
pub mod json;
pub mod names;
pub mod otlp_trace;
pub mod read_spans;

use std::sync::Arc;
use std::time::Instant;

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tokio::sync::Notify;
use ulid::Ulid;

use crate::error::{ApiError, ErrorKind};
use crate::memtable::{Catalog, TableId};
use crate::metrics::METRICS;
use crate::wal::{PayloadKind, Wal, WalEntry};

/// Requests with more spans than this are converted on the blocking pool.
const INLINE_CONVERT_SPANS: usize = 2_000;

pub struct Ingestor {
    wal: Arc<Wal>,
    catalog: Arc<Catalog>,
    wake_flusher: Arc<Notify>,
}

impl Ingestor {
    pub fn new(wal: Arc<Wal>, catalog: Arc<Catalog>, wake_flusher: Arc<Notify>) -> Self {
        Self {
            wal,
            catalog,
            wake_flusher,
        }
    }

    /// Appends one request to the WAL and its rows to memtables; Ok is the ack.
    pub async fn commit(
        &self,
        entry: WalEntry,
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
            .append(&entry, move |seq| {
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

    /// Validates, converts and commits an OTLP trace export for `tenant`.
    #[tracing::instrument(skip_all, fields(tenant))]
    pub async fn write_traces(
        &self,
        tenant: &str,
        req: ExportTraceServiceRequest,
    ) -> Result<ExportTraceServiceResponse, ApiError> {
        let span_count: usize = req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        if span_count as u128 > crate::wal::SPAN_INDEX_MASK {
            METRICS.ingest_rejected.inc();
            return Err(ApiError::invalid(format!(
                "{span_count} spans in one request; at most {} are accepted, split the export",
                crate::wal::SPAN_INDEX_MASK
            )));
        }
        let (req, converted) = if span_count > INLINE_CONVERT_SPANS {
            tokio::task::spawn_blocking(move || {
                let c = otlp_trace::convert(&req);
                (req, c)
            })
            .await
            .map_err(|e| {
                ApiError::new(ErrorKind::Internal, format!("conversion task failed: {e}"))
            })?
        } else {
            let c = otlp_trace::convert(&req);
            (req, c)
        };
        let rows = converted.map_err(|e| {
            METRICS.ingest_rejected.inc();
            ApiError::invalid(e.to_string())
        })?;
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
                payload: Bytes::from(req.encode_to_vec()),
            };
            self.commit(entry, trace_tables(tenant, rows)).await?;
        }
        Ok(ExportTraceServiceResponse { partial_success })
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
    #[error("payload kind {0:?} is not supported by this version")]
    Unsupported(PayloadKind),
}

/// The rows a WAL entry produced when it was accepted (for replay).
pub fn rows_for_entry(entry: &WalEntry) -> Result<Vec<(TableId, RecordBatch)>, ReplayError> {
    match entry.kind {
        PayloadKind::OtlpTraces => {
            let req = ExportTraceServiceRequest::decode(entry.payload.clone())?;
            Ok(trace_tables(&entry.tenant, otlp_trace::convert(&req)?))
        }
        other => Err(ReplayError::Unsupported(other)),
    }
}
