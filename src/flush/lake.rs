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
//! `put` is atomic for readers (object_store's local store writes a staging
//! file and renames it; an S3 PUT is atomic) and, on local disk, fsyncs the
//! file and its directory before returning, so a recorded file is a durable
//! file. The node id in the
//! name keeps names unique across nodes sharing a bucket, and lets startup
//! reconcile only its own unrecorded files.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
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

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn local_root(&self) -> Option<&PathBuf> {
        self.local_root.as_ref()
    }

    /// Writes the whole object atomically and durably.
    pub async fn put(&self, path: &str, bytes: Bytes) -> Result<()> {
        self.store
            .put(&ObjPath::from(path), PutPayload::from(bytes))
            .await?;
        if let Some(root) = &self.local_root {
            let full = root.join(path);
            tokio::task::spawn_blocking(move || sync_file_and_dir(&full))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))??;
        }
        Ok(())
    }

    /// Every object path under the lake root.
    pub async fn list(&self) -> Result<Vec<String>> {
        let metas: Vec<_> = self.store.list(None).try_collect().await?;
        Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.store.delete(&ObjPath::from(path)).await?;
        Ok(())
    }
}

fn sync_file_and_dir(full: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(full)?.sync_all()?;
    if let Some(dir) = full.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lake_urls() {
        let dir = tempfile::tempdir().unwrap();
        let local = Lake::open(&format!("file://{}", dir.path().display())).unwrap();
        let root = dir.path().canonicalize().unwrap();
        assert_eq!(
            local.scan_url("tenant=a/x.parquet"),
            format!("file://{}/tenant=a/x.parquet", root.display())
        );
        let s3 = Lake::open("s3://bucket/some/prefix/").unwrap();
        assert_eq!(
            s3.scan_url("t/x.parquet"),
            "s3://bucket/some/prefix/t/x.parquet"
        );
        assert_eq!(s3.scan_store().0.as_str(), "s3://bucket");
        assert!(s3.local_root().is_none());
        let bare = Lake::open("s3://bucket").unwrap();
        assert_eq!(bare.scan_url("t/x.parquet"), "s3://bucket/t/x.parquet");
        for bad in ["ftp://x/y", "s3:///nobucket", "nonsense"] {
            assert!(Lake::open(bad).is_err(), "{bad}");
        }
    }
}
