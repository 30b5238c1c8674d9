//! OTLP logs → `logs` rows.
//!
//! Columns are documented in the README ("Tables"). Rules:
//! - `timestamp` is the record's `time_unix_nano`, or its observed time when
//!   the source gave none; [`stamp_observed`] fills a missing observed time
//!   with the receive time *before* the request goes into the WAL, so replay
//!   derives the same rows;
//! - `severity_text` / `event_name` are NULL when empty; `severity_number` is
//!   the OTLP number (0 = unspecified);
//! - `body` is the body as text (strings as-is, anything else as JSON) and
//!   `body_json` the body as JSON (see [`super::json`]);
//! - `trace_id` / `span_id` are lowercase hex, NULL when absent; a present id
//!   of the wrong length fails the whole request (INVALID_ARGUMENT);
//! - `service_name` as for spans (`service.name`, else `NO_SERVICE_NAME`).

use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, Int32Builder, StringBuilder, TimestampNanosecondBuilder, UInt32Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;

use super::json;
use super::otlp_trace::{check_id, hex_into, non_empty, ns, resource_ctx, ts_type, Error};

pub const LOGS: &str = "logs";

/// The `logs` table schema.
pub static LOGS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let s = |n: &str| Field::new(n, DataType::Utf8, false);
    let ns = |n: &str| Field::new(n, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
        Field::new("timestamp", ts_type(), false),
        Field::new("observed_timestamp", ts_type(), false),
        s("service_name"),
        Field::new("severity_number", DataType::Int32, false),
        ns("severity_text"),
        ns("body"),
        s("body_json"),
        s("attributes_json"),
        s("resource_attributes_json"),
        ns("scope_name"),
        ns("scope_version"),
        ns("trace_id"),
        ns("span_id"),
        Field::new("flags", DataType::UInt32, false),
        ns("event_name"),
        Field::new("dropped_attributes_count", DataType::UInt32, false),
    ]))
});

/// Number of log records in a request.
pub fn count(req: &ExportLogsServiceRequest) -> usize {
    req.resource_logs
        .iter()
        .flat_map(|r| &r.scope_logs)
        .map(|s| s.log_records.len())
        .sum()
}

/// Sets `observed_time_unix_nano` of records that have none to `now_ns`.
pub fn stamp_observed(req: &mut ExportLogsServiceRequest, now_ns: u64) {
    for rec in req
        .resource_logs
        .iter_mut()
        .flat_map(|r| &mut r.scope_logs)
        .flat_map(|s| &mut s.log_records)
    {
        if rec.observed_time_unix_nano == 0 {
            rec.observed_time_unix_nano = now_ns;
        }
    }
}

#[derive(Default)]
struct Builders {
    timestamp: TimestampNanosecondBuilder,
    observed: TimestampNanosecondBuilder,
    service_name: StringBuilder,
    severity_number: Int32Builder,
    severity_text: StringBuilder,
    body: StringBuilder,
    body_json: StringBuilder,
    attributes_json: StringBuilder,
    resource_attributes_json: StringBuilder,
    scope_name: StringBuilder,
    scope_version: StringBuilder,
    trace_id: StringBuilder,
    span_id: StringBuilder,
    flags: UInt32Builder,
    event_name: StringBuilder,
    dropped_attributes: UInt32Builder,
}

/// Validates and converts a whole request.
pub fn convert(req: &ExportLogsServiceRequest) -> Result<RecordBatch, Error> {
    let mut b = Builders::default();
    let mut buf = String::new();
    let mut repeated = 0;
    for (ri, rl) in req.resource_logs.iter().enumerate() {
        let (service, res_json) = resource_ctx(rl.resource.as_ref(), || {
            format!("resource_logs[{ri}].resource")
        })?;
        for (si, sl) in rl.scope_logs.iter().enumerate() {
            let scope = sl.scope.as_ref();
            let shared = res_json.len() + scope.map_or(0, |s| s.name.len() + s.version.len());
            json::repeat_bytes(&mut repeated, shared, sl.log_records.len()).map_err(|source| {
                Error::Nesting {
                    at: format!("resource_logs[{ri}].scope_logs[{si}]"),
                    source,
                }
            })?;
            for (li, rec) in sl.log_records.iter().enumerate() {
                let at = || format!("resource_logs[{ri}].scope_logs[{si}].log_records[{li}]");
                check_id(&at, "trace_id", &rec.trace_id, 16, true)?;
                check_id(&at, "span_id", &rec.span_id, 8, true)?;
                let nesting = |source| Error::Nesting { at: at(), source };
                let attrs = json::attrs_to_string(&rec.attributes).map_err(nesting)?;
                let mut body_json = String::new();
                json::write_any(&mut body_json, rec.body.as_ref(), 0).map_err(nesting)?;
                let body = json::value_as_text(rec.body.as_ref()).map_err(nesting)?;

                let time = if rec.time_unix_nano != 0 {
                    rec.time_unix_nano
                } else {
                    rec.observed_time_unix_nano
                };
                b.timestamp.append_value(ns(time));
                b.observed.append_value(ns(rec.observed_time_unix_nano));
                b.service_name.append_value(service);
                b.severity_number.append_value(rec.severity_number);
                b.severity_text.append_option(non_empty(&rec.severity_text));
                b.body.append_option(body);
                b.body_json.append_value(&body_json);
                b.attributes_json.append_value(&attrs);
                b.resource_attributes_json.append_value(&res_json);
                b.scope_name
                    .append_option(scope.map(|s| s.name.as_str()).and_then(non_empty));
                b.scope_version
                    .append_option(scope.map(|s| s.version.as_str()).and_then(non_empty));
                for (col, id) in [
                    (&mut b.trace_id, &rec.trace_id),
                    (&mut b.span_id, &rec.span_id),
                ] {
                    if id.is_empty() || id.iter().all(|x| *x == 0) {
                        col.append_null();
                    } else {
                        hex_into(&mut buf, id);
                        col.append_value(&buf);
                    }
                }
                b.flags.append_value(rec.flags);
                b.event_name.append_option(non_empty(&rec.event_name));
                b.dropped_attributes
                    .append_value(rec.dropped_attributes_count);
            }
        }
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(b.timestamp.finish().with_timezone("UTC")),
        Arc::new(b.observed.finish().with_timezone("UTC")),
        Arc::new(b.service_name.finish()),
        Arc::new(b.severity_number.finish()),
        Arc::new(b.severity_text.finish()),
        Arc::new(b.body.finish()),
        Arc::new(b.body_json.finish()),
        Arc::new(b.attributes_json.finish()),
        Arc::new(b.resource_attributes_json.finish()),
        Arc::new(b.scope_name.finish()),
        Arc::new(b.scope_version.finish()),
        Arc::new(b.trace_id.finish()),
        Arc::new(b.span_id.finish()),
        Arc::new(b.flags.finish()),
        Arc::new(b.event_name.finish()),
        Arc::new(b.dropped_attributes.finish()),
    ];
    Ok(RecordBatch::try_new(LOGS_SCHEMA.clone(), cols).expect("logs columns match LOGS_SCHEMA"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray, Int32Array};
    use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValueList};
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::resource::v1::Resource;

    use crate::ingest::otlp_trace::kv_str;

    fn request(records: Vec<LogRecord>) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![kv_str("service.name", "svc")],
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    log_records: records,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn converts_bodies_ids_and_times() {
        let kv_body = AnyValue {
            value: Some(Value::KvlistValue(KeyValueList {
                values: vec![kv_str("k", "v")],
            })),
        };
        let mut req = request(vec![
            LogRecord {
                time_unix_nano: 5,
                observed_time_unix_nano: 7,
                severity_number: 9,
                severity_text: "INFO".into(),
                body: Some(AnyValue {
                    value: Some(Value::StringValue("hello \"x\"".into())),
                }),
                trace_id: vec![1; 16],
                span_id: vec![2; 8],
                ..Default::default()
            },
            LogRecord {
                body: Some(kv_body),
                ..Default::default()
            },
        ]);
        stamp_observed(&mut req, 1_000);
        let b = convert(&req).unwrap();
        assert_eq!(b.num_rows(), 2);
        let ts = b
            .column_by_name("timestamp")
            .unwrap()
            .as_primitive::<arrow::datatypes::TimestampNanosecondType>();
        assert_eq!((ts.value(0), ts.value(1)), (5, 1_000));
        let s = |c: &str| b.column_by_name(c).unwrap().as_string::<i32>().clone();
        assert_eq!(s("body").value(0), "hello \"x\"");
        assert_eq!(s("body_json").value(0), "\"hello \\\"x\\\"\"");
        assert_eq!(s("body_json").value(1), "{\"k\":\"v\"}");
        assert_eq!(s("trace_id").value(0), "01".repeat(16));
        assert!(s("trace_id").is_null(1) && s("severity_text").is_null(1));
        assert_eq!(s("service_name").value(1), "svc");
        let sev = b.column_by_name("severity_number").unwrap();
        let sev = sev.as_any().downcast_ref::<Int32Array>().unwrap();
        assert_eq!(sev.value(0), 9);
    }

    #[test]
    fn rejects_bad_ids() {
        let req = request(vec![LogRecord {
            span_id: vec![1; 3],
            ..Default::default()
        }]);
        let err = convert(&req).unwrap_err().to_string();
        assert_eq!(
            err,
            "resource_logs[0].scope_logs[0].log_records[0].span_id is 3 bytes, expected 8"
        );
    }
}
