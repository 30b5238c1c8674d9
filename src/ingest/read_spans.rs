//! `ingestion.InternalIngestionService/ReadSpans` (internal port): the raw
//! spans of the WAL in arrival order, after a cursor.
//!
//! Each span's key is its WAL entry key with the span's position in the
//! request (resource → scope → span order) in the low
//! [`SPAN_INDEX_BITS`](crate::wal::SPAN_INDEX_BITS) bits, so keys strictly
//! increase and a cursor can stop in the middle of a request. Spans the write
//! path rejected (all-zero ids) keep their position but are not sent.
//!
//! Tenancy: with a credential (any header form), only that tenant's spans,
//! and the key needs `read` on `spans`. Without any credential header, every
//! tenant's spans: the internal port is trusted (loopback by default), as for
//! the Junjo backend. A credential header that cannot be used (another scheme
//! than Bearer, empty, not ASCII) is UNAUTHENTICATED, not "no credential".
//!
//! `remaining_count` is the number of spans this response stream still sends
//! after the current one (0 on the last); call again with the last key for more.
//! A cursor below the newest entry deleted by retention gets OUT_OF_RANGE
//! (the spans after it may be gone). A cursor inside the newest deleted entry
//! itself is accepted; the rest of that one entry may be missing.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tonic::{Request, Response, Status};
use ulid::Ulid;

use crate::auth::{Auth, Credential};
use crate::error::{ApiError, ErrorKind};
use crate::ingest::otlp_trace::SPANS;
use crate::proto::ingestion::internal_ingestion_service_server::InternalIngestionService;
use crate::proto::ingestion::{ReadSpansRequest, ReadSpansResponse};
use crate::wal::{PayloadKind, Wal, SPAN_INDEX_MASK};

pub const DEFAULT_BATCH: usize = 1_000;
pub const MAX_BATCH: usize = 50_000;

pub struct ReadSpansService {
    wal: Arc<Wal>,
    auth: Arc<Auth>,
}

impl ReadSpansService {
    pub fn new(wal: Arc<Wal>, auth: Arc<Auth>) -> Self {
        Self { wal, auth }
    }
}

type SpanStream = Pin<Box<dyn Stream<Item = Result<ReadSpansResponse, Status>> + Send>>;

#[tonic::async_trait]
impl InternalIngestionService for ReadSpansService {
    type ReadSpansStream = SpanStream;

    async fn read_spans(
        &self,
        request: Request<ReadSpansRequest>,
    ) -> Result<Response<SpanStream>, Status> {
        let tenant = match Credential::from_grpc(request.metadata()) {
            Some(c) => {
                let p = self.auth.authenticate(Some(c)).await?;
                p.require_endpoint("read", SPANS)?;
                Some(p.tenant)
            }
            None => None,
        };
        let req = request.into_inner();
        let cursor = match req.start_key_ulid.len() {
            0 => None,
            16 => Some(Ulid::from_bytes(
                req.start_key_ulid[..].try_into().expect("16 bytes"),
            )),
            n => {
                return Err(ApiError::invalid(format!(
                    "start_key_ulid must be empty or 16 bytes, got {n}"
                ))
                .into())
            }
        };
        let batch = match req.batch_size as usize {
            0 => DEFAULT_BATCH,
            n => n.min(MAX_BATCH),
        };
        let wal = self.wal.clone();
        let spans =
            tokio::task::spawn_blocking(move || read(&wal, tenant.as_deref(), cursor, batch))
                .await
                .map_err(|e| Status::internal(format!("read task failed: {e}")))??;
        let total = spans.len() as u64;
        let stream = futures::stream::iter(spans.into_iter().enumerate().map(move |(i, mut s)| {
            s.remaining_count = total - 1 - i as u64;
            Ok(s)
        }));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Up to `batch` spans after `cursor`.
pub fn read(
    wal: &Wal,
    tenant: Option<&str>,
    cursor: Option<Ulid>,
    batch: usize,
) -> Result<Vec<ReadSpansResponse>, ApiError> {
    let internal = |e: crate::wal::Error| ApiError::new(ErrorKind::Internal, e.to_string());
    // The entry the cursor is in, and the span positions of it already read.
    let (entry_from, skip_through) = match cursor {
        Some(c) => (
            Some(Ulid(c.0 & !SPAN_INDEX_MASK)),
            Some(c.0 & SPAN_INDEX_MASK),
        ),
        None => (None, None),
    };
    let wanted =
        |kind, t: &str| kind == PayloadKind::OtlpTraces && tenant.is_none_or(|want| want == t);
    // iter_after excludes its bound; start just below the cursor's entry.
    // The iterator (and with it RocksDB's implicit snapshot) is made before
    // the retention marker is read. Retention writes the marker before it
    // deletes, so a deletion made before the iterator shows in the marker
    // read below, and a later one cannot take entries from its snapshot.
    let entries = wal.iter_after_where(entry_from.map(|e| Ulid(e.0.saturating_sub(1))), wanted);
    if let (Some(c), Some(entry)) = (cursor, entry_from) {
        if let Some(deleted) = wal.deleted_through().map_err(internal)? {
            if entry.0 < deleted.0 {
                return Err(ApiError::new(
                    ErrorKind::OutOfRange,
                    format!(
                        "cursor {c} is older than the WAL retention window (entries through {deleted} were deleted); restart from an empty cursor"
                    ),
                ));
            }
        }
    }
    let mut out = Vec::new();
    for item in entries {
        let (key, entry) = item.map_err(internal)?;
        let req = ExportTraceServiceRequest::decode(entry.payload.clone())
            .map_err(|e| ApiError::new(ErrorKind::Internal, format!("WAL entry {key}: {e}")))?;
        let skip = if Some(key) == entry_from {
            skip_through
        } else {
            None
        };
        let mut index: u128 = 0;
        for rs in &req.resource_spans {
            let resource = rs.resource.clone().unwrap_or_default().encode_to_vec();
            for ss in &rs.scope_spans {
                for span in &ss.spans {
                    let i = index;
                    index += 1;
                    if skip.is_some_and(|s| i <= s)
                        || span.trace_id.iter().all(|b| *b == 0)
                        || span.span_id.iter().all(|b| *b == 0)
                    {
                        continue;
                    }
                    out.push(ReadSpansResponse {
                        key_ulid: Ulid(key.0 | i).to_bytes().to_vec(),
                        span_bytes: span.encode_to_vec(),
                        resource_bytes: resource.clone(),
                        remaining_count: 0,
                    });
                    if out.len() == batch {
                        return Ok(out);
                    }
                }
            }
        }
    }
    Ok(out)
}
