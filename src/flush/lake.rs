//! The lake: where Parquet files live, behind `object_store`.
//!
//! Layout (hive partitions, relative to the lake root):
//! `tenant={t}/endpoint={e}/date={YYYY-MM-DD}/hour={HH}/part-{ulid}-{node}.parquet`.
//!
//! `put` is atomic for readers (object_store's local store writes a staging
//! file and renames it) and, on local disk, fsyncs the file and its directory
//! before returning, so a recorded file is a durable file. The node id in the
//! name keeps names unique across nodes sharing a bucket, and lets startup
//! reconcile only its own unrecorded files.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
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
    store: Arc<dyn ObjectStore>,
    /// Set for `file://` lakes: the root directory, for fsync and DataFusion.
    local_root: Option<PathBuf>,
    url: String,
}

impl Lake {
    pub fn open(url: &str) -> Result<Self> {
        let path = url.strip_prefix("file://").ok_or_else(|| Error::Url {
            url: url.into(),
            reason: "only file:// is supported by this build".into(),
        })?;
        let root = PathBuf::from(path);
        std::fs::create_dir_all(&root)?;
        let store = LocalFileSystem::new_with_prefix(&root)?;
        Ok(Self {
            store: Arc::new(store),
            local_root: Some(root),
            url: url.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
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
