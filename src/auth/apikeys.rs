//! API keys: random 256-bit secrets, stored only as SHA-256 hashes.
//!
//! Key format: `lw_` + 43 base64url characters (32 random bytes). The store
//! lives in the `keys` column family:
//! - `k/<sha256-hex>` → version byte `1` + JSON [`KeyRecord`]
//! - `i/<id>` → `<sha256-hex>` (lookup by id for delete)
//!
//! Lookup hashes the presented key and reads `k/<hash>`, then compares the
//! stored hash in constant time. Nothing stores or logs key material.

use base64::Engine;
use rocksdb::{IteratorMode, WriteBatch, DB};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::wal::CF_KEYS;

pub const KEY_PREFIX: &str = "lw_";
const VERSION: u8 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyRecord {
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub scopes: Vec<String>,
    /// When set, the key may only write/read these endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<String>>,
    pub created_at: u64,
    #[serde(default)]
    pub hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("key store: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("key record {0} is corrupt")]
    Corrupt(String),
}

pub fn hash_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Constant-time byte comparison.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new random key (≥ 256 bits of entropy).
pub fn generate_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

pub struct ApiKeys<'a> {
    db: &'a DB,
}

impl<'a> ApiKeys<'a> {
    pub fn new(db: &'a DB) -> Self {
        Self { db }
    }

    fn cf(&self) -> &'a rocksdb::ColumnFamily {
        self.db
            .cf_handle(CF_KEYS)
            .expect("keys column family exists")
    }

    /// Stores a record for `key` (its hash only).
    pub fn insert(&self, key: &str, mut rec: KeyRecord) -> Result<KeyRecord, Error> {
        rec.hash = hash_hex(key);
        let mut value = vec![VERSION];
        value.extend(serde_json::to_vec(&rec).expect("KeyRecord serializes"));
        let mut batch = WriteBatch::default();
        batch.put_cf(&self.cf(), format!("k/{}", rec.hash), value);
        batch.put_cf(&self.cf(), format!("i/{}", rec.id), rec.hash.as_bytes());
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        self.db.write_opt(batch, &sync)?;
        Ok(rec)
    }

    /// The record of a presented key, if it exists.
    pub fn lookup(&self, key: &str) -> Result<Option<KeyRecord>, Error> {
        let hash = hash_hex(key);
        let Some(v) = self.db.get_cf(&self.cf(), format!("k/{hash}"))? else {
            return Ok(None);
        };
        let rec = decode(&v).ok_or_else(|| Error::Corrupt(hash.clone()))?;
        Ok(ct_eq(rec.hash.as_bytes(), hash.as_bytes()).then_some(rec))
    }

    pub fn list(&self) -> Result<Vec<KeyRecord>, Error> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            &self.cf(),
            IteratorMode::From(b"k/", rocksdb::Direction::Forward),
        ) {
            let (k, v) = item?;
            if !k.starts_with(b"k/") {
                break;
            }
            out.push(decode(&v).ok_or_else(|| Error::Corrupt(String::from_utf8_lossy(&k).into()))?);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Deletes a key by id; returns its record when it existed.
    pub fn delete(&self, id: &str) -> Result<Option<KeyRecord>, Error> {
        let Some(hash) = self.db.get_cf(&self.cf(), format!("i/{id}"))? else {
            return Ok(None);
        };
        let hash = String::from_utf8_lossy(&hash).into_owned();
        let rec = self
            .db
            .get_cf(&self.cf(), format!("k/{hash}"))?
            .and_then(|v| decode(&v));
        let mut batch = WriteBatch::default();
        batch.delete_cf(&self.cf(), format!("k/{hash}"));
        batch.delete_cf(&self.cf(), format!("i/{id}"));
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        self.db.write_opt(batch, &sync)?;
        Ok(rec)
    }

    /// The record of a key by id (through the `i/<id>` index).
    pub fn get(&self, id: &str) -> Result<Option<KeyRecord>, Error> {
        let Some(hash) = self.db.get_cf(self.cf(), format!("i/{id}"))? else {
            return Ok(None);
        };
        let hash = String::from_utf8_lossy(&hash).into_owned();
        Ok(self
            .db
            .get_cf(self.cf(), format!("k/{hash}"))?
            .and_then(|v| decode(&v)))
    }

    pub fn exists_id(&self, id: &str) -> Result<bool, Error> {
        Ok(self
            .db
            .get_pinned_cf(&self.cf(), format!("i/{id}"))?
            .is_some())
    }

    pub fn is_empty(&self) -> Result<bool, Error> {
        let first = self
            .db
            .iterator_cf(
                &self.cf(),
                IteratorMode::From(b"k/", rocksdb::Direction::Forward),
            )
            .next();
        Ok(match first {
            Some(item) => !item?.0.starts_with(b"k/"),
            None => true,
        })
    }
}

fn decode(v: &[u8]) -> Option<KeyRecord> {
    (v.first() == Some(&VERSION))
        .then(|| serde_json::from_slice(&v[1..]).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_long() {
        let (a, b) = (generate_key(), generate_key());
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX));
        assert_eq!(a.len(), 3 + 43);
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn store_keeps_only_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let wal = crate::wal::Wal::open(dir.path(), 8).unwrap();
        let keys = ApiKeys::new(wal.db());
        assert!(keys.is_empty().unwrap());
        let key = generate_key();
        let rec = KeyRecord {
            id: "k1".into(),
            tenant: "acme".into(),
            name: "ci".into(),
            scopes: vec!["write".into()],
            endpoints: None,
            created_at: 1,
            hash: String::new(),
        };
        keys.insert(&key, rec).unwrap();
        assert!(!keys.is_empty().unwrap());
        assert_eq!(keys.lookup(&key).unwrap().unwrap().tenant, "acme");
        assert!(keys.lookup("lw_wrong").unwrap().is_none());
        let listed = keys.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert!(!serde_json::to_string(&listed).unwrap().contains(&key));
        assert!(keys.delete("k1").unwrap().is_some());
        assert!(keys.lookup(&key).unwrap().is_none());
        assert!(keys.delete("k1").unwrap().is_none());
    }
}
