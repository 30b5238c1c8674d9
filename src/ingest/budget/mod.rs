//! Bounds what prost would allocate for a request before it decodes it.
//!
//! prost turns every occurrence of a repeated message field into a whole
//! struct: an empty `LogRecord` is 2 bytes on the wire and ~200 in memory, so
//! a 16 MiB request of them decodes into ~1.7 GB (and a few KB of gzip
//! inflate to those 16 MiB). [`check`] walks the request's bytes with the
//! shape of its message ([`Shape`]) and refuses it when the decoded size
//! would pass [`MAX_DECODED_BYTES`], before anything is allocated.
//!
//! The estimate is an upper bound: each element of a repeated message field
//! counts its struct's size twice, the first four times (a `Vec` starts
//! with four slots and doubles as it grows; a singular
//! message lives inside its parent, and prost merges a repeated occurrence
//! into it), each string or bytes field its length (and an element of a
//! repeated string its header, twice), packed varints 16 bytes per byte,
//! and every other field 8 bytes (it may be one element of a repeated
//! scalar). Real exports decode to 2–8 times their size, below the bound.
//! Traces never reach prost (they are converted from the bytes, see
//! [`super::wire`]). OTLP/JSON requests have their own walk over the same
//! shapes ([`json`]).

pub mod json;

use std::marker::PhantomData;
use std::mem::size_of;

use bytes::Buf;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, EntityRef, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;
use opentelemetry_proto::tonic::metrics::v1::summary_data_point::ValueAtQuantile;
use opentelemetry_proto::tonic::metrics::v1::{
    Exemplar, ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Histogram,
    HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, Summary,
    SummaryDataPoint,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status as SpanStatus,
};

use super::wire::{self, Value};
use crate::proto::ingestion::{
    DataRecords, GetTokenRequest, GetTokenResponse, ReadSpansRequest, ReadSpansResponse,
    ValidateApiKeyRequest, ValidateApiKeyResponse, WriteBatchRequest, WriteBatchResponse,
};
use crate::proto::storage::{DataRecord, Value as RecordValue};

/// Most bytes one request may decode into (the bound of the other
/// per-request amplifications: repeated resource text, Arrow IPC).
pub const MAX_DECODED_BYTES: u64 = 256 << 20;

/// Messages nested deeper than prost's own recursion limit are malformed.
const MAX_DEPTH: usize = 100;

/// The most child message fields of one [`Shape`].
const MAX_CHILDREN: usize = 8;

/// What is wrong with a request, before it is decoded.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("the request would decode into more than {MAX_DECODED_BYTES} bytes of messages (very many small items, or values nested deep); split it")]
    TooLarge,
    #[error("malformed protobuf request: {0}")]
    Malformed(String),
}

/// A message type: its size in memory and which fields hold messages.
pub struct Shape {
    size: usize,
    children: &'static [Child],
    /// Fields of packed varints (up to 8 bytes in memory per wire byte).
    packed_varints: &'static [u32],
    /// Repeated string fields (a `String` header per element).
    repeated_strings: &'static [u32],
    /// Whether the OTLP/JSON decoder buffers the object's keys that are not
    /// child messages (serde's `flatten` of a oneof, see [`json`]).
    buffers_other_keys: bool,
}

/// A field that holds messages.
pub struct Child {
    number: u32,
    /// Its OTLP/JSON (lowerCamelCase) name.
    name: &'static str,
    shape: &'static Shape,
    repeated: bool,
    /// Part of a oneof that serde buffers before decoding ([`json`]).
    buffered: bool,
}

const fn many(number: u32, name: &'static str, shape: &'static Shape) -> Child {
    Child {
        number,
        name,
        shape,
        repeated: true,
        buffered: false,
    }
}

const fn once(number: u32, name: &'static str, shape: &'static Shape) -> Child {
    Child {
        number,
        name,
        shape,
        repeated: false,
        buffered: false,
    }
}

/// A message field of a oneof that the OTLP/JSON decoder buffers whole
/// (serde's `flatten`) before it decodes it.
const fn oneof(number: u32, name: &'static str, shape: &'static Shape) -> Child {
    Child {
        buffered: true,
        ..once(number, name, shape)
    }
}

impl Shape {
    const fn leaf(size: usize) -> Self {
        Shape::of(size, &[])
    }

    const fn of(size: usize, children: &'static [Child]) -> Self {
        assert!(children.len() <= MAX_CHILDREN);
        Shape {
            size,
            children,
            packed_varints: &[],
            repeated_strings: &[],
            buffers_other_keys: false,
        }
    }
}

/// Messages whose decoded size [`check`] can bound.
pub trait Shaped {
    const SHAPE: &'static Shape;
}

/// Refuses `buf`, the encoding of a `T`, if decoding it could allocate more
/// than [`MAX_DECODED_BYTES`]. Malformed framing is reported here too, as
/// prost would.
pub fn check<T: Shaped>(buf: &[u8]) -> Result<(), Error> {
    let mut total = 0u64;
    walk(buf, T::SHAPE, 0, &mut total)
}

/// What the `n`th item (from 0) of a vector of `size`-byte items adds to
/// its allocation: four slots at the first (a `Vec`'s smallest), none until
/// the fourth is full, then two per item (it doubles).
fn vec_slot(n: usize, size: u64) -> u64 {
    match n {
        0 => 4 * size,
        1..=3 => 0,
        _ => 2 * size,
    }
}

fn walk(buf: &[u8], shape: &Shape, depth: usize, total: &mut u64) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(Error::Malformed(format!(
            "messages nested deeper than {MAX_DEPTH}"
        )));
    }
    // Elements so far of each repeated child field.
    let mut elements = [0usize; MAX_CHILDREN];
    for field in wire::fields(buf, depth) {
        let (number, value) = field.map_err(|e| Error::Malformed(e.to_string()))?;
        let bytes = match value {
            Value::Len(inner) => {
                if let Some(i) = shape.children.iter().position(|c| c.number == number) {
                    let child = &shape.children[i];
                    walk(inner, child.shape, depth + 1, total)?;
                    match child.repeated {
                        true => {
                            elements[i] += 1;
                            vec_slot(elements[i] - 1, child.shape.size as u64)
                        }
                        false => 0,
                    }
                } else if shape.packed_varints.contains(&number) {
                    16 * inner.len() as u64
                } else if shape.repeated_strings.contains(&number) {
                    2 * size_of::<String>() as u64 + inner.len() as u64
                } else {
                    inner.len() as u64
                }
            }
            _ => 8,
        };
        *total = total.saturating_add(bytes);
        if *total > MAX_DECODED_BYTES {
            return Err(Error::TooLarge);
        }
    }
    Ok(())
}

/// A message whose object the OTLP/JSON decoder buffers, but for its child
/// messages (a flattened oneof beside ordinary fields).
const fn flattened(size: usize, children: &'static [Child]) -> Shape {
    Shape {
        buffers_other_keys: true,
        ..Shape::of(size, children)
    }
}

static ANY_VALUE: Shape = flattened(
    size_of::<AnyValue>(),
    &[
        oneof(5, "arrayValue", &ARRAY_VALUE),
        oneof(6, "kvlistValue", &KV_LIST),
    ],
);
static ARRAY_VALUE: Shape = Shape::of(size_of::<ArrayValue>(), &[many(1, "values", &ANY_VALUE)]);
static KV_LIST: Shape = Shape::of(size_of::<KeyValueList>(), &[many(1, "values", &KEY_VALUE)]);
static KEY_VALUE: Shape = Shape::of(size_of::<KeyValue>(), &[once(2, "value", &ANY_VALUE)]);
static SCOPE: Shape = Shape::of(
    size_of::<InstrumentationScope>(),
    &[many(3, "attributes", &KEY_VALUE)],
);
static ENTITY_REF: Shape = Shape {
    repeated_strings: &[3, 4],
    ..Shape::leaf(size_of::<EntityRef>())
};
static RESOURCE: Shape = Shape::of(
    size_of::<Resource>(),
    &[
        many(1, "attributes", &KEY_VALUE),
        many(3, "entityRefs", &ENTITY_REF),
    ],
);

static STATUS: Shape = Shape::leaf(size_of::<SpanStatus>());
static EVENT: Shape = Shape::of(size_of::<Event>(), &[many(3, "attributes", &KEY_VALUE)]);
static LINK: Shape = Shape::of(size_of::<Link>(), &[many(4, "attributes", &KEY_VALUE)]);
static SPAN: Shape = Shape::of(
    size_of::<Span>(),
    &[
        many(9, "attributes", &KEY_VALUE),
        many(11, "events", &EVENT),
        many(13, "links", &LINK),
        once(15, "status", &STATUS),
    ],
);
static SCOPE_SPANS: Shape = Shape::of(
    size_of::<ScopeSpans>(),
    &[once(1, "scope", &SCOPE), many(2, "spans", &SPAN)],
);
static RESOURCE_SPANS: Shape = Shape::of(
    size_of::<ResourceSpans>(),
    &[
        once(1, "resource", &RESOURCE),
        many(2, "scopeSpans", &SCOPE_SPANS),
    ],
);
static TRACES_REQUEST: Shape = Shape::of(
    size_of::<ExportTraceServiceRequest>(),
    &[many(1, "resourceSpans", &RESOURCE_SPANS)],
);

static LOG_RECORD: Shape = Shape::of(
    size_of::<LogRecord>(),
    &[
        once(5, "body", &ANY_VALUE),
        many(6, "attributes", &KEY_VALUE),
    ],
);
static SCOPE_LOGS: Shape = Shape::of(
    size_of::<ScopeLogs>(),
    &[once(1, "scope", &SCOPE), many(2, "logRecords", &LOG_RECORD)],
);
static RESOURCE_LOGS: Shape = Shape::of(
    size_of::<ResourceLogs>(),
    &[
        once(1, "resource", &RESOURCE),
        many(2, "scopeLogs", &SCOPE_LOGS),
    ],
);
static LOGS_REQUEST: Shape = Shape::of(
    size_of::<ExportLogsServiceRequest>(),
    &[many(1, "resourceLogs", &RESOURCE_LOGS)],
);

static EXEMPLAR: Shape = flattened(
    size_of::<Exemplar>(),
    &[many(7, "filteredAttributes", &KEY_VALUE)],
);
static NUMBER_POINT: Shape = flattened(
    size_of::<NumberDataPoint>(),
    &[
        many(7, "attributes", &KEY_VALUE),
        many(5, "exemplars", &EXEMPLAR),
    ],
);
static HISTOGRAM_POINT: Shape = Shape::of(
    size_of::<HistogramDataPoint>(),
    &[
        many(9, "attributes", &KEY_VALUE),
        many(8, "exemplars", &EXEMPLAR),
    ],
);
static BUCKETS: Shape = Shape {
    packed_varints: &[2],
    ..Shape::leaf(size_of::<Buckets>())
};
static EXP_HISTOGRAM_POINT: Shape = Shape::of(
    size_of::<ExponentialHistogramDataPoint>(),
    &[
        many(1, "attributes", &KEY_VALUE),
        once(8, "positive", &BUCKETS),
        once(9, "negative", &BUCKETS),
        many(11, "exemplars", &EXEMPLAR),
    ],
);
static QUANTILE: Shape = Shape::leaf(size_of::<ValueAtQuantile>());
static SUMMARY_POINT: Shape = Shape::of(
    size_of::<SummaryDataPoint>(),
    &[
        many(7, "attributes", &KEY_VALUE),
        many(6, "quantileValues", &QUANTILE),
    ],
);
static GAUGE: Shape = Shape::of(size_of::<Gauge>(), &[many(1, "dataPoints", &NUMBER_POINT)]);
static SUM: Shape = Shape::of(size_of::<Sum>(), &[many(1, "dataPoints", &NUMBER_POINT)]);
static HISTOGRAM: Shape = Shape::of(
    size_of::<Histogram>(),
    &[many(1, "dataPoints", &HISTOGRAM_POINT)],
);
static EXP_HISTOGRAM: Shape = Shape::of(
    size_of::<ExponentialHistogram>(),
    &[many(1, "dataPoints", &EXP_HISTOGRAM_POINT)],
);
static SUMMARY: Shape = Shape::of(
    size_of::<Summary>(),
    &[many(1, "dataPoints", &SUMMARY_POINT)],
);
static METRIC: Shape = flattened(
    size_of::<Metric>(),
    &[
        oneof(5, "gauge", &GAUGE),
        oneof(7, "sum", &SUM),
        oneof(9, "histogram", &HISTOGRAM),
        oneof(10, "exponentialHistogram", &EXP_HISTOGRAM),
        oneof(11, "summary", &SUMMARY),
        many(12, "metadata", &KEY_VALUE),
    ],
);
static SCOPE_METRICS: Shape = Shape::of(
    size_of::<ScopeMetrics>(),
    &[once(1, "scope", &SCOPE), many(2, "metrics", &METRIC)],
);
static RESOURCE_METRICS: Shape = Shape::of(
    size_of::<ResourceMetrics>(),
    &[
        once(1, "resource", &RESOURCE),
        many(2, "scopeMetrics", &SCOPE_METRICS),
    ],
);
static METRICS_REQUEST: Shape = Shape::of(
    size_of::<ExportMetricsServiceRequest>(),
    &[many(1, "resourceMetrics", &RESOURCE_METRICS)],
);

/// A `map<string, Value>` entry: key, value and the map's node overhead.
static FIELD_ENTRY: Shape = Shape::of(
    size_of::<String>() + size_of::<RecordValue>() + 32,
    &[once(2, "value", &RECORD_VALUE)],
);
static RECORD_VALUE: Shape = Shape::leaf(size_of::<RecordValue>());
static DATA_RECORD: Shape = Shape::of(size_of::<DataRecord>(), &[many(4, "fields", &FIELD_ENTRY)]);
static DATA_RECORDS: Shape = Shape::of(
    size_of::<DataRecords>(),
    &[many(1, "records", &DATA_RECORD)],
);
static WRITE_BATCH: Shape = Shape::of(
    size_of::<WriteBatchRequest>(),
    &[once(4, "records", &DATA_RECORDS)],
);

impl Shaped for ExportTraceServiceRequest {
    const SHAPE: &'static Shape = &TRACES_REQUEST;
}

impl Shaped for ExportLogsServiceRequest {
    const SHAPE: &'static Shape = &LOGS_REQUEST;
}

impl Shaped for ExportMetricsServiceRequest {
    const SHAPE: &'static Shape = &METRICS_REQUEST;
}

impl Shaped for WriteBatchRequest {
    const SHAPE: &'static Shape = &WRITE_BATCH;
}

/// Messages with no repeated message fields a client could fill (requests),
/// or that only our own server sends (responses, decoded by our clients).
macro_rules! flat {
    ($($t:ty),*) => {$(
        impl Shaped for $t {
            const SHAPE: &'static Shape = &Shape::leaf(size_of::<$t>());
        }
    )*};
}
flat!(
    WriteBatchResponse,
    GetTokenRequest,
    GetTokenResponse,
    ValidateApiKeyRequest,
    ValidateApiKeyResponse,
    ReadSpansRequest,
    ReadSpansResponse
);

/// prost's codec, with [`check`] before every decode. Our own services use it
/// (`build.rs`: `codec_path`), and so do the OTLP logs and metrics services
/// (`super::otlp_grpc`).
#[derive(Debug, Clone, Copy)]
pub struct CheckedCodec<T, U>(PhantomData<fn(T) -> U>);

impl<T, U> Default for CheckedCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for CheckedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Shaped + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder(PhantomData)
    }
}

pub struct CheckedDecoder<U>(PhantomData<fn() -> U>);

impl<U: Message + Default + Shaped> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let bytes = buf.copy_to_bytes(buf.remaining());
        match check::<U>(&bytes) {
            Ok(()) => {}
            Err(e @ Error::TooLarge) => return Err(Status::resource_exhausted(e.to_string())),
            Err(e @ Error::Malformed(_)) => return Err(Status::invalid_argument(e.to_string())),
        }
        // Errors as tonic's prost codec reports them (`fix_status` rewrites
        // them into INVALID_ARGUMENT).
        U::decode(bytes)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(field: u32, inner: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(inner.len() as u64, &mut out);
        out.extend_from_slice(inner);
        out
    }

    #[test]
    fn many_empty_items_are_refused_before_decoding() {
        // 7 M empty log records: 14 MB on the wire, ~1.5 GB decoded.
        let logs = ld(1, &ld(2, &[0x12u8, 0x00].repeat(7_000_000)));
        assert_eq!(
            check::<ExportLogsServiceRequest>(&logs),
            Err(Error::TooLarge)
        );
        // 4 M empty exponential histogram points.
        let points = [0x0au8, 0x00].repeat(4_000_000);
        let metrics = ld(1, &ld(2, &ld(2, &ld(10, &points))));
        assert_eq!(
            check::<ExportMetricsServiceRequest>(&metrics),
            Err(Error::TooLarge)
        );
        // 8 M empty records of one DataRecord batch.
        let batch = ld(4, &[0x0au8, 0x00].repeat(8_000_000));
        assert_eq!(check::<WriteBatchRequest>(&batch), Err(Error::TooLarge));
        // A few of them are fine, and the bound holds for what prost makes.
        let small = ld(1, &ld(2, &[0x12u8, 0x00].repeat(1_000)));
        check::<ExportLogsServiceRequest>(&small).unwrap();
        let decoded = ExportLogsServiceRequest::decode(&small[..]).unwrap();
        assert_eq!(
            decoded.resource_logs[0].scope_logs[0].log_records.len(),
            1_000
        );
    }

    #[test]
    fn real_exports_pass() {
        use opentelemetry_proto::tonic::common::v1::any_value;
        let kv = |k: &str, v: &str| KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
            ..Default::default()
        };
        let record = LogRecord {
            time_unix_nano: 1,
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue("x".repeat(100))),
            }),
            attributes: (0..10).map(|i| kv(&format!("k{i}"), "value")).collect(),
            ..Default::default()
        };
        let req = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", "svc")],
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    log_records: vec![record; 40_000],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let bytes = req.encode_to_vec();
        assert!(bytes.len() > 10 << 20, "{}", bytes.len());
        check::<ExportLogsServiceRequest>(&bytes).unwrap();
    }

    #[test]
    fn malformed_bytes_are_reported() {
        let err = check::<ExportLogsServiceRequest>(&[0x0a, 0x05, 0x00]).unwrap_err();
        assert!(matches!(err, Error::Malformed(_)), "{err}");
    }
}
