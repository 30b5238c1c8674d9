//! Memtable batches → sorted, hour-partitioned Parquet bytes.
//!
//! Each table has a partition-time column (`start_time` for spans, `timestamp`
//! elsewhere); rows are split by UTC hour, sorted for pruning (spans by
//! `service_name, trace_id, start_time`), and written with ZSTD, page-level
//! statistics and page index, a bloom filter on `trace_id`, and the sort order
//! declared in the footer. CPU-heavy: the flusher runs it on its own threads
//! ([`super::threads`]), never on the async runtime.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{new_null_array, Array, ArrayRef, TimestampNanosecondArray};
use arrow::compute::{interleave_record_batch, SortOptions};
use arrow::datatypes::{Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("table has no partition-time column {0:?} of type Timestamp(ns)")]
    NoTimeColumn(&'static str),
    #[error("the flush encode threads stopped")]
    Stopped,
    #[error("encoding panicked: {0}")]
    Panicked(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

const HOUR_NS: i64 = 3_600_000_000_000;

/// The column whose UTC hour picks a row's `date=`/`hour=` partition.
pub fn time_column(endpoint: &str) -> &'static str {
    match endpoint {
        "spans" => "start_time",
        _ => "timestamp",
    }
}

/// The order rows are written in.
pub fn sort_columns(endpoint: &str) -> &'static [&'static str] {
    match endpoint {
        "spans" => &["service_name", "trace_id", "start_time"],
        "state_patches" => &["trace_id", "timestamp"],
        "logs" => &["service_name", "timestamp"],
        e if e.starts_with("metrics_") && crate::memtable::schema::builtin(e).is_some() => {
            &["service_name", "metric_name", "timestamp"]
        }
        _ => &["timestamp"],
    }
}

/// One output file.
pub struct Encoded {
    pub date: String,
    pub hour: u8,
    pub rows: usize,
    pub min_time_ns: i64,
    pub max_time_ns: i64,
    /// Distinct `service_name` values, sorted (empty for tables without one).
    pub service_names: Vec<String>,
    pub bytes: Bytes,
    /// The rows' size decoded (the row groups' uncompressed bytes).
    pub decoded_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct EncodeOptions {
    pub row_group_rows: usize,
    pub zstd_level: i32,
}

/// Brings batches of evolving schemas to their merged schema (missing columns
/// become nulls; column order is the merged order).
pub fn unify(batches: &[RecordBatch]) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let first = match batches.first() {
        Some(b) => b.schema(),
        None => return Ok((Arc::new(Schema::empty()), vec![])),
    };
    if batches.iter().all(|b| b.schema() == first) {
        return Ok((first, batches.to_vec()));
    }
    let merged = Arc::new(Schema::try_merge(
        batches.iter().map(|b| b.schema().as_ref().clone()),
    )?);
    let aligned = batches
        .iter()
        .map(|b| align(b, &merged))
        .collect::<Result<_>>()?;
    Ok((merged, aligned))
}

/// `batch` in `schema`: columns matched by name, missing ones null.
pub fn align(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) => c.clone(),
            None => new_null_array(f.data_type(), batch.num_rows()),
        })
        .collect();
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// Encodes the rows of one table into one Parquet file per UTC hour.
pub fn encode(
    endpoint: &str,
    batches: &[RecordBatch],
    opts: &EncodeOptions,
) -> Result<Vec<Encoded>> {
    let mut encoder = Encoder::new(endpoint, batches, opts.clone())?;
    while !encoder.step()? {}
    Ok(encoder.finish())
}

/// [`encode`] in bounded steps: each [`Encoder::step`] sorts one hour's rows or
/// encodes one row group, so the caller can stop between steps (the flusher
/// cancels a background encode that has to hurry and redoes it at normal
/// priority).
///
/// Memory stays near one row group: rows are never concatenated or sorted as a
/// whole table. Each hour's rows are ordered by index (one byte comparison on
/// the arrow row format of the sort columns), then gathered from the memtable
/// batches a row group at a time. Rows that arrive already in order
/// (DataRecords and logs usually do) are written straight from the batches.
pub struct Encoder {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    times: Vec<TimestampNanosecondArray>,
    total: usize,
    sort_names: Vec<&'static str>,
    keys: Option<SortKeys>,
    opts: EncodeOptions,
    hours: std::collections::btree_map::IntoIter<i64, Vec<(usize, usize)>>,
    current: Option<Part>,
    done: Vec<Encoded>,
}

impl Encoder {
    pub fn new(endpoint: &str, batches: &[RecordBatch], opts: EncodeOptions) -> Result<Self> {
        let (schema, batches) = unify(batches)?;
        let tcol = time_column(endpoint);
        let times: Vec<TimestampNanosecondArray> = batches
            .iter()
            .map(|b| {
                b.column_by_name(tcol)
                    .and_then(|c| c.as_any().downcast_ref::<TimestampNanosecondArray>())
                    .cloned()
                    .ok_or(Error::NoTimeColumn(tcol))
            })
            .collect::<Result<_>>()?;
        let mut hours: BTreeMap<i64, Vec<(usize, usize)>> = BTreeMap::new();
        for (b, t) in times.iter().enumerate() {
            for (r, v) in t.iter().enumerate() {
                let hour = v.unwrap_or(0).div_euclid(HOUR_NS);
                hours.entry(hour).or_default().push((b, r));
            }
        }
        let sort_names: Vec<&'static str> = sort_columns(endpoint)
            .iter()
            .copied()
            .filter(|c| schema.index_of(c).is_ok())
            .collect();
        let keys = SortKeys::new(&batches, &sort_names)?;
        Ok(Self {
            total: batches.iter().map(|b| b.num_rows()).sum(),
            schema,
            batches,
            times,
            sort_names,
            keys,
            opts,
            hours: hours.into_iter(),
            current: None,
            done: Vec::new(),
        })
    }

    /// Does one bounded piece of work; true once every file is encoded.
    pub fn step(&mut self) -> Result<bool> {
        if let Some(part) = &mut self.current {
            if part.advance(&self.batches, self.opts.row_group_rows)? {
                let part = self.current.take().expect("current part");
                self.done.push(part.finish()?);
            }
            return Ok(false);
        }
        let Some((hour_bucket, mut rows)) = self.hours.next() else {
            return Ok(true);
        };
        let in_order = self.keys.as_ref().is_none_or(|k| k.order(&mut rows));
        // Every row in memtable order: write the batches as they are.
        let order = if in_order && rows.len() == self.total {
            Order::Batches { next: 0 }
        } else {
            Order::Rows { rows, next: 0 }
        };
        let (min_time_ns, max_time_ns) = order.time_range(&self.times);
        let props = writer_properties(
            &self.schema,
            &self.sort_names,
            order.len(&self.batches),
            &self.opts,
        )?;
        self.current = Some(Part {
            hour_bucket,
            rows: order.len(&self.batches),
            order,
            min_time_ns,
            max_time_ns,
            writer: ArrowWriter::try_new(Vec::new(), self.schema.clone(), Some(props))?,
            services: Default::default(),
        });
        Ok(false)
    }

    /// The encoded files (call once [`Encoder::step`] returned true).
    pub fn finish(self) -> Vec<Encoded> {
        self.done
    }
}

/// The sort columns of every batch in the arrow row format, so one byte
/// comparison orders two rows by all sort columns at once.
struct SortKeys {
    rows: arrow::row::Rows,
    /// Index of each batch's first row in `rows`.
    starts: Vec<usize>,
}

impl SortKeys {
    fn new(batches: &[RecordBatch], names: &[&str]) -> Result<Option<Self>> {
        let Some(first) = batches.first() else {
            return Ok(None);
        };
        if names.is_empty() {
            return Ok(None);
        }
        let options = SortOptions {
            descending: false,
            nulls_first: false,
        };
        let fields = names
            .iter()
            .map(|n| {
                let dt = first.schema().field_with_name(n)?.data_type().clone();
                Ok(SortField::new_with_options(dt, options))
            })
            .collect::<Result<Vec<_>, ArrowError>>()?;
        let converter = RowConverter::new(fields)?;
        let mut rows = converter.empty_rows(0, 0);
        let mut starts = Vec::with_capacity(batches.len());
        for b in batches {
            starts.push(rows.num_rows());
            let cols = names
                .iter()
                .map(|n| {
                    b.column_by_name(n)
                        .cloned()
                        .ok_or_else(|| ArrowError::SchemaError(format!("sort column {n} missing")))
                })
                .collect::<Result<Vec<ArrayRef>, ArrowError>>()?;
            converter.append(&mut rows, &cols)?;
        }
        Ok(Some(Self { rows, starts }))
    }

    fn key(&self, (b, r): (usize, usize)) -> arrow::row::Row<'_> {
        self.rows.row(self.starts[b] + r)
    }

    /// Sorts `rows` by key (stably: equal keys keep arrival order); returns
    /// whether they were in order already.
    fn order(&self, rows: &mut [(usize, usize)]) -> bool {
        if rows.windows(2).all(|w| self.key(w[0]) <= self.key(w[1])) {
            return true;
        }
        rows.sort_by(|a, b| self.key(*a).cmp(&self.key(*b)));
        false
    }
}

/// The order one file's rows are written in.
enum Order {
    /// Every batch, as it is.
    Batches { next: usize },
    /// These (batch, row) pairs, gathered a row group at a time.
    Rows {
        rows: Vec<(usize, usize)>,
        next: usize,
    },
}

impl Order {
    fn len(&self, batches: &[RecordBatch]) -> usize {
        match self {
            Self::Batches { .. } => batches.iter().map(|b| b.num_rows()).sum(),
            Self::Rows { rows, .. } => rows.len(),
        }
    }

    fn time_range(&self, times: &[TimestampNanosecondArray]) -> (i64, i64) {
        let (mut lo, mut hi) = (i64::MAX, i64::MIN);
        let mut note = |v: i64| {
            lo = lo.min(v);
            hi = hi.max(v);
        };
        match self {
            Self::Batches { .. } => times.iter().flatten().flatten().for_each(&mut note),
            Self::Rows { rows, .. } => rows
                .iter()
                .filter(|&&(b, r)| times[b].is_valid(r))
                .for_each(|&(b, r)| note(times[b].value(r))),
        }
        if lo > hi {
            (0, 0)
        } else {
            (lo, hi)
        }
    }
}

/// One output file in progress: the rows of one UTC hour.
struct Part {
    hour_bucket: i64,
    order: Order,
    rows: usize,
    min_time_ns: i64,
    max_time_ns: i64,
    writer: ArrowWriter<Vec<u8>>,
    services: std::collections::BTreeSet<String>,
}

impl Part {
    /// Writes about one row group; true when every row is written.
    fn advance(&mut self, batches: &[RecordBatch], row_group_rows: usize) -> Result<bool> {
        let mut written = 0;
        while written < row_group_rows {
            let chunk = match &mut self.order {
                Order::Batches { next } => {
                    let Some(b) = batches.get(*next) else {
                        return Ok(true);
                    };
                    *next += 1;
                    b.clone()
                }
                Order::Rows { rows, next } => {
                    if *next == rows.len() {
                        return Ok(true);
                    }
                    let end = (*next + row_group_rows - written).min(rows.len());
                    let refs: Vec<&RecordBatch> = batches.iter().collect();
                    let chunk = interleave_record_batch(&refs, &rows[*next..end])?;
                    *next = end;
                    chunk
                }
            };
            written += chunk.num_rows();
            self.services
                .extend(distinct_strings(&chunk, "service_name"));
            self.writer.write(&chunk)?;
        }
        let done = match &self.order {
            Order::Batches { next } => *next == batches.len(),
            Order::Rows { rows, next } => *next == rows.len(),
        };
        Ok(done)
    }

    fn finish(mut self) -> Result<Encoded> {
        self.writer.flush()?;
        let decoded_bytes = decoded_size(self.writer.flushed_row_groups());
        let bytes = self.writer.into_inner()?;
        let dt = chrono::DateTime::from_timestamp(self.hour_bucket * 3600, 0).unwrap_or_default();
        Ok(Encoded {
            date: dt.format("%Y-%m-%d").to_string(),
            hour: dt.format("%H").to_string().parse().unwrap_or(0),
            rows: self.rows,
            min_time_ns: self.min_time_ns,
            max_time_ns: self.max_time_ns,
            service_names: self.services.into_iter().collect(),
            bytes: Bytes::from(bytes),
            decoded_bytes,
        })
    }
}

/// The uncompressed size of a file's row groups (what its rows take decoded).
pub fn decoded_size(row_groups: &[parquet::file::metadata::RowGroupMetaData]) -> u64 {
    row_groups
        .iter()
        .map(|rg| rg.total_byte_size().max(0) as u64)
        .sum()
}

/// Sorted distinct values of a string column (empty when there is none).
pub fn distinct_strings(batch: &RecordBatch, name: &str) -> Vec<String> {
    let Some(col) = batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<arrow::array::StringArray>())
    else {
        return Vec::new();
    };
    let mut out = std::collections::BTreeSet::new();
    let mut prev: Option<&str> = None;
    for v in col.iter().flatten() {
        // Rows are mostly grouped by value: skip the set for repeats.
        if prev != Some(v) {
            out.insert(v);
            prev = Some(v);
        }
    }
    out.into_iter().map(String::from).collect()
}

fn writer_properties(
    schema: &Schema,
    sort_names: &[&str],
    rows: usize,
    opts: &EncodeOptions,
) -> Result<WriterProperties> {
    let sorting: Vec<SortingColumn> = sort_names
        .iter()
        .filter_map(|n| schema.index_of(n).ok())
        .map(|i| SortingColumn {
            column_idx: i as i32,
            descending: false,
            nulls_first: false,
        })
        .collect();
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(opts.zstd_level)?))
        .set_max_row_group_row_count(Some(opts.row_group_rows))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_sorting_columns(Some(sorting))
        .set_created_by(format!("lakewriter {}", env!("CARGO_PKG_VERSION")));
    if schema.index_of("trace_id").is_ok() {
        let col = ColumnPath::from("trace_id");
        let ndv = rows.clamp(1, opts.row_group_rows) as u64;
        b = b
            .set_column_bloom_filter_enabled(col.clone(), true)
            .set_column_bloom_filter_fpp(col.clone(), 0.01)
            .set_column_bloom_filter_max_ndv(col, ndv);
    }
    Ok(b.build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, TimeUnit};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn ts_field() -> Field {
        Field::new(
            "timestamp",
            DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
            false,
        )
    }

    #[test]
    fn splits_by_hour_sorts_and_unifies_schemas() {
        let s1 = Arc::new(Schema::new(vec![
            ts_field(),
            Field::new("a", DataType::Int64, true),
        ]));
        let s2 = Arc::new(Schema::new(vec![
            ts_field(),
            Field::new("b", DataType::Utf8, true),
        ]));
        let t = |v: Vec<i64>| {
            Arc::new(TimestampNanosecondArray::from(v).with_timezone("UTC")) as ArrayRef
        };
        let b1 = RecordBatch::try_new(
            s1,
            vec![
                t(vec![HOUR_NS + 5, 3]),
                Arc::new(Int64Array::from(vec![1, 2])),
            ],
        )
        .unwrap();
        let b2 = RecordBatch::try_new(
            s2,
            vec![t(vec![HOUR_NS + 1]), Arc::new(StringArray::from(vec!["x"]))],
        )
        .unwrap();
        let opts = EncodeOptions {
            row_group_rows: 1024,
            zstd_level: 1,
        };
        let files = encode("things", &[b1, b2], &opts).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(
            (files[0].date.as_str(), files[0].hour, files[0].rows),
            ("1970-01-01", 0, 1)
        );
        assert_eq!((files[1].hour, files[1].rows), (1, 2));
        assert_eq!(
            (files[1].min_time_ns, files[1].max_time_ns),
            (HOUR_NS + 1, HOUR_NS + 5)
        );
        let reader = ParquetRecordBatchReaderBuilder::try_new(files[1].bytes.clone())
            .unwrap()
            .build()
            .unwrap();
        let back: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        let back = &back[0];
        assert_eq!(back.num_columns(), 3);
        let ts = back
            .column(0)
            .as_any()
            .downcast_ref::<TimestampNanosecondArray>()
            .unwrap();
        assert_eq!(ts.values().to_vec(), vec![HOUR_NS + 1, HOUR_NS + 5]); // sorted
        let a = back.column_by_name("a").unwrap();
        assert!(a.is_null(0)); // row from b2 had no `a`
    }

    /// Reads a file's rows back as (service, trace, time, row group count).
    fn read_back(bytes: Bytes) -> (Vec<(String, String, i64)>, usize) {
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
        let groups = builder.metadata().num_row_groups();
        let mut out = Vec::new();
        for b in builder.build().unwrap() {
            let b = b.unwrap();
            let s = |n: &str| {
                b.column_by_name(n)
                    .unwrap()
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap()
                    .clone()
            };
            let (svc, tid) = (s("service_name"), s("trace_id"));
            let t = b
                .column_by_name("start_time")
                .unwrap()
                .as_any()
                .downcast_ref::<TimestampNanosecondArray>()
                .unwrap()
                .clone();
            for i in 0..b.num_rows() {
                out.push((svc.value(i).into(), tid.value(i).into(), t.value(i)));
            }
        }
        (out, groups)
    }

    #[test]
    fn sorts_across_batches_in_row_groups_and_keeps_ordered_input_as_is() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("service_name", DataType::Utf8, false),
            Field::new("trace_id", DataType::Utf8, false),
            Field::new(
                "start_time",
                DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
                false,
            ),
        ]));
        // 3 batches × 700 rows, services and traces interleaved across them.
        let mut input = Vec::new();
        let batches: Vec<RecordBatch> = (0..3)
            .map(|b| {
                let rows: Vec<(String, String, i64)> = (0..700)
                    .map(|i| {
                        let n = (b * 700 + i) as i64;
                        let svc = format!("svc-{}", (n * 7) % 3);
                        (svc, format!("{:032x}", (n * 31) % 50), n)
                    })
                    .collect();
                input.extend(rows.clone());
                RecordBatch::try_new(
                    schema.clone(),
                    vec![
                        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.0))),
                        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.1))),
                        Arc::new(
                            TimestampNanosecondArray::from_iter_values(rows.iter().map(|r| r.2))
                                .with_timezone("UTC"),
                        ),
                    ],
                )
                .unwrap()
            })
            .collect();
        let opts = EncodeOptions {
            row_group_rows: 1024,
            zstd_level: 1,
        };
        let files = encode("spans", &batches, &opts).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].service_names, vec!["svc-0", "svc-1", "svc-2"]);
        assert_eq!((files[0].min_time_ns, files[0].max_time_ns), (0, 2099));
        let (rows, groups) = read_back(files[0].bytes.clone());
        assert_eq!(groups, 3); // 1024 + 1024 + 52
                               // A stable sort: equal (service, trace) keep ascending start times.
        let mut expected = input.clone();
        expected.sort();
        assert_eq!(rows, expected);

        // Rows already in order are written as they came, batch by batch.
        let sorted = encode("spans", &[read_back_batch(&files[0].bytes)], &opts).unwrap();
        assert_eq!(read_back(sorted[0].bytes.clone()).0, expected);
    }

    fn read_back_batch(bytes: &Bytes) -> RecordBatch {
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
    }
}
