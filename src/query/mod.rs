//! Queries: DataFusion over each tenant's Parquet files ∪ live memtables.
//!
//! Every request gets its own `SessionContext` holding only the caller's
//! tenant's tables (and only those its key may read), each a
//! [`table::LakeTable`] built from one catalog snapshot. There is no other
//! catalog, no URL tables, no file table functions: a query cannot name
//! another tenant's data or a local file. SQL is planned with DDL, DML and
//! statements disabled. Limits: one memory pool for all running queries (a
//! query that would fit alone but finds the pool held by others is told to
//! retry, see [`pool`]), a bounded spill directory that sorts, aggregations
//! and repartitions write to when their part of the pool is full, a
//! wall-clock timeout that cancels the plan, and a result row cap.
//!
//! Queries run on their own Tokio runtime so a heavy scan cannot starve the
//! ingest path's tasks.

mod amplify;
pub mod output;
mod pool;
pub mod spans;
pub mod table;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::common::config::SpillCompression;
use datafusion::common::DataFusionError;
use datafusion::common::TableReference;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{DataFrame, SQLOptions, SessionConfig, SessionContext};
use futures::StreamExt;

use crate::auth::Principal;
use crate::config::QueryConfig;
use crate::error::{ApiError, Classify, ErrorKind};
use crate::flush::lake::Lake;
use crate::flush::manifest::FileMeta;
use crate::memtable::schema::{Registry, BUILTIN_TABLES};
use crate::memtable::{Catalog, TableId};
use crate::metrics::METRICS;
use crate::query::table::{LakeTable, TimeRange};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    DataFusion(#[from] DataFusionError),
    #[error("query exceeded the time limit of {0:?} and was cancelled")]
    Timeout(std::time::Duration),
    #[error("result has more than {0} rows; add a LIMIT or narrow the query")]
    TooManyRows(usize),
    #[error("query task failed: {0}")]
    Task(String),
    #[error("the query memory (--query-memory, {0} bytes) is held by other running queries; retry shortly")]
    Busy(usize),
    #[error("the query spilled more than the spill directory may hold (--query-spill-limit, {0} bytes, shared by all running queries)")]
    SpillFull(u64),
    #[error("the query needs more than the query memory (--query-memory, {0} bytes) and spilling is off (--query-spill-limit 0)")]
    NoSpill(usize),
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Timeout(_) => ErrorKind::Timeout,
            Self::Busy(_) => ErrorKind::ResourceExhausted,
            Self::SpillFull(_) | Self::NoSpill(_) => ErrorKind::LimitExceeded,
            Self::TooManyRows(_) => ErrorKind::LimitExceeded,
            Self::Task(_) => ErrorKind::Internal,
            Self::DataFusion(e) => match e.find_root() {
                DataFusionError::ResourcesExhausted(_) => ErrorKind::LimitExceeded,
                DataFusionError::External(e) if e.is::<amplify::TooLarge>() => {
                    ErrorKind::LimitExceeded
                }
                DataFusionError::SQL(..)
                | DataFusionError::Plan(_)
                | DataFusionError::SchemaError(..)
                | DataFusionError::NotImplemented(_)
                | DataFusionError::Configuration(_)
                | DataFusionError::Execution(_)
                | DataFusionError::ArrowError(..) => ErrorKind::InvalidInput,
                _ => ErrorKind::Internal,
            },
        }
    }

    fn client_message(&self) -> String {
        match self.kind() {
            ErrorKind::Internal => "internal error (see server log)".to_string(),
            _ => match self {
                Self::DataFusion(e) => e.find_root().to_string(),
                other => other.to_string(),
            },
        }
    }
}

/// A collected result.
pub struct QueryResult {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// The batches' memory, and the encoded answer's, held in the shared
    /// query pool until the result is dropped, or the answer
    /// ([`QueryResult::answer`]) is.
    memory: MemoryReservation,
    /// The query's pool, to tell "too big" from "crowded out" when the
    /// encoded answer does not fit.
    pool: Option<Arc<pool::QueryPool>>,
}

impl QueryResult {
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }

    /// The answer `write` encodes as `format`, counted in the result's query
    /// memory from its first byte (it fails instead of outgrowing
    /// `--query-memory`) until it has been sent (the batches' part goes now).
    pub fn encode<E: std::fmt::Display>(
        mut self,
        format: &str,
        write: impl FnOnce(&SchemaRef, &[RecordBatch], &mut output::Body<'_>) -> Result<(), E>,
    ) -> Result<bytes::Bytes, ApiError> {
        let mut out = output::Body::new(&mut self.memory);
        let written = write(&self.schema, &self.batches, &mut out);
        if out.exceeded() {
            return Err(self.answer_refused(format));
        }
        written.map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        let (bytes, counted) = out.finish();
        let memory = self.memory;
        memory.resize(counted);
        Ok(bytes::Bytes::from_owner(Answer {
            bytes,
            _memory: memory,
        }))
    }

    /// Why an encoded answer did not fit: other queries held the memory
    /// (retry) or it is too big (don't).
    fn answer_refused(&self, format: &str) -> ApiError {
        if let Some(pool) = self.pool.as_ref().filter(|p| p.crowded_out()) {
            METRICS.queries_busy.inc();
            let limit = match pool.memory_limit() {
                MemoryLimit::Finite(limit) => limit,
                _ => 0,
            };
            return ApiError::from_err(Error::Busy(limit));
        }
        ApiError::new(
            ErrorKind::LimitExceeded,
            format!(
                "the answer encoded as {format} does not fit the query memory (--query-memory); select fewer rows or columns, or ask for application/vnd.apache.arrow.stream (the most compact)"
            ),
        )
    }
}

/// An encoded answer and the query memory counted for it.
struct Answer {
    bytes: Vec<u8>,
    _memory: MemoryReservation,
}

impl AsRef<[u8]> for Answer {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

pub struct QueryEngine {
    catalog: Arc<Catalog>,
    schemas: Arc<Registry>,
    lake: Lake,
    /// Shared object store registry, Parquet metadata cache and memory pool
    /// (`--query-memory` bounds every running query and result together).
    /// Each query runs in a copy whose pool is a [`pool::QueryPool`] view of
    /// the shared one.
    runtime: Arc<RuntimeEnv>,
    /// The runtime's memory pool, which each query's pool draws from.
    memory: Arc<pool::SharedPool>,
    cfg: QueryConfig,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for QueryEngine {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl QueryEngine {
    /// `spill_dir` is emptied (what a killed server left there) and holds
    /// this server's spill files, up to `cfg.spill_limit` bytes (0: queries
    /// do not spill).
    pub fn new(
        catalog: Arc<Catalog>,
        schemas: Arc<Registry>,
        lake: Lake,
        cfg: QueryConfig,
        spill_dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let memory = Arc::new(pool::SharedPool::new(cfg.memory, cfg.spill_limit > 0));
        match std::fs::remove_dir_all(spill_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("cannot empty {}: {e}", spill_dir.display()),
        }
        let disk = if cfg.spill_limit == 0 {
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled)
        } else {
            std::fs::create_dir_all(spill_dir)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", spill_dir.display()))?;
            DiskManagerBuilder::default()
                .with_mode(DiskManagerMode::Directories(vec![spill_dir.to_path_buf()]))
                .with_max_temp_directory_size(cfg.spill_limit)
        };
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(memory.clone())
            .with_disk_manager_builder(disk)
            .build_arc()?;
        let (url, store) = lake.scan_store();
        runtime.register_object_store(url, store.clone());
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("query")
            .enable_all()
            .build()?;
        Ok(Self {
            catalog,
            schemas,
            lake,
            runtime,
            memory,
            cfg,
            rt: Some(rt),
        })
    }

    pub fn config(&self) -> &QueryConfig {
        &self.cfg
    }

    /// Table names the principal may read, sorted.
    pub fn tables_for(&self, p: &Principal) -> Vec<String> {
        let mut names: BTreeSet<String> = BUILTIN_TABLES.map(String::from).into();
        names.extend(
            self.schemas
                .record_tables_of(&p.tenant)
                .into_iter()
                .chain(self.catalog.tables_of(&p.tenant))
                .map(|t| t.endpoint.to_string()),
        );
        names
            .into_iter()
            .filter(|n| p.endpoints.as_ref().is_none_or(|l| l.contains(n)))
            .collect()
    }

    /// A session over the principal's tables at this instant, drawing on
    /// `pool` for memory, and the files its snapshots list: held until the
    /// query ends, they keep compaction from deleting files it reads
    /// ([`crate::flush::Flusher::reap`]).
    fn context(
        &self,
        p: &Principal,
        range: TimeRange,
        pool: Arc<pool::QueryPool>,
    ) -> Result<(SessionContext, Vec<Arc<FileMeta>>), Error> {
        let mut config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("lakewriter", "public");
        config
            .options_mut()
            .execution
            .parquet
            .schema_force_view_types = false;
        // Spill files are written and read back once: LZ4 halves the disk
        // traffic the WAL's fsyncs share, for little CPU.
        config.options_mut().execution.spill_compression = SpillCompression::Lz4Frame;
        let runtime = Arc::new(RuntimeEnv {
            memory_pool: pool,
            disk_manager: self.runtime.disk_manager.clone(),
            cache_manager: self.runtime.cache_manager.clone(),
            object_store_registry: self.runtime.object_store_registry.clone(),
        });
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        amplify::register(&ctx, self.cfg.memory);
        let mut pins = Vec::new();
        for name in self.tables_for(p) {
            let table = TableId::new(&p.tenant, &name);
            let Some(schema) = self.schemas.get(&table) else {
                continue;
            };
            let snapshot = self.catalog.snapshot(&table);
            pins.extend(snapshot.files.iter().cloned());
            let provider = LakeTable::new(schema, snapshot, &self.lake, range)?;
            ctx.register_table(TableReference::bare(name), Arc::new(provider))?;
        }
        Ok((ctx, pins))
    }

    /// Runs `build` (which plans on the context) and collects at most
    /// `max_rows` rows, on the query runtime, within the time limit.
    pub async fn run<F, Fut>(
        &self,
        p: &Principal,
        range: TimeRange,
        max_rows: usize,
        build: F,
    ) -> Result<QueryResult, ApiError>
    where
        F: FnOnce(SessionContext) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<DataFrame, DataFusionError>> + Send,
    {
        let started = Instant::now();
        let _running = Running::start();
        let pool = Arc::new(pool::QueryPool::new(self.memory.clone()));
        let (ctx, pins) = self
            .context(p, range, pool.clone())
            .map_err(ApiError::from_err)?;
        let timeout = self.cfg.timeout;
        let task = self
            .rt
            .as_ref()
            .expect("query runtime lives as long as the engine")
            .spawn(async move {
                let _pins = pins;
                let pool = ctx.runtime_env().memory_pool.clone();
                let df = build(ctx).await?;
                collect_limited(df, max_rows, &pool).await
            });
        // Cancelled with this future too (a client that went away): the
        // query would otherwise run on, unbounded by the timeout, holding
        // memory and its snapshot's files.
        let abort = AbortOnDrop(task.abort_handle());
        let result = match tokio::time::timeout(timeout, task).await {
            Ok(Ok(r)) => r.map(|r| QueryResult {
                pool: Some(pool.clone()),
                ..r
            }),
            Ok(Err(join)) => Err(Error::Task(join.to_string())),
            Err(_) => Err(Error::Timeout(timeout)),
        };
        drop(abort);
        if result.is_err() {
            // The plan's other tasks give their memory back as they wind
            // down: answer once they have (up to a second), so the caller's
            // next query does not find this one still holding the pool.
            for _ in 0..200 {
                if pool.own() == 0 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        let result = result.map_err(|e| match e {
            Error::DataFusion(ref d)
                if matches!(d.find_root(), DataFusionError::ResourcesExhausted(_))
                    && pool.crowded_out() =>
            {
                METRICS.queries_busy.inc();
                Error::Busy(self.cfg.memory)
            }
            Error::DataFusion(ref d) if spill_full(d) => Error::SpillFull(self.cfg.spill_limit),
            // An operator that would have spilled says "DiskManager is
            // disabled", which names no setting.
            Error::DataFusion(ref d)
                if self.cfg.spill_limit == 0
                    && d.find_root()
                        .to_string()
                        .contains("DiskManager is disabled") =>
            {
                Error::NoSpill(self.cfg.memory)
            }
            e => e,
        });

        METRICS.query_latency.observe_duration(started.elapsed());
        match result {
            Ok(r) => {
                METRICS.queries.inc();
                Ok(r)
            }
            Err(e) => {
                METRICS.query_errors.inc();
                Err(ApiError::from_err(e))
            }
        }
    }

    /// Plans and runs read-only SQL for the principal.
    pub async fn sql(&self, p: &Principal, sql: String) -> Result<QueryResult, ApiError> {
        p.require("read")?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let max_rows = self.cfg.max_rows;
        self.run(p, TimeRange::default(), max_rows, move |ctx| async move {
            ctx.sql_with_options(&sql, options).await
        })
        .await
    }
}

/// Counts a query in `lakewriter_queries_running` until dropped.
struct Running;

impl Running {
    fn start() -> Self {
        METRICS.queries_running.add(1);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        METRICS.queries_running.add(-1);
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Collects at most `max_rows` rows, whose memory counts against `pool`:
/// DataFusion accounts for what its operators buffer, not for the batches a
/// plan hands out, and a short result can be large (`repeat(…)`).
async fn collect_limited(
    df: DataFrame,
    max_rows: usize,
    pool: &Arc<dyn MemoryPool>,
) -> Result<QueryResult, Error> {
    let schema = Arc::new(df.schema().as_arrow().clone());
    let memory = MemoryConsumer::new("query result").register(pool);
    let task = Arc::new(df.task_ctx());
    let plan = df.create_physical_plan().await?;
    let mut stream = datafusion::physical_plan::execute_stream(plan.clone(), task)?;
    let mut batches = Vec::new();
    let mut rows = 0;
    let collected = async {
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            rows += batch.num_rows();
            if rows > max_rows {
                return Err(Error::TooManyRows(max_rows));
            }
            if batch.num_rows() > 0 {
                memory.try_grow(batch.get_array_memory_size())?;
                batches.push(batch);
            }
        }
        Ok(())
    }
    .await;
    drop(stream);
    let (spills, spilled) = spilled(plan.as_ref());
    METRICS.query_spills.add(spills as u64);
    METRICS.query_spilled_bytes.add(spilled as u64);
    collected?;
    Ok(QueryResult {
        schema,
        batches,
        memory,
        pool: None,
    })
}

/// Spill files and their bytes written by `plan`'s operators so far.
fn spilled(plan: &dyn ExecutionPlan) -> (usize, usize) {
    let own = plan.metrics().map_or((0, 0), |m| {
        (m.spill_count().unwrap_or(0), m.spilled_bytes().unwrap_or(0))
    });
    plan.children().into_iter().fold(own, |(n, b), child| {
        let (cn, cb) = spilled(child.as_ref());
        (n + cn, b + cb)
    })
}

/// Whether DataFusion failed because the spill files would have grown past
/// `--query-spill-limit` (it says so only in an I/O error's words).
fn spill_full(e: &DataFusionError) -> bool {
    e.find_root()
        .to_string()
        .contains("exceeded the allowable limit")
}
