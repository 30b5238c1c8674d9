//! OTLP `AnyValue` / attributes → JSON text, written straight into a buffer.
//!
//! Mapping: string → string, bool → bool, int → number, double → number
//! (NaN/±Infinity as the strings `"NaN"`, `"Infinity"`, `"-Infinity"`, as in
//! the proto3 JSON mapping), bytes → lowercase hex string, array → array,
//! kvlist → object, unset → null. Nesting deeper than [`MAX_DEPTH`] is refused.

use std::fmt::Write;

use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};

pub const MAX_DEPTH: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("attribute value nested deeper than {MAX_DEPTH} levels")]
pub struct TooDeep;

/// Appends `s` as a JSON string literal.
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
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

pub fn write_any(out: &mut String, v: Option<&AnyValue>, depth: usize) -> Result<(), TooDeep> {
    if depth > MAX_DEPTH {
        return Err(TooDeep);
    }
    match v.and_then(|v| v.value.as_ref()) {
        None => out.push_str("null"),
        Some(Value::StringValue(s)) => write_str(out, s),
        Some(Value::BoolValue(b)) => out.push_str(if *b { "true" } else { "false" }),
        Some(Value::IntValue(i)) => {
            let _ = write!(out, "{i}");
        }
        Some(Value::DoubleValue(d)) => write_f64(out, *d),
        Some(Value::BytesValue(b)) => {
            out.push('"');
            out.push_str(&hex::encode(b));
            out.push('"');
        }
        Some(Value::ArrayValue(a)) => {
            out.push('[');
            for (i, item) in a.values.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_any(out, Some(item), depth + 1)?;
            }
            out.push(']');
        }
        Some(Value::KvlistValue(kv)) => write_attrs(out, kv.values.iter(), depth + 1)?,
        // An index into a profiles string table; traces have no such table.
        Some(Value::StringValueStrindex(i)) => {
            let _ = write!(out, "{i}");
        }
    }
    Ok(())
}

/// Writes key/values as one JSON object.
pub fn write_attrs<'a>(
    out: &mut String,
    attrs: impl Iterator<Item = &'a KeyValue>,
    depth: usize,
) -> Result<(), TooDeep> {
    if depth > MAX_DEPTH {
        return Err(TooDeep);
    }
    out.push('{');
    for (i, kv) in attrs.enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(out, &kv.key);
        out.push(':');
        write_any(out, kv.value.as_ref(), depth + 1)?;
    }
    out.push('}');
    Ok(())
}

/// JSON text of attributes, as a fresh string.
pub fn attrs_to_string(attrs: &[KeyValue]) -> Result<String, TooDeep> {
    let mut s = String::with_capacity(64 * attrs.len() + 2);
    write_attrs(&mut s, attrs.iter(), 0)?;
    Ok(s)
}

/// A value as a column string: strings as-is, anything else as JSON.
pub fn value_as_text(v: Option<&AnyValue>) -> Result<Option<String>, TooDeep> {
    Ok(match v.and_then(|v| v.value.as_ref()) {
        None => None,
        Some(Value::StringValue(s)) => Some(s.clone()),
        Some(_) => {
            let mut s = String::new();
            write_any(&mut s, v, 0)?;
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

    #[test]
    fn refuses_absurd_nesting() {
        let mut v = sv("leaf");
        for _ in 0..40 {
            v = AnyValue {
                value: Some(Value::ArrayValue(ArrayValue { values: vec![v] })),
            };
        }
        assert_eq!(attrs_to_string(&[kv("deep", v)]), Err(TooDeep));
    }
}
