//! Flush: frozen memtables → published Parquet → manifest → WAL truncation.
//!
//! Contract of [`Flusher::flush_table`]: it returns the files it published, and
//! when it returns they are durable in the lake *and* recorded in the manifest
//! with the table's watermark and the global `flushed_through` watermark (one
//! synced RocksDB batch), and queries read them instead of the memtable.
//! Order per table: freeze → encode ([`threads`]) → put each file → record →
//! swap in the catalog → truncate the WAL below `min(flushed_through,
//! now - retention)` (trace entries) or below `flushed_through` (every other
//! kind, see [`crate::wal`]). A crash anywhere before "record" leaves the WAL entries
//! above the old watermark, so startup replays them; unrecorded files of this
//! node are deleted by [`Flusher::reconcile`]. A failed put deletes the
//! flush's files at once (retrying failed deletes before the next flush).
//! A failed record keeps the files *and* the frozen rows: a synced write
//! that reported failure may still be in RocksDB's log (and come back at
//! restart, or be there already after RocksDB resumes by itself), so the
//! next flush of the table retries that same record (same keys, so
//! idempotent) before it freezes anything new. The rows therefore end up
//! in exactly one set of recorded files whichever way the failed write
//! went, and a RocksDB that refuses writes for a while does not make every
//! retry write another set of Parquet files.
//!
//! Flushes are serialized by one lock: two flushes of one table racing could
//! otherwise record a newer watermark before an older file.
//!
//! Touch together: `memtable` (freeze/publish), `manifest` (layout), README
//! (layout and flush settings).

pub mod compact;
pub mod lake;
pub mod lease;
pub mod manifest;
pub mod parquet;
pub mod retention;
pub mod threads;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use ulid::Ulid;

use crate::config::{FlushConfig, WalConfig};
use crate::error::{Classify, ErrorKind};
use crate::memtable::{Catalog, Frozen, TableId};
use crate::metrics::METRICS;
use crate::wal::Wal;
use lake::Lake;
use manifest::FileMeta;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("encoding {table}: {source}")]
    Encode {
        table: TableId,
        source: parquet::Error,
    },
    #[error("publishing {path}: {source}")]
    Publish { path: String, source: lake::Error },
    #[error("recording flush of {table}: {source}")]
    Record {
        table: TableId,
        source: manifest::Error,
    },
    #[error("WAL: {0}")]
    Wal(#[from] crate::wal::Error),
    #[error("starting the flush encode threads: {0}")]
    Thread(std::io::Error),
    #[error("forgetting expired files of {table}: {source}")]
    Forget {
        table: TableId,
        source: manifest::Error,
    },
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Internal
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A flush whose files are written and whose record failed.
struct Unrecorded {
    frozen: Arc<Frozen>,
    files: Vec<FileMeta>,
    started: Instant,
}

pub struct Flusher {
    catalog: Arc<Catalog>,
    wal: Arc<Wal>,
    lake: Lake,
    cfg: FlushConfig,
    wal_cfg: WalConfig,
    node_id: String,
    encode: threads::EncodeThreads,
    /// Explicit flushes waiting for the lock (they hurry background encodes).
    urgent_waiting: Arc<AtomicUsize>,
    lock: tokio::sync::Mutex<()>,
    /// Files this node wrote and did not record whose delete failed: retried
    /// before every flush (and startup's reconcile removes them anyway).
    orphans: parking_lot::Mutex<Vec<String>>,
    /// Compaction and retention passes stop between partitions once set
    /// ([`Flusher::stop`]).
    stop: CancellationToken,
    /// One compaction or retention pass at a time.
    compact_lock: tokio::sync::Mutex<()>,
    /// A merged file whose record failed, retried by the next compaction
    /// pass (see [`compact`]).
    unrecorded_merge: parking_lot::Mutex<Option<compact::UnrecordedMerge>>,
    /// Decoded sizes a merge measured, of files recorded before
    /// [`FileMeta::decoded_bytes`] existed (see [`compact::plan`]).
    measured: parking_lot::Mutex<std::collections::HashMap<String, u64>>,
    /// Files merged away or expired, deleted once no query snapshot lists
    /// them ([`Flusher::reap`]).
    graveyard: parking_lot::Mutex<Vec<Arc<FileMeta>>>,
    /// One reap at a time: a pass's reap returns once its files are gone.
    reap_lock: tokio::sync::Mutex<()>,
    /// Outside readers' snapshots, which keep their files from the reap.
    leases: lease::Leases,
    /// Per table, a flush whose files are written but whose record failed:
    /// retried as is before the table's next flush (module docs).
    unrecorded: parking_lot::Mutex<HashMap<TableId, Unrecorded>>,
    /// Test fault injection: each entry fails one record, after writing it
    /// (`true`: the write landed but reported failure) or without.
    #[cfg(test)]
    record_faults: parking_lot::Mutex<Vec<bool>>,
    /// Woken when a table crossed a threshold on insert.
    pub wake: Arc<Notify>,
}

impl Flusher {
    pub fn new(
        catalog: Arc<Catalog>,
        wal: Arc<Wal>,
        lake: Lake,
        cfg: FlushConfig,
        wal_cfg: WalConfig,
        node_id: String,
    ) -> Result<Self> {
        // A background encode finishes at normal priority once flushing falls
        // behind, or while an explicit flush waits for it.
        let urgent_waiting = Arc::new(AtomicUsize::new(0));
        let (cat, waiting) = (catalog.clone(), urgent_waiting.clone());
        let hurry = move || waiting.load(Ordering::Relaxed) > 0 || cat.flush_behind(Instant::now());
        let encode = threads::EncodeThreads::start(hurry).map_err(Error::Thread)?;
        Ok(Self {
            catalog,
            wal,
            lake,
            cfg,
            wal_cfg,
            node_id,
            encode,
            urgent_waiting,
            lock: tokio::sync::Mutex::new(()),
            orphans: parking_lot::Mutex::new(Vec::new()),
            stop: CancellationToken::new(),
            compact_lock: tokio::sync::Mutex::new(()),
            unrecorded_merge: parking_lot::Mutex::new(None),
            measured: parking_lot::Mutex::new(std::collections::HashMap::new()),
            graveyard: parking_lot::Mutex::new(Vec::new()),
            reap_lock: tokio::sync::Mutex::new(()),
            leases: lease::Leases::default(),
            unrecorded: parking_lot::Mutex::new(HashMap::new()),
            #[cfg(test)]
            record_faults: parking_lot::Mutex::new(Vec::new()),
            wake: Arc::new(Notify::new()),
        })
    }

    /// Deletes files written but not recorded (their rows will be flushed
    /// again), so no reader of the lake sees those rows twice. A delete that
    /// fails is retried before the next flush; one that finds nothing is done.
    async fn discard(&self, paths: Vec<String>) {
        if paths.is_empty() {
            return;
        }
        for (path, e) in self.lake.delete_all(paths).await {
            tracing::warn!(%path, error = %e, "could not delete an unrecorded file; retrying before the next flush");
            self.orphans.lock().push(path);
        }
    }

    /// Hands files no longer published to [`Flusher::reap`].
    fn bury(&self, files: Vec<Arc<FileMeta>>) {
        {
            let mut measured = self.measured.lock();
            if !measured.is_empty() {
                for f in &files {
                    measured.remove(&f.path);
                }
            }
        }
        self.graveyard.lock().extend(files);
    }

    /// The published files of every table, or of `tenant`'s tables.
    fn published_of<'a>(
        &self,
        tenant: Option<&'a str>,
    ) -> impl Iterator<Item = (TableId, Vec<Arc<FileMeta>>)> + 'a {
        let all = self.catalog.published().into_iter();
        all.filter(move |(table, _)| tenant.is_none_or(|t| *table.tenant == *t))
    }

    /// Ends the compaction and retention loops; a pass in progress stops
    /// after the partition (compaction) or table (retention) it is on.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    /// Background loop: flush due tables on every tick or wake-up until cancelled.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.cfg.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
            }
            // Ended leases let go of their files here (and in the gauge).
            self.leases.drop_ended();
            // Failing WAL writes are noticed to succeed again without traffic.
            self.wal.probe();
            if self.unreaped() > 0 {
                self.reap_if_idle().await;
            }
            for table in self.with_unrecorded(self.catalog.due_tables(Instant::now())) {
                if let Err(e) = self.flush_table(&table).await {
                    METRICS.flush_errors.inc();
                    tracing::error!(%table, error = %e, "flush failed; rows stay in the memtable and WAL");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Flushes every table that holds rows, after any flush in progress
    /// (which it hurries along); returns the files published.
    pub async fn flush_all(&self) -> Result<Vec<FileMeta>> {
        self.flush_tenant(None).await
    }

    /// [`Flusher::flush_all`] limited to one tenant's tables when `tenant`
    /// is given.
    ///
    /// Not cancel-safe: a flush dropped between freezing a memtable and
    /// publishing its files leaves the frozen rows unpublished (held in
    /// memory, pinning the WAL) until a restart. Callers that can be
    /// cancelled (a request handler whose client goes away) spawn it.
    pub async fn flush_tenant(&self, tenant: Option<&str>) -> Result<Vec<FileMeta>> {
        self.urgent_waiting.fetch_add(1, Ordering::Relaxed);
        let guard = self.lock.lock().await;
        self.urgent_waiting.fetch_sub(1, Ordering::Relaxed);
        let mut files = Vec::new();
        for table in self.with_unrecorded(self.catalog.tables_with_rows()) {
            if tenant.is_some_and(|t| *table.tenant != *t) {
                continue;
            }
            files.extend(self.flush_locked(&guard, &table, true).await?);
        }
        Ok(files)
    }

    /// Flushes one table in the background (see the module contract).
    pub async fn flush_table(&self, table: &TableId) -> Result<Vec<FileMeta>> {
        let guard = self.lock.lock().await;
        self.flush_locked(&guard, table, false).await
    }

    /// A flush that is not `urgent` encodes at idle priority until flushing
    /// falls behind ([`threads`]).
    #[tracing::instrument(skip_all, fields(table = %table))]
    async fn flush_locked(
        &self,
        _lock: &tokio::sync::MutexGuard<'_, ()>,
        table: &TableId,
        urgent: bool,
    ) -> Result<Vec<FileMeta>> {
        let orphans = std::mem::take(&mut *self.orphans.lock());
        self.discard(orphans).await;
        // A record that failed goes first, with its files as they are.
        let retried = self.unrecorded.lock().remove(table);
        let mut published = match retried {
            Some(u) => self.record_and_publish(table, u.frozen, u.files, u.started)?,
            None => vec![],
        };
        let Some(frozen) = self.catalog.freeze(table) else {
            return Ok(published);
        };
        let started = Instant::now();
        let files = match self.write_files(&frozen, urgent).await {
            Ok(files) => files,
            Err(e) => {
                // The frozen rows stay visible and unflushed; the next flush
                // of this table retries them (they are re-frozen with it).
                self.catalog.refreeze_failed(&frozen);
                return Err(e);
            }
        };
        published.extend(self.record_and_publish(table, frozen, files, started)?);
        Ok(published)
    }

    /// Records `files` (the whole of `frozen`'s rows) with the watermarks,
    /// then swaps them in for the frozen rows and truncates the WAL. On a
    /// failed record both stay as they are, to be retried by the table's
    /// next flush (module docs).
    fn record_and_publish(
        &self,
        table: &TableId,
        frozen: Arc<Frozen>,
        files: Vec<FileMeta>,
        started: Instant,
    ) -> Result<Vec<FileMeta>> {
        let through = self.catalog.flushed_through_after(&frozen);
        if let Err(source) = self.record(&files, table, frozen.max_seq, through) {
            tracing::error!(files = ?files.iter().map(|f| &f.path).collect::<Vec<_>>(), error = %source, "flush written but not recorded; the next flush of the table retries the record with these files");
            let failed = Unrecorded {
                frozen,
                files,
                started,
            };
            self.unrecorded.lock().insert(table.clone(), failed);
            return Err(Error::Record {
                table: table.clone(),
                source,
            });
        }
        self.catalog
            .publish(&frozen, files.iter().cloned().map(Arc::new).collect());
        self.truncate_wal(through)?;
        // Rows of expired hours were dropped, not written (counted apart).
        let written: u64 = files.iter().map(|f| f.rows).sum();
        METRICS.flush_seconds.observe_duration(started.elapsed());
        METRICS.flush_rows.add(written);
        tracing::info!(
            rows = written,
            expired_rows = frozen.rows as u64 - written,
            files = files.len(),
            ms = started.elapsed().as_millis() as u64,
            "flushed"
        );
        Ok(files)
    }

    /// [`manifest::record`] (see [`Flusher::faulty`]).
    fn record(
        &self,
        files: &[FileMeta],
        table: &TableId,
        table_wm: Ulid,
        through: Ulid,
    ) -> manifest::Result<()> {
        self.faulty(|| manifest::record(self.wal.db(), files, table, table_wm, through))
    }

    /// Runs a manifest write; in unit tests, an injected fault first makes
    /// it fail, after writing (`true`: it landed) or without.
    fn faulty(&self, write: impl FnOnce() -> manifest::Result<()>) -> manifest::Result<()> {
        #[cfg(test)]
        if let Some(landed) = self.record_faults.lock().pop() {
            if landed {
                write()?;
            }
            return Err(manifest::Error::Injected);
        }
        write()
    }

    /// `tables` and every table with a failed record to retry, once each.
    fn with_unrecorded(&self, mut tables: Vec<TableId>) -> Vec<TableId> {
        for t in self.unrecorded.lock().keys() {
            if !tables.contains(t) {
                tables.push(t.clone());
            }
        }
        tables
    }

    async fn write_files(&self, frozen: &Arc<Frozen>, urgent: bool) -> Result<Vec<FileMeta>> {
        let table = frozen.table.clone();
        let opts = parquet::EncodeOptions {
            row_group_rows: self.cfg.row_group_rows,
            zstd_level: self.cfg.zstd_level,
        };
        let encode_err = |source| Error::Encode {
            table: table.clone(),
            source,
        };
        let f = frozen.clone();
        let start: threads::Start =
            Arc::new(move || parquet::Encoder::new(&f.table.endpoint, &f.batches, opts.clone()));
        let encoded = self
            .encode
            .encode(start, urgent)
            .await
            .map_err(encode_err)?;
        let mut files: Vec<FileMeta> = Vec::with_capacity(encoded.len());
        let keep = self.cfg.retention.of(&table.endpoint);
        let now = now_ms();
        for enc in encoded {
            // Rows of an hour already past retention are not written (a
            // pass would delete them next): they go with the memtable.
            if keep.is_some_and(|k| retention::hour_expired(&enc.date, enc.hour, now, k)) {
                tracing::info!(%table, date = %enc.date, hour = enc.hour, rows = enc.rows, "rows of an hour past retention dropped at flush");
                METRICS.expired_rows.add(enc.rows as u64);
                continue;
            }
            let id = Ulid::new().to_string();
            let path = file_path(&table, &enc.date, enc.hour, &id, &self.node_id);
            let bytes = enc.bytes.len() as u64;
            if let Err(source) = self.lake.put(&path, enc.bytes).await {
                // An object store may have stored an object whose PUT failed
                // (a lost response): that path goes too.
                let written = files.iter().map(|f| f.path.clone());
                self.discard(written.chain([path.clone()]).collect()).await;
                return Err(Error::Publish { path, source });
            }
            METRICS.flush_files.inc();
            METRICS.flush_bytes.add(bytes);
            files.push(FileMeta {
                id,
                tenant: table.tenant.to_string(),
                endpoint: table.endpoint.to_string(),
                path,
                date: enc.date,
                hour: enc.hour,
                rows: enc.rows as u64,
                bytes,
                min_time_ns: enc.min_time_ns,
                max_time_ns: enc.max_time_ns,
                min_seq: frozen.min_seq.to_string(),
                max_seq: frozen.max_seq.to_string(),
                created_at_ms: now_ms(),
                service_names: Some(enc.service_names),
                decoded_bytes: Some(enc.decoded_bytes),
            });
        }
        Ok(files)
    }

    fn truncate_wal(&self, through: Ulid) -> Result<()> {
        let retention_ms = self.wal_cfg.retention.as_millis() as u64;
        let horizon = Ulid::from_parts(now_ms().saturating_sub(retention_ms), 0);
        let flushed = Ulid(through.0.saturating_add(1));
        self.wal.truncate_before(flushed.min(horizon))?;
        self.wal.drop_transient_before(flushed)?;
        Ok(())
    }

    /// Deletes this node's Parquet files that the manifest does not list
    /// (published just before a crash, never recorded: their rows are still in
    /// the WAL and will be flushed again) and leftover staging files.
    pub async fn reconcile(&self, recorded: &HashSet<String>) -> Result<usize> {
        let suffix = format!("-{}.parquet", self.node_id);
        let mut removed = Vec::new();
        let paths = self.lake.list().await.map_err(|source| Error::Publish {
            path: "<list>".into(),
            source,
        })?;
        for path in paths {
            let name = path.rsplit('/').next().unwrap_or("");
            // Exactly the names `publish` writes; anything else (a copy, a
            // user's `.bak`) is not ours to delete.
            let published = name.starts_with("part-") && name.ends_with(&suffix);
            let staging = name.starts_with("part-")
                && name
                    .strip_suffix(lake::STAGING_SUFFIX)
                    .is_some_and(|n| n.ends_with(&suffix));
            if (published && !recorded.contains(&path)) || staging {
                tracing::warn!(%path, "removing a file the manifest does not list (left by a crash, or merged away or expired while a snapshot lease held it)");
                // One that cannot go now (a permission, a store's hiccup)
                // is retried before every flush, as a failed flush's files
                // are: the server is more use running.
                match self.lake.delete(&path).await {
                    Ok(()) => removed.push(path),
                    Err(error) => {
                        tracing::error!(%path, %error, "could not remove a file the manifest does not list; retrying before the next flush");
                        self.orphans.lock().push(path);
                    }
                }
            }
        }
        // Expired files a crash left leave their hour empty.
        let count = removed.len();
        self.lake.remove_empty_parents(removed, 2).await;
        Ok(count)
    }
}

/// A published file's path in the lake: hive partitions, then a name unique
/// across restarts (ULID) and nodes, which [`Flusher::reconcile`] matches.
fn file_path(table: &TableId, date: &str, hour: u8, id: &str, node: &str) -> String {
    format!(
        "tenant={}/endpoint={}/date={date}/hour={hour:02}/part-{id}-{node}.parquet",
        table.tenant, table.endpoint
    )
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, TimestampNanosecondArray};
    use arrow::record_batch::RecordBatch;

    /// A flusher over a temp dir's WAL and local lake (the dir, the lake
    /// root, the flusher).
    fn flusher() -> (tempfile::TempDir, std::path::PathBuf, Flusher) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("lake");
        let lake = Lake::open(&format!("file://{}", root.display())).unwrap();
        let wal = Arc::new(Wal::open(&dir.path().join("wal"), 8).unwrap());
        let catalog = Arc::new(Catalog::new(FlushConfig::default()));
        let flusher = Flusher::new(
            catalog,
            wal,
            lake,
            FlushConfig::default(),
            WalConfig::default(),
            "node".into(),
        )
        .unwrap();
        (dir, root, flusher)
    }

    #[tokio::test]
    async fn unrecorded_files_are_deleted_and_failed_deletes_retried() {
        let (_dir, root, flusher) = flusher();
        let lake = flusher.lake().clone();
        let written = "tenant=t/endpoint=e/date=2026-11-23/hour=05/part-a-node.parquet";
        lake.put(written, bytes::Bytes::from_static(b"PAR1"))
            .await
            .unwrap();
        // A delete that cannot succeed now: a directory where the file was.
        let stuck = "tenant=t/endpoint=e/date=2026-11-23/hour=05/part-b-node.parquet";
        std::fs::create_dir_all(root.join(stuck).join("x")).unwrap();
        let never = "tenant=t/endpoint=e/date=2026-11-23/hour=05/part-c-node.parquet";
        flusher
            .discard(vec![written.into(), stuck.into(), never.into()])
            .await;
        assert!(!root.join(written).exists());
        assert_eq!(*flusher.orphans.lock(), vec![stuck.to_string()]);
        // The next flush, even of nothing, retries it.
        std::fs::remove_dir_all(root.join(stuck)).unwrap();
        std::fs::write(root.join(stuck), b"PAR1").unwrap();
        flusher.flush_table(&TableId::new("t", "e")).await.unwrap();
        assert!(!root.join(stuck).exists());
        assert!(flusher.orphans.lock().is_empty());
    }

    /// `n` rows of a record table, all in one hour.
    fn rows(n: i64) -> RecordBatch {
        let ts = TimestampNanosecondArray::from_iter_values(
            (0..n).map(|i| 1_763_000_000_000_000_000 + i),
        )
        .with_timezone("UTC");
        RecordBatch::try_from_iter([
            ("timestamp", Arc::new(ts) as _),
            ("x", Arc::new(Int64Array::from_iter_values(0..n)) as _),
        ])
        .unwrap()
    }

    /// The `.parquet` files under `root`, as lake paths.
    fn parquet_files(root: &std::path::Path) -> HashSet<String> {
        let mut out = HashSet::new();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "parquet") {
                    let rel = p.strip_prefix(root).unwrap();
                    out.insert(rel.to_string_lossy().into_owned());
                }
            }
        }
        out
    }

    /// Whether a failed manifest write landed or not, and whether RocksDB
    /// takes writes again at once or only at the next flush, the rows end
    /// up recorded exactly once, the files on disk are exactly the
    /// recorded ones, and the watermark covers the rows.
    #[tokio::test]
    async fn a_failed_record_is_retried_with_the_same_files() {
        for landed in [true, false] {
            let (_dir, root, flusher) = flusher();
            let table = TableId::new("t", "e");
            let unflushed = || -> usize {
                let batches = flusher.catalog.snapshot(&table).batches;
                batches.iter().map(|b| b.num_rows()).sum()
            };
            let seq = |n| Ulid::from_parts(now_ms(), n);
            flusher
                .catalog
                .insert(seq(1), vec![(table.clone(), rows(3))]);
            flusher.record_faults.lock().push(landed);
            let err = flusher.flush_table(&table).await.unwrap_err();
            assert!(matches!(err, Error::Record { .. }), "{err}");
            // Still unflushed (and visible), the file kept for the retry.
            assert_eq!(unflushed(), 3);
            assert_eq!(parquet_files(&root).len(), 1);
            let first = parquet_files(&root);

            // Fails again (RocksDB still refusing), then succeeds, with new
            // rows arriving in between: the same file, plus one for them.
            flusher.record_faults.lock().push(false);
            assert!(flusher.flush_table(&table).await.is_err());
            assert_eq!(parquet_files(&root), first);
            let late = seq(2);
            flusher.catalog.insert(late, vec![(table.clone(), rows(2))]);
            let done = flusher.flush_all().await.unwrap();
            assert_eq!(done.iter().map(|f| f.rows).collect::<Vec<_>>(), [3, 2]);

            let loaded = manifest::load(flusher.wal.db()).unwrap();
            let recorded = &loaded.files[&table];
            assert_eq!(recorded.iter().map(|f| f.rows).sum::<u64>(), 5);
            let paths: HashSet<String> = recorded.iter().map(|f| f.path.clone()).collect();
            assert_eq!(parquet_files(&root), paths, "landed={landed}");
            assert!(first.is_subset(&paths));
            assert_eq!(loaded.watermarks[&table], late);
            assert_eq!(unflushed(), 0);
            assert!(flusher.unrecorded.lock().is_empty());
        }
    }

    /// Compaction's twin of the test above: a merge whose record failed is
    /// retried before anything else is merged (no second merged file), and
    /// dropped if retention took its inputs meanwhile.
    #[tokio::test]
    async fn a_failed_merge_record_is_retried_before_anything_is_merged() {
        // The last retry is a compaction pass, or a retention pass (a
        // server with --compact-interval 0 runs only those).
        for (landed, expire_inputs, by_retention) in [
            (true, false, false),
            (false, false, false),
            (true, true, false),
            (false, false, true),
        ] {
            let (_dir, root, flusher) = flusher();
            let table = TableId::new("t", "e");
            for (n, count) in [(1, 3), (2, 2)] {
                let seq = Ulid::from_parts(now_ms(), n);
                flusher
                    .catalog
                    .insert(seq, vec![(table.clone(), rows(count))]);
                flusher.flush_table(&table).await.unwrap();
            }
            let inputs = parquet_files(&root);
            assert_eq!(inputs.len(), 2);
            flusher.record_faults.lock().push(landed);
            let err = flusher.compact(None, true).await.unwrap_err();
            assert!(matches!(err, Error::Record { .. }), "{err}");
            // Queries still read the inputs; the merged file waits beside them.
            let published = || -> HashSet<String> {
                let files = flusher.published_of(None).flat_map(|(_, f)| f);
                files.map(|f| f.path.clone()).collect()
            };
            assert_eq!(published(), inputs);
            assert_eq!(parquet_files(&root).len(), 3);
            // Refused again: still no second merged file.
            flusher.record_faults.lock().push(false);
            assert!(flusher.compact(None, true).await.is_err());
            assert_eq!(parquet_files(&root).len(), 3);

            if expire_inputs {
                // What a retention pass does with an expired hour.
                let (_, files) = flusher.published_of(None).next().unwrap();
                manifest::forget(flusher.wal.db(), &files).unwrap();
                flusher.catalog.remove_files(&table, &files);
                flusher.bury(files);
            }
            let done = match by_retention {
                false => Some(flusher.compact(None, true).await.unwrap()),
                true => {
                    flusher.expire(None, None).await.unwrap();
                    None
                }
            };
            let loaded = manifest::load(flusher.wal.db()).unwrap();
            let recorded: HashSet<String> = loaded
                .files
                .values()
                .flatten()
                .map(|f| f.path.clone())
                .collect();
            assert_eq!(parquet_files(&root), recorded, "landed={landed}");
            assert_eq!(published(), recorded);
            assert!(flusher.unrecorded_merge.lock().is_none());
            let counts = done.map(|d| (d.merged, d.written, d.rows));
            if expire_inputs {
                assert_eq!(counts, Some((0, 0, 0)));
                assert!(recorded.is_empty());
            } else {
                assert!(counts.is_none_or(|c| c == (2, 1, 5)), "{counts:?}");
                assert_eq!(recorded.len(), 1);
                assert!(recorded.is_disjoint(&inputs));
                assert_eq!(loaded.files[&table][0].rows, 5);
            }
        }
    }
}
