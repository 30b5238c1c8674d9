//! The manifest: which Parquet files are published, and the flush watermarks.
//!
//! Stored in the WAL's RocksDB so one `WriteBatch` can record files and move
//! watermarks atomically (publish-then-record: the file is durable first).
//!
//! Layout:
//! - `manifest` CF, key `"{tenant}/{endpoint}/{file_id}"`, value: version byte
//!   `1` followed by the JSON of [`FileMeta`].
//! - `meta` CF, key `"wm/{tenant}/{endpoint}"`: 16-byte ULID, every WAL entry at
//!   or below it is in that table's published files.
//! - `meta` CF, key `"flushed_through"`: 16-byte ULID, every WAL entry at or
//!   below it is fully flushed (replay starts above it).
//!
//! Tenant and endpoint names never contain `/` (see `ingest::names`).

use std::collections::HashMap;

use rocksdb::{WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use ulid::Ulid;

use crate::memtable::TableId;
use crate::wal::{CF_MANIFEST, CF_META};

const MANIFEST_VERSION: u8 = 1;
const FLUSHED_THROUGH: &[u8] = b"flushed_through";

/// One published Parquet file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileMeta {
    /// Unique id (ULID), also in the file name.
    pub id: String,
    pub tenant: String,
    pub endpoint: String,
    /// Path relative to the lake root.
    pub path: String,
    pub date: String,
    pub hour: u8,
    pub rows: u64,
    pub bytes: u64,
    /// Smallest and largest partition-time value in the file (ns since epoch, UTC).
    pub min_time_ns: i64,
    pub max_time_ns: i64,
    /// WAL key range of the rows (ULID strings).
    pub min_seq: String,
    pub max_seq: String,
    pub created_at_ms: u64,
    /// Distinct `service_name` values in the file (tables that have the
    /// column); None in files recorded before this field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_names: Option<Vec<String>>,
    /// The rows' size decoded (what compaction cuts its groups at); None
    /// in files recorded before this field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoded_bytes: Option<u64>,
}

impl FileMeta {
    /// A one-row file `id` of tenant `t`'s spans in hour `hour` of `date`
    /// (unit tests).
    #[cfg(test)]
    pub fn sample(id: &str, date: &str, hour: u8) -> Self {
        Self {
            id: id.into(),
            tenant: "t".into(),
            endpoint: "spans".into(),
            path: format!("tenant=t/endpoint=spans/date={date}/hour={hour:02}/part-{id}-n.parquet"),
            date: date.into(),
            hour,
            rows: 1,
            bytes: 1,
            min_time_ns: 0,
            max_time_ns: 0,
            min_seq: String::new(),
            max_seq: String::new(),
            created_at_ms: 0,
            service_names: None,
            decoded_bytes: None,
        }
    }

    pub fn table(&self) -> TableId {
        TableId::new(&self.tenant, &self.endpoint)
    }

    /// End of the file's hour partition, in ms since the epoch (None: a
    /// date that does not parse, which no file we write has).
    pub fn hour_end_ms(&self) -> Option<u64> {
        hour_end_ms(&self.date, self.hour)
    }
}

/// End of the hour partition `date=…/hour=…`, in ms since the epoch.
pub fn hour_end_ms(date: &str, hour: u8) -> Option<u64> {
    let date = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
    let midnight = date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis();
    let end = midnight + (i64::from(hour) + 1) * 3_600_000;
    u64::try_from(end).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("manifest storage: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("manifest entry {key:?} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// A failure injected by a unit test.
    #[cfg(test)]
    #[error("injected failure")]
    Injected,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn table_key(table: &TableId) -> String {
    format!("wm/{}/{}", table.tenant, table.endpoint)
}

/// Records published files, the table's watermark and the global watermark in
/// one synced write batch.
pub fn record(
    db: &DB,
    files: &[FileMeta],
    table: &TableId,
    table_wm: Ulid,
    flushed_through: Ulid,
) -> Result<()> {
    let manifest = db
        .cf_handle(CF_MANIFEST)
        .expect("manifest column family exists");
    let meta = db.cf_handle(CF_META).expect("meta column family exists");
    let mut batch = WriteBatch::default();
    for f in files {
        batch.put_cf(&manifest, key(f), value(f));
    }
    batch.put_cf(&meta, table_key(table), table_wm.to_bytes());
    batch.put_cf(&meta, FLUSHED_THROUGH, flushed_through.to_bytes());
    write_synced(db, batch)
}

/// Records `merged` and forgets the files it was merged from, in one synced
/// write batch (watermarks do not move: the rows are the same).
pub fn replace(db: &DB, merged: &FileMeta, old: &[std::sync::Arc<FileMeta>]) -> Result<()> {
    change(db, Some(merged), old)
}

/// Forgets files (lake retention), in one synced write batch; watermarks
/// do not move: the rows are gone for good, not to be flushed again.
pub fn forget(db: &DB, files: &[std::sync::Arc<FileMeta>]) -> Result<()> {
    change(db, None, files)
}

/// Records `add` (if any) and forgets `remove`, in one synced write batch.
fn change(db: &DB, add: Option<&FileMeta>, remove: &[std::sync::Arc<FileMeta>]) -> Result<()> {
    let manifest = db
        .cf_handle(CF_MANIFEST)
        .expect("manifest column family exists");
    let mut batch = WriteBatch::default();
    if let Some(f) = add {
        batch.put_cf(&manifest, key(f), value(f));
    }
    for f in remove {
        batch.delete_cf(&manifest, key(f));
    }
    write_synced(db, batch)
}

/// A manifest record: the version byte, then the JSON of `f`.
fn value(f: &FileMeta) -> Vec<u8> {
    let mut value = vec![MANIFEST_VERSION];
    value.extend(serde_json::to_vec(f).expect("FileMeta serializes"));
    value
}

/// Writes `batch` and syncs RocksDB's log before returning.
fn write_synced(db: &DB, batch: WriteBatch) -> Result<()> {
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    db.write_opt(batch, &sync)?;
    Ok(())
}

fn key(f: &FileMeta) -> String {
    format!("{}/{}/{}", f.tenant, f.endpoint, f.id)
}

/// What startup needs: files per table, table watermarks, the global watermark.
#[derive(Debug, Default)]
pub struct Loaded {
    pub files: HashMap<TableId, Vec<FileMeta>>,
    pub watermarks: HashMap<TableId, Ulid>,
    pub flushed_through: Option<Ulid>,
}

pub fn load(db: &DB) -> Result<Loaded> {
    let manifest = db
        .cf_handle(CF_MANIFEST)
        .expect("manifest column family exists");
    let mut out = Loaded::default();
    for item in db.iterator_cf(&manifest, rocksdb::IteratorMode::Start) {
        let (k, v) = item?;
        let key = String::from_utf8_lossy(&k).into_owned();
        let corrupt = |reason: String| Error::Corrupt {
            key: key.clone(),
            reason,
        };
        if v.first() != Some(&MANIFEST_VERSION) {
            return Err(corrupt(format!("unknown version {:?}", v.first())));
        }
        let f: FileMeta = serde_json::from_slice(&v[1..]).map_err(|e| corrupt(e.to_string()))?;
        out.files.entry(f.table()).or_default().push(f);
    }
    (out.watermarks, out.flushed_through) = load_watermarks(db)?;
    Ok(out)
}

/// The table watermarks and the global one.
fn load_watermarks(db: &DB) -> Result<(HashMap<TableId, Ulid>, Option<Ulid>)> {
    let meta = db.cf_handle(CF_META).expect("meta column family exists");
    let mut watermarks = HashMap::new();
    for item in db.prefix_iterator_cf(&meta, b"wm/") {
        let (k, v) = item?;
        let Some(rest) = k.strip_prefix(b"wm/") else {
            break;
        };
        let key = String::from_utf8_lossy(rest).into_owned();
        let (tenant, endpoint) = key.split_once('/').ok_or_else(|| Error::Corrupt {
            key: key.clone(),
            reason: "watermark key without endpoint".into(),
        })?;
        watermarks.insert(TableId::new(tenant, endpoint), ulid_from(&key, &v)?);
    }
    let flushed_through = match db.get_cf(&meta, FLUSHED_THROUGH)? {
        Some(v) => Some(ulid_from("flushed_through", &v)?),
        None => None,
    };
    Ok((watermarks, flushed_through))
}

/// The newest watermark recorded (`flushed_through` and every table's): WAL
/// keys issued after a restart must be above it, whatever the clock says,
/// or their rows would count as flushed already.
pub fn newest_watermark(db: &DB) -> Result<Option<Ulid>> {
    let (tables, global) = load_watermarks(db)?;
    Ok(tables.into_values().chain(global).max())
}

fn ulid_from(key: &str, v: &[u8]) -> Result<Ulid> {
    let arr: [u8; 16] = v.try_into().map_err(|_| Error::Corrupt {
        key: key.to_string(),
        reason: format!("watermark has {} bytes, expected 16", v.len()),
    })?;
    Ok(Ulid::from_bytes(arr))
}
