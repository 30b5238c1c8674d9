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
use arrow::record_batch::RecordBatch;
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
    mem: Option<MemTable>,
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
        let batches = snapshot
            .batches
            .iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| conform(b, &schema))
            .collect::<Result<Vec<_>>>()?;
        let mem = if batches.is_empty() {
            None
        } else {
            Some(MemTable::try_new(schema.clone(), vec![batches])?)
        };
        Ok(Self { schema, files, mem })
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

/// A memtable batch in the table's current schema: columns matched by name,
/// columns added since the batch was written are null.
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
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
        if let Some(mem) = &self.mem {
            plans.push(mem.scan(state, projection, filters, limit).await?);
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
