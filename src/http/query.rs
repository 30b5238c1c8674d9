//! Read routes: `POST /api/v1/query` (SQL) and the Junjo span endpoints under `/otel`.
//!
//! Every route authenticates, requires the `read` scope, and queries only the
//! credential's tenant (see `crate::query`).

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::{body_bytes, json_body, principal, AppState};
use crate::error::{ApiError, ErrorKind};
use crate::query::output;
use crate::query::spans::ListParams;
use crate::query::QueryResult;

pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/query", post(sql))
        .route("/otel/span-service-names", get(service_names))
        .route(
            "/otel/service/{service}/root-spans",
            get(root_spans::<false>),
        )
        .route(
            "/otel/service/{service}/root-spans-filtered",
            get(root_spans::<true>),
        )
        .route("/otel/trace/{trace_id}/nested-spans", get(trace))
        .route("/otel/trace/{trace_id}/span/{span_id}", get(span))
        .route("/otel/spans/type/workflow/{service}", get(workflows))
}

#[derive(Deserialize)]
struct SqlRequest {
    sql: String,
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Json,
    Arrow,
    Csv,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Self::Json => "JSON",
            Self::Arrow => "Arrow",
            Self::Csv => "CSV",
        }
    }
}

fn negotiate(headers: &HeaderMap) -> Result<Format, ApiError> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    for part in accept.split(',') {
        let mime = part.split(';').next().unwrap_or("").trim();
        match mime {
            "" | "*/*" | "application/json" | "application/*" => return Ok(Format::Json),
            ARROW_STREAM => return Ok(Format::Arrow),
            "text/csv" | "text/*" => return Ok(Format::Csv),
            _ => {}
        }
    }
    if accept.trim().is_empty() {
        return Ok(Format::Json);
    }
    Err(ApiError::new(
        ErrorKind::InvalidInput,
        format!("cannot produce {accept:?}; use application/json, {ARROW_STREAM} or text/csv"),
    ))
}

async fn sql(
    State(s): State<AppState>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let p = principal(&s.auth, &headers).await?;
    let format = negotiate(&headers)?;
    let req: SqlRequest = json_body(&body_bytes(raw)?, r#"a JSON object {"sql": "…"}"#)?;
    let result = s.query.sql(&p, req.sql).await?;
    // Encoding 100,000 rows takes a while: off the runtime that serves writes.
    tokio::task::spawn_blocking(move || encode(format, result))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
}

fn encode(format: Format, result: QueryResult) -> Result<Response, ApiError> {
    if format == Format::Csv {
        if let Some(f) = result
            .schema
            .fields()
            .iter()
            .find(|f| f.data_type().is_nested())
        {
            return Err(ApiError::invalid(format!(
                "column {:?} is {}, which CSV cannot hold; ask for JSON or Arrow, or select it as text (arrow_cast(…, 'Utf8'))",
                f.name(),
                f.data_type()
            )));
        }
    }
    let body = result.encode(format.name(), |schema, batches, out| match format {
        Format::Json => output::json_table(schema, batches, out).map_err(|e| e.to_string()),
        Format::Arrow => output::arrow_stream(schema, batches, out).map_err(|e| e.to_string()),
        Format::Csv => output::csv(batches, out).map_err(|e| e.to_string()),
    })?;
    let content_type = match format {
        Format::Json => "application/json",
        Format::Arrow => ARROW_STREAM,
        Format::Csv => "text/csv",
    };
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response())
}

/// A JSON answer encoded by the query engine.
fn json(body: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn params(q: Result<Query<ListParams>, QueryRejection>) -> Result<ListParams, ApiError> {
    q.map(|Query(p)| p)
        .map_err(|e| ApiError::invalid(format!("query string: {}", e.body_text())))
}

async fn service_names(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let p = principal(&s.auth, &headers).await?;
    Ok(Json(s.query.service_names(&p).await?).into_response())
}

/// Root spans of a service; `LLM_ONLY` for `root-spans-filtered`.
async fn root_spans<const LLM_ONLY: bool>(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(service): Path<String>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let p = principal(&s.auth, &headers).await?;
    let rows = s
        .query
        .root_spans(&p, &service, &params(q)?, LLM_ONLY)
        .await?;
    Ok(json(rows))
}

async fn workflows(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(service): Path<String>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let p = principal(&s.auth, &headers).await?;
    let rows = s.query.workflow_spans(&p, &service, &params(q)?).await?;
    Ok(json(rows))
}

async fn trace(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(trace_id): Path<String>,
) -> Result<Response, ApiError> {
    let p = principal(&s.auth, &headers).await?;
    Ok(json(s.query.trace_spans(&p, &trace_id).await?))
}

async fn span(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path((trace_id, span_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let p = principal(&s.auth, &headers).await?;
    match s.query.span(&p, &trace_id, &span_id).await? {
        Some(v) => Ok(json(v)),
        None => Err(ApiError::new(
            ErrorKind::NotFound,
            format!("span {span_id} of trace {trace_id} not found"),
        )),
    }
}
