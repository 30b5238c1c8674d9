//! [`LakeTable`]: one table as DataFusion sees it — the published Parquet files
//! of a [`TableSnapshot`] ∪ its memtable batches.
//!
//! The file list comes from the manifest snapshot taken under the catalog lock
//! together with the memtable batches, never from a directory listing: a flush
//! swaps a frozen memtable for its files atomically, so a row is read from one
//! side or the other, never from both and never from neither.
//!
//! Files are scanned by DataFusion's Parquet reader (statistics, page index and
//! `trace_id` bloom filter pruning, filter pushdown); files written before a
//! column existed read it as null through the table schema.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::{RecordBatch, RecordBatchOptions};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DataFusionError, Result};
use datafusion::config::TableParquetOptions;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::ExecutionPlan;

use crate::flush::lake::Lake;
use crate::flush::parquet::align;
use crate::memtable::TableSnapshot;

/// Half-open time range `[start, end)` in ns, for pruning files by the manifest.
#[derive(Debug, Clone, Copy, Default)]
pub struct TimeRange {
    pub start: Option<i64>,
    pub end: Option<i64>,
}

impl TimeRange {
    fn overlaps(&self, min: i64, max: i64) -> bool {
        self.start.is_none_or(|s| max >= s) && self.end.is_none_or(|e| min < e)
    }
}

#[derive(Debug)]
pub struct LakeTable {
    schema: SchemaRef,
    files: Option<ListingTable>,
    /// Memtable batches as written (each in the schema of its time): put
    /// in the table's schema by [`TableProvider::scan`], for the columns
    /// a query reads, so a query pays only for the tables and columns it
    /// uses (a sparse wide DataRecord table has thousands of batches, each
    /// lacking most columns).
    batches: Vec<RecordBatch>,
}

impl LakeTable {
    /// Files are read from `lake`; `range` drops files whose manifest time
    /// range cannot match.
    pub fn new(
        schema: SchemaRef,
        snapshot: TableSnapshot,
        lake: &Lake,
        range: TimeRange,
    ) -> Result<Self> {
        let urls = snapshot
            .files
            .iter()
            .filter(|f| range.overlaps(f.min_time_ns, f.max_time_ns))
            .map(|f| ListingTableUrl::parse(lake.scan_url(&f.path)))
            .collect::<Result<Vec<_>>>()?;
        let files = if urls.is_empty() {
            None
        } else {
            let options = ListingOptions::new(Arc::new(
                ParquetFormat::default().with_options(parquet_options()),
            ))
            .with_file_extension(".parquet");
            let config = ListingTableConfig::new_with_multi_paths(urls)
                .with_listing_options(options)
                .with_schema(schema.clone());
            Some(ListingTable::try_new(config)?)
        };
        let mut batches = snapshot.batches;
        batches.retain(|b| b.num_rows() > 0);
        Ok(Self {
            schema,
            files,
            batches,
        })
    }

    /// The memtable rows as a table of `projection`'s columns (all when
    /// None), or None when there are none.
    fn memtable(&self, projection: Option<&Vec<usize>>) -> Result<Option<MemTable>> {
        if self.batches.is_empty() {
            return Ok(None);
        }
        let schema = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => self.schema.clone(),
        };
        let batches = self
            .batches
            .iter()
            .map(|b| conform(b, &schema))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(MemTable::try_new(schema, vec![batches])?))
    }
}

/// Reader options: filters evaluated while decoding (late materialization),
/// strings as plain Utf8 like the table schemas.
fn parquet_options() -> TableParquetOptions {
    let mut o = TableParquetOptions::default();
    o.global.pushdown_filters = true;
    o.global.reorder_filters = true;
    o.global.schema_force_view_types = false;
    o.global.bloom_filter_on_read = true;
    o.global.enable_page_index = true;
    o
}

/// A memtable batch in `schema` (the table's current one, or the columns of
/// it a query reads): columns matched by name, columns added since the
/// batch was written are null.
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    if schema.fields().is_empty() {
        // No column read (`count(*)`): the rows alone.
        let rows = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
        return Ok(RecordBatch::try_new_with_options(
            schema.clone(),
            vec![],
            &rows,
        )?);
    }
    align(batch, schema).map_err(|e| DataFusionError::External(Box::new(e)))
}

#[async_trait]
impl TableProvider for LakeTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut plans = Vec::with_capacity(2);
        if let Some(files) = &self.files {
            plans.push(files.scan(state, projection, filters, limit).await?);
        }
        if let Some(mem) = self.memtable(projection)? {
            // Already projected.
            plans.push(mem.scan(state, None, filters, limit).await?);
        }
        if plans.is_empty() {
            let schema = match projection {
                Some(p) => Arc::new(self.schema.project(p)?),
                None => self.schema.clone(),
            };
            return Ok(Arc::new(EmptyExec::new(schema)));
        }
        UnionExec::try_new(plans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::prelude::SessionContext;

    /// Memtable batches written before and after a column was added read
    /// through the table's schema, whatever the query projects (`count(*)`
    /// reads no column at all).
    #[tokio::test]
    async fn memtable_batches_of_older_schemas_are_padded_per_projection() {
        let old = RecordBatch::try_from_iter([("a", Arc::new(Int64Array::from(vec![1, 2])) as _)])
            .unwrap();
        let new = RecordBatch::try_from_iter([
            ("a", Arc::new(Int64Array::from(vec![3])) as _),
            ("b", Arc::new(StringArray::from(vec!["x"])) as _),
        ])
        .unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Utf8, true),
        ]));
        let snapshot = TableSnapshot {
            files: vec![],
            batches: vec![old, new],
        };
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(&format!("file://{}", dir.path().display())).unwrap();
        let table = LakeTable::new(schema, snapshot, &lake, TimeRange::default()).unwrap();
        let ctx = SessionContext::new();
        ctx.register_table("t", Arc::new(table)).unwrap();
        let rows = |sql: &'static str| {
            let ctx = ctx.clone();
            async move {
                let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
                arrow::util::pretty::pretty_format_batches(&batches)
                    .unwrap()
                    .to_string()
            }
        };
        assert!(rows("SELECT count(*) AS n FROM t").await.contains("| 3 |"));
        let out = rows("SELECT b, a FROM t ORDER BY a").await;
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(lines, ["| b | a |", "|   | 1 |", "|   | 2 |", "| x | 3 |"]);
        let out = rows("SELECT sum(a) AS s FROM t WHERE b IS NULL").await;
        assert!(out.contains("| 3 |"), "{out}");
        // A subset of a batch's columns, and a limit.
        let out = rows("SELECT a FROM t WHERE a >= 2 ORDER BY a LIMIT 1").await;
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(lines, ["| a |", "| 2 |"]);
        let out = rows("SELECT count(*) AS n FROM t WHERE a > 1").await;
        assert!(out.contains("| 2 |"), "{out}");
    }
}
