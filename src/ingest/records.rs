//! DataRecord batches → one Arrow record batch in the endpoint's schema.
//!
//! Two payloads, one result: `event_id` (utf8), `timestamp` (timestamp ns
//! UTC), `version` (int64), then the batch's field columns in schema order.
//! Validation happens before anything is written: names, reserved names,
//! value sizes, types inside the batch, then the schema registry's evolution
//! check (which persists new columns). Deterministic: the same request and
//! registry give the same rows, which WAL replay relies on.
//!
//! Protobuf `DataRecord`s: a field's type is the kind of its values; a field
//! whose values are all null creates no column (its type is unknown) unless
//! the schema already has it. Arrow IPC: column types map as documented in the
//! README (`utf8`/`large_utf8`/`utf8_view`/`dictionary<_, utf8>` → string,
//! integers → int64, floats → double, binary → bytes, timestamps and dates →
//! timestamp, `null` → an all-null column of the schema's type if it exists).

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::sync::Arc;

use arrow::array::{
    new_null_array, Array, ArrayBuilder, ArrayRef, AsArray, BinaryBuilder, BooleanBuilder,
    Float64Builder, Int64Array, Int64Builder, StringBuilder, TimestampNanosecondBuilder,
};
use arrow::compute::{cast_with_options, concat_batches, CastOptions};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use arrow::ipc::reader::StreamReader;
use arrow::record_batch::RecordBatch;

use crate::memtable::schema::{
    timestamp_type, ColType, Error as SchemaError, Registry, MAX_COLUMNS,
};
use crate::memtable::TableId;
use crate::proto::storage::value::Kind;
use crate::proto::storage::DataRecord;

/// Largest string or bytes value of one field.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
pub const MAX_EVENT_ID_BYTES: usize = 256;
/// Field names that clash with the record's own columns or the hive partition columns.
pub const RESERVED_FIELDS: [&str; 7] = [
    "event_id",
    "timestamp",
    "version",
    "tenant",
    "endpoint",
    "date",
    "hour",
];
pub const FIELD_PATTERN: &str = "[a-z_][a-z0-9_]{0,62}";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid field name {0:?}: must match {FIELD_PATTERN}")]
    FieldName(String),
    #[error("field name {0:?} is reserved (event_id, timestamp, version and the partition columns tenant, endpoint, date, hour)")]
    Reserved(String),
    #[error("record {index}: event_id must be 1 to {MAX_EVENT_ID_BYTES} bytes")]
    EventId { index: usize },
    #[error("field `{field}`: value of {len} bytes exceeds the {MAX_VALUE_BYTES}-byte limit")]
    ValueTooLarge { field: String, len: usize },
    #[error("field `{field}`: type {first} in an earlier record, {other} in record {index}")]
    MixedTypes {
        field: String,
        first: &'static str,
        other: &'static str,
        index: usize,
    },
    #[error("the batch has no records")]
    Empty,
    #[error("arrow_ipc_stream: dictionary column `{field}` expands to {bytes} bytes; at most {MAX_EXPANDED_BYTES} per batch")]
    Expands { field: String, bytes: usize },
    #[error("{records} records x {columns} columns is {} cells; at most {MAX_CELLS} per batch (a missing field is a null cell too): split the batch", records * columns)]
    TooManyCells { records: usize, columns: usize },
    #[error("arrow_ipc_stream: {0}")]
    Ipc(String),
    #[error("arrow_ipc_stream: {0}")]
    IpcBounds(#[from] super::ipc_check::Error),
    #[error("arrow_ipc_stream: column `{0}` appears twice")]
    DuplicateColumn(String),
    #[error("arrow_ipc_stream: required column `{0}` is missing")]
    MissingColumn(&'static str),
    #[error("arrow_ipc_stream: column `{column}` has type {found}; expected {expected}")]
    ColumnType {
        column: String,
        found: String,
        expected: &'static str,
    },
    #[error("arrow_ipc_stream: column `{0}` has nulls")]
    Nulls(&'static str),
    #[error(transparent)]
    Schema(#[from] crate::memtable::schema::Error),
}

impl crate::error::Classify for Error {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            Self::Schema(e) => e.kind(),
            _ => crate::error::ErrorKind::InvalidInput,
        }
    }
}

/// Most cells (records x columns of the batch) one request may convert to.
/// Arrow stores a null in every column a record leaves out, so a small
/// request of many records over many sparse fields would otherwise become
/// gigabytes of nulls.
pub const MAX_CELLS: usize = 32 << 20;

fn check_cells(records: usize, columns: usize) -> Result<(), Error> {
    match records.saturating_mul(columns) > MAX_CELLS {
        true => Err(Error::TooManyCells { records, columns }),
        false => Ok(()),
    }
}

pub fn is_valid_field(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

fn check_field_name(name: &str) -> Result<(), Error> {
    if !is_valid_field(name) {
        return Err(Error::FieldName(name.chars().take(80).collect()));
    }
    if RESERVED_FIELDS.contains(&name) {
        return Err(Error::Reserved(name.into()));
    }
    Ok(())
}

fn kind_type(k: &Kind) -> Option<ColType> {
    Some(match k {
        Kind::StringValue(_) => ColType::String,
        Kind::IntValue(_) => ColType::Int64,
        Kind::DoubleValue(_) => ColType::Double,
        Kind::BoolValue(_) => ColType::Bool,
        Kind::BytesValue(_) => ColType::Bytes,
        Kind::TimestampUnixNano(_) => ColType::Timestamp,
        Kind::NullValue(_) => return None,
    })
}

/// Bytes reserved up front for a string or binary column of `rows`: enough
/// for short dense values, bounded for sparse columns (they grow as needed).
fn data_hint(rows: usize) -> usize {
    rows.saturating_mul(16).min(1 << 20)
}

/// `array` without the capacity its builder reserved and did not use: the
/// memtable budget counts capacity, and a batch over many sparse string
/// fields would otherwise hold `data_hint` unused bytes for each.
fn shrunk<A: Array>(mut array: A) -> A {
    array.shrink_to_fit();
    array
}

enum Builder {
    String(StringBuilder),
    Int64(Int64Builder),
    Double(Float64Builder),
    Bool(BooleanBuilder),
    Bytes(BinaryBuilder),
    Timestamp(TimestampNanosecondBuilder),
}

impl Builder {
    fn new(ty: ColType, rows: usize) -> Self {
        match ty {
            ColType::String => Self::String(StringBuilder::with_capacity(rows, data_hint(rows))),
            ColType::Int64 => Self::Int64(Int64Builder::with_capacity(rows)),
            ColType::Double => Self::Double(Float64Builder::with_capacity(rows)),
            ColType::Bool => Self::Bool(BooleanBuilder::with_capacity(rows)),
            ColType::Bytes => Self::Bytes(BinaryBuilder::with_capacity(rows, data_hint(rows))),
            ColType::Timestamp => Self::Timestamp(TimestampNanosecondBuilder::with_capacity(rows)),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::String(b) => b.len(),
            Self::Int64(b) => b.len(),
            Self::Double(b) => b.len(),
            Self::Bool(b) => b.len(),
            Self::Bytes(b) => b.len(),
            Self::Timestamp(b) => b.len(),
        }
    }

    fn append_null(&mut self) {
        match self {
            Self::String(b) => b.append_null(),
            Self::Int64(b) => b.append_null(),
            Self::Double(b) => b.append_null(),
            Self::Bool(b) => b.append_null(),
            Self::Bytes(b) => b.append_null(),
            Self::Timestamp(b) => b.append_null(),
        }
    }

    /// Appends a value already checked to have this builder's type.
    fn append(&mut self, k: &Kind) {
        match (self, k) {
            (Self::String(b), Kind::StringValue(v)) => b.append_value(v),
            (Self::Int64(b), Kind::IntValue(v)) => b.append_value(*v),
            (Self::Double(b), Kind::DoubleValue(v)) => b.append_value(*v),
            (Self::Bool(b), Kind::BoolValue(v)) => b.append_value(*v),
            (Self::Bytes(b), Kind::BytesValue(v)) => b.append_value(v),
            (Self::Timestamp(b), Kind::TimestampUnixNano(v)) => b.append_value(*v),
            (b, _) => b.append_null(),
        }
    }

    fn finish(self) -> ArrayRef {
        match self {
            Self::String(mut b) => Arc::new(shrunk(b.finish())),
            Self::Int64(mut b) => Arc::new(b.finish()),
            Self::Double(mut b) => Arc::new(b.finish()),
            Self::Bool(mut b) => Arc::new(b.finish()),
            Self::Bytes(mut b) => Arc::new(shrunk(b.finish())),
            Self::Timestamp(mut b) => Arc::new(b.finish().with_timezone("UTC")),
        }
    }
}

/// Protobuf records → rows of `table` (evolving its schema).
pub fn from_records(
    registry: &Registry,
    table: &TableId,
    records: &[DataRecord],
) -> Result<RecordBatch, Error> {
    if records.is_empty() {
        return Err(Error::Empty);
    }
    // Pass 1: names, sizes and one type per field (sorted by name, so new
    // columns are added in a deterministic order). Records of one batch
    // nearly always carry the same field names: a record whose names equal
    // the previous one's (fields iterate in name order) checks its types
    // against that record's slots instead of searching the map per field.
    let mut types: BTreeMap<&str, Option<ColType>> = BTreeMap::new();
    let mut prev: Vec<(&str, Option<ColType>)> = Vec::new();
    for (index, r) in records.iter().enumerate() {
        if r.event_id.is_empty() || r.event_id.len() > MAX_EVENT_ID_BYTES {
            return Err(Error::EventId { index });
        }
        let same_names =
            r.fields.len() == prev.len() && r.fields.keys().zip(&prev).all(|(a, (b, _))| a == b);
        let mut changed = !same_names;
        for (j, (name, value)) in r.fields.iter().enumerate() {
            let ty = value.kind.as_ref().and_then(kind_type);
            if let Some(Kind::StringValue(s)) = &value.kind {
                check_size(name, s.len())?;
            } else if let Some(Kind::BytesValue(b)) = &value.kind {
                check_size(name, b.len())?;
            }
            if same_names && (ty.is_none() || ty == prev[j].1) {
                continue;
            }
            changed = true;
            match types.get_mut(name.as_str()) {
                None => {
                    check_field_name(name)?;
                    types.insert(name, ty);
                    if types.len() > MAX_COLUMNS {
                        return Err(SchemaError::TooManyColumns(table.endpoint.to_string()).into());
                    }
                }
                Some(slot) => match (*slot, ty) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(Error::MixedTypes {
                            field: name.clone(),
                            first: a.name(),
                            other: b.name(),
                            index,
                        })
                    }
                    (None, Some(b)) => *slot = Some(b),
                    _ => {}
                },
            }
        }
        if changed {
            prev.clear();
            prev.extend(r.fields.keys().map(|k| (k.as_str(), types[k.as_str()])));
        }
    }
    let typed: Vec<(&str, ColType)> = types
        .iter()
        .filter_map(|(n, t)| t.map(|t| (*n, t)))
        .collect();
    check_cells(records.len(), types.len() + 3)?;
    let schema = registry.evolve(table, &typed)?;
    // Columns of this batch, in schema order: typed fields, plus all-null
    // fields the schema already knows.
    let present: Vec<(usize, &str, ColType)> = schema
        .fields()
        .iter()
        .enumerate()
        .skip(3)
        .filter(|(_, f)| types.contains_key(f.name().as_str()))
        .map(|(i, f)| {
            let ty = ColType::of_arrow(f.data_type()).expect("record column type");
            (i, f.name().as_str(), ty)
        })
        .collect();
    let n = records.len();
    let slot: HashMap<&str, usize> = present
        .iter()
        .enumerate()
        .map(|(i, (_, name, _))| (*name, i))
        .collect();
    let mut builders: Vec<Builder> = present
        .iter()
        .map(|(_, _, t)| Builder::new(*t, n))
        .collect();
    let mut event_id = StringBuilder::with_capacity(n, n * 26);
    let mut ts = TimestampNanosecondBuilder::with_capacity(n);
    let mut version = Int64Builder::with_capacity(n);
    // The builder of each field of the previous record (same-names fast path).
    let mut prev_names: Vec<&str> = Vec::new();
    let mut prev_slots: Vec<Option<usize>> = Vec::new();
    for (row, r) in records.iter().enumerate() {
        event_id.append_value(&r.event_id);
        ts.append_value(r.timestamp_unix_nano);
        version.append_value(r.version);
        let same_names = r.fields.len() == prev_names.len()
            && r.fields.keys().zip(&prev_names).all(|(a, b)| a == b);
        if !same_names {
            prev_names = r.fields.keys().map(String::as_str).collect();
            prev_slots = prev_names.iter().map(|k| slot.get(k).copied()).collect();
        }
        for (value, i) in r.fields.values().zip(&prev_slots) {
            if let (Some(i), Some(k)) = (i, &value.kind) {
                builders[*i].append(k);
            }
        }
        for b in &mut builders {
            if b.len() == row {
                b.append_null();
            }
        }
    }
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(shrunk(event_id.finish())),
        Arc::new(ts.finish().with_timezone("UTC")),
        Arc::new(version.finish()),
    ];
    cols.extend(builders.into_iter().map(Builder::finish));
    let indices: Vec<usize> = [0, 1, 2]
        .into_iter()
        .chain(present.iter().map(|(i, _, _)| *i))
        .collect();
    let batch_schema = Arc::new(schema.project(&indices).expect("indices are in the schema"));
    Ok(RecordBatch::try_new(batch_schema, cols).expect("columns match the projected schema"))
}

fn check_size(field: &str, len: usize) -> Result<(), Error> {
    if len > MAX_VALUE_BYTES {
        return Err(Error::ValueTooLarge {
            field: field.chars().take(80).collect(),
            len,
        });
    }
    Ok(())
}

/// The record type an Arrow column maps to; `Ok(None)` for the `null` type.
fn arrow_col_type(name: &str, dt: &DataType) -> Result<Option<ColType>, Error> {
    Ok(Some(match dt {
        DataType::Null => return Ok(None),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => ColType::String,
        DataType::Dictionary(_, v)
            if matches!(
                **v,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ) =>
        {
            ColType::String
        }
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => ColType::Int64,
        DataType::Float16 | DataType::Float32 | DataType::Float64 => ColType::Double,
        DataType::Boolean => ColType::Bool,
        DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_) => ColType::Bytes,
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 => ColType::Timestamp,
        other => {
            return Err(Error::ColumnType {
                column: name.into(),
                found: other.to_string(),
                expected: "string, integer, float, bool, binary, timestamp or date",
            })
        }
    }))
}

/// `col` cast to `to`; overflow (e.g. uint64 above i64::MAX) is an error, not null.
fn cast_to(name: &str, col: &ArrayRef, to: &DataType) -> Result<ArrayRef, Error> {
    if col.data_type() == to {
        return Ok(col.clone());
    }
    // arrow-cast scales a Date64 to a finer timestamp with an unchecked
    // multiply (9999-12-31 wraps, or panics in a debug build). To
    // milliseconds it only relabels; the checked timestamp cast scales.
    if let (DataType::Date64, DataType::Timestamp(unit, tz)) = (col.data_type(), to) {
        if *unit != TimeUnit::Millisecond {
            let ms = DataType::Timestamp(TimeUnit::Millisecond, tz.clone());
            return cast_to(name, &cast_to(name, col, &ms)?, to);
        }
    }
    let opts = CastOptions {
        safe: false,
        ..Default::default()
    };
    cast_with_options(col, to, &opts).map_err(|e| Error::Ipc(format!("column `{name}`: {e}")))
}

/// Most bytes the dictionary-encoded string and binary columns of one Arrow
/// batch may take once expanded (a dictionary stores each value once, the
/// table once per row).
pub const MAX_EXPANDED_BYTES: usize = 256 << 20;

/// Bytes a dictionary column's values take once expanded, one copy per key
/// (null keys count as some value); 0 for other columns.
fn expanded_bytes(col: &ArrayRef) -> usize {
    let Some(dict) = col.as_any_dictionary_opt() else {
        return 0;
    };
    let values = dict.values();
    let len = |i: usize| match values.data_type() {
        DataType::Utf8 => values.as_string::<i32>().value_length(i) as usize,
        DataType::LargeUtf8 => values.as_string::<i64>().value_length(i) as usize,
        DataType::Binary => values.as_binary::<i32>().value_length(i) as usize,
        DataType::LargeBinary => values.as_binary::<i64>().value_length(i) as usize,
        DataType::Utf8View => values.as_string_view().value(i).len(),
        DataType::BinaryView => values.as_binary_view().value(i).len(),
        _ => 0,
    };
    let lens: Vec<usize> = (0..values.len()).map(len).collect();
    dict.normalized_keys()
        .into_iter()
        .map(|k| lens.get(k).copied().unwrap_or(0))
        .fold(0usize, usize::saturating_add)
}

/// `total` plus what `col` expands to, or the error naming `field` once that
/// passes [`MAX_EXPANDED_BYTES`].
fn expansion(field: &str, col: &ArrayRef, total: usize) -> Result<usize, Error> {
    let bytes = expanded_bytes(col);
    match total.saturating_add(bytes) {
        t if t > MAX_EXPANDED_BYTES => Err(Error::Expands {
            field: field.to_string(),
            bytes,
        }),
        t => Ok(t),
    }
}

fn max_value_len(col: &ArrayRef) -> usize {
    match col.data_type() {
        DataType::Utf8 => col
            .as_string::<i32>()
            .offsets()
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0),
        DataType::Binary => col
            .as_binary::<i32>()
            .offsets()
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0),
        _ => 0,
    }
}

/// Arrow IPC stream → rows of `table` (evolving its schema).
pub fn from_arrow_ipc(
    registry: &Registry,
    table: &TableId,
    ipc: &[u8],
) -> Result<RecordBatch, Error> {
    super::ipc_check::check(ipc)?;
    let reader =
        StreamReader::try_new(Cursor::new(ipc), None).map_err(|e| Error::Ipc(e.to_string()))?;
    let in_schema = reader.schema();
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Ipc(e.to_string()))?;
    let all = concat_batches(&in_schema, &batches).map_err(|e| Error::Ipc(e.to_string()))?;
    if all.num_rows() == 0 {
        return Err(Error::Empty);
    }
    let n = all.num_rows();
    check_cells(n, in_schema.fields().len())?;
    let mut seen = std::collections::HashSet::new();
    let (mut event_id, mut ts, mut version) = (None, None, None);
    let mut fields: Vec<(&str, Option<ColType>, &ArrayRef)> = Vec::new();
    for (f, col) in in_schema.fields().iter().zip(all.columns()) {
        let name = f.name().as_str();
        if !seen.insert(name) {
            return Err(Error::DuplicateColumn(name.into()));
        }
        match name {
            "event_id" => event_id = Some(col),
            "timestamp" => ts = Some(col),
            "version" => version = Some(col),
            _ => {
                check_field_name(name)?;
                fields.push((name, arrow_col_type(name, f.data_type())?, col));
            }
        }
    }
    let event_id = event_id.ok_or(Error::MissingColumn("event_id"))?;
    if arrow_col_type("event_id", event_id.data_type())? != Some(ColType::String) {
        return Err(Error::ColumnType {
            column: "event_id".into(),
            found: event_id.data_type().to_string(),
            expected: "utf8",
        });
    }
    expansion("event_id", event_id, 0)?;
    let event_id = cast_to("event_id", event_id, &DataType::Utf8)?;
    if event_id.null_count() > 0 {
        return Err(Error::Nulls("event_id"));
    }
    let ids = event_id.as_string::<i32>();
    if let Some(index) = ids
        .offsets()
        .windows(2)
        .position(|w| w[1] == w[0] || (w[1] - w[0]) as usize > MAX_EVENT_ID_BYTES)
    {
        return Err(Error::EventId { index });
    }
    let ts = ts.ok_or(Error::MissingColumn("timestamp"))?;
    if !matches!(
        ts.data_type(),
        DataType::Timestamp(_, _) | DataType::Int64 | DataType::Date32 | DataType::Date64
    ) {
        return Err(Error::ColumnType {
            column: "timestamp".into(),
            found: ts.data_type().to_string(),
            expected: "timestamp, date or int64 nanoseconds",
        });
    }
    let ts = cast_to("timestamp", ts, &timestamp_type())?;
    if ts.null_count() > 0 {
        return Err(Error::Nulls("timestamp"));
    }
    let version: ArrayRef = match version {
        None => Arc::new(Int64Array::from(vec![0; n])),
        Some(v) => {
            if arrow_col_type("version", v.data_type())? != Some(ColType::Int64) {
                return Err(Error::ColumnType {
                    column: "version".into(),
                    found: v.data_type().to_string(),
                    expected: "an integer type",
                });
            }
            let v = cast_to("version", v, &DataType::Int64)?;
            if v.null_count() > 0 {
                return Err(Error::Nulls("version"));
            }
            v
        }
    };
    // Cast and check every typed column before the schema may change, so a
    // rejected batch adds no column.
    let mut converted: HashMap<&str, Option<ArrayRef>> = HashMap::new();
    let mut typed: Vec<(&str, ColType)> = Vec::new();
    let mut expanded = 0usize;
    for (name, ty, col) in &fields {
        match ty {
            Some(t) => {
                // Measured before the cast expands it.
                expanded = expansion(name, col, expanded)?;
                let c = cast_to(name, col, &t.arrow())?;
                check_size(name, max_value_len(&c))?;
                typed.push((name, *t));
                converted.insert(name, Some(c));
            }
            None => {
                converted.insert(name, None);
            }
        }
    }
    let schema: SchemaRef = registry.evolve(table, &typed)?;
    let mut indices = vec![0, 1, 2];
    let mut cols = vec![event_id, ts, version];
    for (i, f) in schema.fields().iter().enumerate().skip(3) {
        let Some(col) = converted.remove(f.name().as_str()) else {
            continue;
        };
        indices.push(i);
        cols.push(col.unwrap_or_else(|| new_null_array(f.data_type(), n)));
    }
    let batch_schema = Arc::new(schema.project(&indices).expect("indices are in the schema"));
    RecordBatch::try_new(batch_schema, cols).map_err(|e| Error::Ipc(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `batch` as an Arrow IPC stream.
    fn ipc_stream(batch: &RecordBatch) -> Vec<u8> {
        let mut buf = Vec::new();
        let batches = std::slice::from_ref(batch);
        crate::query::output::arrow_stream(&batch.schema(), batches, &mut buf).unwrap();
        buf
    }
    use crate::proto::storage::Value;
    use arrow::array::AsArray;

    fn registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let wal = crate::wal::Wal::open(dir.path(), 8).unwrap();
        let reg = Registry::open(wal.db().clone()).unwrap();
        (dir, reg)
    }

    fn rec(id: &str, fields: Vec<(&str, Option<Kind>)>) -> DataRecord {
        DataRecord {
            event_id: id.into(),
            timestamp_unix_nano: 1,
            version: 2,
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), Value { kind: v }))
                .collect(),
        }
    }

    #[test]
    fn records_fill_nulls_and_reject_mixed_types() {
        let (_d, reg) = registry();
        let t = TableId::new("t", "e");
        let b = from_records(
            &reg,
            &t,
            &[
                rec("a", vec![("x", Some(Kind::IntValue(1))), ("n", None)]),
                rec("b", vec![("y", Some(Kind::StringValue("s".into())))]),
            ],
        )
        .unwrap();
        let names: Vec<_> = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(names, ["event_id", "timestamp", "version", "x", "y"]);
        assert_eq!(b.column(3).null_count(), 1);
        let err = from_records(
            &reg,
            &t,
            &[
                rec("a", vec![("z", Some(Kind::IntValue(1)))]),
                rec("b", vec![("z", Some(Kind::BoolValue(true)))]),
            ],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `z`: type int64 in an earlier record, bool in record 1"
        );
        for bad in ["Price", "1x", "a-b", "timestamp", "hour", ""] {
            assert!(
                from_records(&reg, &t, &[rec("a", vec![(bad, None)])]).is_err(),
                "{bad}"
            );
        }
        assert!(from_records(&reg, &t, &[rec("", vec![])]).is_err());
    }

    #[test]
    fn sparse_batches_are_bounded_in_cells_and_change_no_schema() {
        let (_d, reg) = registry();
        let t = TableId::new("t", "sparse");
        // One record with 1,000 fields, then 40,000 with none: 40 M cells
        // of nulls from about 300 KB of protobuf.
        let wide = (0..1000)
            .map(|i| (format!("f{i}"), Some(Kind::IntValue(i))))
            .collect::<Vec<_>>();
        let mut records = vec![rec(
            "w",
            wide.iter().map(|(k, v)| (k.as_str(), v.clone())).collect(),
        )];
        records.extend((0..40_000).map(|_| rec("e", vec![])));
        let err = from_records(&reg, &t, &records).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("40001 records x 1003 columns is 40121003 cells"),
            "{err}"
        );
        assert!(reg.get(&t).is_none(), "a refused batch adds no column");
        records.truncate(20_000);
        let b = from_records(&reg, &t, &records).unwrap();
        assert_eq!((b.num_rows(), b.num_columns()), (20_000, 1003));
    }

    /// Many sparse string fields cost their nulls (offsets, validity), not
    /// the value bytes each column's builder reserved up front.
    #[test]
    fn sparse_string_fields_hold_no_unused_capacity() {
        let (_d, reg) = registry();
        let t = TableId::new("t", "sparse_strings");
        let names: Vec<String> = (0..500).map(|i| format!("s{i}")).collect();
        let records: Vec<_> = (0..20_000)
            .map(|i| {
                let value = Some(Kind::StringValue("v".into()));
                rec("e", vec![(names[i % 500].as_str(), value)])
            })
            .collect();
        let b = from_records(&reg, &t, &records).unwrap();
        assert_eq!((b.num_rows(), b.num_columns()), (20_000, 503));
        // 4 bytes of offsets and a bit of validity per cell; the 320 KB of
        // values each builder reserved (160 MB in all) is given back.
        let bytes = crate::memtable::batch_bytes(&b) as usize;
        assert!(bytes < 20_000 * 503 * 5, "{bytes}");
    }

    #[test]
    fn dictionary_columns_are_measured_before_they_expand() {
        use arrow::array::{DictionaryArray, StringArray, TimestampNanosecondArray};
        use arrow::datatypes::Int16Type;
        let (_d, reg) = registry();
        let t = TableId::new("t", "dict");
        let ipc = |keys: usize| {
            let values = StringArray::from(vec!["v".repeat(1 << 20)]);
            let dict =
                DictionaryArray::<Int16Type>::try_new(vec![0i16; keys].into(), Arc::new(values))
                    .unwrap();
            let ids = StringArray::from((0..keys).map(|i| format!("e{i}")).collect::<Vec<_>>());
            let ts = TimestampNanosecondArray::from(vec![1i64; keys]).with_timezone("UTC");
            let batch = RecordBatch::try_from_iter([
                ("event_id", Arc::new(ids) as ArrayRef),
                ("timestamp", Arc::new(ts) as ArrayRef),
                ("note", Arc::new(dict) as ArrayRef),
            ])
            .unwrap();
            ipc_stream(&batch)
        };
        // One 1 MiB value, 300 keys: a 1 MiB body that would expand to 300 MiB.
        let err = from_arrow_ipc(&reg, &t, &ipc(300)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("arrow_ipc_stream: dictionary column `note` expands to {} bytes; at most {MAX_EXPANDED_BYTES} per batch", 300 << 20)
        );
        assert!(reg.get(&t).is_none(), "a refused batch adds no column");
        let b = from_arrow_ipc(&reg, &t, &ipc(10)).unwrap();
        assert_eq!(b.num_rows(), 10);
    }

    #[test]
    fn dates_out_of_the_nanosecond_range_are_refused_like_timestamps() {
        use arrow::array::{Date64Array, StringArray, TimestampMillisecondArray};
        use arrow::datatypes::TimestampNanosecondType;
        let (_d, reg) = registry();
        let t = TableId::new("t", "dates");
        let ipc = |ts: ArrayRef, when: ArrayRef| {
            let batch = RecordBatch::try_from_iter([
                (
                    "event_id",
                    Arc::new(StringArray::from(vec!["e"])) as ArrayRef,
                ),
                ("timestamp", ts),
                ("when", when),
            ])
            .unwrap();
            ipc_stream(&batch)
        };
        let date = |ms: i64| Arc::new(Date64Array::from(vec![ms])) as ArrayRef;
        let millis = |ms: i64| Arc::new(TimestampMillisecondArray::from(vec![ms])) as ArrayRef;
        // In range: a day in milliseconds becomes a day in nanoseconds.
        let b = from_arrow_ipc(&reg, &t, &ipc(date(86_400_000), date(1))).unwrap();
        let ns = |c: &str| {
            b.column_by_name(c)
                .unwrap()
                .as_primitive::<TimestampNanosecondType>()
                .value(0)
        };
        assert_eq!(
            (ns("timestamp"), ns("when")),
            (86_400_000_000_000, 1_000_000)
        );
        // 9999-12-31 is past 2262 in nanoseconds: the same refusal as the
        // same instant in a millisecond timestamp, in either column.
        let last_day = 253_402_214_400_000;
        for (column, as_date, as_millis) in [
            (
                "timestamp",
                ipc(date(last_day), date(1)),
                ipc(millis(last_day), date(1)),
            ),
            (
                "when",
                ipc(date(1), date(last_day)),
                ipc(date(1), millis(last_day)),
            ),
        ] {
            let err = from_arrow_ipc(&reg, &t, &as_date).unwrap_err();
            assert!(matches!(err, Error::Ipc(_)), "{err}");
            assert!(
                err.to_string().contains(&format!("column `{column}`")),
                "{err}"
            );
            assert!(err.to_string().contains("verflow"), "{err}");
            let same = from_arrow_ipc(&reg, &t, &as_millis).unwrap_err();
            assert_eq!(err.to_string(), same.to_string());
        }
    }

    #[test]
    fn same_names_fast_path_still_types_every_value() {
        let (_d, reg) = registry();
        let t = TableId::new("t", "fast");
        let int = |v| Some(Kind::IntValue(v));
        let b = from_records(
            &reg,
            &t,
            &[
                rec("a", vec![("p", None), ("q", int(1))]),
                rec(
                    "b",
                    vec![("p", Some(Kind::StringValue("x".into()))), ("q", int(2))],
                ),
                rec("c", vec![("p", None), ("q", int(3))]),
            ],
        )
        .unwrap();
        let p = b.column_by_name("p").unwrap().as_string::<i32>();
        assert_eq!(p.iter().collect::<Vec<_>>(), vec![None, Some("x"), None]);
        let err = from_records(
            &reg,
            &t,
            &[
                rec("a", vec![("r", None), ("s", int(1))]),
                rec("b", vec![("r", int(5)), ("s", int(1))]),
                rec(
                    "c",
                    vec![("r", Some(Kind::DoubleValue(0.5))), ("s", int(1))],
                ),
            ],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `r`: type int64 in an earlier record, double in record 2"
        );
    }
}
