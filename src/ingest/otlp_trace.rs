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

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, Int64Builder, StringBuilder, TimestampNanosecondBuilder, UInt32Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use std::fmt::Write;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use sha2::{Digest, Sha256};

use super::json::{self, Any, ValueError};
use super::wire;

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
    Nesting { at: String, source: ValueError },
    #[error("malformed protobuf request: {}{detail}", if at.is_empty() { String::new() } else { format!("{at}: ") })]
    Malformed { at: String, detail: wire::Error },
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

/// How many messages enclose each message the converter reads (the request
/// is 0), for [`wire::fields`]: prost's recursion limit counts them.
mod nesting {
    pub const RESOURCE_SPANS: usize = 1;
    pub const RESOURCE: usize = 2;
    pub const SCOPE_SPANS: usize = 2;
    /// `InstrumentationScope`, and the `EntityRef`s of a resource.
    pub const SCOPE: usize = 3;
    pub const SPAN: usize = 3;
    /// What a span holds: attributes, events, links, status.
    pub const SPAN_ITEM: usize = 4;
}

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
    /// Spans in the request, refused ones included.
    pub seen: usize,
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

/// Validates and converts a whole `ExportTraceServiceRequest`, read straight
/// from its protobuf bytes ([`wire`]).
pub fn convert(protobuf: &[u8]) -> Result<TraceRows, Error> {
    let mut c = Converter::default();
    let mut ri = 0;
    for f in wire::fields(protobuf, 0) {
        let (n, v) = f.map_err(|e| malformed(String::new(), e))?;
        if n == 1 {
            let at = || format!("resource_spans[{ri}]");
            let rs = v
                .bytes("ExportTraceServiceRequest.resource_spans")
                .map_err(|e| malformed(at(), e))?;
            c.resource_spans(ri, rs)?;
            ri += 1;
        }
    }
    let rejected = c.rejected;
    let reject_reason = (rejected > 0).then(|| {
        format!("{rejected} span(s) rejected: all-zero trace_id or span_id is invalid (OTel spec)")
    });
    Ok(TraceRows {
        spans: c.spans.finish(),
        state_patches: c.patches.finish(),
        seen: c.seen,
        rejected,
        reject_reason,
    })
}

/// Validates and converts a decoded request (OTLP/JSON, tests): the same
/// conversion, from the request's protobuf encoding.
pub fn convert_message(req: &ExportTraceServiceRequest) -> Result<TraceRows, Error> {
    convert(&req.encode_to_vec())
}

fn malformed(at: String, detail: wire::Error) -> Error {
    Error::Malformed { at, detail }
}

fn value_error(at: String, e: ValueError) -> Error {
    match e {
        ValueError::Malformed(detail) => malformed(at, detail),
        source => Error::Nesting { at, source },
    }
}

/// A singular message field seen twice is refused, not merged.
fn once<'a>(
    slot: &mut Option<&'a [u8]>,
    v: wire::Value<'a>,
    what: &'static str,
) -> Result<(), wire::Error> {
    if slot.is_some() {
        return Err(wire::Error(format!("{what} set twice").into()));
    }
    *slot = Some(v.bytes(what)?);
    Ok(())
}

/// `ResourceSpans` and `ScopeSpans` share a shape: field 1 is the context
/// (resource, scope), 2 the repeated children, 3 a schema URL. Returns the
/// context after checking both.
fn header<'a>(
    buf: &'a [u8],
    depth: usize,
    context: &'static str,
    schema_url: &'static str,
) -> Result<Option<&'a [u8]>, wire::Error> {
    let mut out = None;
    for f in wire::fields(buf, depth) {
        match f? {
            (1, v) => once(&mut out, v, context)?,
            (3, v) => drop(v.str(schema_url)?),
            _ => {}
        }
    }
    Ok(out)
}

#[derive(Default)]
struct Converter<'a> {
    /// Reused for every span.
    view: SpanView<'a>,
    spans: SpanBuilders,
    patches: PatchBuilders,
    seen: usize,
    rejected: u64,
    /// Scratch for values that are validated but not stored.
    scratch: String,
}

impl<'a> Converter<'a> {
    fn resource_spans(&mut self, ri: usize, buf: &'a [u8]) -> Result<(), Error> {
        let at = || format!("resource_spans[{ri}]");
        let resource = header(
            buf,
            nesting::RESOURCE_SPANS,
            "ResourceSpans.resource",
            "ResourceSpans.schema_url",
        )
        .map_err(|e| malformed(at(), e))?;
        let res_at = || format!("resource_spans[{ri}].resource");
        let (service, res_json) = self
            .resource(resource.unwrap_or_default())
            .map_err(|e| value_error(res_at(), e))?;
        let mut si = 0;
        for f in wire::fields(buf, nesting::RESOURCE_SPANS) {
            if let (2, v) = f.map_err(|e| malformed(at(), e))? {
                let ss = v
                    .bytes("ResourceSpans.scope_spans")
                    .map_err(|e| malformed(at(), e))?;
                self.scope_spans(ri, si, ss, service, &res_json)?;
                si += 1;
            }
        }
        Ok(())
    }

    /// `service.name` (first string value, else `NO_SERVICE_NAME`) and the
    /// attributes JSON of a `Resource`.
    fn resource(&mut self, buf: &'a [u8]) -> Result<(&'a str, String), ValueError> {
        for f in wire::fields(buf, nesting::RESOURCE) {
            match f? {
                (2, v) => drop(v.u32("Resource.dropped_attributes_count")?),
                (3, v) => entity_ref(v.bytes("Resource.entity_refs")?)?,
                _ => {}
            }
        }
        let mut service = None;
        let attrs =
            json::wire_pairs(buf, nesting::RESOURCE, 1, "Resource.attributes").inspect(|pair| {
                if let Ok(("service.name", Any::Str(s))) = pair {
                    service.get_or_insert(*s);
                }
            });
        let mut res_json = String::with_capacity(buf.len() + 2);
        json::write_pairs(&mut res_json, attrs, 0)?;
        Ok((service.unwrap_or(NO_SERVICE_NAME), res_json))
    }

    fn scope_spans(
        &mut self,
        ri: usize,
        si: usize,
        buf: &'a [u8],
        service: &str,
        res_json: &str,
    ) -> Result<(), Error> {
        let at = || format!("resource_spans[{ri}].scope_spans[{si}]");
        let scope = header(
            buf,
            nesting::SCOPE_SPANS,
            "ScopeSpans.scope",
            "ScopeSpans.schema_url",
        )
        .map_err(|e| malformed(at(), e))?;
        let (mut scope_name, mut scope_version) = (None, None);
        if let Some(scope) = scope {
            let scope_at = || format!("{}.scope", at());
            for f in wire::fields(scope, nesting::SCOPE) {
                match f.map_err(|e| malformed(scope_at(), e))? {
                    (1, v) => v
                        .str("InstrumentationScope.name")
                        .map(|s| scope_name = Some(s)),
                    (2, v) => v
                        .str("InstrumentationScope.version")
                        .map(|s| scope_version = Some(s)),
                    (4, v) => v
                        .u32("InstrumentationScope.dropped_attributes_count")
                        .map(drop),
                    _ => Ok(()),
                }
                .map_err(|e| malformed(scope_at(), e))?;
            }
            // Scope attributes are not stored, but must be valid.
            self.scratch.clear();
            json::write_pairs(
                &mut self.scratch,
                json::wire_pairs(scope, nesting::SCOPE, 3, "InstrumentationScope.attributes"),
                0,
            )
            .map_err(|e| value_error(scope_at(), e))?;
        }
        let ctx = SpanCtx {
            service,
            res_json,
            // An absent scope and an empty name are both NULL.
            scope_name: scope_name.and_then(non_empty),
            scope_version: scope_version.and_then(non_empty),
        };
        let mut pi = 0;
        for f in wire::fields(buf, nesting::SCOPE_SPANS) {
            if let (2, v) = f.map_err(|e| malformed(at(), e))? {
                let span_at = || format!("resource_spans[{ri}].scope_spans[{si}].spans[{pi}]");
                let span = v
                    .bytes("ScopeSpans.spans")
                    .map_err(|e| malformed(at(), e))?;
                self.span(span, &ctx, &span_at)?;
                pi += 1;
            }
        }
        Ok(())
    }

    fn span(&mut self, buf: &'a [u8], ctx: &SpanCtx, at: &dyn Fn() -> String) -> Result<(), Error> {
        self.seen += 1;
        let s = &mut self.view;
        s.parse(buf).map_err(|e| malformed(at(), e))?;
        check_id(at, "trace_id", s.trace_id, 16, false)?;
        check_id(at, "span_id", s.span_id, 8, false)?;
        check_id(at, "parent_span_id", s.parent_span_id, 8, true)?;
        let zero = s.trace_id.iter().all(|b| *b == 0) || s.span_id.iter().all(|b| *b == 0);
        // A refused span is still validated: the WAL keeps the whole request.
        self.spans
            .append(s, ctx, &mut self.patches, zero)
            .map_err(|e| value_error(at(), e))?;
        if zero {
            self.rejected += 1;
        }
        Ok(())
    }
}

/// `Resource.entity_refs`: nothing is stored, but prost would check it.
fn entity_ref(buf: &[u8]) -> Result<(), wire::Error> {
    for f in wire::fields(buf, nesting::SCOPE) {
        match f? {
            (1, v) => drop(v.str("EntityRef.schema_url")?),
            (2, v) => drop(v.str("EntityRef.type")?),
            (3, v) => drop(v.str("EntityRef.id_keys")?),
            (4, v) => drop(v.str("EntityRef.description_keys")?),
            _ => {}
        }
    }
    Ok(())
}

/// The fields of a `Span` message, read in one pass; the repeated ones as
/// the bytes of each item.
#[derive(Default)]
struct SpanView<'a> {
    attributes: Vec<&'a [u8]>,
    events: Vec<&'a [u8]>,
    links: Vec<&'a [u8]>,
    trace_id: &'a [u8],
    span_id: &'a [u8],
    trace_state: &'a str,
    parent_span_id: &'a [u8],
    flags: u32,
    name: &'a str,
    kind: i32,
    start: u64,
    end: u64,
    dropped_attributes: u32,
    dropped_events: u32,
    dropped_links: u32,
    status: Option<&'a [u8]>,
}

impl<'a> SpanView<'a> {
    /// Reads `buf` into `self`, reusing its lists.
    fn parse(&mut self, buf: &'a [u8]) -> Result<(), wire::Error> {
        let (attributes, events, links) = (
            std::mem::take(&mut self.attributes),
            std::mem::take(&mut self.events),
            std::mem::take(&mut self.links),
        );
        *self = SpanView {
            attributes,
            events,
            links,
            ..Default::default()
        };
        self.attributes.clear();
        self.events.clear();
        self.links.clear();
        let s = self;
        for f in wire::fields(buf, nesting::SPAN) {
            let (n, v) = f?;
            match n {
                1 => s.trace_id = v.bytes("Span.trace_id")?,
                2 => s.span_id = v.bytes("Span.span_id")?,
                3 => s.trace_state = v.str("Span.trace_state")?,
                4 => s.parent_span_id = v.bytes("Span.parent_span_id")?,
                5 => s.name = v.str("Span.name")?,
                6 => s.kind = v.i32("Span.kind")?,
                7 => s.start = v.fixed64("Span.start_time_unix_nano")?,
                8 => s.end = v.fixed64("Span.end_time_unix_nano")?,
                9 => s.attributes.push(v.bytes("Span.attributes")?),
                10 => s.dropped_attributes = v.u32("Span.dropped_attributes_count")?,
                11 => s.events.push(v.bytes("Span.events")?),
                12 => s.dropped_events = v.u32("Span.dropped_events_count")?,
                13 => s.links.push(v.bytes("Span.links")?),
                14 => s.dropped_links = v.u32("Span.dropped_links_count")?,
                15 => once(&mut s.status, v, "Span.status")?,
                16 => s.flags = v.fixed32("Span.flags")?,
                _ => {}
            }
        }
        Ok(())
    }
}

struct SpanCtx<'a> {
    service: &'a str,
    res_json: &'a str,
    scope_name: Option<&'a str>,
    scope_version: Option<&'a str>,
}

#[derive(Default)]
struct SpanBuilders {
    /// Resource and scope bytes copied into rows so far.
    repeated: usize,
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
    /// Reused per span: the three JSON columns and the hex ids.
    attrs: String,
    events: String,
    links: String,
    trace_hex: String,
    span_hex: String,
    parent_hex: String,
}

/// Checks a Junjo value that a later attribute of the same column replaced.
/// It is stored nowhere, but the WAL keeps the request for prost to decode
/// (ReadSpans), so its bytes must be as valid as a stored value's.
fn check_unstored(v: Any) -> Result<(), ValueError> {
    match v {
        // Checked as UTF-8 when read; copying a state snapshot proves nothing.
        Any::Str(_) => Ok(()),
        v => json::text_of(v).map(drop),
    }
}

/// An OTLP `fixed64` time as an Arrow timestamp (ns), saturating.
pub(super) fn ns(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

pub(super) fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// `buf` becomes `bytes` in lowercase hex.
pub(super) fn hex_into(buf: &mut String, bytes: &[u8]) {
    buf.clear();
    json::push_hex(buf, bytes);
}

/// The fixed part of a `state_patches` row: hex trace and span ids, patch id,
/// timestamp and offsets.
const PATCH_ROW_BYTES: usize = 32 + 16 + 64 + 8 + 6 * 4;

impl SpanBuilders {
    /// Validates a span and, unless `refused`, appends its row and its
    /// `set_state` patches.
    fn append(
        &mut self,
        span: &SpanView,
        ctx: &SpanCtx,
        patches: &mut PatchBuilders,
        refused: bool,
    ) -> Result<(), ValueError> {
        let shared = ctx.res_json.len()
            + ctx.scope_name.map_or(0, str::len)
            + ctx.scope_version.map_or(0, str::len);
        json::repeat_bytes(&mut self.repeated, shared, 1)?;
        // Attributes: Junjo ones go to their columns (one a later attribute
        // replaces is still checked), the rest to JSON.
        let mut junjo: [Option<Any>; JUNJO_COLUMNS] = Default::default();
        let mut replaced = Ok(());
        self.attrs.clear();
        let rest = span
            .attributes
            .iter()
            .map(|kv| json::wire_pair(kv, nesting::SPAN_ITEM))
            .filter(|kv| match kv {
                Ok((key, value)) => match junjo_slot(key) {
                    Some(slot) => {
                        match junjo[slot].replace(*value) {
                            Some(earlier) if replaced.is_ok() => replaced = check_unstored(earlier),
                            _ => {}
                        }
                        false
                    }
                    None => true,
                },
                Err(_) => true,
            });
        json::write_pairs(&mut self.attrs, rest, 0)?;
        replaced?;
        // Column text: string values as they are in the request (the state
        // snapshots are most of a span's bytes), others as JSON.
        let mut text: [Option<Cow<str>>; JUNJO_COLUMNS] = Default::default();
        for (t, v) in text.iter_mut().zip(junjo) {
            *t = match v {
                Some(Any::Str(s)) => Some(Cow::Borrowed(s)),
                Some(v) => json::text_of(v)?.map(Cow::Owned),
                None => None,
            };
        }
        hex_into(&mut self.trace_hex, span.trace_id);
        hex_into(&mut self.span_hex, span.span_id);
        // Events once: their JSON, and a patch row for each `set_state`.
        self.events.clear();
        let (trace_hex, span_hex) = (&self.trace_hex, &self.span_hex);
        let repeated = &mut self.repeated;
        events_json(&mut self.events, span, |i, ev| {
            if refused || ev.name != "set_state" {
                return Ok(());
            }
            let junjo_id = text[0].as_deref();
            // Each patch row copies the span's service and junjo id (a
            // 13-byte event would otherwise repeat a 150 KB id).
            let copied = PATCH_ROW_BYTES + ctx.service.len() + junjo_id.map_or(0, str::len);
            json::repeat_bytes(repeated, copied, 1)?;
            patches.append(trace_hex, span_hex, ctx.service, junjo_id, i, ev)
        })?;
        self.links.clear();
        links_json(&mut self.links, span)?;
        let mut status = (0, "");
        if let Some(buf) = span.status {
            for f in wire::fields(buf, nesting::SPAN_ITEM) {
                match f? {
                    (2, v) => status.1 = v.str("Status.message")?,
                    (3, v) => status.0 = v.i32("Status.code")?,
                    _ => {}
                }
            }
        }
        if refused {
            return Ok(());
        }

        self.trace_id.append_value(&self.trace_hex);
        self.span_id.append_value(&self.span_hex);
        if span.parent_span_id.is_empty() {
            self.parent_span_id.append_null();
        } else {
            hex_into(&mut self.parent_hex, span.parent_span_id);
            self.parent_span_id.append_value(&self.parent_hex);
        }
        self.service_name.append_value(ctx.service);
        self.name.append_value(span.name);
        self.kind.append_value(kind_name(span.kind));
        let start = ns(span.start);
        let end = ns(span.end);
        self.start_time.append_value(start);
        self.end_time.append_value(end);
        self.duration_ns.append_value(end.saturating_sub(start));
        self.status_code.append_value(status_name(status.0));
        self.status_message.append_option(non_empty(status.1));
        self.attributes_json.append_value(&self.attrs);
        self.events_json.append_value(&self.events);
        self.links_json.append_value(&self.links);
        self.resource_attributes_json.append_value(ctx.res_json);
        self.scope_name.append_option(ctx.scope_name);
        self.scope_version.append_option(ctx.scope_version);
        self.trace_flags.append_value(span.flags);
        self.trace_state.append_option(non_empty(span.trace_state));
        self.dropped_attributes
            .append_value(span.dropped_attributes);
        self.dropped_events.append_value(span.dropped_events);
        self.dropped_links.append_value(span.dropped_links);
        for (b, v) in self.junjo.iter_mut().zip(&text) {
            b.append_option(v.as_deref());
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

/// The fields of an `Event` that are not its attributes.
struct EventView<'a> {
    buf: &'a [u8],
    time: u64,
    name: &'a str,
    dropped_attributes: u32,
}

impl<'a> EventView<'a> {
    fn parse(buf: &'a [u8]) -> Result<Self, wire::Error> {
        let mut e = EventView {
            buf,
            time: 0,
            name: "",
            dropped_attributes: 0,
        };
        for f in wire::fields(buf, nesting::SPAN_ITEM) {
            match f? {
                (1, v) => e.time = v.fixed64("Event.time_unix_nano")?,
                (2, v) => e.name = v.str("Event.name")?,
                (3, v) => drop(v.bytes("Event.attributes")?),
                (4, v) => e.dropped_attributes = v.u32("Event.dropped_attributes_count")?,
                _ => {}
            }
        }
        Ok(e)
    }

    fn attributes(&self) -> impl Iterator<Item = Result<(&'a str, Any<'a>), wire::Error>> {
        json::wire_pairs(self.buf, nesting::SPAN_ITEM, 3, "Event.attributes")
    }
}

/// Writes the events' JSON; `each` also sees every event with its index.
fn events_json(
    out: &mut String,
    span: &SpanView,
    mut each: impl FnMut(usize, &EventView) -> Result<(), ValueError>,
) -> Result<(), ValueError> {
    out.push('[');
    for (i, ev) in span.events.iter().enumerate() {
        let e = EventView::parse(ev)?;
        each(i, &e)?;
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"name\":");
        json::write_str(out, e.name);
        let _ = write!(
            out,
            ",\"timeUnixNano\":{},\"droppedAttributesCount\":{},\"attributes\":",
            e.time, e.dropped_attributes
        );
        json::write_pairs(out, e.attributes(), 1)?;
        out.push('}');
    }
    out.push(']');
    Ok(())
}

fn links_json(out: &mut String, span: &SpanView) -> Result<(), ValueError> {
    out.push('[');
    for (i, &buf) in span.links.iter().enumerate() {
        let (mut trace_id, mut span_id, mut trace_state) = (&[][..], &[][..], "");
        let (mut flags, mut dropped) = (0u32, 0u32);
        for f in wire::fields(buf, nesting::SPAN_ITEM) {
            match f? {
                (1, v) => trace_id = v.bytes("Link.trace_id")?,
                (2, v) => span_id = v.bytes("Link.span_id")?,
                (3, v) => trace_state = v.str("Link.trace_state")?,
                (4, v) => drop(v.bytes("Link.attributes")?),
                (5, v) => dropped = v.u32("Link.dropped_attributes_count")?,
                (6, v) => flags = v.fixed32("Link.flags")?,
                _ => {}
            }
        }
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"traceId\":\"");
        json::push_hex(out, trace_id);
        out.push_str("\",\"spanId\":\"");
        json::push_hex(out, span_id);
        out.push_str("\",\"traceState\":");
        json::write_str(out, trace_state);
        let _ = write!(
            out,
            ",\"flags\":{flags},\"droppedAttributesCount\":{dropped},\"attributes\":"
        );
        json::write_pairs(
            out,
            json::wire_pairs(buf, nesting::SPAN_ITEM, 4, "Link.attributes"),
            1,
        )?;
        out.push('}');
    }
    out.push(']');
    Ok(())
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
    /// Scratch for the hex of a patch id.
    id_hex: String,
}

impl PatchBuilders {
    fn append(
        &mut self,
        trace: &str,
        span: &str,
        service: &str,
        junjo_id: Option<&str>,
        index: usize,
        ev: &EventView,
    ) -> Result<(), ValueError> {
        let mut h = Sha256::new();
        h.update(trace.as_bytes());
        h.update(span.as_bytes());
        h.update((index as u64).to_be_bytes());
        h.update(ev.time.to_be_bytes());
        hex_into(&mut self.id_hex, &h.finalize()[..16]);
        self.patch_id.append_value(&self.id_hex);
        self.trace_id.append_value(trace);
        self.span_id.append_value(span);
        self.service_name.append_value(service);
        self.timestamp.append_value(ns(ev.time));
        self.junjo_id.append_option(junjo_id);
        const TAKEN: [&str; 4] = [
            "junjo.store.id",
            "junjo.store.name",
            "junjo.store.action",
            "junjo.state_json_patch",
        ];
        // The first value of each taken key, as the column text.
        let mut taken: [Option<Any>; 4] = [None; 4];
        for pair in ev.attributes() {
            let (key, value) = pair?;
            if let Some(i) = TAKEN.iter().position(|k| *k == key) {
                taken[i].get_or_insert(value);
            }
        }
        let text = |i: usize| taken[i].map(json::text_of).transpose().map(Option::flatten);
        self.store_id.append_option(text(0)?);
        self.store_name.append_option(text(1)?);
        self.action.append_option(text(2)?);
        self.patch_json.append_option(text(3)?);
        let rest = ev
            .attributes()
            .filter(|kv| !matches!(kv, Ok((key, _)) if TAKEN.contains(key)));
        let mut attrs = String::new();
        json::write_pairs(&mut attrs, rest, 1)?;
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
    use opentelemetry_proto::tonic::trace::v1::{
        span::{Event, Link},
        ResourceSpans, ScopeSpans, Span, Status,
    };

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
        let rows = convert_message(&request(vec![root, child], Some("svc"))).unwrap();
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
        let again = convert_message(&request(vec![span(0xab, 1, None)], None)).unwrap();
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
        let a = convert_message(&request(vec![s.clone()], None)).unwrap();
        let b = convert_message(&request(vec![s], None)).unwrap();
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
        let err = convert_message(&request(vec![span(1, 2, None), bad], None))
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "resource_spans[0].scope_spans[0].spans[1].trace_id is 5 bytes, expected 16"
        );
        let mut bad_parent = span(1, 1, None);
        bad_parent.parent_span_id = vec![1; 3];
        assert!(matches!(
            convert_message(&request(vec![bad_parent], None)),
            Err(Error::IdLength {
                field: "parent_span_id",
                ..
            })
        ));
        let rows = convert_message(&request(
            vec![span(0, 1, None), span(1, 0, None), span(1, 1, None)],
            None,
        ))
        .unwrap();
        assert_eq!(rows.spans.num_rows(), 1);
        assert_eq!(rows.rejected, 2);
    }

    /// A request using every field the converter reads.
    fn rich_request() -> ExportTraceServiceRequest {
        let mut root = span(0xab, 1, None);
        root.status = Some(Status {
            code: 1,
            message: "fine".into(),
        });
        root.trace_state = "k=v".into();
        root.flags = 1;
        root.attributes = vec![
            kv_str("junjo.id", "j1"),
            KeyValue {
                key: "nested".into(),
                value: Some(AnyValue {
                    value: Some(Value::KvlistValue(
                        opentelemetry_proto::tonic::common::v1::KeyValueList {
                            values: vec![kv_str("a", "b")],
                        },
                    )),
                }),
                key_strindex: 0,
            },
            KeyValue {
                key: "list".into(),
                value: Some(AnyValue {
                    value: Some(Value::ArrayValue(
                        opentelemetry_proto::tonic::common::v1::ArrayValue {
                            values: vec![
                                AnyValue {
                                    value: Some(Value::IntValue(-3)),
                                },
                                AnyValue {
                                    value: Some(Value::BytesValue(vec![1, 2])),
                                },
                            ],
                        },
                    )),
                }),
                key_strindex: 0,
            },
        ];
        root.events = vec![Event {
            name: "set_state".into(),
            time_unix_nano: 9,
            attributes: vec![kv_str("junjo.state_json_patch", "[]"), kv_str("x", "y")],
            dropped_attributes_count: 2,
        }];
        root.links = vec![Link {
            trace_id: vec![3; 16],
            span_id: vec![4; 8],
            trace_state: "t".into(),
            attributes: vec![kv_str("l", "m")],
            dropped_attributes_count: 1,
            flags: 5,
        }];
        let mut req = request(vec![root, span(0xab, 2, Some(1))], Some("svc"));
        req.resource_spans[0].schema_url = "https://schema".into();
        let scope = req.resource_spans[0].scope_spans[0].scope.as_mut().unwrap();
        scope.version = "1.0".into();
        scope.attributes = vec![kv_str("scope.attr", "v")];
        req
    }

    fn all_columns(rows: &TraceRows) -> Vec<Vec<Option<String>>> {
        [&rows.spans, &rows.state_patches]
            .iter()
            .flat_map(|b| b.columns())
            .map(|c| {
                let c = arrow::compute::cast(c, &DataType::Utf8).unwrap();
                let c = c.as_string::<i32>();
                (0..c.len())
                    .map(|i| c.is_valid(i).then(|| c.value(i).to_string()))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn unknown_fields_and_groups_anywhere_are_skipped() {
        let req = rich_request();
        let plain = convert_message(&req).unwrap();
        assert_eq!(plain.spans.num_rows(), 2);
        assert_eq!(plain.state_patches.num_rows(), 1);
        let links: serde_json::Value =
            serde_json::from_str(col(&plain.spans, "links_json").value(0)).unwrap();
        assert_eq!(
            links,
            serde_json::json!([{"traceId": "03".repeat(16), "spanId": "04".repeat(8),
                "traceState": "t", "flags": 5, "droppedAttributesCount": 1,
                "attributes": {"l": "m"}}])
        );
        let attrs: serde_json::Value =
            serde_json::from_str(col(&plain.spans, "attributes_json").value(0)).unwrap();
        assert_eq!(
            attrs,
            serde_json::json!({"nested": {"a": "b"}, "list": [-3, "0102"]})
        );
        assert_eq!(col(&plain.spans, "scope_version").value(0), "1.0");
        assert_eq!(col(&plain.spans, "trace_state").value(0), "k=v");
        assert_eq!(col(&plain.spans, "status_message").value(0), "fine");
        assert_eq!(col(&plain.state_patches, "patch_json").value(0), "[]");

        // Every message gets unknown fields (varint, fixed, bytes, a group)
        // appended; prost keeps them as unknown too, so this is still the
        // same request.
        let unknown: &[u8] = &[
            0xf8, 0x07, 0x2a, // field 127 varint
            0xfa, 0x07, 0x01, 0x00, // field 127 bytes
            0xfd, 0x07, 1, 2, 3, 4, // field 127 fixed32
            0xfb, 0x07, 0x08, 0x01, 0xfc, 0x07, // field 127 group
        ];
        let mut bytes = Vec::new();
        for rs in &req.resource_spans {
            let mut rs_bytes = Vec::new();
            let mut resource = rs.resource.clone().unwrap().encode_to_vec();
            resource.extend_from_slice(unknown);
            prost::encoding::bytes::encode(1, &resource, &mut rs_bytes);
            for ss in &rs.scope_spans {
                let mut ss_bytes = ss.encode_to_vec();
                ss_bytes.extend_from_slice(unknown);
                for sp in &ss.spans {
                    let mut sp_bytes = sp.encode_to_vec();
                    sp_bytes.extend_from_slice(unknown);
                    prost::encoding::bytes::encode(2, &sp_bytes, &mut ss_bytes);
                }
                prost::encoding::bytes::encode(2, &ss_bytes, &mut rs_bytes);
            }
            rs_bytes.extend_from_slice(unknown);
            prost::encoding::bytes::encode(1, &rs_bytes, &mut bytes);
        }
        bytes.extend_from_slice(unknown);
        assert!(ExportTraceServiceRequest::decode(&bytes[..]).is_ok());
        let noisy = convert(&bytes).unwrap();
        // The spans were appended twice to their scope: rows repeat.
        assert_eq!(noisy.spans.num_rows(), 4);
        let (a, b) = (all_columns(&plain), all_columns(&noisy));
        for (ca, cb) in a.iter().zip(&b) {
            assert_eq!(ca[..], cb[..ca.len()]);
        }
    }

    #[test]
    fn malformed_bytes_are_refused_with_their_place() {
        let good = rich_request().encode_to_vec();
        // Invalid UTF-8 in a field that is never stored (the scope
        // attribute's value) is refused, as prost refuses it.
        let mut bad = good.clone();
        let pos = bad.windows(1).position(|w| w == b"v").unwrap();
        let pos = bad[pos..]
            .windows(10)
            .position(|w| w == b"scope.attr")
            .unwrap()
            + pos;
        bad[pos] = 0xff;
        assert!(ExportTraceServiceRequest::decode(&bad[..]).is_err());
        let err = convert(&bad).err().unwrap().to_string();
        assert_eq!(
            err,
            "malformed protobuf request: resource_spans[0].scope_spans[0].scope: KeyValue.key: invalid UTF-8"
        );
        // Truncated: refused, never a panic.
        for cut in 0..good.len() {
            let _ = convert(&good[..cut]);
        }
        assert!(convert(&good[..good.len() - 3]).is_err());
        // A singular message twice is refused rather than merged.
        let mut twice = Vec::new();
        let mut rs = Vec::new();
        let resource = Resource::default().encode_to_vec();
        prost::encoding::bytes::encode(1, &resource, &mut rs);
        prost::encoding::bytes::encode(1, &resource, &mut rs);
        prost::encoding::bytes::encode(1, &rs, &mut twice);
        assert_eq!(
            convert(&twice).err().unwrap().to_string(),
            "malformed protobuf request: resource_spans[0]: ResourceSpans.resource set twice"
        );
        // A known field with the wrong wire type.
        assert_eq!(
            convert(&[0x08, 0x01]).err().unwrap().to_string(),
            "malformed protobuf request: resource_spans[0]: ExportTraceServiceRequest.resource_spans: wire type is not length-delimited"
        );
    }

    #[test]
    fn set_state_patches_count_their_copies_of_the_junjo_id() {
        let mut sp = span(0xcd, 1, None);
        sp.attributes = vec![kv_str("junjo.id", &"A".repeat(150_000))];
        let ev = Event {
            name: "set_state".into(),
            ..Default::default()
        };
        // 2,000 patches × a 150 KB id: 300 MB of copies from a 300 KB request.
        sp.events = vec![ev; 2_000];
        let Err(err) = convert_message(&request(vec![sp.clone()], Some("svc"))) else {
            panic!("2,000 copies of a 150 KB id were accepted");
        };
        assert!(err.to_string().contains("set_state patches"), "{err}");
        sp.events.truncate(100);
        let rows = convert_message(&request(vec![sp], Some("svc"))).unwrap();
        assert_eq!(rows.state_patches.num_rows(), 100);
    }

    #[test]
    fn whatever_the_converter_accepts_prost_decodes_too() {
        // ReadSpans and older tools decode WAL entries with prost: the
        // converter must never accept bytes prost refuses. Random damage to a
        // valid request, checked both ways.
        use rand::{Rng, SeedableRng};
        let good = rich_request().encode_to_vec();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
            if convert(&b).is_ok() {
                accepted += 1;
                assert!(
                    ExportTraceServiceRequest::decode(&b[..]).is_ok(),
                    "accepted what prost refuses: {b:?}"
                );
            }
        }
        assert!(accepted > 100, "{accepted}");

        // Cases random damage does not reach, each checked against prost.
        let refuse = |b: &[u8], why: &str| {
            assert!(ExportTraceServiceRequest::decode(b).is_err(), "{why}");
            let err = convert(b)
                .err()
                .unwrap_or_else(|| panic!("accepted: {why}"));
            assert!(err.to_string().contains(why), "{err}");
        };
        let accept = |b: &[u8]| {
            assert!(ExportTraceServiceRequest::decode(b).is_ok());
            convert(b).unwrap()
        };
        // A Junjo value replaced by a later one of its column (the same key,
        // or the other contract's) is stored nowhere, but prost decodes it.
        let kvlist = |key: &[u8]| field(6, &field(1, &field(1, key)));
        let x = field(1, b"x");
        for (first, second) in [
            ("junjo.id", "junjo.id"),
            ("junjo.id", "junjo.executable_runtime_id"),
            ("junjo.workflow.state.end", "junjo.workflow.state.end"),
        ] {
            let bad = [attr(first, &kvlist(b"\xff")), attr(second, &x)].concat();
            refuse(&raw_span_request(&bad), "KeyValue.key: invalid UTF-8");
            let good = [attr(first, &kvlist(b"k")), attr(second, &x)].concat();
            let rows = accept(&raw_span_request(&good));
            let junjo_id = col(&rows.spans, "junjo_id");
            let expected = (first == "junjo.id").then_some("x");
            assert_eq!(junjo_id.is_valid(0).then(|| junjo_id.value(0)), expected);
        }
        // An unknown group deep inside a value: prost counts its levels and
        // the messages around it against one limit.
        let arrays = 25;
        let value_depth = nesting::SPAN_ITEM + 1 + 2 * arrays;
        let most = wire::RECURSION_LIMIT - 1 - value_depth;
        let deep = |groups: usize| {
            let mut v = [field(1, b"leaf"), nested_groups(groups)].concat();
            for _ in 0..arrays {
                v = field(5, &field(1, &v));
            }
            raw_span_request(&attr("deep", &v))
        };
        accept(&deep(most));
        refuse(&deep(most + 1), "recursion limit reached");
    }

    /// A length-delimited field `tag` holding `inner`.
    fn field(tag: u32, inner: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::bytes::encode(tag, &inner.to_vec(), &mut out);
        out
    }

    /// A `Span.attributes` field: `key` and an `AnyValue`'s bytes.
    fn attr(key: &str, value: &[u8]) -> Vec<u8> {
        field(9, &[field(1, key.as_bytes()), field(2, value)].concat())
    }

    /// A request of one span, whose bytes end with `extra`.
    fn raw_span_request(extra: &[u8]) -> Vec<u8> {
        let mut sp = span(1, 1, None).encode_to_vec();
        sp.extend_from_slice(extra);
        field(1, &field(2, &field(2, &sp)))
    }

    /// An unknown field (15) of `levels` nested groups, the innermost
    /// holding a varint.
    fn nested_groups(levels: usize) -> Vec<u8> {
        const START: u8 = (15 << 3) | 3;
        const END: u8 = (15 << 3) | 4;
        let mut out = vec![START; levels];
        out.extend_from_slice(&[8, 1]);
        out.extend(std::iter::repeat_n(END, levels));
        out
    }
}
