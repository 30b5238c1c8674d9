//! Lake snapshots for outside readers (see [`crate::flush::lease`]):
//! `POST /api/v1/lake/snapshot` lists one table's Parquet files at one
//! instant and keeps them in the lake for a lease; `DELETE
//! /api/v1/lake/snapshot/{id}` ends the lease early. Both need `read` on
//! the table; a tenant sees and releases only its own.

use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{body_bytes, json_body, principal, AppState};
use crate::error::{ApiError, ErrorKind};
use crate::ingest::names;
use crate::memtable::TableId;
use crate::query::output::rfc3339_nanos;

/// Lease of a snapshot that does not ask for one.
const DEFAULT_LEASE_SECS: u64 = 600;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/lake/snapshot", post(snapshot))
        .route("/api/v1/lake/snapshot/{id}", delete(release))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    table: String,
    #[serde(default = "default_lease")]
    lease_seconds: u64,
}

fn default_lease() -> u64 {
    DEFAULT_LEASE_SECS
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn snapshot(
    State(s): State<AppState>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let p = principal(&s.auth, &headers).await?;
    let shape = format!(r#"{{"table": "spans", "lease_seconds": {DEFAULT_LEASE_SECS}}}"#);
    let req: SnapshotRequest = json_body(&body_bytes(raw)?, &shape)?;
    names::validate("table", &req.table)?;
    p.require_endpoint("read", &req.table)?;
    let tables = s.query.tables_for(&p);
    if !tables.contains(&req.table) {
        return Err(ApiError::new(
            ErrorKind::NotFound,
            format!(
                "no table {:?}; this credential reads {}",
                req.table,
                tables.join(", ")
            ),
        ));
    }
    let table = TableId::new(&p.tenant, &req.table);
    let snap = s
        .flusher
        .lake_snapshot(&table, Duration::from_secs(req.lease_seconds))
        .map_err(ApiError::from_err)?;
    let lake = s.flusher.lake();
    let files: Vec<_> = snap
        .files
        .iter()
        .map(|f| {
            json!({
                "location": lake.location(&f.path),
                "path": f.path,
                "date": f.date,
                "hour": f.hour,
                "rows": f.rows,
                "bytes": f.bytes,
                "min_time": rfc3339_nanos(f.min_time_ns),
                "max_time": rfc3339_nanos(f.max_time_ns),
            })
        })
        .collect();
    let (id, expires_at) = match snap.lease {
        Some((id, until)) => (Some(id), Some(rfc3339(until))),
        None => (None, None),
    };
    Ok(Json(json!({
        "table": req.table,
        "tenant": p.tenant,
        "id": id,
        "expires_at": expires_at,
        "files": files,
        "rows": snap.files.iter().map(|f| f.rows).sum::<u64>(),
        "bytes": snap.files.iter().map(|f| f.bytes).sum::<u64>(),
        "unflushed_rows": snap.unflushed_rows,
    })))
}

async fn release(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let p = principal(&s.auth, &headers).await?;
    p.require("read")?;
    let gone = || {
        ApiError::new(
            ErrorKind::NotFound,
            format!("no lease {id:?} of this tenant (never granted, released, or ended)"),
        )
    };
    // Only a credential that may read the table ends its lease.
    let table = s.flusher.lease_table(&p.tenant, &id).ok_or_else(gone)?;
    p.require_endpoint("read", &table)?;
    match s.flusher.release_lease(&p.tenant, &id) {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(gone()),
    }
}
