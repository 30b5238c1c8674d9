//! Bounds an Arrow IPC stream before arrow-ipc reads it.
//!
//! arrow-ipc trusts the lengths a stream declares. It allocates a message's
//! `bodyLength` (an i64) before reading the body, resizes a buffer to the
//! metadata length, and sizes each compressed buffer's output by the 8-byte
//! length in front of it; its LZ4 decoder does not even stop there. A request
//! of a few hundred bytes could therefore ask for a terabyte (the allocation
//! fails and the process aborts) or decompress a 16 MiB body into tens of
//! gigabytes. [`check`] walks the stream's framing first and refuses, before
//! anything is allocated:
//! - metadata or body lengths that are negative or run past the request;
//! - view and run-end encoded columns, at any depth: their few buffers can
//!   stand for far more data (500 k views of one 8 MiB buffer are 4 TiB to
//!   validate as UTF-8 or to cast), and no DataRecord type needs them;
//! - buffers outside their message's body;
//! - more than [`MAX_ROWS`] rows in all (a column of type Null, or a
//!   run-end encoded one, has its length without buffers to match);
//! - compressed buffers whose declared sizes add up to more than
//!   [`MAX_DECODED_BYTES`] for the whole stream, and LZ4 frames that
//!   decompress to more than they declare (counted, not stored).
//!
//! ZSTD output is bounded by arrow-ipc itself: its decoder fails when a frame
//! grows past the declared size it was given as capacity.

use arrow::ipc::{root_as_message, CompressionType, Field, MessageHeader, Type};

/// Most bytes the compressed buffers of one stream may decode to (the same
/// bound as a dictionary column's expansion).
pub const MAX_DECODED_BYTES: usize = super::records::MAX_EXPANDED_BYTES;

/// Most rows (record batch and dictionary lengths added up) one stream may
/// declare: a batch needs at least its `event_id` column, so a stream with
/// more could never pass the cell limit.
pub const MAX_ROWS: u64 = super::records::MAX_CELLS as u64;

/// Marks the 8-byte prefix of a buffer stored without compression.
const NOT_COMPRESSED: i64 = -1;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("message {message}: {what}")]
    Framing { message: usize, what: String },
    #[error(
        "compressed buffers decode to more than {MAX_DECODED_BYTES} bytes (message {message} declares {declared} in all so far): split the batch"
    )]
    Decodes { message: usize, declared: u64 },
    #[error(
        "column `{0}` has a view or run-end encoded type; send plain utf8/binary/list columns (pyarrow: pa.string(), polars: DataFrame.to_arrow(compat_level=pl.CompatLevel.oldest()))"
    )]
    ViewType(String),
    #[error("the stream declares more than {MAX_ROWS} rows (message {message} brings it to {rows}): split the batch")]
    Rows { message: usize, rows: u64 },
}

/// Checks the framing and compressed sizes of the IPC stream `ipc`; see the
/// module docs.
pub fn check(ipc: &[u8]) -> Result<(), Error> {
    let mut rest = ipc;
    let (mut declared, mut rows) = (0u64, 0u64);
    let mut count = 0usize;
    loop {
        let message = count;
        count += 1;
        let fail = |what: String| Error::Framing { message, what };
        // An end without the end-of-stream marker is valid IPC.
        if rest.is_empty() {
            return Ok(());
        }
        let mut len = take_i32(&mut rest).ok_or_else(|| fail("truncated length".into()))?;
        if len == -1 {
            // The continuation marker in front of the length.
            len = take_i32(&mut rest).ok_or_else(|| fail("truncated length".into()))?;
        }
        if len == 0 {
            return Ok(());
        }
        let meta_len = usize::try_from(len)
            .ok()
            .filter(|&n| n <= rest.len())
            .ok_or_else(|| {
                fail(format!(
                    "metadata length {len} with {} bytes left",
                    rest.len()
                ))
            })?;
        let (meta, after) = rest.split_at(meta_len);
        let msg = root_as_message(meta).map_err(|e| fail(format!("unreadable metadata: {e}")))?;
        let body_len = usize::try_from(msg.bodyLength())
            .ok()
            .filter(|&n| n <= after.len())
            .ok_or_else(|| {
                fail(format!(
                    "body length {} with {} bytes left",
                    msg.bodyLength(),
                    after.len()
                ))
            })?;
        let (body, after) = after.split_at(body_len);
        rest = after;
        let batch = match msg.header_type() {
            MessageHeader::Schema => {
                let fields = msg.header_as_schema().and_then(|s| s.fields());
                fields.into_iter().flatten().try_for_each(no_views)?;
                None
            }
            MessageHeader::RecordBatch => msg.header_as_record_batch(),
            MessageHeader::DictionaryBatch => {
                msg.header_as_dictionary_batch().and_then(|d| d.data())
            }
            _ => None,
        };
        let Some(batch) = batch else { continue };
        let len = u64::try_from(batch.length())
            .map_err(|_| fail(format!("batch length {}", batch.length())))?;
        rows = rows.saturating_add(len);
        if rows > MAX_ROWS {
            return Err(Error::Rows { message, rows });
        }
        let codec = batch.compression().map(|c| c.codec());
        for (i, buf) in batch.buffers().into_iter().flatten().enumerate() {
            let range = usize::try_from(buf.offset())
                .ok()
                .zip(usize::try_from(buf.length()).ok())
                .and_then(|(o, l)| Some(o..o.checked_add(l)?))
                .filter(|r| r.end <= body.len())
                .ok_or_else(|| {
                    fail(format!(
                        "buffer {i} at offset {} of length {} lies outside the {}-byte body",
                        buf.offset(),
                        buf.length(),
                        body.len()
                    ))
                })?;
            let Some(codec) = codec else { continue };
            let data = &body[range];
            if data.is_empty() {
                continue;
            }
            let (prefix, frame) = data.split_first_chunk::<8>().ok_or_else(|| {
                fail(format!(
                    "compressed buffer {i} of {} bytes has no 8-byte length",
                    data.len()
                ))
            })?;
            let size = match i64::from_le_bytes(*prefix) {
                NOT_COMPRESSED => frame.len() as u64,
                n => u64::try_from(n)
                    .map_err(|_| fail(format!("compressed buffer {i} declares length {n}")))?,
            };
            declared = declared.saturating_add(size);
            if declared > MAX_DECODED_BYTES as u64 {
                return Err(Error::Decodes { message, declared });
            }
            if codec == CompressionType::LZ4_FRAME && i64::from_le_bytes(*prefix) != NOT_COMPRESSED
            {
                let got = lz4_output_len(frame, size);
                if got > size {
                    return Err(fail(format!(
                        "LZ4 buffer {i} decompresses to more than its declared {size} bytes"
                    )));
                }
            }
        }
    }
}

/// Refuses `field` if it, or a field nested in it, has a view or run-end
/// encoded type.
fn no_views(field: Field<'_>) -> Result<(), Error> {
    if matches!(
        field.type_type(),
        Type::Utf8View
            | Type::BinaryView
            | Type::ListView
            | Type::LargeListView
            | Type::RunEndEncoded
    ) {
        return Err(Error::ViewType(
            field.name().unwrap_or_default().to_string(),
        ));
    }
    field
        .children()
        .into_iter()
        .flatten()
        .try_for_each(no_views)
}

fn take_i32(rest: &mut &[u8]) -> Option<i32> {
    let (head, tail) = rest.split_first_chunk::<4>()?;
    *rest = tail;
    Some(i32::from_le_bytes(*head))
}

/// Bytes an LZ4 frame decompresses to, counted up to `limit + 1` without
/// storing them. A corrupt frame counts what decoded before the error (arrow
/// reports the error itself when it decodes).
fn lz4_output_len(frame: &[u8], limit: u64) -> u64 {
    use std::io::Read;
    let mut decoder = lz4_flex::frame::FrameDecoder::new(frame).take(limit.saturating_add(1));
    std::io::copy(&mut decoder, &mut std::io::sink()).unwrap_or(limit)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
    use arrow::record_batch::RecordBatch;

    use super::*;

    fn stream(rows: usize, codec: Option<CompressionType>) -> Vec<u8> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("event_id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|i| format!("e{i}")),
                )),
                Arc::new(Int64Array::from(vec![0i64; rows])),
            ],
        )
        .unwrap();
        let opts = IpcWriteOptions::default()
            .try_with_compression(codec)
            .unwrap();
        let mut w = StreamWriter::try_new_with_options(Vec::new(), &schema, opts).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        w.into_inner().unwrap()
    }

    /// Byte offsets of the messages in `ipc`: (metadata start, metadata
    /// length, body start).
    fn messages(ipc: &[u8]) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos + 8 <= ipc.len() {
            let len = i32::from_le_bytes(ipc[pos + 4..pos + 8].try_into().unwrap()) as usize;
            if len == 0 {
                break;
            }
            let msg = root_as_message(&ipc[pos + 8..pos + 8 + len]).unwrap();
            out.push((pos + 8, len, pos + 8 + len));
            pos += 8 + len + msg.bodyLength() as usize;
        }
        out
    }

    /// Offset in `ipc` of the first compressed buffer whose prefix declares a
    /// compressed length (not -1).
    fn first_compressed_prefix(ipc: &[u8]) -> usize {
        let (meta, len, body) = messages(ipc)[1];
        let msg = root_as_message(&ipc[meta..meta + len]).unwrap();
        let batch = msg.header_as_record_batch().unwrap();
        batch
            .buffers()
            .unwrap()
            .iter()
            .map(|b| body + b.offset() as usize)
            .find(|&at| {
                i64::from_le_bytes(ipc[at..at + 8].try_into().unwrap()) > 0 && ipc.len() > at + 8
            })
            .expect("a compressed buffer")
    }

    #[test]
    fn valid_streams_pass_and_read() {
        for codec in [
            None,
            Some(CompressionType::LZ4_FRAME),
            Some(CompressionType::ZSTD),
        ] {
            let ipc = stream(10_000, codec);
            assert_eq!(check(&ipc), Ok(()), "{codec:?}");
            let rows: usize = arrow::ipc::reader::StreamReader::try_new(&ipc[..], None)
                .unwrap()
                .map(|b| b.unwrap().num_rows())
                .sum();
            assert_eq!(rows, 10_000);
        }
        assert_eq!(check(&[]), Ok(()));
    }

    #[test]
    fn body_length_past_the_request_is_refused() {
        let mut ipc = stream(10, None);
        let (meta, len, _) = messages(&ipc)[1];
        // bodyLength is the only i64 field of the message table; patch its
        // value where the flatbuffer stores it.
        let body_len = root_as_message(&ipc[meta..meta + len])
            .unwrap()
            .bodyLength();
        let at = (meta..meta + len - 8)
            .find(|&i| i64::from_le_bytes(ipc[i..i + 8].try_into().unwrap()) == body_len)
            .unwrap();
        ipc[at..at + 8].copy_from_slice(&(1i64 << 40).to_le_bytes());
        let patched = root_as_message(&ipc[meta..meta + len])
            .unwrap()
            .bodyLength();
        assert_eq!(patched, 1 << 40);
        let err = check(&ipc).unwrap_err();
        assert!(
            matches!(&err, Error::Framing { message: 1, what } if what.starts_with("body length 1099511627776 with")),
            "{err}"
        );
        ipc[at..at + 8].copy_from_slice(&(-1i64).to_le_bytes());
        assert!(matches!(
            check(&ipc),
            Err(Error::Framing { message: 1, .. })
        ));
    }

    #[test]
    fn metadata_length_past_the_request_is_refused() {
        let mut ipc = stream(10, None);
        ipc[4..8].copy_from_slice(&i32::MAX.to_le_bytes());
        assert_eq!(
            check(&ipc).unwrap_err().to_string(),
            format!(
                "message 0: metadata length {} with {} bytes left",
                i32::MAX,
                ipc.len() - 8
            )
        );
        ipc[4..8].copy_from_slice(&(-5i32).to_le_bytes());
        assert!(matches!(
            check(&ipc),
            Err(Error::Framing { message: 0, .. })
        ));
        assert!(matches!(
            check(&ipc[..6]),
            Err(Error::Framing { message: 0, .. })
        ));
    }

    #[test]
    fn declared_sizes_over_the_bound_are_refused() {
        for codec in [CompressionType::LZ4_FRAME, CompressionType::ZSTD] {
            let mut ipc = stream(10_000, Some(codec));
            let at = first_compressed_prefix(&ipc);
            ipc[at..at + 8].copy_from_slice(&(1i64 << 40).to_le_bytes());
            assert!(
                matches!(check(&ipc), Err(Error::Decodes { message: 1, declared }) if declared >= 1 << 40),
                "{codec:?}"
            );
            ipc[at..at + 8].copy_from_slice(&(-7i64).to_le_bytes());
            assert!(matches!(
                check(&ipc),
                Err(Error::Framing { message: 1, .. })
            ));
        }
    }

    /// A real bomb: 16 M rows of zeros in three columns (320 MiB as Arrow)
    /// compress to a few hundred kilobytes and declare their true size.
    #[test]
    fn a_true_compression_bomb_is_refused() {
        use arrow::array::{DictionaryArray, Int32Array};
        use arrow::datatypes::Int32Type;
        let rows = 16 << 20;
        let batch = RecordBatch::try_from_iter([
            (
                "event_id",
                Arc::new(DictionaryArray::<Int32Type>::new(
                    Int32Array::from(vec![0; rows]),
                    Arc::new(StringArray::from(vec!["x"])),
                )) as _,
            ),
            (
                "timestamp",
                Arc::new(Int64Array::from(vec![0i64; rows])) as _,
            ),
            ("n", Arc::new(Int64Array::from(vec![0i64; rows])) as _),
        ])
        .unwrap();
        let opts = IpcWriteOptions::default()
            .try_with_compression(Some(CompressionType::ZSTD))
            .unwrap();
        let mut w = StreamWriter::try_new_with_options(Vec::new(), &batch.schema(), opts).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        let ipc = w.into_inner().unwrap();
        assert!(ipc.len() < 4 << 20, "{}", ipc.len());
        // Message 0 is the schema, 1 the dictionary, 2 the record batch.
        let err = check(&ipc).unwrap_err();
        assert!(matches!(err, Error::Decodes { message: 2, .. }), "{err:?}");
    }

    #[test]
    fn view_and_run_end_encoded_columns_are_refused() {
        use arrow::array::{
            ArrayRef, BinaryViewArray, Int32Array, ListArray, RunArray, StringViewArray,
        };
        use arrow::datatypes::{Int32Type, Int64Type};
        let n = 3;
        let list = ListArray::from_iter_primitive::<Int64Type, _, _>(
            (0..n).map(|_| Some(vec![Some(1i64)])),
        );
        let columns: [(&str, ArrayRef); 3] = [
            (
                "s",
                Arc::new(StringViewArray::from_iter_values(["a", "b", "c"])),
            ),
            (
                "b",
                Arc::new(BinaryViewArray::from_iter_values([b"a", b"b", b"c"])),
            ),
            (
                "r",
                Arc::new(
                    RunArray::<Int32Type>::try_new(
                        &Int32Array::from(vec![3]),
                        &StringArray::from(vec!["x"]),
                    )
                    .unwrap(),
                ),
            ),
        ];
        for (name, col) in columns {
            let batch = RecordBatch::try_from_iter([
                (
                    "event_id",
                    Arc::new(StringArray::from(vec!["1", "2", "3"])) as ArrayRef,
                ),
                ("l", Arc::new(list.clone())),
                (name, col),
            ])
            .unwrap();
            let mut w = StreamWriter::try_new(Vec::new(), &batch.schema()).unwrap();
            w.write(&batch).unwrap();
            w.finish().unwrap();
            let ipc = w.into_inner().unwrap();
            assert_eq!(check(&ipc), Err(Error::ViewType(name.into())));
        }
    }

    #[test]
    fn lz4_frames_that_outgrow_their_declared_size_are_refused() {
        let mut ipc = stream(10_000, Some(CompressionType::LZ4_FRAME));
        let at = first_compressed_prefix(&ipc);
        let real = i64::from_le_bytes(ipc[at..at + 8].try_into().unwrap());
        ipc[at..at + 8].copy_from_slice(&(real / 2).to_le_bytes());
        let err = check(&ipc).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "decompresses to more than its declared {} bytes",
                real / 2
            )),
            "{err}"
        );
    }
}
