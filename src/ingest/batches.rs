//! Idempotency of DataRecord batches: `batch_id` → the original ack.
//!
//! `batches` CF, key `"{tenant}/{endpoint}/{batch_id}"`, value: WAL entry key
//! (16 bytes) ++ records accepted (u64 BE) ++ accepted at, ms since epoch
//! (u64 BE). The row is written in the *same* RocksDB write batch as the WAL
//! entry ([`crate::wal::Mark`]), so a batch is durable iff it is known: a retry
//! after a crash between append and ack gets the original ack, never a second
//! copy. Concurrent requests with one batch id are serialized by [`BatchIndex::claim`].
//! Rows older than the window are ignored and pruned.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rocksdb::{IteratorMode, WriteBatch, DB};
use tokio::sync::Notify;
use ulid::Ulid;

use crate::flush::now_ms;
use crate::wal::{Mark, CF_BATCHES};

pub const MAX_BATCH_ID_BYTES: usize = 256;

/// The ack of a batch already written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ack {
    pub seq: Ulid,
    pub records: u64,
}

pub struct BatchIndex {
    db: Arc<DB>,
    window: Duration,
    inflight: Mutex<HashMap<Vec<u8>, Arc<Notify>>>,
}

/// Held while a batch id is being checked and written.
pub struct Claim<'a> {
    index: &'a BatchIndex,
    key: Vec<u8>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.index.inflight.lock().remove(&self.key) {
            n.notify_waiters();
        }
    }
}

impl Claim<'_> {
    /// The mark to append with the batch's WAL entry.
    pub fn mark(&self, records: u64) -> Mark {
        let mut suffix = records.to_be_bytes().to_vec();
        suffix.extend_from_slice(&now_ms().to_be_bytes());
        Mark {
            cf: CF_BATCHES,
            key: self.key.clone(),
            suffix,
        }
    }
}

impl BatchIndex {
    pub fn new(db: Arc<DB>, window: Duration) -> Self {
        Self {
            db,
            window,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    fn key(tenant: &str, endpoint: &str, batch_id: &str) -> Vec<u8> {
        format!("{tenant}/{endpoint}/{batch_id}").into_bytes()
    }

    /// Waits until no other request holds this batch id, then holds it.
    pub async fn claim(&self, tenant: &str, endpoint: &str, batch_id: &str) -> Claim<'_> {
        let key = Self::key(tenant, endpoint, batch_id);
        loop {
            let wait = {
                let mut inflight = self.inflight.lock();
                match inflight.get(&key) {
                    Some(n) => n.clone().notified_owned(),
                    None => {
                        inflight.insert(key.clone(), Arc::new(Notify::new()));
                        return Claim { index: self, key };
                    }
                }
            };
            wait.await;
        }
    }

    /// The original ack of a claimed batch id, if it was written within the window.
    pub fn lookup(&self, claim: &Claim<'_>) -> Result<Option<Ack>, rocksdb::Error> {
        let cf = self
            .db
            .cf_handle(CF_BATCHES)
            .expect("batches column family exists");
        let Some(v) = self.db.get_pinned_cf(&cf, &claim.key)? else {
            return Ok(None);
        };
        Ok(decode(&v)
            .filter(|(_, _, at)| !self.expired(*at, now_ms()))
            .map(|(seq, records, _)| Ack { seq, records }))
    }

    fn expired(&self, at_ms: u64, now: u64) -> bool {
        now.saturating_sub(at_ms) > self.window.as_millis() as u64
    }

    /// Deletes rows older than the window; returns how many.
    ///
    /// A batch id reused just as its old row expires writes a new row while
    /// it is claimed. So rows are deleted under the claim table's lock (no
    /// claim can start meanwhile), skipping claimed ids and rows that
    /// changed since they were read (written by a claim that has ended).
    pub fn prune(&self) -> Result<usize, rocksdb::Error> {
        let cf = self
            .db
            .cf_handle(CF_BATCHES)
            .expect("batches column family exists");
        let now = now_ms();
        let mut expired = Vec::new();
        for item in self.db.iterator_cf(&cf, IteratorMode::Start) {
            let (k, v) = item?;
            if decode(&v).is_none_or(|(_, _, at)| self.expired(at, now)) {
                expired.push((k, v));
            }
        }
        let mut n = 0;
        for chunk in expired.chunks(1024) {
            let inflight = self.inflight.lock();
            let mut batch = WriteBatch::default();
            for (k, v) in chunk {
                let unchanged = self
                    .db
                    .get_pinned_cf(&cf, k)?
                    .is_some_and(|now| *now == **v);
                if unchanged && !inflight.contains_key(&k[..]) {
                    batch.delete_cf(&cf, k);
                    n += 1;
                }
            }
            self.db.write(batch)?;
            drop(inflight);
        }
        Ok(n)
    }
}

fn decode(v: &[u8]) -> Option<(Ulid, u64, u64)> {
    if v.len() != 32 {
        return None;
    }
    let seq = Ulid::from_bytes(v[..16].try_into().ok()?);
    let records = u64::from_be_bytes(v[16..24].try_into().ok()?);
    let at = u64::from_be_bytes(v[24..32].try_into().ok()?);
    Some((seq, records, at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{PayloadKind, Wal, WalEntry};

    #[tokio::test]
    async fn a_marked_append_is_found_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), 8).unwrap();
        let index = BatchIndex::new(wal.db().clone(), Duration::from_secs(3600));
        let claim = index.claim("t", "e", "b1").await;
        assert_eq!(index.lookup(&claim).unwrap(), None);
        let entry = WalEntry {
            kind: PayloadKind::DataRecordBatch,
            tenant: "t".into(),
            endpoint: "e".into(),
            payload: bytes::Bytes::from_static(b"x"),
        };
        let seq = wal
            .append_marked(&entry, Some(claim.mark(7)), |_| {})
            .await
            .unwrap();
        drop(claim);
        let claim = index.claim("t", "e", "b1").await;
        assert_eq!(index.lookup(&claim).unwrap(), Some(Ack { seq, records: 7 }));
        assert_eq!(index.prune().unwrap(), 0);
        let short = BatchIndex::new(wal.db().clone(), Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(short.lookup(&claim).unwrap(), None);
        // A claimed id keeps its row: its request may be writing a new one.
        let held = short.claim("t", "e", "b1").await;
        assert_eq!(short.prune().unwrap(), 0);
        drop(held);
        assert_eq!(short.prune().unwrap(), 1);
    }
}
