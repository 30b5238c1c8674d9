//! OTLP `AnyValue` / attributes → JSON text, written straight into a buffer.
//!
//! Mapping: string → string, bool → bool, int → number, double → number
//! (NaN/±Infinity as the strings `"NaN"`, `"Infinity"`, `"-Infinity"`, as in
//! the proto3 JSON mapping), bytes → lowercase hex string, array → array,
//! kvlist → object, unset → null. Nesting deeper than [`MAX_DEPTH`] is refused.

use std::fmt::Write;

use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};

use super::wire;

pub const MAX_DEPTH: usize = 32;

/// Why a value could not be written.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ValueError {
    #[error("attribute value nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// See [`MAX_REPEATED_BYTES`].
    #[error("resource and scope fields are stored on every item (and a span's service and junjo.id on each of its set_state patches), and this request's copies come to more than {MAX_REPEATED_BYTES} bytes; send fewer items per request or smaller repeated values")]
    Repeated,
    /// Only values read straight from protobuf bytes can be malformed.
    #[error("{0}")]
    Malformed(#[from] wire::Error),
}

/// Most bytes of resource and scope text (resource attributes JSON, scope
/// name and version; metric name, description and unit) one request may
/// repeat across its rows. Every row stores its own copy, so a 1 MiB resource
/// attribute over 15,000 small spans would otherwise take 15 GiB to convert.
pub const MAX_REPEATED_BYTES: usize = 256 << 20;

/// Adds `bytes` times `rows` to `total`, the request's repeated bytes so far.
pub fn repeat_bytes(total: &mut usize, bytes: usize, rows: usize) -> Result<(), ValueError> {
    *total = total.saturating_add(bytes.saturating_mul(rows));
    match *total > MAX_REPEATED_BYTES {
        true => Err(ValueError::Repeated),
        false => Ok(()),
    }
}

/// One `AnyValue`, from a decoded message or straight from protobuf bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Any<'a> {
    Null,
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
    Bytes(&'a [u8]),
    /// An index into a profiles string table; traces have no such table.
    StrIndex(i32),
    Array(Values<'a>),
    Kvlist(Pairs<'a>),
}

/// The items of an array value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Values<'a> {
    Decoded(&'a [AnyValue]),
    /// An `ArrayValue` message and its depth ([`wire::fields`]): the items
    /// are field 1.
    Wire(&'a [u8], usize),
}

/// The items of a key/value list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pairs<'a> {
    Decoded(&'a [KeyValue]),
    /// A `KeyValueList` message and its depth ([`wire::fields`]): the items
    /// are field 1.
    Wire(&'a [u8], usize),
}

impl<'a> From<Option<&'a AnyValue>> for Any<'a> {
    fn from(v: Option<&'a AnyValue>) -> Self {
        match v.and_then(|v| v.value.as_ref()) {
            None => Any::Null,
            Some(Value::StringValue(s)) => Any::Str(s),
            Some(Value::BoolValue(b)) => Any::Bool(*b),
            Some(Value::IntValue(i)) => Any::Int(*i),
            Some(Value::DoubleValue(d)) => Any::Double(*d),
            Some(Value::BytesValue(b)) => Any::Bytes(b),
            Some(Value::ArrayValue(a)) => Any::Array(Values::Decoded(&a.values)),
            Some(Value::KvlistValue(kv)) => Any::Kvlist(Pairs::Decoded(&kv.values)),
            Some(Value::StringValueStrindex(i)) => Any::StrIndex(*i),
        }
    }
}

/// An `AnyValue` message's bytes, `depth` messages down
/// ([`wire::fields`]). More than one value set is refused (prost would keep
/// the last, or merge two lists; no encoder sends either).
#[inline]
pub fn wire_any(buf: &[u8], depth: usize) -> Result<Any<'_>, wire::Error> {
    const W: &str = "AnyValue";
    let mut out = Any::Null;
    for f in wire::fields(buf, depth) {
        let (n, v) = f?;
        let value = match n {
            1 => Any::Str(v.str("AnyValue.string_value")?),
            2 => Any::Bool(v.varint("AnyValue.bool_value")? != 0),
            3 => Any::Int(v.varint("AnyValue.int_value")? as i64),
            4 => Any::Double(f64::from_bits(v.fixed64("AnyValue.double_value")?)),
            5 => Any::Array(Values::Wire(v.bytes("AnyValue.array_value")?, depth + 1)),
            6 => Any::Kvlist(Pairs::Wire(v.bytes("AnyValue.kvlist_value")?, depth + 1)),
            7 => Any::Bytes(v.bytes("AnyValue.bytes_value")?),
            8 => Any::StrIndex(v.i32("AnyValue.string_value_strindex")?),
            _ => continue,
        };
        if out != Any::Null {
            return Err(wire::Error(format!("{W}: more than one value set").into()));
        }
        out = value;
    }
    Ok(out)
}

/// A `KeyValue` message's bytes, `depth` messages down: key and value (a
/// repeated value is refused).
#[inline]
pub fn wire_pair(buf: &[u8], depth: usize) -> Result<(&str, Any<'_>), wire::Error> {
    let (mut key, mut value) = ("", None);
    for f in wire::fields(buf, depth) {
        match f? {
            (1, v) => key = v.str("KeyValue.key")?,
            (2, v) => {
                if value.is_some() {
                    return Err(wire::Error("KeyValue: value set twice".into()));
                }
                value = Some(wire_any(v.bytes("KeyValue.value")?, depth + 1)?);
            }
            (3, v) => {
                v.i32("KeyValue.key_strindex")?;
            }
            _ => {}
        }
    }
    Ok((key, value.unwrap_or(Any::Null)))
}

/// The `KeyValue`s at field `field` of a message's bytes (`depth` messages
/// down), in order.
pub fn wire_pairs<'a>(
    buf: &'a [u8],
    depth: usize,
    field: u32,
    what: &'static str,
) -> impl Iterator<Item = Result<(&'a str, Any<'a>), wire::Error>> {
    wire::fields(buf, depth).filter_map(move |f| match f {
        Ok((n, v)) if n == field => Some(v.bytes(what).and_then(|kv| wire_pair(kv, depth + 1))),
        Ok(_) => None,
        Err(e) => Some(Err(e)),
    })
}

/// Appends `s` as a JSON string literal.
pub fn write_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    loop {
        let i = next_escape(bytes, start);
        // `i` is at an ASCII byte or the end, `start` just after one: both
        // are char boundaries.
        out.push_str(&s[start..i]);
        let Some(&b) = bytes.get(i) else { break };
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            _ => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    out.push('"');
}

/// The index of the first byte at or after `from` that a JSON string must
/// escape (`"`, `\`, below 0x20), or `bytes.len()`. Eight bytes per step:
/// attribute values are mostly long runs of plain text.
#[inline]
fn next_escape(bytes: &[u8], from: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // High bit of each byte that is zero (exact for the lowest such byte,
    // which is all `trailing_zeros` reads; a borrow only runs upwards).
    let zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGH;
    let mut i = from;
    let mut chunks = bytes[from.min(bytes.len())..].chunks_exact(8);
    for chunk in &mut chunks {
        let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        let control = w.wrapping_sub(0x20 * ONES) & !w & HIGH;
        let hit =
            control | zero(w ^ (u64::from(b'"') * ONES)) | zero(w ^ (u64::from(b'\\') * ONES));
        if hit != 0 {
            return i + (hit.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    for &b in chunks.remainder() {
        if b < 0x20 || b == b'"' || b == b'\\' {
            return i;
        }
        i += 1;
    }
    i
}

/// Appends `bytes` as lowercase hex.
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(2 * bytes.len());
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
}

pub fn write_f64(out: &mut String, v: f64) {
    match serde_json::Number::from_f64(v) {
        Some(n) => {
            let _ = write!(out, "{n}");
        }
        None if v.is_nan() => out.push_str("\"NaN\""),
        None if v > 0.0 => out.push_str("\"Infinity\""),
        None => out.push_str("\"-Infinity\""),
    }
}

pub fn write_any(out: &mut String, v: Option<&AnyValue>, depth: usize) -> Result<(), ValueError> {
    write_value(out, v.into(), depth)
}

/// Writes one value as JSON.
pub fn write_value(out: &mut String, v: Any, depth: usize) -> Result<(), ValueError> {
    if depth > MAX_DEPTH {
        return Err(ValueError::TooDeep);
    }
    match v {
        Any::Null => out.push_str("null"),
        Any::Str(s) => write_str(out, s),
        Any::Bool(b) => out.push_str(if b { "true" } else { "false" }),
        Any::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Any::Double(d) => write_f64(out, d),
        Any::Bytes(b) => {
            out.push('"');
            push_hex(out, b);
            out.push('"');
        }
        Any::StrIndex(i) => {
            let _ = write!(out, "{i}");
        }
        Any::Array(items) => {
            out.push('[');
            let mut write_item = |i: usize, item: Any| {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item, depth + 1)
            };
            match items {
                Values::Decoded(vs) => {
                    for (i, item) in vs.iter().enumerate() {
                        write_item(i, Some(item).into())?;
                    }
                }
                Values::Wire(buf, at) => {
                    let values = wire::fields(buf, at).filter_map(|f| match f {
                        Ok((1, v)) => Some(
                            v.bytes("ArrayValue.values")
                                .and_then(|item| wire_any(item, at + 1)),
                        ),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    });
                    for (i, item) in values.enumerate() {
                        write_item(i, item?)?;
                    }
                }
            }
            out.push(']');
        }
        Any::Kvlist(Pairs::Decoded(kvs)) => write_attrs(out, kvs.iter(), depth + 1)?,
        Any::Kvlist(Pairs::Wire(buf, at)) => write_pairs(
            out,
            wire_pairs(buf, at, 1, "KeyValueList.values"),
            depth + 1,
        )?,
    }
    Ok(())
}

/// Writes key/values as one JSON object.
pub fn write_pairs<'a>(
    out: &mut String,
    pairs: impl Iterator<Item = Result<(&'a str, Any<'a>), wire::Error>>,
    depth: usize,
) -> Result<(), ValueError> {
    if depth > MAX_DEPTH {
        return Err(ValueError::TooDeep);
    }
    out.push('{');
    for (i, pair) in pairs.enumerate() {
        let (key, value) = pair?;
        if i > 0 {
            out.push(',');
        }
        write_str(out, key);
        out.push(':');
        write_value(out, value, depth + 1)?;
    }
    out.push('}');
    Ok(())
}

/// Writes decoded key/values as one JSON object.
pub fn write_attrs<'a>(
    out: &mut String,
    attrs: impl Iterator<Item = &'a KeyValue>,
    depth: usize,
) -> Result<(), ValueError> {
    write_pairs(
        out,
        attrs.map(|kv| Ok((kv.key.as_str(), Any::from(kv.value.as_ref())))),
        depth,
    )
}

/// JSON text of attributes, as a fresh string.
pub fn attrs_to_string(attrs: &[KeyValue]) -> Result<String, ValueError> {
    let mut s = String::with_capacity(64 * attrs.len() + 2);
    write_attrs(&mut s, attrs.iter(), 0)?;
    Ok(s)
}

/// A value as a column string: strings as-is, anything else as JSON.
pub fn value_as_text(v: Option<&AnyValue>) -> Result<Option<String>, ValueError> {
    text_of(v.into())
}

/// [`value_as_text`] for any value.
pub fn text_of(v: Any) -> Result<Option<String>, ValueError> {
    Ok(match v {
        Any::Null => None,
        Any::Str(s) => Some(s.to_string()),
        _ => {
            let mut s = String::new();
            write_value(&mut s, v, 0)?;
            Some(s)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, KeyValueList};

    fn sv(s: &str) -> AnyValue {
        AnyValue {
            value: Some(Value::StringValue(s.into())),
        }
    }
    fn kv(k: &str, v: AnyValue) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(v),
            key_strindex: 0,
        }
    }

    #[test]
    fn every_value_kind_is_valid_json() {
        let attrs = vec![
            kv("s", sv("a\"b\\c\n\u{1}é")),
            kv(
                "b",
                AnyValue {
                    value: Some(Value::BoolValue(true)),
                },
            ),
            kv(
                "i",
                AnyValue {
                    value: Some(Value::IntValue(i64::MIN)),
                },
            ),
            kv(
                "d",
                AnyValue {
                    value: Some(Value::DoubleValue(1.5)),
                },
            ),
            kv(
                "nan",
                AnyValue {
                    value: Some(Value::DoubleValue(f64::NAN)),
                },
            ),
            kv(
                "inf",
                AnyValue {
                    value: Some(Value::DoubleValue(f64::NEG_INFINITY)),
                },
            ),
            kv(
                "bytes",
                AnyValue {
                    value: Some(Value::BytesValue(vec![0xde, 0xad])),
                },
            ),
            kv(
                "arr",
                AnyValue {
                    value: Some(Value::ArrayValue(ArrayValue {
                        values: vec![sv("x"), AnyValue { value: None }],
                    })),
                },
            ),
            kv(
                "kv",
                AnyValue {
                    value: Some(Value::KvlistValue(KeyValueList {
                        values: vec![kv("k", sv("v"))],
                    })),
                },
            ),
            KeyValue {
                key: "unset".into(),
                value: None,
                key_strindex: 0,
            },
        ];
        let s = attrs_to_string(&attrs).unwrap();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["s"], "a\"b\\c\n\u{1}é");
        assert_eq!(v["i"], i64::MIN);
        assert_eq!(v["d"], 1.5);
        assert_eq!(v["nan"], "NaN");
        assert_eq!(v["inf"], "-Infinity");
        assert_eq!(v["bytes"], "dead");
        assert_eq!(v["arr"], serde_json::json!(["x", null]));
        assert_eq!(v["kv"], serde_json::json!({"k": "v"}));
        assert!(v["unset"].is_null());
    }

    /// The escaping rule, one char at a time.
    fn escaped_char_by_char(s: &str) -> String {
        let mut out = String::from('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    #[test]
    fn strings_escape_at_every_position_of_the_word_scan() {
        // Every escaped byte (and a multi-byte char) at every offset of
        // strings around the 8-byte steps, and next to each other.
        let specials = [
            '"', '\\', '\n', '\r', '\t', '\u{0}', '\u{1f}', '\u{7f}', 'é', '€',
        ];
        for len in 0..24 {
            for at in 0..=len {
                for c in specials {
                    for second in [None, Some('"'), Some('\u{8}')] {
                        let mut text: String = "abcdefghijklmnopqrstuvwxyz"[..len].into();
                        text.insert(at, c);
                        if let Some(d) = second {
                            text.push(d);
                        }
                        let mut out = String::new();
                        write_str(&mut out, &text);
                        let back: String = serde_json::from_str(&out)
                            .unwrap_or_else(|e| panic!("{out:?} is not JSON: {e}"));
                        assert_eq!(back, text);
                        assert_eq!(out, escaped_char_by_char(&text));
                    }
                }
            }
        }
        let mut out = String::new();
        write_str(&mut out, "a\u{1}\u{7f}é\"");
        assert_eq!(out, "\"a\\u0001\u{7f}é\\\"\"");
    }

    #[test]
    fn refuses_absurd_nesting() {
        let mut v = sv("leaf");
        for _ in 0..40 {
            v = AnyValue {
                value: Some(Value::ArrayValue(ArrayValue { values: vec![v] })),
            };
        }
        assert_eq!(attrs_to_string(&[kv("deep", v)]), Err(ValueError::TooDeep));
    }
}
