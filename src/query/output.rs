//! Result encodings: JSON (`{"columns","rows"}` or row objects), CSV, Arrow IPC stream.
//!
//! JSON cell rules: integers and finite floats are numbers (int64 beyond 2^53
//! loses precision in JavaScript clients; use Arrow for exact values), NaN and
//! ±inf are the strings `"NaN"`, `"inf"`, `"-inf"`, timestamps are RFC 3339 UTC
//! strings with nanoseconds, dates `YYYY-MM-DD`, binary is lowercase hex, and
//! anything else (lists, structs, decimals, intervals) is its display string.

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, SchemaRef,
    TimeUnit, TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::execution::memory_pool::MemoryReservation;
use serde_json::Value;

/// RFC 3339 UTC with nanoseconds, e.g. `2026-11-22T10:00:00.123456789Z`.
pub fn rfc3339_nanos(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn float(v: f64) -> Value {
    match serde_json::Number::from_f64(v) {
        Some(n) => Value::Number(n),
        None if v.is_nan() => Value::from("NaN"),
        None if v > 0.0 => Value::from("inf"),
        None => Value::from("-inf"),
    }
}

/// One cell as JSON.
pub fn cell(col: &dyn Array, row: usize) -> Value {
    // A NullArray (an untyped NULL) has no validity buffer: is_null is false.
    if col.is_null(row) || col.data_type() == &DataType::Null {
        return Value::Null;
    }
    match col.data_type() {
        DataType::Boolean => Value::Bool(col.as_boolean().value(row)),
        DataType::Int8 => col.as_primitive::<Int8Type>().value(row).into(),
        DataType::Int16 => col.as_primitive::<Int16Type>().value(row).into(),
        DataType::Int32 => col.as_primitive::<Int32Type>().value(row).into(),
        DataType::Int64 => col.as_primitive::<Int64Type>().value(row).into(),
        DataType::UInt8 => col.as_primitive::<UInt8Type>().value(row).into(),
        DataType::UInt16 => col.as_primitive::<UInt16Type>().value(row).into(),
        DataType::UInt32 => col.as_primitive::<UInt32Type>().value(row).into(),
        DataType::UInt64 => col.as_primitive::<UInt64Type>().value(row).into(),
        DataType::Float32 => float(col.as_primitive::<Float32Type>().value(row) as f64),
        DataType::Float64 => float(col.as_primitive::<Float64Type>().value(row)),
        DataType::Utf8 => col.as_string::<i32>().value(row).into(),
        DataType::LargeUtf8 => col.as_string::<i64>().value(row).into(),
        DataType::Utf8View => col.as_string_view().value(row).into(),
        DataType::Binary => hex::encode(col.as_binary::<i32>().value(row)).into(),
        DataType::LargeBinary => hex::encode(col.as_binary::<i64>().value(row)).into(),
        DataType::BinaryView => hex::encode(col.as_binary_view().value(row)).into(),
        DataType::Timestamp(unit, _) => {
            let t = match unit {
                TimeUnit::Second => chrono::DateTime::from_timestamp(
                    col.as_primitive::<TimestampSecondType>().value(row),
                    0,
                ),
                TimeUnit::Millisecond => chrono::DateTime::from_timestamp_millis(
                    col.as_primitive::<TimestampMillisecondType>().value(row),
                ),
                TimeUnit::Microsecond => chrono::DateTime::from_timestamp_micros(
                    col.as_primitive::<TimestampMicrosecondType>().value(row),
                ),
                TimeUnit::Nanosecond => Some(chrono::DateTime::from_timestamp_nanos(
                    col.as_primitive::<TimestampNanosecondType>().value(row),
                )),
            };
            // Seconds and milliseconds reach past what nanoseconds since
            // 1970 can hold (year 2262); beyond chrono's range, Arrow's text.
            match t {
                Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true).into(),
                None => display(col, row),
            }
        }
        DataType::List(_) => list(col.as_list::<i32>().value(row)),
        DataType::LargeList(_) => list(col.as_list::<i64>().value(row)),
        _ => display(col, row),
    }
}

fn list(values: ArrayRef) -> Value {
    Value::Array(
        (0..values.len())
            .map(|i| cell(values.as_ref(), i))
            .collect(),
    )
}

fn display(col: &dyn Array, row: usize) -> Value {
    match ArrayFormatter::try_new(col, &FormatOptions::default()) {
        Ok(f) => Value::from(f.value(row).to_string()),
        Err(_) => Value::Null,
    }
}

/// `{"columns": [{"name","type"}], "rows": [[...]]}`, written row by row
/// (no JSON tree of the whole result in memory).
pub fn json_table(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let columns: Vec<Value> = schema
        .fields()
        .iter()
        .map(|f| serde_json::json!({"name": f.name(), "type": f.data_type().to_string()}))
        .collect();
    out.write_all(b"{\"columns\":")?;
    serde_json::to_writer(&mut *out, &columns)?;
    out.write_all(b",\"rows\":[")?;
    let mut first = true;
    for b in batches {
        for r in 0..b.num_rows() {
            if !first {
                out.write_all(b",")?;
            }
            first = false;
            let row: Vec<Value> = b.columns().iter().map(|c| cell(c.as_ref(), r)).collect();
            serde_json::to_writer(&mut *out, &row)?;
        }
    }
    out.write_all(b"]}")
}

/// An encoded answer whose buffer is counted in the query memory the
/// result holds, always at least its capacity (the buffer grows only after
/// the reservation did): an answer that does not fit fails instead of
/// growing past `--query-memory` (JSON can be six times the result's size:
/// `\u0001` for each control character).
pub struct Body<'a> {
    buf: Vec<u8>,
    counted: usize,
    memory: &'a mut MemoryReservation,
    exceeded: bool,
}

/// The smallest buffer allocated.
const BODY_MIN: usize = 4096;

impl<'a> Body<'a> {
    pub fn new(memory: &'a mut MemoryReservation) -> Self {
        Self {
            buf: Vec::new(),
            counted: 0,
            memory,
            exceeded: false,
        }
    }

    /// Whether writing failed because the answer outgrew the query memory.
    pub fn exceeded(&self) -> bool {
        self.exceeded
    }

    /// The bytes written, and the bytes of query memory counted for them.
    pub fn finish(self) -> (Vec<u8>, usize) {
        (self.buf, self.counted)
    }
}

impl std::io::Write for Body<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let needed = self.buf.len() + data.len();
        if needed > self.buf.capacity() {
            let capacity = needed.max(2 * self.buf.capacity()).max(BODY_MIN);
            if capacity > self.counted {
                if self.memory.try_grow(capacity - self.counted).is_err() {
                    self.exceeded = true;
                    return Err(std::io::Error::other("the answer outgrew the query memory"));
                }
                self.counted = capacity;
            }
            self.buf.reserve_exact(capacity - self.buf.len());
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One JSON object per row, comma-separated (the caller brackets a list),
/// written row by row with the keys in name order. Columns for which
/// `parse_json(name)` is true hold JSON text: embedded as it is when it
/// parses, as a string when it does not. No JSON tree is built: the answer
/// is the only copy, and [`Body`] counts it.
pub fn json_objects(
    batches: &[RecordBatch],
    parse_json: impl Fn(&str) -> bool,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let mut first = true;
    for b in batches {
        let schema = b.schema();
        let mut order: Vec<usize> = (0..b.num_columns()).collect();
        order.sort_by_key(|&i| schema.field(i).name());
        let keys = order
            .iter()
            .map(|&i| serde_json::to_string(schema.field(i).name()).map(|k| k + ":"))
            .collect::<Result<Vec<_>, _>>()?;
        let parsed: Vec<bool> = order
            .iter()
            .map(|&i| parse_json(schema.field(i).name()))
            .collect();
        for r in 0..b.num_rows() {
            out.write_all(if first { b"{" } else { b",{" })?;
            first = false;
            for (k, &i) in order.iter().enumerate() {
                if k > 0 {
                    out.write_all(b",")?;
                }
                out.write_all(keys[k].as_bytes())?;
                match cell(b.column(i).as_ref(), r) {
                    Value::String(s) if parsed[k] && is_json(&s) => out.write_all(s.as_bytes())?,
                    v => serde_json::to_writer(&mut *out, &v)?,
                }
            }
            out.write_all(b"}")?;
        }
    }
    Ok(())
}

/// Whether `text` is one whole JSON value that serde_json would parse
/// (at most 127 levels deep, no lone surrogate escapes), checked without
/// building it: embedded, it must not break the client's parser.
fn is_json(text: &str) -> bool {
    serde_json::from_str::<Checked>(text).is_ok()
}

/// A JSON value that was parsed and dropped ([`is_json`]). Unlike
/// `IgnoredAny`, it goes through serde_json's depth limit and string checks.
struct Checked;

impl<'de> serde::Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Checked)
    }
}

impl<'de> serde::de::Visitor<'de> for Checked {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_key::<Checked>()?.is_some() {
            map.next_value::<Checked>()?;
        }
        Ok(Checked)
    }
}

pub fn csv(batches: &[RecordBatch], out: &mut impl std::io::Write) -> Result<(), ArrowError> {
    let mut w = arrow::csv::WriterBuilder::new()
        .with_header(true)
        .build(out);
    for b in batches {
        w.write(b)?;
    }
    Ok(())
}

pub fn arrow_stream(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    out: &mut impl std::io::Write,
) -> Result<(), ArrowError> {
    let mut w = arrow::ipc::writer::StreamWriter::try_new(out, schema)?;
    for b in batches {
        w.write(b)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        Float64Array, Int64Array, NullArray, StringArray, TimestampNanosecondArray,
        TimestampSecondArray,
    };
    use std::sync::Arc;

    #[test]
    fn cells_follow_the_documented_rules() {
        assert_eq!(
            rfc3339_nanos(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456789Z"
        );
        let f = Float64Array::from(vec![
            Some(1.5),
            Some(f64::NAN),
            Some(f64::NEG_INFINITY),
            None,
        ]);
        let got: Vec<Value> = (0..4).map(|i| cell(&f, i)).collect();
        assert_eq!(
            got,
            vec![Value::from(1.5), "NaN".into(), "-inf".into(), Value::Null]
        );
        let i = Int64Array::from(vec![i64::MIN]);
        assert_eq!(cell(&i, 0), Value::from(i64::MIN));
        let ts = TimestampNanosecondArray::from(vec![0]).with_timezone("UTC");
        assert_eq!(cell(&ts, 0), Value::from("1970-01-01T00:00:00.000000000Z"));
        // Past 2262 in seconds: the date itself, not the largest nanosecond.
        let far = TimestampSecondArray::from(vec![32_503_680_000]);
        assert_eq!(cell(&far, 0), Value::from("3000-01-01T00:00:00.000000000Z"));
        // An untyped NULL (`SELECT NULL`) is null, not an empty string.
        assert_eq!(cell(&NullArray::new(2), 1), Value::Null);
    }

    #[test]
    fn objects_embed_json_columns() {
        let b = RecordBatch::try_from_iter([
            (
                "name",
                Arc::new(StringArray::from(vec![r#"{"k":1}"#, "x"])) as _,
            ),
            (
                "a_json",
                Arc::new(StringArray::from(vec![
                    Some(r#"{"z":[1,2],"a":null}"#),
                    None,
                ])) as _,
            ),
            (
                "b_json",
                Arc::new(StringArray::from(vec![r#"{"k":1} trailing"#, "[1,"])) as _,
            ),
        ])
        .unwrap();
        let mut out = Vec::new();
        json_objects(
            &[b.clone(), b.slice(0, 0), b.slice(1, 1)],
            |n| n.ends_with("_json"),
            &mut out,
        )
        .unwrap();
        // Keys in name order; JSON text embedded as it is; text that is not
        // one JSON value (or not a JSON column) stays a string.
        let row0 =
            r#"{"a_json":{"z":[1,2],"a":null},"b_json":"{\"k\":1} trailing","name":"{\"k\":1}"}"#;
        let row1 = r#"{"a_json":null,"b_json":"[1,","name":"x"}"#;
        // What serde_json (and so most clients) would refuse stays text:
        // about 128 levels deep or more, a lone surrogate.
        assert!(is_json(&format!("{}{}", "[".repeat(100), "]".repeat(100))));
        assert!(!is_json(&format!("{}{}", "[".repeat(200), "]".repeat(200))));
        assert!(!is_json(r#"{"a":"\ud800"}"#));
        assert!(!is_json(r#"{"\ud800":1}"#));
        assert!(is_json(
            r#"{"a":"\ud83d\ude00","b":[1.5e3,-2,true,null,{}]}"#
        ));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{row0},{row1},{row1}")
        );
    }
}
