//! Memtables: the rows accepted since the last flush, per (tenant, endpoint).
//!
//! A memtable is a list of Arrow record batches, one per accepted request (the
//! request's rows, converted on the request's own task before the WAL append).
//! The WAL writer thread inserts them in WAL key order, so any freeze takes a
//! *prefix* of the WAL for that table: everything up to its `max_seq` is in it.
//! That is what makes the per-table flush watermark sound.
//!
//! [`Catalog`] holds, per table, the active memtable, the frozen memtables being
//! flushed, and the published Parquet files. [`Catalog::publish`] swaps a frozen
//! memtable for its files under one lock, so a query snapshot
//! ([`Catalog::snapshot`]) sees every row exactly once.
//!
//! Memory: every batch's Arrow memory ([`batch_bytes`]) counts against
//! `memtable_budget`. Above half of it the flusher flushes the largest tables;
//! above all of it [`Catalog::admit`] rejects writes with a retryable
//! RESOURCE_EXHAUSTED.

pub mod schema;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, ArrayData};
use arrow::buffer::NullBuffer;
use arrow::record_batch::RecordBatch;
use parking_lot::RwLock;
use ulid::Ulid;

use crate::config::FlushConfig;
use crate::error::{Classify, ErrorKind};
use crate::flush::manifest::FileMeta;
use crate::metrics::METRICS;

/// A table: one endpoint of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableId {
    pub tenant: Arc<str>,
    pub endpoint: Arc<str>,
}

impl TableId {
    pub fn new(tenant: &str, endpoint: &str) -> Self {
        Self {
            tenant: tenant.into(),
            endpoint: endpoint.into(),
        }
    }
}

impl std::fmt::Display for TableId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.tenant, self.endpoint)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "memtable memory budget exhausted ({used} of {budget} bytes in use); retry after the flush catches up"
    )]
    MemoryExhausted { used: u64, budget: u64 },
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        ErrorKind::ResourceExhausted
    }
}

/// An immutable memtable on its way to Parquet.
#[derive(Debug)]
pub struct Frozen {
    pub id: u64,
    pub table: TableId,
    pub batches: Vec<RecordBatch>,
    pub rows: usize,
    pub bytes: u64,
    pub min_seq: Ulid,
    pub max_seq: Ulid,
    /// When its oldest row arrived.
    pub since: Instant,
}

#[derive(Default)]
struct Active {
    batches: Vec<RecordBatch>,
    rows: usize,
    bytes: u64,
    min_seq: Option<Ulid>,
    max_seq: Ulid,
    since: Option<Instant>,
}

#[derive(Default)]
struct TableState {
    active: Active,
    frozen: Vec<Arc<Frozen>>,
    files: Vec<Arc<FileMeta>>,
    /// Every WAL entry ≤ this is in a published file of this table.
    flushed_seq: Ulid,
}

#[derive(Default)]
struct Inner {
    tables: BTreeMap<TableId, TableState>,
    /// Key of the newest WAL entry inserted.
    last_applied: Ulid,
    bytes: u64,
    rows: u64,
}

/// What a query reads of one table: published files ∪ memtable rows.
#[derive(Debug, Clone, Default)]
pub struct TableSnapshot {
    pub files: Vec<Arc<FileMeta>>,
    pub batches: Vec<RecordBatch>,
}

pub struct Catalog {
    inner: RwLock<Inner>,
    cfg: FlushConfig,
    next_frozen: AtomicU64,
}

impl Catalog {
    pub fn new(cfg: FlushConfig) -> Self {
        Self {
            inner: RwLock::new(Inner::default()),
            cfg,
            next_frozen: AtomicU64::new(1),
        }
    }

    /// Restores a table's published files and watermark (startup).
    pub fn load_table(&self, table: TableId, files: Vec<Arc<FileMeta>>, flushed_seq: Ulid) {
        let mut inner = self.inner.write();
        let state = inner.tables.entry(table).or_default();
        state.files = files;
        state.flushed_seq = flushed_seq;
    }

    /// Refuses new writes while memtables are over budget.
    pub fn admit(&self) -> Result<(), Error> {
        let used = self.inner.read().bytes;
        if used > self.cfg.memtable_budget {
            return Err(Error::MemoryExhausted {
                used,
                budget: self.cfg.memtable_budget,
            });
        }
        Ok(())
    }

    /// Inserts the rows of WAL entry `seq` (called in key order). Rows of a
    /// table whose watermark already covers `seq` are skipped (WAL replay).
    /// Returns true when some table should flush now.
    pub fn insert(&self, seq: Ulid, rows: Vec<(TableId, RecordBatch)>) -> bool {
        // Measured before the lock that queries and admission share.
        let sized: Vec<_> = rows
            .into_iter()
            .filter(|(_, batch)| batch.num_rows() > 0)
            .map(|(table, batch)| {
                let bytes = batch_bytes(&batch);
                (table, batch, bytes)
            })
            .collect();
        let mut inner = self.inner.write();
        let mut due = false;
        for (table, batch, bytes) in sized {
            let state = inner.tables.entry(table).or_default();
            if seq <= state.flushed_seq {
                continue;
            }
            let n = batch.num_rows();
            let a = &mut state.active;
            a.batches.push(batch);
            a.rows += n;
            a.bytes += bytes;
            a.min_seq.get_or_insert(seq);
            a.max_seq = seq;
            a.since.get_or_insert_with(Instant::now);
            due |= a.rows >= self.cfg.rows || a.bytes >= self.cfg.bytes;
            inner.bytes += bytes;
            inner.rows += n as u64;
        }
        inner.last_applied = inner.last_applied.max(seq);
        due |= inner.bytes > self.cfg.memtable_budget / 2;
        publish_gauges(&inner);
        due
    }

    /// Makes the table's active memtable immutable and returns it (None when empty).
    pub fn freeze(&self, table: &TableId) -> Option<Arc<Frozen>> {
        let mut inner = self.inner.write();
        let state = inner.tables.get_mut(table)?;
        let active = std::mem::take(&mut state.active);
        let min_seq = active.min_seq?;
        let frozen = Arc::new(Frozen {
            id: self.next_frozen.fetch_add(1, Ordering::Relaxed),
            table: table.clone(),
            batches: active.batches,
            rows: active.rows,
            bytes: active.bytes,
            min_seq,
            max_seq: active.max_seq,
            since: active.since.unwrap_or_else(Instant::now),
        });
        state.frozen.push(frozen.clone());
        Some(frozen)
    }

    /// Swaps a frozen memtable for the files it became, atomically for readers.
    pub fn publish(&self, frozen: &Frozen, files: Vec<Arc<FileMeta>>) {
        let mut inner = self.inner.write();
        let state = inner.tables.entry(frozen.table.clone()).or_default();
        state.frozen.retain(|f| f.id != frozen.id);
        state.files.extend(files);
        state.flushed_seq = state.flushed_seq.max(frozen.max_seq);
        inner.bytes -= frozen.bytes;
        inner.rows -= frozen.rows as u64;
        publish_gauges(&inner);
    }

    /// Swaps published files for the file they were merged into (by id),
    /// atomically for readers. False, and nothing changed, when one of
    /// `old` is no longer published.
    pub fn replace_files(
        &self,
        table: &TableId,
        old: &[Arc<FileMeta>],
        new: Arc<FileMeta>,
    ) -> bool {
        let mut inner = self.inner.write();
        let Some(state) = inner.tables.get_mut(table) else {
            return false;
        };
        let gone: std::collections::HashSet<&str> = old.iter().map(|f| f.id.as_str()).collect();
        if state
            .files
            .iter()
            .filter(|f| gone.contains(f.id.as_str()))
            .count()
            != gone.len()
        {
            return false;
        }
        state.files.retain(|f| !gone.contains(f.id.as_str()));
        state.files.push(new);
        true
    }

    /// Drops published files (by id; lake retention), atomically for
    /// readers. Files no longer published are skipped.
    pub fn remove_files(&self, table: &TableId, gone: &[Arc<FileMeta>]) {
        let mut inner = self.inner.write();
        if let Some(state) = inner.tables.get_mut(table) {
            let ids: std::collections::HashSet<&str> = gone.iter().map(|f| f.id.as_str()).collect();
            state.files.retain(|f| !ids.contains(f.id.as_str()));
        }
    }

    /// Every table's published files.
    pub fn published(&self) -> Vec<(TableId, Vec<Arc<FileMeta>>)> {
        let inner = self.inner.read();
        inner
            .tables
            .iter()
            .filter(|(_, s)| !s.files.is_empty())
            .map(|(t, s)| (t.clone(), s.files.clone()))
            .collect()
    }

    /// Puts a frozen memtable whose flush failed back in front of the active
    /// one, so the next flush of the table retries its rows.
    pub fn refreeze_failed(&self, frozen: &Frozen) {
        let mut inner = self.inner.write();
        let Some(state) = inner.tables.get_mut(&frozen.table) else {
            return;
        };
        state.frozen.retain(|f| f.id != frozen.id);
        let a = &mut state.active;
        let mut batches = frozen.batches.clone();
        batches.append(&mut a.batches);
        a.batches = batches;
        a.rows += frozen.rows;
        a.bytes += frozen.bytes;
        a.min_seq = Some(frozen.min_seq);
        a.max_seq = a.max_seq.max(frozen.max_seq);
        a.since = Some(a.since.map_or(frozen.since, |s| s.min(frozen.since)));
    }

    /// The newest key such that every WAL entry at or below it is fully in
    /// published files: everything before the oldest unflushed row.
    pub fn flushed_through(&self) -> Ulid {
        self.flushed_through_excluding(None)
    }

    /// [`Self::flushed_through`] as it will be once `frozen` is published.
    pub fn flushed_through_after(&self, frozen: &Frozen) -> Ulid {
        self.flushed_through_excluding(Some(frozen.id))
    }

    fn flushed_through_excluding(&self, frozen_id: Option<u64>) -> Ulid {
        let inner = self.inner.read();
        let oldest = inner
            .tables
            .values()
            .flat_map(|s| {
                let frozen = s
                    .frozen
                    .iter()
                    .filter(|f| Some(f.id) != frozen_id)
                    .map(|f| f.min_seq);
                frozen.chain(s.active.min_seq)
            })
            .min();
        match oldest {
            Some(seq) => Ulid(seq.0.saturating_sub(1)),
            None => inner.last_applied,
        }
    }

    /// Tables that should flush now: over rows/bytes/age, or the largest ones
    /// while memtables use more than half of the budget.
    pub fn due_tables(&self, now: Instant) -> Vec<TableId> {
        let inner = self.inner.read();
        let mut due: Vec<TableId> = Vec::new();
        let mut by_size: Vec<(u64, &TableId)> = Vec::new();
        for (id, s) in &inner.tables {
            let a = &s.active;
            let old = a
                .since
                .is_some_and(|t| now.duration_since(t) >= self.cfg.age);
            if a.rows > 0 && (old || a.rows >= self.cfg.rows || a.bytes >= self.cfg.bytes) {
                due.push(id.clone());
            } else if a.rows > 0 {
                by_size.push((a.bytes, id));
            }
        }
        let frozen_bytes: u64 = inner
            .tables
            .values()
            .flat_map(|s| s.frozen.iter().map(|f| f.bytes))
            .sum();
        let mut projected = inner.bytes.saturating_sub(frozen_bytes);
        by_size.sort_by_key(|b| std::cmp::Reverse(b.0));
        for (bytes, id) in by_size {
            if projected <= self.cfg.memtable_budget / 2 {
                break;
            }
            projected -= bytes;
            due.push(id.clone());
        }
        due
    }

    /// Whether flushing is falling behind: memtables (active and frozen) hold
    /// half the budget, twice a flush's rows, or rows older than twice the
    /// flush age. (Not twice a flush's bytes: at half of #2's target rate a
    /// background encode of one flush regularly overlaps the next flush's
    /// worth of arriving rows, and redoing it in the foreground then took a
    /// core away from requests for up to a second.)
    pub fn flush_behind(&self, now: Instant) -> bool {
        let inner = self.inner.read();
        let cfg = &self.cfg;
        if inner.rows >= 2 * cfg.rows as u64 || inner.bytes >= cfg.memtable_budget / 2 {
            return true;
        }
        let oldest = inner
            .tables
            .values()
            .flat_map(|s| s.frozen.iter().map(|f| f.since).chain(s.active.since))
            .min();
        oldest.is_some_and(|t| now.duration_since(t) >= 2 * cfg.age)
    }

    /// Tables whose active memtable holds rows.
    pub fn tables_with_rows(&self) -> Vec<TableId> {
        let inner = self.inner.read();
        inner
            .tables
            .iter()
            .filter(|(_, s)| s.active.rows > 0)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether any tenant has a table named `endpoint`.
    pub fn has_endpoint(&self, endpoint: &str) -> bool {
        let inner = self.inner.read();
        inner.tables.keys().any(|t| &*t.endpoint == endpoint)
    }

    /// Every known table of a tenant.
    pub fn tables_of(&self, tenant: &str) -> Vec<TableId> {
        let inner = self.inner.read();
        inner
            .tables
            .keys()
            .filter(|t| &*t.tenant == tenant)
            .cloned()
            .collect()
    }

    /// Files ∪ frozen ∪ active rows of a table, consistent at one instant.
    pub fn snapshot(&self, table: &TableId) -> TableSnapshot {
        let inner = self.inner.read();
        let Some(s) = inner.tables.get(table) else {
            return TableSnapshot::default();
        };
        let mut batches: Vec<RecordBatch> = s
            .frozen
            .iter()
            .flat_map(|f| f.batches.iter().cloned())
            .collect();
        batches.extend(s.active.batches.iter().cloned());
        TableSnapshot {
            files: s.files.clone(),
            batches,
        }
    }

    /// Rows and bytes held in memtables.
    pub fn usage(&self) -> (u64, u64) {
        let inner = self.inner.read();
        (inner.rows, inner.bytes)
    }
}

/// The memory a batch keeps alive: every allocation its buffers point into,
/// once.
///
/// Not `RecordBatch::get_array_memory_size`, which counts a buffer's whole
/// allocation for every slice of it: the columns of an Arrow IPC batch are
/// all slices of one message body, so a 16 MiB batch of 50 columns counted
/// ~850 MiB. Not the slices' lengths either: what a builder over-allocates,
/// or a large buffer a small slice pins, is memory held all the same.
pub fn batch_bytes(batch: &RecordBatch) -> u64 {
    let mut allocations = HashMap::new();
    for column in batch.columns() {
        add_allocations(&column.to_data(), &mut allocations);
    }
    allocations.values().map(|&bytes| bytes as u64).sum()
}

/// Records, by address, how much of each allocation `data`'s buffers (its
/// children's included) hold.
fn add_allocations(data: &ArrayData, allocations: &mut HashMap<usize, usize>) {
    let nulls = data.nulls().map(NullBuffer::buffer);
    for buffer in data.buffers().iter().chain(nulls) {
        // Foreign memory reports no capacity: count as much as is used.
        let extent = buffer.capacity().max(buffer.ptr_offset() + buffer.len());
        let held = allocations
            .entry(buffer.data_ptr().as_ptr() as usize)
            .or_insert(0);
        *held = (*held).max(extent);
    }
    for child in data.child_data() {
        add_allocations(child, allocations);
    }
}

fn publish_gauges(inner: &Inner) {
    METRICS.memtable_bytes.set(inner.bytes as i64);
    METRICS.memtable_rows.set(inner.rows as i64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array};

    fn batch(n: i64) -> RecordBatch {
        RecordBatch::try_from_iter([("x", Arc::new(Int64Array::from_iter_values(0..n)) as _)])
            .unwrap()
    }

    fn seq(n: u128) -> Ulid {
        Ulid(n)
    }

    #[test]
    fn watermark_follows_oldest_unflushed_row() {
        let cat = Catalog::new(FlushConfig::default());
        let (a, b) = (TableId::new("t", "a"), TableId::new("t", "b"));
        cat.insert(seq(10), vec![(a.clone(), batch(2)), (b.clone(), batch(1))]);
        cat.insert(seq(11), vec![(b.clone(), batch(3))]);
        assert_eq!(cat.flushed_through(), seq(9));
        let fa = cat.freeze(&a).unwrap();
        assert_eq!((fa.min_seq, fa.max_seq, fa.rows), (seq(10), seq(10), 2));
        // Frozen rows still count as unflushed and stay visible.
        assert_eq!(cat.flushed_through(), seq(9));
        assert_eq!(cat.snapshot(&a).batches.len(), 1);
        cat.publish(&fa, vec![]);
        assert_eq!(cat.flushed_through(), seq(9)); // b still holds entry 10
        let fb = cat.freeze(&b).unwrap();
        cat.publish(&fb, vec![]);
        assert_eq!(cat.flushed_through(), seq(11));
        assert_eq!(cat.usage(), (0, 0));
        // Replay of an entry the table already flushed is skipped.
        cat.insert(seq(11), vec![(b.clone(), batch(3))]);
        assert_eq!(cat.usage().0, 0);
    }

    #[test]
    fn a_batch_of_slices_of_one_buffer_counts_that_buffer_once() {
        use arrow::ipc::{reader::StreamReader, writer::StreamWriter};
        // 50 int64 columns of 10,000 rows: 4 MB of values.
        let rows = 10_000;
        let columns: Vec<_> = (0..50)
            .map(|i| {
                let col = Arc::new(Int64Array::from_iter_values(0..rows)) as ArrayRef;
                (format!("c{i}"), col)
            })
            .collect();
        let built = RecordBatch::try_from_iter(columns).unwrap();
        let values = 50 * rows as u64 * 8;
        // Built arrays are counted by their allocations, as before.
        assert!(batch_bytes(&built) >= values);
        assert!(batch_bytes(&built) <= built.get_array_memory_size() as u64);
        // Read back from IPC, every buffer is a slice of one message body.
        let mut ipc = Vec::new();
        let mut w = StreamWriter::try_new(&mut ipc, &built.schema()).unwrap();
        w.write(&built).unwrap();
        w.finish().unwrap();
        drop(w);
        let read = StreamReader::try_new(std::io::Cursor::new(ipc), None)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert!(read.get_array_memory_size() as u64 > 40 * values);
        let bytes = batch_bytes(&read);
        assert!(bytes >= values && bytes < values + values / 10, "{bytes}");
        // The memtable counts, and gives back, that size.
        let cat = Catalog::new(FlushConfig::default());
        let table = TableId::new("t", "ipc");
        cat.insert(seq(1), vec![(table.clone(), read)]);
        assert_eq!(cat.usage(), (rows as u64, bytes));
        let frozen = cat.freeze(&table).unwrap();
        cat.refreeze_failed(&frozen);
        let frozen = cat.freeze(&table).unwrap();
        assert_eq!(frozen.bytes, bytes);
        cat.publish(&frozen, vec![]);
        assert_eq!(cat.usage(), (0, 0));
    }

    #[test]
    fn budget_rejects_and_due_picks_largest() {
        let cfg = FlushConfig {
            memtable_budget: 1,
            ..FlushConfig::default()
        };
        let cat = Catalog::new(cfg);
        cat.admit().unwrap();
        let due = cat.insert(seq(1), vec![(TableId::new("t", "a"), batch(100))]);
        assert!(due);
        assert!(matches!(cat.admit(), Err(Error::MemoryExhausted { .. })));
        assert_eq!(cat.due_tables(Instant::now()), vec![TableId::new("t", "a")]);
    }
}
