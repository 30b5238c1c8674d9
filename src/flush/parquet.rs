//! Memtable batches → sorted, hour-partitioned Parquet bytes.
//!
//! Each table has a partition-time column (`start_time` for spans, `timestamp`
//! elsewhere); rows are split by UTC hour, sorted for pruning (spans by
//! `service_name, trace_id, start_time`), and written with ZSTD, page-level
//! statistics and page index, a bloom filter on `trace_id`, and the sort order
//! declared in the footer. CPU-heavy: call from `spawn_blocking`.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{new_null_array, Array, ArrayRef, TimestampNanosecondArray, UInt32Array};
use arrow::compute::{concat_batches, lexsort_to_indices, take_record_batch, SortColumn};
use arrow::datatypes::{Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
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
}

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
    let (schema, batches) = unify(batches)?;
    let all = concat_batches(&schema, &batches)?;
    let tcol = time_column(endpoint);
    let times = all
        .column_by_name(tcol)
        .and_then(|c| c.as_any().downcast_ref::<TimestampNanosecondArray>())
        .ok_or(Error::NoTimeColumn(tcol))?
        .clone();
    let mut groups: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for (i, t) in times.iter().enumerate() {
        groups
            .entry(t.unwrap_or(0).div_euclid(HOUR_NS))
            .or_default()
            .push(i as u32);
    }
    let mut out = Vec::with_capacity(groups.len());
    for (hour_bucket, rows) in groups {
        let part = if rows.len() == all.num_rows() {
            all.clone()
        } else {
            take_record_batch(&all, &UInt32Array::from(rows))?
        };
        out.push(encode_partition(endpoint, hour_bucket, &part, opts)?);
    }
    Ok(out)
}

fn encode_partition(
    endpoint: &str,
    hour_bucket: i64,
    batch: &RecordBatch,
    opts: &EncodeOptions,
) -> Result<Encoded> {
    let sort_names: Vec<&str> = sort_columns(endpoint)
        .iter()
        .copied()
        .filter(|c| batch.schema().index_of(c).is_ok())
        .collect();
    let sorted = sort(batch, &sort_names)?;
    let times = sorted
        .column_by_name(time_column(endpoint))
        .and_then(|c| c.as_any().downcast_ref::<TimestampNanosecondArray>())
        .ok_or(Error::NoTimeColumn(time_column(endpoint)))?;
    let min_time_ns = times.iter().flatten().min().unwrap_or(0);
    let max_time_ns = times.iter().flatten().max().unwrap_or(0);
    let props = writer_properties(&sorted.schema(), &sort_names, sorted.num_rows(), opts)?;
    let mut buf = Vec::with_capacity(sorted.get_array_memory_size() / 4);
    let mut writer = ArrowWriter::try_new(&mut buf, sorted.schema(), Some(props))?;
    writer.write(&sorted)?;
    writer.close()?;
    let dt = chrono::DateTime::from_timestamp(hour_bucket * 3600, 0).unwrap_or_default();
    Ok(Encoded {
        date: dt.format("%Y-%m-%d").to_string(),
        hour: dt.format("%H").to_string().parse().unwrap_or(0),
        rows: sorted.num_rows(),
        min_time_ns,
        max_time_ns,
        service_names: distinct_strings(&sorted, "service_name"),
        bytes: Bytes::from(buf),
    })
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

fn sort(batch: &RecordBatch, names: &[&str]) -> Result<RecordBatch> {
    if names.is_empty() || batch.num_rows() < 2 {
        return Ok(batch.clone());
    }
    let cols: Vec<SortColumn> = names
        .iter()
        .filter_map(|n| batch.column_by_name(n))
        .map(|c| SortColumn {
            values: c.clone(),
            options: None,
        })
        .collect();
    let idx = lexsort_to_indices(&cols, None)?;
    Ok(take_record_batch(batch, &idx)?)
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
}
