//! Lake snapshots for readers outside the server (DuckDB, Polars, Spark).
//!
//! A reader that globs the lake races compaction and retention: between its
//! listing and its reads, a merged file may appear next to its inputs (rows
//! twice) or an input may be deleted (the scan fails). A snapshot is the
//! exact file list of one table at one instant, the one our own queries read:
//! every row published is in exactly one of its files. A *lease* keeps those
//! files in the lake for its time even when compaction or retention forgets
//! them, the way a running query of ours does: the lease holds the same
//! `Arc<FileMeta>`s, and [`super::Flusher::reap`] deletes a file only once
//! nothing else holds it.
//!
//! Leases live in memory: a restart ends them (startup deletes files the
//! manifest no longer lists). A tenant holds at most [`MAX_PER_TENANT`]
//! leases of at most [`MAX_LEASE`] each, so a client that never releases
//! them keeps at most that many stale copies of its own files, for an hour.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use super::manifest::FileMeta;
use super::Flusher;
use crate::error::{Classify, ErrorKind};
use crate::memtable::TableId;
use crate::metrics::METRICS;

/// Longest lease a snapshot may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
/// Leases one tenant may hold at once.
pub const MAX_PER_TENANT: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("a lease is at most {max}s; asked for {0}s", max = MAX_LEASE.as_secs())]
    TooLong(u64),
    #[error("this tenant holds {MAX_PER_TENANT} snapshot leases already; release one (DELETE /api/v1/lake/snapshot/{{id}}) or wait for one to end")]
    TooMany,
}

impl Classify for Error {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::TooLong(_) => ErrorKind::InvalidInput,
            // Retrying will not help until the caller releases one.
            Self::TooMany => ErrorKind::LimitExceeded,
        }
    }
}

/// One table's published files at one instant.
#[derive(Debug)]
pub struct LakeSnapshot {
    /// Sorted by partition, then path.
    pub files: Vec<Arc<FileMeta>>,
    /// Rows of the table still in memtables: in no file yet.
    pub unflushed_rows: u64,
    /// The lease's id and end, when one was asked for.
    pub lease: Option<(String, SystemTime)>,
}

impl Flusher {
    /// The files of `table` now, kept in the lake for `lease` (none when
    /// zero); see the module doc.
    pub fn lake_snapshot(&self, table: &TableId, lease: Duration) -> Result<LakeSnapshot, Error> {
        let snap = self.catalog.snapshot(table);
        let mut files = snap.files;
        files.sort_by(|a, b| (&a.date, a.hour, &a.path).cmp(&(&b.date, b.hour, &b.path)));
        let unflushed_rows = snap.batches.iter().map(|b| b.num_rows() as u64).sum();
        let lease = match lease.is_zero() {
            true => None,
            false => {
                Some(
                    self.leases
                        .grant(&table.tenant, &table.endpoint, files.clone(), lease)?,
                )
            }
        };
        Ok(LakeSnapshot {
            files,
            unflushed_rows,
            lease,
        })
    }

    /// The table of `tenant`'s lease `id`, while it lasts.
    pub fn lease_table(&self, tenant: &str, id: &str) -> Option<String> {
        self.leases.table_of(tenant, id)
    }

    /// Ends `tenant`'s lease `id`; its files go at the next reap if
    /// compaction or retention let go of them.
    pub fn release_lease(&self, tenant: &str, id: &str) -> bool {
        self.leases.release(tenant, id)
    }
}

struct Lease {
    tenant: String,
    table: String,
    until: Instant,
    /// Held only so that reap leaves them alone.
    _files: Vec<Arc<FileMeta>>,
}

#[derive(Default)]
pub struct Leases {
    by_id: Mutex<HashMap<String, Lease>>,
}

impl Leases {
    /// Keeps `files` of `tenant`'s `table` in the lake for `time`; the lease's id and
    /// when it ends. Ended leases are dropped first.
    pub fn grant(
        &self,
        tenant: &str,
        table: &str,
        files: Vec<Arc<FileMeta>>,
        time: Duration,
    ) -> Result<(String, SystemTime), Error> {
        if time > MAX_LEASE {
            return Err(Error::TooLong(time.as_secs()));
        }
        let now = Instant::now();
        let mut by_id = self.by_id.lock();
        by_id.retain(|_, l| l.until > now);
        METRICS.lake_leases.set(by_id.len() as i64);
        if by_id.values().filter(|l| l.tenant == tenant).count() >= MAX_PER_TENANT {
            return Err(Error::TooMany);
        }
        let id = ulid::Ulid::new().to_string();
        let lease = Lease {
            tenant: tenant.to_string(),
            table: table.to_string(),
            until: now + time,
            _files: files,
        };
        by_id.insert(id.clone(), lease);
        METRICS.lake_leases.set(by_id.len() as i64);
        Ok((id, SystemTime::now() + time))
    }

    /// The table of `tenant`'s lease `id`, while it lasts (none for another
    /// tenant's).
    pub fn table_of(&self, tenant: &str, id: &str) -> Option<String> {
        let by_id = self.by_id.lock();
        let now = Instant::now();
        let lease = by_id.get(id)?;
        (lease.tenant == tenant && lease.until > now).then(|| lease.table.clone())
    }

    /// Ends `tenant`'s lease `id` now; false when it has none by that id
    /// (never granted, ended, or another tenant's).
    pub fn release(&self, tenant: &str, id: &str) -> bool {
        let mut by_id = self.by_id.lock();
        let now = Instant::now();
        let released = match by_id.get(id) {
            Some(l) if l.tenant == tenant => by_id.remove(id).is_some_and(|l| l.until > now),
            _ => false,
        };
        METRICS.lake_leases.set(by_id.len() as i64);
        released
    }

    /// Drops the leases that ended (every flush check, and before a reap).
    pub fn drop_ended(&self) {
        let now = Instant::now();
        let mut by_id = self.by_id.lock();
        by_id.retain(|_, l| l.until > now);
        METRICS.lake_leases.set(by_id.len() as i64);
    }

    /// Leases held, ended ones included until the next [`Leases::drop_ended`].
    pub fn len(&self) -> usize {
        self.by_id.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> Arc<FileMeta> {
        Arc::new(FileMeta::sample("f", "2026-11-24", 1))
    }

    #[test]
    fn leases_hold_files_until_released_or_ended_and_are_bounded_per_tenant() {
        let leases = Leases::default();
        let f = file();
        let (id, _) = leases
            .grant("a", "spans", vec![f.clone()], MAX_LEASE)
            .unwrap();
        assert_eq!(Arc::strong_count(&f), 2);
        // Another tenant cannot see or release it.
        assert_eq!(leases.table_of("a", &id).as_deref(), Some("spans"));
        assert_eq!(leases.table_of("b", &id), None);
        assert!(!leases.release("b", &id));
        assert_eq!(Arc::strong_count(&f), 2);
        assert!(leases.release("a", &id));
        assert!(!leases.release("a", &id));
        assert_eq!(Arc::strong_count(&f), 1);

        assert_eq!(
            leases.grant("a", "spans", vec![], MAX_LEASE + Duration::from_secs(1)),
            Err(Error::TooLong(3601))
        );
        for _ in 0..MAX_PER_TENANT {
            leases.grant("a", "spans", vec![], MAX_LEASE).unwrap();
        }
        assert_eq!(
            leases.grant("a", "spans", vec![], MAX_LEASE),
            Err(Error::TooMany)
        );
        // Other tenants are not limited by it.
        leases.grant("b", "spans", vec![], MAX_LEASE).unwrap();

        // An ended lease lets its files go.
        let short = Leases::default();
        short
            .grant("a", "spans", vec![f.clone()], Duration::ZERO)
            .unwrap();
        assert_eq!(Arc::strong_count(&f), 2);
        assert_eq!(short.table_of("a", "nope"), None);
        short.drop_ended();
        assert_eq!(Arc::strong_count(&f), 1);
        assert!(short.is_empty());
    }
}
