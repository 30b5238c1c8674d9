//! OTLP traces → `spans` and `state_patches` rows.
//!
//! Columns are documented in the README ("Tables"). Rules:
//! - ids are lowercase hex; `parent_span_id` is NULL for roots;
//! - `service_name` comes from the span's own resource (`service.name`),
//!   else `NO_SERVICE_NAME`;
//! - `kind` / `status_code` are the OTLP names without prefix (`INTERNAL`,
//!   `SERVER`, …; `UNSET`, `OK`, `ERROR`);
//! - JSON columns follow [`super::json`]; events are objects with camelCase
//!   `name`, `timeUnixNano`, `droppedAttributesCount`, `attributes`;
//! - Junjo columns are filled from either telemetry contract (v1 `junjo.id`…,
//!   v2 `junjo.executable_runtime_id`…) and those attributes leave
//!   `attributes_json`;
//! - each `set_state` event becomes a `state_patches` row whose `patch_id` is
//!   derived from (trace, span, event index, time), so a replay never
//!   duplicates it.
//!
//! Validation happens here, before anything is written: a wrong-length id or
//! absurd nesting fails the whole request (INVALID_ARGUMENT); a span with an
//! all-zero trace or span id is rejected alone and reported through OTLP
//! `partial_success`.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, Int64Builder, StringBuilder, TimestampNanosecondBuilder, UInt32Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span::Event, Span};
use sha2::{Digest, Sha256};

use super::json::{self, TooDeep};

pub const SPANS: &str = "spans";
pub const STATE_PATCHES: &str = "state_patches";
pub const NO_SERVICE_NAME: &str = "NO_SERVICE_NAME";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("{at}.{field} is {len} bytes, expected {expected}")]
    IdLength {
        at: String,
        field: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("{at}: {source}")]
    Nesting { at: String, source: TooDeep },
}

pub(super) fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

/// The `spans` table schema.
pub static SPANS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let s = |n: &str| Field::new(n, DataType::Utf8, false);
    let ns = |n: &str| Field::new(n, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
        s("trace_id"),
        s("span_id"),
        ns("parent_span_id"),
        s("service_name"),
        s("name"),
        s("kind"),
        Field::new("start_time", ts_type(), false),
        Field::new("end_time", ts_type(), false),
        Field::new("duration_ns", DataType::Int64, false),
        s("status_code"),
        ns("status_message"),
        s("attributes_json"),
        s("events_json"),
        s("links_json"),
        s("resource_attributes_json"),
        ns("scope_name"),
        ns("scope_version"),
        Field::new("trace_flags", DataType::UInt32, false),
        ns("trace_state"),
        Field::new("dropped_attributes_count", DataType::UInt32, false),
        Field::new("dropped_events_count", DataType::UInt32, false),
        Field::new("dropped_links_count", DataType::UInt32, false),
        ns("junjo_id"),
        ns("junjo_parent_id"),
        ns("junjo_span_type"),
        ns("junjo_wf_state_start"),
        ns("junjo_wf_state_end"),
        ns("junjo_wf_graph_structure"),
        ns("junjo_wf_store_id"),
    ]))
});

/// The `state_patches` table schema.
pub static STATE_PATCHES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let s = |n: &str| Field::new(n, DataType::Utf8, false);
    let ns = |n: &str| Field::new(n, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
        s("patch_id"),
        s("trace_id"),
        s("span_id"),
        s("service_name"),
        Field::new("timestamp", ts_type(), false),
        ns("junjo_id"),
        ns("store_id"),
        ns("store_name"),
        ns("action"),
        ns("patch_json"),
        s("attributes_json"),
    ]))
});

/// Which Junjo column an attribute key fills (both telemetry contracts).
fn junjo_slot(key: &str) -> Option<usize> {
    Some(match key {
        "junjo.id" | "junjo.executable_runtime_id" => 0,
        "junjo.parent_id" | "junjo.parent_executable_runtime_id" => 1,
        "junjo.span_type" => 2,
        "junjo.workflow.state.start" => 3,
        "junjo.workflow.state.end" => 4,
        "junjo.workflow.graph_structure" | "junjo.workflow.execution_graph_snapshot" => 5,
        "junjo.workflow.store.id" => 6,
        _ => return None,
    })
}
const JUNJO_COLUMNS: usize = 7;

pub fn kind_name(kind: i32) -> &'static str {
    match kind {
        1 => "INTERNAL",
        2 => "SERVER",
        3 => "CLIENT",
        4 => "PRODUCER",
        5 => "CONSUMER",
        _ => "UNSPECIFIED",
    }
}

pub fn status_name(code: i32) -> &'static str {
    match code {
        1 => "OK",
        2 => "ERROR",
        _ => "UNSET",
    }
}

/// The rows of one request.
pub struct TraceRows {
    pub spans: RecordBatch,
    pub state_patches: RecordBatch,
    /// Spans refused individually (reported via partial_success).
    pub rejected: u64,
    pub reject_reason: Option<String>,
}

pub(super) fn str_attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        }
    })
}

pub(super) fn check_id(
    at: &dyn Fn() -> String,
    field: &'static str,
    id: &[u8],
    expected: usize,
    optional: bool,
) -> Result<(), Error> {
    if id.len() == expected || (optional && id.is_empty()) {
        return Ok(());
    }
    Err(Error::IdLength {
        at: at(),
        field,
        len: id.len(),
        expected,
    })
}

/// The service name (`service.name`, else `NO_SERVICE_NAME`) and attributes
/// JSON of a resource, shared by every row it carries.
pub(super) fn resource_ctx(
    resource: Option<&Resource>,
    at: impl Fn() -> String,
) -> Result<(&str, String), Error> {
    let attrs: &[KeyValue] = resource.map(|r| r.attributes.as_slice()).unwrap_or(&[]);
    let service = str_attr(attrs, "service.name").unwrap_or(NO_SERVICE_NAME);
    let json =
        json::attrs_to_string(attrs).map_err(|source| Error::Nesting { at: at(), source })?;
    Ok((service, json))
}

/// Validates and converts a whole request.
pub fn convert(req: &ExportTraceServiceRequest) -> Result<TraceRows, Error> {
    let mut b = SpanBuilders::default();
    let mut p = PatchBuilders::default();
    let mut rejected = 0u64;
    for (ri, rs) in req.resource_spans.iter().enumerate() {
        let (service, res_json) = resource_ctx(rs.resource.as_ref(), || {
            format!("resource_spans[{ri}].resource")
        })?;
        for (si, ss) in rs.scope_spans.iter().enumerate() {
            let scope = ss.scope.as_ref();
            for (pi, span) in ss.spans.iter().enumerate() {
                let at = || format!("resource_spans[{ri}].scope_spans[{si}].spans[{pi}]");
                check_id(&at, "trace_id", &span.trace_id, 16, false)?;
                check_id(&at, "span_id", &span.span_id, 8, false)?;
                check_id(&at, "parent_span_id", &span.parent_span_id, 8, true)?;
                if span.trace_id.iter().all(|b| *b == 0) || span.span_id.iter().all(|b| *b == 0) {
                    rejected += 1;
                    continue;
                }
                let ctx = SpanCtx {
                    service,
                    res_json: &res_json,
                    scope_name: scope.map(|s| s.name.as_str()),
                    scope_version: scope.map(|s| s.version.as_str()),
                };
                b.append(span, &ctx, &mut p)
                    .map_err(|source| Error::Nesting { at: at(), source })?;
            }
        }
    }
    let reject_reason = (rejected > 0).then(|| {
        format!("{rejected} span(s) rejected: all-zero trace_id or span_id is invalid (OTel spec)")
    });
    Ok(TraceRows {
        spans: b.finish(),
        state_patches: p.finish(),
        rejected,
        reject_reason,
    })
}

struct SpanCtx<'a> {
    service: &'a str,
    res_json: &'a str,
    scope_name: Option<&'a str>,
    scope_version: Option<&'a str>,
}

#[derive(Default)]
struct SpanBuilders {
    trace_id: StringBuilder,
    span_id: StringBuilder,
    parent_span_id: StringBuilder,
    service_name: StringBuilder,
    name: StringBuilder,
    kind: StringBuilder,
    start_time: TimestampNanosecondBuilder,
    end_time: TimestampNanosecondBuilder,
    duration_ns: Int64Builder,
    status_code: StringBuilder,
    status_message: StringBuilder,
    attributes_json: StringBuilder,
    events_json: StringBuilder,
    links_json: StringBuilder,
    resource_attributes_json: StringBuilder,
    scope_name: StringBuilder,
    scope_version: StringBuilder,
    trace_flags: UInt32Builder,
    trace_state: StringBuilder,
    dropped_attributes: UInt32Builder,
    dropped_events: UInt32Builder,
    dropped_links: UInt32Builder,
    junjo: [StringBuilder; JUNJO_COLUMNS],
    buf: String,
}

/// An OTLP `fixed64` time as an Arrow timestamp (ns), saturating.
pub(super) fn ns(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

pub(super) fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

pub(super) fn hex_into(buf: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.clear();
    for b in bytes {
        buf.push(HEX[(b >> 4) as usize] as char);
        buf.push(HEX[(b & 15) as usize] as char);
    }
}

impl SpanBuilders {
    fn append(
        &mut self,
        span: &Span,
        ctx: &SpanCtx,
        patches: &mut PatchBuilders,
    ) -> Result<(), TooDeep> {
        // Attributes: Junjo ones go to their columns, the rest to JSON.
        let mut junjo: [Option<String>; JUNJO_COLUMNS] = Default::default();
        let mut attrs = String::with_capacity(256);
        attrs.push('{');
        let mut first = true;
        for kv in &span.attributes {
            if let Some(slot) = junjo_slot(&kv.key) {
                junjo[slot] = json::value_as_text(kv.value.as_ref())?;
                continue;
            }
            if !first {
                attrs.push(',');
            }
            first = false;
            json::write_str(&mut attrs, &kv.key);
            attrs.push(':');
            json::write_any(&mut attrs, kv.value.as_ref(), 1)?;
        }
        attrs.push('}');
        let events = events_json(&span.events)?;
        let links = links_json(span)?;

        hex_into(&mut self.buf, &span.trace_id);
        let trace_hex = self.buf.clone();
        self.trace_id.append_value(&trace_hex);
        hex_into(&mut self.buf, &span.span_id);
        let span_hex = self.buf.clone();
        self.span_id.append_value(&span_hex);
        if span.parent_span_id.is_empty() {
            self.parent_span_id.append_null();
        } else {
            hex_into(&mut self.buf, &span.parent_span_id);
            self.parent_span_id.append_value(&self.buf);
        }
        self.service_name.append_value(ctx.service);
        self.name.append_value(&span.name);
        self.kind.append_value(kind_name(span.kind));
        let start = ns(span.start_time_unix_nano);
        let end = ns(span.end_time_unix_nano);
        self.start_time.append_value(start);
        self.end_time.append_value(end);
        self.duration_ns.append_value(end.saturating_sub(start));
        let status = span.status.as_ref();
        self.status_code
            .append_value(status_name(status.map(|s| s.code).unwrap_or(0)));
        self.status_message
            .append_option(status.and_then(|s| non_empty(&s.message)));
        self.attributes_json.append_value(&attrs);
        self.events_json.append_value(&events);
        self.links_json.append_value(&links);
        self.resource_attributes_json.append_value(ctx.res_json);
        self.scope_name
            .append_option(ctx.scope_name.and_then(non_empty));
        self.scope_version
            .append_option(ctx.scope_version.and_then(non_empty));
        self.trace_flags.append_value(span.flags);
        self.trace_state.append_option(non_empty(&span.trace_state));
        self.dropped_attributes
            .append_value(span.dropped_attributes_count);
        self.dropped_events.append_value(span.dropped_events_count);
        self.dropped_links.append_value(span.dropped_links_count);
        let junjo_id = junjo[0].clone();
        for (b, v) in self.junjo.iter_mut().zip(junjo) {
            b.append_option(v);
        }
        for (i, ev) in span
            .events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.name == "set_state")
        {
            patches.append(
                &trace_hex,
                &span_hex,
                ctx.service,
                junjo_id.as_deref(),
                i,
                ev,
            )?;
        }
        Ok(())
    }

    fn finish(mut self) -> RecordBatch {
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(self.trace_id.finish()),
            Arc::new(self.span_id.finish()),
            Arc::new(self.parent_span_id.finish()),
            Arc::new(self.service_name.finish()),
            Arc::new(self.name.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.start_time.finish().with_timezone("UTC")),
            Arc::new(self.end_time.finish().with_timezone("UTC")),
            Arc::new(self.duration_ns.finish()),
            Arc::new(self.status_code.finish()),
            Arc::new(self.status_message.finish()),
            Arc::new(self.attributes_json.finish()),
            Arc::new(self.events_json.finish()),
            Arc::new(self.links_json.finish()),
            Arc::new(self.resource_attributes_json.finish()),
            Arc::new(self.scope_name.finish()),
            Arc::new(self.scope_version.finish()),
            Arc::new(self.trace_flags.finish()),
            Arc::new(self.trace_state.finish()),
            Arc::new(self.dropped_attributes.finish()),
            Arc::new(self.dropped_events.finish()),
            Arc::new(self.dropped_links.finish()),
        ];
        cols.extend(
            self.junjo
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        RecordBatch::try_new(SPANS_SCHEMA.clone(), cols).expect("spans columns match SPANS_SCHEMA")
    }
}

fn events_json(events: &[Event]) -> Result<String, TooDeep> {
    let mut s = String::with_capacity(2 + 96 * events.len());
    s.push('[');
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str("{\"name\":");
        json::write_str(&mut s, &e.name);
        s.push_str(&format!(
            ",\"timeUnixNano\":{},\"droppedAttributesCount\":{},\"attributes\":",
            e.time_unix_nano, e.dropped_attributes_count
        ));
        json::write_attrs(&mut s, e.attributes.iter(), 1)?;
        s.push('}');
    }
    s.push(']');
    Ok(s)
}

fn links_json(span: &Span) -> Result<String, TooDeep> {
    let mut s = String::from("[");
    for (i, l) in span.links.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            "{{\"traceId\":\"{}\",\"spanId\":\"{}\",\"traceState\":",
            hex::encode(&l.trace_id),
            hex::encode(&l.span_id)
        ));
        json::write_str(&mut s, &l.trace_state);
        s.push_str(&format!(
            ",\"flags\":{},\"droppedAttributesCount\":{},\"attributes\":",
            l.flags, l.dropped_attributes_count
        ));
        json::write_attrs(&mut s, l.attributes.iter(), 1)?;
        s.push('}');
    }
    s.push(']');
    Ok(s)
}

#[derive(Default)]
struct PatchBuilders {
    patch_id: StringBuilder,
    trace_id: StringBuilder,
    span_id: StringBuilder,
    service_name: StringBuilder,
    timestamp: TimestampNanosecondBuilder,
    junjo_id: StringBuilder,
    store_id: StringBuilder,
    store_name: StringBuilder,
    action: StringBuilder,
    patch_json: StringBuilder,
    attributes_json: StringBuilder,
}

impl PatchBuilders {
    fn append(
        &mut self,
        trace: &str,
        span: &str,
        service: &str,
        junjo_id: Option<&str>,
        index: usize,
        ev: &Event,
    ) -> Result<(), TooDeep> {
        let mut h = Sha256::new();
        h.update(trace.as_bytes());
        h.update(span.as_bytes());
        h.update((index as u64).to_be_bytes());
        h.update(ev.time_unix_nano.to_be_bytes());
        self.patch_id.append_value(hex::encode(&h.finalize()[..16]));
        self.trace_id.append_value(trace);
        self.span_id.append_value(span);
        self.service_name.append_value(service);
        self.timestamp.append_value(ns(ev.time_unix_nano));
        self.junjo_id.append_option(junjo_id);
        let text = |key: &str| -> Result<Option<String>, TooDeep> {
            json::value_as_text(
                ev.attributes
                    .iter()
                    .find(|kv| kv.key == key)
                    .and_then(|kv| kv.value.as_ref()),
            )
        };
        self.store_id.append_option(text("junjo.store.id")?);
        self.store_name.append_option(text("junjo.store.name")?);
        self.action.append_option(text("junjo.store.action")?);
        self.patch_json
            .append_option(text("junjo.state_json_patch")?);
        const TAKEN: [&str; 4] = [
            "junjo.store.id",
            "junjo.store.name",
            "junjo.store.action",
            "junjo.state_json_patch",
        ];
        let rest = ev
            .attributes
            .iter()
            .filter(|kv| !TAKEN.contains(&kv.key.as_str()));
        let mut attrs = String::new();
        json::write_attrs(&mut attrs, rest, 1)?;
        self.attributes_json.append_value(attrs);
        Ok(())
    }

    fn finish(mut self) -> RecordBatch {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.patch_id.finish()),
            Arc::new(self.trace_id.finish()),
            Arc::new(self.span_id.finish()),
            Arc::new(self.service_name.finish()),
            Arc::new(self.timestamp.finish().with_timezone("UTC")),
            Arc::new(self.junjo_id.finish()),
            Arc::new(self.store_id.finish()),
            Arc::new(self.store_name.finish()),
            Arc::new(self.action.finish()),
            Arc::new(self.patch_json.finish()),
            Arc::new(self.attributes_json.finish()),
        ];
        RecordBatch::try_new(STATE_PATCHES_SCHEMA.clone(), cols)
            .expect("columns match STATE_PATCHES_SCHEMA")
    }
}

/// Helper for tests and the load generator: a string attribute.
pub fn kv_str(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        key_strindex: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{TimestampNanosecondType, UInt32Type};
    use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{span::Link, ResourceSpans, ScopeSpans, Status};

    fn col<'a>(b: &'a RecordBatch, name: &str) -> &'a arrow::array::StringArray {
        b.column_by_name(name).unwrap().as_string::<i32>()
    }

    fn request(spans: Vec<Span>, service: Option<&str>) -> ExportTraceServiceRequest {
        let attributes = service
            .map(|s| vec![kv_str("service.name", s)])
            .unwrap_or_default();
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes,
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "junjo".into(),
                        version: "".into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    fn span(trace: u8, id: u8, parent: Option<u8>) -> Span {
        Span {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: format!("s{id}"),
            kind: 2,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_000_500_000,
            ..Default::default()
        }
    }

    #[test]
    fn converts_ids_kinds_status_and_junjo_v2() {
        let mut root = span(0xab, 1, None);
        root.status = Some(Status {
            code: 2,
            message: "boom".into(),
        });
        root.attributes = vec![
            kv_str("junjo.executable_runtime_id", "rt1"),
            kv_str("junjo.span_type", "workflow"),
            kv_str("junjo.workflow.execution_graph_snapshot", "{\"v\":2}"),
            kv_str("junjo.workflow.state.start", "{}"),
            kv_str("junjo.workflow.store.id", "store1"),
            kv_str("http.method", "GET"),
            KeyValue {
                key: "junjo.telemetry.contract_version".into(),
                value: Some(AnyValue {
                    value: Some(Value::IntValue(2)),
                }),
                key_strindex: 0,
            },
        ];
        let mut child = span(0xab, 2, Some(1));
        child.attributes = vec![kv_str("junjo.id", "v1id"), kv_str("junjo.parent_id", "rt1")];
        child.events = vec![Event {
            name: "set_state".into(),
            time_unix_nano: 1_700_000_000_000_100_000,
            attributes: vec![
                kv_str("id", "ev1"),
                kv_str("junjo.store.id", "store1"),
                kv_str("junjo.store.action", "set_count"),
                kv_str(
                    "junjo.state_json_patch",
                    "[{\"op\":\"replace\",\"path\":\"/count\",\"value\":3}]",
                ),
            ],
            dropped_attributes_count: 0,
        }];
        child.links = vec![Link {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            ..Default::default()
        }];
        let rows = convert(&request(vec![root, child], Some("svc"))).unwrap();
        let s = &rows.spans;
        assert_eq!(s.num_rows(), 2);
        assert_eq!(col(s, "trace_id").value(0), "ab".repeat(16));
        assert_eq!(col(s, "span_id").value(1), "02".repeat(8));
        assert!(col(s, "parent_span_id").is_null(0));
        assert_eq!(col(s, "parent_span_id").value(1), "01".repeat(8));
        assert_eq!(col(s, "kind").value(0), "SERVER");
        assert_eq!(col(s, "status_code").value(0), "ERROR");
        assert_eq!(col(s, "status_message").value(0), "boom");
        assert!(col(s, "status_message").is_null(1));
        assert_eq!(col(s, "service_name").value(0), "svc");
        assert_eq!(col(s, "scope_name").value(0), "junjo");
        assert!(col(s, "scope_version").is_null(0));
        assert_eq!(col(s, "junjo_id").value(0), "rt1");
        assert_eq!(col(s, "junjo_id").value(1), "v1id");
        assert_eq!(col(s, "junjo_parent_id").value(1), "rt1");
        assert_eq!(col(s, "junjo_span_type").value(0), "workflow");
        assert_eq!(col(s, "junjo_wf_graph_structure").value(0), "{\"v\":2}");
        assert_eq!(col(s, "junjo_wf_store_id").value(0), "store1");
        let attrs: serde_json::Value =
            serde_json::from_str(col(s, "attributes_json").value(0)).unwrap();
        assert_eq!(
            attrs,
            serde_json::json!({"http.method": "GET", "junjo.telemetry.contract_version": 2})
        );
        let d = s
            .column_by_name("duration_ns")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(d.value(0), 500_000);
        let st = s
            .column_by_name("start_time")
            .unwrap()
            .as_primitive::<TimestampNanosecondType>();
        assert_eq!(st.value(0), 1_700_000_000_000_000_000);
        assert_eq!(
            s.column_by_name("trace_flags")
                .unwrap()
                .as_primitive::<UInt32Type>()
                .value(0),
            0
        );
        let events: serde_json::Value =
            serde_json::from_str(col(s, "events_json").value(1)).unwrap();
        assert_eq!(events[0]["name"], "set_state");
        assert_eq!(events[0]["timeUnixNano"], 1_700_000_000_000_100_000u64);
        assert_eq!(events[0]["droppedAttributesCount"], 0);
        assert_eq!(events[0]["attributes"]["junjo.store.action"], "set_count");
        let links: serde_json::Value = serde_json::from_str(col(s, "links_json").value(1)).unwrap();
        assert_eq!(links[0]["traceId"], "01".repeat(16));

        let p = &rows.state_patches;
        assert_eq!(p.num_rows(), 1);
        assert_eq!(
            col(p, "patch_json").value(0),
            "[{\"op\":\"replace\",\"path\":\"/count\",\"value\":3}]"
        );
        assert_eq!(col(p, "store_id").value(0), "store1");
        assert_eq!(col(p, "junjo_id").value(0), "v1id");
        assert_eq!(col(p, "span_id").value(0), "02".repeat(8));
        let again = convert(&request(vec![span(0xab, 1, None)], None)).unwrap();
        assert_eq!(col(&again.spans, "service_name").value(0), NO_SERVICE_NAME);
    }

    #[test]
    fn patch_ids_are_deterministic() {
        let mut s = span(1, 1, None);
        s.events = vec![
            Event {
                name: "set_state".into(),
                time_unix_nano: 5,
                ..Default::default()
            };
            2
        ];
        let a = convert(&request(vec![s.clone()], None)).unwrap();
        let b = convert(&request(vec![s], None)).unwrap();
        let (pa, pb) = (
            col(&a.state_patches, "patch_id"),
            col(&b.state_patches, "patch_id"),
        );
        assert_eq!(pa.value(0), pb.value(0));
        assert_ne!(pa.value(0), pa.value(1));
    }

    #[test]
    fn rejects_bad_ids_and_zero_ids() {
        let mut bad = span(1, 1, None);
        bad.trace_id = vec![1; 5];
        let err = convert(&request(vec![span(1, 2, None), bad], None))
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "resource_spans[0].scope_spans[0].spans[1].trace_id is 5 bytes, expected 16"
        );
        let mut bad_parent = span(1, 1, None);
        bad_parent.parent_span_id = vec![1; 3];
        assert!(matches!(
            convert(&request(vec![bad_parent], None)),
            Err(Error::IdLength {
                field: "parent_span_id",
                ..
            })
        ));
        let rows = convert(&request(
            vec![span(0, 1, None), span(1, 0, None), span(1, 1, None)],
            None,
        ))
        .unwrap();
        assert_eq!(rows.spans.num_rows(), 1);
        assert_eq!(rows.rejected, 2);
    }
}
