//! A borrowing protobuf reader: the fields of a message as slices of the
//! received bytes, with no allocation.
//!
//! OTLP traces are converted straight from the bytes of the export (the same
//! bytes the WAL keeps), not from prost's owned structs: decoding a 500-span
//! export into `String`s and `Vec`s, then dropping them, was ~37 % of a tokio
//! worker's CPU at 105 k spans/s (BENCHMARKS.md, fifth round).
//!
//! The reader accepts exactly what prost accepts for the fields the caller
//! knows (wire types, UTF-8 of strings, lengths, varint sizes) and skips
//! unknown fields, groups included. Callers decide what a repeated singular
//! message means; the OTLP converters refuse it rather than merge.

use std::borrow::Cow;

/// What is wrong with the bytes, and where (`Span.name: invalid UTF-8`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub Cow<'static, str>);

impl Error {
    fn at(what: &'static str, why: &'static str) -> Self {
        Error(Cow::Owned(format!("{what}: {why}")))
    }
}

/// prost's recursion limit. It counts messages and groups alike: a field
/// `d` messages below the request (which is 0) and inside `g` groups is
/// decoded only while `d + g` is below it, so the groups an unknown field may
/// nest shrink as the message around it sits deeper.
pub const RECURSION_LIMIT: usize = 100;

/// One field's value, by wire type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Len(&'a [u8]),
    Fixed32(u32),
    /// A group (wire types 3/4), already skipped; no OTLP field is one.
    Group,
}

impl<'a> Value<'a> {
    fn wrong(what: &'static str, expected: &'static str) -> Error {
        Error(Cow::Owned(format!("{what}: wire type is not {expected}")))
    }

    /// A length-delimited field (`bytes`, or an embedded message).
    #[inline]
    pub fn bytes(self, what: &'static str) -> Result<&'a [u8], Error> {
        match self {
            Value::Len(b) => Ok(b),
            _ => Err(Self::wrong(what, "length-delimited")),
        }
    }

    #[inline]
    pub fn str(self, what: &'static str) -> Result<&'a str, Error> {
        std::str::from_utf8(self.bytes(what)?).map_err(|_| Error::at(what, "invalid UTF-8"))
    }

    #[inline]
    pub fn varint(self, what: &'static str) -> Result<u64, Error> {
        match self {
            Value::Varint(v) => Ok(v),
            _ => Err(Self::wrong(what, "varint")),
        }
    }

    /// `uint32`, `int32` and enums: the low 32 bits, as prost reads them.
    #[inline]
    pub fn u32(self, what: &'static str) -> Result<u32, Error> {
        Ok(self.varint(what)? as u32)
    }

    #[inline]
    pub fn i32(self, what: &'static str) -> Result<i32, Error> {
        Ok(self.varint(what)? as i32)
    }

    #[inline]
    pub fn fixed64(self, what: &'static str) -> Result<u64, Error> {
        match self {
            Value::Fixed64(v) => Ok(v),
            _ => Err(Self::wrong(what, "64-bit")),
        }
    }

    #[inline]
    pub fn fixed32(self, what: &'static str) -> Result<u32, Error> {
        match self {
            Value::Fixed32(v) => Ok(v),
            _ => Err(Self::wrong(what, "32-bit")),
        }
    }
}

/// The fields of one message, in wire order; stops after the first error.
/// `depth` is how many messages enclose it (0 for the request itself): it
/// bounds the groups inside as prost does ([`RECURSION_LIMIT`]).
pub fn fields(buf: &[u8], depth: usize) -> Fields<'_> {
    Fields { buf, depth }
}

pub struct Fields<'a> {
    buf: &'a [u8],
    depth: usize,
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>), Error>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let out = read_field(&mut self.buf, self.depth);
        if out.is_err() {
            self.buf = &[];
        }
        Some(out)
    }
}

fn truncated() -> Error {
    Error(Cow::Borrowed("message truncated"))
}

#[inline]
fn varint(buf: &mut &[u8]) -> Result<u64, Error> {
    // Tags and most lengths are one byte.
    if let Some(&b) = buf.first() {
        if b < 0x80 {
            *buf = &buf[1..];
            return Ok(u64::from(b));
        }
    }
    varint_slow(buf)
}

fn varint_slow(buf: &mut &[u8]) -> Result<u64, Error> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().take(10).enumerate() {
        if i == 9 && b > 1 {
            break;
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            *buf = &buf[i + 1..];
            return Ok(v);
        }
    }
    if buf.len() < 10 && buf.last().is_some_and(|b| b & 0x80 != 0) {
        return Err(truncated());
    }
    Err(Error(Cow::Borrowed("invalid varint")))
}

#[inline]
fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], Error> {
    if buf.len() < n {
        return Err(truncated());
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

/// One field; `depth` counts the messages and groups around it.
#[inline]
fn read_field<'a>(buf: &mut &'a [u8], depth: usize) -> Result<(u32, Value<'a>), Error> {
    let key = varint(buf)?;
    if key > u64::from(u32::MAX) {
        return Err(Error(Cow::Owned(format!("invalid key value: {key}"))));
    }
    let field = (key >> 3) as u32;
    if field == 0 {
        return Err(Error(Cow::Borrowed("invalid tag value: 0")));
    }
    let value = match key & 7 {
        0 => Value::Varint(varint(buf)?),
        1 => Value::Fixed64(u64::from_le_bytes(
            take(buf, 8)?.try_into().expect("8 bytes"),
        )),
        2 => {
            let len = varint(buf)?;
            let len = usize::try_from(len).map_err(|_| truncated())?;
            Value::Len(take(buf, len)?)
        }
        3 => {
            skip_group(buf, field, depth + 1)?;
            Value::Group
        }
        4 => return Err(Error(Cow::Borrowed("unexpected end group"))),
        5 => Value::Fixed32(u32::from_le_bytes(
            take(buf, 4)?.try_into().expect("4 bytes"),
        )),
        w => return Err(Error(Cow::Owned(format!("invalid wire type value: {w}")))),
    };
    Ok((field, value))
}

/// Skips a group's fields up to its end tag; `depth` counts the messages and
/// groups around those fields, this group included.
fn skip_group(buf: &mut &[u8], field: u32, depth: usize) -> Result<(), Error> {
    loop {
        if buf.is_empty() {
            return Err(truncated());
        }
        let mut peek = *buf;
        let key = varint(&mut peek)?;
        if key & 7 == 4 {
            if (key >> 3) as u32 != field {
                return Err(Error(Cow::Borrowed("unexpected end group tag")));
            }
            *buf = peek;
            return Ok(());
        }
        // prost checks its limit before skipping each field (an empty group
        // at the limit is still fine).
        if depth >= RECURSION_LIMIT {
            return Err(Error(Cow::Borrowed("recursion limit reached")));
        }
        read_field(buf, depth)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn all(buf: &[u8]) -> Result<Vec<(u32, Value<'_>)>, Error> {
        fields(buf, 0).collect()
    }

    /// An unknown field 9 holding `levels` nested groups (field 10), the
    /// innermost holding a varint.
    fn nested_groups(levels: usize) -> Vec<u8> {
        let mut buf = vec![(9 << 3) | 3];
        buf.extend(std::iter::repeat_n((10 << 3) | 3, levels - 1));
        buf.extend_from_slice(&[8, 1]);
        buf.extend(std::iter::repeat_n((10 << 3) | 4, levels - 1));
        buf.push((9 << 3) | 4);
        buf
    }

    #[test]
    fn groups_share_the_recursion_limit_with_messages() {
        // A message `depth` levels down may nest groups up to the limit and
        // no further, as prost decodes them.
        for depth in [0, 1, 40, 98] {
            let most = RECURSION_LIMIT - 1 - depth;
            assert!(fields(&nested_groups(most), depth).all(|f| f.is_ok()));
            let deeper = nested_groups(most + 1);
            assert_eq!(
                fields(&deeper, depth).last(),
                Some(Err(Error(Cow::Borrowed("recursion limit reached"))))
            );
        }
        // prost agrees at the top.
        #[derive(Clone, PartialEq, prost::Message)]
        struct Empty {}
        assert!(Empty::decode(&nested_groups(RECURSION_LIMIT - 1)[..]).is_ok());
        assert!(Empty::decode(&nested_groups(RECURSION_LIMIT)[..]).is_err());
    }

    #[test]
    fn reads_every_wire_type_and_skips_groups() {
        #[derive(Clone, PartialEq, prost::Message)]
        struct M {
            #[prost(uint64, tag = "1")]
            a: u64,
            #[prost(fixed64, tag = "2")]
            b: u64,
            #[prost(string, tag = "3")]
            c: String,
            #[prost(fixed32, tag = "4")]
            d: u32,
        }
        let m = M {
            a: u64::MAX,
            b: 7,
            c: "héllo".into(),
            d: 9,
        };
        let mut buf = m.encode_to_vec();
        // An unknown group (field 9) with a nested group and a varint inside.
        buf.extend_from_slice(&[
            (9 << 3) | 3,
            (10 << 3) | 3,
            (10 << 3) | 4,
            8,
            1,
            (9 << 3) | 4,
        ]);
        let got = all(&buf).unwrap();
        assert_eq!(got[0], (1, Value::Varint(u64::MAX)));
        assert_eq!(got[1], (2, Value::Fixed64(7)));
        assert_eq!(got[2].1.str("M.c").unwrap(), "héllo");
        assert_eq!(got[3], (4, Value::Fixed32(9)));
        assert_eq!(got[4], (9, Value::Group));
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn refuses_what_prost_refuses() {
        for bad in [
            &[0x0a, 0xff, 0xff, 0xff][..], // length past the end
            &[0x08],                       // varint missing
            &[0x08, 0xff],                 // varint truncated
            &[0x00, 0x01],                 // field 0
            &[0x0f],                       // wire type 7
            &[0x0c],                       // end group without start
            &[0x0b, 0x08, 0x01],           // group never ended
            &[0x09, 1, 2, 3],              // fixed64 truncated
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ], // 11-byte varint
        ] {
            assert!(all(bad).is_err(), "{bad:?}");
            // prost agrees that these are not messages.
            assert!(
                opentelemetry_proto::tonic::common::v1::KeyValue::decode(bad).is_err(),
                "{bad:?}"
            );
        }
        let (_, v) = all(&[0x0a, 0x02, 0xc3, 0x28]).unwrap()[0];
        assert_eq!(
            v.str("KeyValue.key").unwrap_err().to_string(),
            "KeyValue.key: invalid UTF-8"
        );
        assert!(Value::Varint(1).bytes("x").is_err());
        assert!(Value::Len(b"").fixed64("x").is_err());
        assert_eq!(Value::Varint(u64::MAX).i32("x").unwrap(), -1);
    }
}
