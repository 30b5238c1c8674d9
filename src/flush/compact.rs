//! Compaction: the small files of one partition become one file.
//!
//! Every flush of a table writes one file per UTC hour its rows fall in, so a
//! quiet table flushed by age (`--flush-age`) leaves a file a minute in each
//! hour, and every query opens them all. Every `--compact-interval`, the
//! files of one partition (tenant, endpoint, date, hour) written by this
//! node are merged, oldest first, into groups of at most `--flush-rows` rows
//! and `--flush-bytes` decoded (their row groups' uncompressed size: about
//! what a flush holds in memory); a group of two or more becomes one file,
//! sorted and encoded like a flush's, on the idle-priority encode thread
//! (never hurried: flushes that fall behind keep the other one).
//!
//! The background pass merges an hour once it has been over for
//! `--flush-age` + `--compact-interval` ([`settled_before`]): by then the
//! flushes of its last rows (and of spans that started in it and ended
//! minutes later) are in, so an hour is merged about once. Merging the
//! current hour every pass would rewrite its merged file a dozen times an
//! hour, and open the glob readers' window below as often. An admin pass
//! (`POST /api/v1/admin/compact`) merges every hour, the current one too.
//!
//! Order, like a flush: put the merged file → in one synced RocksDB batch
//! record it and forget its inputs in the manifest → swap them in the
//! catalog, atomically for queries → delete the inputs once no running
//! query holds a snapshot that lists them (a query pins its snapshot's
//! files until it ends; see [`Flusher::reap`]). A crash before the manifest
//! batch leaves the merged file unrecorded (startup's reconcile deletes
//! it); a crash after it leaves the inputs unrecorded (deleted the same
//! way). Watermarks do not move: the rows are the same rows. A failed
//! manifest batch keeps the merged file: the write may have landed (or
//! come back at restart), so the next pass retries that same batch (same
//! keys: idempotent) before it merges anything, rather than merging the
//! inputs again into a second file.
//!
//! Readers that glob the lake directly (DuckDB) can see a partition's rows
//! twice between the merged file's put and the inputs' delete: milliseconds
//! when no query of ours is reading the inputs, at most the longest such
//! query (`--query-timeout`) otherwise.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use ulid::Ulid;

use super::manifest::{self, FileMeta};
use super::{now_ms, parquet as pq, threads, Error, Flusher, Result};
use crate::memtable::TableId;
use crate::metrics::METRICS;

/// A merge whose file is written and whose manifest record failed.
pub(super) struct UnrecordedMerge {
    table: TableId,
    merged: FileMeta,
    group: Vec<Arc<FileMeta>>,
    started: Instant,
}

/// What one compaction pass did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Compacted {
    /// Files merged away.
    pub merged: usize,
    /// Files written in their place.
    pub written: usize,
    /// Rows in the files written.
    pub rows: u64,
}

/// Groups of files to merge: per (date, hour), this node's files oldest
/// first, cut at `max_rows` rows and `max_bytes` of `size` (decoded: what
/// the merge holds, and checks again; a group cut on Parquet sizes would
/// be cut again there, and planned the same way every pass); groups of one
/// are left alone, and so are hours that end after `settled` (ms since the
/// epoch) when it is given.
pub fn plan(
    files: &[Arc<FileMeta>],
    node: &str,
    max_rows: u64,
    max_bytes: u64,
    settled: Option<u64>,
    size: impl Fn(&FileMeta) -> u64,
) -> Vec<Vec<Arc<FileMeta>>> {
    let suffix = format!("-{node}.parquet");
    let mut partitions: BTreeMap<(&str, u8), Vec<&Arc<FileMeta>>> = BTreeMap::new();
    for f in files {
        let in_time = settled.is_none_or(|s| f.hour_end_ms().is_some_and(|end| end <= s));
        if in_time && f.path.ends_with(&suffix) && f.rows < max_rows && size(f) < max_bytes {
            partitions.entry((&f.date, f.hour)).or_default().push(f);
        }
    }
    let mut groups = Vec::new();
    for (_, mut small) in partitions {
        small.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        let mut group: Vec<Arc<FileMeta>> = Vec::new();
        let (mut rows, mut bytes) = (0, 0);
        for f in small {
            let size = size(f);
            if !group.is_empty() && (rows + f.rows > max_rows || bytes + size > max_bytes) {
                if group.len() > 1 {
                    groups.push(std::mem::take(&mut group));
                }
                group.clear();
                (rows, bytes) = (0, 0);
            }
            rows += f.rows;
            bytes += size;
            group.push(f.clone());
        }
        if group.len() > 1 {
            groups.push(group);
        }
    }
    groups
}

/// Hours that ended at or before this (ms since the epoch) are settled:
/// a background pass merges them.
pub fn settled_before(now_ms: u64, flush_age: Duration, compact_interval: Duration) -> u64 {
    now_ms.saturating_sub((flush_age + compact_interval).as_millis() as u64)
}

impl Flusher {
    /// Merges the small files of every table (of `tenant`'s tables when
    /// given); see the module contract. One pass at a time. `urgent` (an
    /// admin call waits) merges every hour and encodes at normal priority;
    /// otherwise settled hours only, on the idle thread. A group that fails
    /// is logged and counted, and the pass goes on; the first error is
    /// returned at the end.
    pub async fn compact(&self, tenant: Option<&str>, urgent: bool) -> Result<Compacted> {
        let _one = self.compact_lock.lock().await;
        self.reap().await;
        let mut done = Compacted::default();
        // A merge whose record failed goes first; nothing else until it is
        // recorded (a tenant's pass retries another tenant's merge too).
        let (n, rows) = self.retry_merge().await?;
        if n > 0 {
            done.merged += n;
            done.written += 1;
            done.rows += rows;
        }
        let max_rows = self.cfg.rows as u64;
        let max_bytes = self.cfg.bytes.max(1);
        let settled =
            (!urgent).then(|| settled_before(now_ms(), self.cfg.age, self.cfg.compact_interval));
        let mut first_error = None;
        // Files recorded without their decoded size: what a merge measured.
        let measured = self.measured.lock().clone();
        let size = |f: &FileMeta| {
            let known = f.decoded_bytes.or_else(|| measured.get(&f.path).copied());
            known.unwrap_or(f.bytes)
        };
        for (table, files) in self.published_of(tenant) {
            // Hours past their retention are about to go: no merging them.
            let files = self.unexpired(&table, files);
            for group in plan(&files, &self.node_id, max_rows, max_bytes, settled, size) {
                if self.stop.is_cancelled() {
                    break;
                }
                match self.merge(&table, group, urgent).await {
                    Ok((0, _)) => {}
                    Ok((n, rows)) => {
                        done.merged += n;
                        done.written += 1;
                        done.rows += rows;
                    }
                    Err(e) => {
                        METRICS.flush_errors.inc();
                        tracing::error!(%table, error = %e, "compaction of a partition failed; its files stay as they are");
                        let halt = matches!(e, Error::Record { .. });
                        first_error.get_or_insert(e);
                        if halt {
                            // Retried by the next pass (record_merge).
                            break;
                        }
                    }
                }
            }
            if self.unrecorded_merge.lock().is_some() || self.stop.is_cancelled() {
                break;
            }
        }
        self.reap().await;
        match first_error {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// Merges one group; returns how many files went and the rows.
    #[tracing::instrument(skip_all, fields(table = %table))]
    async fn merge(
        &self,
        table: &TableId,
        mut group: Vec<Arc<FileMeta>>,
        urgent: bool,
    ) -> Result<(usize, u64)> {
        let started = Instant::now();
        // Decoded, the inputs must fit what one flush holds (--flush-bytes):
        // their footers tell the uncompressed size; the group is cut there.
        let mut inputs = Vec::with_capacity(group.len());
        let mut decoded = 0u64;
        for f in &group {
            let bytes = self
                .lake
                .get(&f.path)
                .await
                .map_err(|source| Error::Publish {
                    path: f.path.clone(),
                    source,
                })?;
            let size = match f.decoded_bytes {
                Some(size) => size,
                None => {
                    let size = uncompressed(&bytes).map_err(|source| Error::Encode {
                        table: table.clone(),
                        source,
                    })?;
                    // Planned with it from now on: not cut again here.
                    self.measured.lock().insert(f.path.clone(), size);
                    size
                }
            };
            if !inputs.is_empty() && decoded + size > self.cfg.bytes {
                break;
            }
            decoded += size;
            inputs.push(bytes);
        }
        group.truncate(inputs.len());
        if group.len() < 2 {
            return Ok((0, 0));
        }
        let inputs: Arc<Vec<Bytes>> = Arc::new(inputs);
        let endpoint = table.endpoint.to_string();
        let opts = pq::EncodeOptions {
            row_group_rows: self.cfg.row_group_rows,
            zstd_level: self.cfg.zstd_level,
        };
        let start: threads::Start = Arc::new(move || {
            let mut batches = Vec::new();
            for bytes in inputs.iter() {
                let reader = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())?
                    .with_batch_size(8192)
                    .build()?;
                for batch in reader {
                    batches.push(batch?);
                }
            }
            pq::Encoder::new(&endpoint, &batches, opts.clone())
        });
        let encoded = match urgent {
            true => self.encode.encode(start, true).await,
            false => self.encode.encode_idle(start).await,
        }
        .map_err(|source| Error::Encode {
            table: table.clone(),
            source,
        })?;
        let failed = |reason: String| Error::Encode {
            table: table.clone(),
            source: pq::Error::Parquet(::parquet::errors::ParquetError::General(reason)),
        };
        // The inputs share one hour, so their rows make one file.
        let [enc] = <[pq::Encoded; 1]>::try_from(encoded)
            .map_err(|v| failed(format!("files of one hour encoded into {} files", v.len())))?;
        let input_rows: u64 = group.iter().map(|f| f.rows).sum();
        if enc.rows as u64 != input_rows {
            let reason = format!("merged file has {} rows, its inputs {input_rows}", enc.rows);
            return Err(failed(reason));
        }
        let id = Ulid::new().to_string();
        let first = &group[0];
        let path = super::file_path(table, &first.date, first.hour, &id, &self.node_id);
        let bytes = enc.bytes.len() as u64;
        if let Err(source) = self.lake.put(&path, enc.bytes).await {
            self.discard(vec![path.clone()]).await;
            return Err(Error::Publish { path, source });
        }
        let merged = FileMeta {
            id,
            tenant: table.tenant.to_string(),
            endpoint: table.endpoint.to_string(),
            path,
            date: first.date.clone(),
            hour: first.hour,
            rows: enc.rows as u64,
            bytes,
            min_time_ns: enc.min_time_ns,
            max_time_ns: enc.max_time_ns,
            // ULID strings order as their keys do.
            min_seq: group
                .iter()
                .map(|f| &f.min_seq)
                .min()
                .cloned()
                .unwrap_or_default(),
            max_seq: group
                .iter()
                .map(|f| &f.max_seq)
                .max()
                .cloned()
                .unwrap_or_default(),
            created_at_ms: now_ms(),
            service_names: Some(enc.service_names),
            decoded_bytes: Some(enc.decoded_bytes),
        };
        self.record_merge(UnrecordedMerge {
            table: table.clone(),
            merged,
            group,
            started,
        })
    }

    /// Records a merged file and forgets its inputs (one synced batch),
    /// then swaps them in the catalog and hands the inputs to the reap. A
    /// failed record keeps the merged file for the next pass to retry
    /// ([`Flusher::retry_merge`]): the write may have landed, or come back
    /// at restart, so merging the same inputs again could record their
    /// rows twice.
    fn record_merge(&self, m: UnrecordedMerge) -> Result<(usize, u64)> {
        if let Err(source) = self.faulty(|| manifest::replace(self.wal.db(), &m.merged, &m.group)) {
            tracing::error!(path = %m.merged.path, error = %source, "merged file written but not recorded; the next compaction pass retries the record before it merges anything");
            let table = m.table.clone();
            *self.unrecorded_merge.lock() = Some(m);
            return Err(Error::Record { table, source });
        }
        let UnrecordedMerge {
            table,
            merged,
            group,
            started,
        } = m;
        let n = group.len();
        if self
            .catalog
            .replace_files(&table, &group, Arc::new(merged.clone()))
        {
            self.bury(group);
        } else {
            // Only compaction and retention remove published files, one
            // pass at a time, and a retried record checks first: not
            // reached. Should it be, the catalog keeps the inputs (and
            // queries read them), and startup reads the manifest.
            tracing::error!(%table, "compacted files were no longer published; they stay until restart");
        }
        METRICS.compactions.inc();
        METRICS.compacted_files.add(n as u64);
        tracing::info!(
            %table,
            files = n,
            rows = merged.rows,
            bytes = merged.bytes,
            ms = started.elapsed().as_millis() as u64,
            "compacted"
        );
        Ok((n, merged.rows))
    }

    /// Retries the record of a merge whose record failed, if there is
    /// one. Should retention have expired some of its inputs meanwhile,
    /// the merged file is forgotten (in case the failed write landed) and
    /// deleted instead: its rows are past retention.
    pub(super) async fn retry_merge(&self) -> Result<(usize, u64)> {
        let Some(m) = self.unrecorded_merge.lock().take() else {
            return Ok((0, 0));
        };
        let published: HashSet<String> = self
            .published_of(Some(&m.table.tenant))
            .filter(|(t, _)| *t == m.table)
            .flat_map(|(_, files)| files.into_iter().map(|f| f.id.clone()))
            .collect();
        if m.group.iter().all(|f| published.contains(&f.id)) {
            return self.record_merge(m);
        }
        let merged = Arc::new(m.merged.clone());
        let forget = || manifest::forget(self.wal.db(), std::slice::from_ref(&merged));
        if let Err(source) = self.faulty(forget) {
            let table = m.table.clone();
            *self.unrecorded_merge.lock() = Some(m);
            return Err(Error::Record { table, source });
        }
        tracing::warn!(path = %merged.path, "a merged file whose record failed lost its inputs to retention: deleted");
        self.discard(vec![merged.path.clone()]).await;
        Ok((0, 0))
    }

    /// Deletes merged-away and expired files that no query snapshot or
    /// lease lists any more (the graveyard holds the last reference then),
    /// after dropping the leases that ended; returns once any reap in
    /// progress is done too. A delete that fails is retried at the next
    /// pass; startup's reconcile deletes them anyway.
    pub async fn reap(&self) {
        let _one = self.reap_lock.lock().await;
        self.reap_locked().await;
    }

    /// [`Flusher::reap`] unless one is running (the flush loop's: a long
    /// reap, thousands of expired S3 objects, must not hold up flushes).
    pub(super) async fn reap_if_idle(&self) {
        if let Ok(_one) = self.reap_lock.try_lock() {
            self.reap_locked().await;
        }
    }

    async fn reap_locked(&self) {
        self.leases.drop_ended();
        let free: Vec<Arc<FileMeta>> = {
            let mut graveyard = self.graveyard.lock();
            let (free, held) = std::mem::take(&mut *graveyard)
                .into_iter()
                .partition(|f| Arc::strong_count(f) == 1);
            *graveyard = held;
            free
        };
        if free.is_empty() {
            return;
        }
        let paths: Vec<String> = free.iter().map(|f| f.path.clone()).collect();
        let failed: HashSet<String> = self
            .lake
            .delete_all(paths.clone())
            .await
            .into_iter()
            .map(|(path, e)| {
                tracing::warn!(%path, error = %e, "could not delete a merged-away or expired file; retrying");
                path
            })
            .collect();
        let back = free.into_iter().filter(|f| failed.contains(&f.path));
        self.graveyard.lock().extend(back);
        // An expired hour leaves empty directories behind, once its last
        // file goes (which may be a merged-away one a query or lease held).
        let gone = paths.into_iter().filter(|p| !failed.contains(p)).collect();
        self.lake.remove_empty_parents(gone, 2).await;
    }

    /// Background loop: a compaction pass every `--compact-interval` until
    /// stopped ([`Flusher::stop`]; not started when it is zero).
    pub async fn run_compaction(self: Arc<Self>) {
        let me = self.clone();
        self.every(self.cfg.compact_interval, move || {
            let me = me.clone();
            // Errors are logged and counted where they happen.
            async move { drop(me.compact(None, false).await) }
        })
        .await
    }

    /// Runs `pass` every `interval` (the first after one interval) until
    /// stopped, one at a time.
    pub(super) async fn every<F, Fut>(&self, interval: Duration, mut pass: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            pass().await;
        }
    }

    /// Waits for a compaction or retention pass in progress (an admin's
    /// too), then deletes what no query reads any more (shutdown).
    pub async fn settle(&self) {
        drop(self.compact_lock.lock().await);
        self.reap().await;
    }

    /// Files merged away and not yet deleted.
    pub fn unreaped(&self) -> usize {
        self.graveyard.lock().len()
    }
}

/// What a Parquet file's row groups hold uncompressed (about what they
/// decode to).
fn uncompressed(bytes: &Bytes) -> Result<u64, pq::Error> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())?;
    Ok(pq::decoded_size(reader.metadata().row_groups()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(id: &str, hour: u8, rows: u64, node: &str) -> Arc<FileMeta> {
        let date = "2026-11-23";
        Arc::new(FileMeta {
            path: format!(
                "tenant=t/endpoint=spans/date={date}/hour={hour:02}/part-{id}-{node}.parquet"
            ),
            rows,
            bytes: rows * 10,
            created_at_ms: id.as_bytes()[0] as u64,
            ..FileMeta::sample(id, date, hour)
        })
    }

    fn size(f: &FileMeta) -> u64 {
        f.decoded_bytes.unwrap_or(f.bytes)
    }

    #[test]
    fn plans_groups_per_hour_within_the_limits() {
        let ids = |g: &Vec<Arc<FileMeta>>| g.iter().map(|f| f.id.clone()).collect::<Vec<_>>();
        let files = vec![
            file("a", 1, 40, "n"),
            file("b", 1, 40, "n"),
            file("c", 1, 40, "n"), // would pass 100 rows with a and b
            file("d", 1, 30, "n"),
            file("e", 2, 10, "n"),    // alone in its hour
            file("f", 1, 100, "n"),   // full already
            file("g", 1, 5, "other"), // another node's
            file("h", 3, 10, "n"),
            file("i", 3, 10, "n"),
        ];
        let groups = plan(&files, "n", 100, 1 << 20, None, size);
        let got: Vec<Vec<String>> = groups.iter().map(ids).collect();
        assert_eq!(got, vec![vec!["a", "b"], vec!["c", "d"], vec!["h", "i"]]);
        // The byte limit cuts too (10 bytes a row).
        let got: Vec<Vec<String>> = plan(&files, "n", 100, 750, None, size)
            .iter()
            .map(ids)
            .collect();
        assert_eq!(got, vec![vec!["c", "d"], vec!["h", "i"]]);
        // Decoded sizes, when recorded, cut instead: 400 bytes of Parquet
        // each, a and b would fit 1000 bytes; decoded they take 1200.
        let decoded: Vec<_> = files[..2]
            .iter()
            .map(|f| {
                Arc::new(FileMeta {
                    decoded_bytes: Some(600),
                    ..(**f).clone()
                })
            })
            .collect();
        assert!(plan(&decoded, "n", 100, 1000, None, size).is_empty());
        assert_eq!(plan(&decoded, "n", 100, 1200, None, size).len(), 1);
        // Hours not yet settled wait: hour 3 ends at 04:00.
        let at = |h: u64, m: u64| 1_795_392_000_000 + (h * 60 + m) * 60_000; // 2026-11-23
        let got: Vec<Vec<String>> = plan(&files, "n", 100, 1 << 20, Some(at(3, 59)), size)
            .iter()
            .map(ids)
            .collect();
        assert_eq!(got, vec![vec!["a", "b"], vec!["c", "d"]]);
        let got = plan(&files, "n", 100, 1 << 20, Some(at(4, 0)), size);
        assert_eq!(got.len(), 3);
        // At the defaults an hour settles six minutes after its end.
        let s = settled_before(at(4, 6), Duration::from_secs(60), Duration::from_secs(300));
        assert_eq!(s, at(4, 0));
    }
}
