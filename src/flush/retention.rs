//! Lake retention: published files of hours long past are deleted.
//!
//! A table's files expire whole partitions at a time: every file of an hour
//! partition (`date=…/hour=…`, the rows' own times) goes once that hour has
//! ended longer ago than the endpoint's retention (`--lake-retention`,
//! `--lake-retention-endpoint`). Every `--lake-retention-interval` (a
//! minute), and on `POST /api/v1/admin/retention`:
//!
//! forget the expired files in the manifest (one synced batch) → drop them
//! from the catalog, atomically for queries → delete them once no running
//! query's snapshot lists them ([`Flusher::reap`], shared with compaction)
//! → remove the partition directories left empty (local lakes). A crash
//! after the manifest batch leaves the files unrecorded, and startup's
//! reconcile deletes them. Passes take the compaction lock, so a partition
//! is never merged and expired at once.
//!
//! A dry run (`{"dry_run": true}`, optionally with a `"retention"` for every
//! table) does none of this: it reports the partitions a pass would delete.
//!
//! Rows still in a memtable are not touched (queries see them) until their
//! flush, which writes no file for an hour already expired: rows that
//! arrive late for one are counted as expired and go with the memtable. WAL
//! retention (`--wal-retention`) is separate: it keeps WAL entries for
//! cursor readers, not files.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::manifest::{self, FileMeta};
use super::{now_ms, Error, Flusher, Result};
use crate::config::Retention;
use crate::memtable::TableId;
use crate::metrics::METRICS;

/// What one retention pass deleted (or, a dry run, would delete).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Expired {
    /// Files forgotten (deleted from the lake as soon as no query reads them).
    pub files: usize,
    /// Hour partitions they were in.
    pub partitions: usize,
    pub rows: u64,
    pub bytes: u64,
    /// Nothing was deleted: what a pass would have done.
    pub dry_run: bool,
    /// Each partition, oldest first per table: the first [`LISTED_HOURS`].
    pub hours: Vec<ExpiredHour>,
    /// Partitions past those listed.
    pub hours_not_listed: usize,
}

/// Partitions an answer lists at most (a first pass over a year of a
/// thousand tables has millions).
pub const LISTED_HOURS: usize = 1000;

/// One expired hour partition of one table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExpiredHour {
    pub tenant: String,
    pub table: String,
    pub date: String,
    pub hour: u8,
    pub files: usize,
    pub rows: u64,
    pub bytes: u64,
}

impl Expired {
    /// Counts `gone`, files of `table`.
    fn add(&mut self, table: &TableId, gone: &[Arc<FileMeta>]) {
        let mut hours: BTreeMap<(&str, u8), ExpiredHour> = BTreeMap::new();
        for f in gone {
            let h = hours
                .entry((&f.date, f.hour))
                .or_insert_with(|| ExpiredHour {
                    tenant: table.tenant.to_string(),
                    table: table.endpoint.to_string(),
                    date: f.date.clone(),
                    hour: f.hour,
                    files: 0,
                    rows: 0,
                    bytes: 0,
                });
            h.files += 1;
            h.rows += f.rows;
            h.bytes += f.bytes;
        }
        self.files += gone.len();
        self.partitions += hours.len();
        self.rows += gone.iter().map(|f| f.rows).sum::<u64>();
        self.bytes += gone.iter().map(|f| f.bytes).sum::<u64>();
        let room = LISTED_HOURS.saturating_sub(self.hours.len());
        self.hours_not_listed += hours.len().saturating_sub(room);
        self.hours.extend(hours.into_values().take(room));
    }
}

/// Whether `f`'s hour ended at or before `now_ms - keep`.
fn is_expired(f: &FileMeta, now_ms: u64, keep: Duration) -> bool {
    hour_expired(&f.date, f.hour, now_ms, keep)
}

/// Whether the hour `date`, `hour` ended at or before `now_ms - keep`.
pub fn hour_expired(date: &str, hour: u8, now_ms: u64, keep: Duration) -> bool {
    let keep = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
    let horizon = now_ms.saturating_sub(keep);
    manifest::hour_end_ms(date, hour).is_some_and(|end| end <= horizon)
}

/// The files whose hour ended at or before `now_ms - keep`.
pub fn expired(files: &[Arc<FileMeta>], now_ms: u64, keep: Duration) -> Vec<Arc<FileMeta>> {
    files
        .iter()
        .filter(|f| is_expired(f, now_ms, keep))
        .cloned()
        .collect()
}

impl Flusher {
    /// Deletes the expired files of every table (of `tenant`'s when given);
    /// see the module contract. A table whose manifest write fails ends the
    /// pass with that error (its files stay listed and are tried again).
    /// With `dry_run`, deletes nothing and reports what a pass with that
    /// retention would delete.
    pub async fn expire(
        &self,
        tenant: Option<&str>,
        dry_run: Option<&Retention>,
    ) -> Result<Expired> {
        // A dry run changes nothing: it need not wait for a pass.
        let _one = match dry_run {
            None => Some(self.compact_lock.lock().await),
            Some(_) => None,
        };
        if dry_run.is_none() {
            // A merge whose record failed holds its inputs until it is
            // recorded or dropped: retried here too, for a server that runs
            // no compaction passes (--compact-interval 0).
            if let Err(e) = self.retry_merge().await {
                METRICS.flush_errors.inc();
                tracing::error!(error = %e, "a failed merge record failed again; retention goes on");
            }
        }
        let retention = dry_run.unwrap_or(&self.cfg.retention);
        let mut done = Expired {
            dry_run: dry_run.is_some(),
            ..Expired::default()
        };
        let now = now_ms();
        for (table, files) in self.published_of(tenant) {
            // (A dry run changes nothing: it need not stop for shutdown.)
            if dry_run.is_none() && self.stop.is_cancelled() {
                break;
            }
            let Some(keep) = retention.of(&table.endpoint) else {
                continue;
            };
            let gone = expired(&files, now, keep);
            if gone.is_empty() {
                continue;
            }
            if dry_run.is_some() {
                done.add(&table, &gone);
                continue;
            }
            manifest::forget(self.wal.db(), &gone).map_err(|source| Error::Forget {
                table: table.clone(),
                source,
            })?;
            self.catalog.remove_files(&table, &gone);
            let before = (done.files, done.partitions, done.rows, done.bytes);
            done.add(&table, &gone);
            tracing::info!(
                %table,
                files = done.files - before.0,
                partitions = done.partitions - before.1,
                rows = done.rows - before.2,
                bytes = done.bytes - before.3,
                "expired files past retention"
            );
            METRICS.expired_files.add(gone.len() as u64);
            METRICS.expired_rows.add(done.rows - before.2);
            self.bury(gone);
        }
        if dry_run.is_none() {
            self.reap().await;
        }
        Ok(done)
    }

    /// The configured lake retention.
    pub fn retention(&self) -> &Retention {
        &self.cfg.retention
    }

    /// `files` of `table` without those past its retention.
    pub(super) fn unexpired(
        &self,
        table: &crate::memtable::TableId,
        files: Vec<Arc<FileMeta>>,
    ) -> Vec<Arc<FileMeta>> {
        match self.cfg.retention.of(&table.endpoint) {
            Some(keep) => {
                let now = now_ms();
                files
                    .into_iter()
                    .filter(|f| !is_expired(f, now, keep))
                    .collect()
            }
            None => files,
        }
    }

    /// Background loop: a retention pass every `retention_interval` until
    /// stopped (not started without retention).
    pub async fn run_retention(self: Arc<Self>) {
        let me = self.clone();
        self.every(self.cfg.retention_interval, move || {
            let me = me.clone();
            async move {
                if let Err(e) = me.expire(None, None).await {
                    METRICS.flush_errors.inc();
                    tracing::error!(error = %e, "retention pass failed; expired files stay until the next");
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(date: &str, hour: u8) -> Arc<FileMeta> {
        Arc::new(FileMeta::sample(&format!("{date}-{hour}"), date, hour))
    }

    #[test]
    fn whole_hours_expire_once_they_ended_longer_ago_than_the_retention() {
        // 2026-11-24T10:30:00Z
        let now = 1_795_516_200_000;
        let files = vec![
            file("2026-11-24", 10), // this hour
            file("2026-11-24", 9),  // ended 30 min ago
            file("2026-11-24", 8),  // ended 90 min ago
            file("2026-11-23", 23),
            file("2025-01-01", 0),
            file("2027-01-01", 0), // in the future
        ];
        let ids = |v: Vec<Arc<FileMeta>>| v.iter().map(|f| f.id.clone()).collect::<Vec<_>>();
        let hour = Duration::from_secs(3600);
        assert_eq!(
            ids(expired(&files, now, hour)),
            ["2026-11-24-8", "2026-11-23-23", "2025-01-01-0"]
        );
        // The boundary: an hour that ended exactly `keep` ago goes.
        assert_eq!(
            ids(expired(&files, now, Duration::from_secs(30 * 60))),
            [
                "2026-11-24-9",
                "2026-11-24-8",
                "2026-11-23-23",
                "2025-01-01-0"
            ]
        );
        assert_eq!(
            ids(expired(&files, now, Duration::from_secs(30 * 60 + 1))),
            ["2026-11-24-8", "2026-11-23-23", "2025-01-01-0"]
        );
        assert!(expired(&files, now, Duration::from_secs(800 * 86_400)).is_empty());
        // Past u64 milliseconds: forever, not a wrapped-around horizon.
        assert!(expired(&files, now, Duration::from_secs(u64::MAX)).is_empty());
        assert!(expired(&[file("not-a-date", 1)], now, hour).is_empty());
    }
}
