//! The span endpoints (Junjo backend paths and shapes), as DataFusion plans.
//!
//! Path and query parameters are validated here and reach DataFusion only as
//! literals in expressions, never as SQL text. Lists are ordered with a total
//! order (time, then trace id, then span id) so `offset` pages are stable.

use std::collections::BTreeSet;
use std::io::Write;

use bytes::Bytes;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{col, lit, Expr, SortExpr};
use datafusion::prelude::{DataFrame, JoinType, SessionContext};
use serde::Deserialize;
use serde_json::Value;

use crate::auth::Principal;
use crate::error::{ApiError, ErrorKind};
use crate::flush::parquet::distinct_strings;
use crate::ingest::otlp_trace::SPANS;
use crate::memtable::TableId;
use crate::query::output::{cell, json_objects};
use crate::query::table::TimeRange;
use crate::query::{QueryEngine, QueryResult};

pub const DEFAULT_LIMIT: usize = 500;
pub const MAX_LIMIT: usize = 10_000;
/// Largest `offset` of the list endpoints: far past any page a client walks
/// to, and far from DataFusion's `skip + fetch` overflowing.
pub const MAX_OFFSET: usize = 1_000_000_000;
/// Most spans one trace lookup returns.
pub const MAX_TRACE_SPANS: usize = 100_000;

/// Query parameters of the list endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    pub limit: Option<usize>,
    pub offset: Option<usize>,
    /// Inclusive lower bound on `start_time`: RFC 3339 or integer ns.
    pub start: Option<String>,
    /// Exclusive upper bound on `start_time`: RFC 3339 or integer ns.
    pub end: Option<String>,
}

struct Page {
    limit: usize,
    offset: usize,
    range: TimeRange,
}

fn parse_time(name: &str, v: &str) -> Result<i64, ApiError> {
    if let Ok(ns) = v.parse::<i64>() {
        return Ok(ns);
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "{name}={v:?} is neither RFC 3339 nor integer nanoseconds"
            ))
        })
}

impl ListParams {
    fn page(&self) -> Result<Page, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(ApiError::invalid(format!(
                "limit must be within 1..={MAX_LIMIT}, got {limit}"
            )));
        }
        let offset = self.offset.unwrap_or(0);
        if offset > MAX_OFFSET {
            return Err(ApiError::invalid(format!(
                "offset must be at most {MAX_OFFSET}, got {offset}; narrow start/end instead"
            )));
        }
        let range = TimeRange {
            start: self
                .start
                .as_deref()
                .map(|v| parse_time("start", v))
                .transpose()?,
            end: self
                .end
                .as_deref()
                .map(|v| parse_time("end", v))
                .transpose()?,
        };
        Ok(Page {
            limit,
            offset,
            range,
        })
    }
}

/// Lowercase hex of exactly `len` characters.
pub fn hex_id(what: &str, v: &str, len: usize) -> Result<String, ApiError> {
    if v.len() == len && v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(v.to_ascii_lowercase());
    }
    let shown: String = v.chars().take(64).collect();
    Err(ApiError::invalid(format!(
        "{what} must be {len} hex characters, got {shown:?}"
    )))
}

fn service_param(v: &str) -> Result<String, ApiError> {
    if v.is_empty() || v.len() > 1024 {
        return Err(ApiError::invalid("service name must be 1 to 1024 bytes"));
    }
    Ok(v.to_string())
}

fn ts(ns: i64) -> Expr {
    lit(ScalarValue::TimestampNanosecond(
        Some(ns),
        Some("UTC".into()),
    ))
}

fn time_filter(range: TimeRange) -> Option<Expr> {
    let lo = range.start.map(|s| col("start_time").gt_eq(ts(s)));
    let hi = range.end.map(|e| col("start_time").lt(ts(e)));
    match (lo, hi) {
        (Some(a), Some(b)) => Some(a.and(b)),
        (a, b) => a.or(b),
    }
}

fn newest_first() -> Vec<SortExpr> {
    vec![
        col("start_time").sort(false, true),
        col("trace_id").sort(true, true),
        col("span_id").sort(true, true),
    ]
}

/// Columns holding JSON text, embedded parsed in span objects.
pub fn is_json_column(name: &str) -> bool {
    name.ends_with("_json")
        || matches!(
            name,
            "junjo_wf_state_start" | "junjo_wf_state_end" | "junjo_wf_graph_structure"
        )
}

/// Attribute matches of an LLM span in `attributes_json` (our own compact JSON:
/// `"key":"value"`, quotes inside values escaped, so these cannot match inside a value).
fn is_llm_span() -> Expr {
    let a = || col("attributes_json");
    // A string attribute that is present and not empty (LIKE's `_` would
    // also match the closing quote of `""`).
    let non_empty = |key: &str| {
        a().like(lit(format!(r#"%"{key}":"%"#)))
            .and(a().not_like(lit(format!(r#"%"{key}":""%"#))))
    };
    a().like(lit(r#"%"openinference.span.kind":"LLM"%"#))
        .or(non_empty("gen_ai.operation.name"))
        .or(non_empty("gen_ai.provider.name"))
}

/// The span objects of `result` as a JSON list, or as one object (the
/// result's only row), counted in the query memory until sent.
async fn span_objects(result: QueryResult, list: bool) -> Result<Bytes, ApiError> {
    // Encoding a large trace takes a while: off the runtime that serves writes.
    tokio::task::spawn_blocking(move || {
        result.encode("JSON", |_, batches, out| match list {
            true => {
                out.write_all(b"[")?;
                json_objects(batches, is_json_column, out)?;
                out.write_all(b"]")
            }
            false => json_objects(batches, is_json_column, out),
        })
    })
    .await
    .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
}

impl QueryEngine {
    /// A JSON list of the span objects `build` selects.
    async fn span_list<F, Fut>(
        &self,
        p: &Principal,
        range: TimeRange,
        max_rows: usize,
        build: F,
    ) -> Result<Bytes, ApiError>
    where
        F: FnOnce(SessionContext) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = datafusion::common::Result<DataFrame>> + Send,
    {
        p.require_endpoint("read", SPANS)?;
        let result = self.run(p, range, max_rows, build).await?;
        span_objects(result, true).await
    }

    /// `GET /otel/span-service-names`: sorted distinct service names.
    ///
    /// Every span file records its distinct service names in the manifest, so
    /// this is the union of those lists and of the memtable batches' values:
    /// O(files + memtable rows), no Parquet read. Files recorded before the
    /// lists existed fall back to a DISTINCT scan.
    pub async fn service_names(&self, p: &Principal) -> Result<Vec<Value>, ApiError> {
        p.require_endpoint("read", SPANS)?;
        let snapshot = self.catalog.snapshot(&TableId::new(&p.tenant, SPANS));
        if snapshot.files.iter().all(|f| f.service_names.is_some()) {
            let mut names: BTreeSet<String> = snapshot
                .files
                .iter()
                .flat_map(|f| f.service_names.iter().flatten().cloned())
                .collect();
            for b in &snapshot.batches {
                names.extend(distinct_strings(b, "service_name"));
            }
            return Ok(names.into_iter().map(Value::String).collect());
        }
        p.require_endpoint("read", SPANS)?;
        let result = self
            .run(p, TimeRange::default(), usize::MAX, |ctx| async move {
                ctx.table(SPANS)
                    .await?
                    .select(vec![col("service_name")])?
                    .distinct()
            })
            .await?;
        let mut names = BTreeSet::new();
        for c in result
            .batches
            .iter()
            .filter_map(|b| b.column_by_name("service_name"))
        {
            for r in 0..c.len() {
                if let Value::String(name) = cell(c.as_ref(), r) {
                    names.insert(name);
                }
            }
        }
        Ok(names.into_iter().map(Value::String).collect())
    }

    /// Root spans of a service, newest first; with `llm_only`, only roots of
    /// traces that contain an LLM span.
    pub async fn root_spans(
        &self,
        p: &Principal,
        service: &str,
        params: &ListParams,
        llm_only: bool,
    ) -> Result<Bytes, ApiError> {
        let service = service_param(service)?;
        let page = params.page()?;
        let range = page.range;
        // The session's range prunes whole files from every scan of it. An
        // LLM span may start after `end` while its root starts before, so
        // with `llm_only` the session is bounded below only and `end`
        // applies to the roots alone (children do not start before roots).
        let scanned = match llm_only {
            true => TimeRange {
                start: range.start,
                end: None,
            },
            false => range,
        };
        self.span_list(p, scanned, page.limit, move |ctx| async move {
            let mut pred = col("service_name")
                .eq(lit(service.clone()))
                .and(col("parent_span_id").is_null());
            if let Some(t) = time_filter(range) {
                pred = pred.and(t);
            }
            let mut roots = ctx.table(SPANS).await?.filter(pred)?;
            if llm_only {
                let llm_traces = ctx
                    .table(SPANS)
                    .await?
                    .filter(is_llm_span())?
                    .select(vec![col("trace_id").alias("llm_trace_id")])?
                    .distinct()?;
                roots = roots.join(
                    llm_traces,
                    JoinType::LeftSemi,
                    &["trace_id"],
                    &["llm_trace_id"],
                    None,
                )?;
            }
            roots
                .sort(newest_first())?
                .limit(page.offset, Some(page.limit))
        })
        .await
    }

    /// Workflow spans (`junjo_span_type = 'workflow'`) of a service, newest first.
    pub async fn workflow_spans(
        &self,
        p: &Principal,
        service: &str,
        params: &ListParams,
    ) -> Result<Bytes, ApiError> {
        let service = service_param(service)?;
        let page = params.page()?;
        let range = page.range;
        self.span_list(p, range, page.limit, move |ctx| async move {
            let mut pred = col("service_name")
                .eq(lit(service))
                .and(col("junjo_span_type").eq(lit("workflow")));
            if let Some(t) = time_filter(range) {
                pred = pred.and(t);
            }
            ctx.table(SPANS)
                .await?
                .filter(pred)?
                .sort(newest_first())?
                .limit(page.offset, Some(page.limit))
        })
        .await
    }

    /// Every span of a trace, oldest first.
    pub async fn trace_spans(&self, p: &Principal, trace_id: &str) -> Result<Bytes, ApiError> {
        let trace_id = hex_id("trace_id", trace_id, 32)?;
        self.span_list(
            p,
            TimeRange::default(),
            MAX_TRACE_SPANS,
            move |ctx| async move {
                ctx.table(SPANS)
                    .await?
                    .filter(col("trace_id").eq(lit(trace_id)))?
                    .sort(vec![
                        col("start_time").sort(true, true),
                        col("span_id").sort(true, true),
                    ])
            },
        )
        .await
    }

    /// One span, or `None`.
    pub async fn span(
        &self,
        p: &Principal,
        trace_id: &str,
        span_id: &str,
    ) -> Result<Option<Bytes>, ApiError> {
        let trace_id = hex_id("trace_id", trace_id, 32)?;
        let span_id = hex_id("span_id", span_id, 16)?;
        p.require_endpoint("read", SPANS)?;
        let result = self
            .run(p, TimeRange::default(), 1, move |ctx| async move {
                ctx.table(SPANS)
                    .await?
                    .filter(
                        col("trace_id")
                            .eq(lit(trace_id))
                            .and(col("span_id").eq(lit(span_id))),
                    )?
                    .limit(0, Some(1))
            })
            .await?;
        if result.rows() == 0 {
            return Ok(None);
        }
        span_objects(result, false).await.map(Some)
    }
}
