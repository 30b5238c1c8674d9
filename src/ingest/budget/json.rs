//! The decode budget of OTLP/JSON requests.
//!
//! serde_json decodes a request straight into the prost structs, so it costs
//! what protobuf costs ([`super::walk`]: structs, strings, vectors), plus
//! what serde buffers on the way: the OTLP types decode a oneof beside other
//! fields with `#[serde(flatten)]` (`AnyValue`, `Metric`, the number and
//! exemplar points), which first collects the object's keys that are no
//! plain field into serde's private `Content` tree and then decodes from
//! it, once more for every flattened object nested inside. `[{},{},…]` is 3
//! bytes per log record and ~200 decoded; `{"arrayValue":…}` of one-key
//! objects is ~20 times its size while it is buffered.
//!
//! [`check`] walks the body once with the message's [`Shape`] and refuses it
//! when the structs plus the buffers alive at once would pass
//! [`MAX_DECODED_BYTES`], before anything is decoded. A buffer lives while
//! the object that collected it decodes; what it holds counts once per
//! buffer it sits in: a `Content` is 32 bytes in its parent's vector, which
//! starts at four slots and doubles, and strings count their length. A key
//! that is no field of its message counts as a scalar field (serde skips it
//! outside a buffer, so this is an upper bound), and three times the body
//! covers serde_json's scratch buffer and the renamed copy below. The walk also renames
//! snake_case keys to lowerCamelCase, which OTLP/JSON receivers accept
//! besides the canonical names (OTLP/JSON never uses data as object keys,
//! so every key is a field name).

use std::borrow::Cow;
use std::mem::size_of;

use super::{vec_slot, Error, Shape, Shaped, MAX_DECODED_BYTES};

/// serde_json's own nesting limit: deeper is malformed either way.
const MAX_DEPTH: usize = 128;

/// serde's `Content`, one buffered value.
const CONTENT: u64 = 32;

/// Refuses `body`, an OTLP/JSON `T`, if decoding it could allocate more than
/// [`MAX_DECODED_BYTES`]; returns it with snake_case keys renamed.
pub fn check<T: Shaped>(body: &[u8]) -> Result<Cow<'_, [u8]>, Error> {
    estimate::<T>(body).map(|(_, body)| body)
}

/// The bound on what decoding `body` would allocate, and the body renamed.
fn estimate<T: Shaped>(body: &[u8]) -> Result<(u64, Cow<'_, [u8]>), Error> {
    let mut w = Walk {
        buf: body,
        pos: 0,
        // serde_json's scratch buffer for strings with escapes (at most
        // twice the longest) and the renamed copy of the body.
        structs: 3 * body.len() as u64,
        buffered: 0,
        peak_buffered: 0,
        renamed: None,
        copied: 0,
    };
    let walked = w
        .value(Slot::Message(T::SHAPE), 0, 0)
        .and_then(|()| match w.skip_ws() {
            None => Ok(()),
            Some(_) => Err(w.malformed("trailing characters")),
        });
    match walked {
        Ok(()) => {}
        // serde's own words for what is wrong (IgnoredAny allocates nothing).
        Err(Error::Malformed(ours)) => {
            let msg = serde_json::from_slice::<serde::de::IgnoredAny>(body)
                .err()
                .map_or(ours, |e| e.to_string());
            return Err(Error::Malformed(msg));
        }
        Err(e) => return Err(e),
    }
    let bound = w.structs + w.peak_buffered;
    let body = match w.renamed {
        None => Cow::Borrowed(body),
        Some(mut out) => {
            out.extend_from_slice(&body[w.copied..]);
            Cow::Owned(out)
        }
    };
    Ok((bound, body))
}

/// What a JSON value decodes into.
#[derive(Clone, Copy)]
enum Slot {
    /// A message (inside its parent, or one element of a repeated field).
    Message(&'static Shape),
    /// A repeated message field: each element is a whole struct in a `Vec`.
    Repeated(&'static Shape),
    /// A scalar field, a list of scalars, or a key serde ignores.
    Other,
}

struct Walk<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The decoded structs, strings and vectors (and serde_json's scratch).
    structs: u64,
    /// serde's buffers alive at this point of the walk, and their most.
    buffered: u64,
    peak_buffered: u64,
    /// The body with its snake_case keys renamed, up to `copied`.
    renamed: Option<Vec<u8>>,
    copied: usize,
}

impl<'a> Walk<'a> {
    fn over(&self) -> Result<(), Error> {
        match self.structs.saturating_add(self.peak_buffered) > MAX_DECODED_BYTES {
            true => Err(Error::TooLarge),
            false => Ok(()),
        }
    }

    /// Bytes of decoded structs.
    fn add(&mut self, bytes: u64) -> Result<(), Error> {
        self.structs = self.structs.saturating_add(bytes);
        self.over()
    }

    /// Bytes of serde buffers, `copies` times.
    fn buffer(&mut self, copies: u64, bytes: u64) -> Result<(), Error> {
        self.buffered = self.buffered.saturating_add(copies.saturating_mul(bytes));
        self.peak_buffered = self.peak_buffered.max(self.buffered);
        self.over()
    }

    fn malformed(&self, what: &str) -> Error {
        Error::Malformed(format!("{what} at byte {}", self.pos))
    }

    /// The next non-whitespace byte, not consumed.
    fn skip_ws(&mut self) -> Option<u8> {
        while let Some(&b) = self.buf.get(self.pos) {
            if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(b);
            }
            self.pos += 1;
        }
        None
    }

    fn expect(&mut self, byte: u8) -> Result<(), Error> {
        match self.skip_ws() {
            Some(b) if b == byte => {
                self.pos += 1;
                Ok(())
            }
            _ => Err(self.malformed(&format!("expected '{}'", byte as char))),
        }
    }

    /// One value decoding into `slot`, inside `copies` serde buffers.
    fn value(&mut self, slot: Slot, copies: u64, depth: usize) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(self.malformed("nested too deep"));
        }
        match self.skip_ws() {
            Some(b'{') => {
                let shape = match slot {
                    Slot::Message(s) | Slot::Repeated(s) => Some(s),
                    Slot::Other => None,
                };
                self.object(shape, copies, depth)
            }
            Some(b'[') => self.array(slot, copies, depth),
            Some(b'"') => {
                let (start, end) = self.string()?;
                let len = (end - start) as u64;
                self.add(len)?;
                self.buffer(copies, len)
            }
            Some(b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => {
                let start = self.pos;
                while let Some(b) = self.buf.get(self.pos) {
                    match b {
                        b'-' | b'+' | b'.' | b'0'..=b'9' | b'a'..=b'z' | b'E' => self.pos += 1,
                        _ => break,
                    }
                }
                // A 64-bit integer written out is at most 20 digits; longer
                // ones are serde's arbitrary-precision error.
                if self.pos - start > 400 {
                    return Err(self.malformed("number too long"));
                }
                self.add(8)
            }
            _ => Err(self.malformed("expected a value")),
        }
    }

    fn object(
        &mut self,
        shape: Option<&'static Shape>,
        copies: u64,
        depth: usize,
    ) -> Result<(), Error> {
        self.expect(b'{')?;
        // The buffer a flattened object collects is freed once it is
        // decoded; one inside another buffer is part of that one.
        let buffered_before = self.buffered;
        let (mut keys, mut collected) = (0, 0);
        loop {
            match (self.skip_ws(), keys) {
                (Some(b'}'), 0) => break self.pos += 1,
                (Some(b'"'), _) => {}
                _ => return Err(self.malformed("expected a key")),
            }
            let name = self.key()?;
            let child = shape.and_then(|s| s.children.iter().find(|c| c.name == name));
            let (slot, inner) = match child {
                Some(c) if c.repeated => (Slot::Repeated(c.shape), copies + c.buffered as u64),
                Some(c) => (Slot::Message(c.shape), copies + c.buffered as u64),
                None => (
                    Slot::Other,
                    copies + shape.is_some_and(|s| s.buffers_other_keys) as u64,
                ),
            };
            let key = name.len() as u64;
            // The key in the map of each buffer this object sits in, and in
            // the object's own collection if it buffers this key.
            self.buffer(copies, vec_slot(keys, 2 * CONTENT) + key)?;
            if inner > copies {
                self.buffer(1, vec_slot(collected, 2 * CONTENT) + key)?;
                collected += 1;
            }
            keys += 1;
            self.expect(b':')?;
            self.value(slot, inner, depth + 1)?;
            match self.skip_ws() {
                Some(b',') => self.pos += 1,
                Some(b'}') => break self.pos += 1,
                _ => return Err(self.malformed("expected ',' or '}'")),
            }
        }
        if copies == 0 {
            self.buffered = buffered_before;
        }
        Ok(())
    }

    fn array(&mut self, slot: Slot, copies: u64, depth: usize) -> Result<(), Error> {
        self.expect(b'[')?;
        if self.skip_ws() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        for n in 0.. {
            self.buffer(copies, vec_slot(n, CONTENT))?;
            let element = match slot {
                // A struct per element, in a `Vec`.
                Slot::Repeated(s) => {
                    self.add(vec_slot(n, s.size as u64))?;
                    Slot::Message(s)
                }
                // A list of scalars: a `String` header (or a number) per
                // element.
                Slot::Message(_) | Slot::Other => {
                    self.add(vec_slot(n, size_of::<String>() as u64))?;
                    Slot::Other
                }
            };
            self.value(element, copies, depth + 1)?;
            match self.skip_ws() {
                Some(b',') => self.pos += 1,
                Some(b']') => break,
                _ => return Err(self.malformed("expected ',' or ']'")),
            }
        }
        self.pos += 1;
        Ok(())
    }
    /// A string's raw contents (between its quotes), consumed.
    fn string(&mut self) -> Result<(usize, usize), Error> {
        self.expect(b'"')?;
        let start = self.pos;
        while let Some(&b) = self.buf.get(self.pos) {
            match b {
                b'"' => {
                    self.pos += 1;
                    return Ok((start, self.pos - 1));
                }
                b'\\' => self.pos += 2,
                _ => self.pos += 1,
            }
        }
        Err(self.malformed("unterminated string"))
    }

    /// An object key as a field name (lowerCamelCase); a snake_case key is
    /// renamed in the output.
    fn key(&mut self) -> Result<Cow<'a, str>, Error> {
        let (start, end) = self.string()?;
        let buf: &'a [u8] = self.buf;
        let raw = &buf[start..end];
        let key: String = match raw.contains(&b'\\') {
            // Field names need no escapes; decode the rare key that has them.
            true => serde_json::from_slice(&buf[start - 1..=end])
                .map_err(|e| Error::Malformed(e.to_string()))?,
            false => match std::str::from_utf8(raw) {
                Ok(k) if !k.contains('_') => return Ok(Cow::Borrowed(k)),
                Ok(k) => k.to_owned(),
                Err(_) => return Err(self.malformed("invalid UTF-8 in a key")),
            },
        };
        if !key.contains('_') || key.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
            return Ok(Cow::Owned(key));
        }
        let camel = camel(&key);
        let out = self
            .renamed
            .get_or_insert_with(|| Vec::with_capacity(self.buf.len()));
        out.extend_from_slice(&self.buf[self.copied..start]);
        out.extend_from_slice(camel.as_bytes());
        self.copied = end;
        Ok(Cow::Owned(camel))
    }
}

fn camel(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for c in key.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_alloc::peak;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use serde::de::DeserializeOwned;

    /// Decodes `body` as the OTLP/HTTP receiver does, and asserts that the
    /// estimate bounds what decoding really allocated.
    fn decode<T: Shaped + DeserializeOwned>(body: &str) -> T {
        let (bound, renamed) = estimate::<T>(body.as_bytes()).unwrap();
        let (decoded, used) = peak(|| serde_json::from_slice::<T>(&renamed).unwrap());
        eprintln!(
            "{} bytes of JSON: {used} bytes decoded, bound {bound}",
            body.len()
        );
        assert!(used as u64 <= bound, "{used} > {bound}");
        decoded
    }

    fn kv(i: usize) -> String {
        format!(r#"{{"key":"attribute.{i}","value":{{"stringValue":"value {i}"}}}}"#)
    }

    fn attrs(n: usize) -> String {
        (0..n).map(kv).collect::<Vec<_>>().join(",")
    }

    fn resource() -> String {
        format!(r#""resource":{{"attributes":[{}]}}"#, kv(0))
    }

    #[test]
    fn real_exports_pass_within_their_bound() {
        // ~13 MB of logs: 20 k records of 10 attributes and a 100-byte body.
        let record = format!(
            r#"{{"timeUnixNano":"1700000000000000000","severityNumber":9,"severityText":"INFO","traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","body":{{"stringValue":"{}"}},"attributes":[{}]}}"#,
            "x".repeat(100),
            attrs(10)
        );
        let body = format!(
            r#"{{"resourceLogs":[{{{},"scopeLogs":[{{"scope":{{"name":"s"}},"logRecords":[{}]}}]}}]}}"#,
            resource(),
            vec![record; 20_000].join(",")
        );
        let logs: ExportLogsServiceRequest = decode(&body);
        assert_eq!(
            logs.resource_logs[0].scope_logs[0].log_records.len(),
            20_000
        );

        // Spans with attributes, events, links and a status.
        let span = format!(
            r#"{{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","parentSpanId":"eee19b7ec3c1b175","name":"op","kind":2,"startTimeUnixNano":"1","endTimeUnixNano":"2","attributes":[{}],"events":[{{"timeUnixNano":"1","name":"e","attributes":[{}]}}],"links":[{{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","attributes":[{}]}}],"status":{{"code":1,"message":"ok"}}}}"#,
            attrs(10),
            attrs(2),
            attrs(1)
        );
        let body = format!(
            r#"{{"resourceSpans":[{{{},"scopeSpans":[{{"spans":[{}]}}]}}]}}"#,
            resource(),
            vec![span; 10_000].join(",")
        );
        let traces: ExportTraceServiceRequest = decode(&body);
        assert_eq!(traces.resource_spans[0].scope_spans[0].spans.len(), 10_000);

        // Metrics: number points (a flattened oneof inside a flattened one),
        // with exemplars, and histogram points with bucket counts.
        let point = format!(
            r#"{{"timeUnixNano":"1","asDouble":1.5,"attributes":[{}],"exemplars":[{{"timeUnixNano":"1","asInt":"3","filteredAttributes":[{}]}}]}}"#,
            attrs(3),
            attrs(1)
        );
        let histogram = format!(
            r#"{{"timeUnixNano":"1","count":"6","sum":3.5,"bucketCounts":["1","2","3"],"explicitBounds":[1.0,2.0],"attributes":[{}]}}"#,
            attrs(3)
        );
        let body = format!(
            r#"{{"resourceMetrics":[{{{},"scopeMetrics":[{{"metrics":[{{"name":"g","gauge":{{"dataPoints":[{}]}}}},{{"name":"h","histogram":{{"aggregationTemporality":2,"dataPoints":[{}]}}}}]}}]}}]}}"#,
            resource(),
            vec![point; 10_000].join(","),
            vec![histogram; 10_000].join(",")
        );
        let metrics: ExportMetricsServiceRequest = decode(&body);
        assert_eq!(
            metrics.resource_metrics[0].scope_metrics[0].metrics.len(),
            2
        );

        // Attribute values nested twenty deep, each level buffered again.
        let mut value = format!(r#"{{"stringValue":"{}"}}"#, "y".repeat(100_000));
        for i in 0..20 {
            value = format!(
                r#"{{"kvlistValue":{{"values":[{},{{"key":"k","value":{value}}}]}}}}"#,
                kv(i)
            );
        }
        let body = format!(
            r#"{{"resourceLogs":[{{"scopeLogs":[{{"logRecords":[{{"body":{value}}}]}}]}}]}}"#
        );
        let _: ExportLogsServiceRequest = decode(&body);

        // Many one-key objects inside a buffered value: serde's buffer gives
        // each its own map.
        for item in [
            r#"{"intValue":1}"#,
            r#"{"key":"a","value":{"intValue":1}}"#,
            "{}",
        ] {
            let list = vec![item; 100_000].join(",");
            let value = match item.starts_with(r#"{"key""#) {
                true => format!(r#"{{"kvlistValue":{{"values":[{list}]}}}}"#),
                false => format!(r#"{{"arrayValue":{{"values":[{list}]}}}}"#),
            };
            let body = format!(
                r#"{{"resourceLogs":[{{"scopeLogs":[{{"logRecords":[{{"body":{value}}}]}}]}}]}}"#
            );
            let _: ExportLogsServiceRequest = decode(&body);
        }
    }

    #[test]
    fn many_small_items_are_refused_before_decoding() {
        // 16 MiB of empty log records decode into ~1.2 GB.
        let empty = vec!["{}"; 5_500_000].join(",");
        let logs = format!(r#"{{"resourceLogs":[{{"scopeLogs":[{{"logRecords":[{empty}]}}]}}]}}"#);
        assert_eq!(
            check::<ExportLogsServiceRequest>(logs.as_bytes()).unwrap_err(),
            Error::TooLarge
        );
        let spans = format!(r#"{{"resourceSpans":[{{"scopeSpans":[{{"spans":[{empty}]}}]}}]}}"#);
        assert_eq!(
            check::<ExportTraceServiceRequest>(spans.as_bytes()).unwrap_err(),
            Error::TooLarge
        );
        // A few are fine.
        let few = vec!["{}"; 1_000].join(",");
        let logs = format!(r#"{{"resourceLogs":[{{"scopeLogs":[{{"logRecords":[{few}]}}]}}]}}"#);
        let decoded: ExportLogsServiceRequest = decode(&logs);
        assert_eq!(
            decoded.resource_logs[0].scope_logs[0].log_records.len(),
            1_000
        );
    }

    #[test]
    fn snake_case_keys_become_camel_case_and_values_stay() {
        let body = br#"{"resource_spans": [{"scope_spans": [{"spans": [
            {"trace_id": "5b8efff798038103d269b633813fc60c", "span_\u0069d": "eee19b7ec3c1b174",
             "attributes": [{"key": "a_b", "value": {"string_value": "x_y"}}]}]}]}]}"#;
        let renamed = check::<ExportTraceServiceRequest>(body).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&renamed).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"resourceSpans": [{"scopeSpans": [{"spans": [
                {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
                 "attributes": [{"key": "a_b", "value": {"stringValue": "x_y"}}]}]}]}]})
        );
        // Camel-case bodies are used as they are.
        let camel = serde_json::to_vec(&v).unwrap();
        assert!(matches!(
            check::<ExportTraceServiceRequest>(&camel).unwrap(),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn malformed_json_is_reported_in_serdes_words() {
        for (body, words) in [
            (&br#"{"resourceLogs":[{]}"#[..], "key must be a string"),
            (br#"{"resourceLogs":[]} x"#, "trailing characters"),
            (br#"{"resourceLogs":"#, "EOF"),
        ] {
            let err = check::<ExportLogsServiceRequest>(body).unwrap_err();
            assert!(
                matches!(&err, Error::Malformed(m) if m.contains(words)),
                "{err}"
            );
        }
        // Nested deeper than serde_json decodes (its skipping has no limit).
        let deep = format!(
            r#"{{"resourceLogs":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let err = check::<ExportLogsServiceRequest>(deep.as_bytes()).unwrap_err();
        assert!(
            matches!(&err, Error::Malformed(m) if m.contains("nested too deep")),
            "{err}"
        );
    }
}
