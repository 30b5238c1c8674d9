//! HTTP API (axum).
//!
//! Open routes: `GET /health`, `GET /metrics`, `GET /.well-known/jwks.json`,
//! `POST /api/v1/otel/token` (takes the API key itself).
//! Admin routes (an `admin`-scope credential): `POST /api/v1/admin/flush`,
//! `POST /api/v1/admin/compact`, `POST /api/v1/admin/retention`,
//! `POST /api/v1/admin/keys/rotate`, and API keys under `/api/v1/apikeys`.
//! Admin keys of tenant `default` are operator keys and manage every tenant's
//! keys; an admin key of another tenant manages only its own tenant's keys.
//!
//! OTLP/HTTP (`/v1/traces`, `/v1/logs`, `/v1/metrics`): see [`otlp`].
//! Reads: SQL and the span endpoints ([`query`]), lake snapshots for
//! outside readers ([`lake`]).
//!
//! Errors are JSON `{"error","code","retryable"}` via [`crate::error::ApiError`].
//! When you add a route: the README API reference and a test in `tests/`.

pub mod lake;
pub mod otlp;
pub mod query;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{Auth, Credential, Principal, DEFAULT_TENANT};
use crate::error::{ApiError, ErrorKind};
use crate::flush::Flusher;
use crate::memtable::Catalog;

#[derive(Clone)]
pub struct AppState {
    pub catalog: Arc<Catalog>,
    pub flusher: Arc<Flusher>,
    pub auth: Arc<Auth>,
    pub query: Arc<crate::query::QueryEngine>,
    pub ingestor: Arc<crate::ingest::Ingestor>,
    pub wal: Arc<crate::wal::Wal>,
    /// Largest accepted ingest body, compressed or not.
    pub max_request_size: usize,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/api/v1/otel/token", post(token))
        .route("/api/v1/admin/flush", post(flush))
        .route("/api/v1/admin/compact", post(compact))
        .route("/api/v1/admin/retention", post(retention))
        .route("/api/v1/admin/keys/rotate", post(rotate))
        .route("/api/v1/apikeys", post(create_key).get(list_keys))
        .route("/api/v1/apikeys/{id}", delete(delete_key))
        .merge(query::routes())
        .merge(lake::routes())
        .merge(otlp::routes())
        .fallback(no_route)
        .with_state(state)
}

/// Unknown paths get the same JSON error body as every other error.
async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(ErrorKind::NotFound, format!("no route {}", uri.path()))
}

/// A request body read as JSON whatever its `Content-Type` says (`curl -d`
/// labels it a form); `shape` tells what was expected when it does not parse.
pub fn json_body<T: serde::de::DeserializeOwned>(raw: &[u8], shape: &str) -> Result<T, ApiError> {
    serde_json::from_slice(raw)
        .map_err(|e| ApiError::invalid(format!("request body: expected {shape}: {e}")))
}

/// The body bytes, or why they could not be read.
pub fn body_bytes(
    raw: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::body::Bytes, ApiError> {
    raw.map_err(|e| ApiError::invalid(format!("request body: {}", e.body_text())))
}

/// The principal behind an HTTP request's headers.
pub async fn principal(auth: &Auth, headers: &HeaderMap) -> Result<Principal, ApiError> {
    auth.authenticate(Credential::from_http(headers)).await
}

async fn admin(s: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let p = principal(&s.auth, headers).await?;
    p.require("admin")?;
    Ok(p)
}

fn may_manage(p: &Principal, tenant: &str) -> Result<(), ApiError> {
    if p.tenant == DEFAULT_TENANT || p.tenant == tenant {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorKind::Forbidden,
        format!(
            "an admin key of tenant {:?} cannot manage tenant {tenant:?}",
            p.tenant
        ),
    ))
}

/// `200` while the server takes writes; `503` while WAL writes fail (a
/// full disk: writes come back by themselves once space is freed), so a
/// load balancer or readiness probe sends writers elsewhere meanwhile.
async fn health(State(s): State<AppState>) -> Response {
    let (rows, bytes) = s.catalog.usage();
    let wal = s.wal.clone();
    // Only a failing WAL is probed, with a small synced write (a blocking
    // RocksDB call): a healthy one answers without leaving the runtime.
    let failing = match wal.write_health().failing() {
        None => None,
        Some(_) => tokio::task::spawn_blocking(move || {
            wal.probe();
            wal.write_health().failing()
        })
        .await
        .unwrap_or(None),
    };
    match failing {
        None => Json(json!({"status": "ok", "memtable_rows": rows, "memtable_bytes": bytes}))
            .into_response(),
        Some((reason, time)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "unavailable",
                "error": reason,
                "failing_for_s": time.as_secs(),
                "memtable_rows": rows,
                "memtable_bytes": bytes,
            })),
        )
            .into_response(),
    }
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
}

async fn jwks(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(s.auth.jwt.jwks())
}

async fn token(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::new(ErrorKind::Unauthenticated, "send the API key in X-API-Key")
        })?;
    let (token, expires_at) = s.auth.issue_token(key)?;
    Ok(Json(json!({"token": token, "expires_at": expires_at})))
}

/// Runs a flusher pass for an admin: scoped to the caller's tenant unless
/// it is the operator (tenant `default`), whose pass covers every tenant;
/// spawned, so a client that goes away does not cancel it halfway.
async fn admin_pass<T, Fut>(
    s: &AppState,
    headers: &HeaderMap,
    pass: impl FnOnce(Arc<Flusher>, Option<String>) -> Fut,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    Fut: std::future::Future<Output = crate::flush::Result<T>> + Send + 'static,
{
    let only = admin_scope(s, headers).await?;
    run_pass(s, only, pass).await
}

/// The tenant an admin's pass is limited to (none: the operator's, all).
async fn admin_scope(s: &AppState, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let p = admin(s, headers).await?;
    Ok((p.tenant != DEFAULT_TENANT).then(|| p.tenant.clone()))
}

/// The second half of [`admin_pass`], for handlers that read a body between.
async fn run_pass<T, Fut>(
    s: &AppState,
    only: Option<String>,
    pass: impl FnOnce(Arc<Flusher>, Option<String>) -> Fut,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    Fut: std::future::Future<Output = crate::flush::Result<T>> + Send + 'static,
{
    tokio::spawn(pass(s.flusher.clone(), only))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
        .map_err(ApiError::from_err)
}

async fn flush(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let files = admin_pass(&s, &headers, |f, only| async move {
        f.flush_tenant(only.as_deref()).await
    })
    .await?;
    let rows: u64 = files.iter().map(|f| f.rows).sum();
    Ok(Json(json!({"files": files, "rows": rows})))
}

async fn compact(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<crate::flush::compact::Compacted>, ApiError> {
    admin_pass(&s, &headers, |f, only| async move {
        f.compact(only.as_deref(), true).await
    })
    .await
    .map(Json)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RetentionRequest {
    #[serde(default)]
    dry_run: bool,
    /// A dry run's retention for every table, e.g. `"30d"`.
    retention: Option<String>,
}

/// Largest body the admin routes read.
const ADMIN_BODY_LIMIT: usize = 64 << 10;

/// A lake retention pass now (the background one runs every minute), or
/// with `{"dry_run": true}` what one would delete.
async fn retention(
    State(s): State<AppState>,
    headers: HeaderMap,
    query: axum::extract::RawQuery,
    body: axum::body::Body,
) -> Result<Json<crate::flush::retention::Expired>, ApiError> {
    let only = admin_scope(&s, &headers).await?;
    // `?dry_run=true` ignored would run a real pass.
    if query.0.is_some_and(|q| !q.is_empty()) {
        return Err(ApiError::invalid(
            "options go in a JSON body ({\"dry_run\": true}), not the query string",
        ));
    }
    let raw = axum::body::to_bytes(body, ADMIN_BODY_LIMIT)
        .await
        .map_err(|e| {
            ApiError::invalid(format!(
                "request body (at most {ADMIN_BODY_LIMIT} bytes): {e}"
            ))
        })?;
    let req: RetentionRequest = match raw.iter().all(u8::is_ascii_whitespace) {
        true => RetentionRequest::default(),
        false => json_body(&raw, r#"{"dry_run": true, "retention": "30d"} or nothing"#)?,
    };
    let dry_run = match (req.dry_run, req.retention) {
        (false, None) => None,
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "\"retention\" is for dry runs (\"dry_run\": true); a pass deletes by --lake-retention",
            ))
        }
        (true, None) if !s.flusher.retention().any() => {
            return Err(ApiError::invalid(
                "no --lake-retention is set, so a pass deletes nothing; give a \"retention\" (e.g. \"30d\") to try one",
            ))
        }
        (true, None) => Some(s.flusher.retention().clone()),
        (true, Some(text)) => {
            let keep = humantime::parse_duration(&text).map_err(|e| {
                ApiError::invalid(format!("retention {text:?}: {e} (e.g. \"30d\", \"12h\")"))
            })?;
            if keep.is_zero() {
                return Err(ApiError::invalid(
                    "retention 0 keeps everything: nothing to try",
                ));
            }
            Some(crate::config::Retention {
                default: keep,
                endpoints: Vec::new(),
            })
        }
    };
    run_pass(&s, only, |f, only| async move {
        f.expire(only.as_deref(), dry_run.as_ref()).await
    })
    .await
    .map(Json)
}

async fn rotate(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let p = admin(&s, &headers).await?;
    may_manage(&p, DEFAULT_TENANT)?;
    let auth = s.auth.clone();
    let kid = tokio::task::spawn_blocking(move || auth.jwt.rotate())
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
    Ok(Json(json!({"kid": kid})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    tenant: String,
    #[serde(default)]
    name: String,
    scopes: Vec<String>,
    #[serde(default)]
    endpoints: Option<Vec<String>>,
}

async fn create_key(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<CreateKey>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let p = admin(&s, &headers).await?;
    let Json(req) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    may_manage(&p, &req.tenant)?;
    let (rec, key) = s
        .auth
        .create_key(&req.tenant, &req.name, req.scopes, req.endpoints)?;
    tracing::info!(id = %rec.id, tenant = %rec.tenant, by = %p.key_id, "API key created");
    let mut body = serde_json::to_value(&rec).unwrap_or_default();
    body["key"] = json!(key);
    if let Some(o) = body.as_object_mut() {
        o.remove("hash");
    }
    Ok((StatusCode::CREATED, Json(body)))
}

async fn list_keys(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let p = admin(&s, &headers).await?;
    let keys = s
        .auth
        .keys()
        .list()
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
    let visible: Vec<_> = keys
        .into_iter()
        .filter(|k| may_manage(&p, &k.tenant).is_ok())
        .map(|k| json!({"id": k.id, "tenant": k.tenant, "name": k.name, "scopes": k.scopes, "endpoints": k.endpoints, "created_at": k.created_at}))
        .collect();
    Ok(Json(json!({ "keys": visible })))
}

async fn delete_key(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let p = admin(&s, &headers).await?;
    let rec = s
        .auth
        .keys()
        .get(&id)
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
    let rec =
        rec.ok_or_else(|| ApiError::new(ErrorKind::NotFound, format!("no API key {id:?}")))?;
    may_manage(&p, &rec.tenant)?;
    s.auth.delete_key(&id)?;
    tracing::info!(%id, by = %p.key_id, "API key deleted");
    Ok(StatusCode::NO_CONTENT)
}
