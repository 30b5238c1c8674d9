//! The lake: where Parquet files live, behind `object_store`.
//!
//! Layout (hive partitions, relative to the lake root):
//! `tenant={t}/endpoint={e}/date={YYYY-MM-DD}/hour={HH}/part-{ulid}-{node}.parquet`.
//!
//! Two kinds of lake URL: `file:///dir` (the default, `<data>/lake`) and
//! `s3://bucket/prefix` (any S3-compatible store; credentials, region and
//! endpoint come from the usual `AWS_*` variables, e.g. `AWS_ENDPOINT_URL` and
//! `AWS_ALLOW_HTTP=true` for MinIO).
//!
//! `put` is atomic for readers (an S3 PUT is atomic; on local disk the file is
//! written under a staging name and renamed) and, on local disk, fsyncs the
//! file and its directory before returning, so a recorded file is a durable
//! file. Local writes are paced: every [`SYNC_CHUNK`] bytes are on disk before
//! the next are written. A file written whole and fsync'd once leaves tens of
//! megabytes of dirty pages that ext4's ordered journal writes out inside
//! the next commit, so a WAL `fdatasync` issued meanwhile waits 50–100 ms for
//! them (BENCHMARKS.md, fifth round). The node id in the
//! name keeps names unique across nodes sharing a bucket, and lets startup
//! reconcile only its own unrecorded files.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("lake URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("lake I/O: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone)]
pub struct Lake {
    /// Paths relative to the lake root.
    store: Arc<dyn ObjectStore>,
    /// Set for `file://` lakes: the root directory, for fsync.
    local_root: Option<PathBuf>,
    /// Local lakes: held shared while a put makes its directories and
    /// creates its file, exclusively while empty directories are removed
    /// (a removal in between would undo a made directory, or its synced
    /// parent entry).
    dirs: Arc<parking_lot::RwLock<()>>,
    url: String,
    /// What DataFusion reads through: the store of the URL's scheme and
    /// authority (`file:///`, `s3://bucket`) and the lake root's URL, ending in
    /// `/`, that file paths are appended to.
    scan_store: (url::Url, Arc<dyn ObjectStore>),
    scan_root: String,
}

impl Lake {
    pub fn open(url: &str) -> Result<Self> {
        let bad = |reason: &str| Error::Url {
            url: url.into(),
            reason: reason.into(),
        };
        if let Some(path) = url.strip_prefix("file://") {
            let root = PathBuf::from(path);
            std::fs::create_dir_all(&root)?;
            let root = root.canonicalize()?;
            let store = LocalFileSystem::new_with_prefix(&root)?;
            let base = url::Url::parse("file:///").expect("static URL");
            return Ok(Self {
                store: Arc::new(store),
                scan_root: format!("file://{}/", root.display()),
                local_root: Some(root),
                dirs: Arc::default(),
                url: url.to_string(),
                scan_store: (base, Arc::new(LocalFileSystem::new())),
            });
        }
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if !matches!(parsed.scheme(), "s3" | "s3a") {
            return Err(bad("use file:///dir or s3://bucket/prefix"));
        }
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| bad("no bucket"))?
            .to_string();
        let prefix = parsed.path().trim_matches('/').to_string();
        let s3: Arc<dyn ObjectStore> = Arc::new(
            AmazonS3Builder::from_env()
                .with_bucket_name(&bucket)
                .build()?,
        );
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            s3.clone()
        } else {
            Arc::new(PrefixStore::new(s3.clone(), prefix.as_str()))
        };
        let base = url::Url::parse(&format!("s3://{bucket}")).map_err(|e| bad(&e.to_string()))?;
        let scan_root = if prefix.is_empty() {
            format!("s3://{bucket}/")
        } else {
            format!("s3://{bucket}/{prefix}/")
        };
        Ok(Self {
            store,
            local_root: None,
            dirs: Arc::default(),
            url: url.to_string(),
            scan_store: (base, s3),
            scan_root,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object store DataFusion must have registered under the URL.
    pub fn scan_store(&self) -> (&url::Url, &Arc<dyn ObjectStore>) {
        (&self.scan_store.0, &self.scan_store.1)
    }

    /// URL of a lake path, as DataFusion reads it.
    pub fn scan_url(&self, path: &str) -> String {
        format!("{}{path}", self.scan_root)
    }

    /// Where an outside reader finds a lake path: an absolute file path on
    /// local lakes, `s3://bucket/prefix/…` otherwise (what DuckDB's
    /// `read_parquet` takes).
    pub fn location(&self, path: &str) -> String {
        match &self.local_root {
            Some(root) => root.join(path).display().to_string(),
            None => self.scan_url(path),
        }
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn local_root(&self) -> Option<&PathBuf> {
        self.local_root.as_ref()
    }

    /// Writes the whole object atomically and durably.
    pub async fn put(&self, path: &str, bytes: Bytes) -> Result<()> {
        match &self.local_root {
            Some(root) => {
                let full = root.join(path);
                let dirs = self.dirs.clone();
                tokio::task::spawn_blocking(move || write_paced(&full, &bytes, &dirs))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))??;
            }
            None => {
                self.store
                    .put(&ObjPath::from(path), PutPayload::from(bytes))
                    .await?;
            }
        }
        Ok(())
    }

    /// Every object path under the lake root.
    pub async fn list(&self) -> Result<Vec<String>> {
        let metas: Vec<_> = self.store.list(None).try_collect().await?;
        Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
    }

    /// The whole object.
    pub async fn get(&self, path: &str) -> Result<Bytes> {
        Ok(self.store.get(&ObjPath::from(path)).await?.bytes().await?)
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.store.delete(&ObjPath::from(path)).await?;
        Ok(())
    }

    /// Deletes every path and returns those that could not be deleted, with
    /// why; a path already gone counts as deleted. Object stores delete in
    /// bulk (S3: a `DeleteObjects` request per 1,000 keys, 20 at once), so
    /// expiring a month of files is a few requests, not one per file. What
    /// the bulk request did not confirm is tried again one by one, which
    /// tells a missing object from a failed delete.
    pub async fn delete_all(&self, paths: Vec<String>) -> Vec<(String, Error)> {
        let locations = paths
            .iter()
            .map(|p| Ok(ObjPath::from(p.as_str())))
            .collect::<Vec<_>>();
        let mut confirmed = HashSet::new();
        let mut bulk_error = None;
        let mut deleted = self
            .store
            .delete_stream(futures::stream::iter(locations).boxed());
        while let Some(result) = deleted.next().await {
            match result {
                Ok(path) => {
                    confirmed.insert(path.to_string());
                }
                Err(e) => {
                    bulk_error.get_or_insert(e);
                }
            }
        }
        // (A path already gone is an error of a local lake's bulk delete.)
        if let Some(e) = bulk_error.filter(|e| !matches!(e, object_store::Error::NotFound { .. })) {
            tracing::warn!(error = %e, "bulk delete failed; deleting the rest one by one");
        }
        let rest = paths.into_iter().filter(|p| !confirmed.contains(p));
        futures::stream::iter(rest)
            .map(|path| async move {
                match self.delete(&path).await {
                    Ok(()) | Err(Error::Store(object_store::Error::NotFound { .. })) => None,
                    Err(e) => Some((path, e)),
                }
            })
            .buffer_unordered(10)
            .filter_map(|failed| async move { failed })
            .collect()
            .await
    }

    /// Local lakes: removes up to `levels` directories above each path
    /// (`hour=`, then `date=`) while they are empty; each directory is
    /// tried once. Object stores have no directories.
    pub async fn remove_empty_parents(&self, paths: Vec<String>, levels: usize) {
        let Some(root) = self.local_root.clone() else {
            return;
        };
        if paths.is_empty() {
            return;
        }
        let dirs = self.dirs.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let parents: BTreeSet<PathBuf> = paths
                .iter()
                .filter_map(|p| root.join(p).parent().map(PathBuf::from))
                .collect();
            let _alone = dirs.write();
            // A `date=` whose other hours are still to come fails here and
            // goes with the last of them.
            for parent in &parents {
                for dir in parent.ancestors().take(levels) {
                    // Fails, and stops, at the first directory not empty.
                    if dir == root.as_path() || std::fs::remove_dir(dir).is_err() {
                        break;
                    }
                }
            }
        })
        .await;
    }
}

/// How much of a local file may be written before it is synced.
pub const SYNC_CHUNK: usize = 1 << 20;

/// Suffix of a local file being written; [`super::Flusher::reconcile`]
/// removes leftovers. DuckDB's and our `*.parquet` globs never match it.
pub const STAGING_SUFFIX: &str = ".staging";

/// `create_dir_all`, then the parent of each directory it made is synced:
/// a new `date=`/`hour=` directory's entry must be on disk before the file
/// in it is recorded, or a power loss could take the file's path away.
fn create_dirs_durably(dir: &std::path::Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let missing: Vec<&std::path::Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    std::fs::create_dir_all(dir)?;
    for made in missing {
        if let Some(parent) = made.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
    }
    Ok(())
}

/// Writes `bytes` to `full` atomically and durably, in [`SYNC_CHUNK`] pieces
/// that each reach the disk before the next is written: staging file, paced
/// writes, fsync, rename, fsync of the directory.
fn write_paced(
    full: &std::path::Path,
    bytes: &[u8],
    dirs: &parking_lot::RwLock<()>,
) -> std::io::Result<()> {
    use std::io::Write;
    let dir = full
        .parent()
        .ok_or_else(|| std::io::Error::other("lake path without a directory"))?;
    let mut staging = full.as_os_str().to_owned();
    staging.push(STAGING_SUFFIX);
    let staging = std::path::PathBuf::from(staging);
    let write = || -> std::io::Result<()> {
        // Once the staging file is in it, the directory is not empty and
        // stays (the final file goes in the same one). A write that fails
        // after this leaves the directory empty; the next reap or reconcile
        // of its hour removes it.
        let mut file = {
            let _made = dirs.read();
            create_dirs_durably(dir)?;
            std::fs::File::create(&staging)?
        };
        let mut offset = 0;
        for chunk in bytes.chunks(SYNC_CHUNK) {
            file.write_all(chunk)?;
            sync_range(&file, offset, chunk.len())?;
            offset += chunk.len();
        }
        file.sync_all()?;
        std::fs::rename(&staging, full)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&staging);
    })
}

/// Writes a just-written range to disk and waits for it, without a journal
/// commit (Linux `sync_file_range`); elsewhere a plain `fdatasync`.
#[cfg(target_os = "linux")]
fn sync_range(file: &std::fs::File, offset: usize, len: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a valid open descriptor and plain integers; no memory is shared.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn sync_range(file: &std::fs::File, _offset: usize, _len: usize) -> std::io::Result<()> {
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_put_writes_in_synced_chunks_and_leaves_no_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(&format!("file://{}", dir.path().display())).unwrap();
        let bytes: Vec<u8> = (0..SYNC_CHUNK * 2 + 12345)
            .map(|i| (i % 251) as u8)
            .collect();
        lake.put("tenant=a/x/part-1.parquet", Bytes::from(bytes.clone()))
            .await
            .unwrap();
        let dir_entries: Vec<_> = std::fs::read_dir(dir.path().join("tenant=a/x"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(dir_entries, ["part-1.parquet"]);
        let back = std::fs::read(dir.path().join("tenant=a/x/part-1.parquet")).unwrap();
        assert_eq!(back, bytes);
        assert_eq!(lake.list().await.unwrap(), ["tenant=a/x/part-1.parquet"]);
        // Overwrites replace the whole object.
        lake.put("tenant=a/x/part-1.parquet", Bytes::from_static(b"short"))
            .await
            .unwrap();
        let back = std::fs::read(dir.path().join("tenant=a/x/part-1.parquet")).unwrap();
        assert_eq!(back, b"short");
    }

    #[tokio::test]
    async fn delete_all_reports_only_real_failures_and_empty_hours_go() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(&format!("file://{}", dir.path().display())).unwrap();
        let path = |h: u8, n: u8| format!("t=a/date=2026-11-24/hour={h:02}/part-{n}.parquet");
        for (h, n) in [(1, 1), (1, 2), (2, 1), (2, 2)] {
            lake.put(&path(h, n), Bytes::from_static(b"PAR1"))
                .await
                .unwrap();
        }
        // A directory where a file should be cannot be deleted as one.
        let stuck = "t=a/date=2026-11-25/hour=00/part-1.parquet";
        std::fs::create_dir_all(dir.path().join(stuck).join("x")).unwrap();
        let missing = "t=a/date=2026-11-24/hour=03/part-1.parquet".to_string();
        let all = vec![path(1, 1), path(1, 2), path(2, 1), missing, stuck.into()];
        let failed = lake.delete_all(all.clone()).await;
        let failed: Vec<&str> = failed.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(failed, [stuck]);
        assert_eq!(lake.list().await.unwrap(), [path(2, 2)]);
        // Hour 01 is empty and goes; hour 02 keeps a file, so it and the
        // date stay.
        lake.remove_empty_parents(all[..3].to_vec(), 2).await;
        let date = dir.path().join("t=a/date=2026-11-24");
        assert!(!date.join("hour=01").exists());
        assert!(date.join("hour=02").exists());
        lake.delete_all(vec![path(2, 2)]).await;
        lake.remove_empty_parents(vec![path(2, 2)], 2).await;
        assert!(!date.exists());
        assert!(dir.path().join("t=a").exists(), "only two levels");
    }

    #[test]
    fn lake_urls() {
        let dir = tempfile::tempdir().unwrap();
        let local = Lake::open(&format!("file://{}", dir.path().display())).unwrap();
        let root = dir.path().canonicalize().unwrap();
        assert_eq!(
            local.scan_url("tenant=a/x.parquet"),
            format!("file://{}/tenant=a/x.parquet", root.display())
        );
        assert_eq!(
            local.location("tenant=a/x.parquet"),
            format!("{}/tenant=a/x.parquet", root.display())
        );
        let s3 = Lake::open("s3://bucket/some/prefix/").unwrap();
        assert_eq!(
            s3.scan_url("t/x.parquet"),
            "s3://bucket/some/prefix/t/x.parquet"
        );
        assert_eq!(s3.scan_store().0.as_str(), "s3://bucket");
        assert_eq!(
            s3.location("t/x.parquet"),
            "s3://bucket/some/prefix/t/x.parquet"
        );
        assert!(s3.local_root().is_none());
        let bare = Lake::open("s3://bucket").unwrap();
        assert_eq!(bare.scan_url("t/x.parquet"), "s3://bucket/t/x.parquet");
        for bad in ["ftp://x/y", "s3:///nobucket", "nonsense"] {
            assert!(Lake::open(bad).is_err(), "{bad}");
        }
    }
}
