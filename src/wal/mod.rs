//! Write-ahead log on RocksDB.
//!
//! Contract: [`Wal::append`] returns only after the entry is fsync'd, and after
//! the entry's `on_durable` callback ran. Callbacks run on the single writer
//! thread in key order, so whatever they insert into (the memtables) sees
//! entries in exactly WAL order — the flush watermark logic relies on that.
//!
//! Concurrent appends share one fsync (group commit): the writer thread takes
//! every queued request (up to `max_group`), writes them in one RocksDB
//! `WriteBatch` with `sync = true`, then answers each through its oneshot.
//!
//! Keys are 16-byte big-endian ULIDs, strictly increasing across restarts (a
//! clock going back yields the next free key after the last entry, flush
//! watermark or retention marker, whichever is newest), with the low
//! [`SPAN_INDEX_BITS`] zero so cursor readers can give each span of an entry
//! its own key. Entry layout: [`entry`].
//!
//! Two column families hold entries. [`CF_WAL`] keeps trace entries for
//! `--wal-retention` after their flush, because `ReadSpans` cursor readers
//! read spans from it. [`CF_WAL_TRANSIENT`] holds every other kind (logs,
//! metrics, DataRecords): nothing reads those after their flush, so they are
//! deleted as soon as they are in published files, whatever the retention,
//! and RocksDB does not compress them again (they mostly die before RocksDB
//! compacts them). Replay reads both in key order ([`Wal::replay_after`]).
//!
//! Payloads are compressed with zstd (level [`DEFAULT_ZSTD_LEVEL`] unless
//! [`Wal::set_zstd_level`] says otherwise) by the request handler that
//! appends them, on the runtime's threads (payloads over a MiB on the
//! blocking pool), before the writer thread sees them: the log RocksDB
//! fsyncs, its memtables and its blob files all hold the compressed bytes,
//! and the single writer thread does no more work. Readers that want one
//! tenant's traces ([`Wal::iter_after_where`]) skip other entries without
//! decompressing them.
//!
//! The same RocksDB instance holds the manifest and metadata column families
//! ([`CF_META`], [`CF_MANIFEST`], …) so that flush can record a file and move
//! the watermark in one atomic write batch. When you add a column family, add
//! it to [`COLUMN_FAMILIES`].

pub mod entry;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use tokio::sync::{mpsc, oneshot};
use ulid::Ulid;

pub use entry::{PayloadKind, WalEntry, MAX_PAYLOAD};

use crate::error::{Classify, ErrorKind};
use crate::metrics::METRICS;

pub const CF_WAL: &str = "wal";
/// Entries nothing reads after their flush (see the module docs).
pub const CF_WAL_TRANSIENT: &str = "wal_transient";
/// `meta` key: the newest WAL key deleted by retention.
const DELETED_THROUGH: &[u8] = b"wal_deleted_through";
pub const CF_META: &str = "meta";
pub const CF_MANIFEST: &str = "manifest";
pub const CF_KEYS: &str = "keys";
pub const CF_SCHEMAS: &str = "schemas";
pub const CF_BATCHES: &str = "batches";
/// Entries that replay could not convert any more (see [`Wal::set_aside`]);
/// nothing deletes them.
pub const CF_REJECTED: &str = "wal_rejected";
pub const COLUMN_FAMILIES: &[&str] = &[
    CF_WAL,
    CF_WAL_TRANSIENT,
    CF_META,
    CF_MANIFEST,
    CF_KEYS,
    CF_SCHEMAS,
    CF_BATCHES,
    CF_REJECTED,
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("WAL storage error: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("WAL entry {key} is corrupt: {source}")]
    Corrupt {
        key: Ulid,
        source: entry::DecodeError,
    },
    #[error("the write-ahead log is shut down")]
    Closed,
    #[error("starting the WAL writer thread: {0}")]
    Thread(String),
    #[error("compressing a WAL entry failed: {0}")]
    Compress(String),
    #[error("reading the flush watermarks: {0}")]
    Watermarks(String),
    /// The log's filesystem is full (or RocksDB's space limit is reached).
    #[error("the server's disk is full: the write-ahead log cannot take writes until space is freed; retry later")]
    DiskFull(rocksdb::Error),
    /// Any other failed log write; the detail goes to the server log.
    #[error("the write-ahead log refused the write (a storage error on the server); retry later")]
    Write(rocksdb::Error),
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        match self {
            // Nothing was acknowledged, and the request itself is fine: the
            // client should retry (OTLP exporters do on UNAVAILABLE).
            Self::Closed | Self::DiskFull(_) | Self::Write(_) => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }
}

impl Error {
    /// The error a failed log write answers with.
    fn write_failed(e: &rocksdb::Error) -> Self {
        let msg = e.to_string();
        // RocksDB's IOError subcodes kNoSpace and kSpaceLimit.
        if msg.contains("No space left on device") || msg.contains("Space limit reached") {
            Self::DiskFull(e.clone())
        } else {
            Self::Write(e.clone())
        }
    }
}

/// Whether log writes fail now: set by a failed group commit, cleared by the
/// next write that succeeds (a commit, or [`Wal::probe`]).
#[derive(Default)]
pub struct WriteHealth {
    failing: Mutex<Option<Failing>>,
}

struct Failing {
    since: Instant,
    /// What the clients are told ([`Error`]'s display).
    reason: String,
    /// Failed group commits since the last log line about them.
    unlogged: u64,
    logged_at: Instant,
    /// The last [`Wal::probe`] write.
    probed_at: Option<Instant>,
}

/// How often [`Wal::probe`] tries a write while writes fail.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How often a run of failed log writes is logged again.
const FAILING_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl WriteHealth {
    fn failed(&self, e: &rocksdb::Error, answer: &Error) {
        METRICS.wal_write_errors.inc();
        let mut failing = self.failing.lock();
        let now = Instant::now();
        match failing.as_mut() {
            None => {
                tracing::error!(error = %e, "WAL write failed; writes are refused until one succeeds");
                METRICS.wal_failing.set(1);
                *failing = Some(Failing {
                    since: now,
                    reason: answer.to_string(),
                    unlogged: 0,
                    logged_at: now,
                    probed_at: None,
                });
            }
            Some(f) => {
                f.unlogged += 1;
                if now.duration_since(f.logged_at) >= FAILING_LOG_EVERY {
                    tracing::error!(error = %e, failed_commits = f.unlogged, failing_for_s = now.duration_since(f.since).as_secs(), "WAL writes still failing");
                    f.unlogged = 0;
                    f.logged_at = now;
                }
            }
        }
    }

    fn succeeded(&self) {
        let mut failing = self.failing.lock();
        if let Some(f) = failing.take() {
            METRICS.wal_failing.set(0);
            tracing::info!(
                failed_for_ms = f.since.elapsed().as_millis() as u64,
                "WAL writes succeed again"
            );
        }
    }

    /// Why log writes fail, and for how long, while they do.
    pub fn failing(&self) -> Option<(String, std::time::Duration)> {
        let failing = self.failing.lock();
        failing
            .as_ref()
            .map(|f| (f.reason.clone(), f.since.elapsed()))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

type OnDurable = Box<dyn FnOnce(Ulid) + Send>;

struct Append {
    cf: &'static str,
    bytes: Vec<u8>,
    mark: Option<Mark>,
    on_durable: OnDurable,
    reply: oneshot::Sender<Result<Ulid>>,
}

/// A row written in the same atomic batch as an entry: `cf[key] = entry key ++ suffix`
/// (used for the DataRecord idempotency index, so a durable batch is always a
/// known batch).
pub struct Mark {
    pub cf: &'static str,
    pub key: Vec<u8>,
    pub suffix: Vec<u8>,
}

/// A group commit at least this slow is logged.
const SLOW_SYNC: std::time::Duration = std::time::Duration::from_millis(50);

/// The zstd level of entry payloads unless the server is told otherwise:
/// the fastest regular level, about 7x smaller for the load generator's
/// Junjo-like spans at ~670 MiB/s per core (BENCHMARKS.md, ninth round).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Payloads larger than this are compressed on the blocking pool: a 16 MiB
/// request would hold a runtime thread for 25 ms.
const INLINE_COMPRESS_BYTES: usize = 1 << 20;

pub struct Wal {
    db: Arc<DB>,
    health: Arc<WriteHealth>,
    zstd_level: i32,
    tx: Mutex<Option<mpsc::Sender<Append>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Wal {
    /// Opens (or creates) the RocksDB at `dir` and starts the writer thread.
    pub fn open(dir: &Path, max_group: usize) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // RocksDB keeps a log file until every column family with data in it
        // has flushed; the small metadata families would otherwise pin
        // gigabytes of logs at DataRecord rates. Past this size the families
        // holding the oldest log are flushed (more than one transient
        // memtable, so flushed-and-deleted entries still die in memory).
        opts.set_max_total_wal_size(512 << 20);
        // Reuse obsolete log files instead of deleting them and creating new
        // ones. Two costs leave the synced write path: an fdatasync into a
        // reused file has no new blocks or file size to journal, and no
        // 64 MiB log is unlinked. On ext4 every unlink joins the journal
        // commit that the next WAL fsync waits for, and with the `discard`
        // mount option that commit also trims the freed blocks: measured
        // here, each unlink held a WAL fsync for 10–30 ms, and the flush that
        // `max_total_wal_size` forces frees about eight logs at once. Eight
        // recycled logs absorb such a burst; they cost at most as much disk
        // as the live logs (BENCHMARKS.md, sixth round).
        opts.set_recycle_log_file_num(8);
        // RocksDB's own memtable flushes and compactions write SST and blob
        // files of tens of megabytes; written whole and synced at the end,
        // their dirty pages would hold up the next WAL fsync for as long as
        // the disk takes to write them (see `flush::lake`). Start writeback
        // every megabyte instead.
        opts.set_bytes_per_sync(1 << 20);
        let mut wal_opts = Options::default();
        wal_opts.set_write_buffer_size(64 << 20);
        wal_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Retained trace payloads go to blob files when RocksDB flushes its
        // memtable: compactions then move only keys and blob references, never
        // the payloads again. Retention drops whole files, so blob garbage
        // collection stays off.
        wal_opts.set_enable_blob_files(true);
        wal_opts.set_min_blob_size(4096);
        wal_opts.set_blob_file_size(256 << 20);
        // Payloads arrive compressed (see the module docs).
        wal_opts.set_blob_compression_type(rocksdb::DBCompressionType::None);
        wal_opts.set_enable_blob_gc(false);
        // A flush's range delete that lands in the same RocksDB memtable as
        // the entries it covers drops them before they are ever written to an
        // SST; a larger buffer makes that the common case at high rates.
        let mut transient_opts = Options::default();
        transient_opts.set_write_buffer_size(256 << 20);
        transient_opts.set_compression_type(rocksdb::DBCompressionType::None);
        let cfs = COLUMN_FAMILIES.iter().map(|name| {
            let o = match *name {
                CF_WAL => wal_opts.clone(),
                CF_WAL_TRANSIENT => transient_opts.clone(),
                _ => Options::default(),
            };
            ColumnFamilyDescriptor::new(*name, o)
        });
        let db = Arc::new(DB::open_cf_descriptors(&opts, dir, cfs)?);
        // Deleted entries took their keys with them; the watermarks and the
        // retention marker still bound them. A clock that went back (NTP
        // step, restored VM, data dir moved to another host) must not issue
        // keys at or below them: rows under a table's watermark count as
        // flushed and would be skipped.
        let floor = crate::flush::manifest::newest_watermark(&db)
            .map_err(|e| Error::Watermarks(e.to_string()))?;
        let deleted = deleted_through(&db)?;
        let last = last_key(&db)?
            .max(floor.unwrap_or_default())
            .max(deleted.unwrap_or_default());
        let (tx, rx) = mpsc::channel(max_group.max(64) * 4);
        let writer_db = db.clone();
        let health = Arc::new(WriteHealth::default());
        let writer_health = health.clone();
        let writer = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer_loop(writer_db, writer_health, rx, last, max_group))
            .map_err(|e| Error::Thread(e.to_string()))?;
        Ok(Self {
            db,
            health,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// The zstd level of payloads appended from now on; 0 stores them as they
    /// are. Entries already written keep their own encoding.
    pub fn set_zstd_level(&mut self, level: i32) {
        self.zstd_level = level;
    }

    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    /// Whether log writes fail now ([`WriteHealth`]).
    pub fn write_health(&self) -> &WriteHealth {
        &self.health
    }

    /// While log writes fail, tries a small synced write, at most once a
    /// second (RocksDB refuses every write after a hard error until it
    /// recovers, e.g. once space is freed), and clears the failure if it
    /// succeeds; does nothing otherwise. Lets `/health` and the gauge
    /// recover without traffic.
    pub fn probe(&self) {
        {
            let mut failing = self.health.failing.lock();
            let Some(f) = failing.as_mut() else {
                return;
            };
            if f.probed_at.is_some_and(|t| t.elapsed() < PROBE_EVERY) {
                return;
            }
            f.probed_at = Some(Instant::now());
        }
        // Synced, as a group commit is: an unsynced write can succeed while
        // synced ones still fail.
        let meta = self
            .db
            .cf_handle(CF_META)
            .expect("meta column family exists");
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        if self.db.put_cf_opt(&meta, WRITE_PROBE, [], &sync).is_ok() {
            self.health.succeeded();
        }
    }

    /// Appends one entry; returns its key once it is fsync'd and `on_durable`
    /// has run. If the process dies before the reply, the entry may or may not
    /// be in the log (it was never acknowledged).
    pub async fn append(
        &self,
        entry: &WalEntry,
        on_durable: impl FnOnce(Ulid) + Send + 'static,
    ) -> Result<Ulid> {
        self.append_marked(entry, None, on_durable).await
    }

    /// [`Wal::append`] that also writes `mark` atomically with the entry.
    pub async fn append_marked(
        &self,
        entry: &WalEntry,
        mark: Option<Mark>,
        on_durable: impl FnOnce(Ulid) + Send + 'static,
    ) -> Result<Ulid> {
        let level = self.zstd_level;
        let bytes = if level != 0 && entry.payload.len() > INLINE_COMPRESS_BYTES {
            let entry = entry.clone();
            match tokio::task::spawn_blocking(move || entry.encode_with(level)).await {
                Ok(bytes) => bytes,
                // The runtime is shutting down.
                Err(e) if e.is_cancelled() => return Err(Error::Closed),
                Err(e) => return Err(Error::Compress(e.to_string())),
            }
        } else {
            entry.encode_with(level)
        };
        // Taken only now: a sender held across the compression above would
        // keep `close` waiting for it.
        let tx = self.tx.lock().clone().ok_or(Error::Closed)?;
        let (reply, rx) = oneshot::channel();
        let req = Append {
            cf: entry_cf(entry.kind),
            bytes,
            mark,
            on_durable: Box::new(on_durable),
            reply,
        };
        tx.send(req).await.map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Entries of the retained log ([`CF_WAL`]: traces, and any kind written
    /// before the transient family existed) with keys strictly greater than
    /// `after` (all when `None`), in order. What `ReadSpans` reads.
    pub fn iter_after(
        &self,
        after: Option<Ulid>,
    ) -> impl Iterator<Item = Result<(Ulid, WalEntry)>> + '_ {
        self.iter_cf(CF_WAL, after, |_, _| true)
    }

    /// [`Wal::iter_after`] without the entries `keep(kind, tenant)` refuses,
    /// which are checked but never decompressed.
    pub fn iter_after_where<'a>(
        &'a self,
        after: Option<Ulid>,
        keep: impl Fn(PayloadKind, &str) -> bool + 'a,
    ) -> impl Iterator<Item = Result<(Ulid, WalEntry)>> + 'a {
        self.iter_cf(CF_WAL, after, keep)
    }

    /// Every entry of both families with a key strictly greater than `after`,
    /// in key order: what startup replays.
    pub fn replay_after(
        &self,
        after: Option<Ulid>,
    ) -> impl Iterator<Item = Result<(Ulid, WalEntry)>> + '_ {
        let mut kept = self.iter_cf(CF_WAL, after, |_, _| true).peekable();
        let mut transient = self
            .iter_cf(CF_WAL_TRANSIENT, after, |_, _| true)
            .peekable();
        std::iter::from_fn(move || {
            let from_kept = match (kept.peek(), transient.peek()) {
                (None, None) => return None,
                (Some(Ok((a, _))), Some(Ok((b, _)))) => a < b,
                // Errors surface as soon as they are seen.
                (Some(_), None) | (Some(Err(_)), _) => true,
                (None, Some(_)) | (_, Some(Err(_))) => false,
            };
            if from_kept {
                kept.next()
            } else {
                transient.next()
            }
        })
    }

    fn iter_cf<'a>(
        &'a self,
        cf: &str,
        after: Option<Ulid>,
        keep: impl Fn(PayloadKind, &str) -> bool + 'a,
    ) -> impl Iterator<Item = Result<(Ulid, WalEntry)>> + 'a {
        let cf = self.db.cf_handle(cf).expect("WAL column family exists");
        let start = after.map(|u| u.to_bytes()).unwrap_or([0; 16]);
        self.db
            .iterator_cf(&cf, IteratorMode::From(&start, Direction::Forward))
            .filter_map(move |item| {
                let (k, v) = match item {
                    Ok(kv) => kv,
                    Err(e) => return Some(Err(Error::Rocks(e))),
                };
                let key = key_from_bytes(&k)?;
                if Some(key) == after {
                    return None;
                }
                match WalEntry::decode_if(&v, &keep) {
                    Ok(entry) => Ok(entry.map(|e| (key, e))).transpose(),
                    Err(source) => Some(Err(Error::Corrupt { key, source })),
                }
            })
    }

    /// The oldest retained key, if any.
    pub fn first_key(&self) -> Result<Option<Ulid>> {
        let cf = self.db.cf_handle(CF_WAL).expect("wal column family exists");
        let first = self
            .db
            .iterator_cf(&cf, IteratorMode::Start)
            .next()
            .transpose()?;
        Ok(first.and_then(|(k, _)| key_from_bytes(&k)))
    }

    /// Deletes every entry with a key strictly below `bound`, remembering the
    /// newest deleted key for cursor readers ([`Wal::deleted_through`]).
    pub fn truncate_before(&self, bound: Ulid) -> Result<()> {
        let cf = self.db.cf_handle(CF_WAL).expect("wal column family exists");
        let newest_deleted = self
            .db
            .iterator_cf(
                &cf,
                IteratorMode::From(&bound.to_bytes(), Direction::Reverse),
            )
            .filter_map(|kv| kv.ok().and_then(|(k, _)| key_from_bytes(&k)))
            .find(|k| *k < bound);
        let Some(newest_deleted) = newest_deleted else {
            return Ok(());
        };
        let meta = self
            .db
            .cf_handle(CF_META)
            .expect("meta column family exists");
        self.db
            .put_cf(&meta, DELETED_THROUGH, newest_deleted.to_bytes())?;
        self.db.delete_range_cf(&cf, [0u8; 16], bound.to_bytes())?;
        Ok(())
    }

    /// Deletes every transient entry with a key strictly below `bound` (all of
    /// them are in published files), and the SST files wholly below it.
    pub fn drop_transient_before(&self, bound: Ulid) -> Result<()> {
        let cf = self
            .db
            .cf_handle(CF_WAL_TRANSIENT)
            .expect("transient WAL column family exists");
        self.db.delete_range_cf(&cf, [0u8; 16], bound.to_bytes())?;
        // RocksDB's DeleteFilesInRange includes its end key: a file whose
        // newest entry is `bound` itself (still unflushed) must stay.
        let Some(last) = bound.0.checked_sub(1) else {
            return Ok(());
        };
        self.db
            .delete_file_in_range_cf(&cf, [0u8; 16], last.to_be_bytes())?;
        Ok(())
    }

    /// Keeps entry `key` (its stored bytes, unchanged) in [`CF_REJECTED`]
    /// with `reason`, in a synced write, and with `remove` deletes it from
    /// the log in the same write. Replay calls it for an acknowledged entry
    /// it can no longer convert (a limit tightened by an upgrade, say) or
    /// decode: the flush watermark then passes it, but its bytes stay here
    /// for an operator to recover; removed, what reads the log (ReadSpans)
    /// no longer trips on one it cannot decode.
    /// Value: reason length (u32 big-endian), reason (UTF-8), entry bytes.
    pub fn set_aside(&self, key: Ulid, reason: &str, remove: bool) -> Result<()> {
        let mut found = None;
        for name in [CF_WAL, CF_WAL_TRANSIENT] {
            let cf = self.db.cf_handle(name).expect("WAL column family exists");
            if let Some(v) = self.db.get_cf(&cf, key.to_bytes())? {
                found = Some((cf, v));
                break;
            }
        }
        let Some((from, raw)) = found else {
            return Ok(());
        };
        let mut value = Vec::with_capacity(4 + reason.len() + raw.len());
        value.extend_from_slice(&(reason.len() as u32).to_be_bytes());
        value.extend_from_slice(reason.as_bytes());
        value.extend_from_slice(&raw);
        let cf = self
            .db
            .cf_handle(CF_REJECTED)
            .expect("rejected column family exists");
        let mut batch = WriteBatch::default();
        batch.put_cf(&cf, key.to_bytes(), value);
        if remove {
            batch.delete_cf(&from, key.to_bytes());
        }
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        self.db.write_opt(batch, &sync)?;
        Ok(())
    }

    /// The entries [`Wal::set_aside`] kept: key, reason, the entry as it
    /// was stored (it may not decode: a corrupt one is kept too).
    pub fn set_aside_entries(&self) -> Result<Vec<(Ulid, String, Vec<u8>)>> {
        let cf = self
            .db
            .cf_handle(CF_REJECTED)
            .expect("rejected column family exists");
        let mut out = Vec::new();
        for item in self.db.iterator_cf(&cf, IteratorMode::Start) {
            let (k, v) = item?;
            let Some(key) = key_from_bytes(&k) else {
                continue;
            };
            let corrupt = |source| Error::Corrupt { key, source };
            let len = v
                .get(..4)
                .map(|b| u32::from_be_bytes(b.try_into().unwrap()) as usize)
                .ok_or_else(|| corrupt(entry::DecodeError::Truncated(0)))?;
            let reason = v
                .get(4..4 + len)
                .ok_or_else(|| corrupt(entry::DecodeError::Truncated(4)))?;
            out.push((
                key,
                String::from_utf8_lossy(reason).into_owned(),
                v[4 + len..].to_vec(),
            ));
        }
        Ok(out)
    }

    /// The newest entry key ever deleted by retention, if any.
    pub fn deleted_through(&self) -> Result<Option<Ulid>> {
        deleted_through(&self.db)
    }

    /// Stops the writer after it has answered every queued append.
    pub fn close(&self) {
        self.tx.lock().take();
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
        let _ = self.db.flush_wal(true);
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

fn key_from_bytes(k: &[u8]) -> Option<Ulid> {
    let arr: [u8; 16] = k.try_into().ok()?;
    Some(Ulid::from_bytes(arr))
}

/// The column family an entry of `kind` is written to.
fn entry_cf(kind: PayloadKind) -> &'static str {
    match kind {
        PayloadKind::OtlpTraces => CF_WAL,
        PayloadKind::OtlpLogs | PayloadKind::OtlpMetrics | PayloadKind::DataRecordBatch => {
            CF_WAL_TRANSIENT
        }
    }
}

fn deleted_through(db: &DB) -> Result<Option<Ulid>> {
    let meta = db.cf_handle(CF_META).expect("meta column family exists");
    Ok(db
        .get_cf(&meta, DELETED_THROUGH)?
        .and_then(|v| key_from_bytes(&v)))
}

fn last_key(db: &DB) -> Result<Ulid> {
    let mut newest = Ulid::nil();
    // An entry set aside (and removed from the log) keeps its key too.
    for name in [CF_WAL, CF_WAL_TRANSIENT, CF_REJECTED] {
        let cf = db.cf_handle(name).expect("WAL column family exists");
        let last = db.iterator_cf(&cf, IteratorMode::End).next().transpose()?;
        if let Some(k) = last.and_then(|(k, _)| key_from_bytes(&k)) {
            newest = newest.max(k);
        }
    }
    Ok(newest)
}

/// Low bits of every entry key are zero; ReadSpans numbers the spans of an
/// entry in them (`key | index`), so each span has its own increasing key.
pub const SPAN_INDEX_BITS: u32 = 20;
pub const SPAN_INDEX_MASK: u128 = (1 << SPAN_INDEX_BITS) - 1;

/// The next key: a fresh ULID with the span-index bits cleared, or the next
/// free key after `last` when the clock has not moved on.
fn next_key(last: &mut Ulid) -> Ulid {
    let fresh = Ulid(Ulid::new().0 & !SPAN_INDEX_MASK);
    let key = if fresh > *last {
        fresh
    } else {
        Ulid((last.0 | SPAN_INDEX_MASK) + 1)
    };
    *last = key;
    key
}

/// The key [`Wal::probe`] writes (an empty value).
const WRITE_PROBE: &[u8] = b"write_probe";

fn writer_loop(
    db: Arc<DB>,
    health: Arc<WriteHealth>,
    mut rx: mpsc::Receiver<Append>,
    mut last: Ulid,
    max_group: usize,
) {
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < max_group {
            match rx.try_recv() {
                Ok(req) => group.push(req),
                Err(_) => break,
            }
        }
        let mut batch = WriteBatch::default();
        let mut keys = Vec::with_capacity(group.len());
        let mut bytes = 0;
        for req in &group {
            let key = next_key(&mut last);
            let cf = db.cf_handle(req.cf).expect("WAL column family exists");
            batch.put_cf(&cf, key.to_bytes(), &req.bytes);
            if let Some(m) = &req.mark {
                let mcf = db.cf_handle(m.cf).expect("mark column family exists");
                let mut value = key.to_bytes().to_vec();
                value.extend_from_slice(&m.suffix);
                batch.put_cf(&mcf, &m.key, value);
            }
            bytes += req.bytes.len();
            keys.push(key);
        }
        let started = Instant::now();
        let result = db.write_opt(batch, &sync);
        let took = started.elapsed();
        METRICS.wal_fsync_seconds.observe_duration(took);
        if took >= SLOW_SYNC {
            // Every acknowledgement in the group waited this long; worth a
            // line an operator can match against disk and flush activity.
            tracing::warn!(
                ms = took.as_millis() as u64,
                requests = group.len(),
                bytes,
                "slow WAL write"
            );
        }
        METRICS.wal_fsyncs.inc();
        METRICS.wal_group_size.observe(group.len() as f64);
        match result {
            Ok(()) => {
                health.succeeded();
                METRICS.wal_appends.add(group.len() as u64);
                METRICS.wal_bytes.add(bytes as u64);
                for (req, key) in group.into_iter().zip(keys) {
                    (req.on_durable)(key);
                    let _ = req.reply.send(Ok(key));
                }
            }
            Err(e) => {
                let answer = Error::write_failed(&e);
                health.failed(&e, &answer);
                for req in group {
                    let _ = req.reply.send(Err(Error::write_failed(&e)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use prost::Message;

    fn entry(i: u32) -> WalEntry {
        WalEntry {
            kind: PayloadKind::OtlpTraces,
            tenant: "t".into(),
            endpoint: "spans".into(),
            payload: Bytes::from(i.to_be_bytes().to_vec()),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_are_ordered_durable_and_replayable() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open(dir.path(), 64).unwrap());
        let applied = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let (wal, applied) = (wal.clone(), applied.clone());
            tasks.push(tokio::spawn(async move {
                wal.append(&entry(i), move |k| applied.lock().push(k))
                    .await
                    .unwrap()
            }));
        }
        let mut keys = Vec::new();
        for t in tasks {
            keys.push(t.await.unwrap());
        }
        // Callbacks ran in key order.
        let applied = applied.lock().clone();
        let mut sorted = applied.clone();
        sorted.sort();
        assert_eq!(applied, sorted);
        assert_eq!(applied.len(), 200);
        wal.close();
        drop(wal);

        let wal = Wal::open(dir.path(), 64).unwrap();
        let replayed: Vec<_> = wal.iter_after(None).map(|r| r.unwrap().0).collect();
        keys.sort();
        assert_eq!(replayed, keys);
        // Keys after a restart stay above the old ones.
        let k = wal.append(&entry(999), |_| {}).await.unwrap();
        assert!(k > *keys.last().unwrap());
        let after: Vec<_> = wal
            .iter_after(Some(keys[99]))
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(after.len(), 101);
        assert_eq!(wal.deleted_through().unwrap(), None);
        wal.truncate_before(keys[150]).unwrap();
        assert_eq!(wal.deleted_through().unwrap(), Some(keys[149]));
        assert_eq!(wal.first_key().unwrap(), Some(keys[150]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn payloads_are_stored_at_the_configured_level_and_all_replay() {
        let dir = tempfile::tempdir().unwrap();
        let text = crate::loadgen::junjo_request(3, 200, 64).encode_to_vec();
        // Large enough for the blocking pool's path (over INLINE_COMPRESS_BYTES).
        let large = crate::loadgen::junjo_request(4, 3000, 64).encode_to_vec();
        assert!(large.len() > INLINE_COMPRESS_BYTES);
        let big = |payload: &[u8]| WalEntry {
            payload: Bytes::copy_from_slice(payload),
            ..entry(0)
        };
        let mut wal = Wal::open(dir.path(), 64).unwrap();
        let packed = wal.append(&big(&text), |_| {}).await.unwrap();
        wal.set_zstd_level(0);
        let plain = wal.append(&big(&text), |_| {}).await.unwrap();
        wal.set_zstd_level(-5);
        let fast = wal.append(&big(&text), |_| {}).await.unwrap();
        wal.set_zstd_level(DEFAULT_ZSTD_LEVEL);
        let pooled = wal.append(&big(&large), |_| {}).await.unwrap();
        wal.close();
        drop(wal);

        let wal = Wal::open(dir.path(), 64).unwrap();
        let cf = wal.db().cf_handle(CF_WAL).unwrap();
        let stored = |k: Ulid| wal.db().get_cf(&cf, k.to_bytes()).unwrap().unwrap().len();
        assert!(
            stored(packed) * 4 < text.len(),
            "{} of {}",
            stored(packed),
            text.len()
        );
        assert!(
            stored(fast) * 3 < text.len(),
            "{} of {}",
            stored(fast),
            text.len()
        );
        assert!(stored(plain) > text.len());
        assert!(
            stored(pooled) * 4 < large.len(),
            "{} of {}",
            stored(pooled),
            large.len()
        );
        let replayed: Vec<_> = wal.replay_after(None).map(|r| r.unwrap()).collect();
        assert_eq!(
            replayed.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            [packed, plain, fast, pooled]
        );
        assert!(replayed[..3].iter().all(|(_, e)| e.payload == text));
        assert_eq!(replayed[3].1.payload, large);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn non_trace_entries_are_transient_and_replay_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), 64).unwrap();
        let kinds = [
            PayloadKind::OtlpTraces,
            PayloadKind::DataRecordBatch,
            PayloadKind::OtlpLogs,
            PayloadKind::OtlpTraces,
            PayloadKind::OtlpMetrics,
        ];
        let mut keys = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            let e = WalEntry {
                kind: *kind,
                ..entry(i as u32)
            };
            keys.push(wal.append(&e, |_| {}).await.unwrap());
        }
        let all: Vec<_> = wal.replay_after(None).map(|r| r.unwrap()).collect();
        assert_eq!(all.iter().map(|(k, _)| *k).collect::<Vec<_>>(), keys);
        assert_eq!(all.iter().map(|(_, e)| e.kind).collect::<Vec<_>>(), kinds);
        // The retained log holds the traces only.
        let kept: Vec<_> = wal.iter_after(None).map(|r| r.unwrap().0).collect();
        assert_eq!(kept, vec![keys[0], keys[3]]);
        // Dropping flushed transient entries leaves the traces alone.
        wal.drop_transient_before(keys[4]).unwrap();
        let left: Vec<_> = wal.replay_after(None).map(|r| r.unwrap().0).collect();
        assert_eq!(left, vec![keys[0], keys[3], keys[4]]);
        let after: Vec<_> = wal
            .replay_after(Some(keys[3]))
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(after, vec![keys[4]]);
        // The newest key of either family bounds the next one after a restart.
        wal.close();
        drop(wal);
        let wal = Wal::open(dir.path(), 64).unwrap();
        assert!(wal.append(&entry(9), |_| {}).await.unwrap() > keys[4]);
    }

    /// Entries deleted after their flush leave no key behind; a restart with
    /// a clock that went back must still issue keys above the watermarks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_after_a_restart_are_above_the_watermarks_and_retention_marker() {
        let dir = tempfile::tempdir().unwrap();
        let day_ahead = |days: u64| Ulid::from_parts(crate::flush::now_ms() + days * 86_400_000, 0);
        for (name, key) in [
            (b"wm/default/orders".as_slice(), day_ahead(1)),
            (b"flushed_through".as_slice(), day_ahead(2)),
            (DELETED_THROUGH, day_ahead(3)),
        ] {
            let wal = Wal::open(dir.path(), 64).unwrap();
            let meta = wal.db().cf_handle(CF_META).unwrap();
            wal.db().put_cf(&meta, name, key.to_bytes()).unwrap();
            wal.close();
            drop(wal);
            let wal = Wal::open(dir.path(), 64).unwrap();
            let next = wal.append(&entry(1), |_| {}).await.unwrap();
            assert!(
                next > key,
                "{}: {next} not above {key}",
                String::from_utf8_lossy(name)
            );
        }
    }

    /// RocksDB's file deletion includes its end key; a compacted file whose
    /// newest entry is the oldest unflushed one must survive the drop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_flushed_transient_entries_keeps_a_file_ending_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), 64).unwrap();
        let mut keys = Vec::new();
        for i in 0..3 {
            let e = WalEntry {
                kind: PayloadKind::DataRecordBatch,
                ..entry(i)
            };
            keys.push(wal.append(&e, |_| {}).await.unwrap());
        }
        // One SST below L0 (the level file deletion works on) holding all three.
        let cf = wal.db().cf_handle(CF_WAL_TRANSIENT).unwrap();
        wal.db().flush_cf(&cf).unwrap();
        wal.db().compact_range_cf(&cf, None::<&[u8]>, None::<&[u8]>);
        // keys[2] is the oldest entry whose rows are not in a published file.
        wal.drop_transient_before(keys[2]).unwrap();
        let left: Vec<_> = wal.replay_after(None).map(|r| r.unwrap().0).collect();
        assert_eq!(left, vec![keys[2]]);
    }

    /// A reused log file still holds older records behind the new ones.
    /// Replay must stop at the end of the new records: an old record read
    /// back would bring a deleted entry back to life.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_in_reused_log_files_replay_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), 64).unwrap();
        let mut kept = Vec::new();
        let mut i = 0u32;
        for round in 0..5 {
            // Earlier rounds fill each log with far more bytes than the last
            // round writes into its reused file, then delete their entries.
            let last = round == 4;
            let (n, size) = if last { (3, 100) } else { (40, 32 << 10) };
            for _ in 0..n {
                let mut payload = vec![(i % 251) as u8; size];
                payload[..4].copy_from_slice(&i.to_be_bytes());
                let e = WalEntry {
                    payload: Bytes::from(payload),
                    ..entry(i)
                };
                let key = wal.append(&e, |_| {}).await.unwrap();
                if last {
                    kept.push((key, e.payload));
                } else {
                    wal.truncate_before(Ulid(key.0 + 1)).unwrap();
                }
                i += 1;
            }
            if !last {
                // Flushing every family switches to a new log and makes the
                // old one obsolete, ready for reuse.
                for name in COLUMN_FAMILIES {
                    let cf = wal.db().cf_handle(name).unwrap();
                    wal.db().flush_cf(&cf).unwrap();
                }
            }
        }
        let log = std::fs::read_to_string(dir.path().join("LOG")).unwrap();
        assert!(
            log.contains("reusing log"),
            "the test must write into a reused log file"
        );
        wal.close();
        drop(wal);
        let wal = Wal::open(dir.path(), 64).unwrap();
        let replayed: Vec<_> = wal
            .replay_after(None)
            .map(|r| {
                let (key, e) = r.unwrap();
                (key, e.payload)
            })
            .collect();
        assert_eq!(replayed.len(), kept.len(), "deleted entries came back");
        assert!(replayed == kept, "replay differs from what was written");
    }

    #[test]
    fn next_key_is_monotonic_when_clock_stalls() {
        let mut last = Ulid::from_parts(u64::MAX >> 16, 5);
        let k = next_key(&mut last);
        assert!(k > Ulid::from_parts(u64::MAX >> 16, 5));
        assert_eq!(k.0 & SPAN_INDEX_MASK, 0);
        let k2 = next_key(&mut last);
        assert_eq!(k2.0 - k.0, 1 << SPAN_INDEX_BITS);
    }
}
