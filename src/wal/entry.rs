//! The on-disk encoding of one WAL entry (one accepted request).
//!
//! Layout, version 2 (written since the WAL compresses; all integers
//! big-endian):
//!
//! ```text
//! offset  size  field
//! 0       1     version = 2
//! 1       1     payload kind (PayloadKind as u8)
//! 2       2     tenant length T
//! 4       T     tenant (UTF-8)
//! 4+T     2     endpoint length E
//! 6+T     E     endpoint (UTF-8)
//! 6+T+E   1     codec: 0 = stored as is, 1 = one zstd frame
//! 7+T+E   4     payload length L (before compression)
//! 11+T+E  4     CRC-32 (IEEE) of every byte before it and the stored bytes
//! 15+T+E  ..    stored bytes: the validated request, protobuf-encoded,
//!               compressed when the codec says so
//! ```
//!
//! Version 1 (still read) has no codec byte and no length: the CRC-32 of the
//! payload alone follows the endpoint, then the payload as is, so a damaged
//! version 1 header (kind, tenant) goes unnoticed. A binary from before
//! version 2 refuses a WAL with version 2 entries (whatever
//! `--wal-zstd-level` says) rather than guessing. Two development commits
//! that never made a release (72d2ffb, cdea872) wrote version 2 with the CRC
//! over the codec, length and stored bytes only; their entries fail the check.
//!
//! L is at most [`MAX_PAYLOAD`]; a larger one is refused before anything is
//! allocated for it.
//!
//! The key is the entry's 16-byte ULID (big-endian), so RocksDB's order is
//! arrival order. A new version gets a new version byte; readers reject
//! versions they do not know instead of guessing.

use bytes::Bytes;

pub const ENTRY_VERSION: u8 = 2;

/// The largest payload an entry holds (what `--max-request-size` allows).
pub const MAX_PAYLOAD: usize = 1 << 30;

/// Payloads smaller than this are stored as they are: a zstd frame's own
/// overhead and the call cost more than they save.
const MIN_COMPRESSED_PAYLOAD: usize = 512;

/// How the stored bytes of a version 2 entry are encoded.
const CODEC_STORED: u8 = 0;
const CODEC_ZSTD: u8 = 1;

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
    #[error("unknown WAL entry codec {0}")]
    Codec(u8),
    #[error("WAL entry payload does not decompress to its {expected} bytes: {reason}")]
    Decompress { expected: usize, reason: String },
    #[error("WAL entry payload has {got} bytes, its header says {expected}")]
    Length { expected: usize, got: usize },
}

impl DecodeError {
    /// Whether the entry is of a newer format (version, payload kind or
    /// codec) than this binary knows, rather than damaged.
    pub fn from_newer_binary(&self) -> bool {
        match self {
            Self::Version(v) => *v > ENTRY_VERSION,
            Self::Kind(_) | Self::Codec(_) => true,
            _ => false,
        }
    }
}

impl WalEntry {
    /// The entry with its payload stored as is.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(0)
    }

    /// The entry with its payload compressed by zstd at `zstd_level` (0: not
    /// compressed). A payload that does not shrink is stored as is.
    pub fn encode_with(&self, zstd_level: i32) -> Vec<u8> {
        let compressed = (zstd_level != 0 && self.payload.len() >= MIN_COMPRESSED_PAYLOAD)
            .then(|| compress(&self.payload, zstd_level))
            .flatten()
            .filter(|c| c.len() < self.payload.len());
        let (codec, stored) = match &compressed {
            Some(c) => (CODEC_ZSTD, &c[..]),
            None => (CODEC_STORED, &self.payload[..]),
        };
        let len = u32::try_from(self.payload.len()).expect("requests are far below 4 GiB");
        let mut out =
            Vec::with_capacity(15 + self.tenant.len() + self.endpoint.len() + stored.len());
        out.push(ENTRY_VERSION);
        out.push(self.kind as u8);
        for name in [&self.tenant, &self.endpoint] {
            out.extend_from_slice(&(name.len() as u16).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.push(codec);
        out.extend_from_slice(&len.to_be_bytes());
        let crc = checksum(&out, stored);
        out.extend_from_slice(&crc.to_be_bytes());
        out.extend_from_slice(stored);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        Ok(Self::decode_if(buf, |_, _| true)?.expect("kept"))
    }

    /// Checks the entry, then decodes it only when `keep(kind, tenant)`
    /// says so: readers that want one tenant's traces skip the others
    /// without decompressing them (`None`). A corrupt entry is an error
    /// whoever it belongs to (in version 1 only a corrupt payload is caught).
    pub fn decode_if(
        buf: &[u8],
        keep: impl FnOnce(PayloadKind, &str) -> bool,
    ) -> Result<Option<Self>, DecodeError> {
        let mut r = Reader { buf, pos: 0 };
        let version = r.u8()?;
        if version != 1 && version != ENTRY_VERSION {
            return Err(DecodeError::Version(version));
        }
        let kind_byte = r.u8()?;
        let tenant = r.name()?;
        let endpoint = r.name()?;
        let framing = if version == 1 { &[][..] } else { r.take(5)? };
        // Version 2 covers its whole header; version 1 only its payload.
        let covered = if version == 1 { &[][..] } else { &buf[..r.pos] };
        let stored_crc = u32::from_be_bytes(r.take(4)?.try_into().expect("4 bytes"));
        let stored = &buf[r.pos..];
        let computed = checksum(covered, stored);
        if stored_crc != computed {
            return Err(DecodeError::Checksum {
                stored: stored_crc,
                computed,
            });
        }
        let kind = PayloadKind::from_u8(kind_byte).ok_or(DecodeError::Kind(kind_byte))?;
        let tenant = std::str::from_utf8(tenant).map_err(|_| DecodeError::Utf8)?;
        let endpoint = std::str::from_utf8(endpoint).map_err(|_| DecodeError::Utf8)?;
        if !keep(kind, tenant) {
            return Ok(None);
        }
        let payload = match framing {
            [] => Bytes::copy_from_slice(stored),
            [codec, len @ ..] => {
                let expected = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
                match *codec {
                    CODEC_STORED if stored.len() == expected => Bytes::copy_from_slice(stored),
                    CODEC_STORED => {
                        return Err(DecodeError::Length {
                            expected,
                            got: stored.len(),
                        })
                    }
                    CODEC_ZSTD if expected <= MAX_PAYLOAD => {
                        Bytes::from(decompress(stored, expected)?)
                    }
                    CODEC_ZSTD => {
                        return Err(DecodeError::Decompress {
                            expected,
                            reason: format!("more than the {MAX_PAYLOAD} bytes an entry holds"),
                        })
                    }
                    other => return Err(DecodeError::Codec(other)),
                }
            }
        };
        Ok(Some(Self {
            kind,
            tenant: tenant.to_string(),
            endpoint: endpoint.to_string(),
            payload,
        }))
    }
}

/// The entry's CRC-32: over the header before it (version 2; nothing in
/// version 1) and the stored bytes.
fn checksum(header: &[u8], stored: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header);
    h.update(stored);
    h.finalize()
}

thread_local! {
    /// One zstd context per thread and direction (request handlers
    /// compress, replay and `ReadSpans` decompress), the compressor kept
    /// with its level: making a context per entry costs more than a small
    /// entry's compression.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// `payload` as one zstd frame; `None` if zstd fails (the entry is then
/// stored as is, and the failure logged).
fn compress(payload: &[u8], level: i32) -> Option<Vec<u8>> {
    let out = COMPRESSOR.with_borrow_mut(|slot| {
        if slot.as_ref().map(|(l, _)| *l) != Some(level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        let (_, c) = slot.as_mut().expect("just set");
        c.compress(payload)
    });
    out.inspect_err(|e| tracing::warn!(level, error = %e, "zstd failed; WAL entry stored as is"))
        .ok()
}

fn decompress(stored: &[u8], expected: usize) -> Result<Vec<u8>, DecodeError> {
    let fail = |reason: String| DecodeError::Decompress { expected, reason };
    let out = DECOMPRESSOR.with_borrow_mut(|slot| {
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        slot.as_mut()
            .expect("just set")
            .decompress(stored, expected)
    });
    let out = out.map_err(|e| fail(e.to_string()))?;
    if out.len() != expected {
        return Err(fail(format!("got {}", out.len())));
    }
    Ok(out)
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
    /// A length-prefixed name, as raw bytes (checked for UTF-8 after the CRC).
    fn name(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize;
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(payload: Vec<u8>) -> WalEntry {
        WalEntry {
            kind: PayloadKind::OtlpTraces,
            tenant: "acme".into(),
            endpoint: "spans".into(),
            payload: Bytes::from(payload),
        }
    }

    /// Text-like bytes (zstd shrinks them several times).
    fn compressible(n: usize) -> Vec<u8> {
        let words = ["span ", "trace ", "workflow ", "node ", "state "];
        let mut out = Vec::new();
        let mut i = 0u64;
        while out.len() < n {
            i = i
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.extend_from_slice(words[(i >> 60) as usize % words.len()].as_bytes());
        }
        out.truncate(n);
        out
    }

    /// Offset of the codec byte in an entry of [`sample`].
    const CODEC_AT: usize = 2 + 2 + 4 + 2 + 5;

    #[test]
    fn round_trip_stored_and_compressed() {
        for (payload, level, codec) in [
            (b"\x0a\x03abc".to_vec(), 1, CODEC_STORED),
            (compressible(64 << 10), 0, CODEC_STORED),
            (compressible(64 << 10), 1, CODEC_ZSTD),
            (compressible(64 << 10), -3, CODEC_ZSTD),
        ] {
            let e = sample(payload);
            let buf = e.encode_with(level);
            assert_eq!(buf[CODEC_AT], codec, "level {level}");
            if codec == CODEC_ZSTD {
                assert!(buf.len() * 3 < e.payload.len(), "{} bytes", buf.len());
            }
            assert_eq!(WalEntry::decode(&buf).unwrap(), e);
        }
    }

    #[test]
    fn incompressible_payloads_are_stored_as_is() {
        let mut x = 1u64;
        let noise: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let e = sample(noise);
        let buf = e.encode_with(3);
        assert_eq!(buf[CODEC_AT], CODEC_STORED);
        assert_eq!(buf.len(), CODEC_AT + 9 + e.payload.len());
        assert_eq!(WalEntry::decode(&buf).unwrap(), e);
    }

    #[test]
    fn version_1_entries_still_decode() {
        let payload = compressible(3000);
        let mut v1 = vec![1, PayloadKind::OtlpLogs as u8];
        for name in ["t", "logs"] {
            v1.extend_from_slice(&(name.len() as u16).to_be_bytes());
            v1.extend_from_slice(name.as_bytes());
        }
        v1.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
        v1.extend_from_slice(&payload);
        let e = WalEntry::decode(&v1).unwrap();
        assert_eq!(
            (e.kind, &e.tenant[..], &e.endpoint[..]),
            (PayloadKind::OtlpLogs, "t", "logs")
        );
        assert_eq!(e.payload, payload);
        let last = v1.len() - 1;
        v1[last] ^= 1;
        assert!(matches!(
            WalEntry::decode(&v1),
            Err(DecodeError::Checksum { .. })
        ));
    }

    #[test]
    fn detects_corruption_and_truncation() {
        for level in [0, 1] {
            let good = sample(compressible(4096)).encode_with(level);
            // A flipped bit anywhere but in the version byte and the two name
            // lengths (those read as other versions or other lengths): kind,
            // tenant, endpoint, codec, length, CRC, payload.
            let lengths = [2, 3, 8, 9];
            for at in (1..good.len()).filter(|at| !lengths.contains(at)) {
                let mut buf = good.clone();
                buf[at] ^= 0x10;
                assert!(
                    matches!(WalEntry::decode(&buf), Err(DecodeError::Checksum { .. })),
                    "level {level}, byte {at}: {:?}",
                    WalEntry::decode(&buf)
                );
            }
            for at in lengths {
                let mut buf = good.clone();
                buf[at] ^= 0x01;
                assert!(WalEntry::decode(&buf).is_err(), "level {level}, byte {at}");
            }
            for cut in 0..good.len() {
                assert!(WalEntry::decode(&good[..cut]).is_err(), "cut at {cut}");
            }
            let mut buf = good.clone();
            buf[0] = 9;
            assert_eq!(WalEntry::decode(&buf), Err(DecodeError::Version(9)));
        }
    }

    #[test]
    fn decode_if_skips_without_decompressing_but_still_checks() {
        let good = sample(compressible(4096)).encode_with(1);
        let mut asked = None;
        let skipped = WalEntry::decode_if(&good, |kind, tenant| {
            asked = Some((kind, tenant.to_string()));
            false
        });
        assert_eq!(skipped, Ok(None));
        assert_eq!(asked, Some((PayloadKind::OtlpTraces, "acme".to_string())));
        // A payload that would not decompress is not looked at when skipped…
        let mut bad = good.clone();
        reframe(&mut bad, CODEC_ZSTD, 4095);
        assert_eq!(WalEntry::decode_if(&bad, |_, _| false), Ok(None));
        assert!(matches!(
            WalEntry::decode_if(&bad, |_, _| true),
            Err(DecodeError::Decompress { .. })
        ));
        // …but a corrupt one is an error even when skipped.
        let mut corrupt = good.clone();
        corrupt[CODEC_AT + 20] ^= 1;
        assert!(matches!(
            WalEntry::decode_if(&corrupt, |_, _| false),
            Err(DecodeError::Checksum { .. })
        ));
    }

    /// Rewrites the framing of an encoded entry and re-seals its CRC, as a
    /// writer bug would: the decoder must still refuse it.
    fn reframe(buf: &mut [u8], codec: u8, len: u32) {
        buf[CODEC_AT] = codec;
        buf[CODEC_AT + 1..CODEC_AT + 5].copy_from_slice(&len.to_be_bytes());
        let crc = checksum(&buf[..CODEC_AT + 5], &buf[CODEC_AT + 9..]);
        buf[CODEC_AT + 5..CODEC_AT + 9].copy_from_slice(&crc.to_be_bytes());
    }

    #[test]
    fn refuses_unknown_codecs_and_wrong_lengths() {
        let good = sample(compressible(4096)).encode_with(1);
        let mut buf = good.clone();
        reframe(&mut buf, 7, 4096);
        assert_eq!(WalEntry::decode(&buf), Err(DecodeError::Codec(7)));
        for len in [4095, 4097] {
            let mut buf = good.clone();
            reframe(&mut buf, CODEC_ZSTD, len);
            assert!(
                matches!(WalEntry::decode(&buf), Err(DecodeError::Decompress { .. })),
                "{len}"
            );
        }
        // A length past what any entry holds is refused before a buffer for
        // it is allocated.
        let mut buf = good.clone();
        reframe(&mut buf, CODEC_ZSTD, u32::MAX);
        match WalEntry::decode(&buf) {
            Err(DecodeError::Decompress { reason, .. }) => {
                assert!(reason.contains("more than"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let mut stored = sample(compressible(4096)).encode();
        reframe(&mut stored, CODEC_STORED, 4000);
        assert_eq!(
            WalEntry::decode(&stored),
            Err(DecodeError::Length {
                expected: 4000,
                got: 4096
            })
        );
    }
}
