//! The on-disk encoding of one WAL entry (one accepted request).
//!
//! Layout, version 1 (all integers big-endian):
//!
//! ```text
//! offset  size  field
//! 0       1     version = 1
//! 1       1     payload kind (PayloadKind as u8)
//! 2       2     tenant length T
//! 4       T     tenant (UTF-8)
//! 4+T     2     endpoint length E
//! 6+T     E     endpoint (UTF-8)
//! 6+T+E   4     CRC-32 (IEEE) of the payload
//! 10+T+E  ..    payload: the validated request, protobuf-encoded
//! ```
//!
//! The key is the entry's 16-byte ULID (big-endian), so RocksDB's order is
//! arrival order. A new version gets a new version byte; readers reject
//! versions they do not know instead of guessing.

use bytes::Bytes;

pub const ENTRY_VERSION: u8 = 1;

/// What the payload of an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PayloadKind {
    /// `ExportTraceServiceRequest`.
    OtlpTraces = 1,
    /// `ExportLogsServiceRequest`.
    OtlpLogs = 2,
    /// `ExportMetricsServiceRequest`.
    OtlpMetrics = 3,
    /// `ingestion.WriteBatchRequest`.
    DataRecordBatch = 4,
}

impl PayloadKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::OtlpTraces,
            2 => Self::OtlpLogs,
            3 => Self::OtlpMetrics,
            4 => Self::DataRecordBatch,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WalEntry {
    pub kind: PayloadKind,
    pub tenant: String,
    pub endpoint: String,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("WAL entry truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown WAL entry version {0}")]
    Version(u8),
    #[error("unknown WAL payload kind {0}")]
    Kind(u8),
    #[error("WAL entry name is not UTF-8")]
    Utf8,
    #[error("WAL entry checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
}

impl WalEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(10 + self.tenant.len() + self.endpoint.len() + self.payload.len());
        out.push(ENTRY_VERSION);
        out.push(self.kind as u8);
        for name in [&self.tenant, &self.endpoint] {
            out.extend_from_slice(&(name.len() as u16).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(&crc32fast::hash(&self.payload).to_be_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { buf, pos: 0 };
        let version = r.u8()?;
        if version != ENTRY_VERSION {
            return Err(DecodeError::Version(version));
        }
        let kind_byte = r.u8()?;
        let kind = PayloadKind::from_u8(kind_byte).ok_or(DecodeError::Kind(kind_byte))?;
        let tenant = r.name()?;
        let endpoint = r.name()?;
        let stored = u32::from_be_bytes(r.take(4)?.try_into().expect("4 bytes"));
        let payload = &buf[r.pos..];
        let computed = crc32fast::hash(payload);
        if stored != computed {
            return Err(DecodeError::Checksum { stored, computed });
        }
        Ok(Self {
            kind,
            tenant,
            endpoint,
            payload: Bytes::copy_from_slice(payload),
        })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or(DecodeError::Truncated(self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn name(&mut self) -> Result<String, DecodeError> {
        let len = u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Utf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WalEntry {
        WalEntry {
            kind: PayloadKind::OtlpTraces,
            tenant: "acme".into(),
            endpoint: "spans".into(),
            payload: Bytes::from_static(b"\x0a\x03abc"),
        }
    }

    #[test]
    fn round_trip() {
        let e = sample();
        assert_eq!(WalEntry::decode(&e.encode()).unwrap(), e);
    }

    #[test]
    fn detects_corruption_and_truncation() {
        let mut buf = sample().encode();
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        assert!(matches!(
            WalEntry::decode(&buf),
            Err(DecodeError::Checksum { .. })
        ));
        let buf = sample().encode();
        for cut in 0..10 {
            assert!(WalEntry::decode(&buf[..cut]).is_err(), "cut at {cut}");
        }
        let mut buf = sample().encode();
        buf[0] = 9;
        assert_eq!(WalEntry::decode(&buf), Err(DecodeError::Version(9)));
    }
}
